"""GPU-only checks of the CUDA and Triton kernels (skipped without a CUDA device).

Ground truth is ``tempsoft/kernels/reference.py`` run in float64 on the same (upcast) inputs.
Covered here and nowhere else: every launch plan of the CUDA cross-entropy kernel (warp /
shared-memory / L2 re-read, clusters of 1-8 blocks, forced through TEMPSOFT_CE_MODE and
TEMPSOFT_CE_CLUSTER), large vocabularies (up to V = 2^20 with few rows), misaligned rows,
every element of the gradient written, bad targets reported as IndexError by the kernel's
flag without killing the process, no host synchronisation in ce_rows, torch.compile on the
GPU, pgd_step_ on CUDA exactly equal to the reference in fp32, and the memory that
``inplace_backward`` saves. Also, for the kernel-hardening issue: autocast with GradScaler-
sized loss scales (fp16 / bf16 gradients rounded once), deferred checks with weights (no
device assert), no (N, C) buffer when only T needs a gradient, the in-place write visible to
autograd, weights that require grad, no host sync in forward + backward (sync debug mode)
and a captured-and-replayed CUDA graph, NaN propagation and aliasing in pgd_step_, Triton
on a second GPU, and an "8.0+PTX" build running cluster-sized rows on an sm_90 GPU.

Set TEMPSOFT_REQUIRE_CUDA=1 (benchmarks/device_check.sh does) to fail instead of skip when a
GPU is present but the CUDA kernels were not built.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import tempsoft
from tempsoft.kernels import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
REQUIRE = os.environ.get("TEMPSOFT_REQUIRE_CUDA") == "1"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# (rtol, atol relative to the largest reference magnitude). Per-row outputs (loss, lse,
# zdot) are computed in fp32 for every input dtype but fp64, so they get the fp32 tolerance;
# the gradient is stored in the input dtype and gets that dtype's rounding.
ROW_TOL = {torch.float64: (1e-10, 1e-12), "acc32": (3e-5, 3e-6)}
GRAD_TOL = {
    torch.float64: (1e-10, 1e-13),
    torch.float32: (3e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}

# Shapes, and why each is here.
SHAPES = [
    (64, 10),        # warp mode; fewer classes than one 16-byte vector per lane
    (33, 1000),      # warp mode at its size limit (fp32 rows of 4000 bytes)
    (17, 5003),      # block mode; odd C: every row starts misaligned (scalar head + tail)
    (8, 32000),      # a vocabulary row cached in shared memory
    (4, 128256),     # Llama-3 vocabulary: a cluster of blocks on sm_90, L2 mode on sm_80
    (3, 262144),     # 2^18, the widest benchmark row
    (2, 1 << 20),    # 2^20 with few rows: clusters for parallelism, L2 re-read for fp32
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]


def _cuda_ok() -> bool:
    ok = bool(tempsoft.backends()["cuda"])
    if not ok and REQUIRE:
        pytest.fail(f"TEMPSOFT_REQUIRE_CUDA=1 but the CUDA backend is unavailable: "
                    f"{tempsoft.backends()['cuda']!r}")
    return ok


def _row_kernel(backend: str):
    if backend == "cuda":
        if not _cuda_ok():
            pytest.skip(f"CUDA backend unavailable: {tempsoft.backends()['cuda']!r}")
        return torch.ops.tempsoft_C.ce_rows
    if not tempsoft.backends()["triton"]:
        pytest.skip(f"Triton backend unavailable: {tempsoft.backends()['triton']!r}")
    from tempsoft.kernels import triton_ce

    return triton_ce.ce_rows


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def _make_rows(rows, cols, dtype, *, prob=False, weight=False, ignore=False,
               per_row_t=False, per_row_scale=False, seed=0, scale=3.0, offset=0):
    """Random row-kernel inputs; `offset` elements of slack shift x off 16-byte alignment."""
    g = _gen(seed)
    acc = reference.acc_dtype(dtype)
    flat = (torch.randn(rows * cols + offset, generator=g, device=DEV) * scale).to(dtype)
    x = flat[offset:].view(rows, cols)
    if prob:
        target = torch.softmax(torch.randn(rows, cols, generator=g, device=DEV) * 2, 1).to(dtype)
    else:
        target = torch.randint(0, cols, (rows,), generator=g, device=DEV)
        if ignore:
            target[::3] = -100
    inv_t = (torch.rand(rows if per_row_t else 1, generator=g, device=DEV) * 3 + 0.2).to(acc)
    w = (torch.rand(cols, generator=g, device=DEV) + 0.1).to(acc) if weight else None
    gs = (torch.rand(rows if per_row_scale else 1, generator=g, device=DEV) + 0.5).to(acc)
    return x, target, inv_t, w, gs


def _reference64(x, target, inv_t, w, ignore_index, eps, gs, compute_grad):
    t = target.double() if target.is_floating_point() else target
    return reference.ce_rows(x.double(), t, inv_t.double(), None if w is None else w.double(),
                             ignore_index, eps, gs.double(), compute_grad, None)


def _close(got, want, rtol, atol_rel, what):
    """assert_close with atol relative to the largest finite reference magnitude."""
    want = want.double()
    finite = want[torch.isfinite(want)]
    atol = atol_rel * max(1.0, float(finite.abs().max())) if finite.numel() else atol_rel
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _check_rows(out, ref, dtype, compute_grad=True, grad=None):
    loss, lse, g, zdot = out
    rloss, rlse, rgrad, rzdot = ref
    rtol, atol = ROW_TOL[torch.float64] if dtype == torch.float64 else ROW_TOL["acc32"]
    _close(loss, rloss, rtol, atol, "loss")
    _close(lse, rlse, rtol, atol, "lse")
    if compute_grad:
        _close(zdot, rzdot, rtol * 10, atol * 10, "zdot")
        grtol, gatol = GRAD_TOL[dtype]
        _close(g if grad is None else grad, rgrad, grtol, gatol, "grad")


# --------------------------------------------------------------------------------------
# Row kernels against the float64 reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_rows_all_options_match_reference(backend, dtype, shape):
    """Weights, smoothing, ignored rows, per-row T and per-row gradient scale together."""
    kernel = _row_kernel(backend)
    rows, cols = shape
    x, y, inv_t, w, gs = _make_rows(rows, cols, dtype, weight=True, ignore=True,
                                    per_row_t=True, per_row_scale=True, seed=rows + cols)
    try:
        out = kernel(x, y, inv_t, w, -100, 0.1, gs, True, None)
    except TypeError as exc:  # a backend without fp64 says so with a TypeError
        if dtype == torch.float64 and backend == "triton":
            pytest.skip(f"triton fp64: {exc}")
        raise
    _check_rows(out, _reference64(x, y, inv_t, w, -100, 0.1, gs, True), dtype)


OPTIONS = {
    "plain": dict(),
    "prob": dict(prob=True, weight=True, per_row_t=True, eps=0.2),
    "prob-plain": dict(prob=True),
    "smooth-unweighted": dict(eps=0.3, ignore=True),
    "forward-only": dict(compute_grad=False, weight=True),
    "forward-only-smooth": dict(compute_grad=False, eps=0.25, weight=True, ignore=True),
    "inplace": dict(grad_out="x", per_row_scale=True),
    "grad-out": dict(grad_out="new", eps=0.1),
}


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", [(24, 777), (3, 262144)], ids=["24x777", "3x262144"])
def test_row_options_match_reference(backend, dtype, option, shape):
    kernel = _row_kernel(backend)
    o = dict(OPTIONS[option])
    eps = o.pop("eps", 0.0)
    compute_grad = o.pop("compute_grad", True)
    grad_out = o.pop("grad_out", None)
    rows, cols = shape
    x, y, inv_t, w, gs = _make_rows(rows, cols, dtype, seed=7, **o)
    ref = _reference64(x, y, inv_t, w, -100, eps, gs, compute_grad)
    dst = None
    if grad_out == "x":
        dst = x.clone()
        x = dst  # the gradient overwrites the logits it is computed from
    elif grad_out == "new":
        dst = torch.full_like(x, float("nan"))  # poisoned: every element must be written
    out = kernel(x, y, inv_t, w, -100, eps, gs, compute_grad, dst)
    if dst is not None:
        assert out[2].numel() == 0
        assert not torch.isnan(dst).any(), "some gradient elements were not written"
    _check_rows(out, ref, dtype, compute_grad, grad=dst)
    if not compute_grad:
        assert out[2].numel() == 0 and out[3].numel() == 0


@pytest.mark.parametrize("offset", [1, 3, 5])
@pytest.mark.parametrize("cols", [1001, 40001], ids=["1001", "40001"])
def test_cuda_misaligned_logits(offset, cols):
    """x starting off a 16-byte boundary: the gradient buffer is allocated congruent to it,
    and probability targets / grad_out that are not get staged through aligned copies."""
    kernel = _row_kernel("cuda")
    x, y, inv_t, w, gs = _make_rows(9, cols, torch.bfloat16, offset=offset, seed=offset)
    assert x.data_ptr() % 16 != 0
    ref = _reference64(x, y, inv_t, w, -100, 0.0, gs, True)
    _check_rows(kernel(x, y, inv_t, w, -100, 0.0, gs, True, None), ref, torch.bfloat16)
    q = torch.softmax(torch.randn(9, cols, device=DEV), 1).to(torch.bfloat16)
    dst = torch.full_like(x, float("nan"))  # aligned, unlike x
    ref = _reference64(x, q, inv_t, w, -100, 0.1, gs, True)
    out = kernel(x, q, inv_t, w, -100, 0.1, gs, True, dst)
    _check_rows(out, ref, torch.bfloat16, grad=dst)


PLANS = [("warp", 0), ("smem", 1), ("smem", 2), ("smem", 4), ("smem", 8), ("l2", 1),
         ("l2", 2), ("l2", 8)]


@pytest.mark.parametrize("mode,cluster", PLANS, ids=[f"{m}-c{c}" for m, c in PLANS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(16, 1000), (6, 5003), (4, 32000), (2, 131072)],
                         ids=["16x1000", "6x5003", "4x32000", "2x131072"])
def test_cuda_every_launch_plan(monkeypatch, mode, cluster, dtype, shape):
    """Each plan the heuristic can pick, forced (clusters > 1 only take effect on sm_90+)."""
    kernel = _row_kernel("cuda")
    monkeypatch.setenv("TEMPSOFT_CE_MODE", mode)
    monkeypatch.setenv("TEMPSOFT_CE_CLUSTER", str(cluster))
    rows, cols = shape
    x, y, inv_t, w, gs = _make_rows(rows, cols, dtype, weight=True, ignore=True,
                                    per_row_t=True, seed=cluster)
    ref = _reference64(x, y, inv_t, w, -100, 0.05, gs, True)
    _check_rows(kernel(x, y, inv_t, w, -100, 0.05, gs, True, None), ref, dtype)
    q = torch.softmax(torch.randn(rows, cols, device=DEV), 1).to(dtype)
    ref = _reference64(x, q, inv_t, w, -100, 0.0, gs, True)
    _check_rows(kernel(x, q, inv_t, w, -100, 0.0, gs, True, None), ref, dtype)


def test_cuda_bad_plan_env_is_a_value_error(monkeypatch):
    kernel = _row_kernel("cuda")
    x, y, inv_t, w, gs = _make_rows(2, 8, torch.float32)
    monkeypatch.setenv("TEMPSOFT_CE_MODE", "fastest")
    with pytest.raises(ValueError, match="fastest"):
        kernel(x, y, inv_t, w, -100, 0.0, gs, True, None)


def test_cuda_special_values_follow_the_reference():
    """-inf (masked) logits, a +inf logit, a NaN logit, huge logits at a tiny T."""
    kernel = _row_kernel("cuda")
    x = torch.randn(6, 3000, device=DEV) * 2
    x[0, 5:50] = float("-inf")
    x[1, 7] = float("inf")
    x[2, 9] = float("nan")
    x[3] = (torch.rand(3000, device=DEV) * 2 - 1) * 1e4
    x[4, :] = float("-inf")
    x[4, 11] = 0.5
    y = torch.tensor([1, 2, 3, 4, 11, 0], device=DEV)
    inv_t = torch.tensor([1.0, 1.0, 1.0, 1e3, 1.0, 0.5], device=DEV)
    gs = torch.ones(1, device=DEV)
    for eps in (0.0, 0.1):
        out = kernel(x, y, inv_t, None, -100, eps, gs, True, None)
        _check_rows(out, _reference64(x, y, inv_t, None, -100, eps, gs, True), torch.float32)
        loss = out[0]
        # Masked logits elsewhere leave the loss finite without smoothing, inf with it (as
        # F.cross_entropy); huge logits at a tiny T stay finite; NaN and +inf propagate.
        assert bool(torch.isfinite(loss[0])) == (eps == 0.0)
        assert torch.isfinite(loss[[3, 5]]).all()
        assert torch.isinf(loss[1]) and torch.isnan(loss[2])


def test_cuda_deterministic():
    kernel = _row_kernel("cuda")
    x, y, inv_t, w, gs = _make_rows(64, 50000, torch.bfloat16, weight=True)
    a = kernel(x, y, inv_t, w, -100, 0.1, gs, True, None)
    b = kernel(x, y, inv_t, w, -100, 0.1, gs, True, None)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_cuda_ce_rows_does_not_synchronize():
    kernel = _row_kernel("cuda")
    x, y, inv_t, w, gs = _make_rows(128, 32000, torch.bfloat16, weight=True)
    kernel(x, y, inv_t, w, -100, 0.1, gs, True, None)  # warm-up: first-use allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernel(x, y, inv_t, w, -100, 0.1, gs, True, None)
        kernel(x, y, inv_t, None, -100, 0.0, gs, True, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------------------
# Bad targets: a Python IndexError, and the process (and its CUDA context) carries on
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [5, -1, 1 << 40, -101])
def test_cuda_kernel_reports_bad_target_without_killing_the_process(bad):
    kernel = _row_kernel("cuda")
    check = torch.ops.tempsoft_C.check_errors
    try:
        check(True)
    except IndexError:
        pass  # a report left by an earlier test; this test needs a clean slate
    x = torch.randn(4, 5, device=DEV)
    y = torch.tensor([0, bad, 1, -100], device=DEV)
    one = torch.ones(1, device=DEV)
    loss, lse, grad, zdot = kernel(x, y, one, None, -100, 0.0, one, True, None)
    with pytest.raises(IndexError, match=str(bad)):
        check(True)
    assert torch.isnan(loss[1]) and torch.equal(grad[1], torch.zeros_like(grad[1]))
    good = torch.tensor([0, 2, 1, -100], device=DEV)
    ref = _reference64(x, good, one, None, -100, 0.0, one, True)
    torch.testing.assert_close(loss[[0, 2, 3]].double(), ref[0][[0, 2, 3]], rtol=1e-5, atol=1e-6)
    # The report was consumed; the context is alive and the next call is clean.
    check(True)
    out = kernel(x, good, one, None, -100, 0.0, one, True, None)
    _check_rows(out, ref, torch.float32)
    torch.cuda.synchronize()


def test_cuda_pending_report_raises_at_the_next_call():
    kernel = _row_kernel("cuda")
    torch.ops.tempsoft_C.check_errors(True)
    x = torch.randn(3, 7, device=DEV)
    one = torch.ones(1, device=DEV)
    kernel(x, torch.tensor([0, 9, 1], device=DEV), one, None, -100, 0.0, one, True, None)
    torch.cuda.synchronize()  # the launch has finished: its report is visible to the host
    with pytest.raises(IndexError, match="9"):
        kernel(x, torch.tensor([0, 1, 2], device=DEV), one, None, -100, 0.0, one, True, None)
    torch.ops.tempsoft_C.check_errors(True)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_public_api_bad_target_is_index_error(backend):
    _row_kernel(backend)
    x = torch.randn(4, 10, device=DEV, requires_grad=True)
    y = torch.tensor([1, 2, 10, 3], device=DEV)
    with pytest.raises(IndexError, match="10"):
        tempsoft.cross_entropy(x, y, 2.0, backend=backend)
        # A lazy (sync-free) check would report here instead.
        if backend == "cuda":
            torch.ops.tempsoft_C.check_errors(True)
    y_ok = torch.tensor([1, 2, 9, 3], device=DEV)
    loss = tempsoft.cross_entropy(x, y_ok, 2.0, backend=backend)
    loss.backward()
    x2 = x.detach().clone().requires_grad_()
    F.cross_entropy(x2 / 2.0, y_ok).backward()
    torch.testing.assert_close(x.grad, x2.grad)


# --------------------------------------------------------------------------------------
# The public op on the GPU: autograd, dL/dT, torch.compile, memory
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_public_forward_backward_with_learned_temperature(backend, dtype):
    _row_kernel(backend)
    g = _gen(11)
    x = (torch.randn(64, 32000, generator=g, device=DEV) * 2).to(dtype).requires_grad_()
    y = torch.randint(0, 32000, (64,), generator=g, device=DEV)
    T = torch.tensor(1.7, device=DEV, requires_grad=True)
    loss = tempsoft.cross_entropy(x, y, T, label_smoothing=0.1, backend=backend)
    loss.backward()
    x2 = x.detach().double().requires_grad_()
    T2 = T.detach().double().requires_grad_()
    ref = F.cross_entropy(x2 / T2, y, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    rtol, atol = GRAD_TOL[dtype]
    torch.testing.assert_close(x.grad.double(), x2.grad, rtol=rtol,
                               atol=atol * float(x2.grad.abs().max()))
    torch.testing.assert_close(T.grad.double(), T2.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_torch_compile_fullgraph_on_gpu(backend):
    _row_kernel(backend)
    model = torch.nn.Linear(64, 1000, device=DEV)

    @torch.compile(fullgraph=True)
    def step(h, y, T):
        return tempsoft.cross_entropy(model(h), y, T, label_smoothing=0.1, backend=backend)

    h = torch.randn(32, 64, device=DEV)
    y = torch.randint(0, 1000, (32,), device=DEV)
    T = torch.tensor(2.0, device=DEV, requires_grad=True)
    loss = step(h, y, T)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    T2 = T.detach().clone().requires_grad_()
    ref = F.cross_entropy(model(h) / T2, y, label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(T.grad, T2.grad, rtol=1e-4, atol=1e-6)


def _extra_peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_memory_one_gradient_buffer_and_none_inplace(backend):
    """Forward + backward needs one gradient buffer, and none with inplace_backward."""
    _row_kernel(backend)
    n, v = 2048, 32000
    grad_bytes = n * v * 2
    small = 64 * n * 4 + (4 << 20)  # per-row outputs and allocator slack
    y = torch.randint(0, v, (n,), device=DEV)
    x = torch.randn(n, v, device=DEV, dtype=torch.bfloat16).requires_grad_()
    leaf = torch.randn(n, v, device=DEV, dtype=torch.bfloat16).requires_grad_()
    h = leaf * 1.0  # a non-leaf whose storage the loss may take over, allocated up front

    def plain():
        (g,) = torch.autograd.grad(tempsoft.cross_entropy(x, y, 1.5, backend=backend), x)
        assert g.shape == x.shape

    def run_inplace():
        (g,) = torch.autograd.grad(
            tempsoft.cross_entropy(h, y, 1.5, backend=backend, inplace_backward=True), h)
        assert g.data_ptr() == h.data_ptr()

    extra_plain = _extra_peak_bytes(plain)
    extra_inplace = _extra_peak_bytes(run_inplace)
    assert extra_plain <= grad_bytes + small, (extra_plain, grad_bytes)
    assert extra_inplace <= small, (extra_inplace, grad_bytes)


# --------------------------------------------------------------------------------------
# pgd_step_ on CUDA: exactly the reference in fp32
# --------------------------------------------------------------------------------------
PGD_SHAPES = [
    (256, 3, 32, 32),   # CIFAR batch: one block per sample, cached in shared memory
    (4, 3, 224, 224),   # ImageNet, few samples: clusters split each sample (sm_90)
    (7, 3, 5, 5),       # 75 elements per sample: scalar path (no 16-byte vectors)
    (3, 1),             # one element per sample
]


def _pgd_case(shape, norm, seed=0, dtype=torch.float32, offset=0):
    g = _gen(seed)
    b = shape[0]
    numel = torch.Size(shape).numel()
    x_nat = torch.rand(numel + offset, generator=g, device=DEV, dtype=dtype)[offset:].view(shape)
    scale = 0.05 if norm == 0 else 0.5
    x_adv = (x_nat + scale * torch.randn(shape, generator=g, device=DEV, dtype=dtype)).clamp(0, 1)
    grad = torch.randn(shape, generator=g, device=DEV, dtype=dtype)
    grad.view(b, -1)[:, ::5] = 0.0
    if b > 2:
        grad[0] = 0.0                      # no step for L2
        grad[1].view(-1)[0] = float("nan")  # Linf: that pixel stays
    eps = (0.02 + 0.1 * torch.rand(b, generator=g, device=DEV, dtype=dtype)) * (10 * scale)
    alpha = (0.005 + 0.02 * torch.rand(b, generator=g, device=DEV, dtype=dtype)) * (10 * scale)
    active = torch.rand(b, generator=g, device=DEV) > 0.25
    return x_adv, grad, x_nat, eps, alpha, active


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("norm", [0, 2], ids=["linf", "l2"])
@pytest.mark.parametrize("shape", PGD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_pgd_step_equals_reference_fp32(backend, norm, shape, offset):
    _row_kernel(backend)
    x_adv, grad, x_nat, eps, alpha, active = _pgd_case(shape, norm, offset=offset)
    want = reference.pgd_step(x_adv, grad, x_nat, eps, alpha, norm, 0.0, 1.0, active)
    got = x_adv.clone()
    if backend == "cuda":
        torch.ops.tempsoft_C.pgd_step_(got, grad, x_nat, eps, alpha, active, norm, 0.0, 1.0)
    else:
        from tempsoft.kernels import triton_pgd

        triton_pgd.pgd_step_(got, grad, x_nat, eps, alpha, active, norm, 0.0, 1.0)
    assert torch.equal(got[~active], x_adv[~active])
    mismatch = (got != want) & ~(torch.isnan(got) & torch.isnan(want))
    assert not mismatch.any(), f"{int(mismatch.sum())} elements differ, max " \
        f"{float((got - want)[mismatch].abs().max())}"


@pytest.mark.parametrize("norm", [0, 2], ids=["linf", "l2"])
def test_pgd_step_fp64_cuda(norm):
    _row_kernel("cuda")
    x_adv, grad, x_nat, eps, alpha, active = _pgd_case((16, 3, 16, 16), norm,
                                                       dtype=torch.float64)
    want = reference.pgd_step(x_adv, grad, x_nat, eps, alpha, norm, -0.5, 1.5, active)
    got = x_adv.clone()
    torch.ops.tempsoft_C.pgd_step_(got, grad, x_nat, eps, alpha, active, norm, -0.5, 1.5)
    if norm == 0:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_pgd_step_public_op_and_compile_on_cuda():
    _row_kernel("cuda")
    x_adv, grad, x_nat, eps, alpha, active = _pgd_case((64, 3, 32, 32), 0, seed=3)
    want = reference.pgd_step(x_adv, grad, x_nat, eps, alpha, 0, 0.0, 1.0, active)

    from tempsoft.ops.pgd import pgd_step_

    @torch.compile(fullgraph=True)
    def step(x, g):
        return pgd_step_(x, g, x_nat, eps, alpha, "linf", active=active, backend="cuda")

    got = x_adv.clone()
    step(got, grad)
    assert torch.equal(got, want)


def test_deferred_checks_report_bad_target_through_check_errors(monkeypatch):
    """TEMPSOFT_DEFERRED_CHECKS=1: no sync in the call; tempsoft.check_errors() raises."""
    _row_kernel("cuda")
    torch.ops.tempsoft_C.check_errors(True)
    monkeypatch.setenv("TEMPSOFT_DEFERRED_CHECKS", "1")
    x = torch.randn(4, 10, device=DEV)
    loss = tempsoft.cross_entropy(x, torch.tensor([1, 2, 10, 3], device=DEV), 2.0,
                                  reduction="none", backend="cuda")
    with pytest.raises(IndexError, match="10"):
        tempsoft.check_errors()
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    tempsoft.check_errors()  # consumed: the next check is clean


# --------------------------------------------------------------------------------------
# Mixed precision with loss scaling on the GPU backends
# --------------------------------------------------------------------------------------
def _assert_rounded_once(got, want64):
    """got (fp16 / bf16): the float64 truth rounded once, within one ulp; inf exactly where
    rounding the truth overflows (see tests/test_cross_entropy.py)."""
    fi = torch.finfo(got.dtype)
    overflow = torch.isinf(want64.to(got.dtype))
    assert torch.equal(torch.isinf(got), overflow)
    got64, want = got.double()[~overflow], want64[~overflow]
    ulp = torch.clamp(want.abs() * fi.eps, min=fi.tiny * fi.eps)
    err = (got64 - want).abs()
    assert not (err > ulp).any(), f"worst |error| / ulp = {float((err / ulp).max()):.1f}"


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("scale", [1.0, 2.0**12, 2.0**16, 2.0**24],
                         ids=["2^0", "2^12", "2^16", "2^24"])
@pytest.mark.parametrize("deferred", [False, True], ids=["strict", "deferred"])
def test_autocast_loss_scaling_gradients_rounded_once(monkeypatch, backend, dtype, scale,
                                                      deferred):
    _row_kernel(backend)
    if deferred:
        monkeypatch.setenv("TEMPSOFT_DEFERRED_CHECKS", "1")
    g = _gen(40)
    x = (torch.randn(2048, 512, generator=g, device=DEV) * 4).to(dtype).requires_grad_()
    y = torch.randint(0, 512, (2048,), generator=g, device=DEV)
    with torch.autocast("cuda", dtype=dtype):
        loss = tempsoft.cross_entropy(x, y, 0.5, label_smoothing=0.1, backend=backend)
    assert loss.dtype == torch.float32
    (loss * scale).backward()
    x64 = x.detach().double().requires_grad_()
    want = F.cross_entropy(x64 / 0.5, y, label_smoothing=0.1)
    (want * scale).backward()
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-6)
    _assert_rounded_once(x.grad, x64.grad)


# --------------------------------------------------------------------------------------
# Deferred checks, in-place backward and weights on the GPU backends
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("bad", [-3, 10, 1 << 40])
def test_deferred_bad_target_with_weight_and_mean_never_indexes(monkeypatch, backend, bad):
    """weight[target] of the mean's denominator: no device assert, no wrap-around."""
    _row_kernel(backend)
    try:
        tempsoft.check_errors()
    except IndexError:
        pass
    monkeypatch.setenv("TEMPSOFT_DEFERRED_CHECKS", "1")
    x = torch.randn(5, 10, device=DEV, requires_grad=True)
    w = torch.rand(10, device=DEV) + 0.5
    y = torch.tensor([1, bad, 4, 6, 2], device=DEV)
    loss = tempsoft.cross_entropy(x, y, 1.5, weight=w, backend=backend)
    loss.backward()
    with pytest.raises(IndexError, match=str(bad)):
        tempsoft.check_errors()
    assert torch.isnan(loss)
    good = [0, 2, 3, 4]
    x_ref = x.detach().clone().requires_grad_()
    F.cross_entropy(x_ref[good] / 1.5, y[good], weight=w).backward()
    torch.testing.assert_close(x.grad[good], x_ref.grad[good])
    assert torch.equal(x.grad[1], torch.zeros_like(x.grad[1]))
    torch.cuda.synchronize()  # the context is alive


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_only_T_needing_a_gradient_allocates_no_logit_gradient(backend):
    _row_kernel(backend)
    n, v = 2048, 32000
    x = torch.randn(n, v, device=DEV, dtype=torch.bfloat16)
    y = torch.randint(0, v, (n,), device=DEV)
    T = torch.tensor(1.5, device=DEV, requires_grad=True)
    keep = x.clone()

    def only_t():
        tempsoft.cross_entropy(x, y, T, backend=backend, inplace_backward=True).backward()

    extra = _extra_peak_bytes(only_t)
    assert extra < n * v * 2 // 4, extra
    assert torch.equal(x, keep)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_inplace_write_bumps_the_version(backend):
    _row_kernel(backend)
    h = torch.randn(64, 1000, device=DEV, requires_grad=True)
    y = torch.randint(0, 1000, (64,), device=DEV)
    logits = h * 2.0
    aux = logits.pow(2).sum()
    loss = tempsoft.cross_entropy(logits, y, 1.5, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + aux).backward()


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_weight_requiring_grad_like_torch(backend):
    _row_kernel(backend)
    x = torch.randn(8, 20, device=DEV, requires_grad=True)
    w = (torch.rand(20, device=DEV) + 0.5).requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument"):
        tempsoft.cross_entropy(x, torch.randint(0, 20, (8,), device=DEV), 2.0, weight=w,
                               backend=backend)
    q = torch.softmax(torch.randn(8, 20, device=DEV), 1)
    tempsoft.cross_entropy(x, q, 2.0, weight=w, backend=backend).backward()
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.cross_entropy(x2 / 2.0, q, weight=w2).backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# No host syncs: CUDA graphs and sync debug mode (deferred checks, Python-number T)
# --------------------------------------------------------------------------------------
def _step(x, y, backend):
    x.grad = None
    loss = tempsoft.cross_entropy(x, y, 2.0, label_smoothing=0.1, backend=backend)
    loss.backward()
    return loss


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forward_backward_make_no_host_sync(monkeypatch, backend):
    _row_kernel(backend)
    monkeypatch.setenv("TEMPSOFT_DEFERRED_CHECKS", "1")
    x = torch.randn(256, 32000, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, 32000, (256,), device=DEV)
    w = torch.rand(32000, device=DEV) + 0.5
    _step(x, y, backend)  # first-call allocations and compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(x, y, backend)
        loss = tempsoft.cross_entropy(x, y, 1.5, weight=w, reduction="mean", backend=backend)
        (loss * 1024.0).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_forward_backward_capture_in_a_cuda_graph_and_replay(monkeypatch, backend):
    _row_kernel(backend)
    monkeypatch.setenv("TEMPSOFT_DEFERRED_CHECKS", "1")
    x = torch.randn(128, 5000, device=DEV, requires_grad=True)
    y = torch.randint(0, 5000, (128,), device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: first-call allocations happen outside capture
        for _ in range(3):
            _step(x, y, backend)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = tempsoft.cross_entropy(x, y, 2.0, label_smoothing=0.1, backend=backend)
        static_loss.backward()
    for seed in range(3):
        g = _gen(50 + seed)
        with torch.no_grad():
            x.copy_(torch.randn(x.shape, generator=g, device=DEV) * 3)
        y.copy_(torch.randint(0, 5000, y.shape, generator=g, device=DEV))
        graph.replay()
        x_ref = x.detach().clone().requires_grad_()
        ref = F.cross_entropy(x_ref / 2.0, y, label_smoothing=0.1)
        ref.backward()
        torch.testing.assert_close(static_loss, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------
# pgd_step_: NaN, aliasing, the tensors' device
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("norm", [0, 2], ids=["linf", "l2"])
def test_pgd_step_propagates_nan_like_the_reference(backend, norm):
    _row_kernel(backend)
    x_adv, grad, x_nat, eps, alpha, active = _pgd_case((16, 3, 32, 32), norm, seed=7)
    x_adv[0].view(-1)[3] = float("nan")
    x_nat[2].view(-1)[5] = float("nan")
    want = reference.pgd_step(x_adv, grad, x_nat, eps, alpha, norm, 0.0, 1.0, None)
    got = tempsoft.pgd_step_(x_adv.clone(), grad, x_nat, eps, alpha,
                             "linf" if norm == 0 else "l2", backend=backend)
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    assert torch.isnan(want[0].view(-1)[3]) and same.all()


def test_cuda_pgd_step_refuses_aliased_inputs():
    _row_kernel("cuda")
    x_adv, grad, x_nat, eps, alpha, active = _pgd_case((4, 3, 8, 8), 2)
    for g, x0 in ((x_adv, x_nat), (grad, x_adv), (grad, x_adv.view(x_adv.shape))):
        with pytest.raises(ValueError, match="must not share memory"):
            torch.ops.tempsoft_C.pgd_step_(x_adv, g, x0, eps, alpha, active, 2, 0.0, 1.0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("norm", [0, 2], ids=["linf", "l2"])
def test_triton_kernels_run_on_the_tensors_device(norm):
    _row_kernel("triton")
    from tempsoft.kernels import triton_ce, triton_pgd

    with torch.cuda.device(0):
        x_adv, grad, x_nat, eps, alpha, active = (
            t.to("cuda:1") for t in _pgd_case((8, 3, 16, 16), norm, seed=9))
        want = reference.pgd_step(x_adv, grad, x_nat, eps, alpha, norm, 0.0, 1.0, active)
        got = x_adv.clone()
        triton_pgd.pgd_step_(got, grad, x_nat, eps, alpha, active, norm, 0.0, 1.0)
        assert torch.equal(got, want)
        x = torch.randn(16, 3000, device="cuda:1")
        yy = torch.randint(0, 3000, (16,), device="cuda:1")
        one = torch.ones(1, device="cuda:1")
        out = triton_ce.ce_rows(x, yy, one, None, -100, 0.0, one, 1, None)
        _check_rows(out, _reference64(x, yy, one, None, -100, 0.0, one, True), torch.float32)


# --------------------------------------------------------------------------------------
# Clusters behind a PTX build (TORCH_CUDA_ARCH_LIST="8.0+PTX" on an sm_90 GPU)
# --------------------------------------------------------------------------------------
_PTX_CHECK = r"""
import os, sys, torch
torch.ops.load_library(sys.argv[1])
from tempsoft.kernels import reference
ops = torch.ops.tempsoft_C
dev = "cuda"
g = torch.Generator(device=dev).manual_seed(0)
worst = 0.0
for rows, cols in [(4, 128256), (2, 1 << 20), (3, 262144)]:
    for cluster in ("0", "8"):   # the heuristic's choice, and a forced cluster of 8
        os.environ["TEMPSOFT_CE_CLUSTER"] = cluster
        os.environ["TEMPSOFT_CE_MODE"] = "smem" if cluster == "8" else "auto"
        x = torch.randn(rows, cols, generator=g, device=dev) * 3
        y = torch.randint(0, cols, (rows,), generator=g, device=dev)
        it = torch.full((1,), 0.7, device=dev)
        gs = torch.full((1,), 1.0 / rows, device=dev)
        loss, lse, grad, zdot = ops.ce_rows(x, y, it, None, -100, 0.1, gs, 1, None)
        want = reference.ce_rows(x.double(), y, it.double(), None, -100, 0.1, gs.double(), 1)
        for a, b in ((loss, want[0]), (lse, want[1]), (zdot, want[3])):
            worst = max(worst, float(((a.double() - b).abs() / (1 + b.abs())).max()))
        worst = max(worst, float((grad.double() - want[2]).abs().max() / want[2].abs().max()))
shape = (4, 3, 224, 224)
x_nat = torch.rand(shape, generator=g, device=dev)
x_adv = (x_nat + 0.5 * torch.randn(shape, generator=g, device=dev)).clamp(0, 1)
grad = torch.randn(shape, generator=g, device=dev)
eps = torch.full((4,), 2.0, device=dev)
alpha = torch.full((4,), 0.5, device=dev)
want = reference.pgd_step(x_adv, grad, x_nat, eps, alpha, 2, 0.0, 1.0, None)
got = x_adv.clone()
ops.pgd_step_(got, grad, x_nat, eps, alpha, None, 2, 0.0, 1.0)
pgd_equal = bool(torch.equal(got, want))
print(f"worst={worst:.3g} pgd_equal={pgd_equal}")
sys.exit(0 if worst < 1e-4 and pgd_equal else 1)
"""


def build_ptx_extension(out_dir) -> "pathlib.Path":
    """Build tempsoft._C for TORCH_CUDA_ARCH_LIST="8.0+PTX" (one CPU level) under out_dir;
    returns the library. benchmarks/device_check.sh runs this alongside its main build."""
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out_dir = pathlib.Path(out_dir)
    env = {**os.environ, "TORCH_CUDA_ARCH_LIST": "8.0+PTX", "TEMPSOFT_CPU_LEVELS": "default",
           "TEMPSOFT_REQUIRE_EXT": "1", "MAX_JOBS": os.environ.get("MAX_JOBS",
                                                                   str(os.cpu_count() or 4))}
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(out_dir / "lib"),
         "--build-temp", str(out_dir / "tmp")],
        cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-4000:]
    (lib,) = (out_dir / "lib" / "tempsoft").glob("_C.*")
    return lib


@pytest.mark.skipif(not torch.cuda.is_available() or
                    torch.cuda.get_device_capability()[0] < 9, reason="needs an sm_90+ GPU")
def test_ptx_jit_build_gives_correct_results_on_cluster_sized_rows(tmp_path):
    """Built for "8.0+PTX", the driver JIT-compiles sm_80 code on this sm_90 GPU: that code
    has no cluster barriers, so the kernels must not launch clusters. Runs the shapes that get
    clusters on sm_90 in a fresh process with that build (TEMPSOFT_PTX_LIB, made by
    benchmarks/device_check.sh, or built here into a scratch directory)."""
    _row_kernel("cuda")
    import pathlib
    import subprocess
    import sys

    lib = os.environ.get("TEMPSOFT_PTX_LIB") or build_ptx_extension(tmp_path)
    root = pathlib.Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", _PTX_CHECK, str(lib)], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
