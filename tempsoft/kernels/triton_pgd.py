"""Triton kernels for the fused PGD step (contract: ``pgd_step`` in reference.py).

Linf is elementwise: a 2-D grid (sample, block of elements), each program loading its
sample's eps and alpha once. L2 needs two per-sample norms: one program per sample walks its
row three times (gradient norm, norm of the stepped offset, write), with fp64 accumulators.

Both launch with ``enable_fp_fusion=False``: the reference rounds each product before the
add, and an FMA would change the last bit. The divisions and square roots run in fp64,
where Triton emits the IEEE-rounded instructions (its fast approximate forms are fp32 only).
Minimum and maximum propagate NaN, as torch.clamp / minimum / maximum do in the reference
(tl.minimum and tl.maximum return the other operand on the GPU and under the interpreter).

Block sizes come from ``PGD_BLOCKS`` only, so that tools/check_triton.py can compile every
variant the launcher can pick ahead of time.
"""
import torch
import triton
import triton.language as tl

from tempsoft._dispatch import triton_interpreted
from tempsoft.kernels.triton_support import on_device

# Elements per program step: small rows (the interpreter runs one numpy op per block, and
# CIFAR-sized rows need no more) and large ones.
PGD_BLOCKS = (128, 1024)
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (blocks per sample)


@triton.jit
def _min_nan(a, b):
    # a if a < b or a is NaN; otherwise b (which is then the minimum, or NaN).
    return tl.where((a < b) | (a != a), a, b)


@triton.jit
def _max_nan(a, b):
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _clamp_nan(v, lo, hi):
    return _min_nan(_max_nan(v, lo), hi)


@triton.jit
def _sign(g):
    # 1, -1 or 0; NaN compares false both ways, so a NaN gradient gives no step.
    return (g > 0).to(g.dtype) - (g < 0).to(g.dtype)


@triton.jit
def _live_length(act_ptr, row, n, HAS_ACTIVE: tl.constexpr):
    # Row length as the masks see it: 0 for an inactive row, which then loads and stores
    # nothing. (A comparison, not `mask & flag`: the interpreter mistypes `&` of masks.)
    if HAS_ACTIVE:
        return tl.where(tl.load(act_ptr + row) != 0, n, 0)
    return n


@triton.jit
def _pgd_linf_kernel(
    x_ptr, g_ptr, x0_ptr, eps_ptr, alpha_ptr, act_ptr, n, lower, upper,
    HAS_ACTIVE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < _live_length(act_ptr, row, n, HAS_ACTIVE)
    base = row * n
    eps = tl.load(eps_ptr + row)
    alpha = tl.load(alpha_ptr + row)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0)
    x0 = tl.load(x0_ptr + base + offs, mask=mask, other=0.0)
    a = x + alpha * _sign(g)                       # alpha * sign is exact
    d = _clamp_nan(a - x0, -eps, eps)              # offset clamped to the ball
    out = _clamp_nan(x0 + d, lower, upper)
    tl.store(x_ptr + base + offs, out, mask=mask)


@triton.jit
def _pgd_l2_kernel(
    x_ptr, g_ptr, x0_ptr, eps_ptr, alpha_ptr, act_ptr, n, lower, upper,
    HAS_ACTIVE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    n_live = _live_length(act_ptr, row, n, HAS_ACTIVE)
    cols = tl.arange(0, BLOCK)

    # 1. G = sum g^2 in fp64 (squares of fp32 values are exact there)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        m = start + cols < n_live
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0).to(tl.float64)
        acc += g * g
    g_sq = tl.sum(acc, axis=0)
    step = (g_sq > 0) & (g_sq < float("inf"))
    alpha = tl.load(alpha_ptr + row).to(tl.float64)
    scale = tl.where(step, alpha / tl.sqrt(tl.where(step, g_sq, 1.0)), 0.0).to(tl.float32)
    # A gradient too small to normalise (the scale overflows fp32) is no step, like a zero one.
    step = step & (scale < float("inf"))
    scale = tl.where(step, scale, 0.0)

    # 2. D = sum (x + g*scale - x0)^2 in fp64 -> projection factor
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for start in range(0, n, BLOCK):
        m = start + cols < n_live
        x = tl.load(x_ptr + base + start + cols, mask=m, other=0.0)
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0)
        x0 = tl.load(x0_ptr + base + start + cols, mask=m, other=0.0)
        d = (x + tl.where(step, g * scale, 0.0)) - x0
        d64 = d.to(tl.float64)
        acc += d64 * d64
    norm = tl.sqrt(tl.sum(acc, axis=0))
    eps64 = tl.load(eps_ptr + row).to(tl.float64)
    f = tl.where(norm > eps64, eps64 / tl.where(norm > eps64, norm, 1.0), 1.0)
    f = f.to(tl.float32)

    # 3. write clamp(x0 + d * f)
    for start in range(0, n, BLOCK):
        m = start + cols < n_live
        x = tl.load(x_ptr + base + start + cols, mask=m, other=0.0)
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0)
        x0 = tl.load(x0_ptr + base + start + cols, mask=m, other=0.0)
        d = ((x + tl.where(step, g * scale, 0.0)) - x0) * f
        out = _clamp_nan(x0 + d, lower, upper)
        tl.store(x_ptr + base + start + cols, out, mask=m)


def _block(n: int) -> int:
    """The smallest of PGD_BLOCKS that covers a row of n elements, else the largest."""
    for block in PGD_BLOCKS:
        if n <= block:
            return block
    return PGD_BLOCKS[-1]


def pgd_step_(x_adv, grad, x_nat, eps, alpha, active, norm, lower, upper) -> None:
    """Launch the kernel for contiguous fp32 (B, ...) tensors and (B,) eps/alpha/active."""
    if x_adv.dtype != torch.float32:
        raise TypeError(f"the Triton PGD kernels run float32 only, got {x_adv.dtype}")
    batch = x_adv.shape[0]
    if batch == 0 or x_adv.numel() == 0:
        return
    n = x_adv.numel() // batch
    has_active = active is not None
    # Bytes, not bool: uint8 loads behave the same on every Triton version and the
    # interpreter. A pointer argument must be a tensor; eps stands in when there is no mask.
    act = active.view(torch.uint8) if has_active else eps
    opts = {} if triton_interpreted() else {"enable_fp_fusion": False}
    block = _block(n)
    if norm == 0:
        grid = (batch, triton.cdiv(n, block))
        if grid[1] > _MAX_GRID_Y:
            raise ValueError(
                f"the Triton Linf kernel takes at most {_MAX_GRID_Y * block} elements per "
                f"sample, got {n}"
            )
        kernel = _pgd_linf_kernel
    elif norm == 2:
        grid = (batch,)
        kernel = _pgd_l2_kernel
    else:
        raise ValueError(f"norm must be 0 (Linf) or 2 (L2), got {norm!r}")
    # Launch on the tensors' device (and its current stream), not on the current device.
    with on_device(x_adv):
        kernel[grid](x_adv, grad, x_nat, eps, alpha, act, n, float(lower), float(upper),
                     HAS_ACTIVE=has_active, BLOCK=block, **opts)
