"""The C++ CPU kernel torch.ops.tempsoft_C.ce_rows, called directly, against the reference.

The public op (tempsoft.cross_entropy) is tested across backends in test_cross_entropy.py;
this file checks the row kernel's own contract (tempsoft/kernels/reference.py): every
target kind and option, every dtype, widths around the SIMD vector and the pass-1 block,
writing into grad_out (x itself included), argument checks, and non-finite logits.

Ground truth is the reference evaluated in float64 on the same (upcast) inputs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tempsoft._C", reason="the C++ extension tempsoft._C is not built")

from tempsoft import _dispatch  # noqa: E402
from tempsoft.kernels import reference  # noqa: E402
from tempsoft.kernels.reference import GRAD_FULL, GRAD_ZDOT  # noqa: E402

if not _dispatch.backends()["cpu"][0]:
    pytest.skip(f"no C++ CPU kernels: {_dispatch.backends()['cpu'][1]}", allow_module_level=True)
OPS = _dispatch.native_ops()  # registers the CPU kernels of the level this CPU runs
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative tolerances: `acc` for loss / lse / zdot (computed in fp32, or fp64 for fp64),
# `grad` for the gradient, which is rounded to the input dtype.  Gradients are compared
# with an absolute floor of tol * max|grad| (entries near zero come from cancellations).
TOL = {
    torch.float64: {"acc": 1e-10, "grad": 1e-10},
    torch.float32: {"acc": 1e-5, "grad": 1e-5},
    torch.float16: {"acc": 1e-5, "grad": 2e-3},
    torch.bfloat16: {"acc": 1e-5, "grad": 1.6e-2},
}
IGNORE = -100


def acc_of(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_case(m, c, dtype, *, target="index", weight=False, per_row=False, scale=3.0,
              seed=0):
    """Random kernel arguments: (x, target, inv_t, weight, grad_scale).

    target: "index", "ignored" (index with every third row ignored) or "prob".
    per_row: inv_t and grad_scale with one value per row instead of one in all.
    """
    g = torch.Generator().manual_seed(seed)
    acc = acc_of(dtype)
    x = (torch.randn(m, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    if target == "prob":
        tgt = torch.softmax(torch.randn(m, c, generator=g, dtype=torch.float64), 1).to(dtype)
    else:
        tgt = torch.randint(0, c, (m,), generator=g)
        if target == "ignored":
            tgt[::3] = IGNORE
    rows = m if per_row else 1
    inv_t = (torch.rand(rows, generator=g, dtype=torch.float64) * 2 + 0.25).to(acc)
    w = (torch.rand(c, generator=g, dtype=torch.float64) + 0.5).to(acc) if weight else None
    gscale = (torch.rand(rows, generator=g, dtype=torch.float64) + 0.5).to(acc)
    return x, tgt, inv_t, w, gscale


def expected(x, tgt, inv_t, w, ignore_index, eps, gscale, compute_grad):
    """The reference in float64 on the same inputs."""
    up = lambda t: None if t is None else t.double()  # noqa: E731
    tgt64 = tgt.double() if tgt.is_floating_point() else tgt
    return reference.ce_rows(x.double(), tgt64, up(inv_t), up(w), ignore_index, eps,
                             up(gscale), compute_grad)


def assert_matches(got, want, dtype, compute_grad, *, grad_in=None):
    """got: the kernel's (loss, lse, grad, zdot); grad_in: where the gradient was written."""
    tol = TOL[dtype]["acc"]
    acc = acc_of(dtype)
    loss, lse, grad, zdot = got
    for name, a, b in (("loss", loss, want[0]), ("lse", lse, want[1])):
        assert a.dtype == acc, f"{name} dtype {a.dtype}, expected {acc}"
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    if not compute_grad:
        assert grad.numel() == 0 and zdot.numel() == 0
        return
    assert zdot.dtype == acc
    zscale = 1.0 + float(want[3].abs().max()) if want[3].numel() else 1.0
    torch.testing.assert_close(zdot.double(), want[3], rtol=tol, atol=tol * zscale)
    if grad_in is not None:
        assert grad.numel() == 0, "the gradient went to grad_out; the returned grad must be empty"
        grad = grad_in
    assert grad.dtype == dtype and grad.shape == want[2].shape
    gtol = TOL[dtype]["grad"]
    # Inputs here keep grad_scale * inv_t near 1, so 1 is a floor for the gradient's scale
    # (C = 1 has an all-zero gradient, computed as p A - w q' = 1-ulp residues).
    gmax = max(float(want[2].abs().max()), 1.0) if want[2].numel() else 1.0
    torch.testing.assert_close(grad.double(), want[2], rtol=gtol, atol=gtol * gmax)


def run_kernel(x, tgt, inv_t, w, ignore_index, eps, gscale, mode, ops=OPS):
    """mode: "grad" (returned), "forward" (compute_grad False), "into_x" (grad_out = x, the
    in-place backward), "into_buffer" (a separate grad_out).  Returns (outputs, grad_in).
    ops: where ce_rows comes from (the dispatched level, or one level's module)."""
    if mode == "forward":
        return ops.ce_rows(x, tgt, inv_t, w, ignore_index, eps, gscale, False, None), None
    if mode == "grad":
        return ops.ce_rows(x, tgt, inv_t, w, ignore_index, eps, gscale, True, None), None
    out = x if mode == "into_x" else torch.full_like(x, float("nan"))
    return ops.ce_rows(x, tgt, inv_t, w, ignore_index, eps, gscale, True, out), out


# --------------------------------------------------------------------------------------
# Every option x every dtype
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["grad", "forward", "into_x", "into_buffer"])
@pytest.mark.parametrize("per_row", [False, True], ids=["scalar_t", "per_row_t"])
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("target", ["index", "ignored", "prob"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, target, weight, eps, per_row, mode):
    # C = 2085: one full 2048-column block, a second block of 37 = 2 x 16 + 5 columns
    # (a partial SIMD vector for both 8- and 16-lane vectors); 13 rows.
    x, tgt, inv_t, w, gscale = make_case(13, 2085, dtype, target=target, weight=weight,
                                         per_row=per_row)
    want = expected(x, tgt, inv_t, w, IGNORE, eps, gscale, mode != "forward")
    got, grad_in = run_kernel(x, tgt, inv_t, w, IGNORE, eps, gscale, mode)
    assert_matches(got, want, dtype, mode != "forward", grad_in=grad_in)


# Widths: 1 (a single class: loss 0, gradient 0), 7 and 15/16/17 (below, at and above one
# 16-lane vector), 1000 (one block with a tail), 2047/2048/2049 (around the 2048-column
# block), 4099 (two full blocks and a tail).
WIDTHS = [1, 7, 15, 16, 17, 1000, 2047, 2048, 2049, 4099]


@pytest.mark.parametrize("c", WIDTHS)
@pytest.mark.parametrize("target", ["ignored", "prob"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_widths(dtype, target, c):
    x, tgt, inv_t, w, gscale = make_case(11, c, dtype, target=target, weight=True, per_row=True,
                                         seed=c)
    want = expected(x, tgt, inv_t, w, IGNORE, 0.05, gscale, True)
    got = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.05, gscale, True, None)
    assert_matches(got, want, dtype, True)


def test_increasing_row_max_across_blocks():
    # Sorted logits make the running max grow in every block, so every block rescales the
    # sums; reversed, the max is in the first block and never changes.
    base = torch.linspace(-20, 20, 9000, dtype=torch.float32)
    x = torch.stack([base, base.flip(0), base[torch.randperm(9000)]])
    tgt = torch.tensor([5, 8999, 4500])
    one = torch.ones(1)
    inv_t = torch.tensor([0.7])
    want = expected(x, tgt, inv_t, None, IGNORE, 0.1, one, True)
    assert_matches(OPS.ce_rows(x, tgt, inv_t, None, IGNORE, 0.1, one, True, None), want,
                   torch.float32, True)


def test_matches_f_cross_entropy():
    # The kernel's loss and gradient are F.cross_entropy(x / T)'s, row by row.
    x, tgt, _, w, _ = make_case(37, 300, torch.float64, target="ignored", weight=True)
    T = 0.3
    loss, _, grad, _ = OPS.ce_rows(x, tgt, torch.tensor([1 / T], dtype=torch.float64), w,
                                   IGNORE, 0.2, torch.ones(1, dtype=torch.float64), True, None)
    xr = x.clone().requires_grad_()
    ref = F.cross_entropy(xr / T, tgt, weight=w, ignore_index=IGNORE, label_smoothing=0.2,
                          reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, xr.grad, rtol=1e-12, atol=1e-12)


def test_ignore_index_inside_class_range():
    x, tgt, inv_t, w, gscale = make_case(20, 40, torch.float32, weight=True)
    tgt[::2] = 3
    want = expected(x, tgt, inv_t, w, 3, 0.1, gscale, True)
    got = OPS.ce_rows(x, tgt, inv_t, w, 3, 0.1, gscale, True, None)
    assert_matches(got, want, torch.float32, True)
    assert bool((got[0][::2] == 0).all()) and bool((got[2][::2] == 0).all())


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(0, 6),
    c=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    target=st.sampled_from(["index", "ignored", "prob"]),
    weight=st.booleans(),
    eps=st.sampled_from([0.0, 0.3, 1.0]),
    scale=st.sampled_from([0.1, 3.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_random_small(m, c, dtype, target, weight, eps, scale, seed):
    x, tgt, inv_t, w, gscale = make_case(m, c, dtype, target=target, weight=weight,
                                         per_row=seed % 2 == 1, scale=scale, seed=seed)
    want = expected(x, tgt, inv_t, w, IGNORE, eps, gscale, True)
    got = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, eps, gscale, True, None)
    assert_matches(got, want, dtype, True)


# --------------------------------------------------------------------------------------
# Threads, aliasing, empty input
# --------------------------------------------------------------------------------------
def test_threads_give_identical_results():
    # 64 x 3000 spans several parallel tasks; each row is computed the same way whichever
    # thread runs it, so the results must be bitwise equal.
    x, tgt, inv_t, w, gscale = make_case(64, 3000, torch.float32, target="ignored",
                                         weight=True, per_row=True)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.1, gscale, True, None)
        torch.set_num_threads(max(2, before))
        many = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.1, gscale, True, None)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_equals_out_of_place(dtype):
    x, tgt, inv_t, w, gscale = make_case(9, 2500, dtype, target="prob", weight=True)
    fresh = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.1, gscale, True, None)
    xi = x.clone()
    inplace = OPS.ce_rows(xi, tgt, inv_t, w, IGNORE, 0.1, gscale, True, xi)
    assert inplace[2].numel() == 0
    assert torch.equal(xi, fresh[2])
    for k in (0, 1, 3):
        assert torch.equal(inplace[k], fresh[k])


def test_forward_only_leaves_grad_out_untouched():
    x, tgt, inv_t, w, gscale = make_case(5, 300, torch.float32, weight=True)
    out = torch.full_like(x, 7.0)
    loss, lse, grad, zdot = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.1, gscale, False, out)
    assert bool((out == 7.0).all())
    assert grad.numel() == 0 and zdot.numel() == 0 and loss.shape == (5,)


@pytest.mark.parametrize("level", _dispatch.loadable_cpu_levels())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target,eps", [("ignored", 0.0), ("ignored", 0.1), ("prob", 0.1)])
@pytest.mark.parametrize("c", [11, 1000, 4099], ids=["narrow", "one_block", "three_blocks"])
def test_every_grad_mode_gives_the_same_loss_to_the_bit(level, dtype, target, eps, c):
    """A forward-only call and one that also writes the gradient run different code (each
    mode its own template instantiation): their loss and lse must still agree in every bit,
    since the public op's value may come from either. (Compiled with GCC's default
    floating-point contraction, fp64 losses differed in the last bit between modes.)"""
    ce_rows = _dispatch.cpu_level_module(level).ce_rows
    x, tgt, inv_t, w, gscale = make_case(37, c, dtype, target=target, weight=True, seed=3)
    none = ce_rows(x, tgt, inv_t, w, IGNORE, eps, gscale, 0, None)
    for mode in (GRAD_FULL, GRAD_ZDOT):
        other = ce_rows(x, tgt, inv_t, w, IGNORE, eps, gscale, mode, None)
        assert torch.equal(none[0], other[0]) and torch.equal(none[1], other[1]), mode


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("target", ["ignored", "prob"])
@pytest.mark.parametrize("c", [300, 4099], ids=["one_block", "three_blocks"])
def test_zdot_mode_writes_no_gradient(dtype, target, c):
    """grad_mode zdot (only T needs a gradient): the same zdot as the full mode, no (M, C)
    buffer returned and grad_out left untouched."""
    x, tgt, inv_t, w, gscale = make_case(7, c, dtype, target=target, weight=True, per_row=True)
    full = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.1, gscale, GRAD_FULL, None)
    out = torch.full_like(x, 7.0)
    loss, lse, grad, zdot = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.1, gscale, GRAD_ZDOT, out)
    assert grad.numel() == 0 and bool((out == 7.0).all())
    for a, b in ((loss, full[0]), (lse, full[1]), (zdot, full[3])):
        assert torch.equal(a, b)


def test_bad_grad_mode_is_a_value_error():
    x, tgt, inv_t, w, gscale = make_case(2, 5, torch.float32)
    with pytest.raises(ValueError, match="grad_mode must be 0 .* got 3"):
        OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.0, gscale, 3, None)


@pytest.mark.parametrize("compute_grad", [True, False])
@pytest.mark.parametrize("target", ["index", "prob"])
def test_zero_rows(target, compute_grad):
    x, tgt, inv_t, w, gscale = make_case(0, 5, torch.float32, target=target)
    loss, lse, grad, zdot = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.0, gscale, compute_grad,
                                        None)
    assert loss.shape == (0,) and lse.shape == (0,)
    assert grad.shape == ((0, 5) if compute_grad else (0,))
    assert zdot.shape == (0,)


# --------------------------------------------------------------------------------------
# Non-finite and extreme logits
# --------------------------------------------------------------------------------------
def assert_close_with_nans(got, want):
    """got and want: (loss, lse[, grad, zdot]); NaN where the other has NaN, else within
    1e-5 (the tolerance of the non-finite tests, whose rows mix NaN, inf and finite)."""
    assert len(got) == len(want)
    for name, a, b in zip(("loss", "lse", "grad", "zdot"), got, want):
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_non_finite_rows_match_reference(dtype, eps):
    # Row 0: a NaN in the second block; 1: a +inf; 2: all -inf; 3: ignored with a NaN;
    # 4: one -inf logit in a finite row (loss stays finite without smoothing, as in
    # F.cross_entropy); 5: ordinary.
    x, tgt, inv_t, _, gscale = make_case(6, 3000, dtype, per_row=True)
    x[0, 2500] = float("nan")
    x[1, 10] = float("inf")
    x[2] = float("-inf")
    x[3, 7] = float("nan")
    tgt[3] = IGNORE
    x[4, (int(tgt[4]) + 1) % 3000] = float("-inf")
    want = reference.ce_rows(x, tgt, inv_t, None, IGNORE, eps, gscale, True)
    got = OPS.ce_rows(x, tgt, inv_t, None, IGNORE, eps, gscale, True, None)
    assert_close_with_nans(got, want)
    loss, lse = got[0], got[1]
    assert torch.isnan(loss[0]) and torch.isnan(lse[0])       # NaN logit: NaN loss
    assert not torch.isfinite(loss[1]) and lse[1] == float("inf")
    assert not torch.isfinite(loss[2])
    assert loss[3] == 0 and torch.isnan(lse[3])               # ignored: no loss, lse still NaN
    assert torch.isfinite(got[0][5])
    assert bool(torch.isfinite(got[0][4])) == (eps == 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_wide_rows_in_place_with_non_finite_logits(dtype):
    # Rows wider than a block keep their exponentials in the gradient row, which in place
    # is x itself: a NaN or +inf found in a later block must still reach the exact path
    # with x intact, and -inf logits (a whole first block of them included) must give the
    # same gradient in place as out of place.
    x, tgt, inv_t, _, gscale = make_case(6, 4500, dtype, per_row=True)
    x[0, 4400] = float("nan")
    x[1, 3000] = float("inf")
    x[2] = float("-inf")
    x[3, :2048] = float("-inf")
    tgt[3] = 3000
    x[4, ::7] = float("-inf")
    tgt[4] = 1
    want = reference.ce_rows(x, tgt, inv_t, None, IGNORE, 0.0, gscale, True)
    fresh = OPS.ce_rows(x, tgt, inv_t, None, IGNORE, 0.0, gscale, True, None)
    xi = x.clone()
    inplace = OPS.ce_rows(xi, tgt, inv_t, None, IGNORE, 0.0, gscale, True, xi)
    assert torch.equal(xi.isnan(), fresh[2].isnan())
    assert torch.equal(torch.nan_to_num(xi), torch.nan_to_num(fresh[2]))
    for k in (0, 1, 3):
        assert torch.equal(inplace[k].nan_to_num(), fresh[k].nan_to_num())
    assert_close_with_nans(fresh, want)
    assert bool((fresh[2][3, :2048] == 0).all()) and bool(torch.isfinite(fresh[0][3:]).all())


@pytest.mark.parametrize("mode", ["grad", "forward", "into_x", "into_buffer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("level", _dispatch.loadable_cpu_levels())
def test_one_block_rows_from_a_guessed_shift_match_the_reference(level, dtype, mode):
    # One-block fp32 / fp64 rows of 256 columns or more start pass 1 from a guessed shift
    # (the first vector's max or x_y) instead of reading the row's max first, and fall back
    # to the max where the guess does not hold. Rows that test each way: non-finite logits
    # past the first vector, a max far above the guess (the sum overflows), a max a few
    # nats above it, x_y as the max, a first vector of -inf, an ignored row.
    x, tgt, inv_t, _, gscale = make_case(12, 1000, dtype, per_row=True)
    x[0, 999] = float("nan")
    x[1, 500] = float("inf")
    x[2] = float("-inf")
    x[3, 40] = float("nan")
    tgt[3] = IGNORE
    x[4, :16] = -60.0
    x[4, 700] = 60.0 / float(inv_t[4])        # 120 nats above the guess: exp overflows
    tgt[4] = 0
    x[5, 300] = x[5].max() + 3.0              # a few nats above the guess
    x[6, int(tgt[6])] = x[6].max() + 1.0      # x_y is the max: the guess is exact
    x[7, :16] = float("-inf")                 # no first-vector guess; x_y guesses
    x[8, int(tgt[8]) + 1 if int(tgt[8]) < 999 else 0] = float("-inf")
    want = reference.ce_rows(x.clone(), tgt, inv_t, None, IGNORE, 0.0, gscale, mode != "forward")
    got, grad_in = run_kernel(x, tgt, inv_t, None, IGNORE, 0.0, gscale, mode,
                              ops=_dispatch.cpu_level_module(level))
    loss, lse, grad, zdot = got
    values = (loss, lse, grad if grad_in is None else grad_in, zdot)
    n = 2 if mode == "forward" else 4  # forward only: loss and lse
    assert_close_with_nans(values[:n], want[:n])
    assert bool(torch.isfinite(loss[4:]).all()) and bool(torch.isnan(loss[:1]).all())


@pytest.mark.parametrize("level", _dispatch.loadable_cpu_levels())
def test_a_guessed_shift_never_makes_the_gradient_coefficient_subnormal(level):
    # The guess (x_y = 0) lies 12 nats below the max, s = e^12 + 999 < 2^20, and
    # grad_scale = 2^-121: with the guess the gradient's coefficient grad_scale / s would be
    # a subnormal float (~2^-138: 11 bits, 1.8e-4 off here), while the gradient entries of
    # the max and the target are normal floats that the max's shift computes as precisely
    # as at grad_scale 1 (to the ~1e-6 of the fp32 sum s, 999 equal terms added to 1).
    x = torch.zeros(1, 1000)
    x[0, 500] = 12.0
    tgt = torch.tensor([0])
    one, scale = torch.ones(1), torch.full((1,), 2.0**-121)
    ce_rows = _dispatch.cpu_level_module(level).ce_rows
    grad = ce_rows(x, tgt, one, None, IGNORE, 0.0, scale, True, None)[2][0].double()
    want = reference.ce_rows(x.double(), tgt, one.double(), None, IGNORE, 0.0, scale.double(),
                             True)[2][0]
    for c in (0, 500):
        rel = abs(float(grad[c]) / float(want[c]) - 1)
        assert rel < 1e-5, f"column {c}: relative error {rel:.3g}"


def test_grad_out_partly_over_x_is_refused():
    x = torch.randn(5, 7)
    tgt = torch.zeros(4, dtype=torch.int64)
    one = torch.ones(1)
    with pytest.raises(RuntimeError, match="grad_out must be x itself or not overlap it"):
        OPS.ce_rows(x[1:], tgt, one, None, IGNORE, 0.0, one, True, x[:-1])


@pytest.mark.parametrize("inv_t", [1.0, 1 / 0.7, 1 / 3.0, 10.0])
def test_probabilities_keep_their_relative_accuracy_down_to_the_smallest_normal(inv_t):
    # Logits x from -100 * T up to 0 in one row (shifted, scaled logits d from -100 to 0):
    # every gradient entry (grad_scale * inv_t * p_c off the target) must carry the
    # precision of fp32, not just an absolute error small next to the largest entry.  (The
    # fp32 exponential is a polynomial of the kernels' own; this is its accuracy check
    # through the op.)  At T != 1, rounding d = (x - m) inv_t to fp32 alone costs a relative
    # error of |d| 2^-24 (3e-6 at d = -87): the AVX-512 exponential never forms d; the other
    # levels' exp_u20 does, and is held to the T = 1 case.
    if inv_t != 1.0 and _dispatch.cpu_level() != "avx512":
        pytest.skip(f"level {_dispatch.cpu_level()} rounds d before its exponential")
    x = (torch.linspace(-100.0, 0.0, 5000, dtype=torch.float64) / inv_t).float().reshape(1, -1)
    tgt = torch.tensor([4999])
    one, it = torch.ones(1), torch.full((1,), inv_t)
    got = OPS.ce_rows(x, tgt, it, None, IGNORE, 0.0, one, True, None)[2][0].double()
    want = reference.ce_rows(x.double(), tgt, it.double(), None, IGNORE, 0.0, one.double(),
                             True)[2][0]
    normal = want[:-1] > torch.finfo(torch.float32).tiny
    rel = (got[:-1][normal] / want[:-1][normal] - 1).abs()
    assert float(rel.max()) < 1e-6, f"max relative error {float(rel.max()):.3g}"
    assert bool((got[:-1][~normal] >= 0).all()) and float(got[:-1][~normal].max()) < 1e-37


@pytest.mark.parametrize("target", ["index", "prob"])
@pytest.mark.parametrize("c,cols", [(2100, [0, 2047, 2048, 2090, 2099]),
                                    (1000, [0, 15, 16, 500, 999])], ids=["wide", "one_block"])
@pytest.mark.parametrize("level", _dispatch.loadable_cpu_levels())
def test_nan_in_any_column_gives_nan_loss(level, target, c, cols):
    # Each row has a single NaN in a different column: first, the edge of a block or of
    # the first vector, the tail, last.
    x, tgt, inv_t, w, gscale = make_case(5, c, torch.float32, target=target)
    for row, col in enumerate(cols):
        x[row, col] = float("nan")
    loss, lse, grad, zdot = _dispatch.cpu_level_module(level).ce_rows(x, tgt, inv_t, w, IGNORE, 0.0, gscale, True, None)
    assert bool(torch.isnan(loss).all()) and bool(torch.isnan(lse).all())
    assert bool(torch.isnan(zdot).all()) and bool(torch.isnan(grad).any(dim=1).all())


@pytest.mark.parametrize("target", ["index", "prob"])
def test_huge_logits_tiny_temperature_stay_finite(target):
    # z = x / T reaches 1e7: only the shifted form (x - max x) / T keeps exp finite.
    x, tgt, _, w, gscale = make_case(16, 1500, torch.float32, target=target, weight=True,
                                     scale=1e4)
    inv_t = torch.tensor([1e3])
    got = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.1, gscale, True, None)
    for t in got:
        assert bool(torch.isfinite(t).all())
    want = expected(x, tgt, inv_t, w, IGNORE, 0.1, gscale, True)
    assert_matches(got, want, torch.float32, True)


# --------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [5, -1, 1000, -101])
def test_out_of_range_target_raises_index_error(bad):
    x, tgt, inv_t, w, gscale = make_case(4, 5, torch.float32)
    tgt[2] = bad
    with pytest.raises(IndexError, match=rf"target {bad} at row 2 .*5 classes"):
        OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.0, gscale, True, None)


def test_ignore_index_value_is_not_out_of_range():
    x, tgt, inv_t, w, gscale = make_case(4, 5, torch.float32)
    tgt[:] = IGNORE
    loss = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.0, gscale, True, None)[0]
    assert bool((loss == 0).all())


def _good_args():
    x, tgt, inv_t, w, gscale = make_case(4, 5, torch.float32, weight=True)
    return dict(x=x, target=tgt, inv_t=inv_t, weight=w, ignore_index=IGNORE,
                label_smoothing=0.0, grad_scale=gscale, compute_grad=True, grad_out=None)


BAD_ARGS = {
    "x_1d": (dict(x=torch.randn(5)), "must be 2-D"),
    "x_int": (dict(x=torch.ones(4, 5, dtype=torch.int32)), "must be float32"),
    "x_strided": (dict(x=torch.randn(5, 4).t()), "must be contiguous"),
    "no_classes": (dict(x=torch.randn(4, 0)), "at least one class"),
    "target_int32": (dict(target=torch.zeros(4, dtype=torch.int32)), "must be int64"),
    "target_rows": (dict(target=torch.zeros(3, dtype=torch.int64)), r"shape \(4,\)"),
    "prob_dtype": (dict(target=torch.rand(4, 5, dtype=torch.float64)), "dtype of x"),
    "prob_shape": (dict(target=torch.rand(4, 6)), "shape"),
    "inv_t_dtype": (dict(inv_t=torch.ones(1, dtype=torch.float64)), "inv_t must have dtype"),
    "inv_t_shape": (dict(inv_t=torch.ones(3)), "inv_t must have shape"),
    "scale_shape": (dict(grad_scale=torch.ones(2, 2)), "grad_scale must have shape"),
    "weight_shape": (dict(weight=torch.ones(4)), r"weight must have shape \(5,\)"),
    "weight_dtype": (dict(weight=torch.ones(5, dtype=torch.float64)), "weight must have dtype"),
    "smoothing": (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\], got 1.5"),
    "out_shape": (dict(grad_out=torch.empty(4, 6)), "grad_out must have the shape"),
    "out_dtype": (dict(grad_out=torch.empty(4, 5, dtype=torch.float64)), "grad_out must have"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_raise(case):
    change, message = BAD_ARGS[case]
    args = _good_args()
    args.update(change)
    with pytest.raises(RuntimeError, match=message):
        OPS.ce_rows(*args.values())



# --------------------------------------------------------------------------------------
# ce_forward: the CPU op's forward in one call (ce_rows' checks and kernel + the reduction)
# --------------------------------------------------------------------------------------
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def mean_denominator(tgt, w):
    """PyTorch's mean denominator, in float64: the rows for probability targets, else the
    summed weight of the rows that are not ignored."""
    if tgt.is_floating_point():
        return float(tgt.shape[0])
    valid = tgt != IGNORE
    return float(w.double()[tgt[valid]].sum()) if w is not None else float(valid.sum())


@pytest.mark.parametrize("mode", [GRAD_FULL, GRAD_ZDOT, 0], ids=["full", "zdot", "none"])
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("weight", [False, True], ids=["noweight", "weight"])
@pytest.mark.parametrize("target", ["index", "ignored", "prob"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ce_forward_is_ce_rows_plus_the_reduction(dtype, target, weight, reduction, mode):
    x, tgt, inv_t, w, _ = make_case(37, 19, dtype, target=target, weight=weight, seed=5)
    acc = acc_of(dtype)
    red = REDUCTIONS[reduction]
    loss, lse, grad, zdot, scale = _dispatch.cpu_module().ce_forward(
        x, tgt, inv_t, w, IGNORE, 0.1, red, mode)
    denom = mean_denominator(tgt, w) if reduction == "mean" else 1.0
    # The scale is 1/denominator computed in float64 and rounded once to the acc dtype.
    assert scale.dtype == acc and scale.shape == (1,)
    assert scale.item() == torch.tensor(1.0 / denom, dtype=acc).item()
    # Everything per row is ce_rows' own output with that scale, bit for bit.
    rows, lse_r, grad_r, zdot_r = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.1, scale, mode, None)
    for got, want in ((lse, lse_r), (grad, grad_r), (zdot, zdot_r)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    if reduction == "none":
        assert torch.equal(loss, rows)
        return
    assert loss.dtype == acc and loss.shape == ()
    want = rows.double().sum() / denom
    torch.testing.assert_close(loss.double(), want, rtol=TOL[dtype]["acc"], atol=0)
    # and against the reference loss in float64 (to the acc dtype's precision)
    ref_rows = expected(x, tgt, inv_t, w, IGNORE, 0.1, torch.ones(1), False)[0]
    torch.testing.assert_close(loss.double(), ref_rows.sum() / denom, rtol=TOL[dtype]["acc"],
                               atol=TOL[dtype]["acc"])


@pytest.mark.parametrize("weight", [False, True], ids=["noweight", "weight"])
def test_ce_forward_mean_over_no_rows_is_nan_with_a_zero_gradient(weight):
    x, tgt, inv_t, w, _ = make_case(6, 5, torch.float32, weight=weight)
    tgt[:] = IGNORE
    loss, _, grad, _, scale = _dispatch.cpu_module().ce_forward(
        x, tgt, inv_t, w, IGNORE, 0.0, REDUCTIONS["mean"], GRAD_FULL)
    assert loss.isnan() and scale.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(x))
    empty = make_case(0, 5, torch.float32, target="prob")
    loss = _dispatch.cpu_module().ce_forward(empty[0], empty[1], empty[2], None, IGNORE, 0.0,
                                             REDUCTIONS["mean"], GRAD_FULL)[0]
    assert loss.isnan()


def test_ce_forward_checks_targets_before_indexing_the_weights():
    x, tgt, inv_t, w, _ = make_case(4, 5, torch.float32, weight=True)
    tgt[1] = 10**9  # as an index into the weights this would read far outside them
    with pytest.raises(IndexError, match="target 1000000000 at row 1"):
        _dispatch.cpu_module().ce_forward(x, tgt, inv_t, w, IGNORE, 0.0, REDUCTIONS["mean"],
                                          GRAD_FULL)


def test_ce_forward_rejects_an_unknown_reduction():
    x, tgt, inv_t, w, _ = make_case(4, 5, torch.float32)
    with pytest.raises(ValueError, match="reduction must be 0 .none., 1 .mean. or 2 .sum., got 3"):
        _dispatch.cpu_module().ce_forward(x, tgt, inv_t, w, IGNORE, 0.0, 3, GRAD_FULL)


def test_ce_forward_writes_into_grad_out():
    x, tgt, inv_t, w, _ = make_case(9, 33, torch.float32, target="ignored")
    out = torch.full_like(x, float("nan"))
    loss, _, grad, _, scale = _dispatch.cpu_module().ce_forward(
        x, tgt, inv_t, w, IGNORE, 0.0, REDUCTIONS["mean"], GRAD_FULL, out)
    assert grad.numel() == 0
    want = OPS.ce_rows(x, tgt, inv_t, w, IGNORE, 0.0, scale, GRAD_FULL, None)[2]
    assert torch.equal(out, want)


# --------------------------------------------------------------------------------------
# Streaming stores: gradients of 8 MiB or more (csrc/cpu/cross_entropy.cpp,
# kConfig.stream_min_bytes) whose rows are one block are written with non-temporal stores,
# smaller ones with plain stores. The values must not change by a bit.
# --------------------------------------------------------------------------------------
STREAM_MIN_BYTES = 8 << 20

STREAM_CASES = {
    # name: (rows, classes, dtype, target, weight, smoothing)
    "index": (2100, 1000, torch.float32, "index", False, 0.0),
    "ignored_smoothing": (2100, 1000, torch.float32, "ignored", False, 0.1),
    "prob_weight": (1100, 2047, torch.float32, "prob", True, 0.05),
    "weight_odd_width": (1700, 1283, torch.float32, "index", True, 0.0),
    "fp64": (1100, 1000, torch.float64, "index", True, 0.1),
}


# Every level this CPU runs: avx2 and avx512 stream with their own intrinsics, default not.
LEVELS = _dispatch.loadable_cpu_levels()


def _in_chunks(ce_rows, x, tgt, inv_t, w, eps, gscale, out=None, rows=256):
    """ce_rows over row chunks small enough for plain stores, concatenated."""
    parts = []
    for r0 in range(0, x.shape[0], rows):
        sl = slice(r0, r0 + rows)
        parts.append(ce_rows(x[sl], tgt[sl], inv_t, w, IGNORE, eps, gscale, GRAD_FULL,
                             None if out is None else out[sl]))
    return [torch.cat([p[k] for p in parts]) for k in range(4)]


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("case", list(STREAM_CASES))
def test_streamed_gradient_equals_the_plainly_stored_one(case, level):
    ce_rows = _dispatch.cpu_level_module(level).ce_rows
    m, c, dtype, target, weight, eps = STREAM_CASES[case]
    assert m * c * dtype.itemsize >= STREAM_MIN_BYTES > 256 * c * dtype.itemsize
    x, tgt, inv_t, w, gscale = make_case(m, c, dtype, target=target, weight=weight, seed=11)
    whole = ce_rows(x, tgt, inv_t, w, IGNORE, eps, gscale, GRAD_FULL, None)
    chunks = _in_chunks(ce_rows, x, tgt, inv_t, w, eps, gscale)
    for name, a, b in zip(("loss", "lse", "grad", "zdot"), whole, chunks):
        assert torch.equal(a, b), f"{name} differs between streamed and plain stores"
    # and the gradient is the right one
    want = expected(x[:64], tgt[:64], inv_t, w, IGNORE, eps, gscale, True)
    assert_matches([o[:64] for o in whole], want, dtype, True)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("offset", [0, 3], ids=["aligned", "misaligned"])
def test_streamed_gradient_into_grad_out_and_into_x(offset, level):
    """Into a separate buffer starting off the vector alignment, and over x itself."""
    ce_rows = _dispatch.cpu_level_module(level).ce_rows
    m, c = 2100, 1000
    x, tgt, inv_t, w, gscale = make_case(m, c, torch.float32, target="ignored", seed=12)
    want = _in_chunks(ce_rows, x, tgt, inv_t, w, 0.0, gscale)
    buf = torch.full((m * c + offset,), float("nan"))
    out = buf[offset:].view(m, c)
    ce_rows(x, tgt, inv_t, w, IGNORE, 0.0, gscale, GRAD_FULL, out)
    assert torch.equal(out, want[2])
    x_copy = x.clone()
    ce_rows(x_copy, tgt, inv_t, w, IGNORE, 0.0, gscale, GRAD_FULL, x_copy)
    assert torch.equal(x_copy, want[2])
