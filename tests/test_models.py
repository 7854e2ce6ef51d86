"""Model zoo: shapes, normalization inside the model, gradients, errors, and a real training run
of the small CNN on digits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tempsoft.data import DeviceLoader, load_dataset
from tempsoft.models import MODELS, Normalize, NormalizedModel, build_model
from tempsoft.models.vit import patch_size_for

# (in_channels, image_size): digits (1 x 8 x 8), CIFAR (3 x 32 x 32).  WRN-28-10 is the heaviest
# (36M parameters); a batch of 2 keeps every forward pass well under a second on 2 cores.
SHAPES = [(1, 8), (3, 32)]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,size", SHAPES)
def test_forward_shape_and_input_gradient(name, channels, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=channels, image_size=size)
    assert isinstance(model, NormalizedModel) and model.arch == name
    model.eval()
    x = torch.rand(2, channels, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 7) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    # Attacks need d(loss)/d(input): it must exist and not vanish.
    F.cross_entropy(logits, torch.tensor([0, 3])).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_tiny_imagenet_size(name):
    model = build_model(name, num_classes=200, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 200)


def test_vit_patch_size_follows_the_paper():
    assert patch_size_for(32) == 4 and patch_size_for(64) == 8 and patch_size_for(8) == 1
    assert build_model("vit", 10).net.patch_embed.kernel_size == (4, 4)
    assert build_model("vit", 10, image_size=64).net.patch_embed.kernel_size == (8, 8)
    with pytest.raises(ValueError, match="30"):
        build_model("vit", 10, image_size=30)
    with pytest.raises(ValueError, match="built for 32x32"):
        build_model("vit", 10)(torch.rand(1, 3, 16, 16))


def test_normalization_lives_inside_the_model():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    model = build_model("small_cnn", 10, mean=mean, std=std).eval()
    x = torch.rand(3, 3, 32, 32)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), model.net(expected), atol=1e-6)
    state = model.state_dict()
    assert torch.equal(state["normalize.mean"].flatten(), torch.tensor(mean))
    assert torch.equal(state["normalize.std"].flatten(), torch.tensor(std))
    # Defaults: no shift, no scaling; one value broadcasts to every channel.
    plain = build_model("small_cnn", 10)
    assert float(plain.normalize.mean.abs().sum()) == 0 and float(plain.normalize.std.min()) == 1
    assert build_model("small_cnn", 10, mean=0.5).normalize.mean.flatten().tolist() == [0.5] * 3


def test_parameter_counts_match_the_architectures():
    counts = {name: sum(p.numel() for p in build_model(name, 10).parameters())
              for name in ("resnet18", "preact_resnet18", "vgg16_bn", "wrn28_10",
                           "cifar_cnn_wide")}
    # Published sizes for 10 classes: ResNet-18 11.17M, VGG-16-BN (CIFAR head) 14.7M,
    # WRN-28-10 36.5M.
    assert abs(counts["resnet18"] - 11_173_962) == 0
    assert 11.1e6 < counts["preact_resnet18"] < 11.2e6
    assert 14.7e6 < counts["vgg16_bn"] < 14.8e6
    assert 36.4e6 < counts["wrn28_10"] < 36.6e6
    # airbench94's widths (64, 256, 256) on the cifar_cnn layout: 2.0M.
    assert counts["cifar_cnn_wide"] == 1_973_186


@pytest.mark.parametrize("name", ["resnet", "ResNet-18", "", None])
def test_unknown_model_names_the_value(name):
    with pytest.raises(ValueError, match="unknown model") as info:
        build_model(name, 10)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=10, in_channels=0), "in_channels"),
    (dict(num_classes=10, image_size=-4), "image_size"),
    (dict(num_classes=10, mean=(0.5, 0.5)), "mean has 2 values"),
    (dict(num_classes=10, std=(1.0, 0.0, 1.0)), "std must be positive"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model("small_cnn", **kwargs)


def test_normalize_rejects_channel_mismatch():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        Normalize((0.5,) * 3, (0.5,) * 3)(torch.rand(1, 1, 4, 4))


def test_small_cnn_learns_digits_in_seconds():
    """The CPU model must reach > 95% test accuracy on the real digits in ten short epochs
    (about 10 s on two idle cores; no wall-clock assertion, the test machines are shared)."""
    torch.manual_seed(0)
    train, test = load_dataset("digits"), load_dataset("digits", split="test")
    model = build_model("small_cnn", 10, in_channels=1, image_size=8, mean=train.mean,
                        std=train.std)
    epochs = 10
    loader = DeviceLoader(train, 64, shuffle=True, augment=True, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, epochs=epochs,
                                                   steps_per_epoch=len(loader))
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.images.float() / 255).argmax(1) == test.labels).float().mean()
    assert float(accuracy) > 0.95, f"test accuracy {float(accuracy):.3f}"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_stay_fp32_under_bf16_autocast(name):
    """The head runs in fp32: a tempered loss must not see bf16-rounded logits."""
    from tempsoft.models import Head

    size = 32
    model = build_model(name, 10, image_size=size).eval()
    heads = [m for m in model.modules() if isinstance(m, Head)]
    assert len(heads) == 1 and heads[0].out_features == 10
    x = torch.rand(2, 3, size, size)
    features = torch.randn(2, heads[0].in_features).bfloat16()
    with torch.no_grad():
        exact = torch.nn.functional.linear(features.float(), heads[0].weight, heads[0].bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
            assert torch.equal(heads[0](features), exact)
    assert logits.dtype == torch.float32
