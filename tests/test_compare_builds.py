"""benchmarks/compare_builds.py, the side-by-side timing of two builds of the CPU kernels,
runs end to end: on two copies of the build in use.  (Copies, as two builds are two files:
one file loaded under two module names runs its module initialisation twice over the same
statics, which crashes at exit with torch 2.6.)"""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tempsoft import _dispatch

ROOT = Path(__file__).resolve().parents[1]


def test_compare_builds_prints_a_row_per_case(tmp_path):
    level = _dispatch.cpu_level()
    if level is None:
        pytest.skip("no C++ CPU kernels built")
    built = importlib.util.find_spec(f"tempsoft._cpu_{level}").origin
    a, b = shutil.copy(built, tmp_path / "a.so"), shutil.copy(built, tmp_path / "b.so")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_builds.py"), f"a={a}",
         f"b={b}", "--level", level, "--cases", "8x10:1,16x3000:2,l2:4x75:1,linf:4x75:2", "--rounds", "2",
         "--calls", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")
            and "thread" in line]
    assert [r.split("|")[1].strip() for r in rows] == [
        "8x10, 1 thread", "16x3000, 2 threads", "pgd l2 4x75, 1 thread",
        "pgd linf 4x75, 2 threads"], done.stdout
    for row in rows:
        assert len(row.split("|")) == 7  # case, a, b, copy, b / a, and the two edges
        assert all(float(cell) > 0 for cell in row.split("|")[2:6]), row


def test_compare_builds_rejects_a_bad_label():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_builds.py"), "not an id=x.so"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 2 and "label=path" in done.stderr
