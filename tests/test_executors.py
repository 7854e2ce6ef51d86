"""Executors: the same digits grid here (local), as Ray tasks on two local workers, and as a
job array through submitit's local executor gives exactly the same results; a worker killed in
the middle of a cell loses nothing; runs from several machines merge into one; --dry-run
projects the cost."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from tempsoft.study import load_preset, merge_runs, project, read_results, reproduce
from tempsoft.study.presets import PresetError

GRID = ["grid.temperatures=[0.5, 5.0]", "grid.seeds=[0]", "train.epochs=2",
        "train.max_batches=6", 'eval.evals=["clean", "ece", "pgd_linf"]', "eval.pgd_steps=3",
        "eval.pgd_examples=48"]
# Wall-clock columns differ between any two runs; everything else must be equal.
TIMING = {"train_seconds", "images_per_s", "audit_seconds"}


def _rows(run_dir: Path) -> dict[str, dict]:
    return {r["cell"]: {k: v for k, v in r.items() if k not in TIMING}
            for r in read_results(run_dir / "results.csv")}


def _weights(run_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted((run_dir / "models").glob("*.pt")):
        out[path.name] = torch.load(path, weights_only=True)["model"]
    return out


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k])
        for k in a)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    summary = reproduce("demo", out_dir=out, overrides=GRID, progress=False, log=None)
    return summary.run_dir


# --------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_executor_gives_exactly_the_local_results(local_run, ray_session, tmp_path):
    summary = reproduce("demo", out_dir=tmp_path, overrides=GRID, progress=False, log=None,
                        executor="ray")
    assert summary.cells_run == 2
    assert _rows(summary.run_dir) == _rows(local_run)
    assert _same_weights(_weights(summary.run_dir), _weights(local_run))
    for name in ("results.md", "claims.md"):
        assert (summary.run_dir / name).is_file()
    invocation = json.loads((summary.run_dir / "invocations.jsonl").read_text().splitlines()[-1])
    assert invocation["executor"] == "ray"
    assert not list((summary.run_dir / "running").glob("*.json"))


def _kill_mid_cell(run_dir: Path, slug: str, stop: threading.Event, killed: list) -> None:
    """Wait until the cell has an epoch checkpoint and a worker pid, then SIGKILL it."""
    running = run_dir / "running" / f"{slug}.json"
    checkpoint = run_dir / "checkpoints" / slug / "checkpoint.pt"
    while not stop.is_set():
        if running.exists() and checkpoint.exists():
            try:
                pid = json.loads(running.read_text())["pid"]
            except (json.JSONDecodeError, KeyError):
                continue
            if pid != os.getpid():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.01)


LONG_CELL = ["grid.temperatures=[2.0]", "grid.seeds=[0]", "train.epochs=30",
             'eval.evals=["clean"]']


@pytest.fixture(scope="module")
def long_cell_local(tmp_path_factory):
    out = tmp_path_factory.mktemp("long-local")
    return reproduce("demo", out_dir=out, overrides=LONG_CELL, progress=False,
                     log=None).run_dir


def _run_and_kill(tmp_path, executor, options):
    slug = "digits__small_cnn__standard__T2__seed0"
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_mid_cell, args=(tmp_path / "demo", slug, stop,
                                                           killed))
    killer.start()
    try:
        summary = reproduce("demo", out_dir=tmp_path, overrides=LONG_CELL, progress=False,
                            log=None, executor=executor, executor_options=options)
    finally:
        stop.set()
        killer.join()
    history = read_results(summary.run_dir / "history" / f"{slug}.csv")
    return summary, killed, history


def test_a_killed_ray_worker_loses_nothing(long_cell_local, ray_session, tmp_path):
    summary, killed, history = _run_and_kill(tmp_path, "ray", {"max_retries": 2})
    assert killed, "the worker finished before it could be killed"
    assert [h["epoch"] for h in history] == list(range(1, 31))
    assert _rows(summary.run_dir) == _rows(long_cell_local)
    assert _same_weights(_weights(summary.run_dir), _weights(long_cell_local))


# --------------------------------------------------------------------------------------
# SLURM through submitit (its local executor here)
# --------------------------------------------------------------------------------------
def test_submitit_local_executor_gives_the_local_results(local_run, tmp_path):
    pytest.importorskip("submitit")
    summary = reproduce("demo", out_dir=tmp_path, overrides=GRID, progress=False, log=None,
                        executor="slurm", executor_options={"cluster": "local",
                                                            "poll_seconds": 0.2,
                                                            "cells_per_job": 1})
    assert summary.cells_run == 2
    assert _rows(summary.run_dir) == _rows(local_run)
    assert list((summary.run_dir / "slurm").iterdir())   # submitit's job folders


def test_a_killed_slurm_job_is_resubmitted_and_resumes(long_cell_local, tmp_path):
    pytest.importorskip("submitit")
    summary, killed, history = _run_and_kill(
        tmp_path, "slurm", {"cluster": "local", "poll_seconds": 0.2, "max_retries": 2})
    assert killed, "the job finished before it could be killed"
    assert [h["epoch"] for h in history] == list(range(1, 31))
    assert _rows(summary.run_dir) == _rows(long_cell_local)


def test_executor_errors_name_the_problem():
    from tempsoft.study import make_executor

    with pytest.raises(ValueError, match="executor must be one of"):
        make_executor("dask")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['address'\]"):
        make_executor("slurm", address="auto")


# --------------------------------------------------------------------------------------
# Merging runs from several machines
# --------------------------------------------------------------------------------------
def _part(out: Path, seed: int) -> Path:
    overrides = [o for o in GRID if not o.startswith("grid.seeds")] + [f"grid.seeds=[{seed}]"]
    return reproduce("demo", out_dir=out, overrides=overrides, progress=False,
                     log=None).run_dir


def test_merge_runs_from_two_machines(tmp_path, local_run):
    other = _part(tmp_path / "b", 1)
    merged = merge_runs([local_run, other], tmp_path / "merged")
    rows = read_results(merged / "results.csv")
    assert sorted((r["T"], r["seed"]) for r in rows) == [(0.5, 0), (0.5, 1), (5.0, 0),
                                                         (5.0, 1)]
    assert (merged / "results.md").is_file() and (merged / "claims.md").is_file()
    config = json.loads((merged / "config.json").read_text())
    assert config["grid"]["seeds"] == [0, 1] and len(config["merged_from"]) == 2
    assert len(list((merged / "cells").glob("*.json"))) == 4


def test_merge_refuses_different_studies_and_disagreeing_cells(tmp_path, local_run):
    other = reproduce("demo", out_dir=tmp_path / "b", overrides=GRID + ["train.lr=0.01"],
                      progress=False, log=None).run_dir
    with pytest.raises(PresetError, match=r"different studies.*\['train'\]"):
        merge_runs([local_run, other], tmp_path / "m1")
    twin = tmp_path / "twin"
    import shutil

    shutil.copytree(local_run, twin)
    detail = next((twin / "cells").glob("*.json"))
    data = json.loads(detail.read_text())
    data["config"]["momentum"] = 0.5
    detail.write_text(json.dumps(data))
    with pytest.raises(PresetError, match=r"different training configs \(\['momentum'\]\)"):
        merge_runs([local_run, twin], tmp_path / "m2")
    with pytest.raises(ValueError, match="not empty"):
        merge_runs([local_run], local_run)


# --------------------------------------------------------------------------------------
# --dry-run: cells and the cost projection
# --------------------------------------------------------------------------------------
def test_cost_projection_from_the_costs_table(tmp_path):
    preset_file = tmp_path / "p.toml"
    preset_file.write_text("""
name = "p"
[grid]
datasets = ["cifar10"]
models = ["cifar_cnn"]
temperatures = [1.0, 10.0]
seeds = [0, 1]
training = ["standard", "adversarial"]
[train]
epochs = 4
[adversarial]
steps = 5
[eval]
evals = ["clean"]
[costs]
device = "a test machine"
basis = "measured"
train_images_per_s = { cifar_cnn = 1000.0 }
eval_seconds = { cifar_cnn = 100.0 }
""")
    projection = project(load_preset(preset_file))
    per_epoch = {line[0]: line[2] for line in projection.lines}
    assert per_epoch["cifar10 / cifar_cnn / standard"] == pytest.approx(50.0)
    assert per_epoch["cifar10 / cifar_cnn / adversarial"] == pytest.approx(300.0)
    # 4 cells x (4 x 50 + 100) + 4 cells x (4 x 300 + 100)
    assert projection.seconds == pytest.approx(4 * 300 + 4 * 1300)
    text = str(projection)
    assert "a test machine (measured)" in text and "total: 107 min" in text
    bad = preset_file.read_text().replace('basis = "measured"', 'basis = "guessed"')
    preset_file.write_text(bad)
    with pytest.raises(ValueError, match="costs.basis must be one of"):
        load_preset(preset_file)


def test_every_shipped_preset_projects_its_cost():
    from tempsoft.study import available_presets

    for name in available_presets():
        projection = project(load_preset(name))
        assert projection.lines and not projection.missing, name
