"""GPU benchmarks for benchmarks/device_check.sh: cross-entropy forward+backward and the PGD
step, against a device-to-device copy measured in the same run.

Subcommands (each appends its rows to <out>/device_bench.json, so the summary can read them):

  ce       providers x shapes x dtypes: tempsoft cuda / triton, F.cross_entropy eager,
           torch.compile, liger-kernel (when installed). Time (median of timed repetitions
           after warm-up, CUDA events), GB/s, fraction of the copy bandwidth, peak extra
           memory of one forward+backward.
  plans    the CUDA kernel's launch plans (warp / shared memory / L2 re-read, clusters of
           1..8 blocks) forced through TEMPSOFT_CE_MODE / TEMPSOFT_CE_CLUSTER, to measure
           which the heuristic should pick.
  pgd      tempsoft pgd_step_ (cuda, triton) against the eager reference composition and the
           torchattacks-style eager step.
  summary  the table of results and the issue's targets, printed last.

Bytes counted (written out, as benchmarks/README rules ask):
  cross-entropy fwd+bwd, fused:  2 * N * V * elem  (the logits read once, the gradient
                                 written once; targets and per-row outputs are negligible)
  PGD step:                      4 * B * D * elem  (x_adv, grad, x_nat read; x_adv written)
  copy baseline:                 2 * bytes          (read + write)

Inputs are random (never zeros); each tensor is far larger than the 50 MB L2, and an input
the provider overwrites (liger writes its gradient into the logits, the PGD step updates
x_adv) is restored from a saved copy before every timed repetition, outside the timing.

Usage: python benchmarks/device_bench.py {ce,plans,pgd,summary} [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

SHAPES = [(4096, 32000), (8192, 128256), (16384, 262144)]
PGD_SHAPES = [(8192, 3, 32, 32), (512, 3, 224, 224)]
DEV = "cuda"  # --device cpu runs the same code paths on tiny shapes (a smoke test)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TARGET_SHAPE = (8192, 128256)  # the targets are stated for bf16 at this shape


@dataclass
class Row:
    """One measurement, as stored in device_bench.json."""

    bench: str
    provider: str
    shape: str
    dtype: str
    ms: Optional[float] = None
    gbps: Optional[float] = None
    copy_frac: Optional[float] = None
    peak_extra_mb: Optional[float] = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _free() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()


def time_ms(fn: Callable[[], object], reset: Optional[Callable[[], None]] = None,
            warmup: int = 3, reps: int = 15, budget_s: float = 6.0) -> float:
    """Median time of fn() in ms over `reps` repetitions (fewer if over budget_s).

    Each repetition is bracketed by CUDA events (a host clock after a sync on the CPU);
    `reset` runs before each one, untimed.
    """
    for _ in range(warmup):
        if reset is not None:
            reset()
        fn()
    _sync()
    times = []
    start_wall = time.perf_counter()
    for _ in range(reps):
        if reset is not None:
            reset()
        if DEV == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - start_wall > budget_s and len(times) >= 3:
            break
    return statistics.median(times)


def peak_extra_mb(fn: Callable[[], object]) -> Optional[float]:
    """Peak device memory above what was allocated before fn(), in MiB (None on the CPU)."""
    if DEV != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    del out
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_gbps(nbytes: int) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=DEV)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=20)
    del src, dst
    _free()
    return 2 * nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------
# Cross-entropy providers: each returns fn(x, y) -> dL/dx of the mean loss at T = 1
# --------------------------------------------------------------------------------------
def _tempsoft(backend: str):
    import tempsoft

    def run(x, y):
        loss = tempsoft.cross_entropy(x, y, 1.0, backend=backend)
        return torch.autograd.grad(loss, x)[0]

    return run


def _row_kernel(backend: str):
    """The bare row kernel (one launch: loss, lse and the gradient), without the public op's
    argument checks and reductions: the kernel's own bandwidth."""
    if backend == "cuda":
        kernel = torch.ops.tempsoft_C.ce_rows
    else:
        from tempsoft.kernels import triton_ce

        kernel = triton_ce.ce_rows

    def run(x, y):
        one = torch.ones(1, device=x.device)
        scale = torch.full((1,), 1.0 / x.shape[0], device=x.device)
        return kernel(x.detach(), y, one, None, -100, 0.0, scale, True, None)[2]

    return run


def _eager():
    def run(x, y):
        return torch.autograd.grad(F.cross_entropy(x, y), x)[0]

    return run


def _compiled():
    f = torch.compile(lambda x, y: F.cross_entropy(x, y))

    def run(x, y):
        return torch.autograd.grad(f(x, y), x)[0]

    return run


def _liger():
    from liger_kernel.transformers.functional import liger_cross_entropy

    def run(x, y):
        return torch.autograd.grad(liger_cross_entropy(x, y), x)[0]

    return run


PROVIDERS = {
    "tempsoft-cuda": (_tempsoft, ("cuda",), False),
    "tempsoft-triton": (_tempsoft, ("triton",), False),
    "kernel-cuda": (_row_kernel, ("cuda",), False),
    "kernel-triton": (_row_kernel, ("triton",), False),
    "torch-eager": (_eager, (), False),
    "torch-compile": (_compiled, (), False),
    "liger": (_liger, (), True),  # True: overwrites its input with the gradient
}


def _available(name: str) -> str:
    """'' if the provider can run here, else why not."""
    if name.startswith(("tempsoft-", "kernel-")):
        import tempsoft

        ok = tempsoft.backends()[name.split("-", 1)[1]]
        return "" if ok else f"unavailable: {ok!r}"
    if name == "liger":
        try:
            import liger_kernel  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any import failure means "skip"
            return f"liger-kernel not importable ({type(exc).__name__}: {exc})"
    return ""


def bench_ce(out_dir: str, quick: bool, shapes=None) -> list[Row]:
    shapes = shapes or (SHAPES[:2] if quick else SHAPES)
    biggest = max(n * v for n, v in shapes) * 4
    bw = copy_gbps(min(biggest, 4 << 30))
    rows = [Row("copy", "torch copy_", f"{min(biggest, 4 << 30) >> 20} MiB", "-",
                gbps=bw, copy_frac=1.0)]
    print(f"copy: {bw:.0f} GB/s (read + write)", flush=True)
    fns = {}
    for name, (make, args, _) in PROVIDERS.items():
        why = _available(name)
        if why:
            rows.append(Row("ce", name, "-", "-", note=why))
            print(f"skip {name}: {why}", flush=True)
            continue
        fns[name] = make(*args)
    for n, v in shapes:
        for dname, dtype in DTYPES.items():
            g = torch.Generator(device=DEV).manual_seed(n + v)
            x = (torch.randn(n, v, generator=g, device=DEV) * 2).to(dtype)
            y = torch.randint(0, v, (n,), generator=g, device=DEV)
            nbytes = 2 * n * v * x.element_size()  # logits read once + gradient written once
            for name, fn in fns.items():
                rows.append(_measure_ce(name, fn, x, y, nbytes, bw, dname,
                                        overwrites=PROVIDERS[name][2]))
                r = rows[-1]
                print(f"ce {name:16s} {n}x{v} {dname}: " + (
                    f"{r.ms:8.3f} ms {r.gbps:7.0f} GB/s {r.copy_frac:5.2f} of copy, "
                    f"peak extra {_mb(r.peak_extra_mb)} MiB" if r.ms is not None else r.note),
                    flush=True)
            inplace = _inplace_peak_mb(x, y) if "tempsoft-cuda" in fns else None
            if inplace is not None:
                rows.append(Row("ce-inplace", "tempsoft-cuda", f"{n}x{v}", dname,
                                peak_extra_mb=inplace))
                print(f"ce tempsoft-cuda inplace_backward peak extra {inplace:.0f} MiB",
                      flush=True)
            del x, y
            _free()
    return rows


def _mb(v: Optional[float]) -> str:
    return "     n/a" if v is None else f"{v:8.0f}"


def _measure_ce(name, fn, x, y, nbytes, bw, dname, overwrites) -> Row:
    shape = f"{x.shape[0]}x{x.shape[1]}"
    # A provider that overwrites its input gets a copy, restored before each repetition;
    # the others share x's storage (the largest fp32 case needs the memory).
    leaf = (x.detach().clone() if overwrites else x.detach()).requires_grad_()
    reset = (lambda: leaf.data.copy_(x)) if overwrites else None
    try:
        peak = peak_extra_mb(lambda: fn(leaf, y))
        ms = time_ms(lambda: fn(leaf, y), reset=reset)
    except torch.cuda.OutOfMemoryError:
        del leaf
        _free()
        return Row("ce", name, shape, dname, note="out of memory")
    except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
        del leaf
        _free()
        return Row("ce", name, shape, dname, note=f"failed: {type(exc).__name__}: {exc}"[:300])
    del leaf
    _free()
    gbps = nbytes / (ms * 1e-3) / 1e9
    return Row("ce", name, shape, dname, ms=ms, gbps=gbps, copy_frac=gbps / bw,
               peak_extra_mb=peak)


def _inplace_peak_mb(x, y) -> Optional[float]:
    import tempsoft

    leaf = x.detach().requires_grad_()
    h = leaf * 1.0  # a non-leaf whose storage the gradient may take over (x stays intact)

    def run():
        loss = tempsoft.cross_entropy(h, y, 1.0, backend="cuda", inplace_backward=True)
        return torch.autograd.grad(loss, h)[0]

    try:
        return peak_extra_mb(run)
    finally:
        del leaf, h
        _free()


# --------------------------------------------------------------------------------------
# CUDA launch plans
# --------------------------------------------------------------------------------------
PLANS = [("auto", 0), ("smem", 1), ("smem", 2), ("smem", 4), ("smem", 8), ("l2", 1),
         ("l2", 2), ("l2", 4), ("l2", 8)]


def bench_plans(out_dir: str, quick: bool, shapes=None) -> list[Row]:
    import tempsoft

    if DEV != "cuda" or not tempsoft.backends()["cuda"]:
        return [Row("plans", "tempsoft-cuda", "-", "-", note="CUDA backend unavailable")]
    ops = torch.ops.tempsoft_C
    cases = [((8192, 128256), "bf16"), ((4096, 32000), "fp32")]
    if shapes:
        cases = [(s, d) for s in shapes for d in DTYPES]
    elif not quick:
        cases += [((16384, 262144), "bf16"), ((16384, 262144), "fp32"), ((4096, 32000), "bf16")]
    bw = copy_gbps(2 << 30)
    rows = []
    for (n, v), dname in cases:
        dtype = DTYPES[dname]
        x = (torch.randn(n, v, device=DEV) * 2).to(dtype)
        y = torch.randint(0, v, (n,), device=DEV)
        one = torch.ones(1, device=DEV)
        scale = torch.full((1,), 1.0 / n, device=DEV)
        nbytes = 2 * n * v * x.element_size()
        for mode, cluster in PLANS:
            os.environ["TEMPSOFT_CE_MODE"] = mode
            os.environ["TEMPSOFT_CE_CLUSTER"] = str(cluster)
            try:
                ms = time_ms(lambda: ops.ce_rows(x, y, one, None, -100, 0.0, scale, True, None))
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append(Row("plans", f"{mode}-c{cluster}", f"{n}x{v}", dname, ms=ms,
                                gbps=gbps, copy_frac=gbps / bw))
                print(f"plan {mode:4s} cluster {cluster}: {n}x{v} {dname} {ms:8.3f} ms "
                      f"{gbps:6.0f} GB/s {gbps / bw:5.2f} of copy", flush=True)
            finally:
                os.environ.pop("TEMPSOFT_CE_MODE", None)
                os.environ.pop("TEMPSOFT_CE_CLUSTER", None)
        del x, y
        _free()
    return rows


# --------------------------------------------------------------------------------------
# PGD step
# --------------------------------------------------------------------------------------
def _torchattacks_step(x_adv, grad, x_nat, eps, alpha, norm):
    """The per-step update torchattacks' PGD / PGDL2 run, in eager PyTorch."""
    b = (-1,) + (1,) * (x_adv.dim() - 1)
    if norm == 0:
        adv = x_adv + alpha.view(b) * grad.sign()
        delta = torch.clamp(adv - x_nat, min=-eps.view(b), max=eps.view(b))
    else:
        gn = grad.flatten(1).norm(p=2, dim=1).view(b) + 1e-10
        adv = x_adv + alpha.view(b) * grad / gn
        delta = adv - x_nat
        dn = delta.flatten(1).norm(p=2, dim=1)
        delta = delta * torch.clamp(eps / dn, max=1.0).view(b)
    x_adv.copy_(torch.clamp(x_nat + delta, min=0, max=1))


def bench_pgd(out_dir: str, quick: bool, shapes=None) -> list[Row]:
    from tempsoft.kernels import reference
    from tempsoft.ops.pgd import pgd_step_

    import tempsoft

    shapes = shapes or PGD_SHAPES
    bw = copy_gbps(1 << 30)
    rows = []
    def triton_step(a, g, n, e, al, norm):
        from tempsoft.kernels import triton_pgd

        triton_pgd.pgd_step_(a, g, n, e, al, None, norm, 0.0, 1.0)

    # The kernels themselves (the public op adds argument checks that may read values back).
    providers = {
        "tempsoft-cuda": lambda a, g, n, e, al, norm: torch.ops.tempsoft_C.pgd_step_(
            a, g, n, e, al, None, norm, 0.0, 1.0),
        "tempsoft-triton": triton_step,
        "public-op-cuda": lambda a, g, n, e, al, norm: pgd_step_(
            a, g, n, e, al, "linf" if norm == 0 else "l2", backend="cuda"),
        "reference-eager": lambda a, g, n, e, al, norm: a.copy_(
            reference.pgd_step(a, g, n, e, al, norm, 0.0, 1.0, None)),
        "torchattacks-eager": _torchattacks_step,
    }
    avail = tempsoft.backends()
    for shape in shapes:
        b = shape[0]
        x_nat = torch.rand(shape, device=DEV)
        x0 = (x_nat + 0.03 * torch.randn(shape, device=DEV)).clamp(0, 1)
        grad = torch.randn(shape, device=DEV)
        x_adv = x0.clone()
        eps = torch.full((b,), 8 / 255, device=DEV)
        alpha = torch.full((b,), 2 / 255, device=DEV)
        nbytes = 4 * x_adv.numel() * 4  # x_adv, grad, x_nat read + x_adv written, fp32
        for norm in (0, 2):
            for name, fn in providers.items():
                backend = name.rsplit("-", 1)[1] if name.endswith(("-cuda", "-triton")) else None
                label = "x".join(map(str, shape))
                nname = "linf" if norm == 0 else "l2"
                if backend is not None and not avail[backend]:
                    rows.append(Row(f"pgd-{nname}", name, label, "fp32",
                                    note=f"unavailable: {avail[backend]!r}"))
                    continue
                ms = time_ms(lambda: fn(x_adv, grad, x_nat, eps, alpha, norm),
                             reset=lambda: x_adv.copy_(x0))
                gbps = nbytes / (ms * 1e-3) / 1e9
                rows.append(Row(f"pgd-{nname}", name, label, "fp32", ms=ms, gbps=gbps,
                                copy_frac=gbps / bw))
                print(f"pgd {nname:4s} {name:18s} {label}: {ms:7.3f} ms {gbps:6.0f} GB/s "
                      f"{gbps / bw:5.2f} of copy", flush=True)
        del x_nat, x0, grad, x_adv
        _free()
    return rows


# --------------------------------------------------------------------------------------
# Results file and summary
# --------------------------------------------------------------------------------------
def _results_path(out_dir: str) -> str:
    return os.path.join(out_dir, "device_bench.json")


def _load(out_dir: str) -> dict:
    path = _results_path(out_dir)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    return {"machine": {}, "rows": []}


def _save(out_dir: str, data: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(_results_path(out_dir), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)


def _machine() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"gpu": platform.processor() or "cpu", "sms": None, "memory_gib": None}
    if DEV == "cuda":
        p = torch.cuda.get_device_properties(0)
        info = {"gpu": p.name, "sms": p.multi_processor_count,
                "memory_gib": round(p.total_memory / 2**30, 1)}
    return {
        **info,
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _find(rows, bench, provider, shape, dtype):
    for r in rows:
        if (r["bench"], r["provider"], r["shape"], r["dtype"]) == (bench, provider, shape, dtype):
            return r
    return None


def summary(out_dir: str) -> int:
    data = _load(out_dir)
    rows = data["rows"]
    m = data["machine"]
    if not rows:
        print("\n=== device check summary: no benchmark results (no benchmark step ran)")
        return 0
    print(f"\n=== device check summary: {m.get('gpu')} ({m.get('sms')} SMs), torch "
          f"{m.get('torch')}, CUDA {m.get('cuda')}, triton {m.get('triton')}, {m.get('date')}")
    copy = [r for r in rows if r["bench"] == "copy"]
    if copy:
        print(f"device-to-device copy: {copy[0]['gbps']:.0f} GB/s (read + write)")
    ce = [r for r in rows if r["bench"] == "ce" and r["shape"] != "-"]
    if ce:
        print(f"\n{'cross-entropy fwd+bwd':24s} {'shape':>14s} {'dtype':>5s} {'ms':>9s} "
              f"{'GB/s':>7s} {'copy':>5s} {'extra MiB':>9s}")
        for r in ce:
            if r["ms"] is None:
                print(f"{r['provider']:24s} {r['shape']:>14s} {r['dtype']:>5s}  {r['note']}")
            else:
                print(f"{r['provider']:24s} {r['shape']:>14s} {r['dtype']:>5s} {r['ms']:9.3f} "
                      f"{r['gbps']:7.0f} {r['copy_frac']:5.2f} {_mb(r['peak_extra_mb']):>9s}")
    for r in rows:
        if r["bench"] == "ce" and r["shape"] == "-":
            print(f"{r['provider']}: {r['note']}")
    plans = [r for r in rows if r["bench"] == "plans" and r["ms"] is not None]
    if plans:
        print(f"\n{'CUDA plan':24s} {'shape':>14s} {'dtype':>5s} {'ms':>9s} {'GB/s':>7s} {'copy':>5s}")
        for r in plans:
            print(f"{r['provider']:24s} {r['shape']:>14s} {r['dtype']:>5s} {r['ms']:9.3f} "
                  f"{r['gbps']:7.0f} {r['copy_frac']:5.2f}")
    pgd = [r for r in rows if r["bench"].startswith("pgd")]
    if pgd:
        print(f"\n{'PGD step':24s} {'shape':>14s} {'norm':>5s} {'ms':>9s} {'GB/s':>7s} {'copy':>5s}")
        for r in pgd:
            norm = r["bench"].split("-", 1)[1]
            if r["ms"] is None:
                print(f"{r['provider']:24s} {r['shape']:>14s} {norm:>5s}  {r['note']}")
            else:
                print(f"{r['provider']:24s} {r['shape']:>14s} {norm:>5s} {r['ms']:9.3f} "
                      f"{r['gbps']:7.0f} {r['copy_frac']:5.2f}")
    _print_targets(rows)
    return 0


def _print_targets(rows) -> None:
    """The issue's targets (bf16, 8192 x 128256, forward+backward; PGD), PASS / FAIL / n/a."""
    shape = "x".join(map(str, TARGET_SHAPE))
    get = lambda p: _find(rows, "ce", p, shape, "bf16")  # noqa: E731
    cuda, triton_, liger, eager, comp, kcuda, ktriton = (get(p) for p in (
        "tempsoft-cuda", "tempsoft-triton", "liger", "torch-eager", "torch-compile",
        "kernel-cuda", "kernel-triton"))
    inplace = _find(rows, "ce-inplace", "tempsoft-cuda", shape, "bf16")
    n, v = TARGET_SHAPE
    grad_mib = n * v * 2 / 2**20
    checks = []

    def ok(r):
        return r is not None and r.get("ms") is not None

    def add(name, cond, detail):
        checks.append((name, "n/a" if cond is None else ("PASS" if cond else "FAIL"), detail))

    add(">= 0.90 of copy bandwidth (public op)",
        cuda["copy_frac"] >= 0.90 if ok(cuda) else None,
        f"{cuda['copy_frac']:.2f}" if ok(cuda) else "no measurement")
    add(">= 0.90 of copy bandwidth (kernel alone)",
        kcuda["copy_frac"] >= 0.90 if ok(kcuda) else None,
        f"{kcuda['copy_frac']:.2f}" if ok(kcuda) else "no measurement")
    for label, peer, need in (("liger", liger, 1.3), ("eager", eager, 4.0),
                              ("torch.compile", comp, 2.0)):
        if ok(cuda) and ok(peer):
            sp = peer["ms"] / cuda["ms"]
            add(f">= {need}x {label}", sp >= need, f"{sp:.2f}x")
        else:
            add(f">= {need}x {label}", None, "no measurement")
    if ok(cuda) and cuda["peak_extra_mb"] is not None:
        add("extra memory <= one gradient buffer", cuda["peak_extra_mb"] <= grad_mib * 1.02 + 64,
            f"{cuda['peak_extra_mb']:.0f} MiB vs {grad_mib:.0f} MiB gradient")
    else:
        add("extra memory <= one gradient buffer", None, "no measurement")
    if inplace is not None:
        add("inplace_backward: no gradient buffer", inplace["peak_extra_mb"] <= 64,
            f"{inplace['peak_extra_mb']:.0f} MiB")
    for label, t, c in (("public op", triton_, cuda), ("kernel", ktriton, kcuda)):
        if ok(c) and ok(t):
            add(f"triton within 15% of cuda ({label})", t["ms"] <= 1.15 * c["ms"],
                f"{t['ms'] / c['ms']:.2f}x the CUDA time")
        else:
            add(f"triton within 15% of cuda ({label})", None, "no measurement")
    pgd = [r for r in rows if r["bench"].startswith("pgd") and r["provider"] == "tempsoft-cuda"
           and r.get("ms") is not None]
    for r in pgd:
        add(f"PGD {r['bench'][4:]} {r['shape']} >= 0.90 of copy", r["copy_frac"] >= 0.90,
            f"{r['copy_frac']:.2f}")
    print(f"\ntargets (bf16 {shape} unless named):")
    for name, verdict, detail in checks:
        print(f"  {verdict:4s}  {name:44s} {detail}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="GPU benchmarks of the device check (cross-entropy, launch plans, PGD).")
    ap.add_argument("what", choices=["ce", "plans", "pgd", "summary"])
    ap.add_argument("--out", default=os.environ.get("OUT") or "device_out")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: exercise the code paths on tiny --shapes (no meaningful numbers)")
    ap.add_argument("--shapes", default=None,
                    help="override the shapes: NxV,... (ce, plans) or BxCxHxW,... (pgd)")
    args = ap.parse_args(argv)
    if args.what == "summary":
        return summary(args.out)
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("device_bench.py: no CUDA device", file=sys.stderr)
        return 2
    shapes = None
    if args.shapes:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    torch.manual_seed(0)
    run = {"ce": bench_ce, "plans": bench_plans, "pgd": bench_pgd}[args.what]
    rows = run(args.out, args.quick, shapes)
    data = _load(args.out)
    data["machine"] = _machine()
    data["rows"] = [r for r in data["rows"] if r["bench"] not in {x.bench for x in rows}]
    data["rows"] += [asdict(r) for r in rows]
    _save(args.out, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
