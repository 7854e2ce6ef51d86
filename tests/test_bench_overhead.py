"""benchmarks/bench_overhead.py runs end to end and times each provider's forward and
backward apart, warm and after a stream."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_overhead_prints_forward_and_backward_per_provider():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_overhead.py"), "--shape", "8x5",
         "--stream", "0,1", "--calls", "3", "--rounds", "2", "--no-save"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in done.stdout.splitlines()
            if line.startswith("| after")]
    assert sorted((r[0], r[2]) for r in rows) == sorted(
        (f"after {mb} MB", p) for mb in (0, 1)
        for p in ("tempsoft", "tempsoft-general", "eager")), done.stdout
    for row in rows:
        assert float(row[3]) > 0 and float(row[4]) > 0, row


def test_bench_overhead_refuses_a_bad_shape():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_overhead.py"), "--shape", "8x5x2"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert done.returncode == 2 and "NxC" in done.stderr
