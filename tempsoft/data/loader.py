"""DeviceLoader: batches from an in-memory uint8 dataset, augmented on the device.

The whole dataset is moved to the device once, as uint8.  Each batch is one gather: the random
crop (zero padding of 4 pixels, 1 pixel for images smaller than 16 px) and the horizontal flip
are folded into a single advanced-indexing read of the padded batch, so there is no per-image
Python work.  The shuffle order and the crop offsets / flip decisions are drawn from a CPU
``torch.Generator`` seeded from (seed, epoch) and then moved to the device: the batches are a
function of (seed, epoch) only, identical on CPU and GPU, and a resumed run that calls
``set_epoch(e)`` sees exactly the batches it would have seen.

With ``strong_augment="trivialaugment"`` each image gets one TrivialAugment operation
(``trivialaugment.py``) before its crop and flip, the order of the TrivialAugment authors' CIFAR
pipeline.  The operations are drawn from the same per-epoch generator after the crop offsets
and flips, so the batches of a loader without it are unchanged.
"""
from __future__ import annotations

import numpy as np
import torch

from . import trivialaugment
from .datasets import ImageDataset

__all__ = ["DeviceLoader", "augment_batch", "crop_padding"]

PAD_PIXELS = 4          # random-crop padding for CIFAR-sized and larger images
SMALL_PAD_PIXELS = 1    # for images smaller than SMALL_IMAGE (8x8 digits): 4 px would be half
SMALL_IMAGE = 16


def crop_padding(image_size: int) -> int:
    """Zero padding used by the random crop for images of this height."""
    return SMALL_PAD_PIXELS if image_size < SMALL_IMAGE else PAD_PIXELS


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream depends on (seed, epoch) and nothing else."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF])
    generator = torch.Generator()
    generator.manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))
    return generator


def augment_batch(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor | None,
                  pad: int) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip, in one gather.

    Args:
        images: uint8 or float (B, C, H, W) on any device.
        offsets: int64 (B, 2), crop origin (row, col) in the padded image, each in [0, 2*pad].
        flips: bool (B,) or None; True flips that image left-right.
        pad: zero padding on each side.

    Shape:
        returns (B, C, H, W), same dtype and device as ``images``.

    Example:
        >>> x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
        >>> augment_batch(x, torch.tensor([[1, 1]]), None, pad=1).equal(x)  # centre crop
        True
    """
    batch, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    rows = offsets[:, 0:1] + torch.arange(height, device=images.device)       # (B, H)
    cols = torch.arange(width, device=images.device).expand(batch, width)     # (B, W)
    if flips is not None:
        # Reading the columns backwards is the flip; it costs nothing extra.
        cols = torch.where(flips[:, None], width - 1 - cols, cols)
    cols = cols + offsets[:, 1:2]
    picked = padded[torch.arange(batch, device=images.device)[:, None, None],
                    :, rows[:, :, None], cols[:, None, :]]                    # (B, H, W, C)
    return picked.permute(0, 3, 1, 2).contiguous()


class DeviceLoader:
    """Iterate over an :class:`ImageDataset` in batches of float32 images on a device.

    Args:
        dataset: the ImageDataset (uint8 images).
        batch_size: images per batch.
        shuffle: visit the images in a fresh random order each epoch.
        augment: random crop with zero padding + horizontal flip (flip only when
            ``dataset.flip_ok``).
        device: where the batches live; the uint8 images are copied there once.
        seed: base seed; order and augmentation are a function of (seed, epoch).
        drop_last: skip the last incomplete batch.
        strong_augment: "none", or "trivialaugment" (TrivialAugment wide, before the crop).

    Yields:
        (x, y): x float32 (B, C, H, W) in [0, 1] on ``device``, y int64 (B,) on ``device``.

    Each ``iter()`` uses the current epoch and then advances it by one; ``set_epoch(e)`` sets
    it explicitly (call it at the start of each epoch when resuming).

    Example:
        >>> from tempsoft.data import load_dataset
        >>> loader = DeviceLoader(load_dataset("digits"), 128, shuffle=True, augment=True)
        >>> x, y = next(iter(loader))
        >>> x.shape, x.dtype, y.dtype
        (torch.Size([128, 1, 8, 8]), torch.float32, torch.int64)
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool = False,
                 augment: bool = False, device: str | torch.device = "cpu", seed: int = 0,
                 drop_last: bool = False, strong_augment: str = "none") -> None:
        if not isinstance(dataset, ImageDataset):
            raise TypeError(f"dataset must be an ImageDataset, got {type(dataset).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if len(dataset) == 0:
            raise ValueError(f"dataset {dataset.name!r} is empty")
        if strong_augment not in ("none", "trivialaugment"):
            raise ValueError(f"strong_augment must be 'none' or 'trivialaugment', got "
                             f"{strong_augment!r}")
        if strong_augment != "none" and dataset.images.shape[1] not in (1, 3):
            raise ValueError(f"trivialaugment needs 1 or 3 channels, {dataset.name!r} has "
                             f"{dataset.images.shape[1]}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = bool(shuffle)
        self.augment = bool(augment)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.strong_augment = strong_augment
        self.epoch = 0
        self.pad = crop_padding(dataset.images.shape[2])
        self._images = dataset.images.to(self.device)
        self._labels = dataset.labels.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration's order and augmentation those of ``epoch``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        return self._batches(epoch)

    def _batches(self, epoch: int):
        n = len(self.dataset)
        generator = _epoch_generator(self.seed, epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        if self.augment:
            # Drawn for the whole epoch at once, in dataset order of visit, so batch size does
            # not change which image gets which crop.
            offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=generator)
            flips = (torch.rand(n, generator=generator) < 0.5) if self.dataset.flip_ok else None
        if self.strong_augment == "trivialaugment":
            strong = trivialaugment.draw(n, generator)
        order = order.to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start:start + self.batch_size]
            images = self._images[index]
            stop = start + index.shape[0]
            if self.strong_augment == "trivialaugment":
                images = trivialaugment.trivial_augment(
                    images, *(t[start:stop] for t in strong))
            if self.augment:
                images = augment_batch(
                    images, offsets[start:stop].to(self.device),
                    None if flips is None else flips[start:stop].to(self.device), self.pad)
            yield images.to(torch.float32).div_(255.0), self._labels[index]

    def __repr__(self) -> str:
        return (f"DeviceLoader({self.dataset.name!r}, batch_size={self.batch_size}, "
                f"shuffle={self.shuffle}, augment={self.augment}, "
                f"strong_augment={self.strong_augment!r}, device={str(self.device)!r}, "
                f"seed={self.seed}, epoch={self.epoch})")
