"""Evaluate a trained classifier: clean accuracy, calibration, corruptions, perturbations,
natural shift, PGD and the gradient-masking audit, plus whether the model trained at all.

    >>> from tempsoft.robustness.evaluate import evaluate
    >>> metrics = evaluate(model, test_set, ["clean", "ece", "corruption", "pgd_linf"],
    ...                    T=2.0, train_set=train_set)
    >>> metrics["clean_acc"], metrics["pgd_linf_acc"], metrics["trained"], metrics["health"]

Why the health report is always computed: a classifier that never trained, or that predicts
one class for everything, changes its prediction under no perturbation, so it looks "robust"
to corruptions, perturbations and PGD. Every result therefore carries
  trained      train accuracy >= chance + 0.25 * (1 - chance)       (TRAINED_MARGIN)
  near_chance  test accuracy  <= chance + 0.10 * (1 - chance)       (NEAR_CHANCE_MARGIN)
  collapsed    effective number of predicted classes exp(H(histogram)) < 0.5 * C, or one
               class receives more than half of all predictions      (COLLAPSE_*)
and the train loss at the training temperature next to ln C (its value for uniform
predictions). The loss ratio is reported but is not a criterion: at high T a model can
classify well while CE(z / T) stays close to ln C, because its logit margins are small next
to T.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor, nn

EVALS = ("clean", "ece", "corruption", "released_c", "perturbation", "released_p", "cifar101",
         "pgd_linf", "pgd_l2", "audit")

TRAINED_MARGIN = 0.25
NEAR_CHANCE_MARGIN = 0.10
COLLAPSE_EFFECTIVE_FRACTION = 0.5
COLLAPSE_TOP_SHARE = 0.5


@dataclass
class EvalSettings:
    """How each evaluation runs. Defaults are the CIFAR conventions (images in [0, 1]).

    Args:
        batch_size: forward/attack batch.
        device: "auto" (cuda when available), "cpu", "cuda".
        ece_bins: equal-width confidence bins for the expected calibration error.
        pgd_linf_eps, pgd_linf_alpha: PGD-Linf radius and step (8/255, 2/255; Madry et al.).
        pgd_l2_eps, pgd_l2_alpha: PGD-L2 radius and step (0.5, 0.1).
        pgd_steps, pgd_restarts: iterations (20) and random restarts (1).
        pgd_T: temperature of the PGD loss; 1.0 is the standard attack a user runs on the
            logits; None uses the evaluation temperature T. The audit attacks at both.
        pgd_examples: evaluate PGD on this many test examples (a fixed seeded subset).
        audit_steps, audit_examples: the gradient-masking audit's PGD iterations and subset.
        audit_apgd_steps: its APGD-DLR iterations (100, Croce & Hein 2020).
        audit_autoattack: the reference AutoAttack in the audit: "standard" (APGD-CE,
            APGD-T, FAB-T, Square), "custom" (APGD-CE and APGD-T: the CPU demo) or "off".
        audit_square_queries: queries of the audit's Square Attack (gradient-free; 0: off).
        corruptions: names from CORRUPTIONS (None: all 15). severities: 1-5.
        corruption_examples: subset size for each corrupted copy (None: the whole test set).
        perturbations: sequence names (None: the ten that the test set's benchmark evaluates,
            ``perturbation_names``). perturbation_examples and perturbation_length: how many
            sequences and frames (the length applies to generated sequences only).
        released_c_root: the released corruption benchmark of the test set's dataset
            (CIFAR-10-C/, CIFAR-100-C/, Tiny-ImageNet-C/) or a folder holding it.
        released_p_root: likewise for CIFAR-10-P/, CIFAR-100-P/, Tiny-ImageNet-P/.
        cifar101_root: folder of the CIFAR-10.1 v6 .npy files.
        train_examples: subset of the train set for the health check's train accuracy.
        seed: seeds corruptions, perturbations, subsets and attack starts.
    """

    batch_size: int = 256
    device: str = "auto"
    ece_bins: int = 15
    pgd_linf_eps: float = 8 / 255
    pgd_linf_alpha: float = 2 / 255
    pgd_l2_eps: float = 0.5
    pgd_l2_alpha: float = 0.1
    pgd_steps: int = 20
    pgd_restarts: int = 1
    pgd_T: Optional[float] = 1.0
    pgd_examples: Optional[int] = None
    audit_steps: int = 20
    audit_examples: Optional[int] = 1000
    audit_apgd_steps: int = 100
    audit_autoattack: str = "standard"
    audit_square_queries: int = 5000
    corruptions: Optional[list[str]] = None
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    corruption_examples: Optional[int] = None
    perturbations: Optional[list[str]] = None
    perturbation_examples: Optional[int] = 1000
    perturbation_length: Optional[int] = None
    released_c_root: Optional[str] = None
    released_p_root: Optional[str] = None
    cifar101_root: Optional[str] = None
    train_examples: Optional[int] = 10000
    seed: int = 0

    def validate(self) -> "EvalSettings":
        """Raise ValueError/TypeError naming the first bad field; return self."""
        for name in ("batch_size", "ece_bins", "pgd_steps", "pgd_restarts", "audit_steps",
                     "audit_apgd_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("pgd_linf_eps", "pgd_linf_alpha", "pgd_l2_eps", "pgd_l2_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        from tempsoft.attacks.audit import AUTOATTACK_MODES

        if self.audit_autoattack not in AUTOATTACK_MODES:
            raise ValueError(f"audit_autoattack must be one of {AUTOATTACK_MODES}, got "
                             f"{self.audit_autoattack!r}")
        if isinstance(self.audit_square_queries, bool) or \
                not isinstance(self.audit_square_queries, int) or self.audit_square_queries < 0:
            raise ValueError(f"audit_square_queries must be an int >= 0, got "
                             f"{self.audit_square_queries!r}")
        if self.pgd_T is not None and not (isinstance(self.pgd_T, (int, float))
                                           and math.isfinite(self.pgd_T) and self.pgd_T > 0):
            raise ValueError(f"pgd_T must be positive and finite or None, got {self.pgd_T!r}")
        bad = [s for s in self.severities if s not in (1, 2, 3, 4, 5)]
        if bad or not self.severities:
            raise ValueError(f"severities must be a non-empty subset of 1..5, got "
                             f"{list(self.severities)!r}")
        for name in ("pgd_examples", "audit_examples", "corruption_examples",
                     "perturbation_examples", "perturbation_length", "train_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
        return self


class EvalCache:
    """Corrupted copies and perturbation sequences, made once and reused across models.

    In memory by default; with ``directory`` they are written there as .pt files instead
    (a CIFAR-sized corruption suite is 75 copies of the test set, too much to keep in RAM).

    Example:
        >>> cache = EvalCache()
        >>> for model in models: evaluate(model, test_set, ["corruption"], cache=cache)
    """

    def __init__(self, directory: Optional[str | Path] = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[tuple, Any] = {}

    def get(self, key: tuple, make: Callable[[], Any]) -> Any:
        """The value stored under ``key``, made by ``make()`` on first use."""
        if self.directory is None:
            if key not in self._memory:
                self._memory[key] = make()
            return self._memory[key]
        path = self.directory / ("-".join(str(k).replace("/", "_") for k in key) + ".pt")
        if path.exists():
            return torch.load(path, weights_only=True)
        value = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(value, tmp)
        tmp.replace(path)
        return value


# ======================================================================================
# Helpers
# ======================================================================================
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _to_float(images: Tensor, device: torch.device) -> Tensor:
    """uint8 (or float in [0, 1]) images -> float32 in [0, 1] on ``device``."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


@torch.no_grad()
def predict_logits(model: nn.Module, images: Tensor, *, batch_size: int = 256,
                   device: torch.device | str = "cpu") -> Tensor:
    """Logits of ``model`` for ``images`` (uint8 or float in [0, 1]), float32 on the CPU.

    Shape: images (N, C, H, W) -> logits (N, num_classes).
    """
    device = torch.device(device)
    out = [model(_to_float(images[i:i + batch_size], device)).float().cpu()
           for i in range(0, images.shape[0], batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).double().mean()) if labels.numel() else \
        float("nan")


def _subset(n_total: int, n: Optional[int], seed: int) -> Tensor:
    """A fixed seeded subset of indices, sorted (test sets may be sorted by class)."""
    if n is None or n >= n_total:
        return torch.arange(n_total)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=gen)[:n].sort().values


def _check_evals(evals: Iterable[str]) -> list[str]:
    if isinstance(evals, str):
        evals = [evals]
    evals = list(evals)
    unknown = [e for e in evals if e not in EVALS]
    if unknown:
        raise ValueError(f"unknown evaluation {unknown[0]!r}; known: {list(EVALS)}")
    return evals


# ======================================================================================
# Health: did it train, did it collapse
# ======================================================================================
def health_report(test_logits: Tensor, test_labels: Tensor, num_classes: int, *,
                  train_acc: Optional[float] = None,
                  train_loss: Optional[float] = None) -> dict[str, Any]:
    """Per-class accuracy, prediction histogram and the trained / near_chance / collapsed flags.

    Args:
        test_logits: (N, C) logits on the clean test set.
        test_labels: (N,) labels.
        num_classes: C.
        train_acc: clean accuracy on (a subset of) the train set, or None (then ``trained``
            is judged on the test accuracy, and ``health`` says so).
        train_loss: CE at the training temperature on that subset, or None.

    Returns:
        dict with per_class_acc (list), pred_hist (list of counts), effective_classes,
        top_class_share, train_acc, train_loss_T, ln_C, loss_ratio, trained, near_chance,
        collapsed, healthy, health (one line).

    Example:
        >>> health_report(torch.zeros(5, 3), torch.tensor([0, 1, 2, 0, 1]), 3)["collapsed"]
        True
    """
    preds = test_logits.argmax(dim=1)
    hist = torch.bincount(preds, minlength=num_classes).double()
    share = hist / hist.sum().clamp_min(1)
    nonzero = share[share > 0]
    effective = float(torch.exp(-(nonzero * nonzero.log()).sum()))
    per_class = []
    for c in range(num_classes):
        mask = test_labels == c
        per_class.append(float((preds[mask] == c).double().mean()) if mask.any()
                         else float("nan"))
    chance = 1.0 / num_classes
    test_acc = _accuracy(test_logits, test_labels)
    judged = train_acc if train_acc is not None else test_acc
    trained = judged >= chance + TRAINED_MARGIN * (1 - chance)
    near_chance = test_acc <= chance + NEAR_CHANCE_MARGIN * (1 - chance)
    top = float(share.max())
    collapsed = effective < COLLAPSE_EFFECTIVE_FRACTION * num_classes or top > COLLAPSE_TOP_SHARE
    ln_c = math.log(num_classes)
    report = {
        "per_class_acc": per_class,
        "pred_hist": [int(v) for v in hist.tolist()],
        "effective_classes": effective,
        "top_class_share": top,
        "train_acc": train_acc if train_acc is not None else float("nan"),
        "train_loss_T": train_loss if train_loss is not None else float("nan"),
        "ln_C": ln_c,
        "loss_ratio": (train_loss / ln_c) if train_loss is not None else float("nan"),
        "trained": bool(trained),
        "near_chance": bool(near_chance),
        "collapsed": bool(collapsed),
    }
    report["healthy"] = bool(trained and not near_chance and not collapsed)
    report["health"] = _health_line(report, judged, test_acc, chance, num_classes,
                                    train_acc is None)
    return report


def _health_line(r: dict, judged: float, test_acc: float, chance: float, n_cls: int,
                 from_test: bool) -> str:
    problems = []
    if not r["trained"]:
        what = "test" if from_test else "train"
        problems.append(f"did not train ({what} acc {judged:.3f} < "
                        f"{chance + TRAINED_MARGIN * (1 - chance):.3f})")
    if r["near_chance"]:
        problems.append(f"near chance (test acc {test_acc:.3f}, chance {chance:.3f})")
    if r["collapsed"]:
        problems.append(f"collapsed ({r['effective_classes']:.1f} effective classes of "
                        f"{n_cls}, top class {r['top_class_share']:.0%} of predictions)")
    if not problems:
        return "ok"
    return "; ".join(problems) + ": its robustness numbers do not show robustness"


@torch.no_grad()
def _train_fit(model: nn.Module, train_set, train_T: float, s: EvalSettings,
               device: torch.device) -> tuple[float, float]:
    idx = _subset(len(train_set.labels), s.train_examples, s.seed)
    logits = predict_logits(model, train_set.images[idx], batch_size=s.batch_size,
                            device=device)
    labels = train_set.labels[idx]
    loss = float(torch.nn.functional.cross_entropy(logits.double() / train_T, labels))
    return _accuracy(logits, labels), loss


# ======================================================================================
# The evaluations
# ======================================================================================
def _eval_corruptions(model, test_set, s: EvalSettings, cache: EvalCache, device) -> dict:
    from tempsoft.robustness.benchmarks import benchmark_for
    from tempsoft.robustness.corruptions import CORRUPTIONS, corrupt

    names = list(s.corruptions) if s.corruptions else list(CORRUPTIONS)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ValueError(f"unknown corruption {unknown[0]!r}; known: {list(CORRUPTIONS)}")
    bench = benchmark_for(test_set)
    idx = _subset(len(test_set.labels), s.corruption_examples, s.seed)
    images, labels = test_set.images[idx], test_set.labels[idx]
    out, per_name = {}, []
    for name in names:
        accs = []
        for sev in s.severities:
            key = ("corruption", bench.corruption_name, test_set.name, name, sev, s.seed,
                   len(idx))
            bad = cache.get(key, lambda n=name, v=sev: corrupt(images, n, v, seed=s.seed,
                                                               dataset=test_set))
            logits = predict_logits(model, bad, batch_size=s.batch_size, device=device)
            accs.append(_accuracy(logits, labels))
        out[f"corruption_acc/{name}"] = sum(accs) / len(accs)
        per_name.append(out[f"corruption_acc/{name}"])
    out["corruption_acc"] = sum(per_name) / len(per_name)
    return out


def _eval_released_c(model, test_set, s: EvalSettings, device) -> dict:
    from tempsoft.robustness.corruptions import CORRUPTIONS
    from tempsoft.robustness.released import load_released_c

    if not s.released_c_root:
        raise ValueError("evaluation 'released_c' needs released_c_root (the folder of the "
                         "released CIFAR-10-C / CIFAR-100-C / Tiny-ImageNet-C files, or one "
                         "holding it)")
    names = list(s.corruptions) if s.corruptions else list(CORRUPTIONS)
    per_name = []
    out = {}
    for name in names:
        accs = []
        for sev in s.severities:
            images, labels = load_released_c(s.released_c_root, name, sev, dataset=test_set,
                                             class_ids=test_set.ids)
            logits = predict_logits(model, images, batch_size=s.batch_size, device=device)
            accs.append(_accuracy(logits, labels))
        out[f"released_c_acc/{name}"] = sum(accs) / len(accs)
        per_name.append(out[f"released_c_acc/{name}"])
    out["released_c_acc"] = sum(per_name) / len(per_name)
    return out


def _perturbation_names(test_set, s: EvalSettings) -> list[str]:
    from tempsoft.robustness.perturbations import SEQUENCES, perturbation_names

    names = list(s.perturbations) if s.perturbations else list(perturbation_names(test_set))
    unknown = [n for n in names if n not in SEQUENCES]
    if unknown:
        raise ValueError(f"unknown perturbation {unknown[0]!r}; known: {list(SEQUENCES)}")
    return names


def _eval_perturbations(model, test_set, s: EvalSettings, cache: EvalCache, device) -> dict:
    from tempsoft.robustness.benchmarks import benchmark_for
    from tempsoft.robustness.perturbations import flip_probability, make_sequence

    names = _perturbation_names(test_set, s)
    bench = benchmark_for(test_set)
    idx = _subset(len(test_set.labels), s.perturbation_examples, s.seed)
    images = test_set.images[idx]
    out = {}
    for name in names:
        key = ("perturbation", bench.perturbation_name, test_set.name, name,
               s.perturbation_length, s.seed, len(idx))
        seq = cache.get(key, lambda n=name: make_sequence(images, n,
                                                           length=s.perturbation_length,
                                                           seed=s.seed, dataset=test_set))
        # name: noise sequences are scored against their first frame (Hendrycks & Dietterich)
        out[f"flip_prob/{name}"] = float(flip_probability(model, seq, batch_size=s.batch_size,
                                                          device=device, name=name))
    out["flip_prob"] = sum(out[f"flip_prob/{n}"] for n in names) / len(names)
    return out


def _eval_released_p(model, test_set, s: EvalSettings, device) -> dict:
    from tempsoft.robustness.perturbations import flip_probability
    from tempsoft.robustness.released import load_released_p, released_sequence_count

    if not s.released_p_root:
        raise ValueError("evaluation 'released_p' needs released_p_root (the folder of the "
                         "released CIFAR-10-P / CIFAR-100-P / Tiny-ImageNet-P files, or one "
                         "holding it)")
    names = _perturbation_names(test_set, s)
    out = {}
    for name in names:
        total = released_sequence_count(s.released_p_root, name, dataset=test_set)
        idx = _subset(total, s.perturbation_examples, s.seed)
        seq, _ = load_released_p(s.released_p_root, name, dataset=test_set,
                                 class_ids=test_set.ids, indices=idx.tolist())
        out[f"released_flip_prob/{name}"] = float(flip_probability(
            model, seq, batch_size=s.batch_size, device=device, name=name))
    out["released_flip_prob"] = sum(out[f"released_flip_prob/{n}"] for n in names) / len(names)
    return out


def _eval_cifar101(model, s: EvalSettings, device) -> dict:
    from tempsoft.robustness.perturbations import load_cifar101

    if not s.cifar101_root:
        raise ValueError("evaluation 'cifar101' needs cifar101_root (the folder of the "
                         "CIFAR-10.1 v6 .npy files)")
    images, labels = load_cifar101(s.cifar101_root)
    logits = predict_logits(model, images, batch_size=s.batch_size, device=device)
    return {"cifar101_acc": _accuracy(logits, labels)}


def _attack_accuracy(model, attack, images: Tensor, labels: Tensor, batch_size: int,
                     device) -> float:
    correct = 0
    for i in range(0, images.shape[0], batch_size):
        x = _to_float(images[i:i + batch_size], device)
        y = labels[i:i + batch_size].to(device)
        adv = attack(x, y)
        with torch.no_grad():
            correct += int((model(adv).argmax(dim=1) == y).sum())
    return correct / max(images.shape[0], 1)


def _eval_pgd(model, test_set, norm: str, T: float, s: EvalSettings, device) -> dict:
    from tempsoft.attacks import PGD

    eps, alpha = ((s.pgd_linf_eps, s.pgd_linf_alpha) if norm == "linf"
                  else (s.pgd_l2_eps, s.pgd_l2_alpha))
    gen = torch.Generator(device=device).manual_seed(s.seed)
    attack_T = T if s.pgd_T is None else s.pgd_T
    attack = PGD(model, eps=eps, alpha=alpha, steps=s.pgd_steps, norm=norm, T=attack_T,
                 random_start=True, restarts=s.pgd_restarts, generator=gen)
    idx = _subset(len(test_set.labels), s.pgd_examples, s.seed)
    acc = _attack_accuracy(model, attack, test_set.images[idx], test_set.labels[idx],
                           s.batch_size, device)
    return {f"pgd_{norm}_acc": acc}


def _eval_audit(model, test_set, train_T: float, s: EvalSettings, device, log) -> dict:
    from tempsoft.attacks import audit

    idx = _subset(len(test_set.labels), s.audit_examples, s.seed)
    images = _to_float(test_set.images[idx], device)
    labels = test_set.labels[idx].to(device)
    report = audit(model, images, labels, eps=s.pgd_linf_eps, train_T=train_T, norm="linf",
                   steps=s.audit_steps, batch_size=s.batch_size, seed=s.seed,
                   apgd_steps=s.audit_apgd_steps, autoattack=s.audit_autoattack,
                   square_queries=s.audit_square_queries, log=log)
    out = {f"audit/{name}": float(acc) for name, acc in report.robust.items()}
    # Per image: correct under every attack at once (the ensemble's worst case).
    out["audit_worst_acc"] = float(report.worst_case)
    out["audit_masking"] = bool(report.masking)
    out["audit_failed_checks"] = ",".join(report.failed_checks)
    out["audit_checks"] = {k: str(c) for k, c in report.checks.items()}
    out["audit_dead_gradients"] = dict(report.dead_gradients)
    out["audit_verdict"] = str(report.verdict)
    out["audit_not_run"] = dict(report.not_run)
    out["audit_autoattack_flags"] = list(report.autoattack.get("flags", []))
    out["audit_seconds"] = sum(report.seconds.values())
    return out


# ======================================================================================
# Result columns
# ======================================================================================
def metric_columns(evals: Iterable[str], datasets: Iterable[str],
                   corruptions: Optional[Sequence[str]] = None,
                   perturbations: Optional[Sequence[str]] = None) -> list[str]:
    """The metric keys ``evaluate`` writes for these evaluations on these datasets, in a
    fixed order (a results table's header; the audit's own columns are left to the caller).

    Example:
        >>> metric_columns(["clean", "ece"], ["cifar10"])
        ['ece', 'ece_T1']
    """
    from tempsoft.robustness.corruptions import CORRUPTIONS
    from tempsoft.robustness.perturbations import perturbation_names

    evals = set(_check_evals(evals))
    c_names = list(corruptions or CORRUPTIONS)
    p_names: list[str] = list(perturbations or [])
    if not perturbations:
        for ds in datasets:
            p_names += [n for n in perturbation_names(ds) if n not in p_names]
    cols: list[str] = []
    if "ece" in evals:
        cols += ["ece", "ece_T1"]
    if "corruption" in evals:
        cols += ["corruption_acc"] + [f"corruption_acc/{n}" for n in c_names]
    if "released_c" in evals:
        cols += ["released_c_acc"] + [f"released_c_acc/{n}" for n in c_names]
    if "perturbation" in evals:
        cols += ["flip_prob"] + [f"flip_prob/{n}" for n in p_names]
    if "released_p" in evals:
        cols += ["released_flip_prob"] + [f"released_flip_prob/{n}" for n in p_names]
    if "cifar101" in evals:
        cols.append("cifar101_acc")
    for norm in ("linf", "l2"):
        if f"pgd_{norm}" in evals:
            cols.append(f"pgd_{norm}_acc")
    return cols


# ======================================================================================
# evaluate
# ======================================================================================
def evaluate(model: nn.Module, test_set, evals: Sequence[str] = ("clean",), *,
             T: float = 1.0, train_T: Optional[float] = None, train_set=None,
             settings: Optional[EvalSettings] = None, cache: Optional[EvalCache] = None,
             log: Optional[Callable[[str], None]] = None, **overrides: Any) -> dict[str, Any]:
    """Run the requested evaluations; the clean pass and the health report always run.

    Args:
        model: a classifier taking float images in [0, 1]; moved to the device, eval mode.
        test_set: an ``ImageDataset`` (uint8 images, int64 labels).
        evals: names from ``EVALS``: "clean", "ece", "corruption" (the test set's corruption
            benchmark, generated), "released_c" (its released files), "perturbation" (its
            perturbation benchmark's flip probability, generated), "released_p" (on its
            released files), "cifar101", "pgd_linf", "pgd_l2", "audit".
        T: temperature at which the model's probabilities are read (ECE; ``ece_T1`` is
            always on the raw logits) and, when ``settings.pgd_T`` is None, at which PGD
            attacks.
        train_T: the temperature the model was trained at (audit, health loss); default T.
        train_set: the training ``ImageDataset``, for the health check's train accuracy and
            loss; without it ``trained`` is judged on the test accuracy.
        settings: an ``EvalSettings``; ``overrides`` replace its fields.
        cache: an ``EvalCache`` to share corrupted data across calls.
        log: called with one line per finished evaluation (and per audit attack), with its
            result and wall time; None: quiet.

    Returns:
        A flat dict: clean_acc, ece (at T), ece_T1 (raw logits), corruption_acc and
        corruption_acc/<name>, released_c_acc and released_c_acc/<name>, flip_prob and
        flip_prob/<name>, released_flip_prob and released_flip_prob/<name>, cifar101_acc, pgd_linf_acc, pgd_l2_acc,
        audit/<attack>, audit_worst_acc, audit_masking, audit_failed_checks, audit_checks,
        audit_dead_gradients, audit_verdict, audit_not_run, audit_autoattack_flags, and the
        health keys of ``health_report`` (trained, collapsed, near_chance, healthy, ...).

    Example:
        >>> m = evaluate(model, test_set, ["clean", "pgd_linf"], T=1.0, pgd_examples=500)
        >>> m["clean_acc"], m["pgd_linf_acc"], m["healthy"]
    """
    evals = _check_evals(evals)
    for name, value in (("T", T), ("train_T", train_T)):
        if value is not None and not (isinstance(value, (int, float)) and
                                      not isinstance(value, bool) and math.isfinite(value)
                                      and value > 0):
            raise ValueError(f"{name} must be positive and finite, got {name}={value!r}")
    train_T = T if train_T is None else train_T
    s = dataclasses.replace(settings or EvalSettings(), **overrides).validate()
    cache = cache if cache is not None else EvalCache()
    device = _device(s.device)
    model = model.to(device).eval()
    num_classes = len(test_set.classes)

    logits = predict_logits(model, test_set.images, batch_size=s.batch_size, device=device)
    out: dict[str, Any] = {"clean_acc": _accuracy(logits, test_set.labels),
                           "num_classes": num_classes, "test_examples": len(test_set.labels)}
    train_acc = train_loss = None
    if train_set is not None:
        train_acc, train_loss = _train_fit(model, train_set, train_T, s, device)
    out.update(health_report(logits, test_set.labels, num_classes, train_acc=train_acc,
                             train_loss=train_loss))
    say = log or (lambda _msg: None)
    say(f"[eval] clean: {out['clean_acc']:.2%} ({out['health']})")

    def run(name: str, fn: Callable[[], dict], headline: str) -> None:
        started = time.perf_counter()
        result = fn()
        out.update(result)
        say(f"[eval] {name}: {result[headline]:.4f} ({time.perf_counter() - started:.1f}s)")

    if "ece" in evals:
        from tempsoft.robustness.calibration import expected_calibration_error

        # At the training temperature (the model's own probabilities) and on the raw logits
        # (T = 1: what a deployed model that drops the temperature reports).
        run("ece", lambda: {
            "ece": float(expected_calibration_error(logits / T, test_set.labels,
                                                    n_bins=s.ece_bins)),
            "ece_T1": float(expected_calibration_error(logits, test_set.labels,
                                                       n_bins=s.ece_bins))}, "ece")
    if "corruption" in evals:
        run("corruption", lambda: _eval_corruptions(model, test_set, s, cache, device),
            "corruption_acc")
    if "released_c" in evals:
        run("released_c", lambda: _eval_released_c(model, test_set, s, device),
            "released_c_acc")
    if "perturbation" in evals:
        run("perturbation", lambda: _eval_perturbations(model, test_set, s, cache, device),
            "flip_prob")
    if "released_p" in evals:
        run("released_p", lambda: _eval_released_p(model, test_set, s, device),
            "released_flip_prob")
    if "cifar101" in evals:
        run("cifar101", lambda: _eval_cifar101(model, s, device), "cifar101_acc")
    for norm in ("linf", "l2"):
        if f"pgd_{norm}" in evals:
            run(f"pgd_{norm}", lambda n=norm: _eval_pgd(model, test_set, n, T, s, device),
                f"pgd_{norm}_acc")
    if "audit" in evals:
        run("audit", lambda: _eval_audit(model, test_set, train_T, s, device, log),
            "audit_worst_acc")
        say(f"[eval] audit verdict: {out['audit_verdict']}")
    return out
