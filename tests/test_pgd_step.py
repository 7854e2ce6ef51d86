"""The fused PGD step (tempsoft.pgd_step_) on every backend against the reference, and the
random start.

Ground truth: ``reference.pgd_step`` defines the arithmetic order; in float32 every backend
must reproduce it exactly (equal values). The reference itself is checked against the plain
torchattacks-style composition (Linf, exact) and against float64 math (L2).
"""
import math

import pytest
import torch

from tempsoft._dispatch import backends
from tempsoft.kernels import reference
from tempsoft.ops.pgd import NORMS, pgd_step_, random_start

CUDA = torch.cuda.is_available()


def _available(name: str) -> bool:
    return backends()[name][0]


# (backend, device): CPU tensors under every CPU backend (Triton under the interpreter
# when there is no GPU), CUDA tensors under the GPU backends when a GPU is present.
CASES = [("torch", "cpu"), ("cpu", "cpu")]
CASES += [("triton", "cpu")] if not CUDA else [("torch", "cuda"), ("cuda", "cuda"),
                                              ("triton", "cuda")]


def _skip_unavailable(backend: str) -> None:
    if not _available(backend):
        pytest.skip(f"backend {backend!r} unavailable: {backends()[backend][1]}")


# Shapes: why each is here.
SHAPES = [
    (7, 3, 5, 5),   # 75 elements per sample: no vector width divides it (SIMD tails)
    (1, 1000),      # one sample: the Linf kernel splits inside a sample
    (33, 3, 8, 8),  # more samples than threads; the flat split crosses sample boundaries
    (4, 37),        # 2-D input, odd row length
    (3, 1),         # one element per sample
]


def _case(shape, norm, dtype=torch.float32, device="cpu", seed=0, lower=0.0, upper=1.0,
          per_sample=True, with_active=True):
    """Inputs that reach every branch: points outside the ball, zero/NaN gradients, clamps."""
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    x_nat = lower + (upper - lower) * torch.rand(shape, generator=g, dtype=dtype)
    scale = 0.1 if norm == "linf" else 1.0
    x_adv = (x_nat + scale * torch.randn(shape, generator=g, dtype=dtype)).clamp(lower, upper)
    grad = torch.randn(shape, generator=g, dtype=dtype)
    grad.view(b, -1)[:, ::7] = 0.0                 # exact zeros: sign 0
    if b > 2:
        grad[0] = 0.0                              # an all-zero row: L2 takes no step
        grad[1].view(-1)[0] = float("nan")         # Linf: that pixel stays; L2: no step
    if per_sample:
        eps = (0.02 + 0.1 * torch.rand(b, generator=g, dtype=dtype)) * (10 * scale)
        alpha = (0.005 + 0.02 * torch.rand(b, generator=g, dtype=dtype)) * (10 * scale)
        if b > 3:
            eps[3] = 0.0                           # a zero ball
    else:
        eps, alpha = 8 / 255, 2 / 255
    active = (torch.rand(b, generator=g) > 0.3) if with_active else None
    move = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [move(t) for t in (x_adv, grad, x_nat, eps, alpha, active)]


def _reference(x_adv, grad, x_nat, eps, alpha, norm, lower, upper, active):
    b = x_adv.shape[0]
    as_t = lambda v: v if isinstance(v, torch.Tensor) else torch.full(  # noqa: E731
        (b,), v, dtype=x_adv.dtype, device=x_adv.device)
    return reference.pgd_step(x_adv, grad, x_nat, as_t(eps), as_t(alpha), NORMS[norm], lower,
                              upper, active)


# --------------------------------------------------------------------------------------
# The reference against independent formulations
# --------------------------------------------------------------------------------------
def test_reference_linf_equals_the_plain_composition():
    x_adv, grad, x_nat, _, _, _ = _case((16, 3, 8, 8), "linf")
    eps, alpha = 8 / 255, 2 / 255
    plain = x_adv + alpha * grad.nan_to_num(0.0).sign()
    plain = torch.clamp(x_nat + torch.clamp(plain - x_nat, min=-eps, max=eps), min=0, max=1)
    out = _reference(x_adv, grad, x_nat, eps, alpha, "linf", 0.0, 1.0, None)
    assert torch.equal(out, plain)


def test_reference_l2_agrees_with_float64_math():
    x_adv, grad, x_nat, eps, alpha, _ = _case((16, 3, 8, 8), "l2", with_active=False)
    grad = torch.randn(grad.shape, generator=torch.Generator().manual_seed(1))
    out = _reference(x_adv, grad, x_nat, eps, alpha, "l2", 0.0, 1.0, None)

    x, g, x0 = (t.double().flatten(1) for t in (x_adv, grad, x_nat))
    step = x + alpha.double()[:, None] * g / g.norm(dim=1, keepdim=True)
    d = step - x0
    d = d * torch.clamp(eps.double()[:, None] / d.norm(dim=1, keepdim=True), max=1.0)
    want = (x0 + d).clamp(0, 1).reshape(out.shape)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-6)
    radius = (out - x_nat).flatten(1).double().norm(dim=1)
    assert bool((radius <= eps.double() * (1 + 1e-6) + 1e-7).all())


# --------------------------------------------------------------------------------------
# Every backend against the reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_sample", [True, False], ids=["eps_per_sample", "eps_number"])
def test_backend_equals_reference_fp32(backend, device, norm, shape, per_sample):
    _skip_unavailable(backend)
    x_adv, grad, x_nat, eps, alpha, active = _case(shape, norm, device=device,
                                                   per_sample=per_sample)
    want = _reference(x_adv, grad, x_nat, eps, alpha, norm, 0.0, 1.0, active)
    got = x_adv.clone()
    out = pgd_step_(got, grad, x_nat, eps, alpha, norm=norm, active=active, backend=backend)
    assert out is got
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_backend_other_box_and_no_mask(backend, device, norm):
    """A box other than [0, 1] (an unnormalized range), no active mask."""
    _skip_unavailable(backend)
    x_adv, grad, x_nat, eps, alpha, _ = _case((9, 2, 6, 6), norm, device=device, lower=-1.5,
                                              upper=2.0, with_active=False, seed=3)
    want = _reference(x_adv, grad, x_nat, eps, alpha, norm, -1.5, 2.0, None)
    got = pgd_step_(x_adv.clone(), grad, x_nat, eps, alpha, norm, -1.5, 2.0, backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_backend_fp64(backend, norm):
    """fp64: Linf is exact; the L2 sums are the result's own precision (a few ulps)."""
    _skip_unavailable(backend)
    x_adv, grad, x_nat, eps, alpha, active = _case((33, 3, 8, 8), norm, dtype=torch.float64)
    want = _reference(x_adv, grad, x_nat, eps, alpha, norm, 0.0, 1.0, active)
    got = pgd_step_(x_adv.clone(), grad, x_nat, eps, alpha, norm, active=active, backend=backend)
    if norm == "linf":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend,device", CASES)
def test_inactive_rows_untouched_and_nan_gradient_pixel_stays(backend, device):
    _skip_unavailable(backend)
    x_adv, grad, x_nat, eps, alpha, active = _case((8, 3, 4, 4), "linf", device=device)
    active[:] = True
    active[2] = False
    got = pgd_step_(x_adv.clone(), grad, x_nat, eps, alpha, "linf", active=active,
                    backend=backend)
    assert torch.equal(got[2], x_adv[2])
    # grad[1] has a NaN at its first entry: that pixel moves only by the projection/clamp.
    first = lambda t: t[1].reshape(-1)[0]  # noqa: E731
    d = torch.clamp(first(x_adv) - first(x_nat), -eps[1], eps[1])
    assert first(got) == torch.clamp(first(x_nat) + d, 0, 1)
    assert not torch.isnan(got).any()


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_nan_in_the_images_propagates_like_the_reference(backend, device, norm):
    """A NaN pixel in x_adv or x_nat stays NaN (torch.clamp / minimum / maximum propagate
    it); a minimum that returns the other operand would silently turn it into a bound."""
    _skip_unavailable(backend)
    x_adv, grad, x_nat, eps, alpha, _ = _case((6, 3, 4, 4), norm, device=device,
                                              with_active=False, seed=5)
    x_adv[0].view(-1)[3] = float("nan")
    x_nat[2].view(-1)[5] = float("nan")
    want = _reference(x_adv, grad, x_nat, eps, alpha, norm, 0.0, 1.0, None)
    got = pgd_step_(x_adv.clone(), grad, x_nat, eps, alpha, norm, backend=backend)
    assert torch.isnan(want[0].view(-1)[3]) and torch.isnan(want[2].view(-1)[5])
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    assert same.all(), f"{int((~same).sum())} elements differ from the reference"


def test_native_kernel_refuses_aliased_inputs():
    """The kernels the attacks call directly (no copies made for them) check aliasing; the
    CUDA kernel shares this check (csrc/op_args.h) and is tested in tests/test_gpu.py."""
    _skip_unavailable("cpu")
    x_adv, grad, x_nat, eps, alpha, active = _case((4, 3, 4, 4), "l2")
    ops = torch.ops.tempsoft_C
    view = x_adv.view(x_adv.shape)  # another tensor over the same memory
    for g, x0 in ((x_adv, x_nat), (grad, x_adv), (grad, view)):
        with pytest.raises(ValueError, match="must not share memory with x_adv"):
            ops.pgd_step_(x_adv, g, x0, eps, alpha, active, 2, 0.0, 1.0)


def test_triton_launchers_enter_the_tensors_device(monkeypatch):
    """Triton launches on the current device; both launchers first make the tensors' device
    current (tempsoft.kernels.triton_support.on_device). Multi-GPU runs are in test_gpu.py."""
    _skip_unavailable("triton")
    if CUDA:
        pytest.skip("CPU tensors through the interpreter; test_gpu.py covers the GPU")
    from tempsoft.kernels import triton_ce, triton_pgd
    from tempsoft.kernels.triton_support import on_device

    seen = []

    def spy(t):
        seen.append(t)
        return on_device(t)

    monkeypatch.setattr(triton_pgd, "on_device", spy)
    monkeypatch.setattr(triton_ce, "on_device", spy)
    x_adv, grad, x_nat, eps, alpha, active = _case((3, 10), "linf")
    pgd_step_(x_adv, grad, x_nat, eps, alpha, "linf", backend="triton")
    assert seen and seen[-1] is x_adv
    x = torch.randn(2, 5)
    one = torch.ones(1)
    triton_ce.ce_rows(x, torch.tensor([0, 4]), one, None, -100, 0.0, one, 1)
    assert seen[-1] is x

    class OnDevice1:  # on_device's whole logic for a CUDA tensor, without a GPU
        device = torch.device("cuda", 1)

    assert on_device(OnDevice1()).idx == 1


def _tiny_gradients(dtype, device):
    """Rows whose gradient is too small to normalise, next to rows that are not.

    A saturated softmax leaves input gradients of denormals: alpha / ||g|| then overflows
    the dtype, and a naive step computes inf * 0 = NaN on the zero entries.
    """
    tiny = torch.finfo(dtype).smallest_normal
    shape = (6, 3, 4, 4)
    g = torch.Generator().manual_seed(11)
    x_nat = torch.rand(shape, generator=g, dtype=dtype)
    grad = torch.randn(shape, generator=g, dtype=dtype)
    grad[0] = 0.0                                      # exactly zero
    grad[1] = 0.0
    grad[1].view(-1)[:5] = tiny * 2.0 ** -20           # denormals among zeros
    grad[2] = grad[2].sign() * tiny * 2.0 ** -3        # a whole row of denormals
    grad[3].view(-1)[::2] = 0.0
    grad[3].view(-1)[1::2] = tiny                      # smallest normals among zeros
    grad[4].view(-1)[0] = torch.finfo(dtype).max       # huge: its square overflows fp32
    x_adv = x_nat.clone()
    move = lambda t: t.to(device)  # noqa: E731
    return move(x_adv), move(grad), move(x_nat)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("alpha", [0.1, 2.0, 1e30])
def test_denormal_and_zero_gradients_give_finite_steps(backend, device, norm, alpha):
    """Every finite input gives a finite output, equal to the reference's, on every backend;
    a gradient too small to normalise is no L2 step (rows 0-2 stay put)."""
    _skip_unavailable(backend)
    x_adv, grad, x_nat = _tiny_gradients(torch.float32, device)
    eps = torch.full((6,), 0.5, device=device)
    eps[5] = float("inf")                              # an unbounded ball is allowed
    want = _reference(x_adv, grad, x_nat, eps, alpha, norm, 0.0, 1.0, None)
    got = pgd_step_(x_adv.clone(), grad, x_nat, eps, alpha, norm, backend=backend)
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    if norm == "l2":
        # Where alpha / ||g|| overflows fp32 (always for the denormal row 1, for more rows as
        # alpha grows) there is no step, as for the zero row 0.
        g_norm = grad.double().flatten(1).norm(dim=1).cpu()
        no_step = (g_norm == 0) | (alpha / g_norm > torch.finfo(torch.float32).max)
        assert no_step[:2].all() and not no_step[5]
        assert torch.equal(got[no_step.to(device)], x_adv[no_step.to(device)])
    else:
        assert torch.equal(got[0], x_adv[0])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_denormal_gradients_fp64(backend):
    _skip_unavailable(backend)
    x_adv, grad, x_nat = _tiny_gradients(torch.float64, "cpu")
    got = pgd_step_(x_adv.clone(), grad, x_nat, 0.5, 0.1, "l2", backend=backend)
    assert torch.isfinite(got).all()
    assert torch.equal(got[0], x_adv[0])


def test_infinite_step_size_is_refused():
    x = torch.rand(2, 5)
    for alpha in (float("inf"), torch.tensor([0.1, float("inf")])):
        with pytest.raises(ValueError, match="alpha must be >= 0 and finite"):
            pgd_step_(x.clone(), torch.randn(2, 5), x, 0.1, alpha)


@pytest.mark.parametrize("backend,device", CASES)
def test_noncontiguous_and_aliased_inputs(backend, device):
    """x_adv a strided view (written back in place); x_nat sharing x_adv's storage."""
    _skip_unavailable(backend)
    x_adv, grad, x_nat, eps, alpha, active = _case((6, 5, 7), "l2", device=device)
    base = x_adv.transpose(1, 2).contiguous()
    view = base.transpose(1, 2)  # same values as x_adv, not contiguous
    want = _reference(x_adv, grad, x_nat, eps, alpha, "l2", 0.0, 1.0, active)
    pgd_step_(view, grad, x_nat, eps, alpha, "l2", active=active, backend=backend)
    assert torch.equal(view, want)

    same = x_adv.clone()
    want = _reference(same, grad, same.clone(), eps, alpha, "l2", 0.0, 1.0, active)
    pgd_step_(same, grad, same, eps, alpha, "l2", active=active, backend=backend)
    assert torch.equal(same, want)


@pytest.mark.parametrize("layout", ["contiguous", "strided x_adv", "x_nat aliases x_adv",
                                    "grad aliases x_adv", "strided grad"])
def test_eager_calls_go_straight_to_the_native_kernel_when_they_can(layout, monkeypatch):
    """Contiguous, unaliased x_adv and x_nat take the attacks' direct call (no custom op);
    everything else takes the custom op, which makes copies. Both give the reference."""
    _skip_unavailable("cpu")
    from tempsoft.ops import pgd as pgd_mod

    x_adv, grad, x_nat, eps, alpha, active = _case((6, 5, 7), "l2")
    want = _reference(x_adv, grad, x_nat, eps, alpha, "l2", 0.0, 1.0, active)
    direct = []
    checked = pgd_mod._pgd_step_checked_
    monkeypatch.setattr(pgd_mod, "_pgd_step_checked_",
                        lambda *a: direct.append(a[-1]) or checked(*a))
    target = x_adv.clone()
    if layout == "strided x_adv":
        target = x_adv.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "x_nat aliases x_adv":
        target, x_nat = x_adv.clone(), None
        want = _reference(x_adv, grad, x_adv, eps, alpha, "l2", 0.0, 1.0, active)
    elif layout == "grad aliases x_adv":
        target, grad = x_adv.clone(), None
        want = _reference(x_adv, x_adv, x_nat, eps, alpha, "l2", 0.0, 1.0, active)
    elif layout == "strided grad":
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
    pgd_step_(target, target if grad is None else grad, target if x_nat is None else x_nat,
              eps, alpha, "l2", active=active, backend="auto")
    assert torch.equal(target, want)
    assert direct == (["cpu"] if layout in ("contiguous", "strided grad") else [])


def test_requires_grad_leaf_is_updated_without_autograd_error():
    x_adv, grad, x_nat, eps, alpha, _ = _case((4, 10), "linf", with_active=False)
    leaf = x_adv.clone().requires_grad_(True)
    pgd_step_(leaf, grad, x_nat, eps, alpha)
    assert torch.equal(leaf.detach(), _reference(x_adv, grad, x_nat, eps, alpha, "linf", 0.0,
                                                 1.0, None))


def test_empty_batch_is_a_no_op():
    x = torch.rand(0, 3, 4, 4)
    assert pgd_step_(x, x.clone(), x.clone(), 0.1, 0.01).shape == (0, 3, 4, 4)


# --------------------------------------------------------------------------------------
# torch.library / torch.compile
# --------------------------------------------------------------------------------------
def test_opcheck():
    x_adv, grad, x_nat, eps, alpha, active = _case((5, 3, 4, 4), "linf")
    for norm in (0, 2):
        torch.library.opcheck(
            torch.ops.tempsoft.pgd_step_.default,
            (x_adv.clone(), grad, x_nat, eps, alpha, active, norm, 0.0, 1.0, "torch"),
        )


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_compiled_fullgraph_equals_eager(norm):
    torch._dynamo.reset()
    x_adv, grad, x_nat, eps, alpha, active = _case((5, 3, 4, 4), norm)

    def step(x, g, x0, e, a, act):
        y = x.clone()
        pgd_step_(y, g, x0, e, a, norm=norm, active=act)
        return y * 1.0

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = compiled(x_adv, grad, x_nat, eps, alpha, active)
    assert torch.equal(got, step(x_adv, grad, x_nat, eps, alpha, active))


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def _good():
    x = torch.rand(4, 3, 2, 2)
    return dict(x_adv=x.clone(), grad=torch.randn(4, 3, 2, 2), x_nat=x, eps=0.1, alpha=0.01)


BAD = [
    ({"eps": -0.1}, ValueError, r"eps must be >= 0, got -0\.1"),
    ({"eps": float("nan")}, ValueError, "eps must be >= 0"),
    ({"eps": torch.tensor([0.1, -0.2, 0.1, 0.1])}, ValueError, "eps must be >= 0, got -0.2"),
    ({"eps": torch.full((5,), 0.1)}, ValueError, r"\(4,\) tensor .*got shape \(5,\)"),
    ({"alpha": -1.0}, ValueError, "alpha must be >= 0"),
    ({"alpha": "big"}, TypeError, "alpha must be a number or a tensor"),
    ({"norm": "l1"}, ValueError, "norm must be one of .* got 'l1'"),
    ({"lower": 1.0, "upper": 0.0}, ValueError, "need lower < upper, got lower=1.0, upper=0.0"),
    ({"grad": torch.randn(4, 3, 2, 3)}, ValueError,
     r"one shape, got \(4, 3, 2, 2\), \(4, 3, 2, 3\)"),
    ({"x_nat": torch.rand(3, 3, 2, 2)}, ValueError, "must have one shape"),
    ({"grad": torch.randn(4, 3, 2, 2, dtype=torch.float64)}, TypeError, "share one dtype"),
    ({"x_adv": torch.zeros(4, 3, 2, 2, dtype=torch.int64)}, TypeError,
     "float32 or float64, got torch.int64"),
    ({"active": torch.ones(4)}, TypeError, "active must be a bool tensor"),
    ({"active": torch.ones(3, dtype=torch.bool)}, ValueError,
     r"active must have shape \(4,\), got \(3,\)"),
    ({"backend": "gpu"}, ValueError, "backend must be one of"),
    ({"grad": [1.0]}, TypeError, "grad must be a tensor, got list"),
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_raises(change, exc, match):
    args = {**_good(), **change}
    with pytest.raises(exc, match=match):
        pgd_step_(**args)


def test_zero_dim_raises():
    x = torch.tensor(0.5)
    with pytest.raises(ValueError, match="batch dimension"):
        pgd_step_(x, x.clone(), x.clone(), 0.1, 0.01)


# --------------------------------------------------------------------------------------
# Random start
# --------------------------------------------------------------------------------------
def test_random_start_linf_uniform_in_the_ball_and_box():
    x_nat = torch.rand(64, 3, 8, 8)
    x_nat_copy = x_nat.clone()
    x = random_start(x_nat, 0.05, "linf", generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_nat, x_nat_copy)
    assert bool(((x - x_nat).abs() <= 0.05 + 1e-7).all())
    assert x.min() >= 0 and x.max() <= 1
    # Away from the box faces the offset is U(-eps, eps): mean 0, variance eps^2 / 3.
    inner = (x_nat > 0.05) & (x_nat < 0.95)
    d = (x - x_nat)[inner].double() / 0.05
    assert abs(d.mean().item()) < 0.02 and abs(d.var().item() - 1 / 3) < 0.02


@pytest.mark.parametrize("n", [2, 5, 48])
def test_random_start_l2_is_uniform_in_the_ball(n):
    """P(r <= t eps) = t^n for the uniform n-ball: (r/eps)^n ~ U(0, 1) (Kolmogorov-Smirnov),
    and the direction is isotropic (mean of unit directions ~ 0)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    b = 4000
    x_nat = torch.zeros(b, n)
    x = random_start(x_nat, 2.0, "l2", lower=-10.0, upper=10.0,
                     generator=torch.Generator().manual_seed(1))
    r = x.double().norm(dim=1)
    assert bool((r <= 2.0 * (1 + 1e-6)).all())
    u = (r / 2.0).pow(n).clamp(max=1.0).numpy()
    assert scipy_stats.kstest(u, "uniform").pvalue > 1e-3
    mean_dir = (x.double() / r[:, None]).mean(dim=0)
    assert mean_dir.norm().item() < 4 / math.sqrt(b)  # its expected norm is ~1/sqrt(b)


def test_random_start_gaussian_times_uniform_radius_would_fail_the_ks_test():
    """The same KS test rejects the common non-uniform recipe (radius eps * U), so the test
    above can tell the two apart."""
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(1)
    n, b = 5, 4000
    z = torch.randn(b, n, generator=g, dtype=torch.float64)
    r = torch.rand(b, generator=g, dtype=torch.float64)
    x = z / z.norm(dim=1, keepdim=True) * r[:, None]
    assert scipy_stats.kstest(x.norm(dim=1).pow(n).numpy(), "uniform").pvalue < 1e-6


def test_random_start_is_reproducible_and_per_sample_eps():
    x_nat = torch.rand(4, 10)
    eps = torch.tensor([0.0, 0.1, 0.2, 0.3])
    a, b = (random_start(x_nat, eps, "l2", lower=-5, upper=5,
                         generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)
    r = (a - x_nat).norm(dim=1)
    assert r[0] == 0 and bool((r <= eps + 1e-6).all())


def test_random_start_bad_input():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        random_start(torch.rand(2, 3), -1.0)
    with pytest.raises(TypeError, match="floating-point tensor"):
        random_start(torch.zeros(2, 3, dtype=torch.int64), 0.1)
    with pytest.raises(ValueError, match="norm must be one of"):
        random_start(torch.rand(2, 3), 0.1, "l0")


def test_docstring_examples_run():
    import doctest

    import tempsoft
    import tempsoft.ops.pgd as module

    if not hasattr(tempsoft, "pgd_step_"):
        pytest.skip("tempsoft does not export pgd_step_ yet")
    result = doctest.testmod(module, globs={**vars(module), "torch": torch,
                                            "tempsoft": tempsoft})
    assert result.attempted > 0 and result.failed == 0
