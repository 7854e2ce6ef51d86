"""Projected gradient descent (ascent on the loss), Linf or L2, batched restarts."""
from typing import Optional

import torch
from torch import Tensor

from tempsoft.attacks.base import (Attack, RestartsMixin, check_positive_int, check_radius,
                                   check_start)
from tempsoft.attacks.losses import LossSpec, get_loss
from tempsoft.ops.pgd import per_sample
from tempsoft.attacks.steps import (Geometry, GradientStats, ascend_, loss_and_grad,
                                    start_point, succeeded)


class PGD(RestartsMixin, Attack):
    r"""Projected gradient descent: Madry et al., "Towards Deep Learning Models Resistant to
    Adversarial Attacks" (ICLR 2018).

    Each step: the gradient of the loss at the current point, a step of size alpha along its
    sign (Linf) or its unit L2 direction, projection onto the eps-ball around the clean
    image, clamp to [lower, upper] -- one fused kernel (``tempsoft.pgd_step_``).

    Distance: Linf or L2.

    Args:
        model: maps images (B, ...) in [lower, upper] to logits (B, C); run in eval mode.
        eps: ball radius (default 8/255): a number or a (B,) tensor.
        alpha: step size (default 2/255): a number or a (B,) tensor.
        steps: number of steps (default 10).
        norm: "linf" (default) or "l2".
        loss: "ce" (cross-entropy at temperature T), "cw" (logit margin), "dlr", or a
            callable ``(logits, labels) -> (B,)`` to maximize.
        T: temperature the loss sees (default 1).
        random_start: start from a random point of the ball (default True).
        start: how that point is drawn: "uniform" in the ball (default; Madry et al.),
            "radial" (L2: radius eps * U, as torchattacks) or "boundary" (on the ball's
            surface, as AutoAttack); see :func:`tempsoft.ops.pgd.random_start`.
        restarts: independent attempts per image (default 1), run as one batch of
            restarts * B images (at most ``max_batch`` images at a time); each image keeps
            its worst case (a success, else the highest final loss).
        targeted: labels are targets to reach (default False).
        early_stop: freeze each image as soon as it is adversarial, and stop when all are.
        lower, upper: image box (default [0, 1]).
        generator: torch.Generator for the random start.
        max_batch: cap on images per forward pass for batched restarts (None: no cap).
        backend: backend of the fused step.
        model_mode: "eval" (default), "train" or "as-is": see :class:`Attack`.

    After a call, ``attack.gradient_stats.dead_fraction`` is the fraction of its input
    gradients that were all zero or not finite (gradient masking; summed over calls until
    ``attack.gradient_stats.reset()``).

    Shape:
        images (B, ...) float32/float64 in [lower, upper]; labels (B,) int; returns (B, ...).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> images, labels = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
        >>> attack = PGD(model, eps=8/255, alpha=2/255, steps=10,
        ...              generator=torch.Generator().manual_seed(0))
        >>> adv = attack(images, labels)
        >>> bool(((adv - images).abs() <= 8/255 + 1e-6).all())
        True
    """

    def __init__(self, model, eps=8 / 255, alpha=2 / 255, steps: int = 10, norm: str = "linf",
                 loss: LossSpec = "ce", T: float = 1.0, random_start: bool = True,
                 restarts: int = 1, targeted: bool = False, early_stop: bool = False,
                 lower: float = 0.0, upper: float = 1.0,
                 generator: Optional[torch.Generator] = None, max_batch: Optional[int] = None,
                 backend: str = "auto", start: str = "uniform",
                 model_mode: str = "eval") -> None:
        super().__init__(model, eps, norm, targeted, lower, upper, generator, backend,
                         model_mode)
        self.alpha = check_radius("alpha", alpha, finite=True)
        self.steps = check_positive_int("steps", steps)
        self.restarts = check_positive_int("restarts", restarts)
        self.max_batch = None if max_batch is None else check_positive_int("max_batch", max_batch)
        self.loss_fn = get_loss(loss, T, self.targeted)
        self.T = T
        self.random_start = bool(random_start)
        self.start = check_start(start)
        self.early_stop = bool(early_stop)
        self.gradient_stats = GradientStats(self.targeted)

    def _run(self, geo: Geometry, labels: Tensor) -> Tensor:
        self._alpha_t = per_sample("alpha", self.alpha, geo.x_nat.shape[0], geo.x_nat,
                                   finite=True)
        return self._run_restarts(geo, labels, self.restarts, self.max_batch)

    def _attempt(self, geo: Geometry, labels: Tensor, r: int) -> Tensor:
        x = torch.cat([start_point(geo, self.random_start, self.generator, self.start)
                       for _ in range(r)])
        geo_r, labels_r = geo.repeat(r), labels.repeat(r)
        return self._iterate(x, geo_r, labels_r, self._alpha_t.repeat(r))

    def _iterate(self, x: Tensor, geo: Geometry, labels: Tensor, alpha: Tensor) -> Tensor:
        """The PGD loop from x, in place on x."""
        active = None
        for _ in range(self.steps):
            _, grad, logits = loss_and_grad(self.model, self.loss_fn, x, labels,
                                            self.gradient_stats)
            if self.early_stop:
                # A frozen image keeps its logits (eval mode), so it stays adversarial.
                active = ~succeeded(logits, labels, self.targeted)
                if not bool(active.any()):
                    break
            ascend_(x, grad, geo, alpha, active)
        return x

    def _repr_fields(self) -> dict:
        return {**super()._repr_fields(), "alpha": self.alpha, "steps": self.steps,
                "loss": self.loss_fn, "restarts": self.restarts,
                "random_start": self.random_start}
