"""Softmax cross-entropy at temperature T, forward and backward fused in one kernel call.

Layers, bottom up: the backends' row kernels (``ce_rows``, contract in
``tempsoft/kernels/reference.py``) -> two custom ops, ``tempsoft::cross_entropy`` (range
checks, reduction, one kernel call) and ``tempsoft::cross_entropy_grad`` (the gradient
written in the backward pass), with their autograd formula -> :func:`cross_entropy`
(argument checks, layout, temperature handling).  On the C++ CPU backend the range check,
the reduction's scale, the kernel and the reduction are one call (``ce_forward``, straight
to the kernel's module): around a memory-bound kernel of a millisecond, the dozen small
tensor ops they took in Python cost a tenth of the time.  In eager mode the common CPU case
(:func:`_cpu_common_case`) goes further: one C++ call also builds a C++ autograd node
(``ce_loss``, csrc/cpu/autograd.cpp) with this file's formula for that case, so neither
pass runs the Python below.

Where the gradient is written is decided in one place, :func:`_grad_in_forward`:

* In the forward pass (fused): the kernel writes ``dloss/dx`` with the reduction's
  1/denominator folded in while it reads the logits for the loss, so ``loss.backward()``
  (grad_output 1) has nothing left to do.  Any other grad_output -- a loss scale, a weight on
  this loss -- scales the saved fp32 / fp64 gradient; for fp16 / bf16 logits the kernel
  writes the gradient again with grad_output folded into its fp32 scale, so that every
  half-precision gradient is rounded once from its fp32 value (scaling the stored half
  gradient would lose the small entries' bits and overflow fp16 at a loss scale of 2^16).
  Seeing whether grad_output is 1 reads it on the host: free on the CPU, one device sync on
  a GPU.
* In the backward pass (deferred): the forward computes the loss only, and the backward
  runs the kernel once with ``grad_scale = grad_output / denominator``.  No host read at
  all; the logits are read three times instead of once.  Used with
  ``TEMPSOFT_DEFERRED_CHECKS=1`` on the GPU backends (sync-free, CUDA-graph capturable),
  under torch.compile, and for half-precision logits with ``inplace_backward`` (the
  recompute above needs the logits, which the in-place write destroys).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from tempsoft import _dispatch
from tempsoft.kernels import reference
from tempsoft.kernels.reference import GRAD_FULL, GRAD_NONE, GRAD_ZDOT, acc_dtype

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
_INDEX_DTYPES = (torch.int64, torch.int32, torch.uint8)
_HALF = (torch.float16, torch.bfloat16)
_ACC_MAX = {dtype: torch.finfo(dtype).max for dtype in (torch.float32, torch.float64)}


# --------------------------------------------------------------------------------------
# Backend kernels and the decisions that depend on them
# --------------------------------------------------------------------------------------
def _row_kernel(backend: str):
    if backend == "torch":
        return reference.ce_rows
    if backend == "triton":
        from tempsoft.kernels import triton_ce

        return triton_ce.ce_rows
    return _dispatch.native_ops().ce_rows


def _grad_in_forward(deferred: bool, dtype: torch.dtype, inplace: bool) -> bool:
    """Whether the forward kernel call writes the gradient (see the module docstring)."""
    return not deferred and not (inplace and dtype in _HALF)


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
    target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: int, rows: int,
    n_classes: int, acc, unchecked: bool,
) -> tuple[Tensor, Tensor]:
    """(denominator, 1/denominator) of the reduction, as (1,) tensors on the target's device.

    Mean over index targets divides by the summed weight of the non-ignored rows (PyTorch's
    rule, also with label smoothing); over probability targets by the number of rows.
    A target is never used as an index before it is known to lie in [0, C): with weights, or
    when the range check was deferred (`unchecked`), out-of-range targets count as ignored
    here (their rows' losses are NaN, so the mean is NaN anyway).
    """
    device = target.device
    if reduction != _REDUCTIONS["mean"]:
        one = _constant(1.0, acc, device)
        return one, one
    if target.is_floating_point():
        denom = _constant(float(rows), acc, device)
    else:
        valid = target != ignore_index
        if weight is not None or unchecked:
            valid = valid & (target >= 0) & (target < n_classes)
        if weight is None and device.type == "cpu" and not unchecked:
            # A host read is free here (but not in the deferred mode, which promises none),
            # and then both come from the constant cache.
            count = float(valid.sum())
            return _constant(count, acc, device), _constant(1 / count if count else 0.0, acc,
                                                            device)
        if weight is None:
            denom = valid.sum(dtype=acc).reshape(1)
        else:
            safe = torch.where(valid, target, torch.zeros_like(target))
            denom = (weight[safe] * valid.to(acc)).sum().reshape(1)
    # All rows ignored: the loss is 0/0 = NaN and the gradient zero, as in PyTorch (1/0 is
    # inf, mapped to 0; a NaN denominator stays NaN).
    scale = denom.reciprocal().nan_to_num_(nan=math.nan, posinf=0.0, neginf=0.0)
    return denom, scale


def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A (1,) tensor holding `value`: the op's constant temperatures and scales, made once
    in eager mode (kernels and the backward only read them). torch.compile traces a fill,
    and so does a CUDA graph capture (a cached tensor made there would live in the graph's
    memory pool)."""
    if torch.compiler.is_compiling() or (
            device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return torch.full((1,), value, dtype=dtype, device=device)
    return _cached_constant(value, dtype, device)


@functools.lru_cache(maxsize=64)
def _cached_constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((1,), value, dtype=dtype, device=device)


def _forward(x, target, inv_t, weight, ignore_index, label_smoothing, reduction, grad_mode,
             t_checked, name, grad_out=None):
    """Checks, one kernel call, reduction. Returns (loss, lse, grad, zdot, scale).

    name: the backend, resolved. t_checked: T was a Python number, validated (for free) by
    the caller.
    """
    # A GPU kernel guards its own reads and records bad targets, so with deferred checks it
    # skips the checks that cost a host sync (see _dispatch.defers_checks).
    deferred = _dispatch.defers_checks(name)
    if not t_checked and not deferred:
        _check_inv_t(inv_t)
    if not target.is_floating_point():
        target = target.long()
    if name == "cpu":
        # One C++ call: the target check, the reduction's scale, the kernel and the reduction
        # (the same rules as below, without a dozen small tensor ops around the kernel).
        return _dispatch.cpu_module().ce_forward(
            x, target, inv_t, weight, ignore_index, label_smoothing, reduction, grad_mode,
            grad_out)
    rows, n_classes = x.shape
    if not target.is_floating_point() and not deferred:
        _check_targets(target, n_classes, ignore_index)
    denom, scale = _reduction_scale(target, weight, ignore_index, reduction, rows, n_classes,
                                    acc_dtype(x.dtype), deferred)
    loss_rows, lse, grad, zdot = _row_kernel(name)(
        x, target, inv_t, weight, ignore_index, label_smoothing, scale, grad_mode, grad_out
    )
    if reduction == _REDUCTIONS["none"]:
        loss = loss_rows
    elif reduction == _REDUCTIONS["sum"]:
        loss = loss_rows.sum()
    else:
        loss = loss_rows.sum() / denom[0]
    return loss, lse, grad, zdot, scale


def _gradient(x, target, inv_t, weight, ignore_index, label_smoothing, row_scale, grad_mode,
              name, grad_out=None):
    """(grad, zdot) from one kernel call with grad_scale = row_scale (the backward pass)."""
    if not target.is_floating_point():
        target = target.long()
    _, _, grad, zdot = _row_kernel(name)(
        x, target, inv_t, weight, ignore_index, label_smoothing, row_scale, grad_mode, grad_out
    )
    return grad, zdot


# --------------------------------------------------------------------------------------
# The custom ops (what torch.compile traces) and their autograd formula
# --------------------------------------------------------------------------------------
# Explicit schemas (the types live there): torch < 2.5 cannot infer a schema from string
# annotations.
@torch.library.custom_op(
    "tempsoft::cross_entropy",
    mutates_args=(),
    schema="(Tensor x, Tensor target, Tensor inv_t, Tensor? weight, int ignore_index, "
    "float label_smoothing, int reduction, bool t_checked, str backend) "
    "-> (Tensor, Tensor, Tensor)",
)
def _ce_op(x, target, inv_t, weight, ignore_index, label_smoothing, reduction, t_checked,
           backend):
    """Forward only: (loss, lse, 1/denominator); the gradient comes from _ce_grad_op."""
    loss, lse, _, _, scale = _forward(x, target, inv_t, weight, ignore_index, label_smoothing,
                                      reduction, GRAD_NONE, t_checked,
                                      _dispatch.resolve(backend, x.device))
    return loss, lse, scale


@_ce_op.register_fake
def _(x, target, inv_t, weight, ignore_index, label_smoothing, reduction, t_checked, backend):
    rows = x.shape[0]
    acc = acc_dtype(x.dtype)
    loss = x.new_empty((rows,) if reduction == _REDUCTIONS["none"] else (), dtype=acc)
    return loss, x.new_empty(rows, dtype=acc), x.new_empty(1, dtype=acc)


@torch.library.custom_op(
    "tempsoft::cross_entropy_grad",
    mutates_args=(),
    schema="(Tensor x, Tensor target, Tensor inv_t, Tensor? weight, int ignore_index, "
    "float label_smoothing, Tensor row_scale, int grad_mode, str backend) -> (Tensor, Tensor)",
)
def _ce_grad_op(x, target, inv_t, weight, ignore_index, label_smoothing, row_scale, grad_mode,
                backend):
    """(grad, zdot) with grad_scale = row_scale: the gradient written in the backward pass."""
    name = _dispatch.resolve(backend, x.device)
    return _gradient(x, target, inv_t, weight, ignore_index, label_smoothing, row_scale,
                     grad_mode, name)


@_ce_grad_op.register_fake
def _(x, target, inv_t, weight, ignore_index, label_smoothing, row_scale, grad_mode, backend):
    rows = x.shape[0]
    grad = x.new_empty(x.shape if grad_mode == GRAD_FULL else (0,))
    zdot = x.new_empty((rows,) if grad_mode != GRAD_NONE else (0,), dtype=acc_dtype(x.dtype))
    return grad, zdot


def _setup_context(ctx, inputs, output):
    x, target, inv_t, weight, ignore_index, label_smoothing, reduction, _, backend = inputs
    _, lse, scale = output
    # Only the loss is differentiable. Without this autograd would zero-fill gradients for
    # the auxiliary outputs on every backward.
    ctx.mark_non_differentiable(lse, scale)
    ctx.set_materialize_grads(False)
    empty = x.new_empty(0)
    _keep_for_backward(ctx, (x, target, inv_t, weight, lse, empty, empty, scale), reduction,
                       label_smoothing, ignore_index, backend, grad_in_forward=False,
                       inplace=False, via_op=True)


def _keep_for_backward(ctx, saved, reduction, label_smoothing, ignore_index, backend, *,
                       grad_in_forward, inplace, via_op):
    """Everything _backward reads from ctx, for both paths (custom op and eager).

    saved: (x, target, inv_t, weight, lse, grad, zdot, scale); grad and zdot are empty when
    the forward pass did not compute them.
    """
    ctx.reduction = reduction
    ctx.label_smoothing = label_smoothing
    ctx.ignore_index = ignore_index
    ctx.backend = backend
    ctx.grad_in_forward = grad_in_forward
    ctx.inplace = inplace
    ctx.via_op = via_op
    ctx.save_for_backward(*saved)


class _EagerCrossEntropy(torch.autograd.Function):
    """The eager path: the same forward and autograd formula as the custom ops, without the
    dispatcher round trip that a custom op costs per call (tens of microseconds, which is
    a visible share of a millisecond-sized kernel). torch.compile traces the custom ops.

    With ``inplace`` (and logits that need a gradient) the gradient is written over ``x``.
    """

    @staticmethod
    def forward(ctx, x, target, inv_t, weight, ignore_index, label_smoothing, reduction,
                t_checked, backend, inplace):
        name = _dispatch.resolve(backend, x.device)
        needs_x, _, needs_inv_t = ctx.needs_input_grad[:3]
        inplace = bool(inplace) and needs_x
        in_forward = _grad_in_forward(_dispatch.defers_checks(name), x.dtype, inplace)
        mode = GRAD_NONE
        if in_forward:
            mode = GRAD_FULL if needs_x else GRAD_ZDOT if needs_inv_t else GRAD_NONE
        write_into_x = inplace and mode == GRAD_FULL
        loss, lse, grad, zdot, scale = _forward(
            x, target, inv_t, weight, ignore_index, label_smoothing, reduction, mode, t_checked,
            name, grad_out=x if write_into_x else None,
        )
        if write_into_x:
            # The kernel wrote through a raw pointer: make the write visible, so that any
            # other autograd node that saved these logits refuses to run on gradients.
            torch.autograd.graph.increment_version(x)
            grad = x
        _keep_for_backward(ctx, (x, target, inv_t, weight, lse, grad, zdot, scale), reduction,
                           label_smoothing, ignore_index, name, grad_in_forward=in_forward,
                           inplace=inplace, via_op=False)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        return _backward(ctx, g_loss) + (None,)


def _backward(ctx, g_loss, *unused):
    if g_loss is None:
        return (None,) * 9  # the custom op's nine inputs
    if torch.is_grad_enabled() and not ctx.via_op:
        # create_graph=True: the saved gradient is a constant here, so a second derivative
        # would silently miss terms. Refuse instead. (Through the custom ops, autograd
        # refuses by itself: _ce_grad_op has no derivative.)
        raise RuntimeError(
            "tempsoft.cross_entropy does not support double backward (create_graph=True); "
            "use F.cross_entropy(input / T, ...) where second derivatives are needed"
        )
    x, target, inv_t, weight, lse, grad, zdot, scale = ctx.saved_tensors
    needs_x, needs_target, needs_inv_t, needs_weight = ctx.needs_input_grad[:4]
    none = ctx.reduction == _REDUCTIONS["none"]
    args = (x, target, inv_t, weight, ctx.ignore_index, ctx.label_smoothing)
    dx = None
    if ctx.grad_in_forward and needs_x:
        dx = _scale_saved_grad(grad, g_loss, none, lambda: _gradient(
            *args, _row_scale(scale, g_loss, none), GRAD_FULL, ctx.backend)[0])
        if not (needs_inv_t or needs_target or needs_weight):
            return dx, None, None, None, None, None, None, None, None
    # The factor of each row's gradient: grad_output / denominator, in the acc dtype.
    row_scale = _row_scale(scale, g_loss, none)
    if not ctx.grad_in_forward and (needs_x or needs_inv_t):
        mode = GRAD_FULL if needs_x else GRAD_ZDOT
        if ctx.via_op:  # traced by torch.compile: stay inside custom ops
            dx, zdot = _ce_grad_op(*args, row_scale, mode, ctx.backend)
        else:
            dx, zdot = _gradient(*args, row_scale, mode, ctx.backend,
                                 grad_out=x if ctx.inplace else None)
            if ctx.inplace:
                torch.autograd.graph.increment_version(x)
                dx = x
        if not needs_x:
            dx = None
    dinv_t = dtarget = dweight = None
    if needs_inv_t:
        # dloss_i/d(1/T_i) = sum_c dloss_i/dz_c * x_c = zdot_i * T_i
        per_row = zdot * row_scale / inv_t
        dinv_t = per_row if inv_t.numel() == per_row.numel() else per_row.sum().reshape(1)
        dinv_t = dinv_t.to(inv_t.dtype)
    if (needs_target or needs_weight) and target.is_floating_point():
        # With q' = (1 - eps) q + eps / C and -log p_c = lse - z_c:
        #   dloss_i/dq_c = (1 - eps) w_c (lse_i - z_c),  dloss_i/dw_c = q'_c (lse_i - z_c)
        nlp = lse.unsqueeze(1) - x.to(lse.dtype) * inv_t.reshape(-1, 1)
        coef = row_scale.reshape(-1, 1)
        eps = ctx.label_smoothing
        if needs_target:
            w = 1.0 if weight is None else weight.to(lse.dtype)
            dtarget = ((1.0 - eps) * coef * w * nlp).to(target.dtype)
        if needs_weight:
            q = target.to(lse.dtype) * (1.0 - eps) + eps / x.shape[1]
            dweight = (coef * q * nlp).sum(dim=0).to(weight.dtype)
    return dx, dtarget, dinv_t, dweight, None, None, None, None, None


def _row_scale(scale: Tensor, g_loss: Tensor, none: bool) -> Tensor:
    g = g_loss.to(scale.dtype)
    return scale * (g if none else g.reshape(1))


def _scale_saved_grad(grad: Tensor, g_loss: Tensor, none: bool, recompute) -> Tensor:
    """grad_output * the gradient saved by the forward pass.

    The saved buffer is never modified, so retain_graph and gradcheck see the same gradient
    on every backward. fp32 / fp64 gradients are scaled (one more rounding, far below their
    precision); half-precision ones are written again by the kernel (`recompute`) with
    grad_output in their fp32 scale. A grad_output of 1 -- compared on the host: free on the
    CPU, a sync on a GPU -- returns the saved gradient itself.
    """
    if not none and float(g_loss) == 1.0:
        return grad
    if grad.dtype in _HALF:
        return recompute()
    g = g_loss.to(grad.dtype)
    return grad * (g.unsqueeze(1) if none else g)


_ce_op.register_autograd(_backward, setup_context=_setup_context)


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
        weight: (C,) class weights, as in ``F.cross_entropy`` (differentiable with
            probability targets; with class indices, like PyTorch, it must not require grad).
        ignore_index: target value that contributes neither loss nor gradient.
        reduction: "mean" | "sum" | "none".
        label_smoothing: in [0, 1], as in ``F.cross_entropy``.
        backend: "auto" | "cpu" | "cuda" | "triton" | "torch"; see :func:`tempsoft.backends`.
            ``TEMPSOFT_BACKEND`` overrides "auto".
        inplace_backward: write the gradient into ``input``'s own storage (eager mode only,
            and only when ``input`` needs a gradient: ``input`` is overwritten, so use it
            only when the logits are not needed again; the write bumps ``input``'s version,
            so autograd refuses to use it where it was saved before).

    Returns:
        The loss: a scalar for "mean"/"sum", else the target's shape (N, d1, ...). Its dtype
        is the input's, or float32 for half inputs under autocast (like ``F.cross_entropy``,
        which autocast runs in float32).

    Example::

        >>> logits = torch.randn(8, 10, requires_grad=True)
        >>> labels = torch.randint(0, 10, (8,))
        >>> loss = tempsoft.cross_entropy(logits, labels, T=2.0)
        >>> loss.backward()
    """
    if _cpu_common_case(input, target, T, weight, ignore_index, reduction, label_smoothing,
                        backend, inplace_backward):
        return _dispatch.cpu_module().ce_loss(  # eager, CPU: the constant cache serves
            input, target, _cached_constant(1.0 / T, input.dtype, input.device), weight,
            ignore_index, float(label_smoothing), _REDUCTIONS[reduction])
    if torch.jit.is_tracing():
        # A trace would record neither the kernels called straight through their modules
        # nor the checks' host reads: it would replay the traced input's loss as a constant.
        raise RuntimeError(
            "tempsoft.cross_entropy cannot be traced with torch.jit.trace (its kernels run "
            "outside the ops a trace records); use torch.compile or torch.export instead")
    red = _check_reduction(reduction)
    input, target = _autocast_inputs(input, target, weight)
    x2d, t_rows, out_shape = _to_rows(input, target, ignore_index, label_smoothing)
    n_classes = x2d.shape[1]
    acc = acc_dtype(input.dtype)
    w = _check_weight(weight, input, target, n_classes, acc)
    inv_t = _inverse_temperature(T, input, x2d.shape[0], acc)
    t_checked = not isinstance(T, Tensor)

    compute_grad = torch.is_grad_enabled() and (
        input.requires_grad or inv_t.requires_grad or t_rows.requires_grad
        or (w is not None and w.requires_grad)
    )
    args = (x2d, t_rows, inv_t, w, int(ignore_index), float(label_smoothing), red, t_checked)
    if torch.compiler.is_compiling():
        loss = _ce_op(*args, backend)[0]
    elif compute_grad:
        if inplace_backward and (t_rows.requires_grad or (w is not None and w.requires_grad)):
            raise ValueError("inplace_backward=True overwrites the logits, which the gradient "
                             "for class-probability targets and weights needs; use "
                             "inplace_backward=False")
        loss = _EagerCrossEntropy.apply(*args, backend, bool(inplace_backward))
    else:
        loss = _forward(*args[:7], GRAD_NONE, t_checked,
                        _dispatch.resolve(backend, input.device))[0]
    if red == _REDUCTIONS["none"]:
        loss = loss.reshape(out_shape)
    return loss.to(_result_dtype(input))


_COMMON_DTYPES = (torch.float32, torch.float64)
_COMMON_INPUT_TYPES = (Tensor, torch.nn.Parameter)


def _cpu_common_case(input, target, T, weight, ignore_index, reduction, label_smoothing,
                     backend, inplace_backward) -> bool:
    """Whether the call is the common CPU case that one C++ call serves whole, loss and
    autograd node (csrc/cpu/autograd.cpp): (N, C) fp32/fp64 logits, (N,) int64 class
    indices, a number T, at most a constant weight of the logits' dtype, no in-place write,
    the C++ CPU backend, eager mode.

    Every argument that passes these comparisons is valid, so the checks in cross_entropy
    below this test have nothing to say about it (the targets' values are checked in the C++
    call, as on the general path); anything else, including every argument that deserves an
    error message, takes the general path. Exact type tests keep tensor subclasses (which
    may override torch functions) on the general path.
    """
    if (type(input) not in _COMMON_INPUT_TYPES or type(target) is not Tensor
            or not input.is_cpu or input.dtype not in _COMMON_DTYPES or input.dim() != 2
            or target.dtype is not torch.int64 or target.dim() != 1 or not target.is_cpu
            or target.shape[0] != input.shape[0] or type(T) not in (float, int)
            or not 0 < T < math.inf or type(ignore_index) is not int
            or type(label_smoothing) not in (float, int) or not 0 <= label_smoothing <= 1
            or type(reduction) is not str or reduction not in _REDUCTIONS
            or inplace_backward is not False):
        return False
    if weight is not None and (
            type(weight) not in _COMMON_INPUT_TYPES or weight.requires_grad
            or weight.dtype is not input.dtype or not weight.is_cpu or weight.dim() != 1
            or weight.shape[0] != input.shape[1] or not weight.is_contiguous()):
        return False
    if (1.0 / T > _ACC_MAX[input.dtype] or torch.compiler.is_compiling()
            or torch.jit.is_tracing()):
        return False
    return _dispatch.runs_cpu_kernels(backend)


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
    if type(ignore_index) is not int and (isinstance(ignore_index, bool)
                                          or not isinstance(ignore_index, numbers.Integral)):
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
    elif input.dim() == 2:  # already rows (the common case: no view to make)
        x2d, t_rows = input, target
        out_shape = input.shape[:1]
    else:
        x2d = input.movedim(1, -1).reshape(-1, n_classes)
        t_rows = target.movedim(1, -1).reshape(-1, n_classes) if prob else target.reshape(-1)
        out_shape = expected if not prob else input.shape[:1] + input.shape[2:]
    return x2d.contiguous(), t_rows.contiguous(), tuple(out_shape)


def _autocast_inputs(input: Tensor, target: Tensor, weight: Optional[Tensor]):
    """(input, target) as F.cross_entropy sees them under autocast.

    Autocast runs cross_entropy in float32. The kernels read half-precision logits natively
    and compute in float32, which is the same thing without a copy; only probability targets
    of another float dtype than the logits need the float32 copy of the logits that autocast
    would have made (the kernels take targets in the logits' dtype).
    """
    if (isinstance(input, Tensor) and input.dtype in _HALF
            and _autocast_enabled(input.device.type) and isinstance(target, Tensor)
            and target.is_floating_point() and target.dtype != input.dtype):
        input = input.float()
    return input, target


def _check_weight(weight: Optional[Tensor], input: Tensor, target: Tensor, n_classes: int,
                  acc):
    """The class weights in the acc dtype; differentiable only for probability targets."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or weight.shape != (n_classes,):
        shape = list(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise RuntimeError(
            f"weight tensor should be defined either for all {n_classes} classes or no "
            f"classes but got weight tensor of shape: {shape}"
        )
    # Under autocast F.cross_entropy casts half-precision logits and weights to float32.
    autocast_ok = (input.dtype in _HALF and _autocast_enabled(input.device.type)
                   and weight.dtype in (torch.float32,) + _HALF)
    if weight.dtype != input.dtype and not autocast_ok:
        raise RuntimeError(
            f"expected scalar type {input.dtype} for weight but found {weight.dtype}"
        )
    if weight.requires_grad and torch.is_grad_enabled():
        if not target.is_floating_point():
            # What F.cross_entropy (nll_loss) does: no gradient for weights of class indices.
            raise RuntimeError(
                "The function 'tempsoft.cross_entropy' is not differentiable with respect to "
                "argument 'weight' for class-index targets (as F.cross_entropy). This input "
                "cannot have requires_grad True."
            )
        return weight.to(device=input.device, dtype=acc).contiguous()
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
    # (The exact-type test first: numbers.Real's isinstance check runs the abc machinery.)
    if type(T) not in (float, int) and (isinstance(T, bool) or not isinstance(T, numbers.Real)):
        raise TypeError(f"T must be a number or a tensor, got {type(T).__name__}")
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"T must be positive and finite, got T={T}")
    inv = 1.0 / float(T)
    if inv > _ACC_MAX[acc]:
        raise ValueError(
            f"T must be positive and finite (and 1/T representable in {acc}), got T={T}")
    # Checked here, on the host, for free: no kernel looks at a number T again.
    return _constant(inv, acc, input.device)


def _result_dtype(input: Tensor) -> torch.dtype:
    """F.cross_entropy's result dtype: the input's, or float32 under autocast for half inputs."""
    if input.dtype in _HALF and _autocast_enabled(input.device.type):
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
