"""Benchmark: the CPU row kernel of two or more builds of the extension, side by side.

For kernel work: build a variant, copy its ``tempsoft/_cpu_<level>*.so`` somewhere, and
time it against another build in one process, so that both see the same machine state.
Each build is loaded as its own module (the module name must end in ``_cpu_<level>``, the
name its init function was compiled with); its ``ce_rows`` is called directly (fp32, index
targets, forward and gradient, T = 0.5).  Builds are timed in interleaved rounds.  Each
build must be a file of its own: one file loaded twice runs its module initialisation twice
over the same statics.

Cases are ``NxV:threads`` for ``ce_rows`` and ``linf:BxN:threads`` or ``l2:BxN:threads``
for ``pgd_step_`` (B images of N fp32 values each, per-sample eps and alpha, in the
attacks' settings: Linf 8/255 and 2/255, L2 0.5 and 0.125).  With one thread the clock is the thread's CPU time (steady on
a shared machine) and the inputs fit in cache; with more, wall time, the inputs rotate
through enough sets to exceed the last-level cache, and the gradient goes to preallocated
buffers (``grad_out``), so that page faults of fresh memory stay out of the comparison.
"copy" is ``dst.copy_(src)`` of the same bytes under the same conditions.

    cp tempsoft/_cpu_avx512*.so /tmp/before.so      # then change csrc/cpu, rebuild
    python benchmarks/compare_builds.py before=/tmp/before.so \\
        after=tempsoft/_cpu_avx512.cpython-311-x86_64-linux-gnu.so
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
from _common import bench_many, copy_fn, load_average, rotation_sets, run_info  # noqa: E402

GRAD_FULL = 1  # tempsoft.kernels.reference.GRAD_FULL (not imported: see load_build)
DEFAULT_CASES = "4096x10:1,512x1000:1,2048x64:1,64x32000:1,4096x1000:2,4096x4096:2"
PGD_NORMS = {"linf": (0, 8 / 255, 2 / 255), "l2": (2, 0.5, 0.125)}  # code, eps, alpha


def load_build(label: str, path: str, level: str):
    """The module in `path` under a name of its own.  (tempsoft itself is not imported:
    its own copy of the module would make the loader hand back that one.)"""
    spec = importlib.util.spec_from_file_location(f"{label}._cpu_{level}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_case(text: str) -> tuple[str, int, int, int]:
    """'NxV:threads' -> ('ce', N, V, threads); 'l2:BxN:threads' -> ('l2', B, N, threads)."""
    kernel = "ce"
    head, sep, rest = text.partition(":")
    if head.lower() in PGD_NORMS:
        kernel, text = head.lower(), rest
    shape, _, threads = text.partition(":")
    n, v = shape.lower().split("x")
    return kernel, int(n), int(v), int(threads or 1)


def time_builds(builds: dict, run, inputs: list, numel: int, threads: int, rounds: int,
                calls: int) -> dict:
    """Median ms per call of run(module, *inputs[i]) for each build, the calls rotating
    through the input sets, and of a copy_ of `numel` fp32 values through as many sets."""
    def step(module):
        state = {"i": 0}

        def call():
            run(module, *inputs[state["i"] % len(inputs)])
            state["i"] += 1

        return call

    fns = {label: step(module) for label, module in builds.items()}
    fns["copy"] = copy_fn(numel, torch.float32, "cpu", sets=len(inputs))
    return bench_many(fns, repeats=rounds * calls, warmup=2, rounds=rounds,
                      clock="cpu" if threads == 1 else "wall")


def time_case(builds: dict, n: int, v: int, threads: int, rounds: int, calls: int) -> dict:
    """Median ms per call of each build's ce_rows and of a copy_ of the same bytes."""
    torch.set_num_threads(threads)
    sets = 1 if threads == 1 else rotation_sets(2 * n * v * 4)
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(n, v, generator=gen) * 2, torch.empty(n, v)) for _ in range(sets)]
    y = torch.randint(0, v, (n,), generator=gen)
    inv_t, scale = torch.full((1,), 2.0), torch.full((1,), 1.0 / n)

    def run(module, x, grad):
        module.ce_rows(x, y, inv_t, None, -100, 0.0, scale, GRAD_FULL, grad)

    return time_builds(builds, run, pairs, n * v, threads, rounds, calls)


def time_pgd_case(builds: dict, norm: str, b: int, n: int, threads: int, rounds: int,
                  calls: int) -> dict:
    """Median ms per call of each build's pgd_step_ and of a copy_ of one image batch.

    Every call steps its set's x_adv in place, continuing from that set's previous step:
    after a few steps the points sit on the ball's surface, where an attack's steps are
    too (the step costs the same inside and on the ball: both take all three passes).
    """
    torch.set_num_threads(threads)
    sets = 1 if threads == 1 else rotation_sets(3 * b * n * 4)
    code, eps, alpha = PGD_NORMS[norm]
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(sets):
        x_nat = torch.rand(b, n, generator=gen)
        x_adv = (x_nat + 0.01 * torch.randn(b, n, generator=gen)).clamp(0, 1)
        data.append((x_adv, torch.randn(b, n, generator=gen), x_nat))
    e, a = torch.full((b,), eps), torch.full((b,), alpha)

    def run(module, x_adv, grad, x_nat):
        module.pgd_step_(x_adv, grad, x_nat, e, a, None, code, 0.0, 1.0)

    return time_builds(builds, run, data, b * n, threads, rounds, calls)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("builds", nargs="+", help="label=path/to/_cpu_<level>.so, two or more")
    p.add_argument("--level", default="avx512", help="the level the builds were compiled for")
    p.add_argument("--cases", default=DEFAULT_CASES, help="NxV:threads list")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=10, help="timed calls per block")
    args = p.parse_args(argv)
    builds = {}
    for item in args.builds:
        label, sep, path = item.partition("=")
        if not sep or not label.isidentifier():
            p.error(f"expected label=path with a Python identifier as label, got {item!r}")
        builds[label] = load_build(label, path, args.level)
    info = run_info("cpu")
    print(f"# {info['machine']}, torch {info['torch']}, {info['date']}, load "
          f"{load_average():.1f}; fp32; ce_rows: forward + gradient, T = 0.5; ms = median")
    header = ["case"] + [f"{b} ms" for b in builds] + ["copy ms"] + [
        f"{b} / {list(builds)[0]}" for b in list(builds)[1:]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for case in args.cases.split(","):
        kernel, n, v, threads = parse_case(case)
        if kernel == "ce":
            ms = time_case(builds, n, v, threads, args.rounds, args.calls)
        else:
            ms = time_pgd_case(builds, kernel, n, v, threads, args.rounds, args.calls)
        first = ms[list(builds)[0]]
        name = f"{n}x{v}" if kernel == "ce" else f"pgd {kernel} {n}x{v}"
        cells = [f"{name}, {threads} thread{'s' if threads > 1 else ''}"]
        cells += [f"{ms[b]:.3g}" for b in builds] + [f"{ms['copy']:.3g}"]
        cells += [f"{ms[b] / first:.2f}" for b in list(builds)[1:]]
        print("| " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
