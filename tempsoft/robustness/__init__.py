"""Robustness beyond adversarial attacks: common corruptions (CIFAR-10-C protocol), natural
perturbation sequences (CIFAR-10-P protocol), natural distribution shift (CIFAR-10.1) and
calibration.

Public API:
    CORRUPTIONS, corrupt(images_uint8, name, severity, seed=0), load_released_c(root, name,
    severity); PERTURBATIONS, make_sequence(images_uint8, name, length=None, seed=0),
    flip_probability(model, sequences, batch_size=256, device="cpu"), load_cifar101(root);
    expected_calibration_error(logits, labels, n_bins=15).

``evaluate`` lives in ``tempsoft.robustness.evaluate`` and is imported from there
(``from tempsoft.robustness.evaluate import evaluate``).  It is deliberately not re-exported
here: the package would then hold two different things under the name ``evaluate`` (the
function, and the submodule that the import system binds to the same attribute), and which one
a caller got would depend on import order.  Keeping it out also keeps this package free of the
training and attack stack that evaluate.py uses.
"""
from __future__ import annotations

from .calibration import calibration_bins, expected_calibration_error
from .corruptions import CORRUPTIONS, SEVERITIES, corrupt, load_released_c
from .perturbations import (PERTURBATIONS, flip_probability, load_cifar101, make_sequence,
                            sequence_predictions)

__all__ = [
    "CORRUPTIONS", "SEVERITIES", "corrupt", "load_released_c",
    "PERTURBATIONS", "make_sequence", "flip_probability", "sequence_predictions",
    "load_cifar101", "expected_calibration_error", "calibration_bins",
]

