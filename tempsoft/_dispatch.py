"""Which backend runs an op: the one place that decides.

Backends: "cpu" (C++ kernels, one module per SIMD level: tempsoft._cpu_<level>), "cuda"
(CUDA kernels in tempsoft._C), "triton" (Triton kernels; CPU tensors only under
TRITON_INTERPRET=1), "torch" (the pure-PyTorch reference).  "auto" picks cuda > triton for
CUDA tensors and cpu > torch for CPU tensors; the environment variable TEMPSOFT_BACKEND
overrides "auto".  Which SIMD level of the C++ kernels runs is decided here too
(choose_cpu_level; TEMPSOFT_CPU_CAPABILITY forces one).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from typing import Optional

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
    """torch.ops.tempsoft_C, with the CPU kernels registered; raises if it is not built."""
    ext, why = _native()
    if ext is None:
        raise RuntimeError(f"tempsoft._C is {why}; reinstall with `pip install .`")
    _cpu_kernels()
    return torch.ops.tempsoft_C


# SIMD capability levels of the C++ CPU kernels, best first (setup.py builds each into its
# own module, tempsoft._cpu_<level>).
CPU_LEVELS = ("avx512", "avx2", "default")


def choose_cpu_level(built, supported, forced: Optional[str]) -> tuple[Optional[str], str]:
    """The level of the CPU kernels to load, or None and the reason there is none.

    built: the levels installed; supported: the levels this CPU can run; forced: the value
    of TEMPSOFT_CPU_CAPABILITY, if set. A level the CPU cannot run is never chosen, forced or
    not: loading it could raise SIGILL.
    """
    if forced:
        if forced not in CPU_LEVELS:
            return None, f"TEMPSOFT_CPU_CAPABILITY must be one of {CPU_LEVELS}, got {forced!r}"
        if forced not in supported:
            return None, (f"TEMPSOFT_CPU_CAPABILITY={forced}, but this CPU runs only "
                          f"{', '.join(lv for lv in CPU_LEVELS if lv in supported)}")
        if forced not in built:
            return None, (f"TEMPSOFT_CPU_CAPABILITY={forced}, but that level was not built "
                          f"(built: {', '.join(lv for lv in CPU_LEVELS if lv in built) or 'none'})")
        return forced, ""
    for level in CPU_LEVELS:
        if level in built and level in supported:
            return level, ""
    return None, (f"no CPU kernel level this CPU can run was built (built: "
                  f"{', '.join(lv for lv in CPU_LEVELS if lv in built) or 'none'})")


# The CPU features (as /proc/cpuinfo names them) that each level's compiler flags assume.
_LEVEL_NEEDS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
    "avx2": {"avx2", "fma", "f16c"},
    "default": set(),
}


def _cpu_supported_levels() -> frozenset:
    """The levels this CPU runs: ATen's own choice (ATEN_CPU_CAPABILITY included), and, where
    /proc/cpuinfo says what the CPU has, no level that needs a feature it lacks."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    levels = {"default"}
    if capability in ("AVX2", "AVX512"):
        levels.add("avx2")
    if capability == "AVX512":
        levels.add("avx512")
    flags = _cpu_flags()
    if flags:
        levels = {level for level in levels if _LEVEL_NEEDS[level] <= flags}
    return frozenset(levels)


def _cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (Linux), or an empty set."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_kernels() -> tuple[Optional[str], str]:
    """The CPU kernels' level, loaded and registered on first use: (level, "") or (None,
    reason). The extension's schemas come first (tempsoft._C)."""
    ext, why = _native()
    if ext is None:
        return None, why
    return _load_cpu_level()


def built_cpu_levels() -> set:
    """The levels of the CPU kernels installed (whether or not this CPU can run them)."""
    return {level for level in CPU_LEVELS
            if importlib.util.find_spec(f"tempsoft._cpu_{level}") is not None}


def loadable_cpu_levels() -> list:
    """The levels installed that this CPU runs, best first: the ones that may be imported
    (importing one the CPU cannot run could raise SIGILL)."""
    built, supported = built_cpu_levels(), _cpu_supported_levels()
    return [level for level in CPU_LEVELS if level in built and level in supported]


@functools.lru_cache(maxsize=None)
def _load_cpu_level() -> tuple[Optional[str], str]:
    built = built_cpu_levels()
    forced = os.environ.get("TEMPSOFT_CPU_CAPABILITY", "").strip().lower() or None
    level, why = choose_cpu_level(built, _cpu_supported_levels(), forced)
    if level is None:
        return None, why
    from tempsoft.cpu_cache import limit_from_env

    limit = limit_from_env()  # a bad value raises before anything is registered
    module = cpu_level_module(level)
    module.register_kernels()
    if limit is not None:
        module.grad_cache_set_limit(limit)
    return level, ""


def cpu_level_module(level: str):
    """The module of one SIMD level of the CPU kernels (imported, not registered)."""
    return importlib.import_module(f"tempsoft._cpu_{level}")


@functools.lru_cache(maxsize=None)
def cpu_module():
    """The module of the registered level of the CPU kernels, whose functions tempsoft calls
    directly where the dispatcher's round trip would cost more than the work; raises
    RuntimeError when there is none."""
    level, why = _cpu_kernels()
    if level is None:
        raise RuntimeError(f"the C++ CPU kernels are {why}")
    return cpu_level_module(level)


def cpu_level() -> Optional[str]:
    """The SIMD level of the C++ CPU kernels in use ("avx512", "avx2", "default"), or None."""
    return _cpu_kernels()[0]


# The oldest Triton the kernels are tested with (CI: tools/check_triton.py and the test suite
# under the interpreter); setup.py declares the same floor.
TRITON_MIN = (3, 2)


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton
    except ImportError:
        return False, "triton is not installed"
    version = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])
    if version < TRITON_MIN:
        return False, (f"triton {triton.__version__} is older than "
                       f"{'.'.join(map(str, TRITON_MIN))}, the oldest tempsoft is tested with")
    if triton_interpreted():
        from tempsoft.kernels.triton_support import interpreter_problem

        why = interpreter_problem()
        if why:
            return False, why
    return True, ""


def deferred_checks() -> bool:
    """TEMPSOFT_DEFERRED_CHECKS=1: no host sync for argument checks on CUDA tensors.

    By default a GPU call reads back whether any target is out of range (one small sync),
    so the error is raised by the call that caused it. With deferred checks the GPU kernel
    records a bad target itself and the IndexError comes from tempsoft.check_errors() (or,
    for the CUDA backend, from its next call); the offending row's loss is NaN meanwhile.
    See defers_checks for everything this changes.
    """
    return os.environ.get("TEMPSOFT_DEFERRED_CHECKS", "0") == "1"


# The backends whose kernels guard their own reads and record bad targets on the device.
_DEFERRING = ("cuda", "triton")


def defers_checks(name: str) -> bool:
    """Whether backend `name` skips the argument checks that read device memory on the host.

    True for the GPU kernels (CUDA and Triton; Triton also under its interpreter) when
    TEMPSOFT_DEFERRED_CHECKS=1. Such a call makes no host sync: its targets and tensor
    temperatures are not checked on the host, a bad target gives its row a NaN loss and is
    raised later by tempsoft.check_errors(), and the gradient is written in the backward
    pass without reading grad_output on the host.
    """
    return name in _DEFERRING and deferred_checks()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(name: str) -> tuple[bool, str]:
    """(whether backend `name` can run here, the reason when not), probing only that one."""
    if name == "torch":
        return True, ""
    if name == "cpu":
        level, why = _cpu_kernels()
        return level is not None, why
    if name == "cuda":
        ext, why = _native()
        if torch.version.cuda is None:
            return False, "not built (torch has no CUDA)"
        if ext is None:
            return False, why
        if not ext.has_cuda():
            return False, "not built (the extension was compiled without CUDA)"
        if not torch.cuda.is_available():
            return False, "no CUDA device visible"
        return True, ""
    if name == "triton":
        ok, why = _triton_status()
        if ok and not (triton_interpreted() or torch.cuda.is_available()):
            return False, "no CUDA device (set TRITON_INTERPRET=1 to interpret on the CPU)"
        return ok, why
    raise ValueError(f"unknown backend {name!r}")


def backends() -> dict[str, tuple[bool, str]]:
    """Backend name -> (available, reason when not), for this process and machine.

    Example: ``{"cpu": (True, ""), "cuda": (False, "not built (torch has no CUDA)"), ...}``.
    """
    return {name: available(name) for name in BACKENDS}


_warned_fallback = False
BACKEND_ENV = "TEMPSOFT_BACKEND"  # overrides "auto" (resolve, runs_cpu_kernels)


def resolve(backend: str, device: torch.device) -> str:
    """Turn a requested backend into the one that runs on `device`, or raise ValueError.

    Called on every op call: it probes only the backends it needs (the probes are cached).
    """
    if backend not in _CHOICES:
        raise ValueError(f"backend must be one of {_CHOICES}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(BACKEND_ENV, "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{BACKEND_ENV} must be one of {_CHOICES}, got {env!r}")
            backend = env
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for name in order:
            if available(name)[0]:
                if name == "torch" and device.type == "cpu":
                    _warn_fallback(available("cpu")[1])
                return name
        return "torch"
    ok, why = available(backend)
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


def runs_cpu_kernels(backend: str) -> bool:
    """Whether ``resolve(backend, <a CPU tensor>)`` gives "cpu", without raising.

    The per-call test of the op's C++ common case, in the fewest Python calls: in a training
    step it runs with caches that the model just streamed through, where each call costs
    microseconds. Whatever is unusual (another backend, a bad name, no kernels) is False,
    and resolve() on the general path then says what it has to.
    """
    if backend == "auto":
        env = os.environ.get(BACKEND_ENV)
        if env and env.strip() not in ("", "auto", "cpu"):
            return False
    elif backend != "cpu":
        return False
    return _cpu_kernels()[0] is not None


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
