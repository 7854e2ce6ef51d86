"""One cell, start to finish, wherever it runs: train (resuming from the cell's last epoch
checkpoint), save the model, evaluate, and return the cell's results row.

Everything a cell writes goes under the run folder, named by the cell: checkpoints/<cell>/,
models/<cell>.pt, history/<cell>.csv (rewritten after every epoch), cells/<cell>.json, and
running/<cell>.json while it runs (host, pid, start time). A cell never writes results.csv:
the driver alone does. So a cell can run in this process, in a Ray worker or in a SLURM job,
as long as the run folder is on storage every worker reaches.

    >>> from tempsoft.study.cell import CellTask, run_cell
    >>> row = run_cell(CellTask(preset, cell, "results/demo"))
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from tempsoft.robustness.evaluate import EvalCache, evaluate
from tempsoft.study.grid import Cell, eval_settings, train_config
from tempsoft.study.presets import Preset
from tempsoft.study.store import _format_cell, read_results
from tempsoft.train import TrainConfig, distributed_info, save_model, train

HISTORY_COLUMNS = ["epoch", "loss", "train_acc", "lr", "seconds", "images_per_s",
                   "grad_logits_norm", "grad_features_norm", "wrong_class_entropy",
                   "wrong_class_entropy_norm", "logit_std", "val_acc", "val_pgd_acc"]


@dataclass(frozen=True)
class CellTask:
    """Everything a worker needs to run one cell (picklable).

    Attributes:
        preset: the validated preset.
        cell: the cell.
        run_dir: the run folder (shared storage when workers are other machines).
        device: force a device ("cpu", "cuda"), or None for the preset's.
        progress: tqdm bars while training (a terminal only).
        threads: torch intra-op threads for the cell (0: leave torch's setting): results are
            bitwise reproducible only at the same count, on any executor.
    """

    preset: Preset
    cell: Cell
    run_dir: str
    device: Optional[str] = None
    progress: bool = False
    threads: int = 0


# Each process loads a dataset once and reuses it (and its corruption cache) for every cell
# it runs: the local executor runs all cells in one process, a Ray worker several.
_DATA: dict[tuple, tuple] = {}


def _data(task: CellTask, config: TrainConfig):
    disk = task.preset.run["disk_cache"]
    cache_dir = Path(task.run_dir) / "cache" / task.cell.dataset if disk else None
    key = (task.cell.dataset, config.data_root, os.environ.get("TEMPSOFT_DATA_DIR"),
           str(cache_dir))
    if key not in _DATA:
        from tempsoft.data import load_dataset

        train_set = load_dataset(task.cell.dataset, root=config.data_root, split="train",
                                 download=config.download)
        test_set = load_dataset(task.cell.dataset, root=config.data_root, split="test",
                                download=config.download)
        _DATA[key] = (train_set, test_set, EvalCache(cache_dir))
    return _DATA[key]


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """A cell's per-epoch records as CSV, rewritten atomically (watch or plot it mid-run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HISTORY_COLUMNS)
        for record in history:
            writer.writerow([_format_cell(record.get(c)) for c in HISTORY_COLUMNS])
    os.replace(tmp, path)


def _epoch_line(cell: Cell, epochs: int, record: dict[str, Any]) -> str:
    return (f"[train] {cell.id} epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, "
            f"train acc {record['train_acc']:.3f}, lr {record['lr']:.4g}, "
            f"{record['images_per_s']:.0f} img/s, {record['seconds']:.1f}s")


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n (0: unchanged) for the block."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _running(run_dir: Path, cell: Cell, is_main: bool):
    """running/<cell>.json while the cell runs: which host and process has it."""
    path = run_dir / "running" / f"{cell.slug}.json"
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"cell": cell.id, "host": socket.gethostname(),
                                    "pid": os.getpid(), "started": datetime.datetime.now()
                                    .astimezone().isoformat(timespec="seconds")}))
    try:
        yield
    finally:
        if is_main:
            path.unlink(missing_ok=True)


def run_cell(task: CellTask, log: Optional[Callable[[str], None]] = print) -> dict[str, Any]:
    """Train and evaluate one cell; returns its results row ({} on a non-main torchrun rank).

    A cell interrupted anywhere (a killed worker, a preempted job) resumes from its last
    epoch checkpoint when it runs again, and ends with the same weights.
    """
    log = log or (lambda _msg: None)
    preset, cell, run_dir = task.preset, task.cell, Path(task.run_dir)
    dist_info = distributed_info()
    ckpt_dir = run_dir / "checkpoints" / cell.slug
    config = train_config(preset, cell, str(ckpt_dir), progress=task.progress,
                          device=task.device)
    history_path = run_dir / "history" / f"{cell.slug}.csv"
    seen: list[dict[str, Any]] = []

    def on_epoch_end(epoch: int, record: dict[str, Any]) -> None:
        if not dist_info.is_main:
            return
        if not seen and history_path.exists():   # a resumed cell: keep the earlier epochs
            seen.extend(r for r in read_results(history_path) if r["epoch"] < record["epoch"])
        seen.append(record)
        write_history(history_path, seen)
        log(_epoch_line(cell, config.epochs, record))

    with torch_threads(task.threads), _running(run_dir, cell, dist_info.is_main):
        train_set, test_set, cache = _data(task, config)
        result = train(config, train_set=train_set, on_epoch_end=on_epoch_end)
        if not dist_info.is_main:
            return {}
        write_history(history_path, result.history)  # complete, whatever a kill left behind
        save_model(run_dir / "models" / f"{cell.slug}.pt", result, train_set)
        evals, settings = eval_settings(preset, cell, device=task.device)
        model, selection = result.model, {}
        if result.best is not None:
            # The selected epoch is the cell's model; the last epoch's is reported beside it.
            save_model(run_dir / "models" / f"{cell.slug}-best.pt", result, train_set,
                       best=True)
            model = result.best_model()
            last = evaluate(result.model, test_set, [e for e in ("clean", "pgd_linf")
                                                     if e == "clean" or e in evals],
                            T=cell.T, train_T=cell.T, settings=settings, cache=cache)
            selection = {"best_epoch": result.best["epoch"],
                         "best_val_acc": result.best["val_acc"],
                         "best_val_pgd_acc": result.best["val_pgd_acc"],
                         "last_clean_acc": last["clean_acc"],
                         "last_pgd_linf_acc": last.get("pgd_linf_acc")}
        metrics = evaluate(model, test_set, evals, T=cell.T, train_T=cell.T,
                           train_set=train_set, settings=settings, cache=cache, log=log)
        metrics.update(selection)
    (run_dir / "cells").mkdir(parents=True, exist_ok=True)
    detail = {"cell": cell.id, "config": dataclasses.asdict(config), "history": result.history,
              "metrics": metrics}
    (run_dir / "cells" / f"{cell.slug}.json").write_text(json.dumps(detail, indent=1,
                                                                    default=str))
    return result_row(cell, config, result.history, metrics)


def result_row(cell: Cell, config: TrainConfig, history: list[dict], metrics: dict[str, Any]
         ) -> dict[str, Any]:
    first, last = history[0], history[-1]
    row: dict[str, Any] = {"cell": cell.id, "dataset": cell.dataset, "model": cell.model,
                           "training": cell.training, "T": cell.T, "seed": cell.seed,
                           "epochs": config.epochs, "optimizer": config.optimizer,
                           "lr": config.lr, "lr_scaling": config.lr_scaling,
                           "effective_lr": config.effective_lr_and_decay()[0],
                           "final_loss": last["loss"], "final_train_acc_running":
                           last["train_acc"],
                           "train_seconds": sum(h["seconds"] for h in history),
                           "images_per_s": sum(h["images_per_s"] for h in history) /
                           len(history)}
    for key in ("grad_logits_norm", "grad_features_norm", "wrong_class_entropy",
                "wrong_class_entropy_norm"):
        row[f"{key}_ep1"] = first[key]
    for key in ("grad_logits_norm", "grad_features_norm", "wrong_class_entropy",
                "wrong_class_entropy_norm", "logit_std"):
        row[key] = last[key]
    row.update(metrics)
    audit_robust = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("audit/")}
    if audit_robust:
        row["audit_robust"] = audit_robust
    return row

