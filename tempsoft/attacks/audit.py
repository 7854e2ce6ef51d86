"""Gradient-masking audit: does robustness under CE-PGD survive attacks that do not need the
softmax to be unsaturated?

A model trained at a high softmax temperature T and deployed with its raw logits z
(defensive distillation, Papernot et al. 2016) has logits ~T times larger than usual; at T=1
the softmax saturates, the cross-entropy gradient underflows to exactly zero in float32, and
sign-PGD stops moving. It looks robust under CE@T=1 and is not: CE at the training
temperature, the C&W margin and the scale-invariant DLR loss all still have gradients
(Carlini & Wagner, "Defensive Distillation is Not Robust to Adversarial Examples", 2016;
Croce & Hein 2020). The audit runs them side by side and says when they disagree.
"""
import dataclasses
import importlib
import inspect
import math
import numbers

import torch
from torch import Tensor

from tempsoft.attacks.apgd import APGD
from tempsoft.attacks.base import eval_mode, check_positive_int, check_radius
from tempsoft.attacks.losses import get_loss
from tempsoft.attacks.pgd import PGD
from tempsoft.attacks.steps import loss_and_grad

CE_T1 = "ce@T=1"
# Step size of the audit's PGD runs, as a multiple of eps / steps (Madry et al. use 2.5).
_PGD_STEP_FACTOR = 2.5


def _ce_key(T: float) -> str:
    return f"ce@T={T:g}"


@dataclasses.dataclass
class AuditReport:
    """Result of :func:`audit`.

    Attributes:
        robust: attack name -> robust accuracy in [0, 1] (an image counts when it is
            classified correctly both clean and under the attack). Keys: "clean", "ce@T=1",
            "ce@T=<train_T>" (when train_T != 1), "cw", "apgd-dlr", "autoattack" (when the
            autoattack package is installed).
        zero_grad_fraction: fraction of the images whose CE@T=1 input gradient is exactly
            zero at the clean image.
        masking: the strongest other attack beats CE@T=1 by more than `threshold`.
        verdict: one line saying so, or that the attacks agree.
        worst_case: fraction of images robust to every attack at once.
        eps, norm, n, threshold: the settings, for the record.
    """

    robust: dict
    zero_grad_fraction: float
    masking: bool
    verdict: str
    worst_case: float
    eps: float
    norm: str
    n: int
    threshold: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"robust accuracy, {self.norm} eps={self.eps:g}, {self.n} images:"]
        lines += [f"  {name:<14} {acc:7.2%}" for name, acc in self.robust.items()]
        lines.append(f"  {'worst case':<14} {self.worst_case:7.2%}")
        lines.append(f"zero CE@T=1 input gradient: {self.zero_grad_fraction:.2%} of images")
        lines.append(self.verdict)
        return "\n".join(lines)


def audit(model, images: Tensor, labels: Tensor, eps: float = 8 / 255, train_T: float = 1.0,
          norm: str = "linf", steps: int = 20, batch_size: int = 256, threshold: float = 0.1,
          apgd_steps: int = 100, autoattack: bool = True, lower: float = 0.0,
          upper: float = 1.0, seed: int = 0, backend: str = "auto") -> AuditReport:
    """Robust accuracy under attacks that fail differently, and a gradient-masking verdict.

    Attacks: PGD with CE at T=1, PGD with CE at the training temperature, PGD with the C&W
    margin (each ``steps`` steps of size 2.5 eps / steps, random start), APGD with the DLR
    loss (``apgd_steps``), and standard AutoAttack (Croce & Hein 2020) when the
    ``autoattack`` package is importable and the box is [0, 1]. Also the fraction of images
    whose CE@T=1 input gradient is exactly zero.

    Masking is reported when CE@T=1 robust accuracy exceeds the lowest robust accuracy of
    the other attacks by more than ``threshold``.

    Args:
        model: maps images in [lower, upper] to logits (B, C); run in eval mode.
        images: (N, ...) float images in [lower, upper].
        labels: (N,) int true classes.
        eps: Linf or L2 radius.
        train_T: the temperature the model was trained at (its loss was CE(z / train_T)).
        norm: "linf" or "l2".
        steps: PGD steps.
        batch_size: images per attack call.
        threshold: robust-accuracy gap (absolute, in [0, 1]) that counts as disagreement.
        apgd_steps: APGD iterations.
        autoattack: run AutoAttack when the package is installed.
        lower, upper: image box.
        seed: seed of every attack's torch.Generator.
        backend: backend of the fused step.

    Returns:
        an :class:`AuditReport`.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> report = audit(model, torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,)),
        ...                steps=5, apgd_steps=10, autoattack=False)
        >>> sorted(report.robust)
        ['apgd-dlr', 'ce@T=1', 'clean', 'cw']
    """
    if isinstance(eps, Tensor):
        raise TypeError("audit takes one eps (a number), got a tensor")
    check_radius("eps", eps)
    if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
        raise TypeError(f"images and labels must be tensors, got {type(images).__name__} and "
                        f"{type(labels).__name__}")
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"audit needs a non-empty batch (N, ...), got shape {tuple(images.shape)}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"expected one label per image: images {tuple(images.shape)} need "
                         f"labels of shape ({images.shape[0]},), got {tuple(labels.shape)}")
    if isinstance(train_T, bool) or not isinstance(train_T, numbers.Real) or \
            not (0 < train_T < math.inf):
        raise ValueError(f"train_T must be a positive finite number, got {train_T!r}")
    if not (isinstance(threshold, numbers.Real) and 0 <= threshold <= 1):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    apgd_steps = check_positive_int("apgd_steps", apgd_steps)

    attacks = _attacks(model, eps, float(train_T), norm, steps, apgd_steps, lower, upper, seed,
                       backend)
    aa = _autoattack(model, eps, norm, lower, upper, seed, batch_size) if autoattack else None
    names = ["clean", *attacks] + (["autoattack"] if aa is not None else [])
    correct = {name: [] for name in names}
    zero_grad = []
    ce_t1 = get_loss("ce", 1.0)
    n = images.shape[0]
    for start in range(0, n, batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        for name, attack in attacks.items():
            # Each attack checks the inputs (bounds, shapes, labels) before it runs.
            correct[name].append(_correct(model, attack(x, y), y))
        with eval_mode(model):
            correct["clean"].append(_correct(model, x, y))
            _, grad, _ = loss_and_grad(model, ce_t1, x, y)
        zero_grad.append(grad.reshape(grad.shape[0], -1).abs().amax(dim=1) == 0)
        if aa is not None:
            correct["autoattack"].append(_correct(model, aa(x, y), y))

    per_sample = {k: torch.cat(v) for k, v in correct.items()}
    robust_mask = {k: v & per_sample["clean"] for k, v in per_sample.items()}
    robust = {k: float(v.float().mean()) for k, v in robust_mask.items()}
    worst = torch.stack(list(robust_mask.values())).all(dim=0)
    zero_frac = float(torch.cat(zero_grad).float().mean())
    masking, verdict = _verdict(robust, zero_frac, threshold)
    return AuditReport(robust=robust, zero_grad_fraction=zero_frac, masking=masking,
                       verdict=verdict, worst_case=float(worst.float().mean()), eps=float(eps),
                       norm=norm, n=n, threshold=float(threshold))


def _attacks(model, eps, train_T, norm, steps, apgd_steps, lower, upper, seed, backend):
    alpha = _PGD_STEP_FACTOR * eps / steps

    def gen(offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed + offset)

    def pgd(loss: str, T: float, offset: int) -> PGD:
        return PGD(model, eps=eps, alpha=alpha, steps=steps, norm=norm, loss=loss, T=T,
                   lower=lower, upper=upper, generator=gen(offset), backend=backend)

    attacks = {CE_T1: pgd("ce", 1.0, 0)}
    if train_T != 1.0:
        attacks[_ce_key(train_T)] = pgd("ce", train_T, 1)
    attacks["cw"] = pgd("cw", 1.0, 2)
    attacks["apgd-dlr"] = APGD(model, eps=eps, steps=apgd_steps, norm=norm, loss="dlr",
                               lower=lower, upper=upper, generator=gen(3), backend=backend)
    return attacks


# Packages that provide AutoAttack: the reference implementation (fra31/auto-attack, module
# "autoattack") and its PyPI repackaging "pyautoattack", whose keywords differ slightly.
_AUTOATTACK_MODULES = ("autoattack", "pyautoattack")


def _autoattack(model, eps, norm, lower, upper, seed, batch_size):
    """A callable (x, y) -> x_adv running standard AutoAttack, or None when unavailable."""
    module = None
    for name in _AUTOATTACK_MODULES:
        try:
            module = importlib.import_module(name)
            break
        except ImportError:
            continue
    if module is None or (lower, upper) != (0.0, 1.0):
        return None  # not installed, or a box AutoAttack does not clamp to
    aa_norm = "Linf" if norm.lower() == "linf" else "L2"
    init = inspect.signature(module.AutoAttack.__init__).parameters
    run_params = inspect.signature(module.AutoAttack.run_standard_evaluation).parameters

    def run(x: Tensor, y: Tensor) -> Tensor:
        kw = dict(norm=aa_norm, eps=eps, version="standard", seed=seed, device=x.device)
        if "verbose" in init:
            kw["verbose"] = False
        adversary = module.AutoAttack(model, **kw)
        size = {"bs": batch_size} if "bs" in run_params else {"batch_size": batch_size}
        with eval_mode(model):
            out = adversary.run_standard_evaluation(x, y, **size)
        return out[0] if isinstance(out, tuple) else out  # pyautoattack adds the labels

    return run


def _correct(model, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad(), eval_mode(model):
        return model(x).argmax(dim=1) == y


def _verdict(robust: dict, zero_frac: float, threshold: float) -> tuple[bool, str]:
    others = {k: v for k, v in robust.items() if k not in ("clean", CE_T1)}
    strongest = min(others, key=others.get)
    gap = robust[CE_T1] - others[strongest]
    detail = (f"{CE_T1} {robust[CE_T1]:.1%} vs {strongest} {others[strongest]:.1%}; "
              f"{zero_frac:.0%} of inputs have an exactly zero CE@T=1 input gradient")
    if gap > threshold:
        return True, ("robustness under CE-PGD is not confirmed by margin attacks: likely "
                      f"gradient masking ({detail})")
    return False, f"attacks agree within {threshold:.0%} ({detail}): no sign of gradient masking"


__all__ = ["audit", "AuditReport"]
