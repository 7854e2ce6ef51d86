"""Datasets as uint8 tensors and a device-side batch loader.

Public API:
    ImageDataset, load_dataset(name, root=None, split="train", download=False), DATASETS,
    DatasetNotFoundError, DeviceLoader(dataset, batch_size, *, shuffle, augment, device, seed,
    drop_last).
"""
from .datasets import (DATASETS, DatasetInfo, DatasetNotFoundError, ImageDataset, cache_dir,
                       default_data_dir, load_dataset)
from .loader import DeviceLoader, augment_batch, crop_padding

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "DeviceLoader",
    "ImageDataset",
    "augment_batch",
    "cache_dir",
    "crop_padding",
    "default_data_dir",
    "load_dataset",
]
