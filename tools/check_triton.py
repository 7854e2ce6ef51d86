#!/usr/bin/env python3
"""Compile every Triton kernel variant tempsoft launches, ahead of time, for sm_80 and sm_90.

The counterpart of tools/check_cuda.sh for the Triton kernels, on a machine without a GPU:
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs Triton's whole
pipeline, ptxas included, on the CPU. The variants are exactly those the launchers can pick
(``variants()``): the cross-entropy kernel for each logits dtype x target kind x block shape
of ``triton_ce.CE_CONFIGS``, and the PGD kernels for each norm x active mask x block of
``triton_pgd.PGD_BLOCKS``. Everything else (weights, label smoothing, grad mode, sizes) is a
runtime argument, so these are all the programs a GPU will be asked to run.

Integer arguments are compiled as i32, the type Triton gives the sizes a launch passes.

Usage: python tools/check_triton.py [--archs 80,90] [--jobs N] [--list]
Exit status 1 if any variant fails to compile. Runs with triton 3.2 (the oldest tempsoft
declares), 3.6 and 3.9.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import os
import sys
import tempfile
import time
from dataclasses import dataclass

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Variant:
    """One compiled program: a kernel, its argument types, constexprs and options."""

    kernel: str                 # "ce" | "pgd_linf" | "pgd_l2"
    signature: tuple            # ((argument name, Triton type), ...) of the runtime arguments
    constexprs: tuple           # ((name, value), ...)
    options: tuple              # ((name, value), ...) for triton.compile

    @property
    def name(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs)
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        x_type = dict(self.signature)["x_ptr"]
        return f"{self.kernel}[{x_type} {consts} {opts}]"


_TRITON_TYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


def _ce_variants(torch, triton_ce) -> list[Variant]:
    out = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        elem = "*" + _TRITON_TYPE[str(dtype).split(".")[-1]]
        acc = "*fp64" if dtype == torch.float64 else "*fp32"
        configs = sorted({fp64 if dtype == torch.float64 else fp32
                          for _, fp32, fp64 in triton_ce.CE_CONFIGS},
                         key=lambda c: (c.block_v, c.block_m))
        for prob in (False, True):
            signature = (
                ("x_ptr", elem), ("target_ptr", elem if prob else "*i64"), ("inv_t_ptr", acc),
                ("weight_ptr", acc), ("grad_scale_ptr", acc), ("loss_ptr", acc),
                ("lse_ptr", acc), ("grad_ptr", elem), ("zdot_ptr", acc), ("record_ptr", "*i64"),
                ("n_rows", "i32"), ("n_cls", "i32"), ("n_weight", "i32"),
                ("inv_t_stride", "i32"), ("grad_scale_stride", "i32"), ("ignore_index", "i32"),
                ("eps_hi", "fp32"), ("eps_lo", "fp32"), ("grad_mode", "i32"),
            )
            for cfg in configs:
                out.append(Variant(
                    "ce", signature,
                    (("PROB_TARGET", prob), ("BLOCK_M", cfg.block_m), ("BLOCK_V", cfg.block_v)),
                    (("num_warps", cfg.num_warps),)))
    return out


def _pgd_variants(triton_pgd) -> list[Variant]:
    out = []
    for kernel in ("pgd_linf", "pgd_l2"):
        for has_active in (False, True):
            signature = (
                ("x_ptr", "*fp32"), ("g_ptr", "*fp32"), ("x0_ptr", "*fp32"),
                ("eps_ptr", "*fp32"), ("alpha_ptr", "*fp32"),
                ("act_ptr", "*u8" if has_active else "*fp32"),
                ("n", "i32"), ("lower", "fp32"), ("upper", "fp32"),
            )
            for block in triton_pgd.PGD_BLOCKS:
                out.append(Variant(kernel, signature,
                                   (("HAS_ACTIVE", has_active), ("BLOCK", block)),
                                   (("enable_fp_fusion", False),)))
    return out


def variants() -> list[Variant]:
    """Every variant the launchers of tempsoft/kernels/triton_*.py can pick."""
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    import torch

    from tempsoft.kernels import triton_ce, triton_pgd

    return _ce_variants(torch, triton_ce) + _pgd_variants(triton_pgd)


def _kernel_fn(kernel: str):
    from tempsoft.kernels import triton_ce, triton_pgd

    return {"ce": triton_ce._ce_rows_kernel, "pgd_linf": triton_pgd._pgd_linf_kernel,
            "pgd_l2": triton_pgd._pgd_l2_kernel}[kernel]


def compile_variant(variant: Variant, arch: int) -> tuple[str, int, float, int, str]:
    """(name, arch, seconds, cubin bytes, error message or "")."""
    if _ROOT not in sys.path:
        sys.path.insert(0, _ROOT)
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    try:
        fn = _kernel_fn(variant.kernel)
        consts = dict(variant.constexprs)
        signature = {name: "constexpr" if name in consts else dict(variant.signature)[name]
                     for name in fn.arg_names}
        # Triton >= 3.3 calls the compile-time constants `constexprs`, 3.2 `constants`.
        keyword = ("constexprs" if "constexprs" in inspect.signature(ASTSource).parameters
                   else "constants")
        compiled = triton.compile(ASTSource(fn, signature, **{keyword: consts}),
                                  target=GPUTarget("cuda", arch, 32),
                                  options=dict(variant.options))
        size = len(compiled.asm["cubin"])
        return variant.name, arch, time.perf_counter() - start, size, ""
    except Exception as exc:  # noqa: BLE001 - report every failure, keep compiling the rest
        message = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return variant.name, arch, time.perf_counter() - start, 0, " | ".join(message[-3:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", default="80,90", help="compute capabilities (default 80,90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--list", action="store_true", help="list the variants and exit")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, silenced
    import triton

    todo = variants()
    if args.list:
        print("\n".join(v.name for v in todo))
        return 0
    archs = [int(a) for a in args.archs.split(",")]
    start = time.perf_counter()
    print(f"check_triton: triton {triton.__version__}, {len(todo)} variants x sm_"
          f"{{{','.join(map(str, archs))}}}, {args.jobs} job(s)", flush=True)
    failed = 0
    # A fresh cache: a variant counts as checked only if it was compiled by this run.
    with tempfile.TemporaryDirectory(prefix="tempsoft-triton-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            jobs = [pool.submit(compile_variant, v, arch) for v in todo for arch in archs]
            for job in concurrent.futures.as_completed(jobs):
                name, arch, seconds, size, error = job.result()
                if error:
                    failed += 1
                    print(f"  FAIL  sm_{arch}  {name}: {error}", flush=True)
                else:
                    print(f"  ok    sm_{arch}  {name}  {seconds:.1f}s  {size} B cubin",
                          flush=True)
    total = len(todo) * len(archs)
    print(f"check_triton: {total - failed} of {total} compiled in "
          f"{time.perf_counter() - start:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
