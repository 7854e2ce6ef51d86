"""The spatter perturbation of CIFAR-10-P / Tiny-ImageNet-P (make_cifar_p.py's "Spatter Code"),
without OpenCV.

Each image gets a random liquid layer (Gaussian noise, smoothed, thresholded); every frame the
liquid's edges are found (Canny), turned into a shading map (distance to the nearest edge,
truncated at 20, box-blurred, histogram-equalized, embossed, box-blurred again), and pale
turquoise water is painted where the liquid is, in proportion to liquid x shading; between
frames the liquid flows one row down (each row becomes 0.2 of itself + 0.8 of the row above).

The OpenCV steps are re-implemented on the same integer and rounding conventions (Sobel on
replicated borders, L1 gradient, cv2's non-maximum suppression and hysteresis, the 5x5 chamfer
distance of distanceTransform(DIST_L2, 5) in 16-bit fixed point, equalizeHist's float32 lookup
table, BORDER_REFLECT_101 box and kernel filters with uint8 saturation): given the same liquid
layer, a frame equals the OpenCV pipeline's (checked against OpenCV where it is installed).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["liquid_layers", "spatter_frame", "flow"]

CANNY_LOW, CANNY_HIGH = 50, 150          # cv2.Canny(liquid, 50, 150)
DISTANCE_CAP = 20.0                      # cv2.threshold(dist, 20, 20, THRESH_TRUNC)
EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
WATER = (175 / 255.0, 238 / 255.0, 238 / 255.0)   # pale turquoise, in the image's channel order
FLOW = (0.2, 0.8)                        # np.convolve(column, [0.2, 0.8], mode="same")
_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)   # cv2 canny.cpp, CANNY_SHIFT 15
# cv2 distransform.cpp: DIST_L2 with a 5x5 mask uses the chamfer weights 1, 1.4, 2.1969,
# each as a 16-bit fixed-point integer (DIST_SHIFT).
_DIST_SHIFT = 16
_HV, _DIAG, _LONG = (int(round(w * (1 << _DIST_SHIFT))) for w in (1.0, 1.4, 2.1969))
# (row, col) offsets of the forward pass's neighbours and their weights; the backward pass
# uses the mirrored offsets.
_CHAMFER = ((-2, -1, _LONG), (-2, 1, _LONG), (-1, -2, _LONG), (-1, -1, _DIAG), (-1, 0, _HV),
            (-1, 1, _DIAG), (-1, 2, _LONG), (0, -1, _HV))


def liquid_layers(rng: np.random.Generator, n: int, height: int, width: int, loc: float,
                  spread: float, sigma: float, threshold: float) -> np.ndarray:
    """(n, H, W) float64: N(loc, spread) noise, Gaussian-smoothed (skimage's default 'nearest'
    border, truncate 4), zero below ``threshold``."""
    liquid = rng.normal(loc, spread, size=(n, height, width))
    liquid = ndimage.gaussian_filter(liquid, sigma=(0, sigma, sigma), mode="nearest",
                                     truncate=4.0)
    liquid[liquid < threshold] = 0.0
    return liquid


def flow(liquid: np.ndarray) -> np.ndarray:
    """One frame later: each row is 0.2 of itself plus 0.8 of the row above (row 0 loses it)."""
    out = FLOW[0] * liquid
    out[:, 1:] += FLOW[1] * liquid[:, :-1]
    return out


def spatter_frame(x: np.ndarray, liquid: np.ndarray, opacity: float) -> np.ndarray:
    """Paint the water of ``liquid`` (n, H, W) onto images ``x`` (n, C, H, W) in [0, 1]."""
    # (liquid * 255).astype(uint8) in the reference; the clip only guards against wrap-around.
    level = np.clip(liquid * 255.0, 0, 255).astype(np.uint8)
    shade = _shading(level)
    mask = level.astype(np.float32) * shade
    peak = mask.max(axis=(1, 2), keepdims=True)
    # An image without any liquid has an all-zero mask: no water (the reference divides 0/0).
    mask = np.divide(mask, peak, out=np.zeros_like(mask), where=peak > 0) * np.float32(opacity)
    channels = x.shape[1]
    water = np.asarray(WATER if channels == 3 else (float(np.mean(WATER)),) * channels,
                       dtype=np.float32)
    return np.clip(x + mask[:, None] * water[None, :, None, None], 0.0, 1.0)


def _shading(level: np.ndarray) -> np.ndarray:
    edges = canny(level, CANNY_LOW, CANNY_HIGH)
    dist = np.minimum(chamfer_distance(edges), DISTANCE_CAP)
    # cv2 sums in float64 and stores the mean as float32; .astype(uint8) then truncates
    dist = _box3(dist).astype(np.float32).astype(np.uint8)
    dist = equalize_hist(dist)
    dist = _saturate(ndimage.correlate(dist.astype(np.float64), EMBOSS[None], mode="mirror"))
    return _saturate(_box3(dist.astype(np.float64))).astype(np.float32)


def chamfer_distance(zeros: np.ndarray) -> np.ndarray:
    """cv2.distanceTransform(src, DIST_L2, 5) for each image of a (n, H, W) batch whose zero
    pixels are ``zeros`` (True): two raster passes of the 5x5 chamfer mask in fixed point.
    Pixels of an image without any zero get a distance far above the spatter's cap.

    Within a row, the only dependency of the forward pass on the same row is the left
    neighbour, d[j] = min(t[j], d[j - 1] + a), whose solution is the running minimum
    d[j] = j a + min_{k <= j} (t[k] - k a): one accumulate per row instead of a loop over
    pixels (likewise right to left in the backward pass).
    """
    n, height, width = zeros.shape
    far = np.int64(1) << 40
    pad = np.full((n, height + 4, width + 4), far, dtype=np.int64)
    pad[:, 2:-2, 2:-2] = np.where(zeros, 0, far)
    cols = np.arange(width + 4, dtype=np.int64) * _HV
    inner = slice(2, width + 2)
    for i in range(2, height + 2):                        # top to bottom
        best = pad[:, i, inner].copy()
        for di, dj, w in _CHAMFER[:-1]:                    # the rows above
            best = np.minimum(best, pad[:, i + di, 2 + dj:width + 2 + dj] + w)
        row = np.full((n, width + 4), far, dtype=np.int64)
        row[:, inner] = best
        pad[:, i, inner] = (np.minimum.accumulate(row - cols, axis=1) + cols)[:, inner]
    for i in range(height + 1, 1, -1):                    # bottom to top
        best = pad[:, i, inner].copy()
        for di, dj, w in _CHAMFER[:-1]:                    # the rows below (mirrored)
            best = np.minimum(best, pad[:, i - di, 2 - dj:width + 2 - dj] + w)
        row = np.full((n, width + 4), far, dtype=np.int64)
        row[:, inner] = best
        flipped = (row + cols)[:, ::-1]
        pad[:, i, inner] = (np.minimum.accumulate(flipped, axis=1)[:, ::-1] - cols)[:, inner]
    return (pad[:, 2:-2, 2:-2] * np.float32(1.0 / (1 << _DIST_SHIFT))).astype(np.float32)


def _box3(a: np.ndarray) -> np.ndarray:
    """cv2.blur(a, (3, 3)): normalized 3x3 box, BORDER_REFLECT_101, per image."""
    return ndimage.uniform_filter(a.astype(np.float64), size=(1, 3, 3), mode="mirror")


def _saturate(a: np.ndarray) -> np.ndarray:
    """cv2's saturate_cast<uchar>: round half to even, clip to [0, 255]."""
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def equalize_hist(images: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist for each uint8 (H, W) image of a (n, H, W) batch."""
    n = images.shape[0]
    flat = images.reshape(n, -1)
    total = flat.shape[1]
    out = np.empty_like(flat)
    for i in range(n):
        hist = np.bincount(flat[i], minlength=256)
        first = int(np.flatnonzero(hist)[0])
        if hist[first] == total:
            out[i] = first                          # a constant image stays as it is
            continue
        # cv2 forms the scale and each product in float32
        scale = np.float32(255.0) / np.float32(total - hist[first])
        lut = _saturate((np.cumsum(hist) - hist[first]).astype(np.float32) * scale)
        lut[first] = 0
        out[i] = lut[flat[i]]
    return out.reshape(images.shape)


def canny(images: np.ndarray, low: float, high: float) -> np.ndarray:
    """cv2.Canny(image, low, high) (aperture 3, L1 gradient) for a (n, H, W) uint8 batch.

    Sobel derivatives on replicated borders, magnitude |dx| + |dy|; non-maximum suppression
    along the gradient direction quantized with tan(22.5 deg) in cv2's fixed point; pixels
    above ``high`` are edges, and pixels above ``low`` that survive suppression join them when
    8-connected to one.
    """
    a = np.pad(images.astype(np.int64), ((0, 0), (1, 1), (1, 1)), mode="edge")
    dx = (a[:, :-2, 2:] + 2 * a[:, 1:-1, 2:] + a[:, 2:, 2:]
          - a[:, :-2, :-2] - 2 * a[:, 1:-1, :-2] - a[:, 2:, :-2])
    dy = (a[:, 2:, :-2] + 2 * a[:, 2:, 1:-1] + a[:, 2:, 2:]
          - a[:, :-2, :-2] - 2 * a[:, :-2, 1:-1] - a[:, :-2, 2:])
    mag = np.abs(dx) + np.abs(dy)
    m = np.pad(mag, ((0, 0), (1, 1), (1, 1)))          # cv2's magnitude rows have zero borders
    left, right = m[:, 1:-1, :-2], m[:, 1:-1, 2:]
    up, down = m[:, :-2, 1:-1], m[:, 2:, 1:-1]
    same_sign = (dx ^ dy) >= 0
    diag_before = np.where(same_sign, m[:, :-2, :-2], m[:, :-2, 2:])
    diag_after = np.where(same_sign, m[:, 2:, 2:], m[:, 2:, :-2])
    ax, ay = np.abs(dx), np.abs(dy) << 15
    tg22x = ax * _TG22
    tg67x = tg22x + (ax << 16)
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    diagonal = ~horizontal & ~vertical
    keep = ((horizontal & (mag > left) & (mag >= right))
            | (vertical & (mag > up) & (mag >= down))
            | (diagonal & (mag > diag_before) & (mag > diag_after)))
    candidate = keep & (mag > int(np.floor(low)))
    strong = candidate & (mag > int(np.floor(high)))
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True                                  # 8-connected within an image only
    labels, count = ndimage.label(candidate, structure=structure)
    if count == 0:
        return np.zeros(images.shape, dtype=bool)
    reached = np.zeros(count + 1, dtype=bool)
    reached[np.unique(labels[strong])] = True
    reached[0] = False
    return reached[labels]
