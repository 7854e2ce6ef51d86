"""One fused PGD step (ascent, projection onto the eps-ball, clamp), and the random start.

Layers, bottom up: the backends' kernels (C++ ``tempsoft_C::pgd_step_``, CUDA under the same
name, Triton in ``tempsoft/kernels/triton_pgd.py``, the reference ``pgd_step`` in
``tempsoft/kernels/reference.py``, whose comment block is the contract) -> the
``tempsoft::pgd_step_`` custom op (one op for torch.compile, mutating ``x_adv``; it picks
the backend and makes inputs contiguous) -> :func:`pgd_step_` (argument checks, eps/alpha to
per-sample tensors).

The attacks validate their arguments once and then call :func:`_pgd_step_checked_` in their
loops, which skips the value checks that would cost a host sync per step on a GPU, and in
eager mode calls the native kernels without the custom op; :func:`pgd_step_` takes the same
direct way, after its checks, for inputs the kernels take as they are.
"""
import math
import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from tempsoft import _dispatch
from tempsoft.kernels import reference

NORMS = {"linf": 0, "l2": 2}
_DTYPES = (torch.float32, torch.float64)
Number = Union[float, int]


# --------------------------------------------------------------------------------------
# The custom op: one node for torch.compile
# --------------------------------------------------------------------------------------
def _run_backend(x_adv, grad, x_nat, eps, alpha, active, norm, lower, upper, backend):
    if backend == "torch":
        x_adv.copy_(reference.pgd_step(x_adv, grad, x_nat, eps, alpha, norm, lower, upper, active))
    elif backend == "triton":
        from tempsoft.kernels import triton_pgd

        triton_pgd.pgd_step_(x_adv, grad, x_nat, eps, alpha, active, norm, lower, upper)
    else:  # "cpu" and "cuda" share the native op; the dispatcher picks by device
        _dispatch.native_ops().pgd_step_(x_adv, grad, x_nat, eps, alpha, active, norm, lower, upper)


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@torch.library.custom_op(
    "tempsoft::pgd_step_",
    mutates_args=("x_adv",),
    schema="(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, Tensor eps, Tensor alpha, "
    "Tensor? active, int norm, float lower, float upper, str backend) -> ()",
)
def _pgd_step_op(x_adv, grad, x_nat, eps, alpha, active, norm, lower, upper, backend):
    # Resolved here, not in the Python wrapper, so torch.compile never traces the backend
    # table (environment variables, cached probes): it sees one opaque op.
    backend = resolve_backend(backend, x_adv)
    # The L2 kernels read x_adv in three passes while writing it: inputs that alias it
    # must be copies.
    if _shares_memory(grad, x_adv):
        grad = grad.clone()
    if _shares_memory(x_nat, x_adv):
        x_nat = x_nat.clone()
    target = x_adv if x_adv.is_contiguous() else x_adv.contiguous()
    _run_backend(
        target, grad.contiguous(), x_nat.contiguous(), eps.contiguous(), alpha.contiguous(),
        None if active is None else active.contiguous(), norm, lower, upper, backend,
    )
    if target is not x_adv:
        x_adv.copy_(target)


@_pgd_step_op.register_fake
def _pgd_step_fake(x_adv, grad, x_nat, eps, alpha, active, norm, lower, upper, backend):
    return None


# --------------------------------------------------------------------------------------
# Argument checks (shared with the attacks)
# --------------------------------------------------------------------------------------
def norm_code(norm: str) -> int:
    """'linf' -> 0, 'l2' -> 2 (case-insensitive); ValueError naming anything else."""
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"norm must be one of {tuple(NORMS)}, got {norm!r}")
    return NORMS[norm.lower()]


def check_bounds(lower: Number, upper: Number) -> tuple[float, float]:
    """The box [lower, upper] as floats; ValueError unless lower < upper (infinities allowed)."""
    for name, v in (("lower", lower), ("upper", upper)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__} {v!r}")
    lower, upper = float(lower), float(upper)
    if not lower < upper:  # also rejects NaN
        raise ValueError(f"need lower < upper, got lower={lower}, upper={upper}")
    return lower, upper


def per_sample(name: str, value, batch: int, like: Tensor, check_values: bool = True,
               finite: bool = False) -> Tensor:
    """A number, 0-d or (B,) tensor -> a contiguous (B,) tensor in the dtype/device of `like`.

    Values must be >= 0 and not NaN; infinity is allowed (an unbounded ball) unless `finite`
    (a step size: an infinite step has no direction). Checking the values of a tensor reads
    it on the host; pass check_values=False on hot paths whose caller checked once.
    """
    if isinstance(value, Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != batch):
            raise ValueError(
                f"{name} must be a number, a 0-d tensor or a ({batch},) tensor (one per "
                f"sample), got shape {tuple(value.shape)}"
            )
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the images are on {like.device}")
        t = value.to(like.dtype).expand(batch).contiguous()
        if check_values and not torch.compiler.is_compiling():
            bad = torch.isnan(t) | (t < 0)
            if finite:
                bad |= torch.isinf(t)
            if bool(bad.any()):
                raise ValueError(f"{name} must be >= 0{' and finite' if finite else ''}, got "
                                 f"{float(t[bad][0])}")
        return t
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if math.isnan(value) or value < 0 or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be >= 0{' and finite' if finite else ''}, got {value}")
    return torch.full((batch,), float(value), dtype=like.dtype, device=like.device)


def _check_images(x_adv: Tensor, grad: Tensor, x_nat: Tensor) -> None:
    for name, t in (("x_adv", x_adv), ("grad", grad), ("x_nat", x_nat)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if x_adv.dtype not in _DTYPES:
        raise TypeError(f"x_adv must be float32 or float64, got {x_adv.dtype}")
    if grad.dtype != x_adv.dtype or x_nat.dtype != x_adv.dtype:
        raise TypeError(
            f"x_adv, grad and x_nat must share one dtype, got {x_adv.dtype}, {grad.dtype}, "
            f"{x_nat.dtype}"
        )
    if x_adv.dim() < 1:
        raise ValueError("x_adv needs a batch dimension (B, ...), got a 0-d tensor")
    if grad.shape != x_adv.shape or x_nat.shape != x_adv.shape:
        raise ValueError(
            f"x_adv, grad and x_nat must have one shape, got {tuple(x_adv.shape)}, "
            f"{tuple(grad.shape)}, {tuple(x_nat.shape)}"
        )
    if grad.device != x_adv.device or x_nat.device != x_adv.device:
        raise ValueError(
            f"x_adv, grad and x_nat must be on one device, got {x_adv.device}, {grad.device}, "
            f"{x_nat.device}"
        )


def _check_active(active: Optional[Tensor], batch: int, device: torch.device) -> Optional[Tensor]:
    if active is None:
        return None
    if not isinstance(active, Tensor) or active.dtype != torch.bool:
        got = active.dtype if isinstance(active, Tensor) else type(active).__name__
        raise TypeError(f"active must be a bool tensor of shape ({batch},), got {got}")
    if active.shape != (batch,):
        raise ValueError(f"active must have shape ({batch},), got {tuple(active.shape)}")
    if active.device != device:
        raise ValueError(f"active is on {active.device} but x_adv is on {device}")
    return active


def resolve_backend(backend: str, x: Tensor) -> str:
    """The backend that runs the step for `x`: Triton kernels take fp32 only."""
    name = _dispatch.resolve(backend, x.device)
    if name == "triton" and x.dtype != torch.float32:
        if backend != "auto":
            raise TypeError(f"backend 'triton' runs float32 only, got {x.dtype}")
        name = "torch"
    return name


# --------------------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------------------
def pgd_step_(
    x_adv: Tensor,
    grad: Tensor,
    x_nat: Tensor,
    eps,
    alpha,
    norm: str = "linf",
    lower: Number = 0.0,
    upper: Number = 1.0,
    active: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """One projected gradient-ascent step, in place, fused into one pass over memory.

    Linf (Madry et al., 2018): ``x_adv + alpha * sign(grad)``; L2: ``x_adv + alpha * grad /
    ||grad||_2`` per sample (a sample whose gradient is all zero, not finite, or too small
    to normalise -- alpha / ||grad|| beyond the dtype's range, as with the denormal gradients
    of a saturated softmax -- does not move). Every finite input gives a finite output. Then the offset from ``x_nat`` is projected onto the eps-ball (clamped to
    [-eps, eps] for Linf, scaled down to norm eps for L2) and the result clamped to
    [lower, upper]. The exact arithmetic is the contract in ``tempsoft/kernels/reference.py``;
    every backend reproduces it (fp32 results equal the reference's).

    Args:
        x_adv: the current adversarial batch, updated in place (float32 or float64).
        grad: the loss gradient at x_adv (ascent direction; negate it to descend).
        x_nat: the natural (clean) batch, centre of the eps-ball.
        eps: ball radius, >= 0: a number or a (B,) tensor (one per sample).
        alpha: step size, >= 0 and finite: a number or a (B,) tensor.
        norm: "linf" or "l2".
        lower, upper: the box the images live in.
        active: optional (B,) bool; samples with False are left untouched.
        backend: "auto", "cpu", "cuda", "triton" or "torch" (see ``tempsoft.backends()``).

    Returns:
        x_adv.

    Shape:
        x_adv, grad, x_nat: (B, ...) one shape; eps, alpha, active: (B,).

    Example::

        >>> x = torch.rand(4, 3, 8, 8); g = torch.randn(4, 3, 8, 8)
        >>> adv = x.clone()
        >>> _ = tempsoft.pgd_step_(adv, g, x, eps=8/255, alpha=2/255)
        >>> bool(((adv - x).abs() <= 8/255 + 1e-7).all())
        True
    """
    code = norm_code(norm)
    _check_images(x_adv, grad, x_nat)
    lower, upper = check_bounds(lower, upper)
    batch = x_adv.shape[0]
    eps_t = per_sample("eps", eps, batch, x_adv)
    alpha_t = per_sample("alpha", alpha, batch, x_adv, finite=True)
    active = _check_active(active, batch, x_adv.device)
    # In eager mode, what the native kernel takes as it is goes the attacks' direct way,
    # without the custom op's tens of microseconds; torch.compile traces the custom op, which
    # resolves the backend itself.
    if (not torch.compiler.is_compiling() and x_adv.is_contiguous() and x_nat.is_contiguous()
            and not _shares_memory(grad, x_adv) and not _shares_memory(x_nat, x_adv)):
        name = resolve_backend(backend, x_adv)
        if name in ("cpu", "cuda"):
            active = None if active is None else active.contiguous()
            return _pgd_step_checked_(x_adv, grad, x_nat, eps_t, alpha_t, code, lower, upper,
                                      active, name)
    with torch.no_grad():
        torch.ops.tempsoft.pgd_step_(x_adv, grad, x_nat, eps_t, alpha_t, active, code, lower,
                                     upper, backend)
    return x_adv


def _pgd_step_checked_(x_adv, grad, x_nat, eps_t, alpha_t, code, lower, upper, active, backend):
    """pgd_step_ for callers that validated everything once: (B,) eps/alpha, norm code, and
    a resolved backend.

    In eager mode the native backends are called directly: about 2 us per call instead of
    about 40 us through the Python custom-op machinery, which matters for small batches on a
    GPU. That path needs x_adv and x_nat contiguous and not aliasing each other or grad (the
    attacks' own buffers are; the kernel checks contiguity).
    """
    with torch.no_grad():
        if backend in ("cpu", "cuda") and not torch.compiler.is_compiling():
            _dispatch.native_ops().pgd_step_(x_adv, grad.contiguous(), x_nat, eps_t, alpha_t,
                                             active, code, lower, upper)
        else:
            torch.ops.tempsoft.pgd_step_(x_adv, grad, x_nat, eps_t, alpha_t, active, code,
                                         lower, upper, backend)
    return x_adv


# --------------------------------------------------------------------------------------
# Random start
# --------------------------------------------------------------------------------------
def _draw(fn, shape, dtype, device, generator):
    """fn(shape) on the generator's device, moved to `device` (a CPU generator may drive a
    CUDA attack; the draw is then the same on every device)."""
    gen_device = generator.device if generator is not None else device
    return fn(shape, generator=generator, dtype=dtype, device=gen_device).to(device)


START_MODES = ("uniform", "radial", "boundary")


def random_start(
    x_nat: Tensor,
    eps,
    norm: str = "linf",
    lower: Number = 0.0,
    upper: Number = 1.0,
    generator: Optional[torch.Generator] = None,
    mode: str = "uniform",
) -> Tensor:
    """A random point of the eps-ball around each sample, clamped to [lower, upper].

    Modes (n = elements per sample):

    ========== ================================== ===========================================
    mode       Linf                               L2
    ========== ================================== ===========================================
    "uniform"  each coordinate uniform in         uniform in the n-ball: an isotropic direction
               [-eps, eps) (Madry et al.;         times the radius eps * U^(1/n) (the law of
               torchattacks)                      the uniform ball, P(r <= t eps) = t^n)
    "radial"   as "uniform"                       the direction times eps * U (torchattacks'
                                                  PGDL2): crowds points near the centre
    "boundary" a uniform draw rescaled so its     on the sphere of radius eps (AutoAttack's
               largest coordinate is eps          APGD)
               (AutoAttack's APGD)
    ========== ================================== ===========================================

    In high dimension the uniform ball puts almost every point near radius eps, while
    "radial" starts at eps/2 on average: with few steps the two give different robust
    accuracies, so the mode is part of an attack's definition. Clamping to the box happens
    last, so points near the edges of the box pile up on its faces.

    Args:
        x_nat: (B, ...) the natural batch (not modified).
        eps: a number >= 0 or a (B,) tensor.
        norm: "linf" or "l2".
        lower, upper: the image box.
        generator: a torch.Generator for reproducible draws (its device may differ from x_nat's).
        mode: "uniform" (default), "radial" or "boundary".

    Returns:
        a new tensor shaped like x_nat.

    Example::

        >>> g = torch.Generator().manual_seed(0)
        >>> x0 = torch.rand(2, 3, 4, 4)
        >>> x = tempsoft.ops.pgd.random_start(x0, 0.1, "l2", generator=g)
        >>> bool(((x - x0).flatten(1).norm(dim=1) <= 0.1 + 1e-6).all())
        True
    """
    code = norm_code(norm)
    if mode not in START_MODES:
        raise ValueError(f"mode must be one of {START_MODES}, got {mode!r}")
    if not isinstance(x_nat, Tensor) or not x_nat.is_floating_point():
        got = x_nat.dtype if isinstance(x_nat, Tensor) else type(x_nat).__name__
        raise TypeError(f"x_nat must be a floating-point tensor, got {got}")
    if x_nat.dim() < 1:
        raise ValueError("x_nat needs a batch dimension (B, ...), got a 0-d tensor")
    lower, upper = check_bounds(lower, upper)
    batch = x_nat.shape[0]
    bshape = (batch,) + (1,) * (x_nat.dim() - 1)
    eps_t = per_sample("eps", eps, batch, x_nat).reshape(bshape)
    dtype, device = x_nat.dtype, x_nat.device
    if code == 0:
        u = _draw(torch.rand, x_nat.shape, dtype, device, generator) * 2 - 1
        if mode == "boundary":
            top = u.reshape(batch, -1).abs().amax(dim=1).reshape(bshape) if batch else u
            u = torch.where(top > 0, u / top, torch.zeros_like(u))
        x = x_nat + u * eps_t
    else:
        n = x_nat[0].numel() if batch else 0
        z = _draw(torch.randn, x_nat.shape, dtype, device, generator)
        z_norm = z.reshape(batch, -1).to(torch.float64).norm(dim=1)
        radius = eps_t.reshape(batch).to(torch.float64)
        if mode != "boundary":
            u = _draw(torch.rand, (batch,), torch.float64, device, generator)
            radius = radius * (u if mode == "radial" else u.pow(1.0 / max(n, 1)))
        # A Gaussian draw of exactly zero has probability zero; guard the division anyway.
        coef = torch.where(z_norm > 0, radius / z_norm, torch.zeros_like(z_norm))
        x = x_nat + z * coef.to(dtype).reshape(bshape)
    return x.clamp_(lower, upper)


__all__ = ["pgd_step_", "random_start", "NORMS", "START_MODES"]
