"""VGG-16 with batch normalization, CIFAR variant.

Thirteen 3x3 conv-BN-ReLU layers in five blocks (64, 128, 256, 512, 512 channels), each block
ended by a 2x2 max-pool, then global average pooling and one linear layer (the usual CIFAR head:
the 4096-wide ImageNet classifier would triple the parameters for nothing on 32x32 inputs).
On images smaller than 32 px a pool that would shrink the map below 1x1 is skipped, so the same
network also runs on 8x8 digits; on 64x64 Tiny-ImageNet the 2x2 map is average-pooled.
"""
from __future__ import annotations

import torch
from torch import nn

from .head import Head

__all__ = ["VGG", "vgg16_bn"]

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with BN.

    Shape:
        (B, in_channels, image_size, image_size) -> (B, num_classes).
    """

    def __init__(self, layout=VGG16_LAYOUT, num_classes: int = 10, in_channels: int = 3,
                 image_size: int = 32) -> None:
        super().__init__()
        layers, cin, size = [], in_channels, image_size
        for item in layout:
            if item == "M":
                if size >= 2:              # never pool a 1x1 map away
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            layers += [nn.Conv2d(cin, item, 3, padding=1, bias=False), nn.BatchNorm2d(item),
                       nn.ReLU(inplace=True)]
            cin = item
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = Head(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def vgg16_bn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> VGG:
    """VGG-16-BN (14.7M parameters for 10 classes)."""
    return VGG(VGG16_LAYOUT, num_classes, in_channels, image_size)
