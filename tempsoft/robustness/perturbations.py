"""Natural perturbation sequences following CIFAR-10-P, flip probability, and CIFAR-10.1.

CIFAR-10-P (Hendrycks & Dietterich, ICLR 2019) turns each test image into a short video whose
frames change a little at a time; a stable classifier keeps its prediction.  The sequences here
follow make_cifar_p.py:

=============== ====== ===========================================================
name            frames frame i (i = 0 .. frames-1)
=============== ====== ===========================================================
gaussian_noise  31     frame 0 clean, then x + N(0, 0.02^2) drawn afresh per frame
brightness      31     HSV value + (i - 15) * 1.5 / 100
translate       16     horizontal shift by i - 7 pixels (nearest, black fill)
rotate          31     rotation by i - 15 degrees (bilinear, black fill)
scale           31     zoom by (2 i + 70) / 100 about the centre (bilinear, black fill)
shear           31     horizontal shear by i - 15 degrees (bilinear, black fill)
=============== ====== ===========================================================

Translation keeps the protocol's one-pixel steps over a range scaled with the image size
(-7 .. +8 pixels at 32 px, so 16 frames; -2 .. +2 at 8 px, 5 frames; -14 .. +16 at 64 px); the
other parameters are relative already and keep their 31 frames.
Flip probability (``flip_probability``) is the fraction of consecutive frame pairs whose top-1
prediction differs, averaged over sequences; for noise sequences each frame is compared with
the first (clean) frame instead, as in the reference evaluation (cifar-p-eval.py).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import _image_ops as ops
from .corruptions import shift_value

__all__ = ["PERTURBATIONS", "NOISE_PERTURBATIONS", "make_sequence", "flip_probability",
           "sequence_predictions", "load_cifar101"]

PERTURBATIONS = ("gaussian_noise", "brightness", "translate", "rotate", "scale", "shear")
NOISE_PERTURBATIONS = ("gaussian_noise",)
REFERENCE_SIZE = 32
NOISE_STD = 0.02

# (frames, first parameter, last parameter) of each sweep; frame parameters are evenly spaced.
_SWEEPS = {
    "gaussian_noise": (31, None, None),
    "brightness": (31, -0.225, 0.225),     # (i - 15) * 1.5 / 100
    "translate": (16, -7.0, 8.0),          # pixels at 32x32
    "rotate": (31, -15.0, 15.0),           # degrees
    "scale": (31, 0.70, 1.30),             # zoom factor
    "shear": (31, -15.0, 15.0),            # degrees
}


def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = (f"tensor of dtype {images.dtype}" if isinstance(images, torch.Tensor)
               else type(images).__name__)
        raise TypeError(f"expected a uint8 image tensor, got {got}")
    if images.dim() != 4 or min(images.shape[2:]) < 2:
        raise ValueError(f"images must be (N, C, H, W) with H, W >= 2, got "
                         f"{tuple(images.shape)}")
    return images


def _affine(x: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Warp by the 2x2 ``matrix`` about the image centre, bilinear, black outside.

    Output pixel p reads the source at ``matrix^-1 (p - c) + c`` (c = centre of the pixel
    grid)."""
    _, _, height, width = x.shape
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    inverse = np.linalg.inv(matrix)
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    offsets = np.stack([xs - centre[0], ys - centre[1]], axis=-1) @ inverse.T
    cols = np.broadcast_to(offsets[..., 0] + centre[0], (x.shape[0], height, width))
    rows = np.broadcast_to(offsets[..., 1] + centre[1], (x.shape[0], height, width))
    return ops.bilinear_sample(x, rows, cols, border="zero")


def _translate(x: np.ndarray, shift: int) -> np.ndarray:
    out = np.zeros_like(x)
    width = x.shape[3]
    if shift >= 0:
        out[..., shift:] = x[..., :width - shift]
    else:
        out[..., :width + shift] = x[..., -shift:]
    return out


def _frame(x: np.ndarray, name: str, value: float) -> np.ndarray:
    if name == "brightness":
        return shift_value(x, value)
    if name == "translate":
        return _translate(x, int(value))
    if name == "rotate":
        a = math.radians(value)
        return _affine(x, np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]))
    if name == "scale":
        return _affine(x, np.eye(2) * value)
    if name == "shear":
        return _affine(x, np.array([[1.0, math.tan(math.radians(value))], [0.0, 1.0]]))
    raise AssertionError(name)


def make_sequence(images_uint8: torch.Tensor, name: str, length: int | None = None,
                  seed: int = 0) -> torch.Tensor:
    """Turn each image into a CIFAR-10-P style sequence of gradually perturbed frames.

    Args:
        images_uint8: uint8 (N, C, H, W), any channel count and size.
        name: one of ``PERTURBATIONS``.
        length: frames per sequence; None uses the protocol's (31; translate: one frame per
            pixel of shift, 16 at 32x32). Other lengths sample the same parameter range more
            coarsely or finely (translate rounds to whole pixels).
        seed: randomness (noise only); the result is a pure function of the arguments.

    Returns:
        uint8 tensor (N, length, C, H, W) on the input's device.

    Raises:
        ValueError: unknown name, length < 2.  TypeError: not a uint8 tensor.

    Example:
        >>> seq = make_sequence(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "rotate")
        >>> seq.shape
        torch.Size([2, 31, 3, 32, 32])
    """
    if name not in _SWEEPS:
        raise ValueError(f"unknown perturbation {name!r}; choose one of {list(PERTURBATIONS)}")
    frames, first, last = _SWEEPS[name]
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)
                               or length < 2):
        raise ValueError(f"length must be an int >= 2 or None, got {length!r}")
    _check_images(images_uint8)
    x = ops.to_float(images_uint8.detach().cpu().numpy())
    scale = min(x.shape[2:]) / REFERENCE_SIZE
    values = None
    if name == "translate":
        # One-pixel steps over the scaled range, unless a length is asked for.
        values = np.arange(round(first * scale), round(last * scale) + 1, dtype=np.float64)
        if length is None:
            length = len(values)
        elif length != len(values):
            values = np.rint(np.linspace(values[0], values[-1], length))
    if length is None:
        length = frames
    if values is None and name != "gaussian_noise":
        values = np.linspace(first, last, length)
    out = np.empty((x.shape[0], length) + x.shape[1:], dtype=np.uint8)
    if name == "gaussian_noise":
        rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x9E]))
        out[:, 0] = ops.to_uint8(x)
        for i in range(1, length):
            out[:, i] = ops.to_uint8(x + NOISE_STD * rng.standard_normal(x.shape,
                                                                         dtype=np.float32))
    else:
        for i, value in enumerate(values):
            out[:, i] = ops.to_uint8(_frame(x, name, float(value)))
    return torch.from_numpy(out).to(images_uint8.device)


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
        name: the perturbation's name; noise perturbations compare each frame with the first.
        relative_to_first: overrides ``name``: True compares frames 1..L-1 with frame 0 (noise
            sequences), False compares consecutive frames (the default).

    Returns:
        mean over sequences of (number of flips) / (L - 1), in [0, 1].

    Example:
        >>> fp = flip_probability(model, make_sequence(x, "rotate"))  # doctest: +SKIP
    """
    if relative_to_first is None:
        relative_to_first = name in NOISE_PERTURBATIONS
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
