"""Wide ResNet (Zagoruyko & Komodakis 2016), WRN-28-10 for CIFAR.

depth 28 = 6n + 4 with n = 4 pre-activation blocks per stage, widths 16 -> 160/320/640
(widen factor 10), strides 1/2/2, BN-ReLU, global average pooling, linear. No dropout by default
(the adversarial-training literature trains it without); 36.5M parameters for 10 classes.
"""
from __future__ import annotations

import torch
from torch import nn

from .head import Head

from tempsoft.models.resnet import PreActBlock

__all__ = ["WideResNet", "wrn28_10"]


class WideResNet(nn.Module):
    """WRN-depth-widen.

    Shape:
        (B, in_channels, H, W) -> (B, num_classes).
    """

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10,
                 in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        per_stage = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks, cin = [], widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(per_stage):
                blocks.append(PreActBlock(cin, width, stride if i == 0 else 1, dropout))
                cin = width
        self.stages = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = Head(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.stages(self.stem(x))))
        return self.fc(self.pool(out).flatten(1))


def wrn28_10(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> WideResNet:
    """WRN-28-10."""
    return WideResNet(28, 10, num_classes, in_channels)
