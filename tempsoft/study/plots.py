"""PNG plots of a study: metric vs temperature, one line per model, error bars over seeds.

    >>> from tempsoft.study.plots import plot_run
    >>> from tempsoft.study import read_results
    >>> plot_run(read_results("results/demo/results.csv"), "results/demo")

Temperatures are log-spaced, so the x-axis is logarithmic. Points where a seed did not train,
collapsed, or sits near chance are circled in red: their "robust" accuracy is not robustness.
Points where the audit suspects gradient masking get an orange square: their PGD accuracy
overstates robustness.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

# (column, y label, file stem)
ACCURACY_PLOTS = [
    ("clean_acc", "clean accuracy", "clean"),
    ("corruption_acc", "corruption accuracy", "corruption"),
    ("released_c_acc", "released CIFAR-C accuracy", "released_c"),
    ("cifar101_acc", "CIFAR-10.1 accuracy", "cifar101"),
    ("pgd_linf_acc", "PGD-Linf accuracy", "pgd_linf"),
    ("pgd_l2_acc", "PGD-L2 accuracy", "pgd_l2"),
    ("audit_worst_acc", "audit: accuracy under all its attacks", "audit"),
    ("flip_prob", "flip probability (lower = more stable)", "flip_prob"),
]
DIAGNOSTIC_PANELS = [
    ("grad_logits_norm_ep1", "epoch 1: mean |dL/dlogits|", True),
    ("wrong_class_entropy_norm_ep1", "epoch 1: wrong-class entropy / ln(C-1)", False),
]


def _series(rows: list[dict], model: str, key: str):
    """Sorted temperatures, means, stds, 'unhealthy' and 'masking' flags of a model's points."""
    temps = sorted({r["T"] for r in rows if r["model"] == model})
    xs, means, stds, bad, masked = [], [], [], [], []
    for t in temps:
        sel = [r for r in rows if r["model"] == model and r["T"] == t]
        vals = [float(r[key]) for r in sel if r.get(key) is not None
                and not (isinstance(r[key], float) and math.isnan(r[key]))]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) \
            if len(vals) > 1 else 0.0
        xs.append(t)
        means.append(mean)
        stds.append(std)
        bad.append(any(r.get("healthy") is False for r in sel))
        masked.append(any(r.get("audit_masking") is True for r in sel))
    return xs, means, stds, bad, masked


def _temperature_axis(ax, rows: list[dict]) -> None:
    """Log x-axis with a labelled tick at each temperature of the study."""
    temps = sorted({r["T"] for r in rows})
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(temps))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}" for t in temps])


def plot_metric(rows: list[dict], key: str, ylabel: str, title: str,
                path: str | os.PathLike, *, log_y: bool = False,
                chance: Optional[float] = None) -> Optional[Path]:
    """One PNG: ``key`` vs T, a line per model with std error bars; None if no data.

    Args:
        rows: results rows of one (dataset, training) group.
        key: the column to plot.
        chance: draws a dotted line at chance accuracy when given.
    """
    models = []
    for r in rows:
        if r["model"] not in models and r.get(key) is not None:
            models.append(r["model"])
    if not models:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    flagged = masking = False
    for model in models:
        xs, means, stds, bad, masked = _series(rows, model, key)
        ax.errorbar(xs, means, yerr=stds, marker="o", markersize=4, capsize=3, linewidth=1.5,
                    label=model)
        for flags, style in ((bad, "bad"), (masked, "masked")):
            px = [x for x, f in zip(xs, flags) if f]
            py = [m for m, f in zip(means, flags) if f]
            if not px:
                continue
            if style == "bad":
                flagged = True
                ax.scatter(px, py, s=140, facecolors="none", edgecolors="red",
                           linewidths=1.5, zorder=5)
            elif key != "clean_acc":
                masking = True
                ax.scatter(px, py, s=110, marker="s", facecolors="none",
                           edgecolors="darkorange", linewidths=1.5, zorder=5)
    if flagged:
        ax.scatter([], [], s=140, facecolors="none", edgecolors="red",
                   label="a seed did not train / collapsed")
    if masking:
        ax.scatter([], [], s=110, marker="s", facecolors="none", edgecolors="darkorange",
                   label="audit: gradient masking suspected")
    if chance is not None and "acc" in key:
        ax.axhline(chance, color="gray", linestyle=":", linewidth=1, label="chance")
    _temperature_axis(ax, rows)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("softmax temperature T (training)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_diagnostics(rows: list[dict], title: str, path: str | os.PathLike) -> Optional[Path]:
    """Two panels: the gradient's size (log-log) and its wrong-class entropy, vs T."""
    if not any(r.get(DIAGNOSTIC_PANELS[0][0]) is not None for r in rows):
        return None
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120)
    for ax, (key, label, log_y) in zip(axes, DIAGNOSTIC_PANELS):
        for model in models:
            xs, means, stds, _, _ = _series(rows, model, key)
            ax.errorbar(xs, means, yerr=stds, marker="o", markersize=4, capsize=3, label=model)
        _temperature_axis(ax, rows)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("softmax temperature T")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_run(rows: list[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """All plots of a run, one set per (dataset, training); returns the PNG paths.

    Files: ``<dataset>_<training>_<metric>.png`` for clean, corruption, pgd_linf, pgd_l2,
    audit (and the others present), and ``<dataset>_<training>_diagnostics.png``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["training"]), []).append(r)
    written = []
    for (dataset, training), group in groups.items():
        n_cls = group[0].get("num_classes") or None
        chance = 1.0 / n_cls if n_cls else None
        seeds = len({r["seed"] for r in group})
        for key, ylabel, stem in ACCURACY_PLOTS:
            spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
            title = f"{dataset}, {training} training\n{ylabel} vs T ({spread})"
            p = plot_metric(group, key, ylabel, title,
                            out_dir / f"{dataset}_{training}_{stem}.png", chance=chance)
            if p is not None:
                written.append(p)
        p = plot_diagnostics(group, f"{dataset}, {training} training: gradient step size and "
                             "direction vs T", out_dir / f"{dataset}_{training}_diagnostics.png")
        if p is not None:
            written.append(p)
    return written
