"""What the Triton kernels share: the launch device guard, and whether the interpreter works.

Imports triton; import it only where Triton is known to be installed.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


def on_device(t: torch.Tensor):
    """Context that makes `t`'s CUDA device current (a no-op for CPU tensors).

    Triton launches on the current device and its current stream; without this, a tensor on
    cuda:1 would be handed to a kernel running on cuda:0 (an illegal address) or ordered on
    the wrong stream.
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@triton.jit
def _count_kernel(out_ptr, n, BLOCK: tl.constexpr):
    total = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        total += ((start + tl.arange(0, BLOCK)) < n).to(tl.int32)
    tl.store(out_ptr, tl.sum(total, axis=0))


def interpreter_problem() -> str:
    """Why the Triton interpreter cannot run tempsoft's kernels here, or "" when it can.

    Runs one tiny interpreted kernel with what every kernel relies on (a `range` over a
    runtime bound, block-shaped accumulators); call it only under TRITON_INTERPRET=1.
    The known failure: Triton 3.6's interpreter turns a runtime bound into a Python int with
    int() of a one-element array, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can
    be converted to Python scalars"; Triton 3.8 squeezes the array first). Compiled kernels
    are unaffected.
    """
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _count_kernel[(1,)](out, 5, BLOCK=4)
    except Exception as exc:  # noqa: BLE001 - whatever the interpreter raises
        import numpy

        return (f"the Triton {triton.__version__} interpreter cannot run the kernels with "
                f"NumPy {numpy.__version__} ({exc!r:.160})")
    if int(out) != 5:
        return f"the Triton {triton.__version__} interpreter counted {int(out)} of 5"
    return ""
