"""Adversarial attacks with a fused PGD step, and a gradient-masking audit.

    >>> from tempsoft.attacks import PGD, APGD, FGSM, audit
    >>> adv = PGD(model, eps=8/255, alpha=2/255, steps=10)(images, labels)
    >>> adv = Square(model, eps=8/255, queries=1000)(images, labels)   # black-box
    >>> print(audit(model, images, labels, eps=8/255, train_T=100.0))

Attacks share one base class (:class:`Attack`: input checks, eval mode restored after,
bounds), one set of losses (:mod:`tempsoft.attacks.losses`) and one step/projection
(:mod:`tempsoft.attacks.steps`, the fused op ``tempsoft.pgd_step_``).
"""
from tempsoft.attacks.apgd import APGD, APGDT, checkpoints
from tempsoft.attacks.audit import AuditReport, Check, audit
from tempsoft.attacks.autoattack import AutoAttackResult, Square, run_autoattack
from tempsoft.attacks.base import Attack, eval_mode, model_mode
from tempsoft.attacks.fgsm import FGSM
from tempsoft.attacks.losses import DLR, LOSSES, CrossEntropy, Margin, TargetedDLR, get_loss
from tempsoft.attacks.pgd import PGD
from tempsoft.attacks.steps import GradientStats, random_start

__all__ = [
    "Attack",
    "PGD",
    "FGSM",
    "APGD",
    "APGDT",
    "audit",
    "AuditReport",
    "Check",
    "Square",
    "run_autoattack",
    "AutoAttackResult",
    "get_loss",
    "LOSSES",
    "CrossEntropy",
    "Margin",
    "DLR",
    "TargetedDLR",
    "checkpoints",
    "eval_mode",
    "model_mode",
    "GradientStats",
    "random_start",
]
