"""Auto-PGD (APGD): step-size-free PGD with momentum, step halving at checkpoints and the
best point kept. Croce & Hein, "Reliable evaluation of adversarial robustness with an
ensemble of diverse parameter-free attacks" (ICML 2020), Algorithm 1.
"""
from typing import Optional

import torch
from torch import Tensor

from tempsoft.attacks.base import Attack, RestartsMixin, check_positive_int
from tempsoft.attacks.losses import LossSpec, get_loss
from tempsoft.attacks.steps import (Geometry, ascend_, loss_and_grad, project_, start_point,
                                    succeeded)

# Algorithm 1 constants (Section 3.2 of the paper).
MOMENTUM = 0.75        # alpha: weight of the new step vs. the previous displacement
RHO = 0.75             # Condition 1: fraction of steps in an interval that must raise f
STEP_FACTOR = 2.0      # eta^(0) = 2 eps
# Checkpoints w_j = ceil(p_j N): p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
# 0.06), kept in hundredths so the arithmetic is exact.
_P1, _P_SHRINK, _P_MIN = 22, 3, 6


def checkpoints(n_iter: int) -> list[int]:
    """The iterations w_0 = 0 < w_1 < ... <= n_iter at which APGD may halve its step.

    Example::

        >>> checkpoints(100)
        [0, 22, 41, 57, 70, 80, 87, 93, 99]
    """
    p = [0, _P1]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - _P_SHRINK, _P_MIN)
        if nxt > 100:
            break
        p.append(nxt)
    return sorted({-(-pj * n_iter // 100) for pj in p})  # ceil, exact in integers


class APGD(RestartsMixin, Attack):
    r"""Auto-PGD: Croce & Hein, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks" (ICML 2020), Algorithm 1.

    From x^(0), with eta^(0) = 2 eps:
      x^(1)   = P(x^(0) + eta dir(grad f(x^(0))))
      z       = P(x^(k) + eta dir(grad f(x^(k))))
      x^(k+1) = P(x^(k) + alpha (z - x^(k)) + (1 - alpha)(x^(k) - x^(k-1))),   alpha = 0.75
    where P projects onto the eps-ball and the box and dir is sign (Linf) or the unit L2
    direction. The best point (highest f) is kept. At each checkpoint w_j (22%, 41%, 57%, ...
    of the iterations) the step halves and the iterate returns to the best point when
    (1) fewer than rho = 75% of the steps since the last checkpoint raised f, or (2) the step
    was not halved at the last checkpoint and the best f has not improved since. All of this
    is per sample. After a return to the best point, the momentum term restarts at zero.

    The result per image is the first adversarial point found (misclassified, or classified
    as the target), else the point of highest loss.

    Distance: Linf or L2.

    Args:
        model: maps images (B, ...) in [lower, upper] to logits (B, C); run in eval mode.
        eps: ball radius (default 8/255): a number or a (B,) tensor.
        steps: iterations N (default 100).
        norm: "linf" (default) or "l2".
        loss: "ce" (at temperature T), "dlr" (default in AutoAttack's second run), "cw" or a
            callable ``(logits, labels) -> (B,)`` to maximize.
        T: temperature the loss sees (default 1).
        restarts: independent attempts per image (default 1), batched as in :class:`PGD`.
        targeted: labels are targets to reach.
        random_start: start from a uniform point of the ball (default True).
        lower, upper: image box (default [0, 1]).
        generator: torch.Generator for the random start.
        max_batch: cap on images per forward pass for batched restarts.
        backend: backend of the fused step.

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
                 max_batch: Optional[int] = None, backend: str = "auto") -> None:
        super().__init__(model, eps, norm, targeted, lower, upper, generator, backend)
        self.steps = check_positive_int("steps", steps)
        self.restarts = check_positive_int("restarts", restarts)
        self.max_batch = None if max_batch is None else check_positive_int("max_batch", max_batch)
        self.loss_fn = get_loss(loss, T, self.targeted)
        self.T = T
        self.random_start = bool(random_start)
        self._checkpoints = checkpoints(self.steps)

    def _run(self, geo: Geometry, labels: Tensor) -> Tensor:
        return self._run_restarts(geo, labels, self.restarts, self.max_batch)

    def _attempt(self, geo: Geometry, labels: Tensor, r: int) -> Tensor:
        x = torch.cat([start_point(geo, self.random_start, self.generator) for _ in range(r)])
        return self._iterate(x, geo.repeat(r), labels.repeat(r))

    def _iterate(self, x: Tensor, geo: Geometry, labels: Tensor) -> Tensor:
        bshape = (x.shape[0],) + (1,) * (x.dim() - 1)

        def pick(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
            return torch.where(mask.reshape(bshape) if a.dim() > 1 else mask, a, b)

        eta = STEP_FACTOR * geo.eps
        f, g, logits = loss_and_grad(self.model, self.loss_fn, x, labels)
        found = succeeded(logits, labels, self.targeted)
        x_found = x.clone()
        x_best, g_best, f_best = x.clone(), g, f
        x_prev, f_prev = x, f
        n_up = torch.zeros_like(f, dtype=torch.int32)
        eta_at_check, f_best_at_check = eta, f_best
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
            f, g, logits = loss_and_grad(self.model, self.loss_fn, x, labels)
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
                interval = self._checkpoints[ckpt] - self._checkpoints[ckpt - 1]
                too_few_gains = n_up < RHO * interval
                stalled = (eta == eta_at_check) & (f_best == f_best_at_check)
                reset = too_few_gains | stalled
                eta_at_check, f_best_at_check = eta, f_best
                eta = torch.where(reset, eta / 2, eta)
                x = pick(reset, x_best, x)
                x_prev = pick(reset, x_best, x_prev)
                g = pick(reset, g_best, g)
                f_prev = torch.where(reset, f_best, f_prev)
                n_up.zero_()
                ckpt += 1

        return pick(found, x_found, x_best)

    def _repr_fields(self) -> dict:
        return {**super()._repr_fields(), "steps": self.steps, "loss": self.loss_fn,
                "restarts": self.restarts}
