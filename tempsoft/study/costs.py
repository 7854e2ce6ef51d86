"""What a study will cost before it starts: cells x epochs x seconds per epoch on a named
device, plus each cell's evaluation, from the preset's ``[costs]`` table.

    [costs]
    device = "AMD EPYC (Zen 5), 2 cores"   # what the figures are for
    basis = "measured"                     # or "stated" (taken from elsewhere, not timed here)
    source = "experiments/results/cifar10-cpu/run.log"
    train_images_per_s = { cifar_cnn = 1400.0 }   # per model: training images per second
    eval_seconds = { cifar_cnn = 180.0 }          # per model: one cell's evaluation

A key "dataset/model" (quoted in TOML) overrides the model's figure for that dataset (64x64
Tiny-ImageNet images cost about 4x CIFAR's 32x32).

With ``basis = "estimated"`` the table states no figures: tempsoft/study/estimate.py computes every
cell's training and evaluation time on one H100/H200 from the model's FLOPs and the preset's
passes (its docstring gives the basis), plus the start-up and the CPU image generation.

An adversarially trained cell costs (1 + adversarial.steps) times the standard epoch: each
step of the inner attack is one more forward and backward pass.

    >>> from tempsoft.study.costs import project
    >>> print(project(load_preset("cifar10-cpu")))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tempsoft.study.estimate import DATASET_SIZES

# Training examples of each dataset's train split (the official splits).
TRAIN_EXAMPLES = {name: sizes[0] for name, sizes in DATASET_SIZES.items()}
BASES = ("measured", "stated", "estimated")
_KEYS = {"device", "basis", "source", "train_images_per_s", "eval_seconds", "train_examples"}


class CostsError(ValueError):
    """A [costs] table is wrong; the message names the key and the value."""


def validate_costs(table: Any, where: str) -> dict[str, Any]:
    """Check a preset's [costs] table; returns it (empty when absent)."""
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise CostsError(f"{where}: [costs] must be a table, got {table!r}")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise CostsError(f"{where}: unknown key(s) {unknown} in [costs]; known: {sorted(_KEYS)}")
    for key in ("device", "basis"):
        if not isinstance(table.get(key), str) or not table.get(key):
            raise CostsError(f"{where}: [costs] needs {key} = \"...\"")
    if table["basis"] not in BASES:
        raise CostsError(f"{where}: costs.basis must be one of {BASES}, got {table['basis']!r}")
    for key in ("train_images_per_s", "eval_seconds", "train_examples"):
        values = table.get(key, {})
        if not isinstance(values, dict):
            raise CostsError(f"{where}: costs.{key} must be a table name -> number")
        for name, v in values.items():
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < 0 or (key == "train_images_per_s" and v == 0):
                raise CostsError(f"{where}: costs.{key}.{name} must be a positive number, "
                                 f"got {v!r}")
    if "train_images_per_s" not in table and table["basis"] != "estimated":
        raise CostsError(f"{where}: [costs] needs train_images_per_s = {{ model = images/s }}")
    return table


@dataclass
class Projection:
    """The projected cost of a preset's cells, by (dataset, model, training)."""

    device: str
    basis: str
    source: str
    lines: list[tuple[str, int, float, float, float]]   # group, cells, s/epoch, epochs, s/cell
    missing: list[str]
    once: float = 0.0          # seconds spent once per study (start-up, CPU image generation)
    note: str = ""             # what an estimate is based on

    @property
    def seconds(self) -> float:
        return self.once + sum(n * per_cell for _, n, _, _, per_cell in self.lines)

    def __str__(self) -> str:
        if not self.lines and not self.missing:
            return "cost projection: none (the preset has no [costs] table)"
        out = [f"cost projection on {self.device} ({self.basis}"
               + (f"; {self.source}" if self.source else "") + "):"]
        for group, n, per_epoch, epochs, per_cell in self.lines:
            out.append(f"  {group}: {n} cells x ({epochs:g} epochs x {per_epoch:.1f} s + "
                       f"evaluation) = {n * per_cell / 3600:.2f} h")
        for group in self.missing:
            out.append(f"  {group}: no figures for it in [costs]")
        if self.once:
            out.append(f"  once: start-up and CPU image generation, {self.once:.0f} s")
        out.append(f"  total: {_human(self.seconds)} on one worker (parallel workers divide it)")
        if self.note:
            out.append(f"  ({self.note})")
        return "\n".join(out)


def _human(seconds: float) -> str:
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def project(preset) -> Projection:
    """Cells x epochs x seconds per epoch (+ evaluation) for every (dataset, model, training)
    group of the preset, from its [costs] table."""
    from tempsoft.study.grid import cells, train_config

    costs = preset.costs
    if not costs:
        return Projection("", "", "", [], [])
    if costs["basis"] == "estimated":
        return _estimated(preset, costs)
    rates = costs["train_images_per_s"]
    evals = costs.get("eval_seconds", {})
    sizes = {**TRAIN_EXAMPLES, **costs.get("train_examples", {})}
    groups: dict[tuple[str, str, str], list] = {}
    for cell in cells(preset):
        groups.setdefault((cell.dataset, cell.model, cell.training), []).append(cell)
    lines, missing = [], []
    for (dataset, model, training), members in groups.items():
        name = f"{dataset} / {model} / {training}"
        rate = rates.get(f"{dataset}/{model}", rates.get(model))
        if rate is None or dataset not in sizes:
            missing.append(name)
            continue
        config = train_config(preset, members[0], checkpoint_dir=None)
        passes = 1 + (config.adv_steps if config.adversarial else 0)
        per_epoch = sizes[dataset] * passes / rate
        per_cell = config.epochs * per_epoch + evals.get(f"{dataset}/{model}",
                                                         evals.get(model, 0.0))
        lines.append((name, len(members), per_epoch, config.epochs, per_cell))
    return Projection(costs["device"], costs["basis"], costs.get("source", ""), lines, missing)


def _estimated(preset, costs) -> Projection:
    """The projection from tempsoft/study/estimate.py's per-cell estimate, grouped as above."""
    from tempsoft.study.estimate import BASIS, estimate_preset
    from tempsoft.study.grid import cells, train_config

    estimate = estimate_preset(preset)
    if estimate.missing:
        return Projection(costs["device"], costs["basis"], costs.get("source", ""), [],
                          estimate.missing)
    groups: dict[str, list] = {}
    for cell, (_, train_s, eval_s) in zip(cells(preset), estimate.cells):
        name = f"{cell.dataset} / {cell.model} / {cell.training}"
        epochs = train_config(preset, cell, checkpoint_dir=None).epochs
        groups.setdefault(name, []).append((epochs, train_s, eval_s))
    lines = [(name, len(rows), sum(t for _, t, _ in rows) / sum(e for e, _, _ in rows),
              rows[0][0], sum(t + v for _, t, v in rows) / len(rows))
             for name, rows in groups.items()]
    return Projection(costs["device"], costs["basis"], costs.get("source", ""), lines, [],
                      once=estimate.startup + estimate.cpu, note=BASIS)


__all__ = ["CostsError", "Projection", "TRAIN_EXAMPLES", "project", "validate_costs"]
