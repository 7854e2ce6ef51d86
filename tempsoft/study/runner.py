"""The driver of a study: preset -> cells -> executor -> results.csv -> report.

    >>> from tempsoft.study import reproduce
    >>> summary = reproduce("demo")                          # here, one cell after another
    >>> summary = reproduce("demo", executor="ray")          # as Ray tasks
    >>> summary.run_dir                                       # results/demo

Each finished cell's row is added to results/<run>/results.csv at once, atomically, by this
driver alone, so a killed study loses at most the cells in flight, and those resume from their
last epoch checkpoints. A rerun skips the cells already in results.csv; a rerun with
different settings (other than the grid) is refused, naming the settings that changed.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from tempsoft.study.cell import CellTask, torch_threads
from tempsoft.study.executors import make_executor
from tempsoft.study.grid import Cell, cells
from tempsoft.study.presets import Preset, load_preset
from tempsoft.study.report import write_report
from tempsoft.study.store import (append_row, log_invocation, prepare_run_dir, read_results,
                                  result_columns)


@dataclass
class RunSummary:
    """What ``reproduce`` did."""

    run_dir: Path
    cells_total: int
    cells_run: int
    cells_skipped: int
    seconds: float
    files: list[Path]


def reproduce(preset: str | os.PathLike | Preset, *, out_dir: str | os.PathLike = "results",
              run_name: Optional[str] = None, overrides: Iterable[str] = (),
              progress: bool = True, device: Optional[str] = None,
              log: Optional[Callable[[str], None]] = print, executor: str = "local",
              executor_options: Optional[dict[str, Any]] = None) -> RunSummary:
    """Run every unfinished cell of a preset and write results.csv, results.md, claims.md and
    the plots.

    Args:
        preset: a preset name, a .toml path, or a loaded Preset.
        out_dir: parent of the run folder.
        run_name: the run folder's name (default: the preset's name).
        overrides: "section.key=value" strings applied to the preset (ignored for a Preset).
        progress: tqdm bars while training (local executor only).
        device: force a device for training and evaluation ("cpu", "cuda").
        log: where one-line progress messages go (None: nowhere).
        executor: "local" (default), "ray" or "slurm"; see tempsoft.study.executors.
        executor_options: the executor's options (address, cpus_per_cell, ...).

    Returns:
        RunSummary with the run folder and what was run or skipped.

    Example:
        >>> reproduce("demo", overrides=["grid.temperatures=[0.5, 2]"], run_name="quick")
    """
    from tempsoft.train import distributed_info

    started = time.perf_counter()
    log = log or (lambda _msg: None)
    if not isinstance(preset, Preset):
        preset = load_preset(preset, overrides)
    runner = make_executor(executor, **(executor_options or {}))
    dist_info = distributed_info()
    if dist_info.active and executor != "local":
        raise ValueError("under torchrun the cells run one after another (--executor local); "
                         "Ray and SLURM spread whole cells over workers instead")
    run_dir = Path(out_dir) / (run_name or preset.name)
    if dist_info.is_main:
        prepare_run_dir(run_dir, preset)
    csv_path = run_dir / "results.csv"
    columns = result_columns(preset)
    done = {row["cell"] for row in read_results(csv_path)}
    grid = cells(preset)
    todo = [c for c in grid if c.id not in done]
    if dist_info.is_main:
        log_invocation(run_dir, preset, len(todo), len(grid) - len(todo), executor)
    log(f"[tempsoft] {preset.name}: {len(grid)} cells, {len(grid) - len(todo)} already done, "
        f"{len(todo)} to run ({executor}) -> {run_dir}")
    tasks = [CellTask(preset, cell, str(run_dir), device, progress and executor == "local",
                      preset.run["threads"]) for cell in todo]
    clock = time.perf_counter()
    with torch_threads(preset.run["threads"]):
        for i, (task, row) in enumerate(runner.run(tasks, log), 1):
            if not dist_info.is_main:
                continue
            append_row(csv_path, columns, row)
            _finish_cell(preset, task.cell, run_dir)
            log(f"[tempsoft] {i}/{len(todo)} {task.cell.id}: clean {row['clean_acc']:.3f}"
                f"{_headline(row)} ({time.perf_counter() - clock:.1f}s since start)"
                f"{'' if row['healthy'] else '  [' + row['health'] + ']'}")
    files: list[Path] = []
    if dist_info.is_main:
        files = write_report(run_dir)
    return RunSummary(run_dir=run_dir, cells_total=len(grid), cells_run=len(todo),
                      cells_skipped=len(grid) - len(todo),
                      seconds=time.perf_counter() - started, files=files)


def _headline(row: dict) -> str:
    parts = []
    for key, label in (("corruption_acc", "corruption"), ("pgd_linf_acc", "pgd-linf"),
                       ("pgd_l2_acc", "pgd-l2"), ("audit_worst_acc", "audit worst")):
        if row.get(key) is not None:
            parts.append(f", {label} {row[key]:.3f}")
    return "".join(parts)


def _finish_cell(preset: Preset, cell: Cell, run_dir: Path) -> None:
    """The model is saved and the row is written: the epoch checkpoint is no longer needed."""
    if not preset.run["keep_checkpoints"]:
        shutil.rmtree(run_dir / "checkpoints" / cell.slug, ignore_errors=True)


__all__ = ["RunSummary", "reproduce"]
