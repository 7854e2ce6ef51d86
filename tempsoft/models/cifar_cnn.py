"""A fast CIFAR CNN for CPU studies, after the airbench family of fast CIFAR-10 trainers
(Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024; Page's ResNet-9 before it).

A 3x3 stem convolution, then three blocks of conv-BN-GELU, 2x2 max-pool, conv-BN-GELU, with
widths 32, 64, 128 (stem 24), global max-pooling and a linear head: 8 convolutions, 0.30M
parameters. Chosen for 2 CPU cores: it trains at ~1,300-1,600 images/s there (bf16 autocast,
channels_last; see benchmarks/RESULTS.md) and reaches ~80% CIFAR-10 test accuracy in 5
epochs, where ResNet-18 (11M parameters) manages ~60 images/s. No logit scaling and no
label smoothing, which would confound the softmax temperature.

``cifar_cnn_wide`` is the same network at airbench94's widths (64, 256, 256; 2.0M parameters),
for GPU studies that must finish in minutes; airbench94's other devices (a frozen whitening
stem, identity-initialized convolutions, lookahead, test-time augmentation, a 1/9 output
scale and label smoothing 0.2) are left out: the last two would change the temperature the
loss sees.
"""
from __future__ import annotations

import torch
from torch import nn

from .head import Head

__all__ = ["CifarCNN", "cifar_cnn", "cifar_cnn_wide", "CIFAR_CNN_WIDTHS", "AIRBENCH94_WIDTHS"]

CIFAR_CNN_STEM = 24
CIFAR_CNN_WIDTHS = (32, 64, 128)
AIRBENCH94_WIDTHS = (64, 256, 256)      # airbench94.py: base width 64, blocks 1x, 4x, 4x


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]


class CifarCNN(nn.Module):
    """Shape: (B, in_channels, H, W) -> (B, num_classes); H, W >= 8 (three 2x2 pools)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 widths: tuple[int, ...] = CIFAR_CNN_WIDTHS, stem: int = CIFAR_CNN_STEM) -> None:
        super().__init__()
        if image_size < 2 ** len(widths):
            raise ValueError(f"cifar_cnn pools {len(widths)} times: it needs images of at "
                             f"least {2 ** len(widths)} px, got {image_size}")
        layers, cin = _conv_bn(in_channels, stem), stem
        for width in widths:
            layers += _conv_bn(cin, width) + [nn.MaxPool2d(2)] + _conv_bn(width, width)
            cin = width
        self.features = nn.Sequential(*layers)
        self.fc = Head(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.amax(self.features(x), dim=(2, 3)))


def cifar_cnn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> CifarCNN:
    return CifarCNN(num_classes, in_channels, image_size)


def cifar_cnn_wide(num_classes: int = 10, in_channels: int = 3,
                   image_size: int = 32) -> CifarCNN:
    return CifarCNN(num_classes, in_channels, image_size, widths=AIRBENCH94_WIDTHS)
