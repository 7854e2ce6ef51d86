"""tempsoft.cross_entropy against F.cross_entropy(input / T, ...) on every backend that runs here.

Ground truth is PyTorch in float64; each backend is checked on random inputs covering every
option (hypothesis), on gradcheck (including dL/dT), per dtype, under torch.compile, and on
edge cases and bad input.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tempsoft
from tempsoft import _dispatch

# These tests use CPU tensors: "cuda", and "triton" on a machine with a GPU (where it is not
# interpreted), are covered on CUDA tensors by tests/test_gpu.py.
BACKENDS = [
    name for name, ok in tempsoft.backends().items()
    if ok and name != "cuda" and not (name == "triton" and torch.cuda.is_available())
]
# fp64 support differs per backend; the Triton interpreter computes in the kernel's dtypes.
MAX_EXAMPLES = int(os.environ.get("TEMPSOFT_HYPOTHESIS_EXAMPLES", "300"))
TOL = {  # (rtol, atol) against float64 PyTorch
    torch.float64: (1e-9, 1e-11),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


def _supports_fp64(backend: str) -> bool:
    return backend != "triton" or _triton_fp64()


def _triton_fp64() -> bool:
    try:
        tempsoft.cross_entropy(torch.randn(2, 3, dtype=torch.float64),
                               torch.tensor([0, 1]), backend="triton")
    except TypeError:
        return False
    return True


def _torch_ce(x, y, T, **kw):
    """The definition: F.cross_entropy(x / T) with a per-sample T broadcast over dims."""
    if isinstance(T, torch.Tensor) and T.dim() == 1:
        T = T.reshape((-1,) + (1,) * (x.dim() - 1))
    return F.cross_entropy(x / T, y, **kw)


# --------------------------------------------------------------------------------------
# Property-based comparison over every option
# --------------------------------------------------------------------------------------
@st.composite
def ce_cases(draw):
    n = draw(st.integers(0, 5))
    c = draw(st.integers(1, 9))
    spatial = draw(st.sampled_from([(), (), (), (2,), (2, 3)]))
    prob = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 30.0]))
    x = torch.randn((n, c) + spatial, generator=g, dtype=torch.float64) * scale
    if prob:
        y = torch.softmax(torch.randn(x.shape, generator=g, dtype=torch.float64) * 2, dim=1)
    else:
        y = torch.randint(0, c, (n,) + spatial, generator=g)
        if draw(st.booleans()) and y.numel():
            ignore = torch.rand(y.shape, generator=g) < 0.3
            y = torch.where(ignore, torch.full_like(y, -100), y)
    t_kind = draw(st.sampled_from(["number", "tensor", "per_sample"]))
    t_val = draw(st.floats(0.05, 50.0))
    if t_kind == "number":
        T = t_val
    elif t_kind == "tensor":
        T = torch.tensor(t_val, dtype=torch.float64, requires_grad=True)
    else:
        T = (torch.rand(n, generator=g, dtype=torch.float64) * 5 + 0.1).requires_grad_()
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.1 if draw(st.booleans()) else None
    return dict(
        x=x,
        y=y,
        T=T,
        weight=weight,
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0])),
    )


def _leaf(t):
    return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t


def _check_against_torch(case, backend, dtype=torch.float64):
    rtol, atol = TOL[dtype]
    kw = dict(weight=case["weight"], reduction=case["reduction"],
              label_smoothing=case["label_smoothing"])
    x_ref = case["x"].clone().requires_grad_()
    T_ref = _leaf(case["T"])
    expected = _torch_ce(x_ref, case["y"], T_ref, **kw)

    x = case["x"].to(dtype).requires_grad_()
    y = case["y"].to(dtype) if case["y"].is_floating_point() else case["y"]
    T = _leaf(case["T"])
    w = None if case["weight"] is None else case["weight"].to(dtype)
    got = tempsoft.cross_entropy(x, y, T, weight=w, reduction=case["reduction"],
                                 label_smoothing=case["label_smoothing"], backend=backend)
    assert got.dtype == dtype and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=atol, equal_nan=True)

    g_out = torch.randn_like(expected)  # a random upstream gradient, not just ones
    expected.backward(g_out)
    got.backward(g_out.to(got.dtype))
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=rtol, atol=atol, equal_nan=True)
    if isinstance(T, torch.Tensor):
        torch.testing.assert_close(T.grad, T_ref.grad, rtol=rtol * 10, atol=atol * 10,
                                   equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_on_every_option(backend):
    dtype = torch.float64 if _supports_fp64(backend) else torch.float32

    @settings(max_examples=MAX_EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=ce_cases())
    def run(case):
        _check_against_torch(case, backend, dtype)

    run()


# --------------------------------------------------------------------------------------
# gradcheck, dtypes, compile
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_gradcheck_including_temperature(backend, prob):
    if not _supports_fp64(backend):
        pytest.skip(f"{backend} has no float64")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64, generator=g, requires_grad=True)
    if prob:
        y = torch.softmax(torch.randn(4, 6, dtype=torch.float64, generator=g), 1)
        y.requires_grad_()
    else:
        y = torch.tensor([0, 5, -100, 2])
    T = torch.tensor([0.7, 1.3, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, generator=g) + 0.5

    def f(x, T, *y_opt):
        yy = y_opt[0] if y_opt else y
        return tempsoft.cross_entropy(x, yy, T, weight=w, label_smoothing=0.2, backend=backend)

    inputs = (x, T, y) if prob else (x, T)
    assert torch.autograd.gradcheck(f, inputs)
    t0 = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, t: tempsoft.cross_entropy(x, y.detach() if prob else y, t, reduction="none",
                                            backend=backend), (x, t0))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 10), (3, 1000), (4, 7, 3)], ids=["small", "wide", "spatial"])
def test_dtypes_against_float64(backend, dtype, shape):
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(shape, dtype=torch.float64, generator=g) * 4
    y = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=g)
    case = dict(x=x64.to(dtype).double(), y=y, T=0.6, weight=None, reduction="mean",
                label_smoothing=0.1)
    _check_against_torch(case, backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    def step(x, y, T):
        return tempsoft.cross_entropy(x, y, T, label_smoothing=0.1, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 11, requires_grad=True)
    y = torch.randint(0, 11, (8,))
    T = torch.tensor(1.5, requires_grad=True)
    loss = compiled(x, y, T)
    loss.backward()
    x2, T2 = x.detach().clone().requires_grad_(), T.detach().clone().requires_grad_()
    ref = F.cross_entropy(x2 / T2, y, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(T.grad, T2.grad)


def test_torch_compile_inductor_fullgraph():
    backend = "cpu" if "cpu" in BACKENDS else "torch"
    model = torch.nn.Linear(5, 7)

    @torch.compile(fullgraph=True)
    def train_step(x, y):
        return tempsoft.cross_entropy(model(x), y, 2.0, backend=backend)

    x, y = torch.randn(6, 5), torch.randint(0, 7, (6,))
    loss = train_step(x, y)
    loss.backward()
    ref = F.cross_entropy(model(x) / 2.0, y)
    torch.testing.assert_close(loss, ref)


def test_torch_export_replays_the_op_on_new_inputs():
    """torch.export traces the custom op, so the exported program computes the loss of the
    inputs it is given (torch.jit.trace is refused: tests/test_cpu_common_case.py)."""
    backend = "cpu" if "cpu" in BACKENDS else "torch"

    class Loss(torch.nn.Module):
        def forward(self, x, y):
            return tempsoft.cross_entropy(x, y, 2.0, reduction="none", backend=backend)

    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 7, generator=g), torch.randint(0, 7, (6,), generator=g)
    program = torch.export.export(Loss(), (x, y))
    x2, y2 = torch.randn(6, 7, generator=g), torch.randint(0, 7, (6,), generator=g)
    torch.testing.assert_close(program.module()(x2, y2),
                               F.cross_entropy(x2 / 2.0, y2, reduction="none"))


def test_autocast_gives_float32_like_torch():
    x = torch.randn(4, 9, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 9, (4,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = tempsoft.cross_entropy(x, y, 3.0)
        theirs = F.cross_entropy(x / 3.0, y)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=1e-2)
    ours.backward()
    assert x.grad.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------
# Mixed precision the way users run it: autocast and GradScaler-sized loss scales
# --------------------------------------------------------------------------------------
HALF = [torch.float16, torch.bfloat16]
# torch.amp.GradScaler starts at 2^16 and grows by powers of two; 2^24 is far up its range.
LOSS_SCALES = [1.0, 2.0**12, 2.0**16, 2.0**24]


def _assert_rounded_once(got: torch.Tensor, want64: torch.Tensor) -> None:
    """`got` (fp16 / bf16) is the float64 truth rounded once to its dtype: within one unit in
    the last place everywhere (subnormals included), and inf exactly where rounding the
    truth overflows."""
    fi = torch.finfo(got.dtype)
    rounded = want64.to(got.dtype).double()
    overflow = torch.isinf(rounded)
    assert torch.equal(torch.isinf(got), overflow), "overflow where the truth does not (or not " \
        "where it does)"
    got64, want = got.double()[~overflow], want64[~overflow]
    ulp = torch.clamp(want.abs() * fi.eps, min=fi.tiny * fi.eps)
    err = (got64 - want).abs()
    bad = err > ulp
    assert not bad.any(), (
        f"{int(bad.sum())} of {bad.numel()} {got.dtype} gradient entries are more than one ulp "
        f"from the float64 gradient; worst |error| / ulp = {float((err / ulp).max()):.1f}")


def _mixed_case(dtype, seed=12):
    g = torch.Generator().manual_seed(seed)
    # 4 * randn at T = 0.5 spreads the probabilities over many binades, so that the mean's
    # gradient has entries far below fp16's smallest normal (6e-5) before the loss scale.
    x = (torch.randn(64, 37, generator=g) * 4).to(dtype).requires_grad_()
    y = torch.randint(0, 37, (64,), generator=g)
    return x, y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("scale", LOSS_SCALES, ids=lambda s: f"2^{int(math.log2(s))}")
def test_autocast_with_loss_scaling_matches_float64(backend, dtype, scale):
    """Under autocast the op behaves as F.cross_entropy does there (float32 math, float32
    loss), and a GradScaler-style scaled backward gives half-precision gradients rounded once
    from the exact ones -- up to 2^24, where only a true fp16 overflow may give inf."""
    x, y = _mixed_case(dtype)
    T = 0.5
    with torch.autocast("cpu", dtype=dtype):
        loss = tempsoft.cross_entropy(x, y, T, label_smoothing=0.1, backend=backend)
    assert loss.dtype == torch.float32
    (loss * scale).backward()  # what GradScaler.scale(loss).backward() does
    x64 = x.detach().double().requires_grad_()
    want = F.cross_entropy(x64 / T, y, label_smoothing=0.1)
    (want * scale).backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    assert x.grad.dtype == dtype
    _assert_rounded_once(x.grad, x64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_half_precision_gradient_is_rounded_once_outside_autocast(backend, dtype, reduction):
    """Half-precision logits without autocast: the loss is half like F.cross_entropy's, and
    grad_output (a loss scale, or one weight per row) is applied in fp32 before the single
    rounding of the gradient."""
    x, y = _mixed_case(dtype, seed=13)
    T = torch.tensor(0.7, requires_grad=True)
    loss = tempsoft.cross_entropy(x, y, T, reduction=reduction, backend=backend)
    assert loss.dtype == dtype
    g = torch.Generator().manual_seed(14)
    if reduction == "mean":
        g_out = torch.tensor(2.0**12, dtype=dtype)
    else:
        g_out = (torch.rand(64, generator=g) * 2**10).to(dtype)
    loss.backward(g_out)
    x64 = x.detach().double().requires_grad_()
    T64 = T.detach().double().requires_grad_()
    F.cross_entropy(x64 / T64, y, reduction=reduction).backward(g_out.double())
    _assert_rounded_once(x.grad, x64.grad)
    torch.testing.assert_close(T.grad.double(), T64.grad, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------
# Edge cases that must behave like PyTorch
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, reduction):
    x = torch.randn(0, 5, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    got = tempsoft.cross_entropy(x, y, 2.0, reduction=reduction, backend=backend)
    want = F.cross_entropy(x / 2.0, y, reduction=reduction)
    torch.testing.assert_close(got, want, equal_nan=True)
    got.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_targets_ignored_gives_nan_mean_and_zero_grad(backend):
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.full((3,), -100)
    loss = tempsoft.cross_entropy(x, y, 0.5, label_smoothing=0.1, backend=backend)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_logits_like_torch(backend):
    x = torch.randn(4, 5, dtype=torch.float64)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    x[2, 3] = float("-inf")
    y = torch.tensor([1, 2, 0, 4])
    dtype = torch.float64 if _supports_fp64(backend) else torch.float32
    got = tempsoft.cross_entropy(x.to(dtype), y, 2.0, reduction="none", backend=backend)
    want = F.cross_entropy(x / 2.0, y, reduction="none")
    torch.testing.assert_close(got.double(), want, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_channels_last(backend):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(6, 10, generator=g)
    x = base.t().contiguous().t()[:, ::2]  # strided view, not contiguous
    assert not x.is_contiguous()
    y = torch.randint(0, 5, (6,), generator=g)
    torch.testing.assert_close(tempsoft.cross_entropy(x, y, 1.7, backend=backend),
                               F.cross_entropy(x / 1.7, y))
    img = torch.randn(2, 4, 3, 5, generator=g).to(memory_format=torch.channels_last)
    img.requires_grad_()
    t = torch.randint(0, 4, (2, 3, 5), generator=g)
    ours = tempsoft.cross_entropy(img, t, 0.8, backend=backend)
    ours.backward()
    img2 = img.detach().clone().requires_grad_()
    F.cross_entropy(img2 / 0.8, t).backward()
    torch.testing.assert_close(ours, F.cross_entropy(img2 / 0.8, t))
    torch.testing.assert_close(img.grad, img2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_tiny_temperature_stay_finite(backend):
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(8, 50, generator=g) * 2 - 1) * 1e4
    y = torch.randint(0, 50, (8,), generator=g)
    x.requires_grad_()
    loss = tempsoft.cross_entropy(x, y, 1e-3, reduction="none", backend=backend)
    want = F.cross_entropy(x.detach().double() / 1e-3, y, reduction="none")
    assert torch.isfinite(want).all()
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-2)
    loss.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_input_and_int32_targets(backend):
    x = torch.randn(7)
    y = torch.tensor(3)
    torch.testing.assert_close(tempsoft.cross_entropy(x, y, 2.0, backend=backend),
                               F.cross_entropy(x / 2.0, y))
    x2 = torch.randn(5, 7)
    y2 = torch.randint(0, 7, (5,), dtype=torch.int32)
    torch.testing.assert_close(tempsoft.cross_entropy(x2, y2, 2.0, backend=backend),
                               F.cross_entropy(x2 / 2.0, y2.long()))


# --------------------------------------------------------------------------------------
# Bad input: clear errors, never a crash or garbage
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [5, -1, 1000, -101])
def test_target_out_of_range_raises_index_error_naming_it(backend, bad):
    x = torch.randn(3, 5)
    y = torch.tensor([0, bad, 1])
    with pytest.raises(IndexError, match=str(bad)):
        tempsoft.cross_entropy(x, y, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises_value_error(backend, T):
    x = torch.randn(3, 5)
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="T must be positive"):
        tempsoft.cross_entropy(x, y, T, backend=backend)
    with pytest.raises(ValueError, match="T must be positive"):
        tempsoft.cross_entropy(x, y, torch.tensor(T), backend=backend)
    with pytest.raises(ValueError, match="T must be positive"):
        tempsoft.cross_entropy(x, y, torch.tensor([1.0, T, 2.0]), backend=backend)


@pytest.mark.parametrize(
    "make, err",
    [
        (lambda: (torch.randn(4, 5), torch.zeros(3, dtype=torch.long), {}), ValueError),
        (lambda: (torch.randn(4, 5, 3), torch.zeros(4, 4, dtype=torch.long), {}), RuntimeError),
        (lambda: (torch.randn(4, 5), torch.zeros(4, dtype=torch.long),
                  {"weight": torch.ones(4)}), RuntimeError),
        (lambda: (torch.randn(4, 5), torch.zeros(4, dtype=torch.long),
                  {"weight": torch.ones(5, dtype=torch.float64)}), RuntimeError),
        (lambda: (torch.randn(4, 5), torch.zeros(4, dtype=torch.long),
                  {"label_smoothing": 1.5}), RuntimeError),
        (lambda: (torch.randn(4, 5), torch.zeros(4, dtype=torch.long),
                  {"reduction": "avg"}), ValueError),
        (lambda: (torch.randn(4, 5), torch.zeros(4, 4), {}), RuntimeError),
    ],
    ids=["batch", "spatial", "weight-shape", "weight-dtype", "smoothing", "reduction", "prob-shape"],
)
def test_shape_and_dtype_mismatch_raise_like_torch(make, err):
    x, y, kw = make()
    with pytest.raises(err):
        F.cross_entropy(x, y, **kw)
    with pytest.raises(err):
        tempsoft.cross_entropy(x, y, 2.0, **kw)


def test_bad_arguments_name_the_value():
    x, y = torch.randn(2, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="'fastest'"):
        tempsoft.cross_entropy(x, y, backend="fastest")
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        tempsoft.cross_entropy(x, y, torch.ones(3))
    with pytest.raises(TypeError, match="str"):
        tempsoft.cross_entropy(x, y, "2")
    with pytest.raises(TypeError, match="int64"):
        tempsoft.cross_entropy(torch.tensor([[1, 2]]), torch.tensor([0]))
    if not tempsoft.backends()["cuda"]:
        with pytest.raises((RuntimeError, ValueError), match="cuda"):
            tempsoft.cross_entropy(x, y, backend="cuda")


# --------------------------------------------------------------------------------------
# Module, in-place backward, softmax, backend selection
# --------------------------------------------------------------------------------------
def test_module_and_learned_temperature_calibrates():
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 4, (512,), generator=g)
    # With unit Gaussian noise around a mean of 3 on the true class, the Bayes posterior's
    # logits are 3 * u; these are 9 * u, so the calibrating temperature is about 3.
    u = F.one_hot(labels, 4).float() * 3.0 + torch.randn(512, 4, generator=g)
    logits = u * 9.0
    crit = tempsoft.TemperatureCrossEntropyLoss(T=1.0, learn_T=True)
    opt = torch.optim.Adam(crit.parameters(), lr=0.05)
    start = crit(logits, labels).item()
    for _ in range(200):
        opt.zero_grad()
        loss = crit(logits, labels)
        loss.backward()
        opt.step()
    assert loss.item() < start
    assert 2.0 < float(crit.T) < 4.5
    plain = tempsoft.TemperatureCrossEntropyLoss(T=2.0, reduction="sum")
    torch.testing.assert_close(plain(logits, labels),
                               F.cross_entropy(logits / 2.0, labels, reduction="sum"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_writes_gradient_into_logits(backend):
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(5, 8, generator=g)
    y = torch.randint(0, 8, (5,), generator=g)
    ref = x0.clone().requires_grad_()
    F.cross_entropy(ref / 1.5, y).backward()

    h = torch.randn(5, 8, generator=g, requires_grad=True)
    logits = h * 1.0 + (x0 - h.detach())  # a non-leaf whose storage the loss may reuse
    loss = tempsoft.cross_entropy(logits, y, 1.5, backend=backend, inplace_backward=True)
    torch.testing.assert_close(loss, F.cross_entropy(x0 / 1.5, y))
    loss.backward()
    torch.testing.assert_close(h.grad, ref.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_leaves_the_logits_alone_when_only_T_learns(backend):
    """Temperature calibration with inplace_backward=True: the logits need no gradient, so
    they are not overwritten, and every call sees the same logits."""
    g = torch.Generator().manual_seed(15)
    logits = torch.randn(32, 10, generator=g) * 3
    labels = torch.randint(0, 10, (32,), generator=g)
    keep = logits.clone()
    crit = tempsoft.TemperatureCrossEntropyLoss(T=1.3, learn_T=True, inplace_backward=True,
                                                backend=backend)
    first = crit(logits, labels)
    first.backward()
    assert torch.equal(logits, keep)
    second = crit(logits, labels)
    torch.testing.assert_close(second, first)
    log_t = torch.tensor(math.log(1.3), requires_grad=True)
    F.cross_entropy(logits / log_t.exp(), labels).backward()
    torch.testing.assert_close(crit.log_T.grad, log_t.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_T_needing_a_gradient_computes_no_logit_gradient(backend, monkeypatch):
    """With only T requiring grad, the kernel is asked for zdot alone: no (N, C) gradient is
    allocated or written."""
    from tempsoft.kernels.reference import GRAD_ZDOT
    from tempsoft.ops import cross_entropy as ce_module

    calls = []
    real = ce_module._row_kernel

    def spying(kernel):
        # ce_rows and the CPU's ce_forward both take grad_mode 8th and return the gradient 3rd.
        def run(*args):
            out = kernel(*args)
            calls.append((int(args[7]), out[2].numel()))
            return out
        return run

    monkeypatch.setattr(ce_module, "_row_kernel", lambda name: spying(real(name)))
    if backend == "cpu":  # the CPU op's forward is one C++ call (ce_forward), not a row kernel
        module = _dispatch.cpu_module()
        monkeypatch.setattr(module, "ce_forward", spying(module.ce_forward))
    g = torch.Generator().manual_seed(16)
    x = torch.randn(8, 11, generator=g)
    y = torch.randint(0, 11, (8,), generator=g)
    T = torch.tensor(1.7, requires_grad=True)
    tempsoft.cross_entropy(x, y, T, label_smoothing=0.1, backend=backend).backward()
    assert calls == [(GRAD_ZDOT, 0)]
    T64 = T.detach().double().requires_grad_()
    F.cross_entropy(x.double() / T64, y, label_smoothing=0.1).backward()
    torch.testing.assert_close(T.grad.double(), T64.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_is_visible_to_autograd(backend):
    """The in-place write bumps the logits' version: a node that saved them before refuses
    to backpropagate instead of silently reading gradients as logits."""
    g = torch.Generator().manual_seed(17)
    h = torch.randn(6, 9, generator=g, requires_grad=True)
    y = torch.randint(0, 9, (6,), generator=g)
    logits = h * 2.0
    aux = logits.pow(2).sum()  # saves `logits` for its backward
    version = logits._version
    loss = tempsoft.cross_entropy(logits, y, 1.5, backend=backend, inplace_backward=True)
    assert logits._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + aux).backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_inplace_backward_with_a_loss_scale(backend, dtype):
    """In place and scaled (a GradScaler with inplace_backward): the gradient lands in the
    logits' storage and matches F.cross_entropy's (rounded once for bf16)."""
    g = torch.Generator().manual_seed(18)
    x0 = (torch.randn(16, 33, generator=g) * 3).to(dtype)
    y = torch.randint(0, 33, (16,), generator=g)
    h = x0.clone().requires_grad_()
    logits = h * 1.0
    storage = logits.data_ptr()
    loss = tempsoft.cross_entropy(logits, y, 0.8, backend=backend, inplace_backward=True)
    (loss.float() * 2.0**10).backward()
    assert logits.data_ptr() == storage
    x64 = x0.double().requires_grad_()
    (F.cross_entropy(x64 / 0.8, y) * 2.0**10).backward()
    if dtype == torch.float32:
        torch.testing.assert_close(h.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    else:
        _assert_rounded_once(h.grad, x64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_requiring_grad_with_class_indices_raises_like_torch(backend):
    g = torch.Generator().manual_seed(19)
    x = torch.randn(4, 5, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 4, 2])
    w = torch.rand(5, generator=g).requires_grad_()
    match = "not differentiable with respect to argument 'weight'"
    with pytest.raises(RuntimeError, match=match):
        F.cross_entropy(x, y, weight=w)
    with pytest.raises(RuntimeError, match=match):
        tempsoft.cross_entropy(x, y, 2.0, weight=w, backend=backend)
    with pytest.raises(RuntimeError, match=match):
        tempsoft.cross_entropy(x.detach(), y, 2.0, weight=w, label_smoothing=0.1,
                               backend=backend)
    with torch.no_grad():  # as in PyTorch: without autograd there is nothing to refuse
        torch.testing.assert_close(tempsoft.cross_entropy(x, y, 2.0, weight=w, backend=backend),
                                   F.cross_entropy(x / 2.0, y, weight=w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_gradient_with_class_probabilities_matches_torch(backend, reduction):
    """F.cross_entropy differentiates the weights of probability targets; so does tempsoft."""
    dtype = torch.float64 if _supports_fp64(backend) else torch.float32
    rtol, atol = TOL[dtype]
    g = torch.Generator().manual_seed(20)
    x = torch.randn(6, 7, generator=g, dtype=dtype, requires_grad=True)
    q = torch.softmax(torch.randn(6, 7, generator=g, dtype=dtype), 1)
    w = (torch.rand(7, generator=g, dtype=dtype) + 0.5).requires_grad_()
    T = torch.tensor(1.4, dtype=dtype, requires_grad=True)
    got = tempsoft.cross_entropy(x, q, T, weight=w, reduction=reduction, label_smoothing=0.2,
                                 backend=backend)
    g_out = torch.randn(got.shape, generator=g, dtype=dtype)
    got.backward(g_out)
    x2, w2, T2 = (t.detach().clone().requires_grad_() for t in (x, w, T))
    want = F.cross_entropy(x2 / T2, q, weight=w2, reduction=reduction, label_smoothing=0.2)
    want.backward(g_out)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for a, b in ((x.grad, x2.grad), (w.grad, w2.grad), (T.grad, T2.grad)):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=atol * 10)


def test_retain_graph_backward_twice_accumulates_the_same_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    loss = tempsoft.cross_entropy(x, y, 2.0)
    loss.backward(retain_graph=True)
    once = x.grad.clone()
    loss.backward(torch.tensor(3.0))
    torch.testing.assert_close(x.grad, 4 * once)
    x2 = x.detach().clone().requires_grad_()
    F.cross_entropy(x2 / 2.0, y).backward()
    torch.testing.assert_close(once, x2.grad)


def test_double_backward_is_refused_not_silently_wrong():
    x = torch.randn(3, 4, requires_grad=True)
    loss = tempsoft.cross_entropy(x, torch.tensor([0, 1, 2]), 2.0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_softmax_and_log_softmax():
    x = torch.randn(3, 6, dtype=torch.bfloat16)
    torch.testing.assert_close(tempsoft.softmax(x, 2.0),
                               torch.softmax(x.float() / 2.0, -1).bfloat16())
    x = torch.randn(3, 6, 2, dtype=torch.float64)
    T = torch.tensor([0.5, 1.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(tempsoft.log_softmax(x, T, dim=1),
                               torch.log_softmax(x / T.reshape(3, 1, 1), 1))
    with pytest.raises(ValueError, match="T must be"):
        tempsoft.softmax(x, 0.0)


def test_backends_report_and_env_override(monkeypatch):
    table = tempsoft.backends()
    assert set(table) == {"cpu", "cuda", "triton", "torch"}
    assert table["torch"]
    for name, ok in table.items():
        assert ok or ok.reason, f"{name} is unavailable without a reason"
    monkeypatch.setenv("TEMPSOFT_BACKEND", "torch")
    x, y = torch.randn(2, 3), torch.tensor([0, 2])
    torch.testing.assert_close(tempsoft.cross_entropy(x, y), F.cross_entropy(x, y))
    monkeypatch.setenv("TEMPSOFT_BACKEND", "nope")
    with pytest.raises(ValueError, match="'nope'"):
        tempsoft.cross_entropy(x, y)


def test_auto_falls_back_to_reference_with_a_warning_when_native_is_missing(monkeypatch):
    from tempsoft import _dispatch

    monkeypatch.setattr(_dispatch, "_native", lambda: (None, "not built (test)"))
    monkeypatch.setattr(_dispatch, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _dispatch.resolve("auto", torch.device("cpu")) == "torch"
    assert any("not built (test)" in str(w.message) for w in caught)
    with pytest.raises(RuntimeError, match="not built"):
        _dispatch.resolve("cpu", torch.device("cpu"))


def test_reference_rows_match_log_softmax_definition():
    """The reference kernel itself, against the textbook formula, in float64."""
    from tempsoft.kernels import reference

    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 9, dtype=torch.float64, generator=g)
    y = torch.randint(0, 9, (6,), generator=g)
    inv_t = torch.tensor([0.4], dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    loss, lse, grad, zdot = reference.ce_rows(x, y, inv_t, None, -100, 0.0, one, True)
    z = x * 0.4
    torch.testing.assert_close(lse, torch.logsumexp(z, 1))
    torch.testing.assert_close(loss, -torch.log_softmax(z, 1).gather(1, y[:, None])[:, 0])
    p = torch.softmax(z, 1)
    dz = p - F.one_hot(y, 9).double()
    torch.testing.assert_close(grad, dz * 0.4)
    torch.testing.assert_close(zdot, (dz * z).sum(1))
    assert math.isclose(float(loss.mean()), float(F.cross_entropy(z, y)), rel_tol=1e-12)
