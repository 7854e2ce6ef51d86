"""Benchmark: temperature-scaled cross-entropy, forward + backward, across providers.

Providers: every tempsoft backend that runs on the device (``tempsoft.cross_entropy(x, y, T,
backend=...)``), ``F.cross_entropy(x / T, y)`` eager, ``torch.compile`` of that, and
liger-kernel's cross-entropy on ``x / T`` (CUDA only, when installed).  Each call is one
training step of the loss: a fresh leaf ``x`` (``x.grad`` cleared), loss, ``backward()``.
For the native backends, "tempsoft-<backend>-kernel" also times the bare row kernel
(``torch.ops.tempsoft_C.ce_rows``: per-row losses and the mean's gradient in one call, no
autograd or argument checks), which shows what the public op adds on top.

Reported per shape x dtype x provider: median ms, speedup vs eager, GB/s and the fraction
of a same-size copy's bandwidth measured in the same run.  Rows are appended to
benchmarks/results/<machine-key>.csv.

    python benchmarks/bench_ce.py --shapes 4096x1000,4096x32000 --dtype fp32 --check
    python benchmarks/bench_ce.py --device cuda --dtype fp32,bf16 --providers cuda,triton,eager
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DTYPE_NAMES, append_rows, bench_many, copy_fn, load_average, parse_dtypes, parse_shapes,
    print_table, rotation_sets, run_info, shape_str,
)

import tempsoft  # noqa: E402
from tempsoft._dispatch import native_ops  # noqa: E402
from tempsoft.kernels.reference import GRAD_FULL  # noqa: E402

# The public op's target on the CPU: at least this fraction of a same-size copy_'s bandwidth
# for V >= COPY_TARGET_MIN_V (fp32, forward + backward).
COPY_TARGET_CPU = 0.9
COPY_TARGET_MIN_V = 1000

# Tolerances of --check, against F.cross_entropy in float64: (loss rtol, grad atol/max|grad|).
CHECK_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-9, 1e-9),
    torch.float16: (1e-2, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}


# --------------------------------------------------------------------------------------
# Providers: name -> loss function (x, y, T) -> scalar loss
# --------------------------------------------------------------------------------------
def _eager(x, y, T):
    return F.cross_entropy(x / T, y)


def _tempsoft(backend):
    def fn(x, y, T):
        return tempsoft.cross_entropy(x, y, T, backend=backend)
    return fn


def _liger():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception as exc:  # noqa: BLE001 - not installed, or fails to import without CUDA
        return None, f"liger-kernel not importable ({type(exc).__name__})"
    loss = LigerCrossEntropyLoss()
    return (lambda x, y, T: loss(x / T, y)), ""


class KernelOnly:
    """The bare native row kernel: fn(x, y, T) -> (mean loss, gradient of the mean)."""

    def __init__(self):
        self.ops = native_ops()  # with the CPU kernels of this CPU's level registered

    def __call__(self, x, y, T):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv_t = torch.full((1,), 1.0 / T, dtype=acc, device=x.device)
        scale = torch.full((1,), 1.0 / x.shape[0], dtype=acc, device=x.device)
        rows, _, grad, _ = self.ops.ce_rows(x.detach(), y, inv_t, None, -100, 0.0, scale,
                                            GRAD_FULL, None)
        return rows.sum() / x.shape[0], grad


def providers_for(device: str) -> tuple[dict, dict]:
    """({name: fn} that can run on `device`, {name: why not} for the rest).

    fn(x, y, T) returns the loss to call backward() on, or for a KernelOnly provider the
    pair (loss, gradient).
    """
    runnable, skipped = {}, {}
    for name, ok in tempsoft.backends().items():
        label = f"tempsoft-{name}"
        if not ok:
            skipped[label] = ok.reason
        elif name == "cuda" and device != "cuda":
            skipped[label] = "needs CUDA tensors"
        elif name == "cpu" and device != "cpu":
            skipped[label] = "needs CPU tensors"
        elif name == "triton" and device != "cuda":
            skipped[label] = "only interpreted on the CPU (too slow to time)"
        else:
            runnable[label] = _tempsoft(name)
            if name in ("cpu", "cuda"):
                runnable[label + "-kernel"] = KernelOnly()
    runnable["eager"] = _eager
    runnable["compile"] = torch.compile(_eager, dynamic=False)
    if device == "cuda":
        fn, why = _liger()
        if fn is None:
            skipped["liger"] = why
        else:
            runnable["liger"] = fn
    else:
        skipped["liger"] = "CUDA only"
    return runnable, skipped


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------
def cache_mib() -> str:
    """The limit of the CPU kernel's gradient buffer cache, for the notes: "1024 MiB"."""
    info = tempsoft.cpu_cache_info()
    return f"{info['limit_bytes'] >> 20} MiB" if info else "none"


def make_inputs(shape, dtype, device, sets, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, v = shape
    out = []
    for _ in range(sets):
        x = (torch.randn(n, v, generator=g) * 2.0).to(device=device, dtype=dtype)
        y = torch.randint(0, v, (n,), generator=g).to(device)
        out.append((x, y))
    return out


def step_fn(fn, inputs, T):
    """One forward + backward per call, rotating through the input sets."""
    state = {"i": 0}

    def step():
        x, y = inputs[state["i"] % len(inputs)]
        state["i"] += 1
        if isinstance(fn, KernelOnly):
            fn(x, y, T)
            return
        fn(x, y, T).backward()
        # Drop the gradient at once, as an optimizer step with zero_grad(set_to_none=True)
        # would: kept until the set comes round again, it would hold memory that the next
        # call then has to get fresh from the kernel.
        x.grad = None

    return step


def loss_and_grad(fn, x, y, T):
    if isinstance(fn, KernelOnly):
        return fn(x, y, T)
    x = x.detach().requires_grad_()
    loss = fn(x, y, T)
    loss.backward()
    return loss, x.grad


def check(fn, x, y, T, dtype):
    """Loss and gradient of fn against F.cross_entropy in float64; returns an error or ""."""
    loss, grad = loss_and_grad(fn, x, y, T)
    x64 = x.detach().double().requires_grad_()
    ref = F.cross_entropy(x64 / T, y)
    ref.backward()
    rtol, gtol = CHECK_TOL[dtype]
    try:
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=rtol, atol=rtol)
        scale = float(x64.grad.abs().max())
        torch.testing.assert_close(grad.double(), x64.grad, rtol=gtol, atol=gtol * scale)
    except AssertionError as exc:
        return str(exc).splitlines()[0]
    return ""


def run(args) -> list[dict]:
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.threads and device == "cpu":
        torch.set_num_threads(args.threads)
    runnable, skipped = providers_for(device)
    if args.providers:
        wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in runnable and p not in skipped]
        if unknown:
            raise SystemExit(f"unknown providers {unknown}; known: "
                             f"{sorted(set(runnable) | set(skipped))}")
        runnable = {k: v for k, v in runnable.items() if k in wanted}
        skipped = {k: v for k, v in skipped.items() if k in wanted}
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")

    info = run_info(device)
    rows = []
    for shape in parse_shapes(args.shapes):
        if len(shape) != 2:
            raise SystemExit(f"shapes must be NxV, got {shape_str(shape)}")
        n, v = shape
        for dtype in parse_dtypes(args.dtype):
            elem = torch.empty((), dtype=dtype).element_size()
            # Fused forward + backward moves 2 * N * V * element_size bytes: the logits read
            # once and the gradient written once (targets and per-row outputs are noise).
            nbytes = 2 * n * v * elem
            sets = rotation_sets(n * v * elem) if device == "cpu" else 1
            inputs = make_inputs(shape, dtype, device, sets)
            for x, _ in inputs:
                x.requires_grad_(True)
            # at the start: the machine may be shared
            load = f"load {load_average():.1f}; clock {args.clock}"
            if device == "cpu":  # the gradient buffer cache decides whether memory is fresh
                load += f"; cpu cache {cache_mib()}"
            notes = {name: load for name in runnable}
            if args.check:
                for name, fn in runnable.items():
                    err = check(fn, *inputs[0], args.temperature, dtype)
                    if err:
                        print(f"CHECK FAILED {name} {shape_str(shape)} {DTYPE_NAMES[dtype]}: "
                              f"{err}")
                        notes[name] = f"check failed: {err}; {load}"
            fns = {name: step_fn(fn, inputs, args.temperature) for name, fn in runnable.items()}
            fns["copy_"] = copy_fn(n * v, dtype, device, sets=sets)
            times = bench_many(fns, device=device, repeats=args.repeats, warmup=args.warmup,
                               rounds=args.rounds, clock=args.clock)
            copy = times.pop("copy_")
            results = []
            for name, ms in times.items():
                if ms != ms:  # NaN: the provider raised
                    continue
                results.append(dict(info, bench="ce", mode="fwd+bwd", shape=shape_str(shape),
                                    dtype=DTYPE_NAMES[dtype], provider=name, ms=ms,
                                    gb_per_s=nbytes / ms / 1e6, copy_fraction=copy / ms,
                                    note=notes[name]))
            eager = next((r["ms"] for r in results if r["provider"] == "eager"), float("nan"))
            for r in results:
                r["speedup"] = eager / r["ms"]
            rows += results
            print_table(results, ["shape", "dtype", "provider", "ms", "speedup", "gb_per_s",
                                  "copy_fraction", "note"])
            print(f"(copy_ of the same bytes: {copy:.3g} ms = {nbytes / copy / 1e6:.3g} GB/s)")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="4096x1000,4096x32000", help="NxV list, e.g. 4096x1000")
    p.add_argument("--dtype", default="fp32", help="comma list of fp32,fp64,fp16,bf16")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--providers", default="",
                   help="comma list (default: all that run), e.g. tempsoft-cpu,eager,compile")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls before each block of timed ones (CPU)")
    p.add_argument("--rounds", type=int, default=3,
                   help="blocks per provider, interleaved across providers (CPU)")
    p.add_argument("--temperature", type=float, default=0.5, help="T")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall clock (default), or this thread's CPU time (with --threads 1 on "
                        "the CPU: steady on a loaded machine)")
    p.add_argument("--check", action="store_true",
                   help="verify loss and gradient against float64 F.cross_entropy first")
    p.add_argument("--out", default=None,
                   help="CSV to append to (default benchmarks/results/<machine-key>.csv)")
    p.add_argument("--no-save", action="store_true", help="print only; append no rows")
    args = p.parse_args(argv)
    try:
        parse_shapes(args.shapes), parse_dtypes(args.dtype)
    except ValueError as exc:
        p.error(str(exc))
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        p.error("--clock cpu measures one thread: use it with --threads 1 --device cpu")
    rows = run(args)
    summarize(rows, args.device)
    if rows and not args.no_save:
        path = append_rows(rows, args.out, device=args.device)
        print(f"appended {len(rows)} rows to {path}")
    failed = [r for r in rows if "check failed" in r["note"]]
    return 1 if failed else 0


def summarize(rows, device):
    """One line per target: the public op's fraction of copy_ bandwidth, in this run."""
    if device != "cpu":
        return
    for r in rows:
        v = int(r["shape"].split("x")[1])
        if r["provider"] == "tempsoft-cpu" and r["dtype"] == "fp32" and v >= COPY_TARGET_MIN_V:
            ok = r["copy_fraction"] >= COPY_TARGET_CPU
            print(f"target public op >= {COPY_TARGET_CPU} of copy_ bandwidth ({r['shape']}): "
                  f"{r['copy_fraction']:.2f} {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    raise SystemExit(main())
