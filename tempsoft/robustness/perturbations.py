"""Natural perturbation sequences (CIFAR-10-P, CIFAR-100-P, Tiny-ImageNet-P), flip probability,
and CIFAR-10.1.

CIFAR-10-P (Hendrycks & Dietterich, ICLR 2019) turns each test image into a short video whose
frames change a little at a time; a stable classifier keeps its prediction.  Each benchmark
has its own generator script and constants, chosen here by the model's dataset (see
``benchmarks.py``), and its own evaluated set of ten sequences:

* CIFAR-10-P / CIFAR-100-P: make_cifar_p.py's parameters; the ten sequences that
  cifar-p-eval.py scores (``PERTURBATIONS``);
* Tiny-ImageNet-P: make_tinyimagenet_p.py's parameters; the ten test sequences of its "Test
  Data" section, which has snow where CIFAR-10-P's evaluation has spatter;
* other datasets: the CIFAR parameters ("generic"), with the translation range and the pixel
  constants (blur lengths, spatter smoothing) grown in proportion above 32 px.

======================== ====== =================================== ==============================
sequence                 frames CIFAR-10-P frame i                  Tiny-ImageNet-P frame i
======================== ====== =================================== ==============================
gaussian_noise           31     clean, then x + N(0, 0.02^2) anew   std 0.025
shot_noise               31     clean, then Poisson(700 x) / 700    Poisson(500 x) / 500
motion_blur              21/31  radius 6, sigma 1.8, angle (i-20)*9 radius 14, sigma 3, (i-30)*5
zoom_blur                31     mean of x and zooms 1 + 0.004 j,    the same
                                j = 1..i
spatter                  31     liquid N(0.6, 0.265), sigma 1.75,   N(0.6, 0.25) (not evaluated)
                                > 0.7, water 0.6, flowing down
snow                     31     (not evaluated)                     layer N(0.05, 0.28) x2 zoom,
                                                                    > 0.5, blur r 10 s 2.5 at
                                                                    angle 4 i - 150, keep 0.85
brightness               31     HSV value + (i - 15) * 1.5 / 100    (i - 15) * 2 / 100
translate                16/31  shift by i - 7 px (nearest, black)  i - 15 px
rotate                   31     rotate i - 15 degrees (bilinear)    the same
tilt                     31     perspective tilt 0.75 (i - 15) deg  (i - 15) deg about both axes
                                about both axes
scale                    31     zoom (2 i + 70) / 100 (bilinear)    (2.5 i + 40) / 100
======================== ====== =================================== ==============================

(CIFAR-10-P's make script also has snow, with N(0.05, 0.3), blur sigma 2: available by name.)
Where the generation differs from the released files: noise draws come from numpy's PCG64;
values are rounded to uint8 where the scripts truncated; motion blur is ImageMagick's kernel
re-implemented (see ``_image_ops.motion_blur``), spatter's OpenCV steps likewise (see
``_spatter.py``); Tiny-ImageNet-P's scripts blur and translate the full-size source photo
before resizing it to 64 px, where this generator only has the 64x64 test image (so its motion
blur is relatively longer, and translation brings in black instead of more photo); the released
Tiny-ImageNet-P videos are H.264-compressed.  Prefer the released files (``released.py``).

Flip probability (``flip_probability``) is the fraction of consecutive frame pairs whose top-1
prediction differs, averaged over sequences; for the noise sequences each frame is compared
with the first (clean) frame instead, as in the reference evaluation (cifar-p-eval.py: every
sequence whose name contains "noise").
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import _image_ops as ops
from . import _spatter
from .benchmarks import benchmark_for, check_image_shape
from .corruptions import shift_value

__all__ = ["PERTURBATIONS", "SEQUENCES", "CIFAR_P", "TINYIMAGENET_P",
           "perturbation_names", "sequence_length", "make_sequence", "flip_probability", "sequence_predictions",
           "load_cifar101"]

REFERENCE_SIZE = 32


@dataclasses.dataclass(frozen=True)
class _Sweep:
    """One sequence kind of one benchmark: frame count, the parameter of the first and last
    frame (evenly spaced between; None for sequences without a swept parameter) and its other
    constants."""

    frames: int
    first: float | None = None
    last: float | None = None
    constants: tuple = ()


# make_cifar_p.py (hendrycks/robustness, ImageNet-P/create_p/), frames i = 0 .. frames-1.
CIFAR_P = {
    "gaussian_noise": _Sweep(31, constants=(0.02,)),                   # std
    # photons; the first of the script's three shot-noise settings (700, 400, 200), as
    # gaussian_noise.npy holds the first of 0.02, 0.04, 0.06
    "shot_noise": _Sweep(31, constants=(700,)),
    "motion_blur": _Sweep(21, -180.0, 0.0, (6, 1.8)),                  # angle; radius, sigma
    "zoom_blur": _Sweep(31, 1.0, 1.12),                                # zoom 1 + 0.004 i
    "spatter": _Sweep(31, constants=(0.6, 0.265, 1.75, 0.7, 0.6)),     # loc, std, sigma,
                                                                       # threshold, opacity
    "snow": _Sweep(31, -150.0, -30.0, (0.05, 0.3, 2, 0.5, 10, 2, 0.85)),  # angle; loc, std,
                                                 # zoom, threshold, radius, sigma, kept image
    "brightness": _Sweep(31, -0.225, 0.225),                           # (i - 15) * 1.5 / 100
    "translate": _Sweep(16, -7.0, 8.0),                                # pixels
    "rotate": _Sweep(31, -15.0, 15.0),                                 # degrees
    "tilt": _Sweep(31, -11.25, 11.25),                                 # 0.75 (i - 15) degrees
    "scale": _Sweep(31, 0.70, 1.30),                                   # (2 i + 70) / 100
}
# make_tinyimagenet_p.py (same folder), for 64x64 images.
TINYIMAGENET_P = {
    "gaussian_noise": _Sweep(31, constants=(0.025,)),
    "shot_noise": _Sweep(31, constants=(500,)),
    "motion_blur": _Sweep(31, -150.0, 0.0, (14, 3)),                   # (i - 30) * 5
    "zoom_blur": _Sweep(31, 1.0, 1.12),
    "spatter": _Sweep(31, constants=(0.6, 0.25, 1.75, 0.7, 0.6)),
    "snow": _Sweep(31, -150.0, -30.0, (0.05, 0.28, 2, 0.5, 10, 2.5, 0.85)),
    "brightness": _Sweep(31, -0.3, 0.3),                               # (i - 15) * 2 / 100
    "translate": _Sweep(31, -15.0, 15.0),
    "rotate": _Sweep(31, -15.0, 15.0),
    "tilt": _Sweep(31, -15.0, 15.0),
    "scale": _Sweep(31, 0.40, 1.15),                                   # (2.5 i + 40) / 100
}
_TABLES = {"cifar": CIFAR_P, "tinyimagenet": TINYIMAGENET_P}
# The sequences each benchmark scores: cifar-p-eval.py's list; make_tinyimagenet_p.py's test
# sequences (the ImageNet-P test set of the paper).
_EVALUATED = {
    "cifar": ("gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "spatter",
              "brightness", "translate", "rotate", "tilt", "scale"),
    "tinyimagenet": ("gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow",
                     "brightness", "translate", "rotate", "tilt", "scale"),
}
PERTURBATIONS = _EVALUATED["cifar"]
SEQUENCES = tuple(CIFAR_P)


def perturbation_names(dataset=None) -> tuple[str, ...]:
    """The ten sequences the dataset's benchmark evaluates (None: generic = CIFAR-10-P's).

    Example:
        >>> perturbation_names("tinyimagenet")[4]
        'snow'
    """
    return _EVALUATED[benchmark_for(dataset).family]


def sequence_length(name: str, dataset=None) -> int:
    """Frames of the ``name`` sequence in the dataset's benchmark (make_sequence's default).

    Example:
        >>> sequence_length("translate", "cifar10"), sequence_length("translate",
        ...                                                           "tinyimagenet")
        (16, 31)
    """
    table = _TABLES[benchmark_for(dataset).family]
    if name not in table:
        raise ValueError(f"unknown perturbation {name!r}; choose one of {list(table)}")
    return table[name].frames


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = (f"tensor of dtype {images.dtype}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise TypeError(f"expected a uint8 image tensor, got {got}")
    if images.dim() != 4 or min(images.shape[2:]) < 2:
        raise ValueError(f"images must be (N, C, H, W) with H, W >= 2, got "
                         f"{tuple(images.shape)}")
    return images


# --------------------------------------------------------------------------- geometry

def _warp(x: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Output pixel (col, row, 1) reads the source at the 3x3 homography ``inverse`` applied to
    it, bilinear, black outside (cv2.warpPerspective / an affine torchvision transform)."""
    _, _, height, width = x.shape
    ys, xs = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width,
                                                                        dtype=np.float64),
                         indexing="ij")
    points = np.stack([xs, ys, np.ones_like(xs)], axis=-1) @ inverse.T
    cols = np.broadcast_to(points[..., 0] / points[..., 2], (x.shape[0], height, width))
    rows = np.broadcast_to(points[..., 1] / points[..., 2], (x.shape[0], height, width))
    return ops.bilinear_sample(x, rows, cols, border="zero")


def _about_centre(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Warp by the 2x2 ``matrix`` about the centre of the pixel grid."""
    _, _, height, width = x.shape
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    inverse = np.eye(3)
    inverse[:2, :2] = np.linalg.inv(matrix)
    inverse[:2, 2] = centre - inverse[:2, :2] @ centre
    return _warp(x, inverse)


def _rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    return _about_centre(x, np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]))


def _zoom(x: np.ndarray, factor: float) -> np.ndarray:
    return _about_centre(x, np.eye(2) * factor)


def tilt_matrix(width: int, height: int, degrees: float) -> np.ndarray:
    """make_cifar_p.py's tilt homography (source pixel -> output pixel): centre the image at
    depth 1, rotate by ``degrees`` about the x and the y axis, push it back by the focal length
    f = sqrt(w^2 + h^2) and project with focal length f."""
    phi = theta = math.radians(degrees)
    f = math.sqrt(width ** 2 + height ** 2)
    p1 = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1], [0, 0, 1]])
    rx = np.array([[1, 0, 0, 0], [0, math.cos(theta), -math.sin(theta), 0],
                   [0, math.sin(theta), math.cos(theta), 0], [0, 0, 0, 1]])
    ry = np.array([[math.cos(phi), 0, -math.sin(phi), 0], [0, 1, 0, 0],
                   [math.sin(phi), 0, math.cos(phi), 0], [0, 0, 0, 1]])
    t = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, f], [0, 0, 0, 1]])
    p2 = np.array([[f, 0, width / 2, 0], [0, f, height / 2, 0], [0, 0, 1, 0]])
    return p2 @ t @ rx @ ry @ p1


def _tilt(x: np.ndarray, degrees: float) -> np.ndarray:
    _, _, height, width = x.shape
    return _warp(x, np.linalg.inv(tilt_matrix(width, height, degrees)))


def _translate(x: np.ndarray, shift: int) -> np.ndarray:
    out = np.zeros_like(x)
    width = x.shape[3]
    if abs(shift) >= width:
        return out
    if shift >= 0:
        out[..., shift:] = x[..., :width - shift]
    else:
        out[..., :width + shift] = x[..., -shift:]
    return out


# --------------------------------------------------------------------------- the sequences

def _noise_frames(x, out, values, constants, rng, scale, name):
    out[:, 0] = ops.to_uint8(x)
    (level,) = constants
    for i in range(1, out.shape[1]):
        if name == "gaussian_noise":
            frame = x + np.float32(level) * rng.standard_normal(x.shape, dtype=np.float32)
        else:
            frame = rng.poisson(x.astype(np.float64) * level) / level
        out[:, i] = ops.to_uint8(frame)


def _motion_frames(x, out, values, constants, rng, scale, name):
    radius, sigma = constants
    angles = np.empty(x.shape[0])
    for i, angle in enumerate(values):
        angles.fill(angle)
        out[:, i] = ops.to_uint8(ops.motion_blur(x, radius * scale, sigma * scale, angles))


def _zoom_blur_frames(x, out, values, constants, rng, scale, name):
    total = x.astype(np.float64)
    out[:, 0] = ops.to_uint8(x)
    for i in range(1, len(values)):
        total += _zoom(x, float(values[i]))
        out[:, i] = ops.to_uint8(total / (i + 1))


def _spatter_frames(x, out, values, constants, rng, scale, name):
    loc, spread, sigma, threshold, opacity = constants
    n, _, height, width = x.shape
    liquid = _spatter.liquid_layers(rng, n, height, width, loc, spread, sigma * scale,
                                    threshold)
    for i in range(out.shape[1]):
        out[:, i] = ops.to_uint8(_spatter.spatter_frame(x, liquid, opacity))
        liquid = _spatter.flow(liquid)


def _snow_frames(x, out, values, constants, rng, scale, name):
    loc, spread, zoom, threshold, radius, sigma, keep = constants
    n, _, height, width = x.shape
    layer = rng.normal(loc, spread, size=(n, 1, height, width)).astype(np.float32)
    layer = ops.clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = np.rint(np.clip(layer, 0, 1) * 255.0).astype(np.float32) / 255.0   # saved as PNG
    base = keep * x + (1 - keep) * np.maximum(x, ops.luminance(x) * 1.5 + 0.5)
    angles = np.empty(n)
    for i, angle in enumerate(values):
        angles.fill(angle)
        moved = ops.motion_blur(layer, radius * scale, sigma * scale, angles)
        moved = np.rint(np.clip(moved, 0, 1) * 255.0) / 255.0
        out[:, i] = ops.to_uint8(base + moved + moved[:, :, ::-1, ::-1])


def _swept_frames(x, out, values, constants, rng, scale, name):
    frame = {"brightness": shift_value, "translate": lambda a, v: _translate(a, int(v)),
             "rotate": _rotate, "tilt": _tilt, "scale": _zoom}[name]
    for i, value in enumerate(values):
        out[:, i] = ops.to_uint8(frame(x, float(value)))


_MAKERS = {"gaussian_noise": _noise_frames, "shot_noise": _noise_frames,
           "motion_blur": _motion_frames, "zoom_blur": _zoom_blur_frames,
           "spatter": _spatter_frames, "snow": _snow_frames}


def make_sequence(images_uint8: torch.Tensor, name: str, length: int | None = None,
                  seed: int = 0, *, dataset=None) -> torch.Tensor:
    """Turn each image into a perturbation sequence of the dataset's benchmark.

    Args:
        images_uint8: uint8 (N, C, H, W); for a benchmark dataset, its image size and RGB.
        name: one of ``SEQUENCES`` (``perturbation_names(dataset)`` are the evaluated ten).
        length: frames per sequence; None uses the benchmark's.  Other lengths sample the same
            parameter range more coarsely or finely (translate rounds to whole pixels).
        seed: randomness (noise, spatter, snow); the result is a pure function of the
            arguments.
        dataset: the model's dataset (a name or an ImageDataset) choosing the parameters; None:
            generic (CIFAR-10-P's, translation and pixel constants scaled above 32 px).

    Returns:
        uint8 tensor (N, length, C, H, W) on the input's device.

    Raises:
        ValueError: unknown name or dataset, length < 2, images of another size than the
        benchmark's.  TypeError: not a uint8 tensor.

    Example:
        >>> seq = make_sequence(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "rotate",
        ...                     dataset="cifar10")
        >>> seq.shape
        torch.Size([2, 31, 3, 32, 32])
    """
    bench = benchmark_for(dataset)
    table = _TABLES[bench.family]
    if name not in table:
        raise ValueError(f"unknown perturbation {name!r}; choose one of {list(table)} (the "
                         f"{bench.perturbation_name} evaluation uses "
                         f"{list(_EVALUATED[bench.family])})")
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                               or length < 2):
        raise ValueError(f"length must be an int >= 2 or None, got {length!r}")
    _check_images(images_uint8)
    check_image_shape(bench, tuple(images_uint8.shape[1:]), bench.perturbation_name)
    sweep = table[name]
    x = ops.to_float(images_uint8.detach().cpu().numpy())
    # Only the generic protocol rescales its pixel constants with the image size.
    size_ratio = min(x.shape[2:]) / REFERENCE_SIZE if bench.image_size is None else 1.0
    values = _frame_values(sweep, name, length, size_ratio)
    out = np.empty((x.shape[0], len(values)) + x.shape[1:], dtype=np.uint8)
    rng = np.random.default_rng(np.random.SeedSequence(
        [int(seed) & 0xFFFFFFFF, 0x9E, SEQUENCES.index(name)]))
    maker = _MAKERS.get(name, _swept_frames)
    maker(x, out, values, sweep.constants, rng, max(1.0, size_ratio), name)
    return torch.from_numpy(out).to(images_uint8.device)


def _frame_values(sweep: _Sweep, name: str, length: int | None,
                  size_ratio: float) -> np.ndarray:
    """The parameter of each frame (for sequences without one, the frame index)."""
    if name == "translate":
        # One-pixel steps over the range (scaled with the image for the generic protocol),
        # unless a length is asked for.
        pixels = np.arange(round(sweep.first * size_ratio), round(sweep.last * size_ratio) + 1,
                           dtype=np.float64)
        if length is None or length == len(pixels):
            return pixels
        return np.rint(np.linspace(pixels[0], pixels[-1], length))
    frames = sweep.frames if length is None else length
    if sweep.first is None:
        return np.arange(frames, dtype=np.float64)
    return np.linspace(sweep.first, sweep.last, frames)


@torch.no_grad()
def sequence_predictions(model: nn.Module, sequences: torch.Tensor, batch_size: int = 256,
                         device: str | torch.device = "cpu") -> torch.Tensor:
    """Top-1 prediction of every frame: int64 (N, L). The model runs in eval mode (its mode is
    restored afterwards) on float inputs in [0, 1]."""
    if not isinstance(sequences, torch.Tensor) or sequences.dtype != torch.uint8 \
            or sequences.dim() != 5:
        raise ValueError(f"sequences must be a uint8 tensor (N, L, C, H, W), got "
                         f"{getattr(sequences, 'dtype', type(sequences).__name__)} "
                         f"{tuple(getattr(sequences, 'shape', ()))}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n, length = sequences.shape[:2]
    frames = sequences.reshape((n * length,) + tuple(sequences.shape[2:]))
    was_training = model.training
    model.eval()
    try:
        preds = [model(frames[i:i + batch_size].to(device).float().div_(255.0)).argmax(1).cpu()
                 for i in range(0, frames.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(preds).view(n, length)


def flip_probability(model: nn.Module, sequences: torch.Tensor, batch_size: int = 256,
                     device: str | torch.device = "cpu", *, name: str | None = None,
                     relative_to_first: bool | None = None) -> float:
    """How often the top-1 prediction flips along perturbation sequences (CIFAR-10-P).

    Args:
        model: classifier taking [0, 1] images.
        sequences: uint8 (N, L, C, H, W), e.g. from ``make_sequence``.
        batch_size: frames per forward pass.
        device: where the model runs.
        name: the perturbation's name; a name containing "noise" (gaussian_noise,
            shot_noise, the released gaussian_noise_2, ...) compares each frame with the
            first, as cifar-p-eval.py and ImageNet-P's test.py do.
        relative_to_first: overrides ``name``: True compares frames 1..L-1 with frame 0 (noise
            sequences), False compares consecutive frames (the default).

    Returns:
        mean over sequences of (number of flips) / (L - 1), in [0, 1].

    Example:
        >>> fp = flip_probability(model, make_sequence(x, "rotate"))  # doctest: +SKIP
    """
    if relative_to_first is None:
        relative_to_first = name is not None and "noise" in name
    preds = sequence_predictions(model, sequences, batch_size, device)
    if preds.shape[1] < 2:
        raise ValueError(f"sequences need at least 2 frames, got {preds.shape[1]}")
    reference = preds[:, :1] if relative_to_first else preds[:, :-1]
    return float((preds[:, 1:] != reference).double().mean())


def load_cifar101(root: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10.1 v6 (Recht et al. 2019), the natural distribution shift test set.

    Args:
        root: folder with ``cifar10.1_v6_data.npy`` and ``cifar10.1_v6_labels.npy`` (or the
            repository's ``datasets/`` folder below it).

    Returns:
        (images uint8 (2000, 3, 32, 32), labels int64 (2000,)).

    Raises:
        FileNotFoundError: the files are missing (the message says where it looked).
    """
    root = Path(root).expanduser()
    for folder in (root, root / "datasets"):
        data, labels = folder / "cifar10.1_v6_data.npy", folder / "cifar10.1_v6_labels.npy"
        if data.exists() and labels.exists():
            images = np.load(data)
            targets = np.load(labels)
            if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(targets):
                raise ValueError(f"{data} has shape {images.shape} and {labels} has "
                                 f"{targets.shape}; expected (N, 32, 32, 3) and (N,)")
            return (torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))),
                    torch.from_numpy(targets.astype(np.int64)))
    raise FileNotFoundError(
        f"CIFAR-10.1 v6 not found: looked for cifar10.1_v6_data.npy and cifar10.1_v6_labels.npy "
        f"in {root} and {root / 'datasets'}. Get them from "
        f"https://github.com/modestyachts/CIFAR-10.1 (datasets/)")
