"""A run folder on disk: config.json (the settings a resumed run must keep), invocations.jsonl
(one line per invocation: machine, code version), and results.csv (one row per finished
cell, appended atomically by the driver alone)."""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

from tempsoft.study.presets import Preset, PresetError

CELL_COLUMNS = ["cell", "dataset", "model", "training", "T", "seed"]
TRAIN_COLUMNS = ["epochs", "optimizer", "lr", "lr_scaling", "effective_lr", "final_loss",
                 "final_train_acc_running", "train_seconds", "images_per_s",
                 "grad_logits_norm_ep1", "grad_features_norm_ep1", "wrong_class_entropy_ep1",
                 "wrong_class_entropy_norm_ep1", "grad_logits_norm", "grad_features_norm",
                 "wrong_class_entropy", "wrong_class_entropy_norm", "logit_std"]
AUDIT_COLUMNS = ["audit_worst_acc", "audit_masking", "audit_failed_checks", "audit_verdict",
                 "audit_robust", "audit_dead_gradients", "audit_checks", "audit_not_run",
                 "audit_autoattack_flags", "audit_seconds"]
HEALTH_COLUMNS = ["num_classes", "clean_acc", "train_acc", "train_loss_T", "ln_C", "loss_ratio",
                  "effective_classes", "top_class_share", "trained", "near_chance", "collapsed",
                  "healthy", "health", "per_class_acc", "pred_hist"]




# ======================================================================================
# The run directory
# ======================================================================================
def code_version() -> str:
    """``git describe --always --dirty`` of the source tree, or the package version."""
    import tempsoft

    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"git {out.stdout.strip()} (tempsoft {tempsoft.__version__})"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"tempsoft {tempsoft.__version__} (no git commit found)"


def machine_info() -> dict[str, Any]:
    """CPU model and cores, GPU, and the versions that change numbers."""
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def prepare_run_dir(run_dir: Path, preset: Preset) -> None:
    """Create the run folder with its config.json, or check that a resumed run keeps the
    settings it was started with."""
    config_path = run_dir / "config.json"
    if config_path.exists():
        saved = json.loads(config_path.read_text())
        old, new = saved.get("settings", {}), json.loads(json.dumps(preset.settings()))
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise PresetError(
                f"{run_dir} holds a run with different settings (sections {changed} changed); "
                "use another --run name, or delete that folder to start over")
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"preset": preset.name, "preset_file": preset.path, "settings": preset.settings(),
              "grid": preset.raw.get("grid", {}), "code_version": code_version(),
              "machine": machine_info(),
              "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    tmp = config_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2, default=str))
    tmp.replace(config_path)


def log_invocation(run_dir: Path, preset: Preset, todo: int, done: int,
                   executor: str = "local") -> None:
    """One line per invocation: a resumed run may continue on another machine or commit."""
    entry = {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "code_version": code_version(), "machine": machine_info(),
             "grid": preset.raw.get("grid", {}), "cells_to_run": todo, "cells_done": done,
             "executor": executor}
    with open(run_dir / "invocations.jsonl", "a") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")



# ======================================================================================
# results.csv
# ======================================================================================
def result_columns(preset: Preset) -> list[str]:
    """The fixed CSV header for this preset (metric columns follow its evaluations)."""
    from tempsoft.robustness.evaluate import metric_columns
    from tempsoft.study.grid import cells, train_config
    from tempsoft.train import SELECTION_COLUMNS

    evals = set(preset.eval["evals"])
    for ds in preset.datasets:
        evals |= set(preset.dataset_overrides.get(ds, {}).get("eval", {}).get("evals", []))
    cols = CELL_COLUMNS + TRAIN_COLUMNS + HEALTH_COLUMNS
    cols += metric_columns(evals, preset.datasets, preset.eval.get("corruptions"),
                           preset.eval.get("perturbations"))
    if "audit" in evals:
        cols += AUDIT_COLUMNS
    if any(train_config(preset, cell, None).val_examples for cell in cells(preset)):
        cols += SELECTION_COLUMNS
    return cols


def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a results.csv with numbers, booleans and lists parsed back."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [{k: _parse_cell(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _parse_cell(text: Optional[str]) -> Any:
    if text is None or text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    if text[0] in "[{":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return text


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def append_row(path: Path, columns: list[str], row: dict[str, Any]) -> None:
    """Add a row to results.csv atomically: the file is rewritten to a temporary file and
    renamed over the old one, so a kill leaves either the old or the new file, never half a
    row. Columns the file lacks (a resumed run whose code measures more) are added at the
    end, blank in the older rows."""
    lines: list[list[str]] = []
    if path.exists():
        with open(path, newline="") as fh:
            lines = list(csv.reader(fh))
    if lines:
        header = lines[0]
        extra = [c for c in columns if c not in header]
        if extra:
            lines = [header + extra] + [line + [""] * len(extra) for line in lines[1:]]
        columns = lines[0]
    lines = (lines or [columns]) + [format_row(columns, row)]
    write_rows(path, lines)


def write_rows(path: Path, lines: list[list[str]]) -> None:
    """Write CSV lines (header first) to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(lines)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def format_row(columns: list[str], row: dict[str, Any]) -> list[str]:
    return [_format_cell(row.get(c)) for c in columns]
