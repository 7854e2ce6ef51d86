"""Datasets held as uint8 tensors: CIFAR-10/100, Tiny-ImageNet, any ImageFolder tree, digits.

Every loader returns an :class:`ImageDataset` whose ``images`` are a uint8 CPU tensor of shape
(N, C, H, W) and whose ``labels`` are int64 (N,).  Nothing is downloaded unless
``download=True`` is passed, and every download is checked against the official md5 before it
is used.  A missing or corrupt dataset raises :class:`DatasetNotFoundError`, whose message says
where the loader looked and how to get the files.

Decoded ImageFolder and Tiny-ImageNet trees are cached as ``.pt`` files under
``$TEMPSOFT_CACHE_DIR`` (default ``~/.cache/tempsoft/datasets``), keyed by the absolute path and
the name, size and mtime of every image file, so a 60,000-image folder decodes once and then
loads in about a second; an edited, added or removed file changes the key.

The default dataset, ``digits``, is scikit-learn's bundled copy of the UCI handwritten digits
(1,797 real 8x8 grayscale scans, no download).  It is kept at its native 8x8 resolution:
upsampling would invent no information, only make every CPU run 4x slower.  Its 0..16 gray
levels map to uint8 by ``round(v * 255 / 16)``, and the train/test split is a stratified 80/20
split with a fixed seed (1,437 / 360 images), identical on every machine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageDataset",
    "cache_dir",
    "decode_image_files",
    "load_dataset",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")
DIGITS_TEST_FRACTION = 0.2   # 80/20 split: 1,437 train / 360 test images
DIGITS_SPLIT_SEED = 0        # fixed so the split is the same everywhere
FOLDER_SPLIT_SEED = 0        # for ImageFolder trees that have no train/test subfolders
FOLDER_TEST_FRACTION = 0.2
_CACHE_FORMAT = 1            # bump when the cached payload changes shape


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is missing or corrupt; the message says where we looked and how to get it."""


@dataclasses.dataclass
class ImageDataset:
    """Images held in memory as uint8, with what a model needs to normalize them.

    Attributes:
        images: uint8 CPU tensor (N, C, H, W), values 0..255.
        labels: int64 CPU tensor (N,), values in [0, len(classes)).
        classes: class names, index = label.
        name: dataset name ("digits", "cifar10", ...), with the split, e.g. "cifar10/test".
        mean, std: per-channel statistics in [0, 1] units for the model's Normalize layer.
        flip_ok: whether a horizontal flip keeps the label (False for digits).
        class_ids: the identifier of each class in released benchmark files (Tiny-ImageNet's
            WordNet ids, which name the class folders of Tiny-ImageNet-C/-P), or None when
            the class names serve (see ``ids``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip_ok: bool = True
    class_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8:
            raise TypeError(f"images must be a uint8 tensor, got {_describe(self.images)}")
        if self.images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(self.images.shape)}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64:
            raise TypeError(f"labels must be an int64 tensor, got {_describe(self.labels)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels shape {tuple(self.labels.shape)} does not match "
                             f"{self.images.shape[0]} images")
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean {self.mean} / std {self.std} need {channels} values")
        if self.class_ids is not None and len(self.class_ids) != len(self.classes):
            raise ValueError(f"{len(self.class_ids)} class_ids for {len(self.classes)} classes")
        if len(self.labels) and (int(self.labels.min()) < 0
                                 or int(self.labels.max()) >= len(self.classes)):
            raise ValueError(f"labels span [{int(self.labels.min())}, {int(self.labels.max())}] "
                             f"but there are {len(self.classes)} classes")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def ids(self) -> tuple[str, ...]:
        """Each class's identifier in released files: ``class_ids``, else the class names."""
        return tuple(self.class_ids) if self.class_ids is not None else tuple(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        """Height of the images (all loaders here produce square images)."""
        return self.images.shape[2]

    def subset(self, indices) -> "ImageDataset":
        """A new dataset holding ``images[indices]`` (same classes and statistics).

        Example:
            >>> small = load_dataset("digits", split="test").subset(range(32))
        """
        index = torch.as_tensor(list(indices) if isinstance(indices, range) else indices,
                                dtype=torch.int64)
        return dataclasses.replace(self, images=self.images[index].contiguous(),
                                   labels=self.labels[index].contiguous())


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What DATASETS tells about a dataset name."""

    name: str
    description: str
    num_classes: int | None        # None: decided by the folder
    image_size: int | None
    channels: int | None
    needs_root: bool
    url: str | None = None


DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", "scikit-learn's bundled UCI handwritten digits, 8x8 "
                          "grayscale, 1,437 train / 360 test (no download)", 10, 8, 1, False),
    "cifar10": DatasetInfo("cifar10", "CIFAR-10: the python-pickle archive "
                           "(cifar-10-python.tar.gz), or an image tree train|test/<class>/",
                           10, 32, 3, True,
                           "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": DatasetInfo("cifar100", "CIFAR-100 python-pickle archive "
                            "(cifar-100-python.tar.gz), fine labels, or an image tree "
                            "train|test/<class>/", 100, 32, 3, True,
                            "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
    "tinyimagenet": DatasetInfo("tinyimagenet", "Tiny-ImageNet-200 in its official folder "
                                "layout (tiny-imagenet-200/), 64x64; split 'test' = the "
                                "labelled val set", 200, 64, 3, True,
                                "http://cs231n.stanford.edu/tiny-imagenet-200.zip"),
    "imagefolder": DatasetInfo("imagefolder", "any folder of class subfolders of images, "
                               "optionally with train/ and test/ (or val/) subfolders",
                               None, None, None, True),
}

# Official archives and the md5 of each (from the dataset pages).
_ARCHIVES = {
    "cifar10": ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                "cifar-10-batches-py"),
    "cifar100": ("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                 "cifar-100-python"),
    "tinyimagenet": ("tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de",
                     "tiny-imagenet-200"),
}
# Files inside the extracted CIFAR folders and their official md5s.
_CIFAR_FILES = {
    "cifar10": {
        "train": [("data_batch_1", "c99cafc152244af753f735de768cd75f"),
                  ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
                  ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
                  ("data_batch_4", "634d18415352ddfa80567beed471001a"),
                  ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb")],
        "test": [("test_batch", "40351d587109b95175f43aff81a1287e")],
        "meta": ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
    },
    "cifar100": {
        "train": [("train", "16019d7e3df5f24257cddd939b257f8d")],
        "test": [("test", "f0ef6b0ae62326f3e7ffdfab6717acfc")],
        "meta": ("meta", "7973b15100ade9c7d40fb424638fde48"),
    },
}
_STATS = {
    # Per-channel mean/std of the training images, the usual published values.
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
}


# --------------------------------------------------------------------------- public entry point

def load_dataset(name: str = "digits", root: str | os.PathLike | None = None,
                 split: str = "train", download: bool = False, *,
                 image_size: int | None = None, progress: bool = True) -> ImageDataset:
    """Load a dataset split into memory as uint8 tensors.

    Args:
        name: one of ``DATASETS``: "digits" (default, bundled), "cifar10", "cifar100",
            "tinyimagenet", "imagefolder".
        root: folder holding the data. cifar10/cifar100: the folder containing the official
            ``cifar-10-python.tar.gz`` (or its extracted ``cifar-10-batches-py/``), or that
            extracted folder itself, or an image tree of the same images
            (``train/<class>/*.png|jpg`` and ``test/<class>/...``, CIFAR's class names); tinyimagenet: the folder containing ``tiny-imagenet-200/``
            (or its zip), or that folder itself; imagefolder: a folder of class subfolders, or
            one with ``train/`` and ``test/`` (or ``val/``) subfolders of class subfolders.
            Ignored for digits. Defaults to ``$TEMPSOFT_DATA_DIR`` or ``~/.cache/tempsoft/data``.
        split: "train" or "test" ("val" is accepted as another name for "test").
        download: fetch the official archive (cifar10, cifar100, tinyimagenet) into ``root``
            when it is missing, verifying its md5. Never done unless asked.
        image_size: imagefolder only: resize every image to this square size (needed when the
            images differ in size).
        progress: show a tqdm bar while decoding image files.

    Returns:
        ImageDataset with images uint8 (N, C, H, W) and labels int64 (N,).

    Raises:
        ValueError: unknown name or split.
        DatasetNotFoundError: the files are missing or fail their checksum.

    Example:
        >>> train = load_dataset("digits")
        >>> train.images.shape, train.images.dtype, train.num_classes
        (torch.Size([1437, 1, 8, 8]), torch.uint8, 10)
    """
    if not isinstance(name, str) or name.lower() not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    name = name.lower()
    split = _check_split(split)
    loader = _LOADERS[name]
    if name == "digits":
        return loader(split)
    if name == "imagefolder":
        if root is None:
            raise ValueError("dataset 'imagefolder' needs root=<folder of class subfolders>")
        return loader(Path(root), split, image_size=image_size, progress=progress)
    base = Path(root) if root is not None else default_data_dir()
    return loader(base, split, download=download, progress=progress)


def default_data_dir() -> Path:
    """``$TEMPSOFT_DATA_DIR`` or ``~/.cache/tempsoft/data``: where datasets live by default."""
    return Path(os.environ.get("TEMPSOFT_DATA_DIR",
                               Path.home() / ".cache" / "tempsoft" / "data")).expanduser()


def cache_dir() -> Path:
    """``$TEMPSOFT_CACHE_DIR`` or ``~/.cache/tempsoft/datasets``: decoded-image caches."""
    return Path(os.environ.get("TEMPSOFT_CACHE_DIR",
                               Path.home() / ".cache" / "tempsoft" / "datasets")).expanduser()


def _check_split(split: str) -> str:
    if not isinstance(split, str) or split.lower() not in ("train", "test", "val"):
        raise ValueError(f"split must be 'train' or 'test' ('val' = 'test'), got {split!r}")
    return "test" if split.lower() == "val" else split.lower()


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return type(value).__name__


# --------------------------------------------------------------------------- digits

def _load_digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # 0..16 gray levels -> 0..255; rounding keeps 16 -> 255 and 0 -> 0 exactly.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=DIGITS_TEST_FRACTION,
                                           random_state=DIGITS_SPLIT_SEED, stratify=labels)
    # Statistics come from the training split for both splits, so a model built from either
    # normalizes the same way.
    train_pixels = images[np.sort(train_idx)].astype(np.float64) / 255.0
    mean = (float(train_pixels.mean()),)
    std = (float(train_pixels.std()),)
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return ImageDataset(images=torch.from_numpy(np.ascontiguousarray(images[chosen])),
                        labels=torch.from_numpy(labels[chosen]),
                        classes=[str(d) for d in range(10)], name=f"digits/{split}",
                        mean=mean, std=std, flip_ok=False)


# --------------------------------------------------------------------------- download helpers

def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, target: Path, md5: str) -> None:
    """Fetch url into target via a temporary file; keep it only if its md5 matches."""
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {target}")
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0)
            bar = _progress_bar(total=total or None, unit="B", unit_scale=True,
                                desc=target.name)
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
                bar.update(len(block))
            bar.close()
        got = md5sum(Path(tmp_name))
        if got != md5:
            raise DatasetNotFoundError(f"downloaded {url} has md5 {got}, expected {md5}; "
                                       f"the file was discarded, try again")
        os.replace(tmp_name, target)
    except OSError as exc:
        if isinstance(exc, DatasetNotFoundError):
            raise
        raise DatasetNotFoundError(f"could not download {url} to {target}: {exc}. Download it "
                                   f"by hand and put it in {target.parent}") from exc
    finally:
        if os.path.exists(tmp_name):
            os.remove(tmp_name)


def _verified_archive(root: Path, name: str, download: bool) -> Path | None:
    """The official archive under root, checked against its md5, fetched if asked; or None."""
    filename, md5, _ = _ARCHIVES[name]
    archive = root / filename
    if not archive.exists() and download:
        _download(DATASETS[name].url, archive, md5)
    if not archive.exists():
        return None
    got = md5sum(archive)
    if got != md5:
        raise DatasetNotFoundError(f"{archive} is corrupt: md5 {got}, expected {md5}. Delete "
                                   f"it and download it again from {DATASETS[name].url}")
    return archive


def _safe_members(tar: tarfile.TarFile, dest: Path):
    """Archive members that stay inside dest (no absolute paths, no '..', no links out)."""
    dest = dest.resolve()
    for member in tar.getmembers():
        target = (dest / member.name).resolve()
        if dest not in target.parents and target != dest:
            raise DatasetNotFoundError(f"archive member {member.name!r} escapes {dest}")
        if member.issym() or member.islnk():
            continue
        yield member


def _extract(archive: Path, dest: Path) -> None:
    print(f"extracting {archive} -> {dest}")
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (dest / member).resolve()
                if dest.resolve() not in target.parents:
                    raise DatasetNotFoundError(f"archive member {member!r} escapes {dest}")
            zf.extractall(dest)
        return
    # The "data" filter (Python >= 3.10.12 / 3.11.4) also refuses device files and odd modes.
    options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(dest, members=list(_safe_members(tar, dest)), **options)


# --------------------------------------------------------------------------- CIFAR

def _cifar_folder(root: Path, name: str, download: bool) -> Path:
    """The extracted ``cifar-10-batches-py`` / ``cifar-100-python`` folder, extracting or
    downloading the official archive when needed."""
    filename, _, folder = _ARCHIVES[name]
    if (root / _CIFAR_FILES[name]["meta"][0]).exists():
        return root                                  # root is the extracted folder itself
    if (root / folder).is_dir():
        return root / folder
    archive = _verified_archive(root, name, download)
    if archive is None:
        raise DatasetNotFoundError(
            f"{name} not found: looked for {root / folder}/, {root / filename} and an image "
            f"tree {root}/train|test/<class>/. Download {DATASETS[name].url} (md5 "
            f"{_ARCHIVES[name][1]}) into {root}, or call "
            f"load_dataset({name!r}, root={str(root)!r}, download=True)")
    _extract(archive, root)
    return root / folder


def _unpickle(path: Path, md5: str) -> dict:
    if not path.exists():
        raise DatasetNotFoundError(f"missing {path}; the extracted folder is incomplete. Delete "
                                   f"{path.parent} and extract the official archive again")
    got = md5sum(path)
    if got != md5:
        raise DatasetNotFoundError(f"{path} is corrupt: md5 {got}, expected {md5}. Delete "
                                   f"{path.parent} and extract the official archive again")
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


# CIFAR-10's label names in label order (batches.meta). CIFAR-100's 100 fine label names
# are in alphabetical order too, so a tree's sorted class folders give the official labels.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
_CIFAR_NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


def _cifar_image_tree(root: Path, name: str) -> Path | None:
    """root when it holds the CIFAR images as an ImageFolder tree (train/<class>/<image> and
    test/<class>/<image>, one folder per CIFAR class), else None."""
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        return None
    classes = [d.name for d in _class_dirs(root / "train")]
    if len(classes) != _CIFAR_NUM_CLASSES[name]:
        return None
    if name == "cifar10" and tuple(classes) != CIFAR10_CLASSES:
        raise DatasetNotFoundError(
            f"{root} looks like a CIFAR-10 image tree, but its class folders {classes} are "
            f"not CIFAR-10's classes {list(CIFAR10_CLASSES)}")
    return root


def _load_cifar_tree(tree: Path, name: str, split: str, progress: bool) -> ImageDataset:
    """The same split from an ImageFolder tree of the CIFAR images (e.g. PNG/JPEG exports
    of the official set): labels from the sorted class folders, the official statistics."""
    part = _load_imagefolder(tree, split, progress=progress)
    if part.images.shape[1:] != (3, 32, 32):
        raise DatasetNotFoundError(f"{tree}/{split} holds images of shape "
                                   f"{tuple(part.images.shape[1:])}, not CIFAR's (3, 32, 32)")
    test_classes = [d.name for d in _class_dirs(tree / split)] if split == "test" else None
    if test_classes is not None and test_classes != part.classes:
        raise DatasetNotFoundError(f"{tree}/test has class folders {test_classes}, "
                                   f"{tree}/train has {part.classes}")
    mean, std = _STATS[name]
    return ImageDataset(images=part.images, labels=part.labels, classes=part.classes,
                        name=f"{name}/{split}", mean=mean, std=std, flip_ok=True)


def _load_cifar(name: str, root: Path, split: str, download: bool, progress: bool = True
                ) -> ImageDataset:
    filename, _, archive_folder = _ARCHIVES[name]
    has_official = ((root / _CIFAR_FILES[name]["meta"][0]).exists()
                    or (root / archive_folder).is_dir() or (root / filename).exists())
    if not has_official and not download:
        tree = _cifar_image_tree(root, name)
        if tree is not None:
            return _load_cifar_tree(tree, name, split, progress)
    folder = _cifar_folder(root, name, download)
    files = _CIFAR_FILES[name]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    class_key = "label_names" if name == "cifar10" else "fine_label_names"
    chunks, labels = [], []
    for filename, md5 in files[split]:
        batch = _unpickle(folder / filename, md5)
        chunks.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    meta = _unpickle(folder / files["meta"][0], files["meta"][1])
    mean, std = _STATS[name]
    return ImageDataset(images=torch.from_numpy(np.concatenate(chunks)),
                        labels=torch.from_numpy(np.concatenate(labels)),
                        classes=list(meta[class_key]), name=f"{name}/{split}",
                        mean=mean, std=std, flip_ok=True)


# --------------------------------------------------------------------------- image decoding + cache

def _progress_bar(**kwargs):
    try:
        from tqdm.auto import tqdm
    except ImportError:                              # tqdm is optional: a silent stand-in
        class _Silent:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return _Silent()
    return tqdm(**kwargs)


def _decode(path: Path, mode: str, image_size: int | None) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if image_size is not None and img.size != (image_size, image_size):
                img = img.resize((image_size, image_size), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except OSError as exc:
        raise DatasetNotFoundError(f"cannot decode image {path}: {exc}") from exc
    return array[:, :, None] if array.ndim == 2 else array


def _image_mode(path: Path) -> str:
    """'L' for grayscale files, else 'RGB': every image of a tree is converted to the mode of
    its first file, so a grayscale tree stays single-channel."""
    from PIL import Image

    with Image.open(path) as img:
        return "L" if img.mode in ("1", "L", "I", "I;16", "F") else "RGB"


def _decode_all(paths: list[Path], image_size: int | None, progress: bool, desc: str
                ) -> np.ndarray:
    """Decode image files into one uint8 (N, C, H, W) array."""
    if not paths:
        raise DatasetNotFoundError(f"no image files found for {desc}")
    mode = _image_mode(paths[0])
    first = _decode(paths[0], mode, image_size)
    out = np.empty((len(paths),) + first.shape, dtype=np.uint8)
    out[0] = first
    bar = _progress_bar(total=len(paths), desc=f"decoding {desc}", unit="img",
                        disable=not progress, mininterval=0.5)
    bar.update(1)
    for i, path in enumerate(paths[1:], start=1):
        img = _decode(path, mode, image_size)
        if img.shape != first.shape:
            raise ValueError(f"{path} has shape {img.shape[:2]} but {paths[0]} has "
                             f"{first.shape[:2]}; pass image_size=<int> to resize all images")
        out[i] = img
        bar.update(1)
    bar.close()
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def _cache_key(paths: list[Path], extra: str) -> str:
    """Hash of every file's path, size and mtime: any change to the tree changes the key."""
    digest = hashlib.sha1(f"{_CACHE_FORMAT}|{extra}".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _cached_decode(paths: list[Path], labels: np.ndarray, *, tag: str,
                   image_size: int | None, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode paths once; later calls with an unchanged tree load the cached tensors."""
    key = _cache_key(paths, f"{tag}|{image_size}")
    cache_file = cache_dir() / f"{_slug(tag)}-{key}.pt"
    if cache_file.exists():
        try:
            payload = torch.load(cache_file, map_location="cpu", weights_only=True)
            if payload["images"].shape[0] == len(paths):
                return payload["images"], payload["labels"]
        except Exception:                            # a truncated cache is just rebuilt
            pass
    images = torch.from_numpy(_decode_all(paths, image_size, progress, tag))
    label_tensor = torch.from_numpy(labels.astype(np.int64))
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        torch.save({"images": images, "labels": label_tensor}, tmp)
        os.replace(tmp, cache_file)
    except OSError:                                  # a read-only cache only costs speed
        pass
    return images, label_tensor


def decode_image_files(paths: list[Path], *, tag: str, progress: bool = False) -> torch.Tensor:
    """Decode image files into one uint8 (N, C, H, W) tensor, cached like the datasets.

    Every file is converted to the mode of the first (grayscale or RGB) and must have its
    size.  ``tag`` names the collection in the cache file's name and progress bar.
    """
    images, _ = _cached_decode(list(paths), np.zeros(len(paths), dtype=np.int64), tag=tag,
                               image_size=None, progress=progress)
    return images


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)[-60:]


def _list_images(folder: Path) -> list[Path]:
    with os.scandir(folder) as entries:
        names = sorted(e.name for e in entries
                       if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
    return [folder / name for name in names]


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units, exact, from each channel's 256-bin histogram."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        counts = torch.bincount(images[:, channel].reshape(-1).to(torch.int64),
                                minlength=256).to(torch.float64)
        total = counts.sum()
        mean = (counts * levels).sum() / total
        var = (counts * (levels - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(float(var.clamp_min(1e-12).sqrt()))
    return tuple(means), tuple(stds)


# --------------------------------------------------------------------------- ImageFolder

def _split_folder(root: Path, split: str) -> Path | None:
    """root/train or root/test|val when root is split into subfolders, else None."""
    names = ("train",) if split == "train" else ("test", "val")
    for sub in names:
        if (root / sub).is_dir():
            return root / sub
    return None


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _load_imagefolder(root: Path, split: str, *, image_size: int | None = None,
                      progress: bool = True) -> ImageDataset:
    if not root.is_dir():
        raise DatasetNotFoundError(f"imagefolder root {root} is not a folder; expected "
                                   f"<root>/<class>/<image> or <root>/train|test/<class>/<image>")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    has_splits = any((root / s).is_dir() for s in ("train", "test", "val"))
    folder = _split_folder(root, split) if has_splits else root
    if folder is None:
        raise DatasetNotFoundError(f"{root} has split subfolders but no "
                                   f"{'train/' if split == 'train' else 'test/ or val/'}")
    folder = folder.resolve()          # absolute paths key the cache
    class_dirs = _class_dirs(folder)
    if not class_dirs:
        raise DatasetNotFoundError(f"no class subfolders in {folder}; expected "
                                   f"{folder}/<class>/<image files>")
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = _list_images(class_dir)
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise DatasetNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under "
                                   f"{folder}/<class>/")
    labels_np = np.asarray(labels, dtype=np.int64)
    tag = f"imagefolder|{folder}"
    images, label_tensor = _cached_decode(paths, labels_np, tag=tag,
                                          image_size=image_size, progress=progress)
    if not has_splits:
        images, label_tensor = _stratified_part(images, label_tensor, split)
    mean, std = _channel_stats(images)
    return ImageDataset(images=images, labels=label_tensor,
                        classes=[d.name for d in class_dirs],
                        name=f"imagefolder:{root.name}/{split}", mean=mean, std=std,
                        flip_ok=True)


def _stratified_part(images: torch.Tensor, labels: torch.Tensor, split: str):
    """Deterministic stratified 80/20 split for a tree without train/test subfolders."""
    rng = np.random.default_rng(FOLDER_SPLIT_SEED)
    labels_np = labels.numpy()
    chosen = []
    for label in np.unique(labels_np):
        members = np.flatnonzero(labels_np == label)
        members = members[rng.permutation(len(members))]
        n_test = int(round(len(members) * FOLDER_TEST_FRACTION))
        chosen.append(members[:n_test] if split == "test" else members[n_test:])
    index = torch.from_numpy(np.sort(np.concatenate(chosen)))
    return images[index].contiguous(), labels[index].contiguous()


# --------------------------------------------------------------------------- Tiny-ImageNet

def _tinyimagenet_folder(root: Path, download: bool) -> Path:
    filename, _, folder = _ARCHIVES["tinyimagenet"]
    if (root / "wnids.txt").exists():
        return root
    if (root / folder / "wnids.txt").exists():
        return root / folder
    archive = _verified_archive(root, "tinyimagenet", download)
    if archive is None:
        raise DatasetNotFoundError(
            f"tinyimagenet not found: looked for {root / folder}/wnids.txt, {root}/wnids.txt "
            f"and {root / filename}. Download {DATASETS['tinyimagenet'].url} (md5 "
            f"{_ARCHIVES['tinyimagenet'][1]}) into {root}, or pass download=True")
    _extract(archive, root)
    return root / folder


def _load_tinyimagenet(root: Path, split: str, download: bool = False, progress: bool = True
                       ) -> ImageDataset:
    folder = _tinyimagenet_folder(root, download).resolve()
    wnids = [line.strip() for line in (folder / "wnids.txt").read_text().splitlines()
             if line.strip()]
    index = {wnid: i for i, wnid in enumerate(wnids)}
    paths, labels = [], []
    if split == "train":
        for wnid in wnids:
            files = _list_images(folder / "train" / wnid / "images")
            paths.extend(files)
            labels.extend([index[wnid]] * len(files))
    else:
        annotations = folder / "val" / "val_annotations.txt"
        if not annotations.exists():
            raise DatasetNotFoundError(f"missing {annotations}; the Tiny-ImageNet folder is "
                                       f"incomplete, extract the official zip again")
        for line in annotations.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 2 and fields[1] in index:
                paths.append(folder / "val" / "images" / fields[0])
                labels.append(index[fields[1]])
    missing = [p for p in paths[:1] + paths[-1:] if not p.exists()]
    if not paths or missing:
        raise DatasetNotFoundError(f"Tiny-ImageNet {split} images missing under {folder} "
                                   f"(e.g. {missing[0] if missing else 'none listed'})")
    images, label_tensor = _cached_decode(paths, np.asarray(labels), progress=progress,
                                          tag=f"tinyimagenet|{folder}|{split}",
                                          image_size=None)
    names = _tinyimagenet_names(folder, wnids)
    mean, std = _STATS["tinyimagenet"]
    return ImageDataset(images=images, labels=label_tensor, classes=names,
                        name=f"tinyimagenet/{split}", mean=mean, std=std, flip_ok=True,
                        class_ids=tuple(wnids))


def _tinyimagenet_names(folder: Path, wnids: list[str]) -> list[str]:
    """Readable class names from words.txt when present, else the WordNet ids."""
    words = folder / "words.txt"
    if not words.exists():
        return wnids
    table = {}
    for line in words.read_text(errors="replace").splitlines():
        wnid, _, text = line.partition("\t")
        table[wnid] = text.split(",")[0].strip()
    return [table.get(w, w) or w for w in wnids]


_LOADERS: dict[str, Callable] = {
    "digits": _load_digits,
    "cifar10": lambda root, split, **kw: _load_cifar("cifar10", root, split, **kw),
    "cifar100": lambda root, split, **kw: _load_cifar("cifar100", root, split, **kw),
    "tinyimagenet": _load_tinyimagenet,
    "imagefolder": _load_imagefolder,
}
