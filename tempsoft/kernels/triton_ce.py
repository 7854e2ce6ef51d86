"""Triton backend of the fused temperature-scaled cross-entropy row kernel.

Implements ``ce_rows`` exactly as documented in ``tempsoft/kernels/reference.py`` (the
contract: math, shapes, dtypes).  Each program owns ``block_m`` whole rows and walks their
columns in ``block_v`` chunks, twice at most:

  pass 1  online softmax statistics (running max, rescaled sum of exp, and the running sums
          that label smoothing / probability targets need) -> loss, lse
  pass 2  (compute_grad only) reload each chunk, write grad_scale * dloss/dx, accumulate zdot

So the logits are read twice and the gradient written once (the Liger / QuACK scheme); with
``grad_out=x`` the gradient overwrites the logits chunk by chunk, each chunk loaded before it
is stored.  Per-row results are written by the kernel and every reduction over rows is left
to the caller, in PyTorch: nothing here synchronises with the host.

Only the target kind (index or probability), the dtypes and the block shape are compile-time
constants; weights, label smoothing and the grad mode are runtime arguments.  That keeps the
set of compiled variants small enough for ``tools/check_triton.py`` to compile every one of
them ahead of time for sm_80 and sm_90 (``CE_CONFIGS`` lists the block shapes).

A class index outside [0, C) (possible when the caller deferred its range check, see
``tempsoft._dispatch.deferred_checks``) is never used as an address: its row gets a NaN loss
and a zero gradient, and the first such target is recorded on the device for
``raise_recorded_errors`` (``tempsoft.check_errors``).

Everything is computed from the shifted logits ``d = (x - max x) * inv_t`` (max over the row,
replaced by 0 when it is not finite, as in the reference), so huge logits at a tiny
temperature (x ~ 1e4, T = 1e-3) stay finite.  Math runs in fp32 for fp16 / bf16 / fp32
inputs and in fp64 for fp64 inputs; the gradient is stored in the input dtype.

Where this kernel knowingly departs from the reference (both on degenerate inputs):
  * With probability targets, a class with logit -inf and target probability 0 contributes
    0 to the loss (0 * log 0 := 0: the column behaves as if absent).  The reference, like
    F.cross_entropy, returns NaN there.  (With index targets all backends agree: such a
    class contributes nothing without label smoothing, and inf with it.)
  * Rows whose target is ignore_index get an exactly zero gradient and zdot even when their
    logits hold NaN; the reference propagates the NaN into them.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tempsoft.kernels import reference
from tempsoft.kernels.triton_support import on_device
from tempsoft.kernels.reference import acc_dtype

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


GRAD_NONE, GRAD_FULL, GRAD_ZDOT = reference.GRAD_NONE, reference.GRAD_FULL, reference.GRAD_ZDOT


# ---------------------------------------------------------------------------------------
# Tuning: the only place launch parameters are chosen.
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CEConfig:
    """Launch parameters of the row kernel.

    Attributes:
        block_m: rows per program (power of two); > 1 only for narrow rows.
        block_v: columns per loop step (power of two); rows wider than this are walked in
            several steps with online rescaling.
        num_warps: warps per program.
    """

    block_m: int
    block_v: int
    num_warps: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_v", "num_warps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value & (value - 1):
                raise ValueError(f"CEConfig.{name} must be a positive power of two, got {value!r}")


# Register budget, from ptxas -v on the sm_90a code (Triton 3.9, CUDA 12.9; no GPU run yet):
# one-row programs with 16 fp32 (8 fp64) accumulator elements per thread use 64-128
# registers without spilling in every variant, 32 per thread spills; packed multi-row tiles
# cost more per element (per-element 64-bit addresses, per-row vectors), ~80-110 registers
# at 4 elements per thread.
#
# The launch shapes, by the widest row each serves: narrow rows are packed several to a
# program in 1024-element tiles (4 elements per thread at 8 warps) so that C = 10 or 100 does
# not launch one tiny program per sample; wider rows get one program each, walked in chunks
# of up to 32 KiB of accumulators (16 fp32 / 8 fp64 elements per thread).  A fixed list, not
# a formula of the shape, so that every variant the launcher can pick is known and compiled
# ahead of time by tools/check_triton.py.  Not yet tuned by measurement on a GPU.
#   (widest row, fp32 config, fp64 config)
CE_CONFIGS = (
    (64, CEConfig(16, 64, 8), CEConfig(16, 64, 8)),
    (256, CEConfig(4, 256, 8), CEConfig(4, 256, 8)),
    (1024, CEConfig(1, 1024, 4), CEConfig(1, 1024, 4)),
    (4096, CEConfig(1, 4096, 8), CEConfig(1, 4096, 16)),
    (None, CEConfig(1, 8192, 16), CEConfig(1, 4096, 16)),
)


def ce_config(n_rows: int, n_cls: int, dtype: torch.dtype = torch.float32) -> CEConfig:
    """Launch parameters for (n_rows, n_cls) logits of `dtype` on an H100-class GPU.

    Picks the first entry of ``CE_CONFIGS`` whose rows are at least ``n_cls`` wide (fp64
    gets half the chunk: its accumulators are twice as wide).  ``n_rows`` does not enter:
    the grid (rows / block_m programs) covers any batch size where the kernel's time matters.

    Example:
        >>> ce_config(16384, 262144, torch.bfloat16)
        CEConfig(block_m=1, block_v=8192, num_warps=16)
        >>> ce_config(1024, 10)
        CEConfig(block_m=16, block_v=64, num_warps=8)
    """
    del n_rows  # see the docstring
    for widest, fp32_cfg, fp64_cfg in CE_CONFIGS:
        if widest is None or n_cls <= widest:
            return fp64_cfg if dtype == torch.float64 else fp32_cfg
    raise AssertionError("CE_CONFIGS ends with a catch-all entry")


# ---------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------

@triton.jit
def _ce_rows_kernel(
    x_ptr, target_ptr, inv_t_ptr, weight_ptr, grad_scale_ptr,
    loss_ptr, lse_ptr, grad_ptr, zdot_ptr, record_ptr,
    n_rows, n_cls, n_weight, inv_t_stride, grad_scale_stride, ignore_index,
    eps_hi, eps_lo, grad_mode,
    PROB_TARGET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # inv_t is stored in the accumulation dtype (fp32, or fp64 for fp64 logits).
    ACC = inv_t_ptr.dtype.element_ty
    NEG_INF = float("-inf")

    # int64 row offsets: rows * n_cls exceeds 2^31 for e.g. 16384 x 262144 logits.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    row_off = rows * n_cls
    inv_t = tl.load(inv_t_ptr + rows * inv_t_stride, mask=row_ok, other=1.0)
    # Triton passes Python floats as fp32; the host splits eps into hi + lo so that fp64
    # kernels recover it to ~1e-16.
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    eps_c = eps / n_cls
    smoothing = eps > 0

    # 1. Load the target (index targets only): its logit and class weight, masked so that
    #    ignored rows and out-of-range targets never address memory.  n_weight is C with a
    #    weight tensor and 0 without (then every weight reads as 1).
    if PROB_TARGET:
        live = row_ok
    else:
        y_raw = tl.load(target_ptr + rows, mask=row_ok, other=ignore_index)
        counted = row_ok & (y_raw != ignore_index)
        bad = counted & ((y_raw < 0) | (y_raw >= n_cls))
        live = counted & (y_raw >= 0) & (y_raw < n_cls)
        if tl.sum(bad.to(tl.int32), axis=0) > 0:
            _record_bad_target(record_ptr, bad, y_raw, rows, n_cls)
        y = tl.where(live, y_raw, 0)
        x_y = tl.load(x_ptr + row_off + y, mask=live, other=0.0).to(ACC)
        w_y = tl.load(weight_ptr + y, mask=live & (y < n_weight), other=1.0).to(ACC)
        w_y = tl.where(live, w_y, 0.0)

    # 2. Online softmax statistics over column chunks.  With m the running max and
    #    ms = m if finite else 0 (the shift):
    #      s   = sum_c exp((x_c - ms) * inv_t)
    #      cw  = sum_c k_c,  cwx = sum_c k_c (x_c - ms)
    #    where k_c = w_c (index target, smoothing) or w_c q'_c (probability target).  When
    #    the shift grows from ms to ms', s scales by exp((ms - ms') * inv_t) and cwx gains
    #    cw * (ms - ms'): every term stays relative to the current max, never to zero.
    m = tl.full([BLOCK_M], NEG_INF, ACC)
    ms = tl.zeros([BLOCK_M], ACC)
    s = tl.zeros([BLOCK_M], ACC)
    cw = tl.zeros([BLOCK_M], ACC)
    cwx = tl.zeros([BLOCK_M], ACC)
    for start in range(0, n_cls, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        col_ok = cols < n_cls
        mask = row_ok[:, None] & col_ok[None, :]
        offs = row_off[:, None] + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=NEG_INF).to(ACC)

        m_new = tl.maximum(m, tl.max(x, axis=1))
        ms_new = tl.where(tl.abs(m_new) < float("inf"), m_new, 0.0)
        # Until a finite logit is seen s is exactly 0; the factor must then be 0, not an
        # exp((0 - ms') * inv_t) that may overflow to inf and turn 0 * inf into NaN.
        alpha = tl.where(m == NEG_INF, 0.0, tl.exp((ms - ms_new) * inv_t))
        d = (x - ms_new[:, None]) * inv_t[:, None]
        s = s * alpha + tl.sum(tl.exp(d), axis=1)
        if PROB_TARGET:
            cw, cwx = _add_sums(cw, cwx, target_ptr, weight_ptr, offs, mask, cols, col_ok, x,
                                ms, ms_new, eps, eps_c, n_weight, PROB_TARGET)
        elif smoothing:
            cw, cwx = _add_sums(cw, cwx, target_ptr, weight_ptr, offs, mask, cols, col_ok, x,
                                ms, ms_new, eps, eps_c, n_weight, PROB_TARGET)
        m = m_new
        ms = ms_new

    log_s = tl.log(s)                      # lse - max z
    lse = log_s + ms * inv_t
    # sum_c k_c (lse - z_c) = cw * log_s - inv_t * cwx
    k_nlp = cw * log_s - inv_t * cwx
    if PROB_TARGET:
        # loss = sum_c w_c q'_c (lse - z_c);   S = sum_c w_c q'_c
        loss = k_nlp
        coef = cw
    else:
        # loss = (1-eps) w_y (lse - z_y) + eps/C sum_c w_c (lse - z_c)
        # A    = (1-eps) w_y + eps/C W
        # (the smoothing term only when eps > 0: without it, a -inf logit elsewhere in the
        # row would give 0 * inf)
        loss = (1.0 - eps) * w_y * (log_s - (x_y - ms) * inv_t)
        coef = (1.0 - eps) * w_y
        loss = tl.where(smoothing, loss + eps_c * k_nlp, loss)
        coef = tl.where(smoothing, coef + eps_c * cw, coef)
        loss = tl.where(live, loss, 0.0)
        loss = tl.where(bad, float("nan"), loss)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)

    # 3. Gradient: grad_c = grad_scale * inv_t * dloss/dz_c, and zdot = sum_c dloss/dz_c d_c.
    #    grad_mode 1 (full) stores it; 2 (zdot) only sums.
    if grad_mode != 0:
        scale = inv_t * tl.load(grad_scale_ptr + rows * grad_scale_stride, mask=row_ok, other=0.0)
        zdot = tl.zeros([BLOCK_M], ACC)
        for start in range(0, n_cls, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            col_ok = cols < n_cls
            out_mask = row_ok[:, None] & col_ok[None, :]
            # Ignored rows (and bad targets) read nothing and get a zero gradient.
            mask = live[:, None] & col_ok[None, :]
            offs = row_off[:, None] + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=NEG_INF).to(ACC)
            d = (x - ms[:, None]) * inv_t[:, None]
            p = tl.exp(d - log_s[:, None])
            if PROB_TARGET:
                # dloss/dz_c = p_c S - w_c q'_c
                k = _coefficients(target_ptr, weight_ptr, offs, mask, cols, col_ok, eps, eps_c,
                                  n_weight, PROB_TARGET)
                dz = p * coef[:, None] - k
            else:
                # dloss/dz_c = p_c A - (1-eps) w_y [c == y] - eps/C w_c
                is_y = cols[None, :] == y[:, None]
                dz = p * coef[:, None] - tl.where(is_y, ((1.0 - eps) * w_y)[:, None], 0.0)
                if smoothing:
                    k = _coefficients(target_ptr, weight_ptr, offs, mask, cols, col_ok, eps,
                                      eps_c, n_weight, PROB_TARGET)
                    dz -= eps_c * k
            dz = tl.where(mask, dz, 0.0)
            # A class with p = 0 and d = -inf has dz = 0 unless smoothing gives it weight;
            # 0 * inf := 0 as in the reference.
            zdot += tl.sum(tl.where(dz == 0, 0.0, dz * d), axis=1)
            if grad_mode == 1:
                grad = dz * scale[:, None]
                tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=out_mask)
        tl.store(zdot_ptr + rows, zdot, mask=row_ok)


@triton.jit
def _coefficients(target_ptr, weight_ptr, offs, mask, cols, col_ok, eps, eps_c, n_weight,
                  PROB_TARGET: tl.constexpr):
    """k_c of one chunk: w_c q'_c with q' = (1-eps) q + eps/C (probability targets), or w_c
    (index targets, the smoothing term); 0 outside the row.  eps carries the acc dtype."""
    ACC = eps.dtype
    w = tl.load(weight_ptr + cols, mask=cols < n_weight, other=1.0).to(ACC)
    w = tl.where(col_ok, w, 0.0)
    if PROB_TARGET:
        q = tl.load(target_ptr + offs, mask=mask, other=0.0).to(ACC)
        q = q * (1.0 - eps) + eps_c          # q itself when eps = 0
        k = w[None, :] * q
    else:
        k = tl.broadcast_to(w[None, :], offs.shape)
    return k


@triton.jit
def _add_sums(cw, cwx, target_ptr, weight_ptr, offs, mask, cols, col_ok, x, ms, ms_new, eps,
              eps_c, n_weight, PROB_TARGET: tl.constexpr):
    """The running cw, cwx of pass 1 after one more chunk (see the kernel's step 2)."""
    k = _coefficients(target_ptr, weight_ptr, offs, mask, cols, col_ok, eps, eps_c, n_weight,
                      PROB_TARGET)
    kx = tl.where(k == 0, 0.0, k * (x - ms_new[:, None]))  # 0 * (-inf) := 0
    cwx = cwx + cw * (ms - ms_new) + tl.sum(kx, axis=1)
    cw = cw + tl.sum(k, axis=1)
    return cw, cwx


@triton.jit
def _record_bad_target(record_ptr, bad, y, rows, n_cls):
    """Record the first bad target in {set, value, row, classes, scratch}: a compare-and-swap
    on `set` elects one reporter; rows that are not bad aim theirs at the scratch slot, so
    they can never win."""
    slot = tl.where(bad, 0, 4)
    old = tl.atomic_cas(record_ptr + slot, tl.zeros_like(y), tl.full(y.shape, 1, tl.int64))
    won = bad & (old == 0)
    same = slot * 0
    tl.store(record_ptr + 1 + same, y, mask=won)
    tl.store(record_ptr + 2 + same, rows, mask=won)
    tl.store(record_ptr + 3 + same, tl.full(y.shape, 0, tl.int64) + n_cls, mask=won)


# ---------------------------------------------------------------------------------------
# Bad-target records (deferred checks)
# ---------------------------------------------------------------------------------------

# Per device: {set, value, row, classes, scratch} (int64), allocated on the first launch.
_records: dict[torch.device, torch.Tensor] = {}


def _record_for(device: torch.device) -> torch.Tensor:
    rec = _records.get(device)
    if rec is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "tempsoft: the first Triton cross-entropy call on a device allocates its "
                "bad-target record; make one call on this device before CUDA graph capture")
        rec = torch.zeros(5, dtype=torch.int64, device=device)
        _records[device] = rec
    return rec


def raise_recorded_errors() -> None:
    """Raise the IndexError for the first bad target a launch recorded, and clear it.

    Reads each device's record, so it waits for the kernels queued so far (a host sync).
    """
    for device, rec in list(_records.items()):
        seen, value, row, classes = rec[:4].tolist()
        if seen:
            rec.zero_()
            raise IndexError(
                f"Target {value} is out of bounds: expected 0 <= target < {classes} (the "
                f"number of classes) or target == ignore_index (found by the Triton "
                f"cross-entropy kernel on {device} in row {row}; that row's loss is NaN)")


# ---------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------

def ce_rows(
    x: torch.Tensor,
    target: torch.Tensor,
    inv_t: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    grad_scale: torch.Tensor,
    grad_mode: int,
    grad_out: torch.Tensor | None = None,
    *,
    config: CEConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused row cross-entropy at temperature 1/inv_t, in Triton (see reference.py).

    Args:
        x: logits, contiguous, fp32 / fp16 / bf16 / fp64.
        target: int64 class indices, or class probabilities in x.dtype (contiguous).
        inv_t: reciprocal temperature per row, or one for all rows; must be > 0.
        weight: class weights, or None.
        ignore_index: index-target value whose rows get loss 0 and no gradient.
        label_smoothing: eps in [0, 1].
        grad_scale: factor on the written gradient per row, or one for all rows.
        grad_mode: GRAD_NONE (forward only), GRAD_FULL (zdot and the gradient) or
            GRAD_ZDOT (zdot only, no (M, C) buffer).
        grad_out: where to write the gradient (may be x itself), or None to allocate it.
        config: launch parameters; None uses ``ce_config`` (tests force small blocks).

    Shape:
        x: (M, C); target: (M,) or (M, C); inv_t, grad_scale: (M,) or (1,); weight: (C,).
        Returns loss (M,), lse (M,), grad (M, C) or (0,), zdot (M,) or (0,); loss, lse and
        zdot in the accumulation dtype (fp64 for fp64 x, else fp32), grad in x.dtype.

    Example:
        >>> x = torch.randn(4, 10, device="cuda")
        >>> y = torch.randint(0, 10, (4,), device="cuda")
        >>> one = torch.ones(1, device="cuda")
        >>> loss, lse, grad, zdot = ce_rows(x, y, 2 * one, None, -100, 0.0, one / 4, GRAD_FULL)
        >>> # loss.mean() == F.cross_entropy(2 * x, y); grad == its gradient w.r.t. x
    """
    grad_mode = _check(x, target, inv_t, weight, grad_scale, grad_mode, grad_out)
    acc = acc_dtype(x.dtype)
    n_rows, n_cls = x.shape
    loss = torch.empty(n_rows, dtype=acc, device=x.device)
    lse = torch.empty(n_rows, dtype=acc, device=x.device)
    empty_grad = x.new_empty(0)
    grad, zdot = empty_grad, x.new_empty(0, dtype=acc)
    if grad_mode != GRAD_NONE:
        zdot = torch.empty(n_rows, dtype=acc, device=x.device)
    if grad_mode == GRAD_FULL:
        grad = torch.empty_like(x) if grad_out is None else grad_out
    if n_rows > 0:
        _launch(x, target, inv_t.to(acc).contiguous(),
                None if weight is None else weight.to(acc).contiguous(),
                grad_scale.to(acc).contiguous(), ignore_index, float(label_smoothing),
                grad_mode, loss, lse, grad, zdot, config or ce_config(n_rows, n_cls, x.dtype))
    if grad_mode == GRAD_FULL and grad_out is not None:
        grad = empty_grad
    return loss, lse, grad, zdot


def _launch(x, target, inv_t, weight, grad_scale, ignore_index, eps, grad_mode,
            loss, lse, grad, zdot, cfg: CEConfig) -> None:
    n_rows, n_cls = x.shape
    eps_hi = struct.unpack("f", struct.pack("f", eps))[0]   # eps rounded to fp32
    eps_lo = eps - eps_hi
    grid = (triton.cdiv(n_rows, cfg.block_m),)
    # Unused pointer arguments still need a tensor of the right dtype; they are never
    # dereferenced.
    args = (
        x, target, inv_t, inv_t if weight is None else weight, grad_scale,
        loss, lse, grad if grad_mode == GRAD_FULL else x, zdot if grad_mode else loss,
        _record_for(x.device),
        n_rows, n_cls, 0 if weight is None else n_cls, int(inv_t.numel() > 1),
        int(grad_scale.numel() > 1), ignore_index, eps_hi, eps_lo, int(grad_mode),
    )
    with on_device(x):
        _ce_rows_kernel[grid](*args, PROB_TARGET=target.is_floating_point(),
                              BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v,
                              num_warps=cfg.num_warps)


def _check(x, target, inv_t, weight, grad_scale, grad_mode, grad_out) -> int:
    """Cheap shape / dtype checks (no host sync); values are the caller's to validate.
    Returns grad_mode as an int."""
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"triton ce_rows: logits must be fp32/fp16/bf16/fp64, got {x.dtype}")
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"triton ce_rows: logits must be a contiguous (M, C) tensor, "
                         f"got shape {tuple(x.shape)} with strides {x.stride()}")
    grad_mode = int(grad_mode)
    if grad_mode not in reference.GRAD_MODES:
        raise ValueError(
            f"triton ce_rows: grad_mode must be one of {reference.GRAD_MODES}, got {grad_mode}")
    n_rows, n_cls = x.shape
    if n_cls == 0:
        raise ValueError(
            f"triton ce_rows: logits need at least one class, got shape {tuple(x.shape)}")
    if target.is_floating_point():
        if target.shape != x.shape or target.dtype != x.dtype or not target.is_contiguous():
            raise ValueError(
                f"triton ce_rows: probability targets must be contiguous {tuple(x.shape)} "
                f"{x.dtype}, got {tuple(target.shape)} {target.dtype}")
    elif target.dtype != torch.int64 or target.shape != (n_rows,):
        raise ValueError(f"triton ce_rows: index targets must be int64 of shape ({n_rows},), "
                         f"got {target.dtype} of shape {tuple(target.shape)}")
    for name, t in (("inv_t", inv_t), ("grad_scale", grad_scale)):
        if t.dim() != 1 or t.numel() not in (1, n_rows):
            raise ValueError(f"triton ce_rows: {name} must have shape ({n_rows},) or (1,), "
                             f"got {tuple(t.shape)}")
    if weight is not None and weight.shape != (n_cls,):
        raise ValueError(
            f"triton ce_rows: weight must have shape ({n_cls},), got {tuple(weight.shape)}")
    if grad_out is not None and (grad_out.shape != x.shape or grad_out.dtype != x.dtype
                                 or not grad_out.is_contiguous()):
        raise ValueError(
            f"triton ce_rows: grad_out must be a contiguous {tuple(x.shape)} {x.dtype} tensor, "
            f"got {tuple(grad_out.shape)} {grad_out.dtype}")
    for name, t in (("target", target), ("inv_t", inv_t), ("grad_scale", grad_scale),
                    ("weight", weight), ("grad_out", grad_out)):
        if t is not None and t.device != x.device:
            raise ValueError(f"triton ce_rows: {name} is on {t.device}, logits on {x.device}")
    return grad_mode
