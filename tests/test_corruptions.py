"""Corruptions (CIFAR-10-C, CIFAR-100-C and Tiny-ImageNet-C, each with its own constants),
CIFAR-10.1, and expected calibration error.

Monotonicity is checked on eight real photo patches (32x32 crops of scikit-learn's two bundled
sample photographs), measured as the mean absolute difference from the clean image averaged
over the patches.  Three corruptions are not ordered that way by the protocol's own constants,
so each is checked along the ordering the constants do define (see the tests' docstrings).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from tempsoft.robustness import (CORRUPTIONS, benchmark_for, corrupt,
                                 expected_calibration_error, load_cifar101)
from tempsoft.robustness import corruptions as C
from tempsoft.robustness._frost import frost_bank
from tempsoft.robustness.calibration import calibration_bins

PIL = pytest.importorskip("PIL.Image")

# Pixel distance grows strictly with severity for these (measured on the patches: e.g. fog
# 13.5 / 26.6 / 34.0 / 39.4 / 46.9 gray levels).
STRICTLY_MONOTONE = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                     "zoom_blur", "snow", "fog", "brightness", "contrast", "pixelate",
                     "jpeg_compression")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Eight natural 32x32 RGB patches, uint8 (8, 3, 32, 32)."""
    from sklearn.datasets import load_sample_images
    patches = []
    for image in load_sample_images().images:
        small = PIL.fromarray(image)
        small = np.asarray(small.resize((small.width // 4, small.height // 4), PIL.BOX))
        for r, c in [(10, 20), (40, 60), (60, 100), (20, 110)]:
            patches.append(small[r:r + 32, c:c + 32])
    return torch.from_numpy(np.stack(patches)).permute(0, 3, 1, 2).contiguous()


def _distance(clean: torch.Tensor, corrupted: torch.Tensor) -> float:
    return float((corrupted.float() - clean.float()).abs().mean())


def _severity_curve(images, name, **kw) -> list[float]:
    return [_distance(images, corrupt(images, name, s, **kw)) for s in range(1, 6)]


# --------------------------------------------------------------------------- shape, determinism

def test_the_fifteen_cifar10c_corruptions_in_order():
    assert CORRUPTIONS == ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                           "glass_blur", "motion_blur", "zoom_blur", "snow", "frost", "fog",
                           "brightness", "contrast", "elastic_transform", "pixelate",
                           "jpeg_compression")


# Shapes: CIFAR (3x32x32), digits (1x8x8), an odd 2-channel non-square image (no code path may
# assume RGB or square), and a single (C, H, W) image.
@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 1, 8, 8), (2, 2, 9, 13), (3, 16, 16)])
@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shape_dtype_and_determinism(name, shape):
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    out = corrupt(images, name, 3, seed=5)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, corrupt(images, name, 3, seed=5))
    assert not torch.equal(out, images)


@pytest.mark.parametrize("name", [n for n in CORRUPTIONS if n not in
                                  ("defocus_blur", "zoom_blur", "brightness", "contrast",
                                   "pixelate", "jpeg_compression")])
def test_random_corruptions_depend_on_the_seed(name, photos):
    assert not torch.equal(corrupt(photos, name, 5, seed=0), corrupt(photos, name, 5, seed=1))


def test_result_does_not_depend_on_batch_neighbours_within_a_block(photos):
    # Deterministic ones are per-image functions: corrupting a subset gives the same pixels.
    for name in ("defocus_blur", "zoom_blur", "pixelate", "jpeg_compression", "contrast"):
        assert torch.equal(corrupt(photos, name, 4)[2:5], corrupt(photos[2:5], name, 4))


# --------------------------------------------------------------------------- monotone in severity

@pytest.mark.parametrize("name", STRICTLY_MONOTONE)
def test_strictly_monotone_in_severity(name, photos):
    curve = _severity_curve(photos, name)
    assert all(b > a for a, b in zip(curve, curve[1:])), f"{name}: {curve}"
    assert curve[0] > 0


def test_motion_blur_monotone_non_strictly(photos):
    """Severities 3 and 4 differ only in the kernel radius (6 vs 8) at sigma 2, where the
    extra taps weigh exp(-72/4) ~ 1e-8: the protocol makes them (almost) equal."""
    curve = _severity_curve(photos, "motion_blur")
    assert all(b >= a - 0.01 for a, b in zip(curve, curve[1:])), curve
    assert curve[4] > curve[0]


def test_glass_blur_grows_with_iterations(photos):
    """Severities 1-3 raise the blur sigma (0.05, 0.25, 0.4) at one shuffling pass, which
    smooths the shuffle away as much as it blurs; the protocol's ordering is the second pass:
    severity 4 = severity 2 + a pass, severity 5 = severity 3 + a pass."""
    curve = _severity_curve(photos, "glass_blur")
    assert curve[3] > curve[1] and curve[4] > curve[2], curve


def test_frost_grows_in_frost_to_image_ratio(photos):
    """Frost blends c0 * image + c1 * frost with c1 / c0 = 0.2, 0.3, 0.44, 0.47, 0.6; as c0
    falls the pixel distance can drop, but the image's share of the signal falls
    monotonically, so the correlation with the clean image must fall."""
    def decorrelation(y):
        a = photos.double().flatten(1)
        b = y.double().flatten(1)
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return 1 - float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())
    curve = [decorrelation(corrupt(photos, "frost", s)) for s in range(1, 6)]
    assert all(b > a for a, b in zip(curve, curve[1:])), curve


def test_elastic_local_deformation_grows(photos, monkeypatch):
    """elastic_transform = a random affine whose jitter shrinks with severity (8%, 7%, 6%, 5%,
    3% of the size) followed by a local elastic field whose strength grows (alpha 0, 5%, 8%,
    10%, 10% at shrinking smoothness).  With the affine stage held at identity the local
    stage alone must be monotone, and severity 1 (alpha 0) must be the identity."""
    monkeypatch.setattr(C, "_random_affine", lambda x, max_shift, rng: x)
    curve = _severity_curve(photos, "elastic_transform")
    assert curve[0] < 0.5 and all(b > a for a, b in zip(curve, curve[1:])), curve


# ------------------------------------------------------------------------ fidelity to protocol

def test_glass_blur_matches_the_reference_loop():
    """The reference's tuple "swap" copies the neighbour (numpy views); check the batched
    version against that literal per-image loop fed the same random stream."""
    rng_image = np.random.default_rng(3)
    image = rng_image.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8)
    sigma, delta, iterations = C.corruption_constants("glass_blur", 4)

    def blur(a):
        return ndimage.gaussian_filter(a, (sigma, sigma, 0), mode="nearest", truncate=4.0)

    x = np.uint8(blur(image[0].transpose(1, 2, 0) / 255.0) * 255)
    rng = np.random.default_rng(7)
    for _ in range(iterations):
        for h in range(32 - delta, delta, -1):
            for w in range(32 - delta, delta, -1):
                dx, dy = rng.integers(-delta, delta, size=(2,))
                x[h, w], x[h + dy, w + dx] = x[h + dy, w + dx], x[h, w]
    reference = np.rint(np.clip(blur(x / 255.0), 0, 1) * 255).astype(np.uint8)
    mine = C._glass_blur(image.astype(np.float32) / 255, C.corruption_constants("glass_blur", 4),
                         np.random.default_rng(7), 1.0)
    mine = np.rint(np.clip(mine, 0, 1) * 255).astype(np.uint8)[0].transpose(1, 2, 0)
    assert np.abs(mine.astype(int) - reference.astype(int)).max() <= 1


def test_blur_and_affine_match_opencv_when_installed(photos):
    """OpenCV is what make_cifar_c.py used for the defocus kernel, filter2D and warpAffine;
    it is not a dependency, so this runs only where it is installed."""
    cv2 = pytest.importorskip("cv2")
    x = photos.numpy().astype(np.float32) / 255
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    for severity in range(1, 6):
        radius, alias = C.corruption_constants("defocus_blur", severity)
        disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float32)
        kernel = cv2.GaussianBlur(disk / disk.sum(), ksize=(3, 3), sigmaX=alias)
        expected = np.stack([[cv2.filter2D(ch, -1, kernel) for ch in img] for img in x])
        assert np.abs(C._defocus_blur(x, (radius, alias), None, 1.0) - expected).max() < 1e-4
    jitter = np.random.default_rng(0).uniform(-2.56, 2.56, size=(len(x), 3, 2))

    class FixedJitter:
        def uniform(self, low, high, size):
            return jitter

    centre, half = np.float32([16, 16]), 32 // 3
    src = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    expected = np.stack([np.stack([cv2.warpAffine(
        ch, cv2.getAffineTransform(src, (src + j).astype(np.float32)), (32, 32),
        borderMode=cv2.BORDER_REFLECT_101) for ch in img]) for img, j in zip(x, jitter)])
    # cv2 interpolates with 5-bit fixed-point weights: agreement to ~1/32 of a gray level.
    assert np.abs(C._random_affine(x, 2.56, FixedJitter()) - expected).max() < 1e-3


def test_noise_and_digital_constants_are_applied(photos):
    x = photos.float() / 255
    # Contrast: (x - mean) * c + mean per image and channel, c = 0.15 at severity 5.
    mean = x.mean(dim=(2, 3), keepdim=True)
    expected = torch.round(((x - mean) * 0.15 + mean).clamp(0, 1) * 255).to(torch.uint8)
    assert torch.equal(corrupt(photos, "contrast", 5), expected)
    # Gaussian noise at severity 1 has std 0.04 (10.2 gray levels) before clipping.
    gray = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)
    residual = corrupt(gray, "gaussian_noise", 1).float() - 128
    assert abs(float(residual.std()) - 0.04 * 255) < 0.2
    # Impulse noise flips ~7% of the values at severity 5, half to 0 and half to 255.
    hits = corrupt(gray, "impulse_noise", 5)
    assert abs(float((hits == 0).float().mean()) - 0.035) < 0.005
    assert abs(float((hits == 255).float().mean()) - 0.035) < 0.005


def test_brightness_is_the_hsv_value_shift(photos):
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
    hsv = rgb_to_hsv(photos.permute(0, 2, 3, 1).numpy() / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + 0.3, 0, 1)
    expected = np.rint(hsv_to_rgb(hsv) * 255).astype(np.uint8).transpose(0, 3, 1, 2)
    got = corrupt(photos, "brightness", 5).numpy()
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_jpeg_and_pixelate_use_the_protocol_settings(photos):
    import io
    image = photos[0].permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    PIL.fromarray(image).save(buffer, format="JPEG", quality=40)
    expected = np.asarray(PIL.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert np.array_equal(corrupt(photos[:1], "jpeg_compression", 5)[0].permute(1, 2, 0).numpy(),
                          expected)
    small = PIL.fromarray(image).resize((20, 20), PIL.BOX).resize((32, 32), PIL.BOX)
    assert np.array_equal(corrupt(photos[:1], "pixelate", 5)[0].permute(1, 2, 0).numpy(),
                          np.asarray(small))


# --------------------------------------------------------------------------- each benchmark's own

# Transcribed again from the reference scripts (hendrycks/robustness, ImageNet-C/create_c/),
# severity 1..5, to check the tables the package uses.
MAKE_CIFAR_C = {
    "gaussian_noise": [0.04, 0.06, .08, .09, .10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [.01, .02, .03, .05, .07],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "brightness": [.05, .1, .15, .2, .3],
    "contrast": [.75, .5, .4, .3, 0.15],
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06),
                          (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "jpeg_compression": [80, 65, 58, 50, 40],
}
MAKE_TINYIMAGENET_C = {
    "gaussian_noise": [0.04, 0.08, .12, .15, .18],
    "shot_noise": [250, 100, 50, 30, 15],
    "impulse_noise": [.01, .02, .05, .08, .14],
    "defocus_blur": [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
    "glass_blur": [(0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)],
    "motion_blur": [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.8), (0.1, 0.2, 1, 0.5, 10, 4, 0.8),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.7), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.65),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.6)],
    "frost": [(1, 0.3), (0.9, 0.4), (0.8, 0.45), (0.75, 0.5), (0.7, 0.55)],
    "fog": [(.4, 3), (.7, 3), (1, 2.5), (1.5, 2), (2, 1.75)],
    "brightness": [.1, .2, .3, .4, .5],
    "contrast": [.4, .3, .2, .1, 0.05],
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.3, 0.06), (0.1, 0.08, 0.06),
                          (0.1, 0.03, 0.03), (0.16, 0.03, 0.02)],
    "pixelate": [0.9, 0.8, 0.7, 0.6, 0.5],
    "jpeg_compression": [65, 58, 50, 40, 25],
}


@pytest.mark.parametrize("dataset, table", [("cifar10", MAKE_CIFAR_C), ("cifar100", MAKE_CIFAR_C),
                                            (None, MAKE_CIFAR_C), ("digits", MAKE_CIFAR_C),
                                            ("tinyimagenet", MAKE_TINYIMAGENET_C)])
def test_each_benchmark_uses_its_reference_constants(dataset, table):
    for name, values in table.items():
        for severity, value in enumerate(values, start=1):
            assert C.corruption_constants(name, severity, dataset) == value, (name, severity)
    # zoom_blur: np.arange(1, stop, 0.01) with stop 1.06 .. 1.26, the same in both scripts.
    for severity, stop in enumerate((1.06, 1.11, 1.16, 1.21, 1.26), start=1):
        assert np.array_equal(C.corruption_constants("zoom_blur", severity, dataset),
                              np.arange(1, stop, 0.01))


def test_benchmark_is_chosen_by_dataset_not_by_image_size():
    assert benchmark_for("cifar100").corruption_name == "CIFAR-100-C"
    assert benchmark_for("tinyimagenet/test").corruption_name == "Tiny-ImageNet-C"
    assert not benchmark_for("imagefolder:pets/test").released
    assert benchmark_for(None) is benchmark_for("digits")
    from tempsoft.data import ImageDataset
    handmade = ImageDataset(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1).long(),
                            ["a"], "my-photos/test", (0.5,) * 3, (0.5,) * 3)
    assert benchmark_for(handmade) is benchmark_for(None)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        benchmark_for("imagenet")


def _tiny_images(n=4):
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 3, 64, 64),
                                                              dtype=np.uint8))


def _jpeg85(batch: torch.Tensor) -> torch.Tensor:
    """What saving as Tiny-ImageNet-C's JPEG files (quality 85) and reading back gives."""
    import io
    out = []
    for image in batch.permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        PIL.fromarray(image).save(buffer, format="JPEG", quality=85)
        out.append(np.asarray(PIL.open(io.BytesIO(buffer.getvalue())).convert("RGB")))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def test_tiny_imagenet_c_constants_and_jpeg_storage_are_applied():
    """Contrast at severity 5 keeps 5% of the contrast on Tiny-ImageNet-C (15% on CIFAR-10-C),
    and the result is stored as JPEG at quality 85, as the released tree was."""
    x = _tiny_images()
    f = x.float() / 255
    mean = f.mean(dim=(2, 3), keepdim=True)
    kept = torch.round(((f - mean) * 0.05 + mean).clamp(0, 1) * 255).to(torch.uint8)
    assert torch.equal(corrupt(x, "contrast", 5, dataset="tinyimagenet"), _jpeg85(kept))
    # The generic protocol at 64 px keeps CIFAR's 0.15 and stores losslessly.
    generic = torch.round(((f - mean) * 0.15 + mean).clamp(0, 1) * 255).to(torch.uint8)
    assert torch.equal(corrupt(x, "contrast", 5), generic)


def test_tiny_imagenet_c_pixel_constants_are_not_scaled_from_cifar():
    """Tiny-ImageNet-C's motion blur is radius 10 / sigma 1 at severity 1, not CIFAR's 6 / 1
    doubled; at the same seed the generic (scaled) and the benchmark's blur differ."""
    x = _tiny_images()
    bench = corrupt(x, "motion_blur", 1, seed=3, dataset="tinyimagenet")
    generic = corrupt(x, "motion_blur", 1, seed=3)
    assert not torch.equal(bench, generic)
    assert C.corruption_constants("motion_blur", 1, "tinyimagenet") == (10, 1)


def test_a_benchmark_refuses_images_of_another_size():
    with pytest.raises(ValueError, match=r"Tiny-ImageNet-C's constants are for 64x64"):
        corrupt(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), "fog", 1, dataset="tinyimagenet")
    with pytest.raises(ValueError, match=r"CIFAR-100-C's constants are for 32x32"):
        corrupt(_tiny_images(), "fog", 1, dataset="cifar100")
    with pytest.raises(ValueError, match=r"RGB"):
        corrupt(torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "fog", 1, dataset="cifar10")


def test_frost_crystals_are_larger_for_tiny_imagenet():
    """Tiny-ImageNet-C shrinks its frost photos to 30% where CIFAR-10-C uses 20%: the texture
    bank is drawn 1.5x coarser, so neighbouring pixels differ less."""
    def roughness(bank):
        return float(np.abs(np.diff(bank, axis=-1)).mean())
    fine, coarse = frost_bank(0, 64, 64, 3), frost_bank(0, 64, 64, 3, 1.5)
    assert fine.shape == coarse.shape == (6, 3, 320, 320)
    assert roughness(coarse) < 0.8 * roughness(fine)
    with pytest.raises(ValueError, match="zoom"):
        frost_bank(0, 32, 32, 3, 0.5)


# --------------------------------------------------------------------------- errors

def test_bad_arguments_are_named():
    x = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="'gaussian_blur'"):
        corrupt(x, "gaussian_blur", 1)
    for severity in (0, 6, 2.0, True):
        with pytest.raises(ValueError, match="severity"):
            corrupt(x, "fog", severity)
    with pytest.raises(TypeError, match="torch.float32"):
        corrupt(x.float(), "fog", 1)
    with pytest.raises(ValueError, match=r"\(1, 3, 3, 8\)"):
        corrupt(torch.zeros(1, 3, 3, 8, dtype=torch.uint8), "fog", 1)


def test_load_cifar101(tmp_path):
    np.save(tmp_path / "cifar10.1_v6_data.npy", np.zeros((3, 32, 32, 3), np.uint8))
    np.save(tmp_path / "cifar10.1_v6_labels.npy", np.array([1, 2, 3]))
    images, labels = load_cifar101(tmp_path)
    assert images.shape == (3, 3, 32, 32) and labels.tolist() == [1, 2, 3]
    with pytest.raises(FileNotFoundError, match="CIFAR-10.1"):
        load_cifar101(tmp_path / "missing")


# --------------------------------------------------------------------------- calibration

def _ece_loop(logits, labels, n_bins):
    """ECE written as the textbook loop, bins (k/n, (k+1)/n]."""
    probs = torch.softmax(logits.double(), 1)
    conf, pred = probs.max(1)
    total = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        members = (conf > lo) & (conf <= hi) if k else (conf <= hi)
        if members.any():
            acc = (pred[members] == labels[members]).double().mean()
            total += float(members.double().mean() * (acc - conf[members].mean()).abs())
    return total


@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_matches_the_textbook_loop(n_bins):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=gen) * 3
    labels = torch.randint(0, 10, (500,), generator=gen)
    assert expected_calibration_error(logits, labels, n_bins) == pytest.approx(
        _ece_loop(logits, labels, n_bins), abs=1e-12)


def test_ece_known_values():
    # Confident and always right -> ECE = 1 - confidence; half right at 0.5 confidence -> 0.
    logits = torch.tensor([[10.0, 0.0]] * 4)
    confidence = float(torch.softmax(logits[0].double(), 0)[0])   # ECE works in float64
    assert expected_calibration_error(logits, torch.zeros(4, dtype=torch.long)) == \
        pytest.approx(1 - confidence)
    even = torch.zeros(4, 2)
    assert expected_calibration_error(even, torch.tensor([0, 1, 0, 1])) == pytest.approx(0.0)
    count, conf, acc = calibration_bins(logits, torch.zeros(4, dtype=torch.long), 10)
    assert count.tolist() == [0.0] * 9 + [4.0] and acc[-1] == 1.0


def test_ece_errors():
    with pytest.raises(ValueError, match="n_bins.*0"):
        expected_calibration_error(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 0)
    with pytest.raises(IndexError, match="3"):
        expected_calibration_error(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"\(2,\)"):
        expected_calibration_error(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="floating"):
        expected_calibration_error(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2))
