"""Softmax cross-entropy at temperature T, forward and backward fused in one kernel call.

Layers, bottom up: the backends' row kernels (``ce_rows``, contract in
``tempsoft/kernels/reference.py``) -> the ``tempsoft::cross_entropy`` custom op (range checks,
reduction, one kernel call) with its autograd formula -> :func:`cross_entropy` (argument
checks, layout, temperature handling).

The kernel writes the gradient of the *reduced* loss during the forward pass (the reduction's
1/denominator is folded into it), so the backward pass is a no-op when grad_output is 1 and a
single scaling otherwise.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from tempsoft import _dispatch
from tempsoft.kernels import reference
from tempsoft.kernels.reference import acc_dtype

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)


# --------------------------------------------------------------------------------------
# Backend kernels
# --------------------------------------------------------------------------------------
def _row_kernel(backend: str):
    if backend == "torch":
        return reference.ce_rows
    if backend == "triton":
        from tempsoft.kernels import triton_ce

        return triton_ce.ce_rows
    return _dispatch.native_ops().ce_rows


def _check_targets(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """IndexError naming the first target outside [0, C) that is not ignore_index."""
    bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
    if bool(bad.any()):
        value = int(target[bad][0])
        raise IndexError(
            f"Target {value} is out of bounds: expected 0 <= target < {n_classes} "
            f"(the number of classes) or target == ignore_index ({ignore_index})"
        )


def _check_inv_t(inv_t: Tensor) -> None:
    """ValueError naming the first temperature that is not positive and finite."""
    if inv_t.numel() == 1 and inv_t.device.type == "cpu":  # the common case, without kernels
        bad_values = [] if 0 < float(inv_t) < math.inf else [float(inv_t)]
    else:
        bad = ~(torch.isfinite(inv_t) & (inv_t > 0))
        bad_values = [float(inv_t[bad][0])] if bool(bad.any()) else []
    if bad_values:
        value = 1.0 / bad_values[0] if bad_values[0] != 0 else math.inf
        raise ValueError(
            f"T must be positive and finite (and 1/T representable in float32), got T={value}"
        )


def _reduction_scale(
    target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: int, rows: int, acc
) -> tuple[Tensor, Tensor]:
    """(denominator, 1/denominator) of the reduction, as (1,) tensors on the target's device.

    Mean over index targets divides by the summed weight of the non-ignored rows (PyTorch's
    rule, also with label smoothing); over probability targets by the number of rows.
    """
    device = target.device
    if reduction != _REDUCTIONS["mean"]:
        one = torch.ones(1, dtype=acc, device=device)
        return one, one
    if target.is_floating_point():
        denom = torch.full((1,), float(rows), dtype=acc, device=device)
    else:
        valid = target != ignore_index
        if weight is None:
            denom = valid.sum().to(acc).reshape(1)
        else:
            safe = torch.where(valid, target, torch.zeros_like(target))
            denom = (weight[safe] * valid.to(acc)).sum().reshape(1)
    # All rows ignored: the loss is 0/0 = NaN and the gradient zero, as in PyTorch.
    scale = torch.where(denom != 0, 1.0 / denom, torch.zeros_like(denom))
    return denom, scale


def _forward(x, target, inv_t, weight, ignore_index, label_smoothing, reduction, compute_grad,
             backend, grad_out=None):
    """Checks, one kernel call, reduction. Returns (loss, lse, grad, zdot, scale)."""
    name = _dispatch.resolve(backend, x.device)
    acc = acc_dtype(x.dtype)
    rows, n_classes = x.shape
    # The CUDA kernel guards its own reads and records bad targets, so it alone may skip
    # the checks that cost a host sync (see _dispatch.deferred_checks).
    strict = not (name == "cuda" and _dispatch.deferred_checks())
    if strict:
        _check_inv_t(inv_t)
    if not target.is_floating_point():
        target = target.long()
        # The C++ CPU kernel raises the same IndexError itself, before reading any row.
        if strict and name != "cpu":
            _check_targets(target, n_classes, ignore_index)
    denom, scale = _reduction_scale(target, weight, ignore_index, reduction, rows, acc)
    loss_rows, lse, grad, zdot = _row_kernel(name)(
        x, target, inv_t, weight, ignore_index, label_smoothing, scale, compute_grad, grad_out
    )
    if reduction == _REDUCTIONS["none"]:
        loss = loss_rows
    elif reduction == _REDUCTIONS["sum"]:
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / denom[0]
    return loss, lse, grad, zdot, scale


# --------------------------------------------------------------------------------------
# The custom op and its autograd formula
# --------------------------------------------------------------------------------------
@torch.library.custom_op("tempsoft::cross_entropy", mutates_args=())
def _ce_op(
    x: Tensor,
    target: Tensor,
    inv_t: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward(x, target, inv_t, weight, ignore_index, label_smoothing, reduction,
                    compute_grad, backend)


@_ce_op.register_fake
def _(x, target, inv_t, weight, ignore_index, label_smoothing, reduction, compute_grad, backend):
    rows, n_classes = x.shape
    acc = acc_dtype(x.dtype)
    loss = x.new_empty((rows,) if reduction == _REDUCTIONS["none"] else (), dtype=acc)
    grad = x.new_empty((rows, n_classes) if compute_grad else (0,))
    zdot = x.new_empty((rows,) if compute_grad else (0,), dtype=acc)
    return loss, x.new_empty(rows, dtype=acc), grad, zdot, x.new_empty(1, dtype=acc)


def _setup_context(ctx, inputs, output):
    x, target, inv_t, weight, _, label_smoothing, reduction, _, _ = inputs
    _, lse, grad, zdot, scale = output
    # Only the loss is differentiable. Without these two lines autograd would allocate and
    # zero-fill an (N, C) "gradient" for the unused grad output on every backward.
    ctx.mark_non_differentiable(lse, grad, zdot, scale)
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.label_smoothing = label_smoothing
    ctx.save_for_backward(x, target, inv_t, weight, lse, grad, zdot, scale)


def _backward(ctx, g_loss, *unused):
    if g_loss is None:
        return (None,) * 9
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: the saved gradient is a constant here, so a second derivative
        # would silently miss terms. Refuse instead.
        raise RuntimeError(
            "tempsoft.cross_entropy does not support double backward (create_graph=True); "
            "use F.cross_entropy(input / T, ...) where second derivatives are needed"
        )
    x, target, inv_t, weight, lse, grad, zdot, scale = ctx.saved_tensors
    needs_x, needs_target, needs_inv_t = ctx.needs_input_grad[:3]
    none = ctx.reduction == _REDUCTIONS["none"]
    if none:
        g_rows = g_loss.to(scale.dtype)
    else:
        g_rows = g_loss.to(scale.dtype).reshape(1)
    dx = dtarget = dinv_t = None
    if needs_x:
        dx = _scale_saved_grad(grad, g_loss, none)
    if needs_inv_t:
        # dloss_i/d(1/T_i) = sum_c dloss_i/dz_c * x_c = zdot_i * T_i
        per_row = zdot * scale * g_rows / inv_t
        dinv_t = per_row if inv_t.numel() == per_row.numel() else per_row.sum().reshape(1)
        dinv_t = dinv_t.to(inv_t.dtype)
    if needs_target and target.is_floating_point():
        # dloss_i/dq_c = (1 - eps) w_c (lse_i - z_c)
        nlp = lse.unsqueeze(1) - x.to(lse.dtype) * inv_t.reshape(-1, 1)
        w = 1.0 if weight is None else weight.to(lse.dtype)
        coef = (1.0 - ctx.label_smoothing) * (scale * g_rows).reshape(-1, 1)
        dtarget = (coef * w * nlp).to(target.dtype)
    return dx, dtarget, dinv_t, None, None, None, None, None, None


def _scale_saved_grad(grad: Tensor, g_loss: Tensor, none: bool) -> Tensor:
    """grad_output * saved gradient; the saved gradient itself when grad_output is 1.

    The saved buffer is never modified, so retain_graph and gradcheck see the same gradient
    on every backward. Comparing a scalar grad_output with 1 is free on the CPU and one
    small device-to-host read on a GPU, which saves a full pass over the gradient (and a
    second gradient-sized buffer) in the usual `loss.backward()`.
    """
    if none:
        return grad * g_loss.to(grad.dtype).unsqueeze(1)
    if not torch.compiler.is_compiling() and float(g_loss) == 1.0:
        return grad
    return grad * g_loss.to(grad.dtype)


_ce_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerCrossEntropy(torch.autograd.Function):
    """The eager path: the same forward and autograd formula as the custom op, without the
    dispatcher round trip that a custom op costs per call (tens of microseconds, which is
    a visible share of a millisecond-sized kernel). torch.compile traces the custom op.

    With ``inplace``, the kernel writes the gradient over ``x`` itself.
    """

    @staticmethod
    def forward(ctx, x, target, inv_t, weight, ignore_index, label_smoothing, reduction,
                backend, inplace):
        loss, lse, grad, zdot, scale = _forward(
            x, target, inv_t, weight, ignore_index, label_smoothing, reduction, True, backend,
            grad_out=x if inplace else None,
        )
        if inplace:
            grad = x
        ctx.reduction = reduction
        ctx.label_smoothing = label_smoothing
        ctx.save_for_backward(x, target, inv_t, weight, lse, grad, zdot, scale)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        return _backward(ctx, g_loss)


# --------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------
def cross_entropy(
    input: Tensor,
    target: Tensor,
    T: float | Tensor = 1.0,
    *,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> Tensor:
    r"""Softmax cross-entropy of ``input / T``: ``F.cross_entropy(input / T, target, ...)``.

    Forward and backward run as one fused pass over the logits; the gradient with respect to
    ``T`` is exact, so a temperature can be learned (e.g. post-hoc calibration).

    Args:
        input: logits, shape (N, C), (N, C, d1, ...) or (C,); fp32, fp64, fp16 or bf16.
        target: class indices (int64, int32 or uint8) of shape (N,), (N, d1, ...) or (), or
            class probabilities of the same shape and dtype as ``input``.
        T: the temperature: a number, a 0-d tensor, or a tensor of shape (N,) with one
            temperature per sample (broadcast over classes and spatial dims). Must be > 0.
        weight: (C,) class weights, as in ``F.cross_entropy``.
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: "mean" | "sum" | "none".
        label_smoothing: in [0, 1], as in ``F.cross_entropy``.
        backend: "auto" | "cpu" | "cuda" | "triton" | "torch"; see :func:`tempsoft.backends`.
            ``TEMPSOFT_BACKEND`` overrides "auto".
        inplace_backward: write the gradient into ``input``'s own storage (eager mode only;
            ``input`` is overwritten, so use it only when the logits are not needed again).

    Returns:
        The loss: a scalar for "mean"/"sum", else the target's shape (N, d1, ...). Its dtype
        is the input's, or float32 for half inputs under autocast (like ``F.cross_entropy``).

    Example::

        >>> logits = torch.randn(8, 10, requires_grad=True)
        >>> labels = torch.randint(0, 10, (8,))
        >>> loss = tempsoft.cross_entropy(logits, labels, T=2.0)
        >>> loss.backward()
    """
    red = _check_reduction(reduction)
    x2d, t_rows, out_shape = _to_rows(input, target, ignore_index, label_smoothing)
    n_classes = x2d.shape[1]
    acc = acc_dtype(input.dtype)
    w = _check_weight(weight, input, n_classes, acc)
    inv_t = _inverse_temperature(T, input, x2d.shape[0], acc)

    compute_grad = torch.is_grad_enabled() and (
        input.requires_grad or inv_t.requires_grad or t_rows.requires_grad
    )
    args = (x2d, t_rows, inv_t, w, int(ignore_index), float(label_smoothing), red)
    if torch.compiler.is_compiling():
        loss = _ce_op(*args, compute_grad, backend)[0]
    elif compute_grad:
        if inplace_backward and t_rows.requires_grad:
            raise ValueError("inplace_backward=True overwrites the logits, which the gradient "
                             "for class-probability targets needs; use inplace_backward=False")
        loss = _EagerCrossEntropy.apply(*args, backend, bool(inplace_backward))
    else:
        loss = _forward(*args, False, backend)[0]
    if red == _REDUCTIONS["none"]:
        loss = loss.reshape(out_shape)
    return loss.to(_result_dtype(input))


def _check_reduction(reduction: str) -> int:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    return _REDUCTIONS[reduction]


def _to_rows(input: Tensor, target: Tensor, ignore_index, label_smoothing):
    """Lay the logits out as (rows, C) with classes contiguous; also the target's rows.

    (N, C, d...) becomes (N * prod(d), C) through movedim, which is free for channels-last
    inputs and one copy otherwise. Returns (x2d, target_rows, shape of the unreduced loss).
    """
    if not isinstance(input, Tensor) or not isinstance(target, Tensor):
        raise TypeError(
            f"input and target must be tensors, got {type(input).__name__} and "
            f"{type(target).__name__}"
        )
    if not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got dtype {input.dtype}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension (the classes), got a 0-d tensor")
    if target.device != input.device:
        raise RuntimeError(
            f"Expected all tensors to be on the same device, got input on {input.device} and "
            f"target on {target.device}"
        )
    prob = target.is_floating_point()
    class_dim = 0 if input.dim() == 1 else 1
    n_classes = input.shape[class_dim]

    if prob:
        if target.shape != input.shape:
            raise RuntimeError(
                f"Expected target of the same shape as input for class probabilities, got "
                f"input {tuple(input.shape)} and target {tuple(target.shape)}"
            )
        if target.dtype != input.dtype:
            target = target.to(input.dtype)
    else:
        if target.dtype not in _INDEX_DTYPES:
            raise RuntimeError(
                f"expected target dtype to be Long, Int or Byte for class indices, "
                f"got {target.dtype}"
            )
        expected = input.shape[:class_dim] + input.shape[class_dim + 1:]
        if input.dim() == 2 and target.dim() == 1 and target.shape[0] != input.shape[0]:
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                f"({target.shape[0]})."
            )
        if target.shape != expected:
            raise RuntimeError(
                f"Expected target size {list(expected)}, got {list(target.shape)}"
            )

    if input.dim() == 1:
        x2d = input.unsqueeze(0)
        t_rows = target.unsqueeze(0) if prob else target.reshape(1)
        out_shape = ()
    else:
        x2d = input.movedim(1, -1).reshape(-1, n_classes)
        t_rows = target.movedim(1, -1).reshape(-1, n_classes) if prob else target.reshape(-1)
        out_shape = expected if not prob else input.shape[:1] + input.shape[2:]
    return x2d.contiguous(), t_rows.contiguous(), tuple(out_shape)


def _check_weight(weight: Optional[Tensor], input: Tensor, n_classes: int, acc):
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or weight.shape != (n_classes,):
        shape = list(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise RuntimeError(
            f"weight tensor should be defined either for all {n_classes} classes or no "
            f"classes but got weight tensor of shape: {shape}"
        )
    if weight.dtype != input.dtype:
        raise RuntimeError(
            f"expected scalar type {input.dtype} for weight but found {weight.dtype}"
        )
    return weight.detach().to(device=input.device, dtype=acc).contiguous()


def _inverse_temperature(T, input: Tensor, rows: int, acc) -> Tensor:
    """1/T per row ((1,) or (rows,)), differentiable when T is a tensor that requires grad."""
    if isinstance(T, Tensor):
        if not T.is_floating_point():
            raise TypeError(f"T must be a floating-point tensor, got dtype {T.dtype}")
        batch = input.shape[0] if input.dim() > 1 else 1
        if T.dim() == 0 or T.shape == (1,):
            inv_t = (1.0 / T.to(device=input.device, dtype=acc)).reshape(1)
        elif T.dim() == 1 and T.shape[0] == batch and input.dim() > 1:
            if T.device != input.device:
                raise RuntimeError(
                    f"Expected T on {input.device} like input, got T on {T.device}"
                )
            inv_t = 1.0 / T.to(acc)
            per_sample = rows // batch if batch else 0
            if per_sample != 1:
                inv_t = inv_t.repeat_interleave(per_sample)
        else:
            raise ValueError(
                f"T must be a number, a 0-d tensor or a tensor of shape ({batch},) (one "
                f"temperature per sample), got shape {tuple(T.shape)}"
            )
        return inv_t.contiguous()
    if isinstance(T, bool) or not isinstance(T, numbers.Real):
        raise TypeError(f"T must be a number or a tensor, got {type(T).__name__}")
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"T must be positive and finite, got T={T}")
    return torch.full((1,), 1.0 / float(T), dtype=acc, device=input.device)


def _result_dtype(input: Tensor) -> torch.dtype:
    """F.cross_entropy's result dtype: the input's, or float32 under autocast for half inputs."""
    if input.dtype in (torch.float16, torch.bfloat16) and _autocast_enabled(input.device.type):
        return torch.float32
    return input.dtype


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 has no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


# --------------------------------------------------------------------------------------
# softmax / log_softmax at temperature T
# --------------------------------------------------------------------------------------
def _scaled(x: Tensor, T, dim: int) -> Tensor:
    """x / T in fp32 or better, with a per-sample T broadcast along dim 0."""
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    if isinstance(T, Tensor):
        if T.dim() == 1 and x.dim() > 1:
            if T.shape[0] != x.shape[0]:
                raise ValueError(
                    f"a per-sample T must have shape ({x.shape[0]},), got {tuple(T.shape)}"
                )
            T = T.reshape((-1,) + (1,) * (x.dim() - 1))
        elif T.dim() != 0:
            raise ValueError(f"T must be a number, a 0-d tensor or (N,), got {tuple(T.shape)}")
        return xf / T.to(acc)
    if isinstance(T, bool) or not isinstance(T, numbers.Real) or not (math.isfinite(T) and T > 0):
        raise ValueError(f"T must be a positive finite number or a tensor, got T={T!r}")
    return xf / float(T)


def softmax(x: Tensor, T: float | Tensor = 1.0, dim: int = -1) -> Tensor:
    """softmax(x / T) along ``dim``, computed in fp32 (fp64 for fp64), returned in x's dtype."""
    return torch.softmax(_scaled(x, T, dim), dim=dim).to(x.dtype)


def log_softmax(x: Tensor, T: float | Tensor = 1.0, dim: int = -1) -> Tensor:
    """log_softmax(x / T) along ``dim``, computed in fp32 (fp64 for fp64), in x's dtype."""
    return torch.log_softmax(_scaled(x, T, dim), dim=dim).to(x.dtype)
