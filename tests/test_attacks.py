"""tempsoft.attacks on small real models trained here on scikit-learn's digits.

Two models, trained once per module (a few seconds): an MLP trained with CE at T=1, and the
same MLP trained with CE(z / 100) and deployed with its raw logits z (the defensive
distillation setup), whose CE@T=1 gradients underflow to exactly zero in float32.
"""
import contextlib
import importlib
import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tempsoft.attacks import APGD, APGDT, FGSM, PGD, Square, audit, checkpoints, get_loss
from tempsoft.attacks.losses import DLR, CrossEntropy, Margin

HIGH_T = 100.0


# --------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: per-op cost dominates and two OpenMP threads only add barrier
    waits (badly so on a busy CI box). The kernels' threading is tested in test_pgd_step."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    return x[train], y[train], x[test], y[test]


def _train(x, y, T: float) -> nn.Module:
    """An MLP trained with CE(z / T); it outputs the raw logits z."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):
        idx = torch.arange(step * 256, step * 256 + 256) % len(x)
        loss = F.cross_entropy(model(x[idx]) / T, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model(digits):
    return _train(digits[0], digits[1], 1.0)


@pytest.fixture(scope="module")
def distilled(digits):
    return _train(digits[0], digits[1], HIGH_T)


@pytest.fixture(scope="module")
def test_set(digits):
    return digits[2], digits[3]


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_models_are_accurate(model, distilled, test_set):
    x, y = test_set
    assert _acc(model, x, y) > 0.93 and _acc(distilled, x, y) > 0.88


# --------------------------------------------------------------------------------------
# PGD against a plain loop
# --------------------------------------------------------------------------------------
def _plain_pgd(model, x, y, eps, alpha, steps, norm, gen):
    """PGD written out with plain torch ops (torchattacks' loop), the same seed."""
    if norm == "linf":
        adv = (x + torch.empty_like(x).uniform_(-eps, eps, generator=gen)).clamp(0, 1)
    else:
        adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), y)
        (g,) = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            if norm == "linf":
                adv = adv + alpha * g.sign()
                adv = torch.clamp(x + torch.clamp(adv - x, -eps, eps), 0, 1)
            else:
                gn = g.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, 1, 1, 1)
                d = adv + alpha * g / gn - x
                dn = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                adv = torch.clamp(x + d * torch.clamp(eps / dn, max=1.0), 0, 1)
    return adv.detach()


@pytest.mark.parametrize("norm,eps,alpha", [("linf", 0.1, 0.025), ("l2", 0.5, 0.125)])
def test_pgd_matches_a_plain_loop(model, test_set, norm, eps, alpha):
    x, y = test_set
    random_start = norm == "linf"  # the L2 plain loop starts at x (no standard L2 start)
    ours = PGD(model, eps=eps, alpha=alpha, steps=10, norm=norm, random_start=random_start,
               generator=_gen(0))(x, y)
    plain = _plain_pgd(model, x, y, eps, alpha, 10, norm, _gen(0))
    robust_ours, robust_plain = _acc(model, ours, y), _acc(model, plain, y)
    assert 0.1 < robust_plain < 0.9  # the comparison is informative: not all-or-nothing
    assert abs(robust_ours - robust_plain) <= 0.005
    if norm == "linf":
        assert ((ours - x).abs().amax() <= eps + 1e-6)
    else:
        assert bool(((ours - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("gen_device", ["cpu", "cuda"])
def test_pgd_on_cuda_matches_cpu(model, test_set, gen_device):
    """The same attack on the GPU (fused CUDA/Triton step, CUDA or CPU generator)."""
    x, y = test_set
    cpu = _acc(model, PGD(model, eps=0.1, alpha=0.025, steps=10, generator=_gen(0))(x, y), y)
    gpu_model = _to_cuda(model)
    gen = torch.Generator(device=gen_device).manual_seed(0)
    adv = PGD(gpu_model, eps=0.1, alpha=0.025, steps=10, generator=gen)(x.cuda(), y.cuda())
    assert adv.device.type == "cuda"
    assert (adv.cpu() - x).abs().amax() <= 0.1 + 1e-6
    # A CPU generator draws the same start as the CPU run; a CUDA one draws other numbers,
    # and robust accuracy over random starts spreads by ~1.5 points on this set.
    tol = 0.005 if gen_device == "cpu" else 0.04
    assert abs(_acc(gpu_model, adv, y.cuda()) - cpu) <= tol


def _to_cuda(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).cuda().eval()


@pytest.mark.parametrize("norm,eps_list", [("linf", [0.0, 0.05, 0.1, 0.2, 0.3]),
                                           ("l2", [0.0, 0.25, 0.5, 1.0, 1.5])])
def test_robust_accuracy_falls_as_eps_grows(model, test_set, norm, eps_list):
    x, y = test_set
    accs = [_acc(model, PGD(model, eps=e, alpha=e / 4, steps=10, norm=norm,
                            generator=_gen(0))(x, y), y) for e in eps_list]
    assert accs[0] == pytest.approx(_acc(model, x, y))  # eps = 0 leaves the images alone
    assert all(b <= a + 0.005 for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < 0.05 and accs[2] < accs[0] - 0.2, accs


@pytest.mark.parametrize("attack", ["pgd-ce", "pgd-cw", "apgd-dlr"])
def test_targeted_attacks_reach_their_targets(model, test_set, attack):
    x, y = test_set
    target = (y + 1) % 10
    if attack == "apgd-dlr":
        atk = APGD(model, eps=0.3, steps=50, loss="dlr", targeted=True, generator=_gen(0))
    else:
        atk = PGD(model, eps=0.3, alpha=0.02, steps=40, loss=attack[4:], targeted=True,
                  generator=_gen(0))
    adv = atk(x, target)
    with torch.no_grad():
        hit = (model(adv).argmax(1) == target).float().mean().item()
    assert hit > 0.9


def test_fgsm_is_one_sign_step(model, test_set):
    x, y = test_set
    eps = 0.1
    x_req = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(CrossEntropy()(model(x_req), y).sum(), x_req)
    want = torch.clamp(x + eps * g.sign(), 0, 1)
    adv = FGSM(model, eps=eps)(x, y)
    assert torch.equal(adv, want)
    assert _acc(model, adv, y) >= _acc(model, PGD(model, eps=eps, alpha=0.025, steps=10,
                                                  generator=_gen(0))(x, y), y)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_is_at_least_as_strong_as_pgd_with_the_same_loss(model, test_set, loss):
    x, y = test_set
    pgd = PGD(model, eps=0.1, alpha=0.025, steps=10, loss=loss, generator=_gen(0))(x, y)
    adv = APGD(model, eps=0.1, steps=100, loss=loss, generator=_gen(0))(x, y)
    assert (adv - x).abs().amax() <= 0.1 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert _acc(model, adv, y) <= _acc(model, pgd, y)


def _reference_checkpoints(n_iter: int) -> list[int]:
    """The step-size checks of AutoAttack's autopgd_base.py, simulated line by line."""
    n_iter_2, n_iter_min = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1)
    size_decr = max(int(0.03 * n_iter), 1)
    k, counter3, out = n_iter_2 + 0, 0, [0]
    for i in range(n_iter):
        counter3 += 1
        if counter3 == k:
            out.append(i + 1)
            k = max(k - size_decr, n_iter_min)
            counter3 = 0
    return out


def test_apgd_checkpoints_follow_the_authors_code():
    assert checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    for n in range(1, 301):
        assert checkpoints(n) == _reference_checkpoints(n), n


def test_restarts_batched_keep_the_worst_case(model, test_set):
    x, y = test_set
    n = len(y)

    def robust(**kw):
        return _acc(model, PGD(model, eps=0.1, alpha=0.025, steps=5, generator=_gen(0),
                               **kw)(x, y), y)

    one, four = robust(restarts=1), robust(restarts=4)
    four_sequential = robust(restarts=4, max_batch=n)  # one restart per forward pass
    assert four <= one
    assert abs(four - four_sequential) <= 1 / n  # same draws; only batch-size round-off


def test_early_stop_freezes_successes(model, test_set):
    x, y = test_set
    kw = dict(eps=0.1, alpha=0.025, steps=10, generator=None)
    plain = PGD(model, **{**kw, "generator": _gen(0)})(x, y)
    early = PGD(model, early_stop=True, **{**kw, "generator": _gen(0)})(x, y)
    # Trajectories agree until a sample first succeeds; early stop then keeps it there.
    assert _acc(model, early, y) <= _acc(model, plain, y)
    assert (early - x).abs().sum() < (plain - x).abs().sum()


def test_channels_last_images(model, test_set):
    """Non-contiguous images (channels-last here) give the same result as contiguous ones."""
    x, y = test_set[0][:32], test_set[1][:32]
    x4 = x.expand(32, 3, 8, 8).contiguous()
    wide = nn.Sequential(nn.Conv2d(3, 1, 1, bias=False), model)
    nn.init.constant_(wide[0].weight, 1 / 3)
    a = PGD(wide, steps=3, generator=_gen(0))(x4, y)
    b = PGD(wide, steps=3, generator=_gen(0))(x4.to(memory_format=torch.channels_last), y)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_per_sample_eps(model, test_set):
    x, y = test_set[0][:20], test_set[1][:20]
    eps = torch.full((20,), 0.2)
    eps[:10] = 0.0
    adv = PGD(model, eps=eps, alpha=0.05, steps=5, generator=_gen(0))(x, y)
    assert torch.equal(adv[:10], x[:10])
    assert (adv[10:] - x[10:]).abs().amax() <= 0.2 + 1e-6


@pytest.mark.parametrize("loss", ["ce", "cw", "dlr"])
def test_int32_labels_and_an_empty_batch(model, test_set, loss):
    x, y = test_set[0][:16], test_set[1][:16]
    attack = PGD(model, steps=2, loss=loss, generator=_gen(0))
    a = attack(x, y.to(torch.int32))
    b = PGD(model, steps=2, loss=loss, generator=_gen(0))(x, y)
    assert torch.equal(a, b)
    assert attack(x[:0], y[:0]).shape == (0, 1, 8, 8)


# --------------------------------------------------------------------------------------
# Model mode, inputs, gradients
# --------------------------------------------------------------------------------------
class _ModeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(self.training)
        return x


def _recording_model(base: nn.Module):
    rec = _ModeRecorder()
    return nn.Sequential(rec, base), rec


@pytest.mark.parametrize("make", [lambda m: PGD(m, steps=3), lambda m: APGD(m, steps=3),
                                  lambda m: FGSM(m)], ids=["PGD", "APGD", "FGSM"])
def test_model_runs_in_eval_mode_and_its_mode_is_restored(model, test_set, make):
    x, y = test_set[0][:16], test_set[1][:16]
    wrapped, rec = _recording_model(model)
    wrapped.train()
    wrapped[1][1].eval()  # a mixed state (like frozen batch-norm) must survive too
    before = [m.training for m in wrapped.modules()]
    make(wrapped)(x, y)
    assert rec.seen and not any(rec.seen)
    assert [m.training for m in wrapped.modules()] == before


def test_mode_restored_after_an_error(test_set):
    x, y = test_set[0][:4], test_set[1][:4]

    class Boom(nn.Module):
        def forward(self, z):
            if self.calls > 0:
                raise RuntimeError("boom")
            self.calls += 1
            return z.flatten(1)[:, :10]

    m = Boom()
    m.calls = 0
    m.scale = nn.Parameter(torch.ones(()))
    m.train()
    with pytest.raises(RuntimeError, match="boom"):
        PGD(m, steps=2)(x, y)
    assert m.training and m.scale.requires_grad


def test_inputs_are_not_mutated_and_parameter_grads_untouched(model, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    x0, y0 = x.clone(), y.clone()
    params = list(model.parameters())
    for p in params:
        p.grad = None
    params[0].requires_grad_(False)  # a frozen layer stays frozen; the others come back
    flags = [p.requires_grad for p in params]
    try:
        PGD(model, steps=3, restarts=2, generator=_gen(0))(x, y)
        APGD(model, steps=5, generator=_gen(0))(x, y)
        assert torch.equal(x, x0) and torch.equal(y, y0)
        assert all(p.grad is None for p in params)
        assert [p.requires_grad for p in params] == flags
    finally:
        params[0].requires_grad_(True)


def test_attack_works_under_no_grad(model, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    with torch.no_grad():
        adv = PGD(model, eps=0.1, alpha=0.05, steps=3, generator=_gen(0))(x, y)
    assert not torch.equal(adv, x)


def test_same_generator_seed_same_result(model, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    a = PGD(model, steps=3, generator=_gen(5))(x, y)
    b = PGD(model, steps=3, generator=_gen(5))(x, y)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------
# Gradient masking and the audit
# --------------------------------------------------------------------------------------
def test_high_temperature_model_masks_ce_but_not_cw(distilled, test_set):
    x, y = test_set
    ce = _acc(distilled, PGD(distilled, eps=0.1, alpha=0.0125, steps=20, loss="ce",
                             generator=_gen(0))(x, y), y)
    cw = _acc(distilled, PGD(distilled, eps=0.1, alpha=0.0125, steps=20, loss="cw",
                             generator=_gen(0))(x, y), y)
    assert ce > cw + 0.25, (ce, cw)


class _Quantized(nn.Module):
    """Input quantization to 4 levels in front of a model: every input gradient is zero."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(torch.round(x * 4) / 4)


class _GridOnlyGradient(torch.autograd.Function):
    """Identity; its backward passes the true gradient only for images on the digits' 1/16
    pixel grid (the clean images) and noise of the same size elsewhere: gradients that help
    a single step from the clean image but not an iterative attack from a random start."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        on_grid = ((x * 16 - torch.round(x * 16)).abs() < 1e-4).flatten(1).all(dim=1)
        noise = torch.randn(g.shape, generator=torch.Generator().manual_seed(g.shape[0]))
        noise = noise * (g.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1)).view(
            -1, 1, 1, 1)
        return torch.where(on_grid.view(-1, 1, 1, 1), g, noise)


class _CleanPointGradients(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(_GridOnlyGradient.apply(x))


@pytest.fixture(scope="module")
def quantized(model):
    return _Quantized(model).eval()


def _audit(m, x, y, **kw):
    kw = {"eps": 0.1, "train_T": 1.0, "steps": 20, "apgd_steps": 50, "autoattack": "off",
          "square_queries": 1000, **kw}
    return audit(m, x, y, **kw)


def test_audit_passes_a_standard_model(model, test_set):
    report = _audit(model, *test_set)
    assert "ce@T=1" in report.robust and len([k for k in report.robust if k.startswith("ce")]) == 1
    assert all(c.passed for c in report.checks.values()), str(report)
    assert set(report.dead_gradients) == {"ce@T=1", "cw", "fgsm", "apgd-dlr", "unbounded"}
    assert max(report.dead_gradients.values()) == 0.0
    assert report.robust["unbounded"] == 0.0
    assert not report.masking and "no sign of gradient masking" in report.verdict
    # worst case: over every attack but the unbounded sanity run
    assert report.worst_case <= min(v for k, v in report.robust.items() if k != "unbounded")


def test_audit_catches_a_saturated_softmax(distilled, test_set):
    """(a), (c) and (e) fire on the high-T model: CE@T=1 gradients underflow to zero."""
    x, y = test_set
    report = _audit(distilled, x, y, train_T=HIGH_T)
    r = report.robust
    assert set(r) >= {"clean", "ce@T=1", "ce@T=100", "cw", "fgsm", "apgd-dlr", "square",
                      "unbounded"}
    assert report.dead_gradients["ce@T=1"] > 0.5 and report.dead_gradients["cw"] == 0.0
    assert r["ce@T=1"] > r["cw"] + 0.25 and r["ce@T=1"] > r["apgd-dlr"] + 0.25
    assert report.failed_checks == ["a", "c", "e"], str(report)
    assert report.masking and "gradient masking suspected" in report.verdict
    assert "failed (a) dead gradients, (c) unbounded eps, (e) agreement" in report.verdict
    assert report.worst_case <= r["apgd-dlr"]
    assert report.to_dict()["masking"] is True and "FAIL" in str(report)


def test_audit_catches_a_model_whose_gradients_are_all_zero(quantized, test_set):
    """Every gradient attack is blind, so they all agree ((e) passes); the dead gradients,
    the unbounded run and the gradient-free Square Attack give it away."""
    report = _audit(quantized, *test_set)
    assert min(report.dead_gradients.values()) == 1.0
    assert report.checks["e"].passed
    assert report.failed_checks == ["a", "c", "d"], str(report)
    assert report.robust["square"] < report.robust["ce@T=1"] - 0.1


def test_audit_catches_a_model_broken_only_by_a_transfer_attack(quantized, model, test_set):
    """No black-box attack here: the transfer attack from the unquantized surrogate alone
    breaks what every gradient attack missed."""
    report = _audit(quantized, *test_set, surrogate=model, square_queries=0)
    assert "square" not in report.robust and "transfer" in report.robust
    assert report.checks["d"].passed is False and "transfer breaks" in report.checks["d"].detail
    assert report.robust["transfer"] < report.robust["ce@T=1"] - 0.1


def test_audit_transfer_from_a_good_surrogate_passes_on_a_standard_model(model, test_set):
    report = _audit(model, *test_set, surrogate=model, square_queries=0)
    assert report.checks["d"].passed, str(report)


def test_audit_catches_fgsm_beating_pgd(model, test_set):
    """(b): gradients that are useful only at the clean point."""
    wrapped = _CleanPointGradients(model).eval()
    report = _audit(wrapped, *test_set, square_queries=0)
    assert report.robust["fgsm"] < report.robust["ce@T=1"] - 0.1
    assert report.checks["b"].passed is False and "b" in report.failed_checks
    assert report.checks["a"].passed  # the gradients are not dead, only useless


def test_audit_says_what_did_not_run(model, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    with pytest.warns(UserWarning, match="square did not run"):
        report = _audit(model, x - 1.0, y, lower=-1.0, upper=0.0, autoattack="standard")
    assert set(report.not_run) == {"square", "autoattack"}
    assert report.checks["d"].passed is None and "not tested: (d)" in report.verdict
    assert "NOT RUN" in str(report)


def test_no_attack_returns_nan_images_from_a_saturated_linear_model(backend_name):
    """A linear model whose logit gap is ~86 at T=1 and whose weights are small: the CE@T=1
    input gradients are fp32 denormals, so alpha / ||g|| overflows. L2 steps must stay
    finite (no inf * 0 = NaN), and since no perturbation of this size can move a logit by
    more than ~1e-3, the model is provably robust: robust accuracy must equal 1."""
    x = torch.rand(24, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(24, dtype=torch.int64)
    # Elementwise (a diagonal linear map plus a bias): a matrix product's backward may
    # flush denormals to zero, which would hide the case.
    bias = torch.zeros(10)
    bias[0] = 86.0
    linear = _Elementwise(1e-4, bias)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(linear(xr), y, reduction="sum"), xr)
    norms = grad.double().flatten(1).norm(dim=1)  # in fp32 the squares underflow to 0
    assert (norms > 0).all() and 0.1 / norms.max() > torch.finfo(torch.float32).max
    for attack in (PGD(linear, eps=0.5, alpha=0.1, steps=5, norm="l2", generator=_gen(0),
                       backend=backend_name),
                   APGD(linear, eps=0.5, steps=5, norm="l2", generator=_gen(0),
                        backend=backend_name),
                   APGD(linear, eps=8 / 255, steps=5, generator=_gen(0), backend=backend_name)):
        adv = attack(x, y)
        assert torch.isfinite(adv).all()
        assert _acc(linear, adv, y) == 1.0


class _Elementwise(nn.Module):
    """logits = scale * (the first 10 pixels) + bias."""

    def __init__(self, scale: float, bias: torch.Tensor) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("bias", bias)

    def forward(self, x):
        return self.scale * x.flatten(1)[:, :10] + self.bias


@pytest.fixture(params=["torch", "cpu", "triton"])
def backend_name(request):
    from tempsoft._dispatch import backends

    ok, why = backends()[request.param]
    if not ok:
        pytest.skip(f"backend {request.param!r} unavailable: {why}")
    return request.param


def test_an_attack_that_returns_nan_raises(model, test_set):
    class Broken(PGD):
        def _run(self, geo, labels):
            out = geo.x_nat.clone()
            out[1] = float("nan")
            return out

    x, y = test_set[0][:4], test_set[1][:4]
    with pytest.raises(RuntimeError, match=r"non-finite adversarial image\(s\) of 4 .*index 1"):
        Broken(model, steps=1)(x, y)


def test_a_plain_function_as_model_warns_and_as_is_does_not(model, test_set):
    x, y = test_set[0][:8], test_set[1][:8]
    with pytest.warns(UserWarning, match="not an nn.Module, so it cannot be put in eval mode"):
        PGD(lambda z: model(z), steps=1)(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PGD(lambda z: model(z), steps=1, model_mode="as-is")(x, y)


def test_train_model_mode_runs_in_train_mode(model, test_set):
    x, y = test_set[0][:8], test_set[1][:8]
    wrapped, rec = _recording_model(model)
    wrapped.eval()
    PGD(wrapped, steps=2, model_mode="train")(x, y)
    # The label check's one-image forward runs in eval mode (batch norm must not see a
    # one-image batch); every attack step runs in train mode.
    assert rec.seen[0] is False and rec.seen[1:] and all(rec.seen[1:])
    assert not wrapped.training
    with pytest.raises(ValueError, match="model_mode must be one of"):
        PGD(model, model_mode="inference")


def test_gradient_stats_count_only_points_not_yet_adversarial(distilled, model, test_set):
    x, y = test_set
    attack = PGD(distilled, eps=0.1, alpha=0.0125, steps=5, generator=_gen(0))
    attack(x, y)
    assert attack.gradient_stats.dead_fraction > 0.5
    attack.gradient_stats.reset()
    assert attack.gradient_stats.evaluations == 0
    healthy = PGD(model, eps=0.3, alpha=0.05, steps=10, generator=_gen(0))
    healthy(x, y)
    # most points are broken early: later evaluations there do not count
    assert healthy.gradient_stats.evaluations < 10 * len(y) * 0.6
    assert healthy.gradient_stats.dead_fraction == 0.0


# --------------------------------------------------------------------------------------
# The reference implementation (AutoAttack) in the loop
# --------------------------------------------------------------------------------------
needs_autoattack = pytest.mark.skipif(
    not any(importlib.util.find_spec(m) for m in ("pyautoattack", "autoattack")),
    reason="AutoAttack (pip install pyautoattack) is not installed")


def _reference_module():
    from tempsoft.attacks.autoattack import load_module

    return importlib.import_module(load_module().__name__ + ".autopgd_base")


@needs_autoattack
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_matches_the_reference_within_seed_noise(model, test_set, norm, eps, loss):
    x, y = test_set
    ref_mod = _reference_module()
    ours, ref = [], []
    for seed in range(3):
        ours.append(_acc(model, APGD(model, eps=eps, norm=norm, steps=100, loss=loss,
                                     generator=_gen(seed))(x, y), y))
        attack = ref_mod.APGDAttack(model, n_iter=100, norm={"linf": "Linf", "l2": "L2"}[norm],
                                    eps=eps, seed=seed, loss=loss, device="cpu")
        with torch.random.fork_rng(), _quiet():
            ref.append(_acc(model, attack.perturb(x, y), y))
    assert 0.1 < sum(ref) / 3 < 0.9  # informative: not all-or-nothing
    assert abs(sum(ours) / 3 - sum(ref) / 3) <= 0.015, (ours, ref)


@needs_autoattack
def test_apgd_t_matches_the_reference(model, test_set):
    x, y = test_set
    ref_mod = _reference_module()
    ours = _acc(model, APGDT(model, eps=0.1, steps=100, generator=_gen(0))(x, y), y)
    attack = ref_mod.APGDAttack_targeted(model, n_iter=100, norm="Linf", eps=0.1, seed=0,
                                         device="cpu", n_target_classes=9)
    with torch.random.fork_rng(), _quiet():
        ref = _acc(model, attack.perturb(x, y), y)
    assert abs(ours - ref) <= 0.015, (ours, ref)
    # APGD-T is at least as strong as APGD-DLR, as in AutoAttack
    assert ours <= _acc(model, APGD(model, eps=0.1, loss="dlr", generator=_gen(0))(x, y), y)


@contextlib.contextmanager
def _quiet():
    """The reference code warns about zero gradients on its own; not what these tests test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@needs_autoattack
def test_audit_runs_standard_autoattack_by_default(distilled, test_set):
    x, y = test_set[0][:64], test_set[1][:64]
    state = torch.get_rng_state()
    report = audit(distilled, x, y, eps=0.1, train_T=HIGH_T, steps=10, apgd_steps=20,
                   square_queries=0)
    assert torch.equal(torch.get_rng_state(), state)  # AutoAttack reseeds only its own copy
    assert report.autoattack["version"] == "standard"
    assert report.autoattack["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert report.robust["autoattack"] < report.robust["ce@T=1"] - 0.2
    assert set(report.autoattack["robust_after"]) >= {"apgd-ce"}
    assert report.masking and not report.not_run


@needs_autoattack
def test_autoattack_flags_are_recorded(quantized, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    report = _audit(quantized, x, y, autoattack="custom", square_queries=0)
    assert report.autoattack["attacks"] == ["apgd-ce", "apgd-t"]
    assert any("zero gradient" in f for f in report.autoattack["flags"])
    assert "AutoAttack's own flags" in str(report)


@needs_autoattack
def test_square_attack_is_gradient_free(quantized, test_set):
    x, y = test_set
    adv = Square(quantized, eps=0.1, queries=500)(x, y)
    assert (adv - x).abs().amax() <= 0.1 + 1e-6 and torch.isfinite(adv).all()
    assert _acc(quantized, adv, y) < _acc(quantized, x, y) - 0.1


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------
def test_losses_on_known_logits():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 5.0, 1.0]])
    y = torch.tensor([0, 1])
    assert torch.equal(Margin()(z, y), torch.tensor([1.0 - 3.0, 5.0 - 2.0]))
    assert torch.equal(Margin(targeted=True)(z, torch.tensor([1, 2])),
                       torch.tensor([1.0 - 3.0, 5.0 - 2.0]))
    ce = lambda logits: F.cross_entropy(logits, y, reduction="none")  # noqa: E731
    torch.testing.assert_close(CrossEntropy(T=2.0)(z, y), ce(z / 2))
    torch.testing.assert_close(CrossEntropy(targeted=True)(z, y), -ce(z))
    # DLR (untargeted): -(z_y - max_{j!=y} z_j) / (z_(1) - z_(3))
    torch.testing.assert_close(DLR()(z, y), torch.tensor([-(3.0 - 1.0) / (3.0 - 0.0),
                                                          -(2.0 - 5.0) / (5.0 - 1.0)]))
    # targeted DLR: (z_t - max_{j!=t} z_j) / (z_(1) - (z_(3) + z_(4)) / 2)
    torch.testing.assert_close(DLR(targeted=True)(z, torch.tensor([1, 2])),
                               torch.tensor([(1.0 - 3.0) / (3.0 + 0.5), (5.0 - 2.0) / (5.0 - 0.5)]))


def test_dlr_is_shift_and_scale_invariant():
    z = torch.randn(8, 10, generator=_gen(0))
    y = torch.randint(0, 10, (8,), generator=_gen(1))
    torch.testing.assert_close(DLR()(7.0 * z + 3.0, y), DLR()(z, y))


def test_loss_errors():
    with pytest.raises(ValueError, match="at least 3 classes, got 2"):
        DLR()(torch.randn(4, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="loss must be one of"):
        get_loss("hinge")
    with pytest.raises(ValueError, match="T must be a positive finite number"):
        get_loss("ce", T=0.0)


def test_custom_loss_callable(model, test_set):
    x, y = test_set[0][:32], test_set[1][:32]
    seen = []

    def loss(logits, labels):
        seen.append(logits.shape)
        return F.cross_entropy(logits, labels, reduction="none")

    PGD(model, steps=2, loss=loss, generator=_gen(0))(x, y)
    assert seen and seen[0] == (32, 10)
    with pytest.raises(ValueError, match="one value per sample"):
        PGD(model, steps=1, loss=lambda z, t: z.sum())(x, y)


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
BAD_CONSTRUCT = [
    (dict(eps=-0.1), ValueError, r"eps must be >= 0, got -0\.1"),
    (dict(alpha=-1.0), ValueError, "alpha must be >= 0 and finite, got -1.0"),
    (dict(alpha=float("inf")), ValueError, "alpha must be >= 0 and finite, got inf"),
    (dict(start="sphere"), ValueError, "start must be one of"),
    (dict(steps=0), ValueError, "steps must be an integer >= 1, got 0"),
    (dict(restarts=1.5), ValueError, "restarts must be an integer >= 1, got 1.5"),
    (dict(norm="l1"), ValueError, "norm must be one of"),
    (dict(loss="mse"), ValueError, "loss must be one of"),
    (dict(lower=1.0, upper=0.0), ValueError, "need lower < upper"),
    (dict(generator=0), TypeError, "generator must be a torch.Generator"),
]


@pytest.mark.parametrize("kw,exc,match", BAD_CONSTRUCT, ids=[m for _, _, m in BAD_CONSTRUCT])
def test_bad_attack_arguments(model, kw, exc, match):
    with pytest.raises(exc, match=match):
        PGD(model, **kw)


def test_bad_call_inputs(model, test_set):
    x, y = test_set[0][:8], test_set[1][:8]
    attack = PGD(model, steps=1)
    with pytest.raises(ValueError,
                       match=r"must lie in \[lower, upper\] = \[0.0, 1.0\].*values in \[-0.5"):
        attack(x - 0.5, y)
    with pytest.raises(ValueError, match=r"one label per image.*shape \(8,\), got \(9,\)"):
        attack(x, torch.cat([y, y[:1]]))
    with pytest.raises(ValueError, match=r"one label per image.*got \(8, 1\)"):
        attack(x, y[:, None])
    with pytest.raises(TypeError, match="integer class indices, got dtype torch.float32"):
        attack(x, y.float())
    with pytest.raises(IndexError, match="label 10 is out of range for a model with 10 classes"):
        attack(x, torch.full_like(y, 10))
    with pytest.raises(IndexError, match="label -1 is out of range"):
        attack(x, torch.full_like(y, -1))
    with pytest.raises(ValueError, match="must be a batch"):
        attack(x[0, 0, 0], y[:1])
    with pytest.raises(TypeError, match="float32 or float64, got torch.float16"):
        attack(x.half(), y)
    with pytest.raises(ValueError, match=r"eps must be a number, a 0-d tensor or a \(8,\) tensor"):
        PGD(model, eps=torch.full((3,), 0.1))(x, y)
    with pytest.raises(ValueError, match="model must return logits of shape"):
        PGD(lambda z: z.flatten(), steps=1)(x, y)


def test_bad_audit_inputs(model, test_set):
    x, y = test_set[0][:8], test_set[1][:8]
    with pytest.raises(ValueError, match="labels of shape"):
        audit(model, x, y[:4])
    with pytest.raises(ValueError, match="eps must be >= 0"):
        audit(model, x, y, eps=-1.0)
    with pytest.raises(ValueError, match="train_T must be a positive finite number"):
        audit(model, x, y, train_T=0)
    with pytest.raises(ValueError, match="non-empty batch"):
        audit(model, x[:0], y[:0])
    with pytest.raises(ValueError, match="autoattack must be one of"):
        audit(model, x, y, autoattack=True)
    with pytest.raises(ValueError, match="square_queries must be an int >= 0"):
        audit(model, x, y, square_queries=-1)


# --------------------------------------------------------------------------------------
# Docstring examples
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pgd", "fgsm", "apgd", "audit", "losses", "autoattack"])
def test_docstring_examples_run(name):
    import doctest
    import sys

    import tempsoft.attacks  # noqa: F401  (loads the submodules)

    module = sys.modules[f"tempsoft.attacks.{name}"]
    torch.manual_seed(0)
    result = doctest.testmod(module, globs={**vars(module), "torch": torch},
                             optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_verdict_tells_a_weak_attack_from_gradient_masking():
    from tempsoft.attacks.audit import CHECKS, Check, _verdict

    def checks(failed):
        return {k: Check(name, k not in failed, "") for k, name in CHECKS.items()}

    assert _verdict(checks(set())).startswith("no sign of gradient masking")
    only_e = _verdict(checks({"e"}))
    assert only_e.startswith("attacks disagree") and "no other sign of gradient masking" in only_e
    assert _verdict(checks({"a", "e"})).startswith("gradient masking suspected")
    untested = checks(set())
    untested["d"] = Check(CHECKS["d"], None, "")
    assert "not tested: (d) gradient-free attacks" in _verdict(untested)
