"""Procedural frost textures, standing in for the six frost photographs of CIFAR-10-C.

make_cifar_c.py blends each image with a random 32x32 crop of one of six frost photos
(frost1.png ... frost6.jpg, shrunk to 20%).  Those photos are external assets that this package
does not ship, so the frost corruption here draws its crops from a bank of six generated
textures instead: ice-crystal needles with 60-degree side branches (the dendritic habit of
window frost) over a low-frequency diamond-square haze, slightly blurred and tinted blue-white.
The blend and the severity constants are the protocol's; the texture statistics (mean about
0.45, crystal edges a few pixels apart at CIFAR scale) were chosen to resemble the photos, but
the pixels differ, so frost numbers are comparable with each other, not with the released
CIFAR-10-C frost files.  Tiny-ImageNet-C shrinks the same photos to 30% before cropping, so its
crystals are 1.5x larger in pixels: ``frost_bank(..., zoom=1.5)``.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage

from ._image_ops import next_power_of_two, plasma_fractal, zoom_matrix

__all__ = ["frost_bank", "BANK_SIZE", "BANK_SCALE"]

BANK_SIZE = 6          # six textures, like the six photos
BANK_SCALE = 5         # each texture is 5x the image side (the photos were ~160-200 px)
SUPERSAMPLE = 2        # draw needles at 2x and box-average: anti-aliased lines
NEEDLES_PER_AREA = 1 / 260.0   # main needles per output pixel^2
TINT = (0.84, 0.92, 1.0)       # blue-white, RGB
TARGET_MEAN = 0.45


def _needle_segments(rng: np.random.Generator, size: int) -> np.ndarray:
    """(K, 5) segments (row, col, angle, length, brightness) in supersampled pixels: main
    needles plus 60-degree side branches spaced along them."""
    count = max(4, int(size * size * NEEDLES_PER_AREA / SUPERSAMPLE ** 2))
    rows = rng.uniform(0, size, count)
    cols = rng.uniform(0, size, count)
    angles = rng.uniform(0, math.pi, count)
    lengths = rng.uniform(0.08, 0.3, count) * size
    bright = rng.uniform(0.5, 1.0, count)
    segments = [np.stack([rows, cols, angles, lengths, bright], axis=1)]
    for i in range(count):
        spacing = rng.uniform(3.0, 6.0) * SUPERSAMPLE
        positions = np.arange(spacing, lengths[i], spacing)
        if positions.size == 0:
            continue
        sides = rng.choice([-1.0, 1.0], positions.size)
        branch_angle = angles[i] + sides * math.pi / 3
        branch_len = (lengths[i] - positions) * rng.uniform(0.15, 0.4, positions.size)
        segments.append(np.stack([
            rows[i] + positions * math.sin(angles[i]),
            cols[i] + positions * math.cos(angles[i]),
            branch_angle, branch_len, bright[i] * rng.uniform(0.5, 0.9, positions.size)],
            axis=1))
    return np.concatenate(segments)


def _rasterize(segments: np.ndarray, size: int) -> np.ndarray:
    """Accumulate segment brightness on a size x size grid, one sample per half pixel."""
    grid = np.zeros((size, size), dtype=np.float64)
    steps = np.maximum(2, np.ceil(segments[:, 3] * 2).astype(np.int64))
    owner = np.repeat(np.arange(len(segments)), steps)
    offset = np.arange(owner.size) - np.repeat(np.cumsum(steps) - steps, steps)
    t = offset / np.repeat(steps - 1, steps) * segments[owner, 3]
    r = np.mod(np.rint(segments[owner, 0] + t * np.sin(segments[owner, 2])), size).astype(int)
    c = np.mod(np.rint(segments[owner, 1] + t * np.cos(segments[owner, 2])), size).astype(int)
    np.maximum.at(grid, (r, c), segments[owner, 4])
    return grid


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """One (size, size) frost intensity map in [0, 1] with mean ~TARGET_MEAN."""
    fine = size * SUPERSAMPLE
    needles = _rasterize(_needle_segments(rng, fine), fine)
    needles = ndimage.gaussian_filter(needles, 0.6 * SUPERSAMPLE, mode="wrap")
    needles = needles.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    needles /= max(np.quantile(needles, 0.995), 1e-6)
    mapsize = next_power_of_two(size)
    haze = plasma_fractal(rng, 1, mapsize, 1.8)[0, :size, :size]
    texture = np.clip(0.55 * haze + 0.9 * needles, 0.0, 1.0)
    # Rescale toward the photos' brightness without clipping the bright crystal edges.
    return np.clip(texture * (TARGET_MEAN / max(texture.mean(), 1e-6)), 0.0, 1.0)


@functools.lru_cache(maxsize=8)
def frost_bank(seed: int, height: int, width: int, channels: int,
               zoom: float = 1.0) -> np.ndarray:
    """BANK_SIZE frost textures, (BANK_SIZE, channels, BANK_SCALE*height, BANK_SCALE*width)
    float32 in [0, 1], a pure function of its arguments (cached).

    ``zoom`` > 1 draws the textures at 1/zoom of the size and enlarges them bilinearly, so the
    crystals are ``zoom`` times larger in pixels (Tiny-ImageNet-C shrinks its frost photos to
    30% where CIFAR-10-C shrinks them to 20%: zoom 1.5).
    """
    if not (zoom >= 1.0 and math.isfinite(zoom)):
        raise ValueError(f"zoom must be a finite number >= 1, got {zoom!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xF7057]))
    side = BANK_SCALE * max(height, width)
    drawn = int(math.ceil(side / zoom))
    maps = np.stack([_texture(rng, drawn) for _ in range(BANK_SIZE)])
    if drawn != side:
        resize = zoom_matrix(drawn, side / drawn)[:side]
        maps = np.clip(np.matmul(np.matmul(resize, maps), resize.T), 0.0, 1.0)
    maps = maps[:, None, :BANK_SCALE * height, :BANK_SCALE * width]
    if channels == 3:
        tint = np.asarray(TINT).reshape(1, 3, 1, 1)
    else:
        tint = np.full((1, channels, 1, 1), float(np.mean(TINT)))
    bank = (maps * tint).astype(np.float32)
    bank.setflags(write=False)
    return bank
