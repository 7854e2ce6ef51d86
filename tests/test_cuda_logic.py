"""Host-side decisions of the CUDA kernels, tested with the host C++ compiler alone (no GPU,
no CUDA toolkit): csrc/cuda/arch.h is plain C++ for this reason. The GPU side of the same
decisions runs in tests/test_gpu.py.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CXX = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


def _run_cpp(tmp_path, body: str) -> str:
    src = tmp_path / "probe.cpp"
    src.write_text('#include <cstdio>\n#include "arch.h"\n'
                   "using tempsoft::cuda::detail::cluster_launch_allowed;\n"
                   f"int main() {{\n{body}\nreturn 0;\n}}\n")
    exe = tmp_path / "probe"
    subprocess.run([CXX, "-std=c++17", "-I", str(ROOT / "csrc" / "cuda"), str(src), "-o",
                    str(exe)], check=True, capture_output=True, text=True)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler")
@pytest.mark.parametrize("cc_major,ptx,binary,allowed", [
    (9, 90, 90, True),     # built for sm_90 (TORCH_CUDA_ARCH_LIST="9.0"), on an H100/H200
    (10, 90, 100, True),   # compute_90 PTX JIT-compiled on a newer GPU: barriers compiled in
    (9, 80, 90, False),    # "8.0+PTX" JIT-compiled on an H100: no cluster barriers in the code
    (9, 80, 80, False),
    (8, 80, 80, False),    # an A100
    (8, 90, 90, False),    # (not a real combination) never on a pre-sm_90 device
])
def test_clusters_only_for_code_compiled_with_cluster_barriers(tmp_path, cc_major, ptx, binary,
                                                               allowed):
    out = _run_cpp(tmp_path, f'std::printf("%d", cluster_launch_allowed({cc_major}, {ptx}, '
                             f'{binary}) ? 1 : 0);')
    assert out == ("1" if allowed else "0")
