"""Per-channel normalization inside the model, so every model takes inputs in [0, 1].

Keeping the normalization in the model (as buffers, saved with the weights) means attacks,
corruptions and evaluation all work in pixel space, where eps = 8/255 means what it says.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["Normalize", "NormalizedModel"]


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel.

    Args:
        mean: one value per channel (in [0, 1] units).
        std: one positive value per channel.

    Shape:
        (B, C, H, W) -> (B, C, H, W).

    Example:
        >>> Normalize((0.5,), (0.25,))(torch.ones(1, 1, 2, 2)).flatten().tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(tuple(mean), dtype=torch.float32)
        std_t = torch.as_tensor(tuple(std), dtype=torch.float32)
        if mean_t.dim() != 1 or mean_t.shape != std_t.shape:
            raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must be flat and of "
                             f"equal length")
        if not bool((std_t > 0).all()):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.mean.shape[1]:
            raise ValueError(f"expected input (B, {self.mean.shape[1]}, H, W), got "
                             f"{tuple(x.shape)}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"mean={[round(v, 4) for v in self.mean.flatten().tolist()]}, "
                f"std={[round(v, 4) for v in self.std.flatten().tolist()]}")


class NormalizedModel(nn.Module):
    """A classifier preceded by :class:`Normalize`: takes [0, 1] images, returns logits.

    Attributes:
        normalize: the Normalize layer.
        net: the architecture proper (sees normalized inputs).
        arch: the architecture name, for checkpoints and reports.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float],
                 arch: str = "") -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
