"""A run's reports, all rewritten from results.csv: results.md (a table per metric: models x
temperatures, mean ± std over seeds, with marks for untrained, collapsed and gradient-masked
cells), claims.md (each claim of the paper and its verdict) and the PNG plots; and merging
runs made on different machines into one.

    >>> from tempsoft.study.report import write_report, merge_runs
    >>> write_report("results/demo")
    >>> merge_runs(["host-a/run", "host-b/run"], "results/merged")
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from tempsoft.study.claims import write_claims
from tempsoft.study.plots import plot_run
from tempsoft.study.presets import PresetError
from tempsoft.study.store import format_row, read_results, write_rows


def write_report(run_dir: str | os.PathLike) -> list[Path]:
    """(Re)write results.md, claims.md and the PNG plots from results.csv; returns the files
    written."""
    run_dir = Path(run_dir)
    rows = read_results(run_dir / "results.csv")
    if not rows:
        return []
    config = json.loads((run_dir / "config.json").read_text()) \
        if (run_dir / "config.json").exists() else {}
    md = write_markdown(run_dir / "results.md", rows, config)
    claims = write_claims(run_dir / "claims.md", rows, config)
    return [md, claims] + plot_run(rows, run_dir)


# ======================================================================================
# results.md
# ======================================================================================
# (column, title, scale); accuracies and rates are shown in percent.
METRIC_TABLES = [
    ("clean_acc", "Clean test accuracy (%)", 100),
    ("ece", "Expected calibration error (%, 15 bins, softmax at the training T)", 100),
    ("ece_T1", "Expected calibration error (%, 15 bins, raw logits: T = 1, as deployed)", 100),
    ("corruption_acc", "Corruption accuracy (%, the dataset's -C benchmark generated, mean "
     "over corruptions x severities)", 100),
    ("released_c_acc", "Released -C benchmark accuracy (%, mean over corruptions x "
     "severities)", 100),
    ("flip_prob", "Flip probability (%, the dataset's -P benchmark generated; lower is more "
     "stable)", 100),
    ("released_flip_prob", "Flip probability on the released -P benchmark (%)", 100),
    ("cifar101_acc", "CIFAR-10.1 v6 accuracy (%)", 100),
    ("pgd_linf_acc", "PGD-Linf accuracy (%)", 100),
    ("pgd_l2_acc", "PGD-L2 accuracy (%)", 100),
    ("audit_worst_acc", "Gradient-masking audit: accuracy under all its attacks at once "
     "(%, per image)", 100),
    ("last_clean_acc", "Last epoch's model (the rows above: the best validation epoch's): "
     "clean accuracy (%)", 100),
    ("last_pgd_linf_acc", "Last epoch's model: PGD-Linf accuracy (%)", 100),
]
# Gradient masking (§) inflates only what a gradient attack measures.
ADVERSARIAL_METRICS = {"pgd_linf_acc", "pgd_l2_acc", "audit_worst_acc"}
HEALTH_TABLES = [
    ("train_acc", "Train accuracy (%, clean, eval mode)", 100),
    ("loss_ratio", "Train loss at T / ln C (1 = the loss of uniform predictions)", 1),
    ("effective_classes", "Effective number of predicted classes (exp of the prediction "
     "histogram's entropy)", 1),
]
DIAGNOSTIC_TABLES = [
    ("grad_logits_norm_ep1", "Epoch 1: mean norm of dLoss/dlogits (step size)", 1),
    ("grad_features_norm_ep1", "Epoch 1: mean norm of dLoss/dfeatures (step size)", 1),
    ("wrong_class_entropy_norm_ep1", "Epoch 1: entropy of the wrong-class gradient weights / "
     "ln(C-1) (direction: 0 = one hardest class, 1 = all wrong classes equally)", 1),
    ("grad_logits_norm", "Last epoch: mean norm of dLoss/dlogits", 1),
    ("wrong_class_entropy_norm", "Last epoch: wrong-class entropy / ln(C-1)", 1),
]
FLAGS_LEGEND = ("Marks: † a seed did not train (train accuracy below chance + 25% of the "
                "gap to 100%); ‡ a seed is near chance on the test set or collapsed onto few "
                "classes; § (on PGD and audit tables) the gradient-masking audit does not "
                "confirm a seed's PGD accuracy (a failed check: gradient masking, or a "
                "stronger attack finding far less), so it overstates robustness. Robust "
                "accuracies of cells "
                "marked † or ‡ do not show robustness.")


def _failed_checks(row: dict) -> str:
    """The audit's failed checks, named (the same words for runs of any code version)."""
    from tempsoft.attacks.audit import CHECKS

    keys = [k for k in str(row.get("audit_failed_checks") or "").split(",") if k]
    if not keys:
        return str(row.get("audit_verdict", ""))
    named = ", ".join(f"({k}) {CHECKS.get(k, k)}" for k in keys)
    kind = "gradient masking" if set(keys) - {"e"} else "a weaker attack overstates robustness"
    return f"{named}: {kind}"


def _group(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["training"]), []).append(row)
    return groups


def _ordered(values: Iterable) -> list:
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [float(v) for v in values if v is not None and not _isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def _rounded(values: Any) -> Any:
    if not isinstance(values, list):
        return values
    return [round(v, 2) if isinstance(v, float) else v for v in values]


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


def _marks(rows: list[dict], key: str) -> str:
    marks = ""
    if any(r.get("trained") is False for r in rows):
        marks += "†"
    if any(r.get("collapsed") or r.get("near_chance") for r in rows):
        marks += "‡"
    if key in ADVERSARIAL_METRICS and any(r.get("audit_masking") is True for r in rows):
        marks += "§"
    return marks


def _table(rows: list[dict], key: str, scale: float, with_marks: bool) -> list[str]:
    temps = sorted(_ordered(r["T"] for r in rows))
    models = _ordered(r["model"] for r in rows)
    lines = ["| model | " + " | ".join(f"T={t:g}" for t in temps) + " |",
             "|---|" + "---:|" * len(temps)]
    for model in models:
        cells_txt = []
        for t in temps:
            sel = [r for r in rows if r["model"] == model and r["T"] == t]
            mean, std = _mean_std([r.get(key) for r in sel])
            if _isnan(mean):
                cells_txt.append("–")
                continue
            digits = 1 if scale == 100 else 3
            text = f"{mean * scale:.{digits}f}"
            if not _isnan(std):
                text += f" ± {std * scale:.{digits}f}"
            cells_txt.append(text + (_marks(sel, key) if with_marks else ""))
        lines.append(f"| {model} | " + " | ".join(cells_txt) + " |")
    return lines


def write_markdown(path: str | os.PathLike, rows: list[dict], config: dict) -> Path:
    """results.md: one section per (dataset, training), a table per metric (models x T)."""
    path = Path(path)
    settings = config.get("settings", {})
    machine = config.get("machine", {})
    out = [f"# Results: {path.parent.name} (preset {config.get('preset', '?')})", "",
           f"- code: {config.get('code_version', '?')}",
           f"- machine: {machine.get('cpu', '?')} ({machine.get('cpu_count', '?')} cores), "
           f"GPUs {machine.get('gpus') or 'none'}, torch {machine.get('torch', '?')}",
           f"- started: {config.get('created', '?')}; {len(rows)} finished cells; values are "
           "mean ± std over seeds (std when at least 2 seeds)",
           f"- training: {json.dumps(settings.get('train', {}))}",
           f"- adversarial training: {json.dumps(settings.get('adversarial', {}))}",
           f"- evaluation: {json.dumps(settings.get('eval', {}))}",
           "", FLAGS_LEGEND, ""]
    for (dataset, training), group in _group(rows).items():
        seeds = sorted(_ordered(r["seed"] for r in group))
        out += [f"## {dataset}, {training} training (seeds {seeds})", ""]
        for key, title, scale in METRIC_TABLES:
            if any(r.get(key) is not None for r in group):
                out += [f"### {title}", ""] + _table(group, key, scale, True) + [""]
        out += ["### Did it train? Did it collapse?", ""]
        for key, title, scale in HEALTH_TABLES:
            out += [f"#### {title}", ""] + _table(group, key, scale, False) + [""]
        problems = [r for r in group if not r.get("healthy", True)]
        if problems:
            out += ["Cells flagged by the health check:", ""]
            out += [f"- {r['cell']}: {r['health']}; prediction histogram {r.get('pred_hist')}, "
                    f"per-class accuracy {_rounded(r.get('per_class_acc'))}"
                    for r in problems] + [""]
        masked = [r for r in group if r.get("audit_masking") is True]
        if masked:
            out += ["Cells where the audit does not confirm the PGD accuracy (its failed "
                    "checks):", ""]
            out += [f"- {r['cell']}: {_failed_checks(r)}" for r in masked] + [""]
        out += ["### Gradient diagnostics (the step-size and direction claim)", ""]
        for key, title, scale in DIAGNOSTIC_TABLES:
            if any(r.get(key) is not None for r in group):
                out += [f"#### {title}", ""] + _table(group, key, scale, False) + [""]
    path.write_text("\n".join(out))
    return path


# ======================================================================================
# Merging runs made on different machines
# ======================================================================================
# What a cell's training config may differ in between machines without changing its result.
_MACHINE_FIELDS = {"device", "data_root", "download", "checkpoint_dir", "progress"}


def merge_runs(run_dirs: Iterable[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Combine runs of one study made on different machines (e.g. each with a part of the
    grid) into ``out_dir``: one results.csv, the cells' details and histories, and the
    reports.

    Refused, naming the difference: runs whose settings (everything but the grid) differ, and
    a cell that two runs both finished with different training configs. A cell finished by
    two runs with the same config is taken from the first.

    Returns:
        out_dir.
    """
    runs = [Path(d) for d in run_dirs]
    if not runs:
        raise ValueError("merge needs at least one run folder")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; merge into a new folder")
    configs = []
    for run in runs:
        for name in ("config.json", "results.csv"):
            if not (run / name).is_file():
                raise FileNotFoundError(f"{run} is not a run folder: no {name}")
        configs.append(json.loads((run / "config.json").read_text()))
    base = configs[0].get("settings", {})
    for run, config in zip(runs[1:], configs[1:]):
        other = config.get("settings", {})
        if other != base:
            changed = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise PresetError(f"{run} and {runs[0]} are different studies: their settings "
                              f"differ in {changed}; only runs of one study can be merged")
    header: list[str] = []
    rows: dict[str, tuple[Path, dict]] = {}
    for run in runs:
        with open(run / "results.csv", newline="") as fh:
            columns = next(csv.reader(fh), [])
        if header and columns != header:
            raise PresetError(f"{run}/results.csv has other columns than {runs[0]}/results.csv")
        header = header or columns
        for row in read_results(run / "results.csv"):
            cell = row["cell"]
            if cell in rows:
                _same_cell_config(cell, rows[cell][0], run)
                continue
            rows[cell] = (run, row)
    out.mkdir(parents=True, exist_ok=True)
    grids = [c.get("grid", {}) for c in configs]
    merged = {**configs[0], "grid": _union_grid(grids),
              "merged_from": [{"run": str(r), "code_version": c.get("code_version"),
                               "machine": c.get("machine")} for r, c in zip(runs, configs)]}
    (out / "config.json").write_text(json.dumps(merged, indent=2, default=str))
    write_rows(out / "results.csv", [header] + [format_row(header, row)
                                                for _, row in rows.values()])
    for run, row in rows.values():
        slug = row["cell"].replace("/", "__").replace("=", "")
        for sub, suffix in (("cells", ".json"), ("history", ".csv")):
            src = run / sub / f"{slug}{suffix}"
            if src.is_file():
                (out / sub).mkdir(exist_ok=True)
                shutil.copy2(src, out / sub / src.name)
    write_report(out)
    return out


def _same_cell_config(cell: str, first: Path, second: Path) -> None:
    slug = cell.replace("/", "__").replace("=", "")
    configs = []
    for run in (first, second):
        path = run / "cells" / f"{slug}.json"
        if not path.is_file():
            raise PresetError(f"{cell} was finished by {first} and {second}, and {path} is "
                              "missing, so their configs cannot be compared")
        config = json.loads(path.read_text())["config"]
        configs.append({k: v for k, v in config.items() if k not in _MACHINE_FIELDS})
    if configs[0] != configs[1]:
        differ = sorted(k for k in configs[0] if configs[0][k] != configs[1].get(k))
        raise PresetError(f"{cell} was finished by {first} and {second} with different "
                          f"training configs ({differ})")


def _union_grid(grids: list[dict]) -> dict:
    out: dict[str, list] = {}
    for grid in grids:
        for key, values in grid.items():
            for v in values if isinstance(values, list) else [values]:
                if v not in out.setdefault(key, []):
                    out[key].append(v)
    return out
