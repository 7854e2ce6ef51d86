"""Small shared pieces every attack uses: the ascent step, the projection, the random start,
the input gradient and the success test. No attack re-implements any of these.

The step and the projection are the fused op ``tempsoft::pgd_step_`` (one pass over memory);
a projection is that op with a zero step size, which leaves only "project onto the ball,
clamp to the box".
"""
import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from tempsoft.ops.pgd import _pgd_step_checked_, random_start  # noqa: F401  (re-exported)


class Geometry:
    """The threat model of one attack call: the ball around x_nat and the image box.

    Built once per call from checked arguments; holds eps as a (B,) tensor, the norm code
    the kernels take and the backend that runs the step.
    """

    __slots__ = ("x_nat", "eps", "norm", "code", "lower", "upper", "backend")

    def __init__(self, x_nat: Tensor, eps: Tensor, norm: str, code: int, lower: float,
                 upper: float, backend: str) -> None:
        self.x_nat, self.eps, self.norm, self.code = x_nat, eps, norm, code
        self.lower, self.upper, self.backend = lower, upper, backend

    def select(self, index: Tensor) -> "Geometry":
        """The threat model of the samples ``index`` only."""
        return Geometry(self.x_nat[index], self.eps[index], self.norm, self.code, self.lower,
                        self.upper, self.backend)

    def repeat(self, times: int) -> "Geometry":
        """The same threat model for `times` stacked copies of the batch (batched restarts)."""
        if times == 1:
            return self
        reps = (times,) + (1,) * (self.x_nat.dim() - 1)
        return Geometry(self.x_nat.repeat(reps), self.eps.repeat(times), self.norm, self.code,
                        self.lower, self.upper, self.backend)


def ascend_(x: Tensor, grad: Tensor, geo: Geometry, alpha: Tensor,
            active: Optional[Tensor] = None) -> Tensor:
    """x <- clamp(P_ball(x + alpha * dir(grad))), in place; dir = sign (Linf) or unit L2."""
    return _pgd_step_checked_(x, grad, geo.x_nat, geo.eps, alpha, geo.code, geo.lower,
                              geo.upper, active, geo.backend)


def project_(x: Tensor, geo: Geometry) -> Tensor:
    """x <- clamp(P_ball(x)), in place: the fused step with step size zero.

    With alpha = 0 the ascent term is exactly zero whatever `grad` holds, so x_nat serves as
    the (unused) direction and no gradient-sized buffer is needed.
    """
    zero = torch.zeros_like(geo.eps)
    return _pgd_step_checked_(x, geo.x_nat, geo.x_nat, geo.eps, zero, geo.code, geo.lower,
                              geo.upper, None, geo.backend)


def project(x: Tensor, geo: Geometry) -> Tensor:
    """clamp(P_ball(x)) as a new tensor."""
    return project_(x.clone(), geo)


def start_point(geo: Geometry, random: bool, generator: Optional[torch.Generator],
                start: str = "uniform") -> Tensor:
    """x_nat itself, or a random point of the ball drawn as ``start`` says (see
    :func:`tempsoft.ops.pgd.random_start`), then clamped to the box."""
    if not random:
        return geo.x_nat.clone()
    return random_start(geo.x_nat, geo.eps, geo.norm, geo.lower, geo.upper, generator,
                        mode=start)


LossFn = Callable[[Tensor, Tensor], Tensor]


@contextlib.contextmanager
def frozen_parameters(model) -> Iterator[None]:
    """Parameters with ``requires_grad=False`` inside the block; each flag restored after.

    An attack needs only the input gradient. With frozen weights autograd records no path
    to them, so the forward saves nothing for weight gradients and the backward skips them
    (about 10% per step on a small CNN with batch norm, measured on the CPU). Flipping the
    flags once per attack call costs nothing per step, unlike swapping in detached weights
    with torch.func.functional_call on every forward (~18 us per parameter).
    """
    if not isinstance(model, torch.nn.Module):
        yield
        return
    flipped = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in flipped:
            p.requires_grad_(False)
        yield
    finally:
        for p in flipped:
            p.requires_grad_(True)


class GradientStats:
    """How many of an attack's input gradients carried no direction: all zero, or not finite.

    A sign or L2-normalised step from such a gradient does not move the image, so an attack
    whose gradients are dead reports robustness it never tested (gradient masking: a
    saturated softmax, input quantization, a non-differentiable layer). Only gradients at
    points the attack has not yet broken count: a dead gradient at an adversarial point
    (say, where every ReLU of a layer is off) hides nothing. Counts accumulate on the device
    across calls (no host sync per step) until :meth:`reset`.
    """

    def __init__(self, targeted: bool = False) -> None:
        self.targeted = targeted
        self.reset()

    def reset(self) -> None:
        self._dead: Optional[Tensor] = None
        self._pending: Optional[Tensor] = None

    def record(self, grad: Tensor, logits: Tensor, labels: Tensor) -> None:
        flat = grad.reshape(grad.shape[0], -1)
        dead = ~(flat != 0).any(dim=1) | ~torch.isfinite(flat).all(dim=1)
        pending = ~succeeded(logits, labels, self.targeted)
        n_dead, n_pending = (dead & pending).sum(), pending.sum()
        self._dead = n_dead if self._dead is None else self._dead + n_dead
        self._pending = n_pending if self._pending is None else self._pending + n_pending

    @property
    def evaluations(self) -> int:
        """Per-image gradient evaluations recorded at points not yet adversarial."""
        return 0 if self._pending is None else int(self._pending)

    @property
    def dead_fraction(self) -> float:
        """Fraction of those evaluations whose gradient was all zero or not finite (0 when
        there were none: every point was adversarial from the start)."""
        if not self.evaluations:
            return 0.0
        return int(self._dead) / self.evaluations


def loss_and_grad(model, loss_fn: LossFn, x: Tensor, labels: Tensor,
                  stats: Optional[GradientStats] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(per-sample loss (B,), d sum(loss) / dx, logits), all detached.

    torch.autograd.grad with the input as its only target: parameter gradients are neither
    computed nor accumulated into ``.grad``, and the attack works under ``torch.no_grad()``.
    ``stats``, when given, records whether each image's gradient carried a direction.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        loss = loss_fn(logits, labels)
        if loss.shape != labels.shape:
            raise ValueError(
                f"an attack loss must return one value per sample, shape {tuple(labels.shape)}, "
                f"got {tuple(loss.shape)}"
            )
        (grad,) = torch.autograd.grad(loss.sum(), x)
    if stats is not None:
        stats.record(grad, logits.detach(), labels)
    return loss.detach(), grad, logits.detach()


def succeeded(logits: Tensor, labels: Tensor, targeted: bool) -> Tensor:
    """(B,) bool: misclassified (untargeted) or classified as the target (targeted)."""
    pred = logits.argmax(dim=1)
    return pred == labels if targeted else pred != labels
