"""TrivialAugment, wide (Mueller & Hutter, "TrivialAugment: Tuning-free Yet State-of-the-Art
Data Augmentation", ICCV 2021), for whole uint8 batches on the device.

Each image gets one operation drawn uniformly from the fourteen below and one of 31 magnitudes
drawn uniformly; a signed operation's sign is a fair coin.  The operations, their magnitude
ranges and their uint8 arithmetic (truncating blends, rounded filters, nearest-neighbour
geometry with black fill) are those of torchvision's ``TrivialAugmentWide`` on tensors; here
every image of a batch has its own operation and magnitude and the batch is processed at once,
one group of images per operation, without a per-image Python loop.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OPS", "BINS", "magnitude", "trivial_augment", "draw"]

OPS = ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
       "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
       "autocontrast", "equalize")
BINS = 31
_SIGNED = {"shear_x", "shear_y", "translate_x", "translate_y", "rotate", "brightness",
           "color", "contrast", "sharpness"}
_GRAY = (0.2989, 0.587, 0.114)          # torchvision's rgb_to_grayscale weights


def _ranges() -> Tensor:
    """(len(OPS), BINS) magnitudes: torchvision TrivialAugmentWide._augmentation_space(31)."""
    table = torch.zeros(len(OPS), BINS, dtype=torch.float64)
    span = {"shear_x": (0.0, 0.99), "shear_y": (0.0, 0.99), "translate_x": (0.0, 32.0),
            "translate_y": (0.0, 32.0), "rotate": (0.0, 135.0), "brightness": (0.0, 0.99),
            "color": (0.0, 0.99), "contrast": (0.0, 0.99), "sharpness": (0.0, 0.99),
            "solarize": (255.0, 0.0)}
    for name, (low, high) in span.items():
        table[OPS.index(name)] = torch.linspace(low, high, BINS, dtype=torch.float64)
    # bits kept: 8 down to 2
    table[OPS.index("posterize")] = 8 - (torch.arange(BINS) / ((BINS - 1) / 6)).round()
    return table


_MAGNITUDES = _ranges()
_SIGN_OK = torch.tensor([name in _SIGNED for name in OPS])


def magnitude(ops: Tensor, bins: Tensor, negate: Tensor) -> Tensor:
    """Each image's magnitude (float64, CPU): the bin's value, negated for a signed op when
    ``negate``."""
    ops, bins, negate = ops.cpu(), bins.cpu(), negate.cpu()
    values = _MAGNITUDES[ops, bins]
    return torch.where(negate & _SIGN_OK[ops], -values, values)


def draw(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(ops, bins, negate) for n images from ``generator`` (CPU): uniform op, uniform bin,
    fair sign."""
    ops = torch.randint(0, len(OPS), (n,), generator=generator)
    bins = torch.randint(0, BINS, (n,), generator=generator)
    negate = torch.rand(n, generator=generator) < 0.5
    return ops, bins, negate


def trivial_augment(images: Tensor, ops: Tensor, bins: Tensor, negate: Tensor) -> Tensor:
    """Apply each image's operation.

    Args:
        images: uint8 (B, C, H, W), C = 1 or 3, on any device.
        ops: int64 (B,) indices into ``OPS``; bins: int64 (B,) in [0, BINS); negate: bool
            (B,) (see ``draw``).

    Returns:
        uint8 (B, C, H, W), a new tensor.

    Example:
        >>> x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        >>> ops = torch.tensor([0, 0, 0, 0])                 # identity
        >>> trivial_augment(x, ops, torch.zeros(4, dtype=torch.long),
        ...                 torch.zeros(4, dtype=torch.bool)).equal(x)
        True
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"trivial_augment needs uint8 images (B, 1 or 3, H, W), got "
                         f"{images.dtype} {tuple(images.shape)}")
    if not (ops.shape == bins.shape == negate.shape == images.shape[:1]):
        raise ValueError(f"ops, bins and negate need shape ({images.shape[0]},), got "
                         f"{tuple(ops.shape)}, {tuple(bins.shape)}, {tuple(negate.shape)}")
    values = magnitude(ops, bins, negate)
    out = images.clone()
    ops_cpu = ops.cpu()
    for index, name in enumerate(OPS):
        chosen = (ops_cpu == index).nonzero().flatten()
        if name == "identity" or chosen.numel() == 0:
            continue
        rows = chosen.to(images.device)
        out[rows] = _APPLY[name](images[rows], values[chosen])
    return out


# --------------------------------------------------------------------------- geometry

def _affine(images: Tensor, center_at_origin: bool, angle: Tensor, translate: Tensor,
            shear: Tensor) -> Tensor:
    """torchvision's F.affine (nearest, zero fill) with per-image parameters: angle (B,)
    degrees, translate (B, 2) pixels, shear (B, 2) degrees; about the image centre, or about
    the top-left corner when ``center_at_origin`` (the shears)."""
    b, _, h, w = images.shape
    rot, sx, sy = (torch.deg2rad(t.double()) for t in (angle, shear[:, 0], shear[:, 1]))
    a = torch.cos(rot - sy) / torch.cos(sy)
    bb = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    cx, cy = (-0.5 * w, -0.5 * h) if center_at_origin else (0.0, 0.0)
    tx, ty = translate[:, 0].double(), translate[:, 1].double()
    # The inverse map (torchvision's _get_inverse_affine_matrix; the determinant is 1 here).
    m0, m1, m3, m4 = d, -bb, -c, a
    m2 = m0 * (-cx - tx) + m1 * (-cy - ty) + cx
    m5 = m3 * (-cx - tx) + m4 * (-cy - ty) + cy
    theta = torch.stack([torch.stack([m0, m1, m2], 1), torch.stack([m3, m4, m5], 1)], 1)
    theta = theta.to(torch.float32).to(images.device)                      # (B, 2, 3)
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, device=images.device)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, device=images.device)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w),
                        torch.ones(h, w, device=images.device)], -1).view(1, h * w, 3)
    scale = torch.tensor([0.5 * w, 0.5 * h], device=images.device)
    grid = (base @ theta.transpose(1, 2)) / scale                           # (B, HW, 2)
    out = F.grid_sample(images.float(), grid.view(b, h, w, 2), mode="nearest",
                        padding_mode="zeros", align_corners=False)
    return out.round().to(torch.uint8)


def _zeros(values: Tensor, n: int = 1) -> Tensor:
    return torch.zeros(values.shape[0], n, dtype=torch.float64) if n > 1 else \
        torch.zeros(values.shape[0], dtype=torch.float64)


def _shear_x(x, v):
    shear = torch.stack([torch.rad2deg(torch.atan(v)), torch.zeros_like(v)], 1)
    return _affine(x, True, _zeros(v), _zeros(v, 2), shear)


def _shear_y(x, v):
    shear = torch.stack([torch.zeros_like(v), torch.rad2deg(torch.atan(v))], 1)
    return _affine(x, True, _zeros(v), _zeros(v, 2), shear)


def _translate_x(x, v):
    shift = torch.stack([v.trunc(), torch.zeros_like(v)], 1)              # int(magnitude)
    return _affine(x, False, _zeros(v), shift, _zeros(v, 2))


def _translate_y(x, v):
    shift = torch.stack([torch.zeros_like(v), v.trunc()], 1)
    return _affine(x, False, _zeros(v), shift, _zeros(v, 2))


def _rotate(x, v):
    return _affine(x, False, -v, _zeros(v, 2), _zeros(v, 2))    # F.rotate passes -angle


# --------------------------------------------------------------------------- colour

def _blend(x: Tensor, other: Tensor, v: Tensor) -> Tensor:
    """torchvision's _blend with factor 1 + v: ratio * x + (1 - ratio) * other in float32,
    clamped, truncated to uint8; ratio and 1 - ratio are formed in float64 and rounded to
    float32 once each, as Python floats are there."""
    ratio = 1.0 + v.double()
    shape = (-1, 1, 1, 1)
    keep = ratio.to(torch.float32).to(x.device).view(shape)
    mix = (1.0 - ratio).to(torch.float32).to(x.device).view(shape)
    return (keep * x + mix * other).clamp(0, 255).to(torch.uint8)


def _gray(x: Tensor) -> Tensor:
    """(B, 1, H, W) uint8 luma, truncated like torchvision's rgb_to_grayscale."""
    if x.shape[1] == 1:
        return x.clone()
    r, g, b = x.float().unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).to(torch.uint8).unsqueeze(1)


def _brightness(x, v):
    return _blend(x, torch.zeros_like(x, dtype=torch.float32), v)


def _color(x, v):
    if x.shape[1] == 1:
        return x.clone()
    return _blend(x, _gray(x).float(), v)


def _contrast(x, v):
    mean = _gray(x).float().mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, v)


def _sharpness(x, v):
    if x.shape[2] <= 2 or x.shape[3] <= 2:
        return x.clone()
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5.0
    kernel = (kernel / kernel.sum()).expand(x.shape[1], 1, 3, 3)
    smooth = F.conv2d(x.float(), kernel, groups=x.shape[1]).round()
    blurred = x.float().clone()
    blurred[:, :, 1:-1, 1:-1] = smooth                   # the border keeps its pixels
    return _blend(x, blurred, v)


def _posterize(x, v):
    bits = v.to(torch.int64).to(x.device).view(-1, 1, 1, 1)
    mask = (256 - 2 ** (8 - bits)).to(torch.uint8)       # ~(2^(8 - bits) - 1) in 8 bits
    return x & mask


def _solarize(x, v):
    threshold = v.to(torch.float32).to(x.device).view(-1, 1, 1, 1)
    return torch.where(x.float() >= threshold, 255 - x, x)


def _autocontrast(x, v):
    low = x.amin(dim=(2, 3), keepdim=True).float()
    high = x.amax(dim=(2, 3), keepdim=True).float()
    flat = high == low
    scale = torch.where(flat, torch.ones_like(high), 255.0 / (high - low).clamp_min(1e-12))
    low = torch.where(flat, torch.zeros_like(low), low)
    return ((x.float() - low) * scale).clamp(0, 255).to(torch.uint8)


def _equalize(x, v):
    """torchvision's per-channel equalize: a lookup table from the cumulative histogram with
    step = (pixels outside the highest occupied bin) // 255; step 0 leaves the channel."""
    b, c, h, w = x.shape
    flat = x.reshape(b * c, h * w).to(torch.int64)
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    levels = torch.arange(256, device=x.device)
    top = torch.where(hist > 0, levels, -1).amax(dim=1, keepdim=True)     # highest occupied
    step = (h * w - hist.gather(1, top)) // 255                           # (BC, 1)
    safe = step.clamp_min(1)
    lut = (torch.cumsum(hist, 1) + step // 2) // safe
    lut = torch.cat([torch.zeros_like(lut[:, :1]), lut[:, :-1]], 1).clamp(0, 255)
    lut = torch.where(step == 0, levels.expand(b * c, 256), lut)
    return lut.gather(1, flat).to(torch.uint8).view(b, c, h, w)


_APPLY = {"shear_x": _shear_x, "shear_y": _shear_y, "translate_x": _translate_x,
          "translate_y": _translate_y, "rotate": _rotate, "brightness": _brightness,
          "color": _color, "contrast": _contrast, "sharpness": _sharpness,
          "posterize": _posterize, "solarize": _solarize, "autocontrast": _autocontrast,
          "equalize": _equalize}
assert set(_APPLY) | {"identity"} == set(OPS)
