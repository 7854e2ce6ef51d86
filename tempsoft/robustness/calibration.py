"""Expected calibration error with equal-width confidence bins (Guo et al., ICML 2017)."""
from __future__ import annotations

import torch

__all__ = ["expected_calibration_error", "calibration_bins"]


def _check_inputs(logits: torch.Tensor, labels: torch.Tensor, n_bins: int) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got "
                        f"{getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, C) with N > 0, got {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
        raise IndexError(f"labels span [{int(labels.min())}, {int(labels.max())}], expected "
                         f"values in [0, {logits.shape[1]})")


def calibration_bins(logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin (count, mean confidence, accuracy) over equal-width bins (k/n, (k+1)/n].

    Shape:
        logits (N, C), labels (N,) -> three float64 tensors of shape (n_bins,); empty bins have
        count 0 and mean confidence / accuracy 0.
    """
    _check_inputs(logits, labels, n_bins)
    probs = torch.softmax(logits.detach().to(torch.float64), dim=1)
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == labels.to(prediction.device)).to(torch.float64)
    inner = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=probs.device)[1:-1]
    # right=False: a confidence equal to a boundary belongs to the lower bin, (lo, hi].
    which = torch.bucketize(confidence, inner, right=False)
    count = torch.zeros(n_bins, dtype=torch.float64, device=probs.device)
    count.index_add_(0, which, torch.ones_like(confidence))
    conf_sum = torch.zeros_like(count).index_add_(0, which, confidence)
    acc_sum = torch.zeros_like(count).index_add_(0, which, correct)
    safe = count.clamp_min(1)
    return count.cpu(), (conf_sum / safe).cpu(), (acc_sum / safe).cpu()


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor,
                               n_bins: int = 15) -> float:
    """ECE = sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|, equal-width bins.

    Confidence is the top softmax probability of the logits (apply any temperature first:
    ``expected_calibration_error(logits / T, labels)``).

    Args:
        logits: (N, C) floating-point logits.
        labels: (N,) int64 class indices.
        n_bins: number of equal-width bins on [0, 1] (15, as Guo et al.).

    Returns:
        ECE in [0, 1].

    Example:
        >>> logits = torch.tensor([[4.0, 0.0], [0.0, 4.0]])
        >>> round(expected_calibration_error(logits, torch.tensor([0, 0])), 4)
        0.5
    """
    count, confidence, accuracy = calibration_bins(logits, labels, n_bins)
    return float((count / count.sum() * (accuracy - confidence).abs()).sum())
