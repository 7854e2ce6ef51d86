"""Gradient-masking audit: is the robustness a gradient attack reports real?

A model trained at a high softmax temperature T and deployed with its raw logits z
(defensive distillation, Papernot et al. 2016) has logits ~T times larger than usual; at T=1
the softmax saturates, the cross-entropy gradient underflows to exactly zero in float32, and
sign-PGD stops moving. It looks robust under CE@T=1 and is not (Carlini & Wagner, "Defensive
Distillation is Not Robust to Adversarial Examples", 2016). Quantized inputs and
non-differentiable layers mask gradients the same way, for every gradient attack at once.

The audit runs attacks that fail differently and applies the checks of Carlini et al. 2019
("On Evaluating Adversarial Robustness", Sections 5-7) and Athalye et al. 2018 ("Obfuscated
Gradients Give a False Sense of Security", Section 3):

  (a) dead gradients  no gradient attack may see many input gradients that are all zero or
                      not finite (such a step does not move the image)
  (b) FGSM vs PGD     a single step must not beat many steps of the same loss
  (c) unbounded eps   with a radius covering the whole box, accuracy must reach ~0
  (d) gradient-free   an attack that needs no gradient of the model (Square Attack, a
                      transfer attack from a surrogate) must not break images that every
                      gradient attack left correct
  (e) agreement       the full-strength white-box attacks must agree with each other

Each check reports its numbers; the verdict names the checks that failed. The worst case is
over every attack that ran (the unbounded-eps sanity run is not in the threat model and is
left out).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import time
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from tempsoft.attacks.apgd import APGD
from tempsoft.attacks.autoattack import Square, available, run_autoattack
from tempsoft.attacks.base import check_positive_int, check_radius
from tempsoft.attacks.base import model_mode as set_model_mode
from tempsoft.attacks.fgsm import FGSM
from tempsoft.attacks.pgd import PGD

CE_T1 = "ce@T=1"
FGSM_NAME = "fgsm"
UNBOUNDED = "unbounded"
SQUARE = "square"
TRANSFER = "transfer"
AUTOATTACK = "autoattack"
# Step size of the audit's PGD runs, as a multiple of eps / steps (Madry et al. use 2.5).
_PGD_STEP_FACTOR = 2.5
# The custom AutoAttack subset for quick runs (the demo): its two APGD attacks.
AUTOATTACK_CUSTOM = ("apgd-ce", "apgd-t")
AUTOATTACK_MODES = ("standard", "custom", "off")
CHECKS = {
    "a": "dead gradients",
    "b": "FGSM vs PGD",
    "c": "unbounded eps",
    "d": "gradient-free attacks",
    "e": "agreement",
}


def _ce_key(T: float) -> str:
    return f"ce@T={T:g}"


@dataclasses.dataclass
class Check:
    """One check of the audit: passed (True/False), or None when it could not be tested."""

    name: str
    passed: Optional[bool]
    detail: str

    def __str__(self) -> str:
        state = {True: "pass", False: "FAIL", None: "not tested"}[self.passed]
        return f"{state}: {self.detail}"


@dataclasses.dataclass
class AuditReport:
    """Result of :func:`audit`.

    Attributes:
        robust: attack name -> robust accuracy in [0, 1] (an image counts when it is
            classified correctly both clean and under the attack). Keys: "clean", "ce@T=1",
            "ce@T=<train_T>" (when train_T != 1), "cw", "fgsm", "apgd-dlr", "square",
            "transfer" (with a surrogate), "autoattack", "unbounded" (the sanity run).
        dead_gradients: gradient attack -> fraction of its input gradients that were all
            zero or not finite.
        checks: "a".."e" -> :class:`Check`.
        masking: some check failed: the gradient attacks' robustness is not confirmed
            (gradient masking when (a)-(d) fail; a too weak attack when only (e) does).
        verdict: one line naming the failed checks, or saying that all passed.
        worst_case: fraction of images robust to every attack that ran at once.
        not_run: attack -> why it did not run (never silently skipped).
        autoattack: AutoAttack's version, attacks, robust accuracy after each and its own
            flags (empty when it did not run).
        seconds: attack -> wall time.
        eps, norm, n, thresholds: the settings, for the record.
    """

    robust: dict
    dead_gradients: dict
    checks: dict
    masking: bool
    verdict: str
    worst_case: float
    not_run: dict
    autoattack: dict
    seconds: dict
    eps: float
    norm: str
    n: int
    thresholds: dict

    @property
    def failed_checks(self) -> list[str]:
        return [k for k, c in self.checks.items() if c.passed is False]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"robust accuracy, {self.norm} eps={self.eps:g}, {self.n} images:"]
        for name, acc in self.robust.items():
            dead = self.dead_gradients.get(name)
            extra = f"   ({dead:.1%} dead gradients)" if dead is not None else ""
            extra += "   (sanity run, not in the worst case)" if name == UNBOUNDED else ""
            lines.append(f"  {name:<14} {acc:7.2%}{extra}")
        lines.append(f"  {'worst case':<14} {self.worst_case:7.2%}")
        for name, why in self.not_run.items():
            lines.append(f"  {name:<14} NOT RUN: {why}")
        lines.append("checks:")
        lines += [f"  ({k}) {c.name}: {c}" for k, c in self.checks.items()]
        if self.autoattack.get("flags"):
            lines.append("AutoAttack's own flags: " + " | ".join(self.autoattack["flags"]))
        lines.append(self.verdict)
        return "\n".join(lines)


def audit(model, images: Tensor, labels: Tensor, eps: float = 8 / 255, train_T: float = 1.0,
          norm: str = "linf", steps: int = 20, batch_size: int = 256, threshold: float = 0.1,
          sanity_threshold: float = 0.02, dead_threshold: float = 0.01,
          apgd_steps: int = 100, autoattack: str = "standard",
          autoattack_attacks: Optional[list[str]] = None, square_queries: int = 5000,
          surrogate=None, lower: float = 0.0, upper: float = 1.0, seed: int = 0,
          backend: str = "auto", model_mode: str = "eval",
          log: Optional[Callable[[str], None]] = None) -> AuditReport:
    """Robust accuracy under attacks that fail differently, checks (a)-(e) and a verdict.

    Attacks: PGD with CE at T=1, with CE at the training temperature and with the C&W margin
    (each ``steps`` steps of size 2.5 eps / steps, random start), FGSM (CE at T=1), APGD with
    the DLR loss (``apgd_steps``), Square Attack (``square_queries``; gradient-free), a
    transfer attack (PGD with CE at T=1 on ``surrogate``, when given), AutoAttack (the
    authors' code, ``autoattack``), and PGD with CE at T=1 and an unbounded radius (the
    sanity run of check (c)). An attack that cannot run here is listed in ``not_run`` with
    the reason and warned about.

    Args:
        model: maps images in [lower, upper] to logits (B, C).
        images: (N, ...) float images in [lower, upper].
        labels: (N,) int true classes.
        eps: Linf or L2 radius.
        train_T: the temperature the model was trained at (its loss was CE(z / train_T)).
        norm: "linf" or "l2".
        steps: PGD steps.
        batch_size: images per attack call.
        threshold: (e): largest robust-accuracy gap (absolute, in [0, 1]) allowed between
            two full-strength white-box attacks.
        sanity_threshold: (b), (c), (d): how far FGSM may beat PGD, the accuracy the
            unbounded run may leave, and the fraction of images a gradient-free attack may
            break that every gradient attack missed.
        dead_threshold: (a): fraction of dead input gradients allowed in any gradient attack.
        apgd_steps: APGD iterations.
        autoattack: "standard" (APGD-CE, APGD-T, FAB-T, Square; the default), "custom"
            (``autoattack_attacks``, default APGD-CE and APGD-T) or "off". It needs the
            ``pyautoattack`` package and the box [0, 1].
        autoattack_attacks: the custom version's attacks.
        square_queries: Square Attack's queries per image (0: do not run it).
        surrogate: a second model to craft transfer examples on (None: no transfer attack).
        lower, upper: image box.
        seed: seed of every attack's randomness.
        backend: backend of the fused step.
        model_mode: the model's mode during the attacks ("eval", "train", "as-is").
        log: called with one line per attack as it finishes (None: quiet).

    Returns:
        an :class:`AuditReport`.

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> report = audit(model, torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,)),
        ...                steps=5, apgd_steps=10, autoattack="off", square_queries=0)
        >>> sorted(report.robust)
        ['apgd-dlr', 'ce@T=1', 'clean', 'cw', 'fgsm', 'unbounded']
    """
    _check_audit_args(images, labels, eps, train_T, threshold, sanity_threshold,
                      dead_threshold, autoattack, square_queries)
    steps = check_positive_int("steps", steps)
    batch_size = check_positive_int("batch_size", batch_size)
    apgd_steps = check_positive_int("apgd_steps", apgd_steps)
    log = log or (lambda _msg: None)
    unit_box = (float(lower), float(upper)) == (0.0, 1.0)
    settings = dict(eps=float(eps), norm=norm, lower=lower, upper=upper, backend=backend,
                    model_mode=model_mode)
    attacks = _gradient_attacks(model, float(train_T), steps, apgd_steps, seed, images,
                                **settings)
    not_run: dict[str, str] = {}
    if square_queries:
        if unit_box:
            ok, why = available()
            if ok:
                attacks[SQUARE] = Square(model, eps=float(eps), norm=norm,
                                         queries=square_queries, seed=seed,
                                         model_mode=model_mode)
            else:
                not_run[SQUARE] = why
        else:
            not_run[SQUARE] = f"the reference code works in the box [0, 1], not [{lower}, {upper}]"
    if surrogate is not None:
        # Crafted on the surrogate, scored on the audited model: its gradients are the
        # surrogate's, so they do not count in check (a).
        attacks[TRANSFER] = PGD(
            surrogate, eps=eps, alpha=_PGD_STEP_FACTOR * eps / steps, steps=steps, norm=norm,
            lower=lower, upper=upper, generator=torch.Generator().manual_seed(seed + 5),
            backend=backend, model_mode=model_mode)

    n = images.shape[0]
    correct: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    with _mode(model, model_mode):
        correct["clean"] = _correct_batches(model, images, labels, batch_size)
    for name, attack in attacks.items():
        started = time.perf_counter()
        parts = []
        for start in range(0, n, batch_size):
            x, y = images[start:start + batch_size], labels[start:start + batch_size]
            adv = attack(x, y)   # each attack checks its inputs and its output
            with _mode(model, model_mode):
                parts.append(_correct_batches(model, adv, y, batch_size))
        correct[name] = torch.cat(parts)
        seconds[name] = time.perf_counter() - started
        log(f"[audit] {name}: robust {float((correct[name] & correct['clean']).float().mean()):.2%}"
            f" ({seconds[name]:.1f}s)")

    aa_info: dict = {}
    if autoattack != "off":
        if not unit_box:
            not_run[AUTOATTACK] = f"AutoAttack works in the box [0, 1], not [{lower}, {upper}]"
        else:
            ok, why = available()
            if not ok:
                not_run[AUTOATTACK] = why
            else:
                custom = autoattack == "custom"
                aa = run_autoattack(model, images, labels, eps, norm, version=autoattack,
                                    attacks=list(autoattack_attacks or AUTOATTACK_CUSTOM)
                                    if custom else None, seed=seed, batch_size=batch_size,
                                    mode=model_mode)
                with _mode(model, model_mode):
                    correct[AUTOATTACK] = _correct_batches(model, aa.adv, labels, batch_size)
                seconds[AUTOATTACK] = aa.seconds
                aa_info = {"version": aa.version, "attacks": aa.attacks,
                           "robust_after": aa.robust_after, "flags": aa.flags,
                           "module": aa.module}
                log(f"[audit] autoattack ({aa.version}: {', '.join(aa.attacks)}): robust "
                    f"{float((correct[AUTOATTACK] & correct['clean']).float().mean()):.2%} "
                    f"({aa.seconds:.1f}s)")
    for name, why in not_run.items():
        warnings.warn(f"audit: {name} did not run: {why}", UserWarning, stacklevel=2)

    robust_mask = {k: v & correct["clean"] for k, v in correct.items()}
    robust = {k: float(v.float().mean()) for k, v in robust_mask.items()}
    threat = [k for k in robust_mask if k not in ("clean", UNBOUNDED)]
    worst = torch.stack([robust_mask[k] for k in threat]).all(dim=0) if threat \
        else robust_mask["clean"]
    dead = {name: a.gradient_stats.dead_fraction for name, a in attacks.items()
            if name not in _GRADIENT_FREE}
    thresholds = {"agreement": float(threshold), "sanity": float(sanity_threshold),
                  "dead_gradients": float(dead_threshold)}
    checks = _checks(robust, robust_mask, dead, not_run, thresholds)
    masking = any(c.passed is False for c in checks.values())
    return AuditReport(robust=robust, dead_gradients=dead, checks=checks, masking=masking,
                       verdict=_verdict(checks), worst_case=float(worst.float().mean()),
                       not_run=not_run, autoattack=aa_info, seconds=seconds, eps=float(eps),
                       norm=norm, n=n, thresholds=thresholds)


# --------------------------------------------------------------------------------------
# The attacks
# --------------------------------------------------------------------------------------
def _gradient_attacks(model, train_T, steps, apgd_steps, seed, images, *, eps, norm, lower,
                      upper, backend, model_mode) -> dict:
    common = dict(norm=norm, lower=lower, upper=upper, backend=backend, model_mode=model_mode)

    def gen(offset: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed + offset)

    def pgd(loss: str, T: float, offset: int, radius: float = eps) -> PGD:
        step = _PGD_STEP_FACTOR * radius / steps
        return PGD(model, eps=radius, alpha=step, steps=steps, loss=loss, T=T,
                   generator=gen(offset), **common)

    attacks = {CE_T1: pgd("ce", 1.0, 0)}
    if train_T != 1.0:
        attacks[_ce_key(train_T)] = pgd("ce", train_T, 1)
    attacks["cw"] = pgd("cw", 1.0, 2)
    attacks[FGSM_NAME] = FGSM(model, eps=eps, **common)
    attacks["apgd-dlr"] = APGD(model, eps=eps, steps=apgd_steps, loss="dlr",
                               generator=gen(3), **common)
    # A radius that reaches every point of the box from every image.
    diameter = (upper - lower) * (1.0 if norm.lower() == "linf"
                                  else math.sqrt(images[0].numel()))
    attacks[UNBOUNDED] = pgd("ce", 1.0, 4, radius=diameter)
    return attacks


@contextlib.contextmanager
def _mode(model, mode: str):
    """The attacks' model mode for scoring their outputs; the warning for a model that is
    not an nn.Module is the attacks' to give, not repeated here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with set_model_mode(model, mode):
            yield


def _correct_batches(model, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            out.append(model(x[start:start + batch_size]).argmax(dim=1)
                       == y[start:start + batch_size])
    return torch.cat(out)


# --------------------------------------------------------------------------------------
# The checks and the verdict
# --------------------------------------------------------------------------------------
_WHITE_BOX = ("apgd-dlr", AUTOATTACK, "cw")   # plus every ce@T=... PGD
_GRADIENT_FREE = (SQUARE, TRANSFER)


def _checks(robust: dict, mask: dict, dead: dict, not_run: dict, t: dict) -> dict:
    checks = {}
    # (a) dead gradients
    bad = {k: v for k, v in dead.items() if v > t["dead_gradients"]}
    listing = ", ".join(f"{k} {v:.1%}" for k, v in dead.items())
    checks["a"] = Check(CHECKS["a"], not bad,
                        f"all zero or non-finite input gradients: {listing} (allowed "
                        f"{t['dead_gradients']:.0%})")
    # (b) a single step beating many
    gap = robust[CE_T1] - robust[FGSM_NAME]
    checks["b"] = Check(CHECKS["b"], gap <= t["sanity"],
                        f"FGSM {robust[FGSM_NAME]:.1%} vs PGD {robust[CE_T1]:.1%} (same loss, "
                        f"CE@T=1; FGSM may beat PGD by at most {t['sanity']:.0%})")
    # (c) unbounded radius
    checks["c"] = Check(CHECKS["c"], robust[UNBOUNDED] <= t["sanity"],
                        f"PGD CE@T=1 with a radius covering the box leaves "
                        f"{robust[UNBOUNDED]:.1%} correct (allowed {t['sanity']:.0%})")
    # (d) gradient-free attacks against every gradient attack at once
    free = [k for k in _GRADIENT_FREE if k in mask]
    if free:
        gradient = [k for k in mask if k not in ("clean", UNBOUNDED, *_GRADIENT_FREE)]
        survived = torch.stack([mask[k] for k in gradient]).all(dim=0)
        extra = {k: float((survived & ~mask[k]).float().mean()) for k in free}
        worst = max(extra.values())
        checks["d"] = Check(CHECKS["d"], worst <= t["sanity"],
                            ", ".join(f"{k} breaks {v:.1%} of the images" for k, v in
                                      extra.items())
                            + f" that every gradient attack left correct (allowed "
                              f"{t['sanity']:.0%})")
    else:
        why = "; ".join(f"{k}: {not_run[k]}" for k in _GRADIENT_FREE if k in not_run)
        checks["d"] = Check(CHECKS["d"], None, "no gradient-free attack ran"
                            + (f" ({why})" if why else ""))
    # (e) agreement among the full-strength white-box attacks
    strong = {k: v for k, v in robust.items() if k.startswith("ce@T=") or k in _WHITE_BOX}
    hi, lo = max(strong, key=strong.get), min(strong, key=strong.get)
    checks["e"] = Check(CHECKS["e"], strong[hi] - strong[lo] <= t["agreement"],
                        f"widest gap {hi} {strong[hi]:.1%} vs {lo} {strong[lo]:.1%} "
                        f"(allowed {t['agreement']:.0%})")
    return checks


def _verdict(checks: dict) -> str:
    failed = [f"({k}) {c.name}" for k, c in checks.items() if c.passed is False]
    untested = [f"({k}) {c.name}" for k, c in checks.items() if c.passed is None]
    note = f"; not tested: {', '.join(untested)}" if untested else ""
    if [k for k, c in checks.items() if c.passed is False and k != "e"]:
        return ("gradient masking suspected: the gradient attacks' robustness is not "
                f"confirmed; failed {', '.join(failed)}{note}")
    if failed:
        # Only (e): the attacks see gradients, but some find far less than the strongest,
        # so the weaker ones (typically PGD with few steps) overstate robustness.
        return ("attacks disagree: the weaker attacks overstate robustness; failed "
                f"{', '.join(failed)}, no other sign of gradient masking{note}")
    return f"no sign of gradient masking: every check passed{note}"


def _check_audit_args(images, labels, eps, train_T, threshold, sanity_threshold,
                      dead_threshold, autoattack, square_queries) -> None:
    if isinstance(eps, Tensor):
        raise TypeError("audit takes one eps (a number), got a tensor")
    check_radius("eps", eps)
    if not math.isfinite(eps):
        raise ValueError(f"eps must be finite, got {eps}")
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
    for name, value in (("threshold", threshold), ("sanity_threshold", sanity_threshold),
                        ("dead_threshold", dead_threshold)):
        if not (isinstance(value, numbers.Real) and 0 <= value <= 1):
            raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    if autoattack not in AUTOATTACK_MODES:
        raise ValueError(f"autoattack must be one of {AUTOATTACK_MODES}, got {autoattack!r}")
    if isinstance(square_queries, bool) or not isinstance(square_queries, int) or \
            square_queries < 0:
        raise ValueError(f"square_queries must be an int >= 0, got {square_queries!r}")


__all__ = ["audit", "AuditReport", "Check", "CHECKS"]
