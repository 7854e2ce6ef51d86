"""The C++ CPU kernels are built once per SIMD level and one level is chosen at run time.

Covered: every level built here that this CPU runs gives the reference's results (and, up
to summation order, each other's); the rule that picks a level (the best one the CPU runs;
TEMPSOFT_CPU_CAPABILITY may force a lower one, never one the CPU cannot run); the modules
that must load on any x86-64 CPU hold no instruction of a higher level (objdump); and a
fresh process loads exactly the level it was told to.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tempsoft import _dispatch
from tempsoft.kernels import reference


# Levels this machine can load: importing a level the CPU lacks could raise SIGILL.
LEVELS = _dispatch.loadable_cpu_levels()
needs_levels = pytest.mark.skipif(not LEVELS, reason="no C++ CPU kernel level is built")


# --------------------------------------------------------------------------------------
# Same results at every level
# --------------------------------------------------------------------------------------
# Level-to-level tolerance for the fp32 / fp64 sums (different vector widths add in
# different orders); the reference tolerances are those of tests/test_native_cpu.py.
LEVEL_RTOL = {torch.float32: 2e-6, torch.float64: 1e-13, torch.bfloat16: 2e-6}
REF_TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1.6e-2}


@needs_levels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("target", ["index", "prob"])
def test_every_level_computes_the_same_cross_entropy(dtype, target):
    # 2085 columns: a full 2048-column block and a tail that is no multiple of 8 or 16 lanes.
    g = torch.Generator().manual_seed(31)
    acc = reference.acc_dtype(dtype)
    x = (torch.randn(9, 2085, generator=g, dtype=torch.float64) * 3).to(dtype)
    if target == "prob":
        tgt = torch.softmax(torch.randn(9, 2085, generator=g, dtype=torch.float64), 1).to(dtype)
    else:
        tgt = torch.randint(0, 2085, (9,), generator=g)
        tgt[::4] = -100
    inv_t = (torch.rand(9, generator=g, dtype=torch.float64) + 0.3).to(acc)
    w = (torch.rand(2085, generator=g, dtype=torch.float64) + 0.5).to(acc)
    gs = torch.full((1,), 1 / 9, dtype=acc)
    outs = {level: _dispatch.cpu_level_module(level).ce_rows(x, tgt, inv_t, w, -100, 0.1, gs, 1, None)
            for level in LEVELS}
    want = reference.ce_rows(x.double(), tgt.double() if tgt.is_floating_point() else tgt,
                             inv_t.double(), w.double(), -100, 0.1, gs.double(), 1)
    first = outs[LEVELS[0]]
    for level, out in outs.items():
        for name, a, b, c in zip(("loss", "lse", "grad", "zdot"), out, want, first):
            tol = REF_TOL[dtype] if name == "grad" else REF_TOL[torch.float64 if dtype ==
                                                                torch.float64 else torch.float32]
            scale = max(1.0, float(b.abs().max()))
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * scale,
                                       msg=lambda m: f"{level} vs reference, {name}: {m}")
            rtol = LEVEL_RTOL[dtype] if name != "grad" or dtype != torch.bfloat16 else 1e-2
            torch.testing.assert_close(a.double(), c.double(), rtol=rtol, atol=rtol * scale,
                                       msg=lambda m: f"{level} vs {LEVELS[0]}, {name}: {m}")


@needs_levels
@pytest.mark.parametrize("norm", [0, 2], ids=["linf", "l2"])
@pytest.mark.parametrize("shape", [(33, 3, 8, 8), (7, 75)], ids=["33x3x8x8", "7x75"])
def test_every_level_computes_the_same_pgd_step(norm, shape):
    """fp32 PGD steps equal the reference exactly at every level (the contract)."""
    g = torch.Generator().manual_seed(32)
    x_nat = torch.rand(shape, generator=g)
    x_adv = (x_nat + 0.3 * torch.randn(shape, generator=g)).clamp(0, 1)
    grad = torch.randn(shape, generator=g)
    grad.view(shape[0], -1)[:, ::5] = 0.0
    b = shape[0]
    eps = 0.05 + 0.3 * torch.rand(b, generator=g)
    alpha = 0.01 + 0.1 * torch.rand(b, generator=g)
    active = torch.rand(b, generator=g) > 0.2
    want = reference.pgd_step(x_adv, grad, x_nat, eps, alpha, norm, 0.0, 1.0, active)
    for level in LEVELS:
        got = x_adv.clone()
        _dispatch.cpu_level_module(level).pgd_step_(got, grad, x_nat, eps, alpha, active, norm, 0.0, 1.0)
        assert torch.equal(got, want), f"{level}: {int((got != want).sum())} elements differ"


# --------------------------------------------------------------------------------------
# The choice of a level
# --------------------------------------------------------------------------------------
ALL = {"default", "avx2", "avx512"}


@pytest.mark.parametrize("built,supported,forced,want", [
    (ALL, ALL, None, "avx512"),                       # the best one
    (ALL, {"default", "avx2"}, None, "avx2"),         # an AVX2 machine never loads avx512
    ({"default", "avx512"}, {"default", "avx2"}, None, "default"),
    (ALL, {"default"}, None, "default"),
    (ALL, ALL, "avx2", "avx2"),                       # forced down
    (ALL, ALL, "default", "default"),
])
def test_choice_of_a_level(built, supported, forced, want):
    assert _dispatch.choose_cpu_level(built, supported, forced) == (want, "")


@pytest.mark.parametrize("built,supported,forced,why", [
    (ALL, {"default", "avx2"}, "avx512", "this CPU runs only avx2, default"),
    ({"default"}, ALL, "avx2", "not built"),
    (ALL, ALL, "sse9", "must be one of"),
    ({"avx512"}, {"default", "avx2"}, None, "no CPU kernel level this CPU can run"),
    (set(), ALL, None, "built: none"),
])
def test_no_level_that_cannot_run_is_ever_chosen(built, supported, forced, why):
    level, reason = _dispatch.choose_cpu_level(built, supported, forced)
    assert level is None and why in reason


def test_the_cpu_features_bound_what_aten_claims(monkeypatch):
    """ATEN_CPU_CAPABILITY=avx512 makes ATen claim AVX-512 on any CPU; the CPU's own flags
    (where /proc/cpuinfo gives them) still keep a level it lacks from loading."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(_dispatch, "_cpu_flags", lambda: {"sse2", "avx", "avx2", "fma", "f16c"})
    assert _dispatch._cpu_supported_levels() == {"default", "avx2"}
    monkeypatch.setattr(_dispatch, "_cpu_flags", set)  # flags unknown: trust ATen
    assert _dispatch._cpu_supported_levels() == {"default", "avx2", "avx512"}


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


@needs_levels
@pytest.mark.parametrize("forced", ["default", "avx2"])
def test_a_forced_level_is_the_only_one_a_process_loads(forced):
    if forced not in LEVELS:
        pytest.skip(f"{forced} is not built or not runnable here")
    code = (
        "import torch, tempsoft\n"
        "from tempsoft import _dispatch\n"
        "x = torch.randn(3, 5, requires_grad=True)\n"
        "tempsoft.cross_entropy(x, torch.tensor([0, 1, 4]), 2.0, backend='cpu').backward()\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(_dispatch.cpu_level(), sorted({l for l in _dispatch.CPU_LEVELS "
        "if f'_cpu_{l}.' in maps}))\n"
    )
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    out = _run(code, TEMPSOFT_CPU_CAPABILITY=forced)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [forced, f"['{forced}']"]


def test_an_impossible_forced_level_makes_the_cpu_backend_unavailable():
    out = _run("import tempsoft; print(repr(tempsoft.backends()['cpu']))",
               TEMPSOFT_CPU_CAPABILITY="sse9")
    assert out.returncode == 0, out.stderr
    assert "False (TEMPSOFT_CPU_CAPABILITY must be one of" in out.stdout


# --------------------------------------------------------------------------------------
# What each module may contain
# --------------------------------------------------------------------------------------
# VEX-encoded instructions (AVX, AVX2, FMA: mnemonics starting with "v") need at least avx2;
# zmm registers and opmask registers %k1-%k7 mean AVX-512.
AVX_INSN = re.compile(r"\tv[a-z]")
AVX512_INSN = re.compile(r"zmm|%k[1-7]")


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
@pytest.mark.parametrize("module,forbidden", [
    ("_C", (AVX_INSN, AVX512_INSN)),
    ("_cpu_default", (AVX_INSN, AVX512_INSN)),
    ("_cpu_avx2", (AVX512_INSN,)),
], ids=["_C", "_cpu_default", "_cpu_avx2"])
def test_modules_below_a_level_hold_none_of_its_instructions(module, forbidden):
    """What loads on an older x86-64 CPU must not contain an instruction it lacks (the
    SIGILL of a binary built on an AVX-512 machine)."""
    spec = importlib.util.find_spec(f"tempsoft.{module}")
    if spec is None or spec.origin is None:
        pytest.skip(f"tempsoft.{module} is not built")
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 instruction sets")
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", spec.origin],
                          capture_output=True, text=True, check=True).stdout
    for pattern in forbidden:
        hits = [line for line in text.splitlines() if pattern.search(line)]
        assert not hits, f"{module}: {len(hits)} instructions like {hits[0].strip()!r}"
