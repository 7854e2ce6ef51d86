"""Benchmark: what the cross-entropy op costs around its kernel, warm and with cold caches.

At a small shape the kernel is a few microseconds, so a forward + backward measures the code
around it: argument checks, dispatch, the autograd node. A training step rarely runs that
code warm: the model's layers, or a large loss's own kernel, stream through the caches in
between. So each timed forward and each timed backward here comes right after a copy_ of
``--stream`` MB (half read, half written; 0 for warm), and forward and backward are timed
apart (CPU, one thread, wall clock per call, median).

Providers: ``tempsoft`` (the public op: in eager mode on the CPU the common case is one C++
call with a C++ autograd node), ``tempsoft-general`` (the same call forced onto the general
Python path, which every other case takes), ``eager`` (``F.cross_entropy(x / T, y)``).

    python benchmarks/bench_overhead.py                       # 128x10, streams 0,4,16,32 MB
    python benchmarks/bench_overhead.py --shape 256x100 --stream 0,32 --calls 400
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # the checkout, when tempsoft is not installed
from _common import append_rows, load_average, parse_shapes, print_table, run_info  # noqa: E402

import tempsoft  # noqa: E402
from tempsoft.ops import cross_entropy as ce_mod  # noqa: E402

T = 2.0


def providers() -> dict:
    """name -> (loss function, context manager factory it runs under)."""
    def general():
        return mock.patch.object(ce_mod, "_cpu_common_case", lambda *args: False)

    return {
        "tempsoft": (lambda x, y: tempsoft.cross_entropy(x, y, T), None),
        "tempsoft-general": (lambda x, y: tempsoft.cross_entropy(x, y, T), general),
        "eager": (lambda x, y: F.cross_entropy(x / T, y), None),
    }


def time_provider(fn, x, y, stream_mb: float, calls: int) -> tuple[float, float]:
    """Median microseconds of one forward and of one backward, each after the stream."""
    numel = int(stream_mb * (1 << 20) / 8)  # half the bytes read, half written (fp32)
    src, dst = (torch.ones(numel), torch.empty(numel)) if numel else (None, None)
    fwd, bwd = [], []
    for i in range(calls + 5):
        x.grad = None
        if src is not None:
            dst.copy_(src)
        t0 = time.perf_counter()
        loss = fn(x, y)
        t1 = time.perf_counter()
        if src is not None:
            dst.copy_(src)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        if i >= 5:  # warm-up calls
            fwd.append((t1 - t0) * 1e6)
            bwd.append((t3 - t2) * 1e6)
    return statistics.median(fwd), statistics.median(bwd)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="128x10", help="NxC of the logits (fp32)")
    p.add_argument("--stream", default="0,4,16,32",
                   help="MB copied before each timed forward and backward, comma list")
    p.add_argument("--calls", type=int, default=200, help="timed calls per cell")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds per cell (median of the rounds' medians)")
    p.add_argument("--no-save", action="store_true", help="do not append to the results CSV")
    args = p.parse_args(argv)
    (shape,) = parse_shapes(args.shape)
    if len(shape) != 2:
        p.error(f"--shape must be NxC, got {args.shape!r}")
    streams = [float(s) for s in args.stream.split(",") if s.strip()]
    if any(not s >= 0 for s in streams):
        p.error("--stream sizes must be >= 0")
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_()
    y = torch.randint(0, shape[1], (shape[0],), generator=g)
    info = run_info("cpu")
    rows = []
    for mb in streams:
        times = {name: ([], []) for name in providers()}
        for r in range(args.rounds):
            items = list(providers().items())
            for name, (fn, context) in items[r % len(items):] + items[:r % len(items)]:
                with (context() if context else contextlib.nullcontext()):
                    f_us, b_us = time_provider(fn, x, y, mb, args.calls)
                times[name][0].append(f_us)
                times[name][1].append(b_us)
        for name, (f_list, b_list) in times.items():
            f_us, b_us = statistics.median(f_list), statistics.median(b_list)
            rows.append(dict(info, threads=1, bench="overhead", mode=f"after {mb:g} MB",
                             shape=args.shape, dtype="fp32", provider=name,
                             ms=(f_us + b_us) / 1e3, forward_us=f_us, backward_us=b_us,
                             note=f"forward {f_us:.1f} us, backward {b_us:.1f} us"))
    print(f"# {info['machine']}, torch {info['torch']}, {info['date']}, load "
          f"{load_average():.1f}; one thread; us = median per call")
    print_table(rows, ["mode", "shape", "provider", "forward_us", "backward_us"])
    if not args.no_save:
        path = append_rows([{k: v for k, v in row.items() if k not in ("forward_us",
                                                                       "backward_us")}
                            for row in rows])
        print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
