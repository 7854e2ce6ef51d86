"""Model zoo: every model takes images in [0, 1] and normalizes them itself.

Public API:
    MODELS: name -> builder, names "resnet18", "preact_resnet18", "vgg16_bn", "wrn28_10",
        "vit", "vit_tiny", "small_cnn", "cifar_cnn", "cifar_cnn_wide".
    build_model(name, num_classes, in_channels=3, image_size=32, mean=None, std=None)
    Normalize, NormalizedModel.
"""
from __future__ import annotations

from typing import Callable, Sequence

from torch import nn

from .cifar_cnn import CifarCNN, cifar_cnn, cifar_cnn_wide
from .head import Head
from .normalize import Normalize, NormalizedModel
from .resnet import PreActResNet, ResNet, preact_resnet18, resnet18
from .small_cnn import SmallCNN, small_cnn
from .vgg import VGG, vgg16_bn
from .vit import VIT_CONFIG, VIT_TINY_CONFIG, VisionTransformer, vit, vit_tiny
from .wrn import WideResNet, wrn28_10

__all__ = [
    "MODELS", "build_model", "Normalize", "NormalizedModel", "ResNet", "PreActResNet", "VGG",
    "WideResNet", "VisionTransformer", "SmallCNN", "CifarCNN", "Head", "VIT_CONFIG",
    "VIT_TINY_CONFIG",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "vgg16_bn": vgg16_bn,
    "wrn28_10": wrn28_10,
    "vit": vit,
    "vit_tiny": vit_tiny,
    "small_cnn": small_cnn,
    "cifar_cnn": cifar_cnn,
    "cifar_cnn_wide": cifar_cnn_wide,
}


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> NormalizedModel:
    """Build a classifier that takes images in [0, 1] and normalizes them inside.

    Args:
        name: one of ``MODELS``.
        num_classes: number of output logits.
        in_channels: image channels (1 for digits, 3 for CIFAR).
        image_size: input height = width (the ViT's patch size and VGG's pooling depend on it).
        mean, std: per-channel normalization (e.g. ``dataset.mean``); None means no shift
            (0) / no scaling (1). A single value is broadcast to every channel.

    Returns:
        NormalizedModel: ``model(x)`` maps (B, in_channels, image_size, image_size) floats in
        [0, 1] to (B, num_classes) logits; ``model.arch == name``.

    Raises:
        ValueError: unknown name, non-positive sizes, mean/std of the wrong length.

    Example:
        >>> model = build_model("small_cnn", 10, in_channels=1, image_size=8)
        >>> model(torch.rand(4, 1, 8, 8)).shape
        torch.Size([4, 10])
    """
    if not isinstance(name, str) or name.lower() not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    name = name.lower()
    _positive_int(num_classes, "num_classes")
    _positive_int(in_channels, "in_channels")
    _positive_int(image_size, "image_size")
    mean = _per_channel(mean, 0.0, in_channels, "mean")
    std = _per_channel(std, 1.0, in_channels, "std")
    net = MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    return NormalizedModel(net, mean, std, arch=name)


def _per_channel(values, default: float, channels: int, what: str) -> tuple[float, ...]:
    if values is None:
        return (default,) * channels
    if isinstance(values, (int, float)):
        return (float(values),) * channels
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} values {values} but the model has "
                         f"{channels} input channels")
    return values
