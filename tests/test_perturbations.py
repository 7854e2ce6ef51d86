"""Perturbation sequences (CIFAR-10-P, CIFAR-100-P, Tiny-ImageNet-P) and flip probability."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tempsoft.robustness import PERTURBATIONS, flip_probability, make_sequence, perturbation_names
from tempsoft.robustness import _spatter as S
from tempsoft.robustness import perturbations as P


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Four natural 32x32 RGB patches and their 64x64 versions, uint8."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    small, large = [], []
    for image in load_sample_images().images:
        img = Image.fromarray(image)
        quarter = np.asarray(img.resize((img.width // 4, img.height // 4), Image.BOX))
        half = np.asarray(img.resize((img.width // 2, img.height // 2), Image.BOX))
        for r, c in [(10, 20), (40, 60)]:
            small.append(quarter[r:r + 32, c:c + 32])
            large.append(half[2 * r:2 * r + 64, 2 * c:2 * c + 64])
    as_tensor = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous()  # noqa
    return {"cifar10": as_tensor(small), "tinyimagenet": as_tensor(large)}


def test_each_benchmark_evaluates_its_reference_ten():
    # cifar-p-eval.py's list; make_tinyimagenet_p.py's "Test Data" (snow, not spatter).
    assert PERTURBATIONS == ("gaussian_noise", "shot_noise", "motion_blur", "zoom_blur",
                             "spatter", "brightness", "translate", "rotate", "tilt", "scale")
    assert perturbation_names("cifar100") == PERTURBATIONS == perturbation_names(None)
    assert perturbation_names("tinyimagenet") == (
        "gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow", "brightness",
        "translate", "rotate", "tilt", "scale")
    assert "shear" not in P.SEQUENCES          # a validation sequence, not scored


def _frame_parameters(table, name):
    sweep = table[name]
    return np.linspace(sweep.first, sweep.last, sweep.frames)


def test_sweeps_are_the_reference_scripts():
    """make_cifar_p.py and make_tinyimagenet_p.py, frame i = 0 .. frames - 1."""
    i31, i21, i16 = np.arange(31), np.arange(21), np.arange(16)
    cifar, tiny = P.CIFAR_P, P.TINYIMAGENET_P
    checks = [
        (cifar, "brightness", (i31 - 15) * 1.5 / 100), (tiny, "brightness", (i31 - 15) * 2 / 100),
        (cifar, "translate", i16 - 7), (tiny, "translate", i31 - 15),
        (cifar, "rotate", i31 - 15), (tiny, "rotate", i31 - 15),
        (cifar, "tilt", 0.75 * (i31 - 15)), (tiny, "tilt", i31 - 15.0),
        (cifar, "scale", (i31 * 2 + 70) / 100), (tiny, "scale", (i31 * 2.5 + 40) / 100),
        (cifar, "motion_blur", (i21 - 20) * 9), (tiny, "motion_blur", (i31 - 30) * 5),
        (cifar, "zoom_blur", 1 + 0.004 * i31), (tiny, "zoom_blur", 1 + 0.004 * i31),
        (cifar, "snow", i31 * 4 - 150), (tiny, "snow", i31 * 4 - 150),
    ]
    for table, name, expected in checks:
        assert np.allclose(_frame_parameters(table, name), expected), name
    assert cifar["gaussian_noise"].constants == (0.02,)
    assert tiny["gaussian_noise"].constants == (0.025,)
    assert cifar["shot_noise"].constants == (700,) and tiny["shot_noise"].constants == (500,)
    assert cifar["motion_blur"].constants == (6, 1.8) and tiny["motion_blur"].constants == (14, 3)
    assert cifar["spatter"].constants == (0.6, 0.265, 1.75, 0.7, 0.6)
    assert tiny["spatter"].constants == (0.6, 0.25, 1.75, 0.7, 0.6)
    assert cifar["snow"].constants == (0.05, 0.3, 2, 0.5, 10, 2, 0.85)
    assert tiny["snow"].constants == (0.05, 0.28, 2, 0.5, 10, 2.5, 0.85)


# The frame at which each sweep passes through the identity (None: no such frame).
CLEAN_FRAME = {
    "cifar10": {"gaussian_noise": 0, "shot_noise": 0, "zoom_blur": 0, "brightness": 15,
                "translate": 7, "rotate": 15, "scale": 15},
    "tinyimagenet": {"gaussian_noise": 0, "shot_noise": 0, "zoom_blur": 0, "brightness": 15,
                     "translate": 15, "rotate": 15, "scale": 24},
}


@pytest.mark.parametrize("dataset", ["cifar10", "tinyimagenet"])
@pytest.mark.parametrize("name", P.SEQUENCES)
def test_sequences_have_the_benchmark_length_and_a_clean_frame(name, dataset, photos):
    images = photos[dataset][:2]
    seq = make_sequence(images, name, seed=2, dataset=dataset)
    table = P.CIFAR_P if dataset == "cifar10" else P.TINYIMAGENET_P
    assert seq.shape == (2, table[name].frames) + tuple(images.shape[1:])
    assert seq.dtype == torch.uint8
    clean = CLEAN_FRAME[dataset].get(name)
    if clean is not None:
        assert torch.equal(seq[:, clean], images)
    assert torch.equal(seq, make_sequence(images, name, seed=2, dataset=dataset))
    # Every step perturbs the image a little more (spatter and snow change only where the
    # liquid or the snow is, so some frames of some images may repeat).
    differs = [not torch.equal(seq[:, i], seq[:, i + 1]) for i in range(seq.shape[1] - 1)]
    assert all(differs) if name not in ("spatter", "snow") else sum(differs) >= len(differs) // 2


def test_sequence_frames_move_as_described():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[0, :, 10, 12] = 255
    translate = make_sequence(x, "translate", dataset="cifar10")
    assert int(translate[0, 0, 0, 10].argmax()) == 12 - 7          # frame 0: shift -7
    assert int(translate[0, 15, 0, 10].argmax()) == 12 + 8        # frame 15: shift +8
    scale = make_sequence(torch.full((1, 3, 32, 32), 200, dtype=torch.uint8), "scale",
                          dataset="cifar10")
    assert int(scale[0, 0, 0, 0, 0]) == 0                           # 0.7 zoom: black border
    assert int(scale[0, 30, 0, 0, 0]) == 200                        # 1.3 zoom: no border
    noise = make_sequence(torch.full((8, 3, 32, 32), 128, dtype=torch.uint8), "gaussian_noise",
                          dataset="cifar10")
    assert abs(float((noise[:, 1:].float() - 128).std()) - 0.02 * 255) < 0.2
    tiny_noise = make_sequence(torch.full((4, 3, 64, 64), 128, dtype=torch.uint8),
                               "gaussian_noise", dataset="tinyimagenet")
    assert abs(float((tiny_noise[:, 1:].float() - 128).std()) - 0.025 * 255) < 0.2
    shots = make_sequence(torch.full((8, 3, 32, 32), 128, dtype=torch.uint8), "shot_noise",
                          dataset="cifar10")
    # Poisson(700 x) / 700 at x = 128/255: std sqrt(x / 700) = 0.0268, 6.8 gray levels.
    assert abs(float((shots[:, 1:].float() - 128).std()) - math.sqrt(128 / 255 / 700) * 255) \
        < 0.3
    assert make_sequence(x, "rotate", length=5, dataset="cifar10").shape == (1, 5, 3, 32, 32)
    # Generic (digits): one-pixel translation steps over a proportionally smaller range.
    digits = make_sequence(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8), "translate")
    assert digits.shape[1] == 5


def test_zoom_blur_is_the_running_mean_of_zooms():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    seq = make_sequence(x, "zoom_blur", dataset="cifar10")
    f = x.numpy().astype(np.float32) / 255
    frames = [f] + [P._zoom(f, 1 + 0.004 * j) for j in range(1, 4)]
    expected = np.rint(np.clip(np.mean(frames, axis=0), 0, 1) * 255)
    assert np.abs(seq[:, 3].numpy().astype(int) - expected.astype(int)).max() <= 1


def test_tilt_matrix_is_the_reference_homography():
    """At 0 degrees make_cifar_p.py's homography is a zoom by f / (1 + f) about (w/2, h/2)
    (the image sits at depth 1 in front of the focal plane)."""
    w = h = 32
    f = math.hypot(w, h)
    mat = P.tilt_matrix(w, h, 0.0)
    for x, y in [(0, 0), (31, 5), (16, 16)]:
        u, v, s = mat @ np.array([x, y, 1.0])
        assert u / s == pytest.approx(f * (x - w / 2) / (1 + f) + w / 2)
        assert v / s == pytest.approx(f * (y - h / 2) / (1 + f) + h / 2)
    # Tilting moves the near side outwards and the far side in: not a similarity.
    tilted = P.tilt_matrix(w, h, 11.25)
    corners = np.array([[0, 0, 1], [31, 0, 1], [0, 31, 1], [31, 31, 1]], dtype=float) @ tilted.T
    corners = corners[:, :2] / corners[:, 2:]
    assert abs(np.linalg.norm(corners[1] - corners[0]) - np.linalg.norm(corners[3] - corners[2])) \
        > 0.5


def test_spatter_water_flows_down_and_stays_where_the_liquid_is():
    rng = np.random.default_rng(4)
    liquid = S.liquid_layers(rng, 6, 32, 32, 0.6, 0.265, 1.75, 0.7)
    assert (liquid == 0).mean() > 0.5 and (liquid > 0).any()
    moved = S.flow(liquid)
    assert np.allclose(moved[:, 1:], 0.2 * liquid[:, 1:] + 0.8 * liquid[:, :-1])
    assert np.allclose(moved[:, 0], 0.2 * liquid[:, 0])
    x = np.full((6, 3, 32, 32), 0.2, dtype=np.float32)
    wet = S.spatter_frame(x, liquid, 0.6)
    dry = np.broadcast_to(liquid[:, None] == 0, wet.shape)
    assert np.array_equal(wet[dry], x[dry])
    water = wet - x
    assert water.max() > 0 and (water[:, 0] <= water[:, 1] + 1e-6).all()   # turquoise: R < G
    assert np.array_equal(S.spatter_frame(x, np.zeros_like(liquid), 0.6), x)   # no liquid


def test_spatter_steps_are_opencvs():
    """Canny, the chamfer distance, equalizeHist and the filters against OpenCV, which
    make_cifar_p.py used; OpenCV is not a dependency, so this runs only where it is installed."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    for _ in range(10):
        level = np.clip(S.liquid_layers(rng, 1, 32, 32, 0.6, 0.265, 1.75, 0.7) * 255, 0, 255
                        ).astype(np.uint8)
        edges = S.canny(level, 50, 150)
        assert np.array_equal(edges[0], cv2.Canny(level[0], 50, 150) > 0)
        reference = cv2.distanceTransform((255 - cv2.Canny(level[0], 50, 150)), cv2.DIST_L2, 5)
        if edges.any():
            assert np.abs(S.chamfer_distance(edges)[0] - reference).max() < 1e-3
        spread = np.clip(rng.normal(128, 40, (1, 32, 32)), 0, 255).astype(np.uint8)
        assert np.array_equal(S.equalize_hist(spread)[0], cv2.equalizeHist(spread[0]))


def test_sequence_errors():
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="'shear'"):
        make_sequence(x, "shear", dataset="cifar10")
    with pytest.raises(ValueError, match="length"):
        make_sequence(x, "rotate", length=1)
    with pytest.raises(TypeError, match="uint8"):
        make_sequence(x.float(), "rotate")
    with pytest.raises(ValueError, match=r"Tiny-ImageNet-P's constants are for 64x64"):
        make_sequence(x, "rotate", dataset="tinyimagenet")
    with pytest.raises(ValueError, match=r"CIFAR-10-P's constants are for 32x32"):
        make_sequence(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "rotate", dataset="cifar10")


class _MeanThreshold(nn.Module):
    """Predicts class 1 when the mean pixel exceeds a threshold, else class 0."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        high = (x.mean(dim=(1, 2, 3)) > self.threshold).float()
        return torch.stack([1 - high, high], dim=1)


def test_flip_probability_counts_consecutive_changes():
    # Brightness sweeps the mean monotonically: a threshold model flips exactly once.
    x = torch.full((4, 3, 8, 8), 100, dtype=torch.uint8)
    seq = make_sequence(x, "brightness")
    assert flip_probability(_MeanThreshold(100 / 255), seq) == pytest.approx(1 / 30)
    assert flip_probability(_MeanThreshold(2.0), seq) == 0.0


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "gaussian_noise_2"])
def test_flip_probability_for_noise_compares_with_the_first_frame(name):
    """cifar-p-eval.py scores every sequence whose name contains "noise" against frame 0."""
    low, high = torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.full((1, 1, 4, 4), 255,
                                                                       dtype=torch.uint8)
    frames = [low, high, low, high, low]                 # predictions 0, 1, 0, 1, 0
    seq = torch.stack([f[0] for f in frames]).unsqueeze(0)
    model = _MeanThreshold(0.5)
    assert flip_probability(model, seq) == 1.0                                 # every step
    assert flip_probability(model, seq, name=name) == 0.5                      # vs frame 0
    assert flip_probability(model, seq, name="rotate") == 1.0
    assert flip_probability(model, seq, relative_to_first=True) == 0.5
    model.train()
    flip_probability(model, seq, batch_size=2)
    assert model.training                                 # the caller's mode is restored
