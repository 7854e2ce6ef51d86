"""The authors' reference code in the loop: AutoAttack (Croce & Hein, ICML 2020; the PyPI
package ``pyautoattack``, or the GitHub package ``autoattack``) and its Square Attack
(Andriushchenko et al., ECCV 2020), a score-based black-box attack that needs no gradient.

    from tempsoft.attacks import Square, run_autoattack
    adv = Square(model, eps=8/255, queries=1000)(images, labels)
    result = run_autoattack(model, images, labels, eps=8/255)   # the standard version
    result.robust_after, result.flags

The reference code reseeds the global random number generators; here it runs inside
``torch.random.fork_rng``, so the caller's random streams are left as they were. Its own
warnings (zero gradients, Square lowering the accuracy, a randomized or dynamic defense) are
collected into :attr:`AutoAttackResult.flags` instead of being printed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import logging
import re
import time
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor

from tempsoft.attacks.base import Attack, check_finite_output, check_positive_int, model_mode
from tempsoft.attacks.steps import Geometry, frozen_parameters

# The reference implementation: PyPI's "pyautoattack" (fra31/auto-attack, packaged), or the
# GitHub package, importable as "autoattack". Their keywords differ slightly.
MODULES = ("pyautoattack", "autoattack")
VERSIONS = ("standard", "custom", "plus", "rand")
INSTALL_HINT = "pip install pyautoattack"
# Square Attack's step-size schedule is written for 5,000 queries (AutoAttack's budget).
SQUARE_REFERENCE_QUERIES = 5000


def load_module():
    """The AutoAttack package; ImportError with the install command when it is missing."""
    for name in MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(f"AutoAttack (the authors' reference code) is not installed: "
                      f"{INSTALL_HINT}")


def available() -> tuple[bool, str]:
    """(True, module name) when AutoAttack imports, else (False, why)."""
    try:
        return True, load_module().__name__
    except ImportError as exc:
        return False, str(exc)


@contextlib.contextmanager
def _isolated_rng(device: torch.device) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _captured(logger_name: str) -> Iterator[tuple[_Collect, list]]:
    """The reference code's log records and warnings, kept instead of printed."""
    logger = logging.getLogger(logger_name)
    handler, level, propagate = _Collect(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield handler, caught
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


_ROBUST_AFTER = re.compile(r"robust accuracy after ([\w-]+): ([\d.]+)%")


@dataclasses.dataclass
class AutoAttackResult:
    """What :func:`run_autoattack` returns.

    Attributes:
        adv: (N, ...) the adversarial images (the clean image where no attack succeeded).
        version: "standard", "custom", ...
        attacks: the attacks AutoAttack was asked to run, in its order.
        robust_after: attack -> robust accuracy after it (cumulative, from AutoAttack's log).
        flags: AutoAttack's own warnings, e.g. "there are 12 points with zero gradient!"
            or "Square Attack has decreased the robust accuracy of 1.20%".
        module: the package that ran ("pyautoattack" or "autoattack").
        seconds: wall time.
    """

    adv: Tensor
    version: str
    attacks: list[str]
    robust_after: dict[str, float]
    flags: list[str]
    module: str
    seconds: float


def run_autoattack(model, images: Tensor, labels: Tensor, eps: float, norm: str = "linf",
                   version: str = "standard", attacks: Optional[list[str]] = None,
                   seed: int = 0, batch_size: int = 250,
                   mode: str = "eval") -> AutoAttackResult:
    """Run the reference AutoAttack on images in [0, 1].

    Args:
        model: maps images (N, ...) in [0, 1] to logits (N, C).
        images, labels: (N, ...) floats in [0, 1] and (N,) true classes.
        eps: the Linf or L2 radius.
        norm: "linf" or "l2".
        version: "standard" (APGD-CE, APGD-T, FAB-T, Square with 5,000 queries), "plus",
            "rand", or "custom" with ``attacks`` (e.g. ["apgd-ce", "apgd-t"]).
        attacks: the attack list of the custom version.
        seed: AutoAttack's seed.
        batch_size: images per forward pass.
        mode: the model's mode while it runs ("eval", "train" or "as-is").

    Returns:
        an :class:`AutoAttackResult`.

    Raises:
        ImportError: AutoAttack is not installed.
        ValueError: an image outside [0, 1] (AutoAttack clamps to that box), a bad version.
        RuntimeError: a non-finite adversarial image.
    """
    module = load_module()
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    if (version == "custom") != (attacks is not None):
        raise ValueError("attacks= goes with version='custom' (and only with it)")
    if images.numel() and not (0.0 <= float(images.min()) and float(images.max()) <= 1.0):
        raise ValueError("AutoAttack works on images in [0, 1]; normalize inside the model")
    batch_size = check_positive_int("batch_size", batch_size)
    aa_norm = {"linf": "Linf", "l2": "L2"}.get(str(norm).lower())
    if aa_norm is None:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    init = inspect.signature(module.AutoAttack.__init__).parameters
    kwargs = dict(norm=aa_norm, eps=float(eps), version=version, seed=seed,
                  device=images.device)
    if attacks is not None:
        kwargs["attacks" if "attacks" in init else "attacks_to_run"] = list(attacks)
    if "verbose" in init:
        kwargs["verbose"] = False
    run_params = inspect.signature(module.AutoAttack.run_standard_evaluation).parameters
    size = {"batch_size" if "batch_size" in run_params else "bs": batch_size}
    started = time.perf_counter()
    with _captured("auto-attack") as (log, caught), _isolated_rng(images.device), \
            model_mode(model, mode), frozen_parameters(model):
        adversary = module.AutoAttack(model, **kwargs)
        out = adversary.run_standard_evaluation(images.detach(), labels.detach(), **size)
    adv = out[0] if isinstance(out, tuple) else out  # pyautoattack returns (x_adv, y_adv)
    check_finite_output(adv, "AutoAttack")
    messages = [r.getMessage() for r in log.records]
    flags = _counted([r.getMessage() for r in log.records if r.levelno >= logging.WARNING]
                     + [str(w.message) for w in caught])
    robust_after = {m.group(1).lower(): float(m.group(2)) / 100
                    for m in map(_ROBUST_AFTER.search, messages) if m}
    return AutoAttackResult(adv=adv.detach(), version=version,
                            attacks=list(adversary.attacks_to_run), robust_after=robust_after,
                            flags=flags, module=module.__name__,
                            seconds=time.perf_counter() - started)


_NUMBER = re.compile(r"\d+(\.\d+)?")


def _counted(messages: list[str]) -> list[str]:
    """Each kind of message once (numbers aside), with how often it came: AutoAttack repeats
    its zero-gradient warning for every batch and target class."""
    kinds: dict[str, list[str]] = {}
    for m in messages:
        kinds.setdefault(_NUMBER.sub("#", m), []).append(m)
    return [seen[0] if len(seen) == 1 else f"{seen[0]} (and {len(seen) - 1} more like it)"
            for seen in kinds.values()]


class Square(Attack):
    r"""Square Attack: Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a
    query-efficient black-box adversarial attack via random search" (ECCV 2020).

    A score-based black-box attack: it only reads the model's logits (random square-shaped
    updates, kept when the margin loss falls), so saturated or zero gradients cannot stop it.
    That is what makes it a check for gradient masking. This class runs the authors'
    implementation (AutoAttack's ``square.py``) with tempsoft's input checks, model mode and
    finite-output check, and without touching the caller's random streams.

    Distance: Linf or L2, in the box [0, 1].

    Args:
        model: maps images (B, ...) in [0, 1] to logits (B, C).
        eps: ball radius (a number).
        norm: "linf" (default) or "l2".
        queries: model evaluations per image (default 5,000, AutoAttack's budget; the
            step-size schedule is rescaled to any other budget).
        p_init: initial fraction of pixels a square covers (0.8, as AutoAttack).
        restarts: attempts per image (default 1).
        seed: the reference code's seed.
        model_mode: "eval" (default), "train" or "as-is": see :class:`Attack`.

    Shape:
        images (B, ...) float32/float64 in [0, 1]; labels (B,) int; returns (B, ...).

    Example::

        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
        >>> images, labels = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
        >>> adv = Square(model, eps=8/255, queries=50)(images, labels)
        >>> bool(((adv - images).abs() <= 8/255 + 1e-6).all())
        True
    """

    def __init__(self, model, eps: float = 8 / 255, norm: str = "linf", queries: int = 5000,
                 p_init: float = 0.8, restarts: int = 1, seed: int = 0,
                 model_mode: str = "eval") -> None:
        if isinstance(eps, Tensor):
            raise TypeError("Square takes one eps (a number), got a tensor")
        super().__init__(model, eps, norm, False, 0.0, 1.0, None, "auto", model_mode)
        self.queries = check_positive_int("queries", queries)
        self.restarts = check_positive_int("restarts", restarts)
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
        self.p_init, self.seed = float(p_init), int(seed)

    def _run(self, geo: Geometry, labels: Tensor) -> Tensor:
        module = load_module()
        square_module = importlib.import_module(f"{module.__name__}.square")
        attack = square_module.SquareAttack(
            self.model, norm={"linf": "Linf", "l2": "L2"}[self.norm],
            n_queries=self.queries, eps=self.eps, p_init=self.p_init,
            n_restarts=self.restarts, seed=self.seed, verbose=False,
            resc_schedule=self.queries != SQUARE_REFERENCE_QUERIES, device=geo.x_nat.device)
        with _isolated_rng(geo.x_nat.device), torch.no_grad():
            return attack.perturb(geo.x_nat.clone(), labels)

    def _repr_fields(self) -> dict:
        return {"eps": self.eps, "norm": self.norm, "queries": self.queries}


__all__ = ["AutoAttackResult", "Square", "available", "load_module", "run_autoattack"]
