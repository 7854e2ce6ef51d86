"""Pure-PyTorch reference kernels: the ground truth every backend is tested against.

Row contract of the fused cross-entropy (all backends implement exactly this):

    ce_rows(x, target, inv_t, weight, ignore_index, label_smoothing, grad_scale,
            compute_grad, grad_out)
        x           (M, C) contiguous logits, fp32 / fp64 / fp16 / bf16
        target      (M,) int64 class indices (already range-checked by the caller), or
                    (M, C) contiguous class probabilities in the dtype of x
        inv_t       (M,) or (1,) reciprocal temperature per row, acc dtype (see below)
        weight      (C,) class weights in the acc dtype, or None (all ones)
        grad_scale  (M,) or (1,) acc dtype: the gradient written is grad_scale * dloss/dx
                    (the reduction's 1/denominator, so backward has nothing left to do)
        grad_out    None, or an (M, C) tensor of x.dtype to write the gradient into;
                    it may be x itself (the in-place backward)
      returns (loss, lse, grad, zdot):
        loss  (M,) acc dtype   per-row loss, 0 for rows whose target is ignore_index
        lse   (M,) acc dtype   logsumexp of z = x * inv_t
        grad  (M, C) x.dtype   grad_scale * d loss_i / d x_i; empty when compute_grad is
                               False or when it was written into grad_out
        zdot  (M,) acc dtype   sum_c (d loss_i / d z_ic) * z_ic, unscaled, for dL/dT;
                               empty when compute_grad is False

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


def ce_rows(
    x: torch.Tensor,
    target: torch.Tensor,
    inv_t: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    grad_scale: torch.Tensor,
    compute_grad: bool,
    grad_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for the fused row kernel; see the module docstring for the contract."""
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
        valid = target != ignore_index
        y = torch.where(valid, target, torch.zeros_like(target)).long()
        w_y = w[y] * valid.to(acc)
        nll = nlp.gather(1, y.unsqueeze(1)).squeeze(1)
        loss = (1.0 - eps) * w_y * nll
        if eps > 0:
            # Only with smoothing: a -inf logit elsewhere in the row makes it inf, as in PyTorch.
            loss = loss + (eps / n_cls) * (w * nlp).sum(dim=1)
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        dz_coef = ((1.0 - eps) * w_y + (eps / n_cls) * w.sum()).unsqueeze(1)   # A
        onehot = torch.zeros_like(xf).scatter_(1, y.unsqueeze(1), 1.0)
        dz_minus = (1.0 - eps) * w_y.unsqueeze(1) * onehot + (eps / n_cls) * w
        dz_minus = dz_minus * valid.to(acc).unsqueeze(1)
        dz_coef = dz_coef * valid.to(acc).unsqueeze(1)

    if not compute_grad:
        empty = x.new_empty(0, dtype=acc)
        return loss, lse, x.new_empty(0), empty

    p = torch.exp(-nlp)
    dz = p * dz_coef - dz_minus
    # Classes with p = 0 and d = -inf would give 0 * inf; their term belongs to the
    # smoothing part only, which multiplies a finite weight.
    zdot = torch.where(dz == 0, torch.zeros_like(dz), dz * d).sum(dim=1)
    grad = (dz * (it * grad_scale.to(acc).reshape(-1, 1))).to(x.dtype)
    if grad_out is not None:
        grad_out.copy_(grad)
        grad = x.new_empty(0)
    return loss, lse, grad, zdot

