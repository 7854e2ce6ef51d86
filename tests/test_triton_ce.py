"""The Triton cross-entropy row kernel against the pure-PyTorch reference.

Without a CUDA device the kernel runs under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) on CPU tensors, so shapes stay tiny; most tests force a 16-column chunk
so that a 37-class row is walked in three steps (two full chunks and a masked tail) and the
online rescaling runs.  The public op (tempsoft.cross_entropy) is tested elsewhere.
"""
from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F
import triton

import tempsoft

if not tempsoft.backends()["triton"]:
    pytest.skip(f"Triton unavailable: {tempsoft.backends()['triton']!r}", allow_module_level=True)

from tempsoft.kernels import reference, triton_ce  # noqa: E402
from tempsoft.kernels.reference import GRAD_ZDOT  # noqa: E402
from tempsoft.kernels.triton_ce import CE_CONFIGS, CEConfig, ce_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IGNORE = -100
# 3 chunks of 16 over 37 classes (the last one masked), 2 rows per program over 5 rows (the
# last program half masked).
SMALL = CEConfig(block_m=2, block_v=16, num_warps=2)
M, C = 5, 37
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# (rtol, atol) for loss / lse / zdot, accumulated in fp32 (fp64 for fp64 logits) by both
# sides in different orders, and for the gradient, rounded once to the logits' dtype (so at
# most one unit in the last place of that dtype apart).
TOL = {
    torch.float64: {"acc": (1e-12, 1e-12), "grad": (1e-12, 1e-14)},
    torch.float32: {"acc": (1e-5, 1e-5), "grad": (1e-5, 1e-7)},
    torch.float16: {"acc": (1e-5, 1e-5), "grad": (2e-3, 1e-6)},
    torch.bfloat16: {"acc": (1e-5, 1e-5), "grad": (1.6e-2, 1e-5)},
}

# Option bundles; each also runs with index and with probability targets.
VARIANTS = {
    "plain": {},
    "weight_rowT_ignore": {"weight": True, "per_row_t": True, "per_row_scale": True,
                           "ignore": True},
    "smoothing": {"eps": 0.1, "per_row_scale": True},
    "all": {"weight": True, "eps": 0.3, "per_row_t": True, "per_row_scale": True, "ignore": True},
}

# The interpreter evaluates both sides of every tl.where, so masked lanes warn about
# log(0) and 0 * inf in numpy; the results are selected away.
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@dataclasses.dataclass
class Case:
    x: torch.Tensor
    target: torch.Tensor
    inv_t: torch.Tensor
    weight: torch.Tensor | None
    eps: float
    grad_scale: torch.Tensor

    def args(self, compute_grad: bool = True, grad_out: torch.Tensor | None = None) -> tuple:
        return (self.x, self.target, self.inv_t, self.weight, IGNORE, self.eps,
                self.grad_scale, compute_grad, grad_out)


def make_case(m: int, c: int, dtype: torch.dtype, *, prob: bool, weight: bool = False,
              eps: float = 0.0, per_row_t: bool = False, per_row_scale: bool = False,
              ignore: bool = False, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    acc = reference.acc_dtype(dtype)
    x = 3 * torch.randn(m, c, generator=g)
    if prob:
        target = torch.softmax(torch.randn(m, c, generator=g), dim=1).to(dtype)
    else:
        target = torch.randint(0, c, (m,), generator=g)
        if ignore:
            target[1::3] = IGNORE
    inv_t = torch.rand(m if per_row_t else 1, generator=g) * 2 + 0.25
    w = torch.rand(c, generator=g) + 0.5 if weight else None
    scale = torch.rand(m if per_row_scale else 1, generator=g) + 0.5
    return Case(
        x=x.to(DEVICE, dtype), target=target.to(DEVICE), inv_t=inv_t.to(DEVICE, acc),
        weight=None if w is None else w.to(DEVICE, acc), eps=eps,
        grad_scale=scale.to(DEVICE, acc),
    )


def assert_rows_close(got, want, dtype: torch.dtype, equal_nan: bool = False) -> None:
    """Compare (loss, lse, grad, zdot) tuples, dtypes and shapes included."""
    rtol, atol = TOL[dtype]["acc"]
    grtol, gatol = TOL[dtype]["grad"]
    for name, a, b in zip(("loss", "lse", "grad", "zdot"), got, want):
        tol = (grtol, gatol) if name == "grad" else (rtol, atol)
        torch.testing.assert_close(a, b, rtol=tol[0], atol=tol[1], equal_nan=equal_nan,
                                   msg=lambda s, name=name: f"{name}: {s}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_reference(dtype, prob, variant):
    case = make_case(M, C, dtype, prob=prob, **VARIANTS[variant])
    want = reference.ce_rows(*case.args())
    got = triton_ce.ce_rows(*case.args(), config=SMALL)
    assert_rows_close(got, want, dtype)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_only(prob, variant):
    case = make_case(M, C, torch.float32, prob=prob, **VARIANTS[variant])
    loss, lse, grad, zdot = triton_ce.ce_rows(*case.args(compute_grad=False), config=SMALL)
    want = reference.ce_rows(*case.args(compute_grad=False))
    assert grad.shape == (0,) and grad.dtype == case.x.dtype
    assert zdot.shape == (0,) and zdot.dtype == torch.float32
    assert_rows_close((loss, lse, grad, zdot), want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("inplace", [False, True], ids=["buffer", "inplace"])
def test_grad_out(dtype, prob, inplace):
    case = make_case(M, C, dtype, prob=prob, **VARIANTS["all"])
    x0 = case.x.clone()
    loss, lse, grad, zdot = reference.ce_rows(*case.args())
    out = case.x if inplace else torch.empty_like(case.x)
    got = triton_ce.ce_rows(*case.args(grad_out=out), config=SMALL)
    assert got[2].shape == (0,) and got[2].dtype == dtype
    assert_rows_close((got[0], got[1], out, got[3]), (loss, lse, grad, zdot), dtype)
    if not inplace:
        assert torch.equal(case.x, x0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_zdot_mode_writes_no_gradient(dtype, prob):
    case = make_case(M, C, dtype, prob=prob, **VARIANTS["all"])
    out = torch.full_like(case.x, 7.0)
    got = triton_ce.ce_rows(*case.args(compute_grad=GRAD_ZDOT, grad_out=out), config=SMALL)
    want = reference.ce_rows(*case.args(compute_grad=GRAD_ZDOT))
    assert got[2].numel() == 0 and bool((out == 7.0).all())
    for name, a, b in zip(("loss", "lse", "zdot"), (got[0], got[1], got[3]),
                          (want[0], want[1], want[3])):
        torch.testing.assert_close(a, b, rtol=TOL[dtype]["acc"][0], atol=TOL[dtype]["acc"][1],
                                   msg=lambda s, name=name: f"{name}: {s}")


@pytest.mark.parametrize("bad", [-1, C, 1 << 40])
def test_bad_target_is_masked_and_recorded(bad):
    """A target outside [0, C) (deferred checks): never an address, NaN loss, zero gradient
    and zdot, like the reference; the first one is recorded for raise_recorded_errors."""
    case = make_case(M, C, torch.float32, prob=False, weight=True, eps=0.1)
    case.target[2] = bad
    case.target[4] = -7  # a second bad row: only the first recorded value is reported
    got = triton_ce.ce_rows(*case.args(), config=SMALL)
    want = reference.ce_rows(*case.args())
    assert torch.isnan(got[0][2]) and (got[2][2] == 0).all() and got[3][2] == 0
    assert_rows_close(got, want, torch.float32, equal_nan=True)
    with pytest.raises(IndexError, match=rf"Target {bad} is out of bounds.*{C}.*row 2"):
        triton_ce.raise_recorded_errors()
    triton_ce.raise_recorded_errors()  # cleared


# Why each shape: a single class (the gradient vanishes); CIFAR-10 width, rows packed several
# to a program; a width that is no power of two (masked tail in the default chunk); no rows.
@pytest.mark.parametrize("m,c", [(3, 1), (8, 10), (6, 300), (0, 7)])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_default_config(m, c, prob):
    case = make_case(m, c, torch.float32, prob=prob, **VARIANTS["all"])
    want = reference.ce_rows(*case.args())
    got = triton_ce.ce_rows(*case.args())
    assert_rows_close(got, want, torch.float32)


def test_running_max_moves_across_chunks():
    """Max in the last chunk (every step rescales), in the first, and only in the tail, at a
    low temperature so that stale terms would be far off."""
    ramp = torch.linspace(-20.0, 20.0, C)
    x = torch.stack([ramp, ramp.flip(0), torch.where(torch.arange(C) == C - 1, 30.0, ramp / 4)])
    x = x.to(DEVICE)
    target = torch.tensor([0, C - 1, 5], device=DEVICE)
    inv_t = torch.tensor([4.0], device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    for eps in (0.0, 0.2):
        args = (x, target, inv_t, None, IGNORE, eps, one, True)
        assert_rows_close(triton_ce.ce_rows(*args, config=SMALL), reference.ce_rows(*args),
                          torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_huge_logits_tiny_temperature(dtype, prob):
    case = make_case(M, C, dtype, prob=prob, eps=0.1)
    case.x = (case.x.float() + 1e4).to(dtype)
    case.inv_t = torch.full((1,), 1e3, device=DEVICE)   # T = 1e-3, |z| ~ 1e7
    got = triton_ce.ce_rows(*case.args(), config=SMALL)
    for t in got:
        assert torch.isfinite(t).all()
    assert_rows_close(got, reference.ce_rows(*case.args()), dtype)
    want = F.cross_entropy(case.x.double() * 1e3, case.target.double() if prob else case.target,
                           label_smoothing=0.1, reduction="none")
    torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_nan_logits_give_nan_loss(prob):
    case = make_case(M, C, torch.float32, prob=prob, eps=0.1)
    case.x[0, 20] = float("nan")           # in the middle chunk
    if not prob:
        case.target[3] = IGNORE
        case.x[3, 2] = float("nan")
    loss, lse, grad, zdot = triton_ce.ce_rows(*case.args(), config=SMALL)
    want = reference.ce_rows(*case.args())
    assert loss[0].isnan() and lse[0].isnan() and grad[0].isnan().all() and zdot[0].isnan()
    live = [0, 1, 2, 4]
    assert_rows_close((loss[live], lse[live], grad[live], zdot[live]),
                      tuple(t[live] for t in want), torch.float32, equal_nan=True)
    if not prob:
        # An ignored row contributes nothing, NaN logits or not (the reference leaks NaN
        # into its gradient; see the module docstring of triton_ce).
        assert loss[3] == 0 and zdot[3] == 0 and (grad[3] == 0).all() and lse[3].isnan()


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_masked_logits_match_dropping_the_columns(prob):
    """-inf logits (a whole first chunk, so the running max starts at -inf, and scattered
    ones) with zero target mass behave as if the columns were absent, as in
    F.cross_entropy; the gradient there is 0.  The live logits sit near -500 so that a
    rescale from the -inf start computed as exp((0 - max) / T) would overflow."""
    case = make_case(M, C, torch.float32, prob=prob, weight=True, per_row_t=True)
    case.x -= 500
    masked = torch.zeros(C, dtype=torch.bool, device=DEVICE)
    masked[:16] = True
    masked[[20, 33, 36]] = True
    keep = ~masked
    case.x[:, masked] = float("-inf")
    if prob:
        case.target[:, masked] = 0
        case.target /= case.target.sum(dim=1, keepdim=True)
    else:
        case.target = keep.nonzero()[torch.arange(M) % int(keep.sum())].flatten()
    loss, lse, grad, zdot = triton_ce.ce_rows(*case.args(), config=SMALL)
    sub = dataclasses.replace(
        case, x=case.x[:, keep].contiguous(), weight=case.weight[keep],
        target=case.target[:, keep].contiguous() if prob else keep.cumsum(0)[case.target] - 1)
    want = reference.ce_rows(*sub.args())
    assert_rows_close((loss, lse, grad[:, keep], zdot), want, torch.float32)
    assert (grad[:, masked] == 0).all()
    if not prob:
        z = case.x.double() * case.inv_t.double()[:, None]
        want = F.cross_entropy(z, case.target, weight=case.weight.double(), reduction="none")
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)


def test_rejects_bad_inputs():
    case = make_case(M, C, torch.float32, prob=False)
    with pytest.raises(TypeError, match="int32"):
        triton_ce.ce_rows(case.x.int(), *case.args()[1:])
    with pytest.raises(ValueError, match="torch.int32"):
        triton_ce.ce_rows(case.x, case.target.int(), *case.args()[2:])
    with pytest.raises(ValueError, match=r"\(3,\)"):
        triton_ce.ce_rows(*case.args()[:2], case.inv_t.expand(3).contiguous(), *case.args()[3:])
    with pytest.raises(ValueError, match="block_v .* got 24"):
        CEConfig(block_m=1, block_v=24, num_warps=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_config_heuristic(dtype):
    acc_bytes = 8 if dtype == torch.float64 else 4
    listed = {cfg for _, fp32_cfg, fp64_cfg in CE_CONFIGS for cfg in (fp32_cfg, fp64_cfg)}
    for m in (1, 3, 64, 16384):
        for c in (1, 10, 100, 1000, 1024, 32000, 262144, 2**20 + 3):
            cfg = ce_config(m, c, dtype)
            # only the listed shapes, which tools/check_triton.py compiles ahead of time
            assert cfg in listed
            # the whole row, or a wide chunk
            assert cfg.block_v >= min(triton.next_power_of_2(c), 4096)
            assert cfg.block_m == 1 or cfg.block_v < 1024              # only narrow rows packed
            # accumulator bytes per thread, the register budget the heuristic keeps
            assert cfg.block_m * cfg.block_v * acc_bytes // (32 * cfg.num_warps) <= 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (several GiB)")
@pytest.mark.parametrize("m,c,dtype", [
    (8200, 262144, torch.bfloat16),   # m * c > 2^31: row offsets must be 64-bit
    (4, 2**20 + 3, torch.float32),    # 2^20 classes and a masked tail, default chunks
])
def test_large_rows_cuda(m, c, dtype):
    x = torch.randn(m, c, device="cuda", dtype=dtype)
    target = torch.randint(0, c, (m,), device="cuda")
    inv_t = torch.full((1,), 0.5, device="cuda")
    scale = torch.full((1,), 1.0 / m, device="cuda")
    tail = slice(m - 3, m)
    want = reference.ce_rows(x[tail].clone(), target[tail], inv_t, None, IGNORE, 0.1, scale, True)
    loss, lse, grad, zdot = triton_ce.ce_rows(x, target, inv_t, None, IGNORE, 0.1, scale, True,
                                              grad_out=x)
    assert grad.numel() == 0
    assert_rows_close((loss[tail], lse[tail], x[tail], zdot[tail]), want, dtype)


def test_every_launch_is_a_variant_compiled_ahead_of_time():
    """tools/check_triton.py compiles its variants() for sm_80 and sm_90 in CI; whatever the
    launchers pick for any shape and dtype must be one of them."""
    import importlib.util
    import pathlib

    from tempsoft.kernels import triton_pgd

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "check_triton.py"
    spec = importlib.util.spec_from_file_location("check_triton", path)
    tool = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_triton", tool)  # dataclasses look their module up there
    spec.loader.exec_module(tool)
    listed = {(v.kernel, dict(v.signature)["x_ptr"], dict(v.signature).get("act_ptr"),
               v.constexprs, v.options) for v in tool.variants()}
    names = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
             torch.float64: "*fp64"}
    for dtype, x_type in names.items():
        for c in (1, 10, 64, 65, 100, 256, 1000, 1024, 1025, 4096, 32000, 262144, 2**20 + 3):
            cfg = ce_config(4096, c, dtype)
            for prob in (False, True):
                key = ("ce", x_type, None, (("PROB_TARGET", prob), ("BLOCK_M", cfg.block_m),
                                            ("BLOCK_V", cfg.block_v)),
                       (("num_warps", cfg.num_warps),))
                assert key in listed, key
    for n in (1, 75, 128, 129, 3072, 150528):
        for kernel in ("pgd_linf", "pgd_l2"):
            for has_active in (False, True):
                key = (kernel, "*fp32", "*u8" if has_active else "*fp32",
                       (("HAS_ACTIVE", has_active), ("BLOCK", triton_pgd._block(n))),
                       (("enable_fp_fusion", False),))
                assert key in listed, key
