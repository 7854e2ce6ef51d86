"""The cache of the C++ CPU kernel's gradient buffers (csrc/cpu/grad_cache.cpp).

The fused cross-entropy writes its (N, C) gradient into a new buffer on every call.  A
buffer of at least 1 MiB that is freed again (``zero_grad(set_to_none=True)``, or the graph
going away) is kept and handed to the next call of the same size (or one up to half
smaller), as PyTorch's CUDA caching allocator does for device memory: fresh memory from the
OS costs a page fault and a zeroed page per 4 KiB, which at large C took longer than the
kernel itself.  The cache holds at most ``TEMPSOFT_CPU_CACHE_MB`` MiB (default 1024; 0
turns it off); buffers in use by tensors do not count.
"""
from __future__ import annotations

import os
from typing import Optional

ENV = "TEMPSOFT_CPU_CACHE_MB"


def limit_from_env(environ=os.environ) -> Optional[int]:
    """The byte limit that TEMPSOFT_CPU_CACHE_MB asks for, or None when it is unset."""
    text = environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        mib = float(text)
    except ValueError:
        mib = float("nan")
    if not mib >= 0 or mib == float("inf"):
        raise ValueError(f"{ENV} must be a number of MiB >= 0 (0 turns the cache off), "
                         f"got {text!r}")
    return int(mib * (1 << 20))


def _module():
    """The loaded CPU kernel module (its cache is the one in use), or None."""
    from tempsoft import _dispatch

    return None if _dispatch.cpu_level() is None else _dispatch.cpu_module()


def cpu_cache_info() -> dict:
    """{cached_bytes, blocks, hits, misses, limit_bytes} of the cache; {} without the C++
    CPU kernels.  hits / misses count the buffers of at least 1 MiB handed out."""
    module = _module()
    return {} if module is None else dict(module.grad_cache_stats())


def empty_cpu_cache() -> None:
    """Free every buffer the cache holds (gradients still in use are not touched)."""
    module = _module()
    if module is not None:
        module.grad_cache_empty()


def set_cpu_cache_limit(nbytes: int) -> None:
    """Keep at most `nbytes` of freed gradient buffers (0: none), freeing any beyond it."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes must be an int >= 0, got {nbytes!r}")
    module = _module()
    if module is not None:
        module.grad_cache_set_limit(nbytes)
