"""Attack losses as callables: ``loss(logits, labels) -> (B,)`` per-sample values to *maximize*.

Every loss sees the logits divided by the attack's temperature T. For cross-entropy that is
the point (CE at T is what a model trained at temperature T was trained on); the margin
losses only change scale, and DLR not even that.

Untargeted, ``labels`` are the true classes; targeted, they are the target classes and each
loss flips to "make the target win":

=========  =============================================  ==================================
name       untargeted (labels = y)                        targeted (labels = t)
=========  =============================================  ==================================
"ce"       CE(z/T, y)                                     -CE(z/T, t)
"cw"       max_{j!=y} z_j - z_y          (C&W margin)     z_t - max_{j!=t} z_j
"dlr"      -(z_y - max_{j!=y} z_j) / (z_(1) - z_(3))      -(max_{j!=t} z_j - z_t) /
                                                           (z_(1) - (z_(3) + z_(4)) / 2)
=========  =============================================  ==================================

z_(k) is the k-th largest logit. DLR is Croce & Hein (2020), "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks", Eq. (5) and (6);
the targeted form uses the strongest non-target class where the paper uses the true class
(the same class until the attack succeeds), so it needs only the target labels. The C&W
margin is Carlini & Wagner (2017) without the confidence clamp, so ascent never stalls.

Example::

    >>> loss = get_loss("dlr")
    >>> loss(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])).shape
    torch.Size([4])
"""
import numbers
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor

from tempsoft.ops.cross_entropy import cross_entropy

LOSSES = ("ce", "cw", "dlr")
# Croce & Hein's guard against a zero denominator in DLR.
_DLR_EPS = 1e-12


def _top_other(z: Tensor, labels: Tensor) -> Tensor:
    """max_{j != labels} z_j per row."""
    mask = torch.zeros_like(z, dtype=torch.bool).scatter_(1, labels.unsqueeze(1), True)
    return z.masked_fill(mask, float("-inf")).amax(dim=1)


def _at(z: Tensor, labels: Tensor) -> Tensor:
    return z.gather(1, labels.unsqueeze(1)).squeeze(1)


@dataclass(frozen=True)
class CrossEntropy:
    """CE(z / T, y) per sample (the fused ``tempsoft.cross_entropy``); negated when targeted."""

    T: float = 1.0
    targeted: bool = False

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        loss = cross_entropy(logits, labels, T=self.T, reduction="none")
        return -loss if self.targeted else loss


@dataclass(frozen=True)
class Margin:
    """The C&W logit margin at temperature T: (max_{j!=y} z_j - z_y) / T."""

    T: float = 1.0
    targeted: bool = False

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        z = logits / self.T if self.T != 1.0 else logits
        gap = _at(z, labels) - _top_other(z, labels)
        return gap if self.targeted else -gap


@dataclass(frozen=True)
class DLR:
    """Difference of logits ratio (Croce & Hein, 2020); invariant to shifting and scaling z."""

    targeted: bool = False

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        need = 4 if self.targeted else 3
        if logits.shape[1] < need:
            raise ValueError(
                f"{'targeted ' if self.targeted else ''}DLR needs at least {need} classes, "
                f"got {logits.shape[1]}"
            )
        z_sorted = logits.sort(dim=1, descending=True).values
        gap = _at(logits, labels) - _top_other(logits, labels)
        if self.targeted:
            scale = z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3])
            return gap / (scale + _DLR_EPS)
        return -gap / (z_sorted[:, 0] - z_sorted[:, 2] + _DLR_EPS)


class TargetedDLR:
    """The targeted DLR loss of APGD-T (Croce & Hein 2020, Eq. 6), for fixed target classes:

        -(z_y - z_t) / (z_(1) - (z_(3) + z_(4)) / 2)

    with y the true class and t the target, as in AutoAttack (whose APGD-T counts any
    misclassification as a success). Call it with the true labels; ``targets`` holds one
    target class per sample.
    """

    def __init__(self, targets: Tensor) -> None:
        self.targets = targets

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        if logits.shape[1] < 4:
            raise ValueError(f"targeted DLR needs at least 4 classes, got {logits.shape[1]}")
        z_sorted = logits.sort(dim=1, descending=True).values
        scale = z_sorted[:, 0] - 0.5 * (z_sorted[:, 2] + z_sorted[:, 3])
        return -(_at(logits, labels) - _at(logits, self.targets)) / (scale + _DLR_EPS)

    def __repr__(self) -> str:
        return "TargetedDLR()"


LossSpec = Union[str, Callable[[Tensor, Tensor], Tensor]]


def get_loss(spec: LossSpec, T: float = 1.0, targeted: bool = False):
    """The loss callable for a name ("ce", "cw", "dlr") at temperature T, or `spec` itself.

    A callable is used as given (it must return one value per sample, to maximize, and
    handle targeting itself).
    """
    if isinstance(T, bool) or not isinstance(T, numbers.Real) or not (0 < T < float("inf")):
        raise ValueError(f"T must be a positive finite number, got {T!r}")
    if callable(spec) and not isinstance(spec, str):
        return spec
    if not isinstance(spec, str) or spec.lower() not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES} or a callable, got {spec!r}")
    name = spec.lower()
    if name == "ce":
        return CrossEntropy(T=float(T), targeted=targeted)
    if name == "cw":
        return Margin(T=float(T), targeted=targeted)
    return DLR(targeted=targeted)


__all__ = ["LOSSES", "CrossEntropy", "Margin", "DLR", "TargetedDLR", "get_loss"]
