"""ResNet-18 and PreActResNet-18, CIFAR variants.

CIFAR variant = 3x3 stride-1 stem and no max-pool (He et al. 2016, section 4.2 style stem as
used throughout the adversarial-robustness literature), stages of 64/128/256/512 channels with
strides 1/2/2/2, global average pooling and one linear layer. PreActResNet-18 follows He et al.
"Identity Mappings in Deep Residual Networks" (BN-ReLU before each conv), the variant used by
Rice et al. 2020 and Wong et al. 2020 for adversarial training. Global average pooling (not a
fixed 4x4 pool) lets both run on 8x8, 32x32 and 64x64 inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from .head import Head

__all__ = ["ResNet", "PreActResNet", "resnet18", "preact_resnet18"]

STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-[dropout]-conv + shortcut (taken after the first BN-ReLU when
    projecting). Dropout (off by default) is the wide-ResNet variant's."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + shortcut


def _stages(block: type, blocks_per_stage: tuple[int, ...]) -> nn.Sequential:
    layers, cin = [], STAGE_WIDTHS[0]
    for width, stride, count in zip(STAGE_WIDTHS, STAGE_STRIDES, blocks_per_stage):
        for i in range(count):
            layers.append(block(cin, width, stride if i == 0 else 1))
            cin = width
    return nn.Sequential(*layers)


class ResNet(nn.Module):
    """ResNet (post-activation), CIFAR stem.

    Shape:
        (B, in_channels, H, W) -> (B, num_classes), any H, W >= 1.
    """

    def __init__(self, blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(in_channels, STAGE_WIDTHS[0]),
                                  nn.BatchNorm2d(STAGE_WIDTHS[0]), nn.ReLU(inplace=True))
        self.stages = _stages(BasicBlock, blocks_per_stage)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = Head(STAGE_WIDTHS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


class PreActResNet(nn.Module):
    """Pre-activation ResNet, CIFAR stem; a final BN-ReLU before pooling.

    Shape:
        (B, in_channels, H, W) -> (B, num_classes).
    """

    def __init__(self, blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10,
                 in_channels: int = 3) -> None:
        super().__init__()
        self.stem = _conv3x3(in_channels, STAGE_WIDTHS[0])
        self.stages = _stages(PreActBlock, blocks_per_stage)
        self.bn = nn.BatchNorm2d(STAGE_WIDTHS[-1])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = Head(STAGE_WIDTHS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn(self.stages(self.stem(x))))
        return self.fc(self.pool(out).flatten(1))


def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> ResNet:
    """ResNet-18 (11.2M parameters for 10 classes)."""
    return ResNet((2, 2, 2, 2), num_classes, in_channels)


def preact_resnet18(num_classes: int = 10, in_channels: int = 3,
                    image_size: int = 32) -> PreActResNet:
    """PreActResNet-18 (11.2M parameters for 10 classes)."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)
