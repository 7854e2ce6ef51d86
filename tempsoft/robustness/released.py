"""The released corruption and perturbation benchmarks, checked against the model's dataset.

Layouts, as published (hendrycks/robustness; links in ``benchmarks.py``)::

    CIFAR-10-C/, CIFAR-100-C/   <corruption>.npy  uint8 (50000, 32, 32, 3): five blocks of the
                                                  10,000 test images, severity 1 first
                                labels.npy        uint8 (50000,)
    Tiny-ImageNet-C/            <corruption>/<severity>/<wnid>/<image>.JPEG   64x64 RGB
    CIFAR-10-P/, CIFAR-100-P/   <perturbation>.npy  uint8 (10000, frames, 32, 32, 3)
    Tiny-ImageNet-P/            <perturbation>/<wnid>/<image>.mp4   64x64 frames (H.264)

``root`` is that folder itself or a folder holding it (so one parent with all six works for
every dataset).  The folder is chosen by the model's dataset and must carry the benchmark's
released name: a folder named for another benchmark is refused, and so is a folder of another
name (nothing in a CIFAR-P file tells CIFAR-10-P from CIFAR-100-P).  Then the content is
checked: image size and channels, label range, and that every class of the dataset is there
(CIFAR-10-C labels in a CIFAR-100 evaluation span 10 classes, not 100).  Every problem is a
ValueError or FileNotFoundError that names it.

Decoding the Tiny-ImageNet-P videos needs PyAV (``pip install av``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .benchmarks import BENCHMARKS, Benchmark, benchmark_for

__all__ = ["load_released_c", "load_released_p", "released_folder", "released_sequence_count"]


def released_folder(root: str | os.PathLike, dataset, kind: str) -> Path:
    """The dataset's released corruption ("c") or perturbation ("p") folder under ``root``.

    Raises:
        ValueError: the dataset has no released benchmark, or ``root`` is another
            benchmark's folder or an unnamed folder of files.
        FileNotFoundError: no such folder (the message names the expected path and where to
            download it).

    Example:
        >>> released_folder("/data", "cifar100", "c")              # doctest: +SKIP
        PosixPath('/data/CIFAR-100-C')
    """
    bench = _released(dataset)
    if kind not in ("c", "p"):
        raise ValueError(f"kind must be 'c' (corruptions) or 'p' (perturbations), got {kind!r}")
    wanted = bench.corruption_name if kind == "c" else bench.perturbation_name
    url = bench.corruption_url if kind == "c" else bench.perturbation_url
    root = Path(root).expanduser()
    if root.name.lower() == wanted.lower():
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder; download {wanted} from {url}")
        return root
    others = {b.corruption_name if kind == "c" else b.perturbation_name: b.dataset
              for b in BENCHMARKS.values() if b is not bench}
    for name, other in others.items():
        if root.name.lower() == name.lower():
            raise ValueError(f"{root} is the {name} folder, made from {other}; a model trained "
                             f"on {bench.dataset} is scored on {wanted}: pass that folder or "
                             f"one holding it")
    if root.is_dir():
        for child in root.iterdir():
            if child.is_dir() and child.name.lower() == wanted.lower():
                return child
        if any(root.glob("*.npy")) or (root / "labels.npy").exists():
            raise ValueError(f"{root} holds .npy files but is not named {wanted}: the released "
                             f"folder's name is what tells the benchmarks apart (CIFAR-10 and "
                             f"CIFAR-100 files have the same shapes), so name it {wanted} or "
                             f"pass the folder holding {wanted}/")
    raise FileNotFoundError(f"{wanted} not found: looked for {root / wanted} (and {root} "
                            f"itself). Download it from {url} and extract it there")


def load_released_c(root: str | os.PathLike, name: str, severity: int, *, dataset,
                    class_ids: Optional[Sequence[str]] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One corruption at one severity of the released CIFAR-10-C, CIFAR-100-C or
    Tiny-ImageNet-C, for a model trained on ``dataset``.

    Args:
        root: the benchmark's folder (e.g. ``CIFAR-10-C/``) or a folder holding it.
        name: a corruption name (``CORRUPTIONS``).
        severity: 1..5.
        dataset: the model's dataset ("cifar10", "cifar100", "tinyimagenet" or an
            ImageDataset): selects the benchmark and what the files must look like.
        class_ids: Tiny-ImageNet only: the WordNet id of each label, in the model's label
            order (``ImageDataset.class_ids``); the class folders are mapped through it.

    Returns:
        (images uint8 (N, 3, S, S), labels int64 (N,)), S the benchmark's image size.

    Raises:
        FileNotFoundError: missing files.  ValueError: files that do not fit the dataset
        (image size, channels, label range, classes), or a wrong folder.

    Example:
        >>> x, y = load_released_c("~/data", "fog", 5, dataset="cifar100")  # doctest: +SKIP
    """
    from .corruptions import _check

    _check(name, severity)
    bench = _released(dataset)
    folder = released_folder(root, bench.dataset, "c")
    if bench.family == "cifar":
        return _load_c_npy(folder, name, severity, bench)
    return _load_c_tree(folder, name, severity, bench, class_ids)


def load_released_p(root: str | os.PathLike, name: str, *, dataset,
                    class_ids: Optional[Sequence[str]] = None,
                    indices: Optional[Sequence[int]] = None
                    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The sequences of one perturbation of the released CIFAR-10-P, CIFAR-100-P or
    Tiny-ImageNet-P, for a model trained on ``dataset``.

    Args:
        root: the benchmark's folder (e.g. ``CIFAR-10-P/``) or a folder holding it.
        name: the perturbation ("gaussian_noise", "rotate", ...; the file or folder name).
        dataset: the model's dataset ("cifar10", "cifar100", "tinyimagenet" or an
            ImageDataset).
        class_ids: Tiny-ImageNet only: the WordNet id of each label, in label order.
        indices: which sequences (positions in the file, or in the sorted (class, video) list
            of the tree); None: all of them (10,000 x 31 frames is ~1 GB for CIFAR).

    Returns:
        (sequences uint8 (N, frames, 3, S, S), labels int64 (N,) for Tiny-ImageNet-P, whose
        class folders give them, or None for the CIFAR files, which hold no labels).

    Raises:
        FileNotFoundError: missing files.  ValueError: files that do not fit the dataset,
        videos of unequal length, a wrong folder.  ImportError: PyAV is missing (videos).
    """
    bench = _released(dataset)
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise ValueError(f"perturbation name must be a plain name such as 'rotate', got "
                         f"{name!r}")
    folder = released_folder(root, bench.dataset, "p")
    if bench.family == "cifar":
        return _load_p_npy(folder, name, bench, indices), None
    return _load_p_videos(folder, name, bench, class_ids, indices)


def released_sequence_count(root: str | os.PathLike, name: str, *, dataset) -> int:
    """How many sequences ``load_released_p`` would return for ``indices=None`` (without
    decoding them), so that a caller can pick a subset."""
    bench = _released(dataset)
    folder = released_folder(root, bench.dataset, "p")
    if bench.family == "cifar":
        path = folder / f"{name}.npy"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; download {bench.perturbation_name} "
                                    f"from {bench.perturbation_url}")
        return int(np.load(path, mmap_mode="r").shape[0])
    base = folder / name
    if not base.is_dir():
        raise FileNotFoundError(f"{base} not found; download {bench.perturbation_name} from "
                                f"{bench.perturbation_url}")
    return sum(1 for p in base.glob("*/*") if p.is_file() and p.suffix.lower() == ".mp4")


# --------------------------------------------------------------------------- CIFAR files

def _load_c_npy(folder: Path, name: str, severity: int, bench: Benchmark):
    path, label_path = folder / f"{name}.npy", folder / "labels.npy"
    for p in (path, label_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: the {bench.corruption_name} folder "
                                    f"{folder} is incomplete; download it from "
                                    f"{bench.corruption_url}")
    data = np.load(path, mmap_mode="r")
    labels = np.load(label_path, mmap_mode="r")
    _check_frames(path, data.shape[1:], bench, layout="(N, H, W, 3)")
    if labels.ndim != 1 or data.shape[0] != labels.shape[0] or data.shape[0] % 5:
        raise ValueError(f"{path} has {data.shape[0]} images and {label_path} has shape "
                         f"{labels.shape}; expected equal counts in 5 severity blocks")
    per = data.shape[0] // 5
    part = slice((severity - 1) * per, severity * per)
    block = np.asarray(labels[part]).astype(np.int64)
    _check_labels(block, bench, f"{label_path} (severity {severity})")
    images = torch.from_numpy(np.ascontiguousarray(np.asarray(data[part]).transpose(0, 3, 1, 2)))
    return images, torch.from_numpy(block)


def _load_p_npy(folder: Path, name: str, bench: Benchmark, indices) -> torch.Tensor:
    path = folder / f"{name}.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the {bench.perturbation_name} folder "
                                f"{folder} has no {name!r} sequences; download it from "
                                f"{bench.perturbation_url}")
    data = np.load(path, mmap_mode="r")
    if data.ndim != 5:
        raise ValueError(f"{path} has shape {data.shape}; {bench.perturbation_name} files are "
                         f"(sequences, frames, {bench.image_size}, {bench.image_size}, 3)")
    _check_frames(path, data.shape[2:], bench, layout="(N, frames, H, W, 3)")
    if data.shape[1] < 2:
        raise ValueError(f"{path} has {data.shape[1]} frame per sequence; need at least 2")
    chosen = _chosen(indices, data.shape[0], path)
    picked = np.asarray(data[chosen] if chosen is not None else data)
    return torch.from_numpy(np.ascontiguousarray(picked.transpose(0, 1, 4, 2, 3)))


# --------------------------------------------------------------------------- Tiny-ImageNet trees

def _load_c_tree(folder: Path, name: str, severity: int, bench: Benchmark, class_ids):
    from tempsoft.data.datasets import decode_image_files

    base = folder / name / str(severity)
    if not base.is_dir():
        raise FileNotFoundError(f"{base} not found: the {bench.corruption_name} folder "
                                f"{folder} has no {name}/{severity}/; download it from "
                                f"{bench.corruption_url}")
    paths, labels = _class_tree(base, bench, class_ids, suffixes=None)
    images = decode_image_files(paths, tag=f"{bench.corruption_name}|{base}")
    _check_frames(base, tuple(images.shape[2:]) + (images.shape[1],), bench,
                  layout="<class>/<image>")
    return images, torch.from_numpy(labels)


def _load_p_videos(folder: Path, name: str, bench: Benchmark, class_ids, indices):
    base = folder / name
    if not base.is_dir():
        raise FileNotFoundError(f"{base} not found: the {bench.perturbation_name} folder "
                                f"{folder} has no {name}/; download it from "
                                f"{bench.perturbation_url}")
    paths, labels = _class_tree(base, bench, class_ids, suffixes=(".mp4",))
    chosen = _chosen(indices, len(paths), base)
    if chosen is not None:
        paths, labels = [paths[i] for i in chosen], labels[chosen]
    videos = [_decode_video(p) for p in paths]
    for path, video in zip(paths, videos):
        _check_frames(path, video.shape[1:], bench, layout="frames (H, W, 3)")
        if video.shape[0] != videos[0].shape[0]:
            raise ValueError(f"{path} has {video.shape[0]} frames but {paths[0]} has "
                             f"{videos[0].shape[0]}: the sequences of one perturbation must "
                             f"have equal lengths")
    stacked = np.stack(videos).transpose(0, 1, 4, 2, 3)
    return torch.from_numpy(np.ascontiguousarray(stacked)), torch.from_numpy(labels)


def _class_tree(base: Path, bench: Benchmark, class_ids, suffixes):
    """Files under base/<wnid>/ in (class folder, file name) order, labelled through the
    model's class ids; every class of the dataset must be there and no other."""
    if class_ids is None:
        raise ValueError(f"{bench.corruption_name} and {bench.perturbation_name} label images "
                         f"by class folder (WordNet id): pass class_ids, the ids in the "
                         f"model's label order (the test set's ImageDataset.class_ids)")
    class_ids = [str(c) for c in class_ids]
    if len(class_ids) != bench.num_classes:
        raise ValueError(f"{len(class_ids)} class ids given, but {bench.dataset} has "
                         f"{bench.num_classes} classes")
    index = {wnid: i for i, wnid in enumerate(class_ids)}
    folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in index]
    if unknown:
        raise ValueError(f"{base} has class folders that are not {bench.dataset} classes: "
                         f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if len(folders) != bench.num_classes:
        missing = sorted(set(index) - {p.name for p in folders})
        raise ValueError(f"{base} has {len(folders)} class folders, {bench.dataset} has "
                         f"{bench.num_classes} classes (missing e.g. {missing[:5]})")
    from tempsoft.data.datasets import IMAGE_EXTENSIONS

    wanted = suffixes or IMAGE_EXTENSIONS
    paths, labels = [], []
    for folder in folders:
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix.lower() in wanted)
        if not files:
            raise ValueError(f"{folder} holds no {'/'.join(wanted)} files")
        paths += files
        labels += [index[folder.name]] * len(files)
    return paths, np.asarray(labels, dtype=np.int64)


def _decode_video(path: Path) -> np.ndarray:
    try:
        import av
    except ImportError as exc:
        raise ImportError("reading the Tiny-ImageNet-P videos needs PyAV: pip install av") \
            from exc
    try:
        with av.open(str(path)) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, IndexError) as exc:
        raise ValueError(f"cannot decode the video {path}: {exc}") from exc
    if not frames:
        raise ValueError(f"{path} holds no video frames")
    return np.stack(frames)


# --------------------------------------------------------------------------- checks

def _released(dataset) -> Benchmark:
    bench = benchmark_for(dataset)
    if not bench.released:
        raise ValueError(f"no released corruption or perturbation benchmark exists for "
                         f"dataset {dataset!r}; released ones: {sorted(BENCHMARKS)}")
    return bench


def _check_frames(where, hwc: tuple[int, ...], bench: Benchmark, layout: str) -> None:
    expected = (bench.image_size, bench.image_size, 3)
    if tuple(hwc) != expected:
        raise ValueError(f"{where} holds images of shape {tuple(hwc)} (H, W, C) in layout "
                         f"{layout}, but {bench.dataset} models take {expected}: these are "
                         f"not {bench.corruption_name} / {bench.perturbation_name} files")


def _check_labels(labels: np.ndarray, bench: Benchmark, where: str) -> None:
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= bench.num_classes:
        raise ValueError(f"{where} has labels in [{low}, {high}], outside [0, "
                         f"{bench.num_classes}) of {bench.dataset}: not "
                         f"{bench.corruption_name} labels")
    present = len(np.unique(labels))
    if present != bench.num_classes:
        raise ValueError(f"{where} covers {present} classes, {bench.dataset} has "
                         f"{bench.num_classes}: these are not {bench.corruption_name} labels "
                         f"(a released test set holds every class)")


def _chosen(indices, total: int, where) -> Optional[np.ndarray]:
    if indices is None:
        return None
    chosen = np.asarray(indices, dtype=np.int64).reshape(-1)
    bad = chosen[(chosen < 0) | (chosen >= total)]
    if bad.size:
        raise IndexError(f"sequence index {int(bad[0])} is out of range for {where}, which "
                         f"holds {total} sequences")
    return chosen
