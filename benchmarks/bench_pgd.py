"""Benchmark: the fused PGD step, and full PGD-10 attacks, across providers.

Part 1, "step": one PGD step (ascent, projection onto the eps-ball, clamp) on a batch of
images. Providers: every tempsoft backend that runs on the device, called as the attacks
call it (per-sample eps/alpha tensors, no argument checks; the native kernels directly, the
others through the ``tempsoft::pgd_step_`` custom op); ``public``, the public
``tempsoft.pgd_step_`` with number eps/alpha (checks and custom op included); ``unfused``,
the same step as plain eager torch ops (torchattacks' composition for Linf); ``compiled``,
``torch.compile`` of that (with --compile).

    bytes moved = 4 * numel * itemsize     (x_adv, grad, x_nat read once; x_adv written once)

Reported: median ms, GB/s of that byte count, the fraction of a same-size copy's bandwidth
measured in the same run, and the speedup over ``unfused``.

Part 2, "attack": PGD-10 (Linf, eps 8/255, alpha 2/255, random start) on the same model,
images/s. Providers: ``tempsoft`` (tempsoft.attacks.PGD), ``torchattacks`` (its PGD, when
installed), ``plain`` (the textbook loop with F.cross_entropy, no checks). Speedup is over
torchattacks.

Providers are timed in interleaved rounds, each round starting at another provider (median
of the rounds' medians), so a load spike on a shared machine hits all of them alike. Rows go to benchmarks/results/<machine>.csv.

    python benchmarks/bench_pgd.py                              # CPU, both parts
    python benchmarks/bench_pgd.py --device cuda --compile      # GPU
    python benchmarks/bench_pgd.py --part step --shapes 256x3x32x32 --check
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))  # the checkout, when tempsoft is not installed
from _common import (  # noqa: E402
    append_rows, bench_ms, copy_ms, parse_shapes, print_table, rotation_sets, run_info,
    shape_str,
)

import tempsoft  # noqa: E402,F401
from tempsoft._dispatch import backends  # noqa: E402
from tempsoft.kernels import reference  # noqa: E402
from tempsoft.ops.pgd import NORMS, _pgd_step_checked_, pgd_step_  # noqa: E402

EPS, ALPHA = 8 / 255, 2 / 255
EPS_L2, ALPHA_L2 = 0.5, 0.125
STEP_TARGET_CPU = 3.0       # fused vs unfused torch, CPU
ATTACK_TARGET_CPU = 1.0     # tempsoft vs torchattacks PGD-10, CPU
ATTACK_TARGET_GPU = 1.3     # tempsoft vs torchattacks PGD-10, GPU


# --------------------------------------------------------------------------------------
# Part 1: the step
# --------------------------------------------------------------------------------------
def unfused_step(x_adv, grad, x_nat, eps, alpha, norm, lower=0.0, upper=1.0):
    """The step in plain eager torch ops, as attack libraries write it."""
    if norm == "linf":
        adv = x_adv + alpha * grad.sign()
        delta = torch.clamp(adv - x_nat, min=-eps, max=eps)
        return torch.clamp(x_nat + delta, min=lower, max=upper)
    shape = (-1,) + (1,) * (x_adv.dim() - 1)
    g_norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
    delta = x_adv + alpha * grad / g_norm - x_nat
    d_norm = delta.flatten(1).norm(dim=1).view(shape)
    delta = delta * torch.clamp(eps / d_norm.clamp_min(1e-12), max=1.0)
    return torch.clamp(x_nat + delta, min=lower, max=upper)


def measure(fn, args, device, repeats, warmup=3):
    return bench_ms(fn, device=device, repeats=repeats, warmup=warmup, clock=args.clock)


def _inputs(shape, device, n_sets, seed=0):
    g = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(n_sets):
        x_nat = torch.rand(shape, generator=g)
        x_adv = (x_nat + 0.01 * torch.randn(shape, generator=g)).clamp(0, 1)
        grad = torch.randn(shape, generator=g)
        sets.append(tuple(t.to(device) for t in (x_adv, grad, x_nat)))
    return sets


def _rotated(providers: dict, r: int):
    """The providers' (name, fn) pairs, starting at the r-th: no provider always goes first."""
    items = list(providers.items())
    k = r % len(items)
    return items[k:] + items[:k]


def _rotating(fn, sets):
    state = {"i": 0}

    def call():
        args = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn(*args)

    return call


def step_providers(norm, device, compile_unfused):
    """name -> fn(x_adv, grad, x_nat) for this device, plus notes on what could not run."""
    eps, alpha = (EPS, ALPHA) if norm == "linf" else (EPS_L2, ALPHA_L2)
    code = NORMS[norm]
    per_sample = {}

    def tensors(x):
        b = x.shape[0]
        key = (b, x.device)
        if key not in per_sample:
            per_sample[key] = (torch.full((b,), eps, device=x.device),
                               torch.full((b,), alpha, device=x.device))
        return per_sample[key]

    out, notes = {}, []
    names = ("cuda", "triton", "torch") if device == "cuda" else ("cpu", "torch")
    for name in names:
        ok, why = backends()[name]
        if not ok:
            notes.append(f"{name}: {why}")
            continue

        def fused(x_adv, grad, x_nat, _name=name):
            e, a = tensors(x_adv)
            _pgd_step_checked_(x_adv, grad, x_nat, e, a, code, 0.0, 1.0, None, _name)

        out[f"tempsoft-{name}"] = fused
    out["public"] = lambda x_adv, grad, x_nat: pgd_step_(x_adv, grad, x_nat, eps, alpha, norm)
    out["unfused"] = lambda x_adv, grad, x_nat: unfused_step(x_adv, grad, x_nat, eps, alpha, norm)
    if compile_unfused:
        compiled = torch.compile(unfused_step)
        out["compiled"] = lambda x_adv, grad, x_nat: compiled(x_adv, grad, x_nat, eps, alpha, norm)
    return out, notes


def check_step(shape, norm, device, providers):
    """Every tempsoft provider equals the reference exactly (fp32); unfused is close."""
    x_adv, grad, x_nat = _inputs(shape, device, 1, seed=1)[0]
    b = shape[0]
    eps, alpha = (EPS, ALPHA) if norm == "linf" else (EPS_L2, ALPHA_L2)
    want = reference.pgd_step(x_adv, grad, x_nat, torch.full((b,), eps, device=device),
                              torch.full((b,), alpha, device=device), NORMS[norm], 0.0, 1.0)
    for name, fn in providers.items():
        if name in ("unfused", "compiled"):
            got = fn(x_adv.clone(), grad, x_nat)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        else:
            got = x_adv.clone()
            fn(got, grad, x_nat)
            if not torch.equal(got, want):
                raise AssertionError(f"{name} differs from the reference ({norm}, {shape})")


def bench_step(args, device, info):
    rows = []
    for shape in args.shapes:
        numel = 1
        for d in shape:
            numel *= d
        nbytes = 4 * numel * 4  # x_adv, grad, x_nat read + x_adv written, fp32
        sets = _inputs(shape, device, rotation_sets(3 * numel * 4))
        copy = copy_ms(numel, torch.float32, device, sets=len(sets), repeats=args.repeats,
                       clock=args.clock)
        copy_gbs = 2 * numel * 4 / (copy * 1e-3) / 1e9  # copy_ reads and writes numel
        for norm in args.norms:
            providers, notes = step_providers(norm, device, args.compile)
            if args.check:
                check_step(shape, norm, device, providers)
            times = {name: [] for name in providers}
            for r in range(args.rounds):
                for name, fn in _rotated(providers, r):
                    times[name].append(measure(_rotating(fn, sets), args, device,
                                               args.repeats))
            base = statistics.median(times["unfused"])
            for name, ts in times.items():
                ms = statistics.median(ts)
                gbs = nbytes / (ms * 1e-3) / 1e9
                rows.append(dict(info, bench="pgd", mode=f"step-{norm}", shape=shape_str(shape),
                                 dtype="fp32", provider=name, ms=ms, speedup=base / ms,
                                 gb_per_s=gbs, copy_fraction=gbs / copy_gbs,
                                 note="; ".join(notes)))
    return rows


# --------------------------------------------------------------------------------------
# Part 2: the full attack
# --------------------------------------------------------------------------------------
def _model(name, device):
    from tempsoft.models import build_model

    torch.manual_seed(0)
    return build_model(name, 10).to(device).eval()


def plain_pgd(model, x, y, eps=EPS, alpha=ALPHA, steps=10, generator=None):
    """The textbook loop: no input checks, no mode handling, F.cross_entropy."""
    adv = (x + torch.empty_like(x).uniform_(-eps, eps, generator=generator)).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)
        with torch.no_grad():
            adv = adv + alpha * g.sign()
            adv = torch.clamp(x + torch.clamp(adv - x, -eps, eps), 0, 1)
    return adv.detach()


def attack_providers(model, device):
    from tempsoft.attacks import PGD

    gen = torch.Generator(device=device).manual_seed(0)
    out = {"tempsoft": PGD(model, eps=EPS, alpha=ALPHA, steps=10, generator=gen)}
    notes = []
    try:
        import torchattacks
    except ImportError:
        notes.append("torchattacks not installed")
    else:
        out["torchattacks"] = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=10,
                                               random_start=True)
    out["plain"] = lambda x, y: plain_pgd(model, x, y, generator=gen)
    return out, notes


def bench_attack(args, device, info):
    model = _model(args.model, device)
    b = args.attack_batch
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (b,), generator=g).to(device)
    providers, notes = attack_providers(model, device)
    times = {name: [] for name in providers}
    for r in range(args.rounds):
        for name, fn in _rotated(providers, r):
            times[name].append(measure(lambda: fn(x, y), args, device, args.attack_repeats,
                                       warmup=1))
    base_name = "torchattacks" if "torchattacks" in times else "plain"
    base = statistics.median(times[base_name])
    rows = []
    for name, ts in times.items():
        ms = statistics.median(ts)
        rows.append(dict(info, bench="pgd", mode="attack-pgd10", shape=f"{b}x3x32x32",
                         dtype="fp32", provider=name, ms=ms, speedup=base / ms,
                         note="; ".join([f"{b / (ms * 1e-3):.0f} images/s", f"model {args.model}",
                                         f"speedup vs {base_name}", *notes])))
    return rows


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"])
    p.add_argument("--part", default="all", choices=["all", "step", "attack"])
    p.add_argument("--shapes", default=None,
                   help="step shapes, e.g. 256x3x32x32,1024x3x32x32 (default per device)")
    p.add_argument("--norms", default="linf,l2")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(unfused)")
    p.add_argument("--check", action="store_true", help="check outputs before timing")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per provider")
    p.add_argument("--repeats", type=int, default=20, help="calls per round (step)")
    p.add_argument("--attack-batch", type=int, default=None,
                   help="images per attack call (default 128 CPU, 512 CUDA)")
    p.add_argument("--attack-repeats", type=int, default=2, help="calls per round (attack)")
    p.add_argument("--model", default="small_cnn", help="tempsoft.models name for the attack")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall clock (default), or this thread's CPU time (needs --threads 1 "
                        "and --device cpu; steady on a loaded machine)")
    p.add_argument("--no-save", action="store_true", help="do not append to the results CSV")
    args = p.parse_args(argv)
    if args.shapes is None:
        args.shapes = "1024x3x32x32,128x3x224x224" if args.device == "cuda" else \
            "256x3x32x32,1024x3x32x32"
    args.shapes = parse_shapes(args.shapes)
    args.norms = [n.strip() for n in args.norms.split(",") if n.strip()]
    for n in args.norms:
        if n not in NORMS:
            raise SystemExit(f"--norms: expected linf and/or l2, got {n!r}")
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        raise SystemExit("--clock cpu measures one thread: use it with --threads 1 --device cpu")
    if args.attack_batch is None:
        args.attack_batch = 512 if args.device == "cuda" else 128
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = run_info(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {info['machine']}, torch {info['torch']}, triton {info['triton']}, "
          f"threads {info['threads']}, clock {args.clock}, load {load:.1f}, {info['date']}",
          flush=True)
    rows = []
    if args.part in ("all", "step"):
        step_rows = bench_step(args, args.device, info)
        print_table(step_rows, ["mode", "shape", "provider", "ms", "gb_per_s", "copy_fraction",
                                "speedup"])
        rows += step_rows
    if args.part in ("all", "attack"):
        attack_rows = bench_attack(args, args.device, info)
        print_table(attack_rows, ["mode", "shape", "provider", "ms", "speedup", "note"])
        rows += attack_rows
    for r in rows:  # how each figure was taken travels with it into the CSV
        r["note"] = "; ".join(filter(None, [r.get("note", ""), f"clock {args.clock}",
                                            f"load {load:.1f}"]))
    summarize(rows, args.device)
    if not args.no_save:
        print(f"appended {len(rows)} rows to {append_rows(rows, device=args.device)}")
    return 0


def summarize(rows, device):
    """One line per target: measured ratio vs the target, in this run."""
    fused = "tempsoft-cuda" if device == "cuda" else "tempsoft-cpu"
    for r in rows:
        if r["mode"].startswith("step") and r["provider"] == fused and device == "cpu":
            ok = r["speedup"] >= STEP_TARGET_CPU
            print(f"target fused step >= {STEP_TARGET_CPU}x unfused ({r['mode']}, {r['shape']}): "
                  f"{r['speedup']:.2f}x {'MET' if ok else 'NOT MET'}")
        if r["mode"] == "attack-pgd10" and r["provider"] == "tempsoft" and \
                "vs torchattacks" in r["note"]:
            target = ATTACK_TARGET_GPU if device == "cuda" else ATTACK_TARGET_CPU
            ok = r["speedup"] >= target
            print(f"target PGD-10 >= {target}x torchattacks: {r['speedup']:.2f}x "
                  f"{'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    sys.exit(main())
