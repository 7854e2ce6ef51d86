"""The installed package, not the checkout: build the wheel, install it into a fresh virtual
environment, and run a one-cell demo from another directory (the presets ship as package
data; nothing may be read from the source tree)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd=None, env=None, timeout=1800):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, (f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def test_installed_wheel_runs_a_one_cell_demo_from_another_directory(tmp_path):
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", "2"),
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)   # the checkout must not be importable
    wheels = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
          "-w", wheels, ROOT], env=env)
    (wheel,) = wheels.glob("tempsoft-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    py = venv / "bin" / "python"
    # The torch this suite runs on (the extension in the wheel was compiled against it).
    _run([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"],
         env=env)
    _run([py, "-m", "pip", "install", "-q", wheel], env=env)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([py, "-c", "import tempsoft, tempsoft._C; print(tempsoft.__file__)"],
                 cwd=elsewhere, env=env)
    assert str(venv) in where and str(ROOT) not in where
    listing = _run([venv / "bin" / "tempsoft", "reproduce", "--list"], cwd=elsewhere, env=env)
    for name in ("demo", "cifar10-cpu", "cifar10", "paper"):
        assert f"\n{name} " in "\n" + listing, listing
    _run([venv / "bin" / "tempsoft", "reproduce", "--preset", "demo", "--out", "out",
          "--set", "grid.temperatures=[1.0]", "--set", "grid.seeds=[0]",
          "--set", "train.epochs=1", "--set", 'eval.evals=["clean"]'], cwd=elsewhere, env=env)
    run = elsewhere / "out" / "demo"
    rows = (run / "results.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("digits/small_cnn/standard/T=1/seed=0,")
    assert (run / "claims.md").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["preset_file"].startswith(str(venv))
