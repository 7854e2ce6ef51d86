"""Which corruption (-C) and perturbation (-P) benchmark belongs to which dataset.

Hendrycks & Dietterich (ICLR 2019; code and data: github.com/hendrycks/robustness) built one
benchmark per dataset, each with its own script and its own constants:

============  ================  ========================  ================  =========================
dataset       corruptions       made by                   perturbations     made by / scored by
============  ================  ========================  ================  =========================
cifar10       CIFAR-10-C        make_cifar_c.py           CIFAR-10-P        make_cifar_p.py /
                                                                            cifar-p-eval.py
cifar100      CIFAR-100-C       make_cifar_c.py (same     CIFAR-100-P       the same
                                constants, CIFAR-100)
tinyimagenet  Tiny-ImageNet-C   make_tinyimagenet_c.py    Tiny-ImageNet-P   make_tinyimagenet_p.py /
                                                                            ImageNet-P/test.py
============  ================  ========================  ================  =========================

The benchmark is chosen by the dataset the model was trained on, never guessed from the image
size: a 64x64 image is corrupted with Tiny-ImageNet-C's own constants because it is a
Tiny-ImageNet image, and the released files of one benchmark are refused for a model of another
dataset.  Datasets without a published benchmark (digits, any image folder) get ``GENERIC``:
the CIFAR constants applied to their images, which is not a released benchmark and is reported
under its own name.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

__all__ = ["Benchmark", "BENCHMARKS", "GENERIC", "benchmark_for", "check_image_shape",
           "dataset_key"]


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """What one dataset's corruption and perturbation benchmarks are.

    Attributes:
        dataset: the tempsoft dataset name ("cifar10", ...), or "generic".
        family: whose constants the generators use: "cifar" (make_cifar_c.py /
            make_cifar_p.py) or "tinyimagenet" (make_tinyimagenet_c.py / _p.py).
        image_size: the side of the benchmark's images; None: any size (generic).
        num_classes: the number of classes of the released files; None: the dataset's own.
        corruption_name, perturbation_name: the released folders' names ("CIFAR-10-C"); for
            GENERIC, the names its generated results are reported under.
        released: whether files of that name were published (GENERIC: no).
        corruption_url, perturbation_url: where the released files are.
    """

    dataset: str
    family: str
    image_size: Optional[int]
    num_classes: Optional[int]
    corruption_name: str
    perturbation_name: str
    released: bool
    corruption_url: Optional[str] = None
    perturbation_url: Optional[str] = None


BENCHMARKS: dict[str, Benchmark] = {
    "cifar10": Benchmark("cifar10", "cifar", 32, 10, "CIFAR-10-C", "CIFAR-10-P", True,
                         "https://zenodo.org/record/2535967",
                         "https://drive.google.com/drive/folders/"
                         "1dY1_zeRyjMKdfmMbQ_uK8O1i0MVI9UbZ"),
    "cifar100": Benchmark("cifar100", "cifar", 32, 100, "CIFAR-100-C", "CIFAR-100-P", True,
                          "https://zenodo.org/record/3555552",
                          "https://drive.google.com/drive/folders/"
                          "1Tpssw4Vn6X_4hmIW8KK5LzkKCZpAaae8"),
    "tinyimagenet": Benchmark("tinyimagenet", "tinyimagenet", 64, 200, "Tiny-ImageNet-C",
                              "Tiny-ImageNet-P", True, "https://zenodo.org/record/2536630",
                              "https://zenodo.org/record/2536630"),
}
GENERIC = Benchmark("generic", "cifar", None, None, "CIFAR-10-C protocol (generic)",
                    "CIFAR-10-P protocol (generic)", False)


def dataset_key(dataset) -> str:
    """The tempsoft dataset name of an ImageDataset, its ``name`` ("cifar10/test") or a name.

    Example:
        >>> dataset_key("tinyimagenet/test"), dataset_key("imagefolder:pets/train")
        ('tinyimagenet', 'imagefolder')
    """
    name = getattr(dataset, "name", dataset)
    if not isinstance(name, str) or not name:
        raise TypeError(f"expected a dataset, its name or an ImageDataset, got {dataset!r}")
    return name.split("/", 1)[0].split(":", 1)[0].lower()


def benchmark_for(dataset) -> Benchmark:
    """The benchmark of a dataset (an ImageDataset, its name, or None for GENERIC).

    An ImageDataset whose name is no tempsoft dataset (one built by hand) gets GENERIC.

    Raises:
        ValueError: a name (a string) that is not a tempsoft dataset.

    Example:
        >>> benchmark_for("cifar100").corruption_name
        'CIFAR-100-C'
    """
    if dataset is None:
        return GENERIC
    key = dataset_key(dataset)
    if key in BENCHMARKS:
        return BENCHMARKS[key]
    from tempsoft.data import DATASETS

    if key not in DATASETS and key != "generic" and isinstance(dataset, str):
        raise ValueError(f"unknown dataset {key!r}: choose one of {sorted(DATASETS)} (or None "
                         f"for the generic CIFAR protocol)")
    return GENERIC


def check_image_shape(bench: Benchmark, shape: tuple[int, ...], name: str) -> None:
    """A benchmark's constants are for its own images: refuse any other size or channel count
    (``shape`` = (C, H, W)) rather than apply them on a scale nobody published.  ``name``:
    which benchmark the message names ("CIFAR-10-C", "CIFAR-10-P")."""
    if bench.image_size is None:
        return
    expected = (3, bench.image_size, bench.image_size)
    if tuple(shape) != expected:
        raise ValueError(f"{name}'s constants are for {expected[1]}x{expected[2]} RGB images "
                         f"(dataset {bench.dataset!r}), got images of shape {tuple(shape)}; "
                         f"pass the dataset the images come from")
