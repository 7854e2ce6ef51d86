"""Robustness beyond adversarial attacks: common corruptions (CIFAR-10-C, CIFAR-100-C,
Tiny-ImageNet-C), natural perturbation sequences (CIFAR-10-P, CIFAR-100-P, Tiny-ImageNet-P),
natural distribution shift (CIFAR-10.1) and calibration.  Each dataset's own benchmark is
chosen by the dataset (``benchmark_for``).

Public API:
    benchmark_for(dataset), BENCHMARKS; CORRUPTIONS, corrupt(images_uint8, name, severity,
    seed=0, dataset=None); PERTURBATIONS, perturbation_names(dataset), make_sequence(
    images_uint8, name, length=None, seed=0, dataset=None), flip_probability(model, sequences,
    batch_size=256, device="cpu"); load_released_c(root, name, severity, dataset=...),
    load_released_p(root, name, dataset=...); load_cifar101(root);
    expected_calibration_error(logits, labels, n_bins=15).

``evaluate`` lives in ``tempsoft.robustness.evaluate`` and is imported from there
(``from tempsoft.robustness.evaluate import evaluate``).  It is deliberately not re-exported
here: the package would then hold two different things under the name ``evaluate`` (the
function, and the submodule that the import system binds to the same attribute), and which one
a caller got would depend on import order.  Keeping it out also keeps this package free of the
training and attack stack that evaluate.py uses.
"""
from __future__ import annotations

from .benchmarks import BENCHMARKS, benchmark_for
from .calibration import calibration_bins, expected_calibration_error
from .corruptions import CORRUPTIONS, SEVERITIES, corrupt
from .perturbations import (PERTURBATIONS, flip_probability, load_cifar101, make_sequence,
                            perturbation_names, sequence_predictions)
from .released import load_released_c, load_released_p

__all__ = [
    "BENCHMARKS", "benchmark_for",
    "CORRUPTIONS", "SEVERITIES", "corrupt", "load_released_c", "load_released_p",
    "PERTURBATIONS", "perturbation_names", "make_sequence", "flip_probability",
    "sequence_predictions", "load_cifar101", "expected_calibration_error", "calibration_bins",
]

