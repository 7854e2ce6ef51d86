"""Datasets and the device loader.

Loaders run on small fixtures written here (CIFAR pickles and archives, a Tiny-ImageNet tree, PNG
ImageFolder trees), on scikit-learn's bundled digits, and on the real CIFAR-10 images in
../shared/data/cifar10-jpg.tar.gz through the ImageFolder path when that file exists.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tempsoft.data import (DATASETS, DatasetNotFoundError, DeviceLoader, ImageDataset,
                           augment_batch, crop_padding, load_dataset)
from tempsoft.data import datasets as ds

PIL = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parents[1]
CIFAR_JPG = [ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz",
             Path("/work/shared/data/cifar10-jpg.tar.gz")]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Decoded-image caches go to a per-session temporary folder, never ~/.cache."""
    monkeypatch.setenv("TEMPSOFT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- digits

def test_digits_is_the_default_and_splits_deterministically():
    train, test = load_dataset(), load_dataset("digits", split="test")
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert train.num_classes == 10 and not train.flip_ok
    # Stratified: every class has 35..37 test images (1797 / 10 * 0.2 ~ 36).
    assert torch.bincount(test.labels, minlength=10).min() >= 35
    # Same split and statistics on every call, and the same statistics for both splits.
    again = load_dataset("digits", split="test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    assert train.mean == test.mean and train.std == test.std
    # 0..16 gray levels map to 0..255 by rounding 255 v / 16.
    from sklearn.datasets import load_digits
    levels = set(np.unique(train.images.numpy()).tolist())
    assert levels <= {int(round(v * 255 / 16)) for v in range(17)}
    assert len(train) + len(test) == len(load_digits().target)
    part = test.subset(range(3, 8))
    assert torch.equal(part.images, test.images[3:8]) and part.mean == test.mean


def test_digits_splits_are_disjoint():
    from sklearn.datasets import load_digits
    raw = load_digits()
    flat = np.rint(raw.images * 255 / 16).astype(np.uint8).reshape(len(raw.target), -1)
    train = load_dataset("digits").images.reshape(1437, -1).numpy()
    test = load_dataset("digits", split="test").images.reshape(360, -1).numpy()
    # Each raw image is used once: train + test reproduces the raw multiset of images.
    combined = np.concatenate([train, test])
    assert sorted(map(bytes, combined)) == sorted(map(bytes, flat))


@pytest.mark.parametrize("name", ["mnist", "CIFAR-10", "", None])
def test_unknown_dataset_names_the_value(name):
    with pytest.raises(ValueError, match="unknown dataset") as info:
        load_dataset(name)
    assert repr(name) in str(info.value)


def test_bad_split_names_the_value():
    with pytest.raises(ValueError, match="'validation'"):
        load_dataset("digits", split="validation")


def test_datasets_table_lists_every_name():
    assert set(DATASETS) == {"digits", "cifar10", "cifar100", "tinyimagenet", "imagefolder"}
    assert DATASETS["cifar10"].url.endswith("cifar-10-python.tar.gz")


def test_image_dataset_rejects_inconsistent_fields():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        ImageDataset(images.float(), torch.zeros(2, dtype=torch.int64), ["a"], "x",
                     (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="labels shape"):
        ImageDataset(images, torch.zeros(3, dtype=torch.int64), ["a"], "x", (0.5,) * 3,
                     (0.5,) * 3)
    with pytest.raises(ValueError, match="need 3 values"):
        ImageDataset(images, torch.zeros(2, dtype=torch.int64), ["a"], "x", (0.5,), (0.5,))


# --------------------------------------------------------------------------- CIFAR fixtures

def _write_cifar(folder: Path, name: str, per_file: int = 6) -> dict:
    """A miniature CIFAR python-pickle folder; returns the md5 table for it."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    official = ds._CIFAR_FILES[name]
    label_key = "labels" if name == "cifar10" else "fine_labels"
    classes = 10 if name == "cifar10" else 100
    table = {"train": [], "test": []}
    for split in ("train", "test"):
        for filename, _ in official[split]:
            data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
            labels = rng.integers(0, classes, per_file).tolist()
            with open(folder / filename, "wb") as handle:
                pickle.dump({"data": data, label_key: labels}, handle)
            table[split].append((filename, _md5(folder / filename)))
    meta_name = official["meta"][0]
    names = {"label_names" if name == "cifar10" else "fine_label_names":
             [f"class{i}" for i in range(classes)]}
    with open(folder / meta_name, "wb") as handle:
        pickle.dump(names, handle)
    table["meta"] = (meta_name, _md5(folder / meta_name))
    return table


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_extracted_folder(tmp_path, monkeypatch, name):
    folder = tmp_path / ds._ARCHIVES[name][2]
    monkeypatch.setitem(ds._CIFAR_FILES, name, _write_cifar(folder, name))
    train = load_dataset(name, root=tmp_path, split="train")
    test = load_dataset(name, root=tmp_path, split="test")
    batches = 5 if name == "cifar10" else 1
    assert train.images.shape == (6 * batches, 3, 32, 32)
    assert test.images.shape == (6, 3, 32, 32) and test.images.dtype == torch.uint8
    assert train.num_classes == (10 if name == "cifar10" else 100) and train.flip_ok
    # The pickle's row layout is R plane, G plane, B plane: check one pixel round-trips.
    with open(folder / ds._CIFAR_FILES[name]["test"][0][0], "rb") as handle:
        raw = pickle.load(handle)["data"]
    assert int(test.images[2, 1, 3, 4]) == int(raw[2, 1024 + 3 * 32 + 4])
    # root may also be the extracted folder itself.
    assert torch.equal(load_dataset(name, root=folder, split="test").images, test.images)


def test_cifar_archive_is_verified_extracted_and_downloaded(tmp_path, monkeypatch):
    source = tmp_path / "source"
    table = _write_cifar(source / "cifar-10-batches-py", "cifar10")
    monkeypatch.setitem(ds._CIFAR_FILES, "cifar10", table)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    good = _md5(archive)

    # Wrong md5: a clear "corrupt" error that names the file.
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "cifar-10-python.tar.gz").write_bytes(archive.read_bytes())
    with pytest.raises(DatasetNotFoundError, match="corrupt.*md5"):
        load_dataset("cifar10", root=dest, split="test")

    # Right md5: extracted on first use.
    monkeypatch.setitem(ds._ARCHIVES, "cifar10", ("cifar-10-python.tar.gz", good,
                                                  "cifar-10-batches-py"))
    assert load_dataset("cifar10", root=dest, split="test").images.shape == (6, 3, 32, 32)
    assert (dest / "cifar-10-batches-py" / "test_batch").exists()

    # download=True fetches (here from a file:// URL), checks the md5 and extracts.
    fresh = tmp_path / "fresh"
    monkeypatch.setitem(DATASETS, "cifar10",
                        dataclasses.replace(DATASETS["cifar10"], url=archive.as_uri()))
    with pytest.raises(DatasetNotFoundError, match="download=True"):
        load_dataset("cifar10", root=fresh, split="test")           # never downloads unasked
    assert load_dataset("cifar10", root=fresh, split="test", download=True).images.shape[0] == 6
    assert (fresh / "cifar-10-python.tar.gz").exists()


def test_download_with_wrong_md5_is_discarded(tmp_path, monkeypatch):
    payload = tmp_path / "payload.tar.gz"
    payload.write_bytes(b"not the archive")
    monkeypatch.setitem(DATASETS, "cifar100",
                        dataclasses.replace(DATASETS["cifar100"], url=payload.as_uri()))
    with pytest.raises(DatasetNotFoundError, match="expected eb9058c3"):
        load_dataset("cifar100", root=tmp_path / "d", download=True)
    assert not (tmp_path / "d" / "cifar-100-python.tar.gz").exists()


def test_missing_cifar_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", root=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "download=True" in message


def test_corrupt_cifar_file_is_reported(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    monkeypatch.setitem(ds._CIFAR_FILES, "cifar10", _write_cifar(folder, "cifar10"))
    with open(folder / "test_batch", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(DatasetNotFoundError, match="test_batch is corrupt"):
        load_dataset("cifar10", root=tmp_path, split="test")


# --------------------------------------------------------------------------- image trees

def _write_png_tree(folder: Path, classes=("cat", "dog", "eel"), per_class=5, size=12,
                    mode="RGB", seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    written = []
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            PIL.fromarray(pixels).save(folder / name / f"{i:03d}.png")
            written.append(pixels)
    return np.stack(written)


def test_imagefolder_with_splits_decodes_exactly(tmp_path):
    train_pixels = _write_png_tree(tmp_path / "train", per_class=4, seed=1)
    test_pixels = _write_png_tree(tmp_path / "test", per_class=2, seed=2)
    train = load_dataset("imagefolder", root=tmp_path, progress=False)
    test = load_dataset("imagefolder", root=tmp_path, split="test", progress=False)
    assert train.classes == ["cat", "dog", "eel"] and len(train) == 12 and len(test) == 6
    assert torch.equal(train.labels, torch.arange(3).repeat_interleave(4))
    # PNG is lossless: the tensors are exactly the written pixels, in (N, C, H, W).
    assert torch.equal(train.images, torch.from_numpy(train_pixels).permute(0, 3, 1, 2))
    assert torch.equal(test.images, torch.from_numpy(test_pixels).permute(0, 3, 1, 2))
    expected_mean = train_pixels.reshape(-1, 3).mean(axis=0) / 255
    assert np.allclose(train.mean, expected_mean, atol=1e-6)


def test_cifar10_from_an_image_tree(tmp_path):
    """The same preset works on the official archive or on an image tree of its images."""
    classes = ds.CIFAR10_CLASSES
    train_pixels = _write_png_tree(tmp_path / "train", classes=classes, per_class=2, size=32)
    _write_png_tree(tmp_path / "test", classes=classes, per_class=1, size=32, seed=3)
    train = load_dataset("cifar10", root=tmp_path, progress=False)
    test = load_dataset("cifar10", root=tmp_path, split="test", progress=False)
    assert train.name == "cifar10/train" and test.name == "cifar10/test"
    assert train.classes == list(classes) and train.labels.tolist() == [
        c for c in range(10) for _ in range(2)]
    assert torch.equal(train.images, torch.from_numpy(train_pixels).permute(0, 3, 1, 2))
    assert (train.mean, train.std) == ds._STATS["cifar10"]   # the official statistics


def test_cifar_image_tree_mismatches_are_refused(tmp_path):
    wrong = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "zebra")
    _write_png_tree(tmp_path / "a" / "train", classes=wrong, per_class=1, size=32)
    _write_png_tree(tmp_path / "a" / "test", classes=wrong, per_class=1, size=32)
    with pytest.raises(DatasetNotFoundError, match="not CIFAR-10's classes"):
        load_dataset("cifar10", root=tmp_path / "a", progress=False)
    _write_png_tree(tmp_path / "b" / "train", classes=ds.CIFAR10_CLASSES, per_class=1, size=16)
    _write_png_tree(tmp_path / "b" / "test", classes=ds.CIFAR10_CLASSES, per_class=1, size=16)
    with pytest.raises(DatasetNotFoundError, match=r"not CIFAR's \(3, 32, 32\)"):
        load_dataset("cifar10", root=tmp_path / "b", progress=False)


def test_imagefolder_without_splits_is_split_80_20(tmp_path):
    _write_png_tree(tmp_path, per_class=10)
    train = load_dataset("imagefolder", root=tmp_path, split="train", progress=False)
    test = load_dataset("imagefolder", root=tmp_path, split="test", progress=False)
    assert len(train) == 24 and len(test) == 6
    assert torch.bincount(test.labels).tolist() == [2, 2, 2]
    # No image in both parts (the random pixels make every image unique).
    train_rows = {bytes(r) for r in train.images.reshape(len(train), -1).numpy()}
    assert not any(bytes(r) in train_rows for r in test.images.reshape(len(test), -1).numpy())


def test_imagefolder_grayscale_stays_single_channel(tmp_path):
    _write_png_tree(tmp_path / "train", mode="L", per_class=2)
    data = load_dataset("imagefolder", root=tmp_path, progress=False)
    assert data.images.shape == (6, 1, 12, 12) and len(data.mean) == 1


def test_imagefolder_sizes_must_agree_or_be_resized(tmp_path):
    _write_png_tree(tmp_path / "train", classes=("a",), per_class=2, size=12)
    _write_png_tree(tmp_path / "train", classes=("b",), per_class=2, size=10, seed=3)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("imagefolder", root=tmp_path, progress=False)
    data = load_dataset("imagefolder", root=tmp_path, image_size=8, progress=False)
    assert data.images.shape == (4, 3, 8, 8)


def test_imagefolder_cache_is_reused_and_invalidated(tmp_path):
    _write_png_tree(tmp_path / "train", per_class=3)
    first = load_dataset("imagefolder", root=tmp_path, progress=False)
    cache_files = sorted(ds.cache_dir().glob("*.pt"))
    assert cache_files, "decoding should leave a cache file"
    before = set(cache_files)
    assert torch.equal(load_dataset("imagefolder", root=tmp_path, progress=False).images,
                       first.images)
    assert set(ds.cache_dir().glob("*.pt")) == before        # second load hit the cache
    # Rewriting one image (new content, new mtime) must not serve stale pixels.
    target = tmp_path / "train" / "cat" / "000.png"
    PIL.fromarray(np.zeros((12, 12, 3), np.uint8)).save(target)
    os.utime(target, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    reloaded = load_dataset("imagefolder", root=tmp_path, progress=False)
    assert int(reloaded.images[0].sum()) == 0


def test_imagefolder_errors_say_where(tmp_path):
    with pytest.raises(ValueError, match="needs root"):
        load_dataset("imagefolder")
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nowhere")):
        load_dataset("imagefolder", root=tmp_path / "nowhere")
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no class subfolders"):
        load_dataset("imagefolder", root=tmp_path)
    with pytest.raises(DatasetNotFoundError, match="test/ or val/"):
        load_dataset("imagefolder", root=tmp_path, split="test")


def test_tinyimagenet_official_layout(tmp_path):
    folder = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819"]
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\n"
                                      "n01629819\tEuropean fire salamander\n")
    rng = np.random.default_rng(0)
    for wnid in wnids:
        (folder / "train" / wnid / "images").mkdir(parents=True)
        for i in range(3):
            PIL.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                folder / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", format="JPEG")
    lines = []
    for i, wnid in enumerate([wnids[1], wnids[0], wnids[1]]):
        PIL.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
            folder / "val" / "images" / f"val_{i}.JPEG", format="JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    train = load_dataset("tinyimagenet", root=tmp_path, progress=False)
    val = load_dataset("tinyimagenet", root=tmp_path, split="val", progress=False)
    assert train.images.shape == (6, 3, 64, 64) and train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert val.labels.tolist() == [1, 0, 1]
    assert train.classes == ["goldfish", "European fire salamander"]
    # The WordNet ids name the class folders of Tiny-ImageNet-C/-P: kept in label order.
    assert val.class_ids == tuple(wnids) and val.ids == tuple(wnids)
    assert val.subset([0]).class_ids == tuple(wnids)
    with pytest.raises(DatasetNotFoundError, match="tiny-imagenet-200.zip"):
        load_dataset("tinyimagenet", root=tmp_path / "elsewhere")


# --------------------------------------------------------------------------- real CIFAR-10 JPEGs

@pytest.fixture(scope="session")
def cifar10_jpg_test(tmp_path_factory):
    """The test split of ../shared/data/cifar10-jpg.tar.gz, extracted once per session."""
    archive = next((p for p in CIFAR_JPG if p.exists()), None)
    if archive is None:
        pytest.skip("cifar10-jpg.tar.gz not available (needs ../shared/data)")
    root = tmp_path_factory.mktemp("cifar10-jpg")
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("test/") and
                   (m.isdir() or m.isfile())]
        tar.extractall(root, members=members)
    return root


def test_real_cifar10_through_imagefolder(cifar10_jpg_test, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TEMPSOFT_CACHE_DIR", str(tmp_path_factory.mktemp("c10cache")))
    test = load_dataset("imagefolder", root=cifar10_jpg_test, split="test", progress=False)
    assert test.images.shape == (10000, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                            "horse", "ship", "truck"]
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # JPEG re-encoding moves pixels a little: the statistics stay near CIFAR-10's.
    assert np.allclose(test.mean, ds._STATS["cifar10"][0], atol=0.02)
    assert np.allclose(test.std, ds._STATS["cifar10"][1], atol=0.02)
    cached = set(ds.cache_dir().glob("*.pt"))
    assert len(cached) == 1
    again = load_dataset("imagefolder", root=cifar10_jpg_test, split="test", progress=False)
    assert torch.equal(again.images, test.images)
    assert set(ds.cache_dir().glob("*.pt")) == cached          # served from the cache


# --------------------------------------------------------------------------- DeviceLoader

def _toy(n=10, size=8, flip_ok=True) -> ImageDataset:
    images = torch.arange(n * 3 * size * size, dtype=torch.int64).remainder(251)
    images = images.to(torch.uint8).view(n, 3, size, size)
    return ImageDataset(images, torch.arange(n) % 3, ["a", "b", "c"], "toy", (0.5,) * 3,
                        (0.5,) * 3, flip_ok)


def test_loader_yields_float_batches_covering_the_epoch():
    data = _toy(10)
    loader = DeviceLoader(data, 4, shuffle=True, augment=False, seed=3)
    batches = list(loader)
    assert len(loader) == 3 and [b[0].shape[0] for b in batches] == [4, 4, 2]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
    # Every image exactly once, with its own label.
    order = [int(torch.nonzero((data.images.float() / 255 == img).flatten(1).all(1))[0])
             for img in x]
    assert sorted(order) == list(range(10))
    assert torch.equal(torch.cat([b[1] for b in batches]), data.labels[order])
    assert len(DeviceLoader(data, 4, drop_last=True)) == 2


def test_loader_order_and_augmentation_are_functions_of_seed_and_epoch():
    data = load_dataset("digits")
    loader = DeviceLoader(data, 256, shuffle=True, augment=True, seed=7)
    loader.set_epoch(4)
    first = [x for x, _ in loader]
    loader.set_epoch(4)
    assert all(torch.equal(a, b) for a, b in zip(first, [x for x, _ in loader]))
    other = DeviceLoader(data, 256, shuffle=True, augment=True, seed=7)
    other.set_epoch(4)                                 # a "resumed" run sees the same batches
    assert torch.equal(next(iter(other))[0], first[0])
    loader.set_epoch(5)
    assert not torch.equal(next(iter(loader))[0], first[0])
    # Without set_epoch each pass advances the epoch by one.
    fresh = DeviceLoader(data, 256, shuffle=True, seed=7)
    a, b = next(iter(fresh))[1], next(iter(fresh))[1]
    assert not torch.equal(a, b)


def _reference_augment(image, offset, flip, pad):
    """Per-image crop/flip written plainly, to check the batched gather against."""
    padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
    height, width = image.shape[1:]
    crop = padded[:, offset[0]:offset[0] + height, offset[1]:offset[1] + width]
    return crop.flip(2) if flip else crop


@pytest.mark.parametrize("size", [8, 32])   # 8 px uses 1-pixel padding, 32 px uses 4
def test_augment_batch_matches_per_image_crop_and_flip(size):
    pad = crop_padding(size)
    assert pad == (1 if size < 16 else 4)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, size, size), dtype=torch.uint8, generator=gen)
    offsets = torch.randint(0, 2 * pad + 1, (16, 2), generator=gen)
    flips = torch.rand(16, generator=gen) < 0.5
    out = augment_batch(images, offsets, flips, pad)
    for i in range(16):
        assert torch.equal(out[i], _reference_augment(images[i], offsets[i], flips[i], pad))


def test_no_flip_for_digits_and_crops_are_shifts():
    data = load_dataset("digits")
    loader = DeviceLoader(data, 64, shuffle=False, augment=True, seed=1)
    x, _ = next(iter(loader))
    clean = data.images[:64].float() / 255
    for i in range(64):
        # Each augmented digit equals the clean one shifted by at most one pixel (never mirrored).
        matches = [torch.equal(x[i], _reference_augment(clean[i], (r, c), False, 1))
                   for r in range(3) for c in range(3)]
        assert any(matches)


def test_loader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="batch_size.*0"):
        DeviceLoader(_toy(), 0)
    with pytest.raises(TypeError, match="ImageDataset"):
        DeviceLoader(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="epoch.*-1"):
        DeviceLoader(_toy(), 2).set_epoch(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loader_on_cuda_matches_cpu():
    data = load_dataset("digits")
    cpu = DeviceLoader(data, 128, shuffle=True, augment=True, seed=2)
    gpu = DeviceLoader(data, 128, shuffle=True, augment=True, seed=2, device="cuda")
    for (a, ya), (b, yb) in zip(cpu, gpu):
        assert b.is_cuda and torch.equal(a, b.cpu()) and torch.equal(ya, yb.cpu())


def test_class_ids_default_to_the_class_names_and_must_match_them():
    assert _toy().ids == ("a", "b", "c") and _toy().class_ids is None
    with pytest.raises(ValueError, match="2 class_ids for 3 classes"):
        dataclasses.replace(_toy(), class_ids=("x", "y"))


# --------------------------------------------------------------------------- TrivialAugment

from tempsoft.data import trivialaugment as TA  # noqa: E402


def _ta(images, op, bins, negate=False):
    n = images.shape[0]
    return TA.trivial_augment(images, torch.full((n,), TA.OPS.index(op)),
                              torch.as_tensor(bins).expand(n).clone(),
                              torch.full((n,), negate))


def _random_images(n=8, channels=3, size=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen)


def test_trivialaugment_magnitudes_are_torchvisions_wide_space():
    # TrivialAugmentWide._augmentation_space(31): shear 0..0.99, translate 0..32 px,
    # rotate 0..135 degrees, enhancements 0..0.99, posterize 8..2 bits, solarize 255..0.
    ops = torch.tensor([TA.OPS.index(n) for n in ("shear_x", "translate_y", "rotate",
                                                   "color", "posterize", "solarize")])
    last = torch.full((6,), TA.BINS - 1)
    assert TA.magnitude(ops, last, torch.zeros(6, dtype=torch.bool)).tolist() == \
        pytest.approx([0.99, 32.0, 135.0, 0.99, 2, 0.0])
    assert TA.magnitude(ops, torch.zeros(6, dtype=torch.long),
                        torch.ones(6, dtype=torch.bool)).tolist() == [0, 0, 0, 0, 8, 255]
    # Signed operations flip sign with the coin; posterize and solarize never do.
    assert TA.magnitude(ops, last, torch.ones(6, dtype=torch.bool)).tolist() == \
        pytest.approx([-0.99, -32.0, -135.0, -0.99, 2, 0.0])
    assert len(TA.OPS) == 14 and TA.BINS == 31


def test_trivialaugment_identity_and_zero_magnitude_leave_images_alone():
    x = _random_images()
    for op in ("identity", "shear_x", "shear_y", "translate_x", "translate_y", "rotate",
               "brightness", "contrast", "sharpness", "color"):
        assert torch.equal(_ta(x, op, 0), x), op
    assert torch.equal(_ta(x, "posterize", 0), x)                  # 8 bits kept


def test_trivialaugment_geometry_follows_torchvision():
    # translate_x by bin 3 = 3.2 px -> int 3: the content moves right, black enters.
    shifted = _ta(_random_images(2, size=32), "translate_x", 3)
    source = _random_images(2, size=32)
    assert torch.equal(shifted[..., 3:], source[..., :-3])
    assert int(shifted[..., :3].max()) == 0
    # Rotating a square image by 90 degrees (bin 20 of 0..135 is 90) is torch.rot90, counter-
    # clockwise as torchvision's positive angles.
    square = _random_images(3, size=16)
    assert torch.equal(_ta(square, "rotate", 20), torch.rot90(square, 1, dims=(2, 3)))
    # shear_x about the top-left corner: row y reads columns shifted by m (y + 0.5).
    m = float(TA.magnitude(torch.tensor([1]), torch.tensor([10]), torch.tensor([False])))
    sheared = _ta(square, "shear_x", 10)
    y, x_ = 9, 2
    source_x = int(round(x_ + m * (y + 0.5)))
    assert torch.equal(sheared[:, :, y, x_], square[:, :, y, source_x])


def test_trivialaugment_colour_operations():
    x = _random_images()
    xf = x.float()
    # posterize: bin 20 keeps 8 - round(20 / 5) = 4 bits.
    bits = int(TA.magnitude(torch.tensor([TA.OPS.index("posterize")]), torch.tensor([20]),
                            torch.tensor([False])))
    assert bits == 4 and torch.equal(_ta(x, "posterize", 20), x & 0xF0)
    # solarize inverts every value at or above the threshold (bin 15: 127.5).
    assert torch.equal(_ta(x, "solarize", 15), torch.where(xf >= 127.5, 255 - x, x))
    # brightness 1 + 0.99 * 10 / 30 = 1.33, truncated like torchvision's _blend.
    factor = torch.tensor(1.0 + 0.99 * 10 / 30, dtype=torch.float64).float()
    assert torch.equal(_ta(x, "brightness", 10), (factor * xf).clamp(0, 255).to(torch.uint8))
    # autocontrast stretches each channel to 0..255; a flat channel stays as it is.
    low = torch.full((2, 3, 8, 8), 100, dtype=torch.uint8)
    low[0, :, 0, 0] = 50
    stretched = _ta(low, "autocontrast", 0)
    assert int(stretched[0].min()) == 0 and int(stretched[0].max()) == 255
    assert torch.equal(stretched[1], low[1])


def _equalize_reference(channel: np.ndarray) -> np.ndarray:
    """torchvision's per-channel equalize, written out with numpy for one channel."""
    hist = np.bincount(channel.ravel(), minlength=256)
    nonzero = hist[hist != 0]
    step = nonzero[:-1].sum() // 255
    if step == 0:
        return channel
    lut = (np.cumsum(hist) + step // 2) // step
    lut = np.concatenate([[0], lut[:-1]]).clip(0, 255)
    return lut[channel].astype(np.uint8)


def test_trivialaugment_equalize_matches_the_per_channel_reference():
    x = _random_images(6, size=16)
    x[:2] = (x[:2] // 64) * 64                         # few levels
    x[2] = 77                                          # one level: step 0, unchanged
    out = _ta(x, "equalize", 0)
    for i in range(6):
        for c in range(3):
            assert np.array_equal(out[i, c].numpy(), _equalize_reference(x[i, c].numpy()))


def test_trivialaugment_applies_one_operation_per_image():
    x = _random_images(len(TA.OPS))
    ops = torch.arange(len(TA.OPS))
    bins = torch.full((len(TA.OPS),), 25)
    negate = torch.zeros(len(TA.OPS), dtype=torch.bool)
    out = TA.trivial_augment(x, ops, bins, negate)
    for i, op in enumerate(TA.OPS):
        assert torch.equal(out[i:i + 1], _ta(x[i:i + 1], op, 25)), op
    with pytest.raises(ValueError, match="uint8"):
        TA.trivial_augment(x.float(), ops, bins, negate)
    with pytest.raises(ValueError, match="shape"):
        TA.trivial_augment(x, ops[:3], bins, negate)


def test_loader_strong_augment_is_reproducible_and_leaves_the_default_stream_alone():
    data = _toy(40, size=32)
    plain = [x for x, _ in DeviceLoader(data, 16, shuffle=True, augment=True, seed=3)]
    loader = DeviceLoader(data, 16, shuffle=True, augment=True, seed=3,
                          strong_augment="trivialaugment")
    strong = [x for x, _ in loader]
    loader.set_epoch(0)
    assert all(torch.equal(a, b) for a, b in zip(strong, [x for x, _ in loader]))
    assert any(not torch.equal(a, b) for a, b in zip(plain, strong))
    # "none" draws nothing extra: the default loader's batches are those of older runs.
    none = [x for x, _ in DeviceLoader(data, 16, shuffle=True, augment=True, seed=3,
                                       strong_augment="none")]
    assert all(torch.equal(a, b) for a, b in zip(plain, none))
    with pytest.raises(ValueError, match="strong_augment"):
        DeviceLoader(data, 16, strong_augment="randaugment")
