"""The released benchmark files: folders chosen by the model's dataset and checked against it.

Every fixture is a small generated tree with the published layout (see released.py); no
download.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tempsoft.data import ImageDataset
from tempsoft.models import build_model
from tempsoft.robustness import load_released_c, load_released_p
from tempsoft.robustness.evaluate import evaluate
from tempsoft.robustness.released import released_folder, released_sequence_count

PIL = pytest.importorskip("PIL.Image")
WNIDS = [f"n{1000000 + 7 * i:08d}" for i in range(200)]


def _write_c_npy(folder, num_classes, size=32, per_class=2, name="fog", labels=None):
    """A -C folder: <name>.npy with 5 severity blocks (image value = severity * 40 + index)
    and labels.npy."""
    folder.mkdir(parents=True, exist_ok=True)
    block = num_classes * per_class
    if labels is None:
        labels = np.tile(np.arange(num_classes), per_class)
    data = np.zeros((5 * block, size, size, 3), dtype=np.uint8)
    for sev in range(5):
        data[sev * block:(sev + 1) * block] = (40 * (sev + 1) + np.arange(block) % 40
                                               ).astype(np.uint8)[:, None, None, None]
    np.save(folder / f"{name}.npy", data)
    np.save(folder / "labels.npy", np.tile(np.asarray(labels, dtype=np.uint8), 5))
    return data


@pytest.fixture
def both_cifar_c(tmp_path):
    """One parent folder holding CIFAR-10-C and CIFAR-100-C, as users keep them."""
    _write_c_npy(tmp_path / "CIFAR-10-C", 10)
    _write_c_npy(tmp_path / "CIFAR-100-C", 100)
    return tmp_path


def test_each_dataset_gets_its_own_folder_from_a_shared_parent(both_cifar_c):
    x10, y10 = load_released_c(both_cifar_c, "fog", 3, dataset="cifar10")
    x100, y100 = load_released_c(both_cifar_c, "fog", 3, dataset="cifar100")
    assert x10.shape == (20, 3, 32, 32) and x100.shape == (200, 3, 32, 32)
    assert int(y10.max()) == 9 and int(y100.max()) == 99 and y100.dtype == torch.int64
    assert int(x10[0, 0, 0, 0]) == 3 * 40                      # the severity-3 block
    # The benchmark's folder itself works too, named as released.
    x, _ = load_released_c(both_cifar_c / "CIFAR-100-C", "fog", 1, dataset="cifar100")
    assert x.shape == (200, 3, 32, 32)


def test_another_benchmarks_folder_is_refused(both_cifar_c):
    with pytest.raises(ValueError, match=r"CIFAR-10-C folder, made from cifar10.*CIFAR-100-C"):
        load_released_c(both_cifar_c / "CIFAR-10-C", "fog", 1, dataset="cifar100")
    with pytest.raises(ValueError, match="Tiny-ImageNet-C"):
        load_released_c(both_cifar_c / "CIFAR-10-C", "fog", 1, dataset="tinyimagenet")
    with pytest.raises(FileNotFoundError, match=r"Tiny-ImageNet-C not found.*zenodo"):
        load_released_c(both_cifar_c, "fog", 1, dataset="tinyimagenet", class_ids=WNIDS)


def test_a_folder_of_files_without_the_released_name_is_refused(tmp_path):
    _write_c_npy(tmp_path / "my_corruptions", 10)
    with pytest.raises(ValueError, match="not named CIFAR-10-C"):
        load_released_c(tmp_path / "my_corruptions", "fog", 1, dataset="cifar10")


def test_files_that_do_not_fit_the_dataset_are_refused(tmp_path):
    # Tiny-ImageNet-sized images in a CIFAR-10-C folder.
    _write_c_npy(tmp_path / "a" / "CIFAR-10-C", 10, size=64)
    with pytest.raises(ValueError, match=r"shape \(64, 64, 3\).*\(32, 32, 3\)"):
        load_released_c(tmp_path / "a", "fog", 1, dataset="cifar10")
    # CIFAR-10-C's labels (10 classes) in a folder named CIFAR-100-C.
    _write_c_npy(tmp_path / "b" / "CIFAR-100-C", 10)
    with pytest.raises(ValueError, match="covers 10 classes, cifar100 has 100"):
        load_released_c(tmp_path / "b", "fog", 1, dataset="cifar100")
    # CIFAR-100 labels in a folder named CIFAR-10-C.
    _write_c_npy(tmp_path / "c" / "CIFAR-10-C", 10, labels=np.arange(20) * 5)
    with pytest.raises(ValueError, match=r"labels in \[0, 95\], outside \[0, 10\)"):
        load_released_c(tmp_path / "c", "fog", 1, dataset="cifar10")
    with pytest.raises(FileNotFoundError, match="snow.npy not found.*zenodo"):
        load_released_c(tmp_path / "c", "snow", 1, dataset="cifar10")
    with pytest.raises(ValueError, match="no released"):
        load_released_c(tmp_path, "fog", 1, dataset="digits")


# --------------------------------------------------------------------------- Tiny-ImageNet-C

def _write_tiny_c(root, size=64, wnids=WNIDS, name="fog", severity=3):
    base = root / "Tiny-ImageNet-C" / name / str(severity)
    for k, wnid in enumerate(wnids):
        (base / wnid).mkdir(parents=True)
        PIL.fromarray(np.full((size, size, 3), k % 250, np.uint8)).save(
            base / wnid / f"val_{k}.JPEG", quality=95)
    return root


def test_tiny_imagenet_c_tree_is_labelled_through_the_models_class_ids(tmp_path):
    root = _write_tiny_c(tmp_path)
    order = list(reversed(WNIDS))                  # the model's labels: wnids.txt order
    images, labels = load_released_c(root, "fog", 3, dataset="tinyimagenet", class_ids=order)
    assert images.shape == (200, 3, 64, 64) and images.dtype == torch.uint8
    # Folders are read in sorted order; folder k holds gray level k, class id WNIDS[k].
    assert labels.tolist() == [order.index(w) for w in WNIDS]
    assert abs(int(images[5, 0, 10, 10]) - 5) <= 1
    with pytest.raises(ValueError, match="pass class_ids"):
        load_released_c(root, "fog", 3, dataset="tinyimagenet")


def test_tiny_imagenet_c_mismatches_are_refused(tmp_path):
    small = _write_tiny_c(tmp_path / "small", size=32)
    with pytest.raises(ValueError, match=r"\(32, 32, 3\).*\(64, 64, 3\)"):
        load_released_c(small, "fog", 3, dataset="tinyimagenet", class_ids=WNIDS)
    other = _write_tiny_c(tmp_path / "other", wnids=WNIDS[:199] + ["n99999999"])
    with pytest.raises(ValueError, match="not tinyimagenet classes: \\['n99999999'\\]"):
        load_released_c(other, "fog", 3, dataset="tinyimagenet", class_ids=WNIDS)
    short = _write_tiny_c(tmp_path / "short", wnids=WNIDS[:150])
    with pytest.raises(ValueError, match="150 class folders, tinyimagenet has 200"):
        load_released_c(short, "fog", 3, dataset="tinyimagenet", class_ids=WNIDS)
    with pytest.raises(FileNotFoundError, match=r"fog/5"):
        load_released_c(short, "fog", 5, dataset="tinyimagenet", class_ids=WNIDS)


# --------------------------------------------------------------------------- -P files

def _write_p_npy(folder, name="rotate", n=6, frames=31, size=32):
    folder.mkdir(parents=True, exist_ok=True)
    data = np.zeros((n, frames, size, size, 3), dtype=np.uint8)
    data += (np.arange(n)[:, None] * 10 + np.arange(frames)[None]).astype(np.uint8)[
        :, :, None, None, None]
    np.save(folder / f"{name}.npy", data)


def test_cifar_p_files_load_by_dataset_with_a_subset(tmp_path):
    _write_p_npy(tmp_path / "CIFAR-10-P")
    _write_p_npy(tmp_path / "CIFAR-100-P", n=4)
    seq, labels = load_released_p(tmp_path, "rotate", dataset="cifar10", indices=[1, 4])
    assert seq.shape == (2, 31, 3, 32, 32) and labels is None
    assert int(seq[1, 2, 0, 0, 0]) == 4 * 10 + 2                    # sequence 4, frame 2
    assert released_sequence_count(tmp_path, "rotate", dataset="cifar100") == 4
    with pytest.raises(IndexError, match="index 9 is out of range"):
        load_released_p(tmp_path, "rotate", dataset="cifar100", indices=[0, 9])
    with pytest.raises(ValueError, match="CIFAR-10-P folder, made from cifar10"):
        load_released_p(tmp_path / "CIFAR-10-P", "rotate", dataset="cifar100")
    _write_p_npy(tmp_path / "x" / "CIFAR-10-P", size=64)
    with pytest.raises(ValueError, match=r"\(64, 64, 3\)"):
        load_released_p(tmp_path / "x", "rotate", dataset="cifar10")
    with pytest.raises(FileNotFoundError, match="tilt.npy not found"):
        load_released_p(tmp_path, "tilt", dataset="cifar10")


def _write_tiny_p(root, name="translate", frames=3, wnids=WNIDS, uneven=None):
    av = pytest.importorskip("av")
    base = root / "Tiny-ImageNet-P" / name
    for k, wnid in enumerate(wnids):
        (base / wnid).mkdir(parents=True)
        path = base / wnid / f"val_{k}.mp4"
        with av.open(str(path), "w") as out:
            stream = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                                    rate=1)
            stream.width = stream.height = 64
            stream.pix_fmt = "yuv420p"
            for i in range(frames + (1 if wnid == uneven else 0)):
                frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 60 * i + 20, np.uint8),
                                                   format="rgb24")
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    return root


def test_tiny_imagenet_p_videos_decode_in_order_with_labels(tmp_path):
    root = _write_tiny_p(tmp_path)
    assert released_sequence_count(root, "translate", dataset="tinyimagenet") == 200
    seq, labels = load_released_p(root, "translate", dataset="tinyimagenet", class_ids=WNIDS,
                                  indices=[0, 3, 199])
    assert seq.shape == (3, 3, 3, 64, 64) and labels.tolist() == [0, 3, 199]
    levels = seq.float().mean(dim=(2, 3, 4))
    assert torch.allclose(levels, torch.tensor([20.0, 80.0, 140.0]).expand(3, 3), atol=3)


def test_tiny_imagenet_p_videos_of_unequal_length_are_refused(tmp_path):
    root = _write_tiny_p(tmp_path, uneven=WNIDS[1])
    with pytest.raises(ValueError, match="has 4 frames but .* has 3"):
        load_released_p(root, "translate", dataset="tinyimagenet", class_ids=WNIDS,
                        indices=[0, 1])


# --------------------------------------------------------------------------- evaluate()

def _test_set(name, num_classes, n=40):
    gen = torch.Generator().manual_seed(0)
    return ImageDataset(images=torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                                             generator=gen),
                        labels=torch.arange(n) % num_classes,
                        classes=[str(c) for c in range(num_classes)], name=name,
                        mean=(0.5,) * 3, std=(0.25,) * 3)


@pytest.mark.usefixtures("one_thread")
def test_evaluate_scores_each_model_on_its_own_released_files(both_cifar_c):
    for name in ("rotate", "gaussian_noise"):
        _write_p_npy(both_cifar_c / "CIFAR-10-P", name=name)
        _write_p_npy(both_cifar_c / "CIFAR-100-P", name=name)
    for dataset, classes in (("cifar10", 10), ("cifar100", 100)):
        torch.manual_seed(0)
        model = build_model("small_cnn", classes)
        out = evaluate(model, _test_set(f"{dataset}/test", classes), ["released_c", "released_p"],
                       released_c_root=str(both_cifar_c), released_p_root=str(both_cifar_c),
                       corruptions=["fog"], perturbations=["rotate", "gaussian_noise"],
                       perturbation_examples=4, device="cpu", batch_size=64)
        assert 0.0 <= out["released_c_acc"] <= 1.0 and "released_c_acc/fog" in out
        assert 0.0 <= out["released_flip_prob/gaussian_noise"] <= 1.0
        assert out["released_flip_prob"] == pytest.approx(
            (out["released_flip_prob/rotate"] + out["released_flip_prob/gaussian_noise"]) / 2)
    with pytest.raises(ValueError, match="needs released_p_root"):
        evaluate(model, _test_set("cifar100/test", 100), ["released_p"], device="cpu")


def test_released_folder_names_what_it_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100-P not found.*drive\.google"):
        released_folder(tmp_path, "cifar100", "p")
    with pytest.raises(ValueError, match="kind must be"):
        released_folder(tmp_path, "cifar100", "x")
