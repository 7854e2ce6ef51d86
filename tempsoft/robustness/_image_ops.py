"""Small image operations shared by the corruption and perturbation generators.

Arrays here are float32 numpy (N, C, H, W) in [0, 1] unless said otherwise.  Every sampler takes
continuous pixel coordinates with pixel centres at integers.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["bilinear_sample", "clipped_zoom", "gaussian_taps", "luminance", "motion_blur",
           "plasma_fractal", "reflect101", "reflect_half", "to_float", "to_uint8"]


def to_float(images_uint8: np.ndarray) -> np.ndarray:
    return images_uint8.astype(np.float32) / np.float32(255.0)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] and round to the nearest of 256 levels.

    The released CIFAR-10-C files were written with ``np.uint8(x)``, which truncates; rounding
    instead differs by at most one gray level and does not darken every image by half a level.
    """
    return np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def luminance(images: np.ndarray) -> np.ndarray:
    """(N, 1, H, W) gray level: ITU-R BT.601 weights for RGB (as cv2.COLOR_RGB2GRAY), the
    image itself for one channel, the channel mean otherwise."""
    channels = images.shape[1]
    if channels == 3:
        weights = np.array([0.299, 0.587, 0.114], dtype=np.float32).reshape(1, 3, 1, 1)
        return (images * weights).sum(axis=1, keepdims=True)
    return images.mean(axis=1, keepdims=True)


def gaussian_taps(size: int, sigma: float) -> np.ndarray:
    """Normalized 1-D Gaussian of odd length ``size`` (cv2.getGaussianKernel for sigma > 0)."""
    half = (size - 1) / 2.0
    taps = np.exp(-((np.arange(size) - half) ** 2) / (2.0 * max(sigma, 1e-6) ** 2))
    return taps / taps.sum()


# --------------------------------------------------------------------------- coordinate folding

def reflect101(coord: np.ndarray, size: int) -> np.ndarray:
    """Fold coordinates into [0, size-1] by mirroring about the edge pixel centres
    (``dcb|abcd|cba``: cv2 BORDER_REFLECT_101, scipy 'mirror')."""
    if size == 1:
        return np.zeros_like(coord)
    period = 2.0 * (size - 1)
    folded = np.mod(coord, period)
    return np.where(folded > size - 1, period - folded, folded)


def reflect_half(coord: np.ndarray, size: int) -> np.ndarray:
    """Fold coordinates by mirroring about the image edge (``dcba|abcd|dcba``: scipy
    'reflect'), then clamp to the pixel-centre range for interpolation."""
    folded = np.mod(coord + 0.5, 2.0 * size)
    folded = np.where(folded >= size, 2.0 * size - folded, folded) - 0.5
    return np.clip(folded, 0.0, size - 1)


def bilinear_sample(images: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                    border: str) -> np.ndarray:
    """Sample every image at its own coordinate grid with bilinear interpolation.

    The border rule folds the coordinates first; the interpolation itself is torch's
    ``grid_sample`` (align_corners=True: normalized -1 / +1 are the centres of the first / last
    pixel), which is exact bilinear interpolation and far faster than a numpy gather.

    Args:
        images: (N, C, H, W).
        rows, cols: (N, H', W') source coordinates for each output pixel (broadcastable).
        border: "reflect101", "reflect" (half-sample), "edge" or "zero" (black outside).

    Shape:
        returns (N, C, H', W') float32.
    """
    import torch

    n, _, height, width = images.shape
    if border == "reflect101":
        rows, cols = reflect101(rows, height), reflect101(cols, width)
    elif border == "reflect":
        rows, cols = reflect_half(rows, height), reflect_half(cols, width)
    elif border == "edge":
        rows, cols = np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)
    elif border != "zero":
        raise ValueError(f"unknown border {border!r}")
    rows = np.broadcast_to(rows, (n,) + np.shape(rows)[-2:])
    cols = np.broadcast_to(cols, (n,) + np.shape(cols)[-2:])
    grid = np.stack([2.0 * cols / max(width - 1, 1) - 1.0,
                     2.0 * rows / max(height - 1, 1) - 1.0], axis=-1)
    out = torch.nn.functional.grid_sample(
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)),
        torch.from_numpy(grid.astype(np.float32)), mode="bilinear",
        padding_mode="zeros" if border == "zero" else "border", align_corners=True)
    return out.numpy()


# --------------------------------------------------------------------------- zoom, motion, plasma

def zoom_matrix(in_size: int, factor: float) -> np.ndarray:
    """The linear map of ``scipy.ndimage.zoom(order=1)`` along one axis, as a matrix.

    scipy sizes the output round(in_size * factor) and reads output pixel j at input coordinate
    j * (in_size - 1) / (out_size - 1), interpolating linearly; as a matrix the zoom of a whole
    batch is two small matrix products instead of a generic N-d spline evaluation.

    Shape:
        (round(in_size * factor), in_size).
    """
    out_size = int(round(in_size * factor))
    coord = (np.arange(out_size) * ((in_size - 1) / (out_size - 1)) if out_size > 1
             else np.zeros(1))
    low = np.clip(np.floor(coord).astype(np.int64), 0, in_size - 1)
    high = np.clip(low + 1, 0, in_size - 1)
    frac = coord - low
    matrix = np.zeros((out_size, in_size))
    np.add.at(matrix, (np.arange(out_size), low), 1 - frac)
    np.add.at(matrix, (np.arange(out_size), high), frac)
    return matrix


def clipped_zoom(images: np.ndarray, factor: float) -> np.ndarray:
    """Zoom into the centre by ``factor`` >= 1 keeping the size (bilinear, as make_cifar_c).

    Crops the central ceil(H / factor) x ceil(W / factor) window, zooms it as
    ``scipy.ndimage.zoom(order=1)`` does and trims the overshoot, for the whole batch at once.

    Shape:
        (..., H, W) -> (..., H, W).
    """
    height, width = images.shape[-2:]
    crop_h, crop_w = int(math.ceil(height / factor)), int(math.ceil(width / factor))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    window = images[..., top:top + crop_h, left:left + crop_w]
    rows = zoom_matrix(crop_h, factor)
    cols = zoom_matrix(crop_w, factor)
    trim_h, trim_w = (rows.shape[0] - height) // 2, (cols.shape[0] - width) // 2
    rows = rows[trim_h:trim_h + height].astype(images.dtype)
    cols = cols[trim_w:trim_w + width].astype(images.dtype)
    return np.matmul(np.matmul(rows, window), cols.T)


def motion_blur(images: np.ndarray, radius: float, sigma: float,
                angles_deg: np.ndarray) -> np.ndarray:
    """Linear motion blur, as ImageMagick's MotionBlurImage, one angle per image.

    ImageMagick's kernel is one-sided: ``2 * ceil(radius) + 1`` taps with weights
    ``exp(-i^2 / (2 sigma^2))`` (normalized), tap i reading the pixel at offset
    ``(ceil(i cos a - 0.5), ceil(i sin a - 0.5))``, edge pixels repeated outside the image.
    Reproduced here as a line-kernel convolution with per-image offsets (no ImageMagick).

    Shape:
        images (N, C, H, W), angles_deg (N,) -> (N, C, H, W).
    """
    n, _, height, width = images.shape
    taps = 2 * int(math.ceil(radius)) + 1
    index = np.arange(taps, dtype=np.float64)
    weights = np.exp(-(index ** 2) / (2.0 * sigma * sigma))
    weights /= weights.sum()
    angles = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    dx = np.ceil(index[None, :] * np.cos(angles)[:, None] - 0.5).astype(np.int64)    # (N, T)
    dy = np.ceil(index[None, :] * np.sin(angles)[:, None] - 0.5).astype(np.int64)
    batch = np.arange(n)[:, None, None]
    base_r = np.arange(height)[None, :]
    base_c = np.arange(width)[None, :]
    out = np.zeros_like(images)
    for t in range(taps):
        rows = np.clip(base_r + dy[:, t:t + 1], 0, height - 1)                        # (N, H)
        cols = np.clip(base_c + dx[:, t:t + 1], 0, width - 1)                         # (N, W)
        shifted = images[batch, :, rows[:, :, None], cols[:, None, :]]                # (N,H,W,C)
        out += np.float32(weights[t]) * np.moveaxis(shifted, -1, 1)
    return out


def plasma_fractal(rng: np.random.Generator, count: int, mapsize: int,
                   wibble_decay: float) -> np.ndarray:
    """Diamond-square height maps in [0, 1], ``count`` of them at once.

    Same recurrence as make_cifar_c.py's plasma_fractal (itself from FLHerne/mapgen), batched
    over a leading axis: each midpoint is the mean of its neighbours plus
    ``wibble * U(-wibble, wibble)``, with wibble starting at 100 and divided by
    ``wibble_decay`` per octave.

    Shape:
        returns (count, mapsize, mapsize); mapsize must be a power of two.
    """
    if mapsize < 2 or mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two >= 2, got {mapsize}")
    maps = np.zeros((count, mapsize, mapsize), dtype=np.float64)
    step = mapsize
    wibble = 100.0

    def wibbled_mean(values):
        return values / 4 + wibble * rng.uniform(-wibble, wibble, values.shape)

    while step >= 2:
        half = step // 2
        corners = maps[:, 0:mapsize:step, 0:mapsize:step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        maps[:, half:mapsize:step, half:mapsize:step] = wibbled_mean(square)
        centres = maps[:, half:mapsize:step, half:mapsize:step]
        corners = maps[:, 0:mapsize:step, 0:mapsize:step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        maps[:, 0:mapsize:step, half:mapsize:step] = wibbled_mean(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        maps[:, half:mapsize:step, 0:mapsize:step] = wibbled_mean(top)
        step //= 2
        wibble /= wibble_decay
    maps -= maps.min(axis=(1, 2), keepdims=True)
    return maps / maps.max(axis=(1, 2), keepdims=True)


def next_power_of_two(value: int) -> int:
    return 1 << max(1, int(math.ceil(math.log2(max(value, 2)))))
