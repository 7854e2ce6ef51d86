"""Shared helpers for the benchmark scripts (bench_ce.py, bench_pgd.py, ...).

Timing (median of N after warm-up; triton.testing.do_bench on CUDA when available), the
machine key that names a results file, appending rows to
benchmarks/results/<machine-key>.csv with one fixed schema, the reference copy bandwidth,
argument parsing for shapes and dtypes, and a plain-text table.

Example::

    from _common import bench_many, copy_fn, append_rows, print_table, run_info

    ms = bench_many({"eager": lambda: f(x), "copy": copy_fn(x.numel(), x.dtype, "cpu")})
    row = dict(run_info("cpu"), bench="ce", shape="4096x1000", dtype="fp32",
               provider="eager", ms=ms["eager"], copy_fraction=ms["copy"] / ms["eager"])
    print_table([row], ["shape", "dtype", "provider", "ms", "copy_fraction"])
    append_rows([row])
"""
from __future__ import annotations

import csv
import datetime as _dt
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

DTYPES = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# The one schema of every results CSV: rows from any benchmark fill what applies to them.
CSV_COLUMNS = (
    "date", "machine", "device", "threads", "torch", "triton", "bench", "mode", "shape",
    "dtype", "provider", "ms", "speedup", "gb_per_s", "copy_fraction", "note",
)


# --------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------
def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """"4096x1000,4096x32000" -> [(4096, 1000), (4096, 32000)].

    Raises ValueError naming the piece that is not positive integers joined by "x".
    """
    shapes = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        if not re.fullmatch(r"\d+(x\d+)*", piece):
            raise ValueError(f"shape must look like 4096x1000, got {piece!r}")
        shapes.append(tuple(int(d) for d in piece.split("x")))
    if not shapes:
        raise ValueError(f"no shape given in {text!r}")
    return shapes


def parse_dtypes(text: str) -> list[torch.dtype]:
    """"fp32,bf16" -> [torch.float32, torch.bfloat16]; ValueError names an unknown one."""
    out = []
    for name in filter(None, (p.strip() for p in text.split(","))):
        if name not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
        out.append(DTYPES[name])
    if not out:
        raise ValueError(f"no dtype given in {text!r}")
    return out


def shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


# --------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model as /proc/cpuinfo (Linux) or platform reports it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_name(device: str) -> str:
    """Human-readable machine: "AMD EPYC, 2 cores" or the GPU's name."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {os.cpu_count()} cores"


def machine_key(device: str) -> str:
    """File-name-safe key of the machine: "cpu-AMD-EPYC-2c", "gpu-NVIDIA-H100-80GB-HBM3"."""
    if device == "cuda":
        raw = "gpu-" + torch.cuda.get_device_name()
    else:
        raw = f"cpu-{cpu_model()}-{os.cpu_count()}c"
    return re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9.]+", "-", raw)).strip("-")


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none): how shared the machine was."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def run_info(device: str) -> dict:
    """The columns every row of this run shares: date, machine, versions, threads."""
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_name(device),
        "device": device,
        "threads": torch.get_num_threads() if device == "cpu" else "",
        "torch": torch.__version__,
        "triton": triton_version(),
    }


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# Clocks for time_ms.  "cpu" is this thread's CPU time: on a loaded 2-core VM the wall clock
# swings by 2x between runs (preemption) while the time the thread ran does not (memory
# stalls still count).  Meaningful with one torch thread, where every kernel runs inline in
# the calling thread.
CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}


def time_ms(fn: Callable[[], object], *, device: str = "cpu", repeats: int = 20,
            warmup: int = 3, clock: str = "wall") -> list[float]:
    """Milliseconds of `repeats` calls of fn after `warmup` calls, each synced, by `clock`
    (a key of CLOCKS)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    now = CLOCKS[clock]
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        _sync(device)
        times.append((now() - start) / 1e6)
    return times


def bench_ms(fn: Callable[[], object], *, device: str = "cpu", repeats: int = 20,
             warmup: int = 3, clock: str = "wall") -> float:
    """Median milliseconds per call of fn.

    CUDA: triton.testing.do_bench (L2 flushed between calls) when triton is installed,
    else CUDA-synchronized wall clock.  CPU: median of `repeats` calls by `clock`.
    """
    if device == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            try:
                return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            except TypeError:  # triton without return_mode
                return float(do_bench(fn, warmup=25, rep=100, quantiles=[0.5]))
    return statistics.median(time_ms(fn, device=device, repeats=repeats, warmup=warmup,
                                     clock=clock))


def bench_many(fns: dict[str, Callable[[], object]], *, device: str = "cpu",
               repeats: int = 20, warmup: int = 3, rounds: int = 3,
               clock: str = "wall") -> dict[str, float]:
    """Median ms per call of each fn, measured so that the providers can be compared.

    CPU: `rounds` rounds; in each, every fn in turn gets `warmup` untimed calls and then
    its share of the `repeats` timed ones.  Interleaving whole blocks spreads slow drifts
    of a shared machine's load over all providers, while each block still runs warm (a
    provider right after another one pays for that one's freed memory otherwise: fresh
    pages are expensive on a VM), timed by `clock`.  CUDA: bench_ms each.  A fn that
    raises is reported as NaN (its exception printed).
    """
    out: dict[str, float] = {}
    if device == "cuda":
        for name, fn in fns.items():
            try:
                out[name] = bench_ms(fn, device=device, repeats=repeats, warmup=warmup)
            except Exception as exc:  # noqa: BLE001 - a failing provider is a result
                print(f"{name} failed: {type(exc).__name__}: {exc}")
                out[name] = float("nan")
        return out
    rounds = max(1, min(rounds, repeats))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        share = repeats // rounds + (1 if r < repeats % rounds else 0)
        for name, fn in fns.items():
            if name in out:  # failed earlier
                continue
            try:
                times[name] += time_ms(fn, device=device, repeats=share, warmup=warmup,
                                       clock=clock)
            except Exception as exc:  # noqa: BLE001
                print(f"{name} failed: {type(exc).__name__}: {exc}")
                out[name] = float("nan")
    out.update({name: statistics.median(t) for name, t in times.items() if name not in out})
    return out


def copy_fn(numel: int, dtype: torch.dtype, device: str, *, sets: int = 1
            ) -> Callable[[], object]:
    """A call of dst.copy_(src) over `numel` elements: the memory-bound yardstick.

    Reads numel and writes numel elements, the same bytes as a fused cross-entropy forward
    + backward (a device-to-device copy on CUDA).  `sets` > 1 rotates through that many
    source/destination pairs, as the benchmark rotates its inputs, so both see caches alike.
    """
    pairs = [(torch.randn(numel, device=device).to(dtype),
              torch.empty(numel, device=device, dtype=dtype)) for _ in range(sets)]
    state = {"i": 0}

    def step():
        src, dst = pairs[state["i"] % sets]
        state["i"] += 1
        dst.copy_(src)

    return step


def copy_ms(numel: int, dtype: torch.dtype, device: str, *, sets: int = 1, repeats: int = 20,
            warmup: int = 3, clock: str = "wall") -> float:
    """Median ms of copy_fn(numel, dtype, device, sets=sets)."""
    return bench_ms(copy_fn(numel, dtype, device, sets=sets), device=device, repeats=repeats,
                    warmup=warmup, clock=clock)


def rotation_sets(nbytes: int, *, target_bytes: int = 64 << 20, max_sets: int = 8) -> int:
    """How many input sets to rotate so one round exceeds the last-level cache (~64 MiB)."""
    return max(1, min(max_sets, math.ceil(target_bytes / max(nbytes, 1))))


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------
def results_path(device: str) -> Path:
    return RESULTS_DIR / f"{machine_key(device)}.csv"


def append_rows(rows: Iterable[dict], path: Path | str | None = None, *,
                device: str = "cpu") -> Path:
    """Append rows to `path` (default benchmarks/results/<machine-key>.csv); returns the path.

    Every key must be one of CSV_COLUMNS (ValueError names any other); missing ones are
    left empty.  The header is written when the file is new.
    """
    rows = list(rows)
    path = Path(path) if path is not None else results_path(device)
    for row in rows:
        unknown = set(row) - set(CSV_COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}; known: {CSV_COLUMNS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k, "")) for k in CSV_COLUMNS})
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A markdown table of `columns` (floats to 3 significant digits; missing -> "")."""
    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    line = lambda cells: "| " + " | ".join(s.ljust(w) for s, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(b) for b in body]
    return "\n".join(out)


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    print(format_table(rows, columns), flush=True)
