"""Projected gradient descent (ascent on the loss), Linf or L2, batched restarts."""
from typing import Optional

import torch
from torch import Tensor

from tempsoft.attacks.base import Attack, RestartsMixin, check_positive_int, check_radius
from tempsoft.attacks.losses import LossSpec, get_loss
from tempsoft.ops.pgd import per_sample
from tempsoft.attacks.steps import Geometry, ascend_, loss_and_grad, start_point, succeeded


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
        random_start: start from a uniform point of the ball (default True).
        restarts: independent attempts per image (default 1), run as one batch of
            restarts * B images (at most ``max_batch`` images at a time); each image keeps
            its worst case (a success, else the highest final loss).
        targeted: labels are targets to reach (default False).
        early_stop: freeze each image as soon as it is adversarial, and stop when all are.
        lower, upper: image box (default [0, 1]).
        generator: torch.Generator for the random start.
        max_batch: cap on images per forward pass for batched restarts (None: no cap).
        backend: backend of the fused step.

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
                 backend: str = "auto") -> None:
        super().__init__(model, eps, norm, targeted, lower, upper, generator, backend)
        self.alpha = check_radius("alpha", alpha)
        self.steps = check_positive_int("steps", steps)
        self.restarts = check_positive_int("restarts", restarts)
        self.max_batch = None if max_batch is None else check_positive_int("max_batch", max_batch)
        self.loss_fn = get_loss(loss, T, self.targeted)
        self.T = T
        self.random_start = bool(random_start)
        self.early_stop = bool(early_stop)

    def _run(self, geo: Geometry, labels: Tensor) -> Tensor:
        self._alpha_t = per_sample("alpha", self.alpha, geo.x_nat.shape[0], geo.x_nat)
        return self._run_restarts(geo, labels, self.restarts, self.max_batch)

    def _attempt(self, geo: Geometry, labels: Tensor, r: int) -> Tensor:
        x = torch.cat([start_point(geo, self.random_start, self.generator) for _ in range(r)])
        geo_r, labels_r = geo.repeat(r), labels.repeat(r)
        return self._iterate(x, geo_r, labels_r, self._alpha_t.repeat(r))

    def _iterate(self, x: Tensor, geo: Geometry, labels: Tensor, alpha: Tensor) -> Tensor:
        """The PGD loop from x, in place on x."""
        active = None
        for _ in range(self.steps):
            _, grad, logits = loss_and_grad(self.model, self.loss_fn, x, labels)
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
