"""Pure-PyTorch reference kernels: the ground truth every backend is tested against.

Row contract of the fused cross-entropy (all backends implement exactly this):

    ce_rows(x, target, inv_t, weight, ignore_index, label_smoothing, grad_scale,
            grad_mode, grad_out)
        x           (M, C) contiguous logits, fp32 / fp64 / fp16 / bf16
        target      (M,) int64 class indices, or (M, C) contiguous class probabilities in
                    the dtype of x
        inv_t       (M,) or (1,) reciprocal temperature per row, acc dtype (see below)
        weight      (C,) class weights in the acc dtype, or None (all ones)
        grad_scale  (M,) or (1,) acc dtype: the gradient written is grad_scale * dloss/dx
                    (the reduction's 1/denominator, times grad_output when the gradient is
                    written in the backward pass)
        grad_mode   GRAD_NONE (0): loss and lse only
                    GRAD_FULL (1): also zdot and the gradient
                    GRAD_ZDOT (2): also zdot, without computing or storing the gradient
                    (0 and 1 are the False and True of the boolean this argument replaced)
        grad_out    None, or an (M, C) tensor of x.dtype to write the gradient into;
                    it may be x itself (the in-place backward)
      returns (loss, lse, grad, zdot):
        loss  (M,) acc dtype   per-row loss, 0 for rows whose target is ignore_index
        lse   (M,) acc dtype   logsumexp of z = x * inv_t
        grad  (M, C) x.dtype   grad_scale * d loss_i / d x_i, computed in the acc dtype and
                               rounded once; empty unless grad_mode is GRAD_FULL, and when it
                               was written into grad_out
        zdot  (M,) acc dtype   sum_c (d loss_i / d z_ic) * z_ic, unscaled, for dL/dT;
                               empty when grad_mode is GRAD_NONE

    An index target outside [0, C) that is not ignore_index reaches a kernel only when its
    caller deferred the range check (TEMPSOFT_DEFERRED_CHECKS=1 on a GPU backend). Such a
    target is never used as an index: its row gets loss NaN, a zero gradient and zdot 0, and
    the GPU kernels record the first one for ``tempsoft.check_errors()``. (The C++ CPU kernel
    never defers: it raises IndexError before reading any row.)

    With z = x * inv_t, p = softmax(z), eps = label_smoothing, w = weight, W = sum_c w_c:
      index target y:  loss = (1-eps) w_y (lse - z_y) + eps/C * sum_c w_c (lse - z_c)
                       (the second term is skipped when eps == 0, so that a -inf logit of
                       another class gives a finite loss, as in PyTorch)
                       dloss/dz_c = p_c A - (1-eps) w_y [c == y] - eps/C w_c,
                       A = (1-eps) w_y + eps/C W
      prob target q:   q' = (1-eps) q + eps/C,  S = sum_c w_c q'_c
                       loss = sum_c w_c q'_c (lse - z_c),  dloss/dz_c = p_c S - w_c q'_c
      dloss/dx = inv_t * dloss/dz.  Since sum_c dloss/dz_c = 0, zdot may use the shifted
      logits d_c = (x_c - max x) * inv_t in place of z_c; kernels do, for accuracy.

The accumulation dtype is fp64 for fp64 inputs and fp32 otherwise.
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: fp64 for fp64 inputs, fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# grad_mode values of ce_rows (see the contract above).
GRAD_NONE, GRAD_FULL, GRAD_ZDOT = 0, 1, 2
GRAD_MODES = (GRAD_NONE, GRAD_FULL, GRAD_ZDOT)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for the fused row kernel; see the module docstring for the contract."""
    grad_mode = int(grad_mode)
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {grad_mode}")
    acc = acc_dtype(x.dtype)
    m_rows, n_cls = x.shape
    xf = x.to(acc)
    it = inv_t.to(acc).reshape(-1, 1)
    w = torch.ones(n_cls, dtype=acc, device=x.device) if weight is None else weight.to(acc)
    eps = float(label_smoothing)

    # Shift by the row max before scaling: (x - max x) * inv_t loses nothing to the scale.
    x_max = xf.amax(dim=1, keepdim=True)
    x_max = torch.where(torch.isfinite(x_max), x_max, torch.zeros_like(x_max))
    d = (xf - x_max) * it                                # z - max z
    log_s = torch.logsumexp(d, dim=1, keepdim=True)      # lse - max z
    lse = (log_s + x_max * it).squeeze(1)
    nlp = log_s - d                                      # -log p = lse - z

    if target.is_floating_point():
        q = target.to(acc) * (1.0 - eps) + eps / n_cls
        wq = w * q
        loss = (wq * nlp).sum(dim=1)
        dz_coef = wq.sum(dim=1, keepdim=True)           # S
        dz_minus = wq
    else:
        counted = target != ignore_index
        bad = counted & ((target < 0) | (target >= n_cls))   # only with deferred checks
        valid = counted & ~bad
        y = torch.where(valid, target, torch.zeros_like(target)).long()
        w_y = w[y] * valid.to(acc)
        nll = nlp.gather(1, y.unsqueeze(1)).squeeze(1)
        loss = (1.0 - eps) * w_y * nll
        if eps > 0:
            # Only with smoothing: a -inf logit elsewhere in the row makes it inf, as in PyTorch.
            loss = loss + (eps / n_cls) * (w * nlp).sum(dim=1)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        loss = torch.where(bad, torch.full_like(loss, float("nan")), loss)
        dz_coef = ((1.0 - eps) * w_y + (eps / n_cls) * w.sum()).unsqueeze(1)   # A
        onehot = torch.zeros_like(xf).scatter_(1, y.unsqueeze(1), 1.0)
        dz_minus = (1.0 - eps) * w_y.unsqueeze(1) * onehot + (eps / n_cls) * w
        dz_minus = dz_minus * valid.to(acc).unsqueeze(1)
        dz_coef = dz_coef * valid.to(acc).unsqueeze(1)

    if grad_mode == GRAD_NONE:
        empty = x.new_empty(0, dtype=acc)
        return loss, lse, x.new_empty(0), empty

    p = torch.exp(-nlp)
    dz = p * dz_coef - dz_minus
    if not target.is_floating_point():
        # A bad target's row has no gradient, whatever its logits hold.
        dz = torch.where(bad.unsqueeze(1), torch.zeros_like(dz), dz)
    # Classes with p = 0 and d = -inf would give 0 * inf; their term belongs to the
    # smoothing part only, which multiplies a finite weight.
    zdot = torch.where(dz == 0, torch.zeros_like(dz), dz * d).sum(dim=1)
    if grad_mode == GRAD_ZDOT:
        return loss, lse, x.new_empty(0), zdot
    grad = (dz * (it * grad_scale.to(acc).reshape(-1, 1))).to(x.dtype)
    if grad_out is not None:
        grad_out.copy_(grad)
        grad = x.new_empty(0)
    return loss, lse, grad, zdot


# --------------------------------------------------------------------------------------
# PGD step
# --------------------------------------------------------------------------------------
#
# Contract of the fused step (every backend implements exactly this):
#
#     pgd_step(x_adv, grad, x_nat, eps, alpha, norm, lower, upper, active) -> new tensor
#         x_adv, grad, x_nat  (B, ...) same shape, same dtype (fp32 or fp64)
#         eps, alpha          (B,) in the dtype of x: the ball radius and step per sample
#         norm                0 = Linf, 2 = L2
#         lower, upper        Python floats, the box the images live in
#         active              (B,) bool or None; rows with False come back unchanged
#
# The arithmetic, in this order, each line rounded to the data dtype unless it says fp64:
#   Linf:
#     s = (g > 0) - (g < 0)                  sign; 0 for 0 and for NaN, so a NaN gradient
#                                            entry leaves that pixel where it is
#     a = x_adv + alpha * s                  alpha * s is exact, so an FMA changes nothing
#     d = min(max(a - x_nat, -eps), eps)
#   L2 (both sums in fp64; squares of fp32 values are exact in fp64):
#     G = sum g^2 (fp64);  s = dtype(fp64(alpha) / sqrt(G))
#     ok = 0 < G < inf and s is finite
#     scale = ok ? s : 0                     a zero, non-finite or too small gradient: no step
#     a = x_adv + (ok ? g * scale : 0)       the product rounded before the add (no FMA)
#     d = a - x_nat
#     D = sum d^2 (fp64);  n = sqrt(D)
#     f = n > eps ? fp32(fp64(eps) / n) : 1
#     d = d * f                              rounded before the add below (no FMA)
#   both:
#     out = min(max(x_nat + d, lower), upper)
#     out = active ? out : x_adv
#
# "Too small": a gradient of denormals (a saturated softmax) can have alpha / ||g|| beyond the
# largest finite value of the dtype; stepping by it would give inf * 0 = NaN. Such a gradient
# carries no usable direction, so the sample does not move, exactly as for a zero gradient.
# (AutoAttack and torchattacks divide by ||g|| + 1e-12 / 1e-10 instead, which moves such a
# sample by a vanishing amount: the same outcome without a magic constant.) Every finite
# input gives a finite output for a finite alpha.
#
# Kernels must not contract a product and an add into an FMA (C++: a compiler barrier;
# Triton: enable_fp_fusion=False; CUDA: __fmul_rn / __fadd_rn). The two L2 sums may be
# accumulated in any order: they are fp64 sums of exact squares, so the fp32 value rounded
# from them differs between orders only when the fp64 sum lies within ~n * 2^-53 (relative)
# of an fp32 rounding boundary, about once in 2^29 / n samples. For fp64 data the sums
# are the result's own precision, so backends agree to a few ulps there, not bit for bit.


def pgd_step(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_nat: torch.Tensor,
    eps: torch.Tensor,
    alpha: torch.Tensor,
    norm: int,
    lower: float,
    upper: float,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for the fused PGD step; see the comment block above for the contract."""
    dtype = x_adv.dtype
    bshape = (x_adv.shape[0],) + (1,) * (x_adv.dim() - 1)
    e = eps.to(dtype).reshape(bshape)
    if norm == 0:
        s = (grad > 0).to(dtype) - (grad < 0).to(dtype)
        a = x_adv + alpha.to(dtype).reshape(bshape) * s
        d = torch.minimum(torch.maximum(a - x_nat, -e), e)
    elif norm == 2:
        g_sq = _row_sum_sq(grad)
        scale = (alpha.to(torch.float64) / g_sq.sqrt()).to(dtype)
        ok = (g_sq > 0) & (g_sq < float("inf")) & torch.isfinite(scale)
        scale = torch.where(ok, scale, torch.zeros_like(scale))
        step = grad * scale.reshape(bshape)
        step = torch.where(ok.reshape(bshape), step, torch.zeros_like(step))
        d = (x_adv + step) - x_nat
        n = _row_sum_sq(d).sqrt()
        eps64 = eps.to(torch.float64)
        f = torch.where(n > eps64, eps64 / n, torch.ones_like(n))
        d = d * f.to(dtype).reshape(bshape)
    else:
        raise ValueError(f"norm must be 0 (Linf) or 2 (L2), got {norm!r}")
    out = torch.clamp(x_nat + d, min=lower, max=upper)
    if active is not None:
        out = torch.where(active.reshape(bshape), out, x_adv)
    return out


def _row_sum_sq(t: torch.Tensor) -> torch.Tensor:
    """Per-sample sum of squares in fp64, shape (B,)."""
    t64 = t.reshape(t.shape[0], -1).to(torch.float64)
    return (t64 * t64).sum(dim=1)
