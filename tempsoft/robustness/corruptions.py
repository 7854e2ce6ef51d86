"""Common corruptions: CIFAR-10-C, CIFAR-100-C and Tiny-ImageNet-C (Hendrycks & Dietterich,
ICLR 2019), each with its own constants.

The 15 corruptions x 5 severities, generated inside the package with numpy, scipy and torch
(plus PIL's JPEG encoder and BOX resize, which the protocol itself uses): no ImageMagick, no
OpenCV, no external image assets.  The constants are chosen by the model's dataset (see
``benchmarks.py``), never by the image size:

* CIFAR-10 and CIFAR-100: ``make_cifar_c.py``'s table (32x32 images);
* Tiny-ImageNet: ``make_tinyimagenet_c.py``'s own table (64x64 images), its frost photos
  shrunk to 30% instead of 20%, and its output stored as JPEG at quality 85 (the released
  Tiny-ImageNet-C tree holds JPEG files saved with ``quality=85``), which is applied here too;
* any other dataset (digits, image folders): the CIFAR table, "generic", for any channel
  count and any image size of at least 4x4.  Generic constants measured in pixels (blur radii
  and sigmas, glass-blur displacement, motion lengths) grow by ``min(H, W) / 32`` above 32 px
  so a corruption covers the same fraction of a larger image; they are not shrunk below 32 px
  (the protocol's sub-pixel radii would collapse to the identity on 8x8 digits, so small
  images are corrupted relatively harder).  Constants the scripts state as fractions of the
  image (zoom factors, pixelation ratio, elastic constants) are never scaled.

What differs from the released files, and why:

* motion blur (and the streaks of snow) is ImageMagick's one-sided Gaussian line kernel
  re-implemented as a per-image line convolution (same taps, offsets and edge handling);
* frost blends procedurally generated frost textures instead of the six frost photographs,
  which are not shipped (see ``_frost.py``): frost numbers are not comparable with the released
  frost files;
* outputs are rounded to uint8 where the reference truncated (at most one gray level apart);
* random numbers come from numpy's PCG64, so individual noise draws differ from the released
  files while following the same distributions.

The released files themselves are loaded by ``released.py``; prefer them when you have them
(the benchmark's authors recommend it for deterministic, comparable numbers).

Determinism: ``corrupt(x, name, severity, seed, dataset=...)`` is a pure function of its
arguments.  The random stream depends on (seed, corruption, block of 2048 images) but not on
the severity, so the five severities of one image share their random draws wherever the
shapes agree (common random numbers make severity comparisons less noisy).
"""
from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import torch
from scipy import ndimage

from . import _image_ops as ops
from ._frost import BANK_SIZE, frost_bank
from .benchmarks import benchmark_for, check_image_shape

__all__ = ["CORRUPTIONS", "SEVERITIES", "corrupt", "corruption_constants", "CIFAR_C",
           "TINYIMAGENET_C"]

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 32      # generic: pixel constants below are for 32x32 images
MIN_SIZE = 4             # elastic_transform's affine needs three distinct anchor points
BLOCK = 2048             # images per random stream (bounds memory, keeps results chunk-free)

# Severity constants of make_cifar_c.py (hendrycks/robustness, ImageNet-C/create_c/),
# severity 1..5; also CIFAR-100-C's.
CIFAR_C = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),                      # noise std
    "shot_noise": (500, 250, 100, 75, 50),                                 # photons per unit
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),                       # s&p fraction
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # radius, alias
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),           # radius, sigma
    "zoom_blur": tuple(np.arange(1, stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # image, frost weight
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),         # amount, decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),                             # added to HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                               # kept contrast
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                          (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),  # alpha, sigma, affine (x size)
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                             # downscale ratio
    "jpeg_compression": (80, 65, 58, 50, 40),                              # JPEG quality
}

# Severity constants of make_tinyimagenet_c.py (same folder), for 64x64 images.
TINYIMAGENET_C = {
    "gaussian_noise": (0.04, 0.08, 0.12, 0.15, 0.18),
    "shot_noise": (250, 100, 50, 30, 15),
    "impulse_noise": (0.01, 0.02, 0.05, 0.08, 0.14),
    "defocus_blur": ((0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)),
    "glass_blur": ((0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)),
    "motion_blur": ((10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)),
    "zoom_blur": CIFAR_C["zoom_blur"],
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.8), (0.1, 0.2, 1, 0.5, 10, 4, 0.8),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6)),
    "frost": ((1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55)),
    "fog": ((0.4, 3), (0.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.3, 0.06), (0.1, 0.08, 0.06),
                          (0.1, 0.03, 0.03), (0.16, 0.03, 0.02)),
    "pixelate": (0.9, 0.8, 0.7, 0.6, 0.5),
    "jpeg_compression": (65, 58, 50, 40, 25),
}


@dataclasses.dataclass(frozen=True)
class _Protocol:
    """How one benchmark family generates its corrupted images.

    frost_zoom: size of the frost crystals relative to CIFAR-10-C's (the frost photos are
    shrunk to 20% for CIFAR and to 30% for Tiny-ImageNet before cropping, so crystals are 1.5x
    larger in Tiny-ImageNet pixels).  store_jpeg_quality: the released files were saved as
    JPEG at this quality (None: stored losslessly, .npy).
    """

    constants: dict
    frost_zoom: float
    store_jpeg_quality: int | None


_PROTOCOLS = {
    "cifar": _Protocol(CIFAR_C, frost_zoom=1.0, store_jpeg_quality=None),
    "tinyimagenet": _Protocol(TINYIMAGENET_C, frost_zoom=0.3 / 0.2, store_jpeg_quality=85),
}


def corruption_constants(name: str, severity: int, dataset=None):
    """The constant(s) of ``name`` at ``severity`` in the dataset's benchmark (None: generic,
    i.e. make_cifar_c.py's), for reports and tests.

    Example:
        >>> corruption_constants("contrast", 5, "tinyimagenet")
        0.05
    """
    _check(name, severity)
    return _PROTOCOLS[benchmark_for(dataset).family].constants[name][severity - 1]


# --------------------------------------------------------------------------- noise

def _gaussian_noise(x, std, rng, scale):
    return x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(std)


def _shot_noise(x, photons, rng, scale):
    return (rng.poisson(x.astype(np.float64) * photons) / photons).astype(np.float32)


def _impulse_noise(x, amount, rng, scale):
    # skimage.util.random_noise(mode="s&p"): every value (each channel on its own) is hit with
    # probability `amount`, half of the hits become 1 (salt) and half 0 (pepper).
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


# --------------------------------------------------------------------------- blur

def _disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c's disk(): an aliased disk on a 17x17 (or larger) grid, normalized, then
    smoothed by a 3x3 (5x5 past radius 8) Gaussian to anti-alias; zero rows/cols trimmed."""
    if radius <= 8:
        grid, taps = np.arange(-8, 9), 3
    else:
        grid, taps = np.arange(-math.ceil(radius), math.ceil(radius) + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    gauss = ops.gaussian_taps(taps, alias_blur)
    kernel = ndimage.convolve1d(ndimage.convolve1d(disk, gauss, axis=0, mode="mirror"),
                                gauss, axis=1, mode="mirror")
    keep_r = np.flatnonzero(kernel.max(axis=1) > 1e-12)
    keep_c = np.flatnonzero(kernel.max(axis=0) > 1e-12)
    return kernel[keep_r[0]:keep_r[-1] + 1, keep_c[0]:keep_c[-1] + 1]


def _defocus_blur(x, c, rng, scale):
    radius, alias_blur = c
    kernel = _disk_kernel(radius * scale, alias_blur * scale).astype(np.float32)
    return ndimage.correlate(x, kernel[None, None], mode="mirror")      # cv2.filter2D border


def _gaussian(x, sigma):
    """skimage.filters.gaussian(multichannel=True): spatial axes only, 'nearest' border."""
    return ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)


def _glass_blur(x, c, rng, scale):
    sigma, delta, iterations = c
    sigma *= scale
    delta = max(1, int(round(delta * scale)))
    n, _, height, width = x.shape
    # The reference quantizes (truncates) to uint8 between the blur and the shuffle.
    pixels = np.floor(_gaussian(x, sigma) * 255.0).astype(np.float32)
    batch = np.arange(n)
    for _ in range(iterations):
        # The reference sweeps from bottom-right to top-left and "swaps" each pixel with a
        # neighbour drawn from randint(-delta, delta) (high end excluded) via
        # `x[h, w], x[h2, w2] = x[h2, w2], x[h, w]`.  On numpy arrays the right-hand side holds
        # views, so that line copies the neighbour into (h, w) and leaves the neighbour as it
        # was: the released images show this local jitter, not a chain of swaps.  The same
        # sequential copy runs here, for all images of the batch at once.
        for h in range(height - delta, delta, -1):
            for w in range(width - delta, delta, -1):
                step = rng.integers(-delta, delta, size=(n, 2))
                pixels[batch, :, h, w] = pixels[batch, :, h + step[:, 1], w + step[:, 0]]
    return _gaussian(pixels / 255.0, sigma)


def _motion_blur(x, c, rng, scale):
    radius, sigma = c
    angles = rng.uniform(-45, 45, size=x.shape[0])
    blurred = ops.motion_blur(x, radius * scale, sigma * scale, angles)
    return np.rint(np.clip(blurred, 0, 1) * 255.0) / 255.0                # decoded from PNG


def _zoom_blur(x, factors, rng, scale):
    total = x.copy()
    for factor in factors:
        total += ops.clipped_zoom(x, float(factor))
    return total / (len(factors) + 1)


# --------------------------------------------------------------------------- weather

def _snow(x, c, rng, scale):
    loc, spread, zoom, threshold, radius, sigma, keep = c
    n, _, height, width = x.shape
    layer = rng.normal(loc, spread, size=(n, 1, height, width)).astype(np.float32)
    layer = ops.clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = np.rint(np.clip(layer, 0, 1) * 255.0) / 255.0                 # saved as PNG
    angles = rng.uniform(-135, -45, size=n)
    layer = ops.motion_blur(layer.astype(np.float32), radius * scale, sigma * scale, angles)
    layer = np.rint(np.clip(layer, 0, 1) * 255.0) / 255.0
    whitened = np.maximum(x, ops.luminance(x) * 1.5 + 0.5)
    out = keep * x + (1 - keep) * whitened
    return out + layer + layer[:, :, ::-1, ::-1]                          # + rot90(layer, 2)


def _frost(x, c, rng, scale, seed=0, zoom=1.0):
    image_weight, frost_weight = c
    n, channels, height, width = x.shape
    bank = frost_bank(seed, height, width, channels, zoom)
    # randint(5) in the reference: only the first five of its six photos are ever used.
    choice = rng.integers(BANK_SIZE - 1, size=n)
    top = rng.integers(0, bank.shape[2] - height, size=n)
    left = rng.integers(0, bank.shape[3] - width, size=n)
    rows = top[:, None] + np.arange(height)
    cols = left[:, None] + np.arange(width)
    crops = bank[choice[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return image_weight * x + frost_weight * np.moveaxis(crops, -1, 1)


def _fog(x, c, rng, scale):
    amount, decay = c
    n, _, height, width = x.shape
    mapsize = ops.next_power_of_two(max(height, width))
    fog = ops.plasma_fractal(rng, n, mapsize, decay)[:, None, :height, :width]
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + amount * fog) * peak / (peak + amount)


# --------------------------------------------------------------------------- digital

def _brightness(x, delta, rng, scale):
    return shift_value(x, delta)


def shift_value(x: np.ndarray, delta: float) -> np.ndarray:
    """Add ``delta`` to the HSV value channel, clipped to [0, 1], keeping hue and saturation.

    HSV -> RGB is linear in V for fixed H and S, so this is the reference's
    rgb2hsv / clip(V + c) / hsv2rgb round trip in closed form: every channel scales by V'/V
    (a black pixel, with S = 0, becomes gray V').  For one channel it is clip(x + delta).
    """
    value = x.max(axis=1, keepdims=True)
    new_value = np.clip(value + delta, 0.0, 1.0)
    ratio = np.divide(new_value, value, out=np.zeros_like(value), where=value > 0)
    return np.where(value > 0, x * ratio, new_value)


def _contrast(x, keep, rng, scale):
    means = x.mean(axis=(2, 3), keepdims=True)
    return (x - means) * keep + means


def _elastic_transform(x, c, rng, scale):
    n, _, height, width = x.shape
    size = min(height, width)
    alpha, sigma, affine = (v * size for v in c)
    warped = _random_affine(x, affine, rng)
    # Smooth random displacement fields (skimage gaussian: reflect border, truncate 3).
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(n, height, width)),
                                 sigma=(0, sigma, sigma), mode="reflect", truncate=3) * alpha
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(n, height, width)),
                                 sigma=(0, sigma, sigma), mode="reflect", truncate=3) * alpha
    rows = np.arange(height, dtype=np.float64)[None, :, None] + dy
    cols = np.arange(width, dtype=np.float64)[None, None, :] + dx
    return ops.bilinear_sample(warped, rows, cols, border="reflect")      # map_coordinates


def _random_affine(x, max_shift, rng):
    """cv2.getAffineTransform of three points jittered by U(-max_shift, max_shift), applied
    with bilinear sampling and a reflect-101 border (cv2.warpAffine defaults)."""
    n, _, height, width = x.shape
    centre = np.array([width // 2, height // 2], dtype=np.float64)                  # (x, y)
    half = min(height, width) // 3
    src = np.stack([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    dst = src[None] + rng.uniform(-max_shift, max_shift, size=(n, 3, 2))
    # Output pixel p comes from the source point M^-1 p, where M maps src -> dst; solving
    # [dst | 1] A = src gives that inverse directly.
    ones = np.ones((n, 3, 1))
    inverse = np.linalg.solve(np.concatenate([dst, ones], axis=2), np.broadcast_to(src, dst.shape))
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    points = np.stack([xs, ys, np.ones_like(xs)], axis=-1).astype(np.float64)     # (H, W, 3)
    source = np.einsum("hwk,nkj->nhwj", points, inverse)                          # (N,H,W,2)
    return ops.bilinear_sample(x, source[..., 1], source[..., 0], border="reflect101")


def _pixelate(x, ratio, rng, scale):
    from PIL import Image

    pixels = ops.to_uint8(x)
    n, channels, height, width = pixels.shape
    small = (max(1, int(width * ratio)), max(1, int(height * ratio)))
    out = np.empty_like(pixels)
    # PIL resamples each channel independently, so per-channel "L" images give the RGB result
    # for three channels and extend to any channel count.
    for i in range(n):
        for ch in range(channels):
            img = Image.fromarray(np.ascontiguousarray(pixels[i, ch]))  # 2-D uint8 -> "L"
            img = img.resize(small, Image.BOX).resize((width, height), Image.BOX)
            out[i, ch] = np.asarray(img)
    return ops.to_float(out)


def _jpeg_compression(x, c, rng, scale):
    return ops.to_float(_jpeg_batch(ops.to_uint8(x), quality=c))


def _jpeg_batch(pixels: np.ndarray, quality: int) -> np.ndarray:
    """Encode and decode every uint8 (C, H, W) image as JPEG (grayscale JPEG per channel when
    there are not three channels)."""
    out = np.empty_like(pixels)
    for i in range(pixels.shape[0]):
        if pixels.shape[1] == 3:
            out[i] = np.moveaxis(_jpeg_roundtrip(np.moveaxis(pixels[i], 0, -1), quality), -1, 0)
        else:
            for ch in range(pixels.shape[1]):
                out[i, ch] = _jpeg_roundtrip(pixels[i, ch], quality)
    return out


def _jpeg_roundtrip(array: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as img:
        return np.asarray(img.convert(img.mode))


_FUNCTIONS = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise, "defocus_blur": _defocus_blur, "glass_blur": _glass_blur,
    "motion_blur": _motion_blur, "zoom_blur": _zoom_blur, "snow": _snow, "frost": _frost,
    "fog": _fog, "brightness": _brightness, "contrast": _contrast,
    "elastic_transform": _elastic_transform, "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}


# --------------------------------------------------------------------------- public API

def _check(name: str, severity: int) -> None:
    if name not in CIFAR_C:
        raise ValueError(f"unknown corruption {name!r}; choose one of {list(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) \
            or severity not in SEVERITIES:
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")


def corrupt(images_uint8: torch.Tensor, name: str, severity: int, seed: int = 0, *,
            dataset=None) -> torch.Tensor:
    """Apply one corruption at one severity, with the constants of the dataset's benchmark.

    Args:
        images_uint8: uint8 tensor (N, C, H, W) or (C, H, W), any C >= 1, H and W >= 4.
        name: one of ``CORRUPTIONS``.
        severity: 1 (mildest) .. 5.
        seed: the result is a pure function of (images, name, severity, seed, dataset).
        dataset: the model's dataset (a name such as "cifar100", or an ImageDataset): its
            benchmark's constants (CIFAR-10-C / CIFAR-100-C / Tiny-ImageNet-C), whose images
            must then have the benchmark's size.  None (or a dataset without a benchmark):
            the generic protocol, make_cifar_c.py's constants for any image size.

    Returns:
        uint8 tensor of the same shape and device.

    Raises:
        TypeError: not a uint8 tensor.  ValueError: unknown name or dataset, bad severity,
        bad shape, or images of another size than the benchmark's.

    Example:
        >>> x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
        >>> corrupt(x, "fog", 3, seed=1, dataset="tinyimagenet").shape
        torch.Size([4, 3, 64, 64])
    """
    _check(name, severity)
    bench = benchmark_for(dataset)
    if not isinstance(images_uint8, torch.Tensor) or images_uint8.dtype != torch.uint8:
        got = (f"tensor of dtype {images_uint8.dtype}" if isinstance(images_uint8, torch.Tensor)
               else type(images_uint8).__name__)
        raise TypeError(f"corrupt expects a uint8 tensor, got {got}")
    single = images_uint8.dim() == 3
    batch = images_uint8.unsqueeze(0) if single else images_uint8
    if batch.dim() != 4 or min(batch.shape[2:]) < MIN_SIZE or batch.shape[1] < 1:
        raise ValueError(f"images must be (N, C, H, W) or (C, H, W) with H, W >= {MIN_SIZE}, "
                         f"got {tuple(images_uint8.shape)}")
    check_image_shape(bench, tuple(batch.shape[1:]), bench.corruption_name)
    protocol = _PROTOCOLS[bench.family]
    constants = protocol.constants[name][severity - 1]
    pixels = batch.detach().cpu().numpy()
    # Only the generic protocol rescales pixel constants; a benchmark's table is already for
    # its own image size.
    scale = max(1.0, min(pixels.shape[2:]) / REFERENCE_SIZE) if bench.image_size is None \
        else 1.0
    out = np.empty_like(pixels)
    index = CORRUPTIONS.index(name)
    for block, start in enumerate(range(0, pixels.shape[0], BLOCK)):
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, index,
                                                            block]))
        chunk = ops.to_float(pixels[start:start + BLOCK])
        if name == "frost":
            result = _frost(chunk, constants, rng, scale, seed=int(seed),
                            zoom=protocol.frost_zoom)
        else:
            result = _FUNCTIONS[name](chunk, constants, rng, scale)
        result = ops.to_uint8(result)
        if protocol.store_jpeg_quality is not None:
            result = _jpeg_batch(result, protocol.store_jpeg_quality)
        out[start:start + BLOCK] = result
    result = torch.from_numpy(out).to(images_uint8.device)
    return result[0] if single else result
