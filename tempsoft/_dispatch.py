"""Which backend runs an op: the one place that decides.

Backends: "cpu" (C++ kernels in tempsoft._C), "cuda" (CUDA kernels in tempsoft._C),
"triton" (Triton kernels; CPU tensors only under TRITON_INTERPRET=1), "torch" (the
pure-PyTorch reference).  "auto" picks cuda > triton for CUDA tensors and cpu > torch
for CPU tensors; the environment variable TEMPSOFT_BACKEND overrides "auto".
"""
from __future__ import annotations

import functools
import os
import warnings

import torch

BACKENDS = ("cpu", "cuda", "triton", "torch")
_CHOICES = BACKENDS + ("auto",)


@functools.lru_cache(maxsize=None)
def _native():
    """The compiled extension and None, or None and the reason it is missing."""
    try:
        from tempsoft import _C  # noqa: F401
    except ImportError as exc:
        return None, f"not built ({exc})"
    return _C, ""


def native_ops():
    """torch.ops.tempsoft_C, loading the extension first; raises if it is not built."""
    ext, why = _native()
    if ext is None:
        raise RuntimeError(f"tempsoft._C is {why}; reinstall with `pip install .`")
    return torch.ops.tempsoft_C


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    return True, ""


def deferred_checks() -> bool:
    """TEMPSOFT_DEFERRED_CHECKS=1: no host sync for argument checks on CUDA tensors.

    By default a CUDA call reads back whether any target is out of range (one small sync),
    so the error is raised by the call that caused it. With deferred checks the CUDA kernel
    records a bad target itself and the IndexError comes from the next CUDA call or from
    tempsoft.check_errors(); the offending row's loss is NaN meanwhile.
    """
    return os.environ.get("TEMPSOFT_DEFERRED_CHECKS", "0") == "1"


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def backends() -> dict[str, tuple[bool, str]]:
    """Backend name -> (available, reason when not), for this process and machine.

    Example: ``{"cpu": (True, ""), "cuda": (False, "not built (torch has no CUDA)"), ...}``.
    """
    ext, why = _native()
    out: dict[str, tuple[bool, str]] = {}
    out["cpu"] = (ext is not None, "" if ext is not None else why)
    if torch.version.cuda is None:
        out["cuda"] = (False, "not built (torch has no CUDA)")
    elif ext is None:
        out["cuda"] = (False, why)
    elif not ext.has_cuda():
        out["cuda"] = (False, "not built (the extension was compiled without CUDA)")
    elif not torch.cuda.is_available():
        out["cuda"] = (False, "no CUDA device visible")
    else:
        out["cuda"] = (True, "")
    ok, why_t = _triton_status()
    if ok and not (torch.cuda.is_available() or triton_interpreted()):
        ok, why_t = False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on the CPU)"
    out["triton"] = (ok, why_t)
    out["torch"] = (True, "")
    return out


_warned_fallback = False


def resolve(backend: str, device: torch.device) -> str:
    """Turn a requested backend into the one that runs on `device`, or raise ValueError."""
    if backend not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("TEMPSOFT_BACKEND", "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"TEMPSOFT_BACKEND must be one of {_CHOICES}, got {env!r}")
            backend = env
    avail = backends()
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for name in order:
            if avail[name][0]:
                if name == "torch" and device.type == "cpu":
                    _warn_fallback(avail["cpu"][1])
                return name
        return "torch"
    ok, why = avail[backend]
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available: {why}")
    if backend == "cuda" and device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got a tensor on {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got a tensor on {device}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got a tensor on {device}"
        )
    return backend


def _warn_fallback(why: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"tempsoft: the C++ CPU kernels are {why}; using the pure-PyTorch reference "
            "(correct, slower). Reinstall with `pip install .` to build them.",
            RuntimeWarning,
            stacklevel=3,
        )
