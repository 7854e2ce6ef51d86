"""Fast gradient sign method: one step of size eps from the clean image."""
from typing import Optional

import torch

from tempsoft.attacks.losses import LossSpec
from tempsoft.attacks.pgd import PGD


class FGSM(PGD):
    r"""Fast gradient sign method: Goodfellow et al., "Explaining and Harnessing Adversarial
    Examples" (ICLR 2015). With norm="l2" it is the fast gradient method (a step of L2 length
    eps along the gradient).

    ``x_adv = clamp(x + eps * sign(grad_x loss(model(x), y)), lower, upper)`` -- PGD with one
    step of size eps and no random start.

    Distance: Linf or L2.

    Args:
        model: maps images (B, ...) in [lower, upper] to logits (B, C); run in eval mode.
        eps: step size and ball radius (default 8/255): a number or a (B,) tensor.
        norm: "linf" (default) or "l2".
        loss: "ce", "cw", "dlr" or a callable ``(logits, labels) -> (B,)``.
        T: temperature the loss sees (default 1).
        targeted: labels are targets to reach (default False).
        lower, upper: image box (default [0, 1]).
        backend: backend of the fused step.
        model_mode: "eval" (default), "train" or "as-is": see :class:`Attack`.

    Shape:
        images (B, ...) float32/float64 in [lower, upper]; labels (B,) int; returns (B, ...).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> images, labels = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
        >>> adv = FGSM(model, eps=8/255)(images, labels)
        >>> bool(((adv - images).abs() <= 8/255 + 1e-6).all())
        True
    """

    def __init__(self, model, eps=8 / 255, norm: str = "linf", loss: LossSpec = "ce",
                 T: float = 1.0, targeted: bool = False, lower: float = 0.0,
                 upper: float = 1.0, backend: str = "auto",
                 generator: Optional[torch.Generator] = None, model_mode: str = "eval") -> None:
        super().__init__(model, eps=eps, alpha=eps, steps=1, norm=norm, loss=loss, T=T,
                         random_start=False, restarts=1, targeted=targeted, lower=lower,
                         upper=upper, generator=generator, backend=backend,
                         model_mode=model_mode)

    def _repr_fields(self) -> dict:
        return {"eps": self.eps, "norm": self.norm, "loss": self.loss_fn,
                "targeted": self.targeted}
