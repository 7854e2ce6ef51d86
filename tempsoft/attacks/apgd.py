"""Auto-PGD (APGD) and its targeted form APGD-T: step-size-free PGD with momentum, step
halving at checkpoints and the best point kept. Croce & Hein, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks" (ICML 2020),
Algorithm 1, with the checkpoint schedule and step-size conditions of the authors' code
(AutoAttack's ``autopgd_base.py``), so that robust accuracies are comparable with it.
"""
from typing import Optional

import torch
from torch import Tensor

from tempsoft.attacks.base import Attack, RestartsMixin, check_positive_int, check_start
from tempsoft.attacks.losses import LossSpec, TargetedDLR, get_loss
from tempsoft.attacks.steps import (Geometry, GradientStats, LossFn, ascend_, loss_and_grad,
                                    project_, start_point, succeeded)

# Algorithm 1 constants (Section 3.2 of the paper).
MOMENTUM = 0.75        # alpha: weight of the new step vs. the previous displacement
RHO = 0.75             # Condition 1: fraction of steps in a window that must raise f
STEP_FACTOR = 2.0      # eta^(0) = 2 eps
# The checkpoint schedule of the authors' code, as fractions of the iterations N (each
# length truncated with int() and at least 1): a first window of 0.22 N, then windows
# shrinking by 0.03 N down to 0.06 N, then windows of 0.06 N until N.
_FIRST, _SHRINK, _MIN = 0.22, 0.03, 0.06
APGDT_TARGETS = 9      # AutoAttack's standard APGD-T: the 9 most likely other classes


def checkpoints(n_iter: int) -> list[int]:
    """The iterations w_0 = 0 < w_1 < ... <= n_iter after which APGD may halve its step.

    Example::

        >>> checkpoints(100)
        [0, 22, 41, 57, 70, 80, 87, 93, 99]
        >>> checkpoints(10)
        [0, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    """
    window = max(int(_FIRST * n_iter), 1)
    shrink, smallest = max(int(_SHRINK * n_iter), 1), max(int(_MIN * n_iter), 1)
    out = [0]
    while out[-1] + window <= n_iter:
        out.append(out[-1] + window)
        window = max(window - shrink, smallest)
    return out


class APGD(RestartsMixin, Attack):
    r"""Auto-PGD: Croce & Hein, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks" (ICML 2020), Algorithm 1.

    From x^(0), with eta^(0) = 2 eps:
      x^(1)   = P(x^(0) + eta dir(grad f(x^(0))))
      z       = P(x^(k) + eta dir(grad f(x^(k))))
      x^(k+1) = P(x^(k) + alpha (z - x^(k)) + (1 - alpha)(x^(k) - x^(k-1))),   alpha = 0.75
    where P projects onto the eps-ball and the box and dir is sign (Linf) or the unit L2
    direction. The best point (highest f) is kept. At each checkpoint w_j (see
    :func:`checkpoints`), per sample, the step halves and the iterate returns to the best
    point (with the best point's gradient) when
      (1) at most rho = 75% of the steps of the window since the last checkpoint raised f, or
      (2) the step was not halved at the last checkpoint and the best f has not improved
          since then (never at the first checkpoint).
    As in the authors' code, the momentum after a return uses the point before the last step
    (x^(k-1) is not reset), and condition 1 of the next window compares the first new loss
    with the loss of the point left behind. One departure, in the paper's favour: the first
    window's first comparison is f(x^(1)) > f(x^(0)), where the code compares with 0 (an
    unfilled buffer).

    The result per image is the first adversarial point found (misclassified, or classified
    as the target), else the point of highest loss.

    Distance: Linf or L2.

    Args:
        model: maps images (B, ...) in [lower, upper] to logits (B, C).
        eps: ball radius (default 8/255): a number or a (B,) tensor.
        steps: iterations N (default 100).
        norm: "linf" (default) or "l2".
        loss: "ce" (at temperature T), "dlr", "cw" or a callable ``(logits, labels) -> (B,)``
            to maximize.
        T: temperature the loss sees (default 1).
        restarts: independent attempts per image (default 1), batched as in :class:`PGD`.
        targeted: labels are targets to reach.
        random_start: start from a random point of the ball (default True).
        start: "boundary" (default: on the ball's surface, as AutoAttack), "uniform" or
            "radial"; see :func:`tempsoft.ops.pgd.random_start`.
        lower, upper: image box (default [0, 1]).
        generator: torch.Generator for the random start.
        max_batch: cap on images per forward pass for batched restarts.
        backend: backend of the fused step.
        model_mode: "eval" (default), "train" or "as-is": see :class:`Attack`.

    Shape:
        images (B, ...) float32/float64 in [lower, upper]; labels (B,) int; returns (B, ...).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> images, labels = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
        >>> adv = APGD(model, eps=8/255, steps=20, loss="dlr",
        ...            generator=torch.Generator().manual_seed(0))(images, labels)
        >>> bool(((adv - images).abs() <= 8/255 + 1e-6).all())
        True
    """

    def __init__(self, model, eps=8 / 255, steps: int = 100, norm: str = "linf",
                 loss: LossSpec = "ce", T: float = 1.0, restarts: int = 1,
                 targeted: bool = False, random_start: bool = True, lower: float = 0.0,
                 upper: float = 1.0, generator: Optional[torch.Generator] = None,
                 max_batch: Optional[int] = None, backend: str = "auto",
                 start: str = "boundary", model_mode: str = "eval") -> None:
        super().__init__(model, eps, norm, targeted, lower, upper, generator, backend,
                         model_mode)
        self.steps = check_positive_int("steps", steps)
        self.restarts = check_positive_int("restarts", restarts)
        self.max_batch = None if max_batch is None else check_positive_int("max_batch", max_batch)
        self.loss_fn = get_loss(loss, T, self.targeted)
        self.T = T
        self.random_start = bool(random_start)
        self.start = check_start(start)
        self._checkpoints = checkpoints(self.steps)
        self.gradient_stats = GradientStats(self.targeted)

    def _run(self, geo: Geometry, labels: Tensor) -> Tensor:
        return self._run_restarts(geo, labels, self.restarts, self.max_batch)

    def _attempt(self, geo: Geometry, labels: Tensor, r: int) -> Tensor:
        x = torch.cat([start_point(geo, self.random_start, self.generator, self.start)
                       for _ in range(r)])
        return self._iterate(x, geo.repeat(r), labels.repeat(r), self.loss_fn)

    def _iterate(self, x: Tensor, geo: Geometry, labels: Tensor, loss_fn: LossFn) -> Tensor:
        """Algorithm 1 from x (B, ...): the first success per sample, else its best point."""
        bshape = (x.shape[0],) + (1,) * (x.dim() - 1)

        def pick(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
            return torch.where(mask.reshape(bshape) if a.dim() > 1 else mask, a, b)

        def evaluate(point: Tensor):
            return loss_and_grad(self.model, loss_fn, point, labels, self.gradient_stats)

        eta = STEP_FACTOR * geo.eps
        f, g, logits = evaluate(x)
        found = succeeded(logits, labels, self.targeted)
        x_found = x.clone()
        x_best, g_best, f_best = x.clone(), g, f
        x_prev, f_prev = x, f
        n_up = torch.zeros_like(f, dtype=torch.int32)
        # Condition 2 state: whether the last checkpoint halved the step (True before the
        # first, so that it cannot fire there) and the best loss at the last checkpoint.
        halved_last = torch.ones_like(found)
        f_best_at_check = f_best
        ckpt = 1  # index of the next checkpoint in self._checkpoints

        for k in range(self.steps):
            # -- step: gradient step to z, then the momentum combination (not at k = 0)
            z = ascend_(x.clone(), g, geo, eta)
            if k == 0:
                x_new = z
            else:
                x_new = project_(x + MOMENTUM * (z - x) + (1 - MOMENTUM) * (x - x_prev), geo)
            x_prev, x = x, x_new

            # -- evaluate the new point; keep the first success and the best point
            f, g, logits = evaluate(x)
            won = succeeded(logits, labels, self.targeted)
            x_found = pick(won & ~found, x, x_found)
            found = found | won
            n_up += (f > f_prev).to(torch.int32)
            f_prev = f
            better = f > f_best
            x_best, g_best, f_best = pick(better, x, x_best), pick(better, g, g_best), \
                torch.where(better, f, f_best)

            # -- checkpoint: halve the step and return to the best point where it stalled
            if ckpt < len(self._checkpoints) and k + 1 == self._checkpoints[ckpt]:
                window = self._checkpoints[ckpt] - self._checkpoints[ckpt - 1]
                too_few_gains = n_up <= RHO * window
                no_progress = ~halved_last & (f_best_at_check >= f_best)
                reset = too_few_gains | no_progress
                halved_last, f_best_at_check = reset, f_best
                eta = torch.where(reset, eta / 2, eta)
                x = pick(reset, x_best, x)
                g = pick(reset, g_best, g)
                n_up.zero_()
                ckpt += 1

        return pick(found, x_found, x_best)

    def _repr_fields(self) -> dict:
        return {**super()._repr_fields(), "steps": self.steps, "loss": self.loss_fn,
                "restarts": self.restarts}


class APGDT(APGD):
    r"""APGD-T: APGD on the targeted DLR loss against each of the ``n_target_classes`` most
    likely other classes in turn (Croce & Hein 2020; AutoAttack's "apgd-t").

    For the r-th most likely class t of the clean image (r = 2, 3, ...), APGD maximizes
    -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2) from a new random start, on the images not
    yet misclassified. Any misclassification counts as a success (labels are the true
    classes), as in AutoAttack.

    Args:
        model, eps, steps, norm, random_start, start, lower, upper, generator, backend,
        model_mode: as for :class:`APGD`.
        n_target_classes: how many target classes (default 9; at most C - 1).
        restarts: attempts per target class (default 1).

    Shape:
        images (B, ...) float32/float64 in [lower, upper]; labels (B,) int (true classes);
        returns (B, ...).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> images, labels = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
        >>> adv = APGDT(model, eps=8/255, steps=10, n_target_classes=3,
        ...             generator=torch.Generator().manual_seed(0))(images, labels)
        >>> bool(((adv - images).abs() <= 8/255 + 1e-6).all())
        True
    """

    def __init__(self, model, eps=8 / 255, steps: int = 100, norm: str = "linf",
                 n_target_classes: int = APGDT_TARGETS, restarts: int = 1,
                 random_start: bool = True, lower: float = 0.0, upper: float = 1.0,
                 generator: Optional[torch.Generator] = None, backend: str = "auto",
                 start: str = "boundary", model_mode: str = "eval") -> None:
        super().__init__(model, eps=eps, steps=steps, norm=norm, loss="dlr",
                         restarts=restarts, random_start=random_start, lower=lower,
                         upper=upper, generator=generator, backend=backend, start=start,
                         model_mode=model_mode)
        self.n_target_classes = check_positive_int("n_target_classes", n_target_classes)
        self.loss_fn = None  # one TargetedDLR per target class, built in _run

    def _run(self, geo: Geometry, labels: Tensor) -> Tensor:
        with torch.no_grad():
            clean = self.model(geo.x_nat)
        n_classes = clean.shape[1]
        if n_classes < 4:
            raise ValueError(f"APGD-T needs at least 4 classes, got {n_classes}")
        ranked = clean.argsort(dim=1, descending=True)
        x_out = geo.x_nat.clone()
        fooled = clean.argmax(dim=1) != labels
        for rank in range(1, min(self.n_target_classes, n_classes - 1) + 1):
            for _ in range(self.restarts):
                todo = (~fooled).nonzero().squeeze(1)
                if todo.numel() == 0:
                    return x_out
                sub = geo.select(todo)
                loss_fn = TargetedDLR(ranked[todo, rank])
                x = start_point(sub, self.random_start, self.generator, self.start)
                adv = self._iterate(x, sub, labels[todo], loss_fn)
                x_out[todo] = adv
                with torch.no_grad():
                    won = succeeded(self.model(adv), labels[todo], targeted=False)
                fooled[todo[won]] = True
        return x_out

    def _repr_fields(self) -> dict:
        return {"eps": self.eps, "norm": self.norm, "steps": self.steps,
                "n_target_classes": self.n_target_classes, "restarts": self.restarts}
