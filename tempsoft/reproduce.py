"""Run a whole study from a preset: datasets x models x temperatures x seeds x training kinds.

    >>> from tempsoft.reproduce import reproduce
    >>> summary = reproduce("demo")           # experiments/presets/demo.toml
    >>> summary.run_dir                        # results/demo: results.csv, results.md, *.png

A preset is data (a TOML file); this module is the one runner. Its sections:

    name, description        strings
    [grid]                   datasets, models, temperatures (default DEFAULT_TEMPERATURES),
                             seeds (default [0]), training ("standard" and/or "adversarial")
    [train]                  TrainConfig fields (optimizer, lr, lr_scaling, epochs, ...)
    [adversarial]            eps, alpha, steps, T ("train" = the cell's T, or a number)
    [eval]                   evals = [...] and EvalSettings fields ("all" for *_examples,
                             pgd_T = "train" for the cell's T)
    [models.<name>]          TrainConfig fields for that model only (e.g. AdamW for the ViT)
    [datasets.<name>.train]  and [datasets.<name>.eval]: per-dataset fields
    [run]                    keep_checkpoints (bool), disk_cache (bool), threads (int: torch
                             intra-op threads while the study runs; 0 = torch's default)

Each finished cell is appended to results/<run>/results.csv at once, so a killed study loses
at most the cell in flight, and that cell resumes from its last epoch checkpoint. A rerun skips
the cells already in results.csv; a rerun with different settings (other than the grid) is
refused, naming the settings that changed.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from tempsoft.robustness.evaluate import EVALS, EvalCache, EvalSettings, evaluate
from tempsoft.train import TrainConfig, distributed_info, save_model, train

# Log-spaced 1-2-5 steps from 0.1 to 100, with 1 among them: 10 temperatures.
DEFAULT_TEMPERATURES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
TRAINING_KINDS = ("standard", "adversarial")

_TOP_KEYS = {"name", "description", "grid", "train", "adversarial", "eval", "models",
             "datasets", "run"}
_GRID_KEYS = {"datasets", "models", "temperatures", "seeds", "training"}
# Fields the grid or the runner sets; a preset may not set them in [train].
_CELL_FIELDS = {"dataset", "model", "T", "seed", "adversarial", "adv_eps", "adv_alpha",
                "adv_steps", "adv_T", "checkpoint_dir", "progress"}
_ADV_KEYS = {"eps": "adv_eps", "alpha": "adv_alpha", "steps": "adv_steps", "T": "adv_T"}
_RUN_KEYS = {"keep_checkpoints": False, "disk_cache": False, "threads": 0}
_OPTIONAL_ALIASES = {"all": None, "train": None}

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


class PresetError(ValueError):
    """A preset file or override is wrong; the message names the key and the value."""


# ======================================================================================
# Presets
# ======================================================================================
def presets_dir() -> Path:
    """experiments/presets of this source tree."""
    return Path(__file__).resolve().parents[1] / "experiments" / "presets"


def available_presets() -> list[str]:
    folder = presets_dir()
    return sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []


def find_preset(name: str | os.PathLike) -> Path:
    """A preset name ("demo") or a path to a .toml file -> the file's path."""
    path = Path(name)
    if path.suffix == ".toml" or path.parent != Path("."):
        if path.is_file():
            return path
        raise PresetError(f"preset file {str(path)!r} does not exist")
    for folder in (Path.cwd() / "experiments" / "presets", presets_dir()):
        candidate = folder / f"{name}.toml"
        if candidate.is_file():
            return candidate
    raise PresetError(f"unknown preset {str(name)!r}; available presets: "
                      f"{available_presets()} (in {presets_dir()}), or pass a .toml path")


def parse_override(text: str) -> tuple[list[str], Any]:
    """"train.epochs=2" -> (["train", "epochs"], 2); the value is read as TOML, else a string.

    Example:
        >>> parse_override("grid.temperatures=[0.5, 2]")
        (['grid', 'temperatures'], [0.5, 2])
    """
    if "=" not in text:
        raise PresetError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = [p.strip() for p in key.split(".") if p.strip()]
    if len(parts) < 2:
        raise PresetError(f"override key {key!r} must name a section and a key, "
                          "e.g. train.epochs=2")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def _apply_override(raw: dict, parts: list[str], value: Any) -> None:
    node = raw
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise PresetError(f"override {'.'.join(parts)}: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


@dataclass
class Preset:
    """A validated preset. ``raw`` is the TOML content after overrides (saved in config.json)."""

    name: str
    description: str
    datasets: list[str]
    models: list[str]
    temperatures: list[float]
    seeds: list[int]
    training: list[str]
    train: dict[str, Any]
    adversarial: dict[str, Any]
    eval: dict[str, Any]
    model_overrides: dict[str, dict[str, Any]]
    dataset_overrides: dict[str, dict[str, dict[str, Any]]]
    run: dict[str, Any]
    raw: dict[str, Any]
    path: Optional[str] = None

    def settings(self) -> dict[str, Any]:
        """Everything but the grid and the description: what a resumed run must keep."""
        return {k: v for k, v in self.raw.items() if k not in ("grid", "description")}


def load_preset(name: str | os.PathLike, overrides: Iterable[str] = ()) -> Preset:
    """Read, override and validate a preset; PresetError names any bad key or value.

    Args:
        name: "demo", "cifar10", "paper", or a path to a .toml file.
        overrides: strings like "train.epochs=2" or "grid.temperatures=[0.5, 2]".

    Example:
        >>> p = load_preset("demo", ["grid.seeds=[0]"])
        >>> p.temperatures, p.seeds
    """
    path = find_preset(name)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{path}: not valid TOML: {exc}") from None
    for text in overrides:
        _apply_override(raw, *parse_override(text))
    return validate_preset(raw, source=str(path))


def validate_preset(raw: dict[str, Any], source: str = "<preset>") -> Preset:
    """Check every key and value of a preset dict; return the Preset."""
    where = f"preset {source}"
    _unknown(raw, _TOP_KEYS, where, "top-level key")
    grid = _section(raw, "grid", where)
    _unknown(grid, _GRID_KEYS, where, "key in [grid]")
    datasets = _names(grid, "datasets", _known_datasets(), where)
    models = _names(grid, "models", _known_models(), where)
    temps = _temperatures(grid.get("temperatures", list(DEFAULT_TEMPERATURES)), where)
    seeds = _seeds(grid.get("seeds", [0]), where)
    training = _string_list(grid.get("training", ["standard"]), "grid.training", where)
    for kind in training:
        if kind not in TRAINING_KINDS:
            raise PresetError(f"{where}: grid.training has {kind!r}; choose from "
                              f"{list(TRAINING_KINDS)}")
    train_fields = _train_fields()
    train = _typed(_section(raw, "train", where), train_fields, where, "[train]")
    adversarial = _adversarial(_section(raw, "adversarial", where), where)
    eval_section = dict(_section(raw, "eval", where))
    evals = _check_eval_names(
        _string_list(eval_section.pop("evals", ["clean"]), "eval.evals", where), where)
    eval_fields = _typed(eval_section, _eval_fields(), where, "[eval]")
    eval_fields["evals"] = evals
    model_overrides = {}
    for model, table in _section(raw, "models", where).items():
        if model not in _known_models():
            raise PresetError(f"{where}: [models.{model}] names an unknown model; known: "
                              f"{sorted(_known_models())}")
        model_overrides[model] = _typed(_as_table(table, f"models.{model}", where),
                                        train_fields, where, f"[models.{model}]")
    dataset_overrides = {}
    for ds, table in _section(raw, "datasets", where).items():
        if ds not in _known_datasets():
            raise PresetError(f"{where}: [datasets.{ds}] names an unknown dataset; known: "
                              f"{sorted(_known_datasets())}")
        table = _as_table(table, f"datasets.{ds}", where)
        _unknown(table, {"train", "eval"}, where, f"key in [datasets.{ds}]")
        ds_eval = dict(_as_table(table.get("eval", {}), f"datasets.{ds}.eval", where))
        ds_evals = ds_eval.pop("evals", None)
        dataset_overrides[ds] = {
            "train": _typed(_as_table(table.get("train", {}), f"datasets.{ds}.train", where),
                            train_fields, where, f"[datasets.{ds}.train]"),
            "eval": _typed(ds_eval, _eval_fields(), where, f"[datasets.{ds}.eval]"),
        }
        if ds_evals is not None:
            dataset_overrides[ds]["eval"]["evals"] = _check_eval_names(
                _string_list(ds_evals, f"datasets.{ds}.eval.evals", where), where)
    run = dict(_RUN_KEYS)
    run_section = _section(raw, "run", where)
    _unknown(run_section, set(_RUN_KEYS), where, "key in [run]")
    for key, value in run_section.items():
        if key == "threads":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PresetError(f"{where}: run.threads must be an int >= 0 (0: torch's "
                                  f"default), got {value!r}")
        elif not isinstance(value, bool):
            raise PresetError(f"{where}: run.{key} must be true or false, got {value!r}")
        run[key] = value
    name = raw.get("name", Path(source).stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise PresetError(f"{where}: name must be a non-empty string without '/', got {name!r}")
    preset = Preset(name=name, description=str(raw.get("description", "")), datasets=datasets,
                    models=models, temperatures=temps, seeds=seeds, training=training,
                    train=train, adversarial=adversarial, eval=eval_fields,
                    model_overrides=model_overrides, dataset_overrides=dataset_overrides,
                    run=run, raw=raw, path=source)
    for cell in cells(preset):  # builds every cell's configs once, so their errors show now
        try:
            train_config(preset, cell, checkpoint_dir=None).validate()
            eval_settings(preset, cell)
        except (ValueError, TypeError) as exc:
            raise PresetError(f"{where}: cell {cell.id}: {exc}") from None
    return preset


def _check_eval_names(evals: list[str], where: str) -> list[str]:
    for e in evals:
        if e not in EVALS:
            raise PresetError(f"{where}: unknown evaluation {e!r} in evals; known: "
                              f"{list(EVALS)}")
    return evals


def _known_datasets():
    from tempsoft.data import DATASETS

    return DATASETS


def _known_models():
    from tempsoft.models import MODELS

    return MODELS


def _unknown(table: dict, known: set, where: str, what: str) -> None:
    for key in table:
        if key not in known:
            raise PresetError(f"{where}: unknown {what} {key!r}; known: {sorted(known)}")


def _section(raw: dict, key: str, where: str) -> dict:
    return _as_table(raw.get(key, {}), key, where)


def _as_table(value: Any, key: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise PresetError(f"{where}: [{key}] must be a table, got {value!r}")
    return value


def _string_list(value: Any, key: str, where: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise PresetError(f"{where}: {key} must be a non-empty list of strings, got {value!r}")
    return list(value)


def _names(grid: dict, key: str, known, where: str) -> list[str]:
    if key not in grid:
        raise PresetError(f"{where}: [grid] needs {key} = [...]")
    names = _string_list(grid[key], f"grid.{key}", where)
    for n in names:
        if n not in known:
            raise PresetError(f"{where}: grid.{key} has unknown name {n!r}; known: "
                              f"{sorted(known)}")
    return names


def _temperatures(value: Any, where: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise PresetError(f"{where}: grid.temperatures must be a non-empty list of numbers, "
                          f"got {value!r}")
    out = []
    for t in value:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
                or t <= 0:
            raise PresetError(f"{where}: grid.temperatures has {t!r}; every temperature must "
                              "be a positive finite number (T <= 0 is not a temperature)")
        out.append(float(t))
    if len(set(out)) != len(out):
        raise PresetError(f"{where}: grid.temperatures has duplicates: {value!r}")
    return out


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise PresetError(f"{where}: grid.seeds must be a non-empty list of ints >= 0, "
                          f"got {value!r}")
    return list(value)


def _field_kinds(cls) -> dict[str, tuple[tuple[type, ...], bool]]:
    """Field name -> (accepted TOML types, whether None is allowed), from the annotations."""
    out = {}
    for f in dataclasses.fields(cls):
        ann = str(f.type)
        optional = ann.startswith("Optional[")
        inner = ann[len("Optional["):-1] if optional else ann
        if inner == "bool":
            kinds = (bool,)
        elif inner == "int":
            kinds = (int,)
        elif inner == "float":
            kinds = (int, float)
        elif inner == "str":
            kinds = (str,)
        else:  # list[...] / tuple[...]
            kinds = (list,)
        out[f.name] = (kinds, optional)
    return out


def _train_fields():
    return {k: v for k, v in _field_kinds(TrainConfig).items() if k not in _CELL_FIELDS}


def _eval_fields():
    return _field_kinds(EvalSettings)


def _typed(table: dict, fields: dict, where: str, section: str) -> dict[str, Any]:
    out = {}
    for key, value in table.items():
        if key not in fields:
            hint = " (set by the grid or [adversarial])" if key in _CELL_FIELDS else ""
            raise PresetError(f"{where}: unknown key {key!r} in {section}{hint}; known: "
                              f"{sorted(fields)}")
        kinds, optional = fields[key]
        if optional and isinstance(value, str) and value in _OPTIONAL_ALIASES and \
                str not in kinds:
            out[key] = None
            continue
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            names = "/".join(k.__name__ for k in kinds)
            extra = ' or "all"/"train" for None' if optional else ""
            raise PresetError(f"{where}: {section} {key} must be {names}{extra}, got "
                              f"{value!r} ({type(value).__name__})")
        out[key] = float(value) if kinds == (int, float) else value
    return out


def _adversarial(table: dict, where: str) -> dict[str, Any]:
    """[adversarial]: eps, alpha, steps, T, and any [train] field for adversarial cells only."""
    out = {}
    rest = {k: v for k, v in table.items() if k not in _ADV_KEYS}
    fields = _train_fields()
    for key in rest:
        if key not in fields:
            raise PresetError(f"{where}: unknown key {key!r} in [adversarial]; known: "
                              f"{sorted(_ADV_KEYS)} and the [train] keys {sorted(fields)}")
    out.update(_typed(rest, fields, where, "[adversarial]"))
    for key, value in table.items():
        if key not in _ADV_KEYS:
            continue
        if key == "T" and value == "train":
            out["adv_T"] = None
        elif key == "steps":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PresetError(f"{where}: adversarial.steps must be an int >= 1, got "
                                  f"{value!r}")
            out["adv_steps"] = value
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or value <= 0:
                alt = ' or "train"' if key == "T" else ""
                raise PresetError(f"{where}: adversarial.{key} must be a positive number{alt}, "
                                  f"got {value!r}")
            out[_ADV_KEYS[key]] = float(value)
    return out


# ======================================================================================
# Cells
# ======================================================================================
@dataclass(frozen=True)
class Cell:
    """One training run and its evaluation."""

    dataset: str
    model: str
    training: str
    T: float
    seed: int

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.model}/{self.training}/T={self.T:g}/seed={self.seed}"

    @property
    def slug(self) -> str:
        """The id as one path component."""
        return self.id.replace("/", "__").replace("=", "")


def cells(preset: Preset) -> list[Cell]:
    """The grid in run order: dataset, training, model, seed, temperature."""
    return [Cell(ds, m, kind, t, seed)
            for ds in preset.datasets for kind in preset.training for m in preset.models
            for seed in preset.seeds for t in preset.temperatures]


def train_config(preset: Preset, cell: Cell, checkpoint_dir: Optional[str],
                 progress: bool = False, device: Optional[str] = None) -> TrainConfig:
    """The cell's TrainConfig: defaults <- [train] <- [datasets.X.train] <- [models.Y] <- cell."""
    fields: dict[str, Any] = {}
    fields.update(preset.train)
    fields.update(preset.dataset_overrides.get(cell.dataset, {}).get("train", {}))
    fields.update(preset.model_overrides.get(cell.model, {}))
    if device is not None:
        fields["device"] = device
    adversarial = cell.training == "adversarial"
    if adversarial:
        fields.update(preset.adversarial)
    return TrainConfig(dataset=cell.dataset, model=cell.model, T=cell.T, seed=cell.seed,
                       adversarial=adversarial, checkpoint_dir=checkpoint_dir,
                       progress=progress, **fields)


def eval_settings(preset: Preset, cell: Cell, device: Optional[str] = None
                  ) -> tuple[list[str], EvalSettings]:
    """(evals, EvalSettings) for the cell: defaults <- [eval] <- [datasets.X.eval]."""
    fields = dict(preset.eval)
    fields.update(preset.dataset_overrides.get(cell.dataset, {}).get("eval", {}))
    evals = fields.pop("evals")
    if "severities" in fields:
        fields["severities"] = tuple(fields["severities"])
    if device is not None:
        fields["device"] = device
    # The evaluation seed (corruption noise, attack starts) is the same for every cell unless
    # the preset sets one: common random numbers make differences between T less noisy.
    settings = EvalSettings(**fields).validate()
    for name, root in (("released_c", "released_c_root"), ("cifar101", "cifar101_root")):
        if name in evals and not getattr(settings, root):
            raise ValueError(f"evaluation {name!r} needs eval.{root} (or "
                             f"datasets.{cell.dataset}.eval.{root}): the folder of the files")
    return evals, settings


# ======================================================================================
# The run directory
# ======================================================================================
def code_version() -> str:
    """``git describe --always --dirty`` of the source tree, or the package version."""
    import tempsoft

    root = Path(__file__).resolve().parents[1]
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


def _prepare_run_dir(run_dir: Path, preset: Preset) -> None:
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


def _log_invocation(run_dir: Path, preset: Preset, todo: int, done: int) -> None:
    """One line per invocation: a resumed run may continue on another machine or commit."""
    entry = {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
             "code_version": code_version(), "machine": machine_info(),
             "grid": preset.raw.get("grid", {}), "cells_to_run": todo, "cells_done": done}
    with open(run_dir / "invocations.jsonl", "a") as fh:
        fh.write(json.dumps(entry, default=str) + "\n")


# ======================================================================================
# results.csv
# ======================================================================================
def result_columns(preset: Preset) -> list[str]:
    """The fixed CSV header for this preset (metric columns follow its evaluations)."""
    from tempsoft.robustness.evaluate import metric_columns
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


def _append_row(path: Path, columns: list[str], row: dict[str, Any]) -> None:
    new = not path.exists()
    if not new:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
        if header != columns:
            raise PresetError(f"{path} has other columns than this preset produces; use "
                              "another --run name")
    with open(path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(columns)
        writer.writerow([_format_cell(row.get(c)) for c in columns])
        fh.flush()
        os.fsync(fh.fileno())


def _row(cell: Cell, config: TrainConfig, history: list[dict], metrics: dict[str, Any]
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


# ======================================================================================
# reproduce
# ======================================================================================
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
              log=print) -> RunSummary:
    """Run every unfinished cell of a preset and write results.csv, results.md and the plots.

    Args:
        preset: a preset name, a .toml path, or a loaded Preset.
        out_dir: parent of the run folder.
        run_name: the run folder's name (default: the preset's name).
        overrides: "section.key=value" strings applied to the preset (ignored for a Preset).
        progress: tqdm bars while training.
        device: force a device for training and evaluation ("cpu", "cuda").
        log: where one-line progress messages go (None: nowhere).

    Returns:
        RunSummary with the run folder and what was run or skipped.

    Example:
        >>> reproduce("demo", overrides=["grid.temperatures=[0.5, 2]"], run_name="quick")
    """
    started = time.perf_counter()
    log = log or (lambda *_: None)
    if not isinstance(preset, Preset):
        preset = load_preset(preset, overrides)
    dist_info = distributed_info()
    run_dir = Path(out_dir) / (run_name or preset.name)
    if dist_info.is_main:
        _prepare_run_dir(run_dir, preset)
    csv_path = run_dir / "results.csv"
    columns = result_columns(preset)
    done = {row["cell"] for row in read_results(csv_path)}
    grid = cells(preset)
    todo = [c for c in grid if c.id not in done]
    if dist_info.is_main:
        _log_invocation(run_dir, preset, len(todo), len(grid) - len(todo))
    log(f"[tempsoft] {preset.name}: {len(grid)} cells, {len(grid) - len(todo)} already done, "
        f"{len(todo)} to run -> {run_dir}")
    data = _DataCache(preset, run_dir)
    with _threads(preset.run["threads"]):
        _run_cells(preset, todo, run_dir, data, csv_path, columns, progress, device,
                   dist_info, log)
    files: list[Path] = []
    if dist_info.is_main:
        files = write_report(run_dir, preset)
    return RunSummary(run_dir=run_dir, cells_total=len(grid), cells_run=len(todo),
                      cells_skipped=len(grid) - len(todo),
                      seconds=time.perf_counter() - started, files=files)


@contextlib.contextmanager
def _threads(n: int):
    """torch's intra-op thread count set to n (0: unchanged) for the block."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_cells(preset, todo, run_dir, data, csv_path, columns, progress, device, dist_info,
               log) -> None:
    for i, cell in enumerate(todo, 1):
        cell_started = time.perf_counter()
        row = _run_cell(preset, cell, run_dir, data, progress, device, dist_info, log)
        if dist_info.is_main:
            _append_row(csv_path, columns, row)
            _finish_cell(preset, cell, run_dir)
            log(f"[tempsoft] {i}/{len(todo)} {cell.id}: clean {row['clean_acc']:.3f}"
                f"{_headline(row)} ({time.perf_counter() - cell_started:.1f}s)"
                f"{'' if row['healthy'] else '  [' + row['health'] + ']'}")
        _barrier(dist_info)


def _headline(row: dict) -> str:
    parts = []
    for key, label in (("corruption_acc", "corruption"), ("pgd_linf_acc", "pgd-linf"),
                       ("pgd_l2_acc", "pgd-l2"), ("audit_worst_acc", "audit worst")):
        if row.get(key) is not None:
            parts.append(f", {label} {row[key]:.3f}")
    return "".join(parts)


class _DataCache:
    """Each dataset's train and test split and its corruption cache, loaded once per run."""

    def __init__(self, preset: Preset, run_dir: Path) -> None:
        self.preset, self.run_dir = preset, run_dir
        self._sets: dict[str, tuple] = {}

    def get(self, name: str, config: TrainConfig):
        if name not in self._sets:
            from tempsoft.data import load_dataset

            train_set = load_dataset(name, root=config.data_root, split="train",
                                     download=config.download)
            test_set = load_dataset(name, root=config.data_root, split="test",
                                    download=config.download)
            disk = self.preset.run["disk_cache"]
            cache = EvalCache(self.run_dir / "cache" / name if disk else None)
            self._sets[name] = (train_set, test_set, cache)
        return self._sets[name]


HISTORY_COLUMNS = ["epoch", "loss", "train_acc", "lr", "seconds", "images_per_s",
                   "grad_logits_norm", "grad_features_norm", "wrong_class_entropy",
                   "wrong_class_entropy_norm", "logit_std", "val_acc", "val_pgd_acc"]


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


def _run_cell(preset: Preset, cell: Cell, run_dir: Path, data: _DataCache, progress: bool,
              device: Optional[str], dist_info, log) -> dict[str, Any]:
    ckpt_dir = run_dir / "checkpoints" / cell.slug
    config = train_config(preset, cell, str(ckpt_dir), progress=progress, device=device)
    train_set, test_set, cache = data.get(cell.dataset, config)
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

    result = train(config, train_set=train_set, on_epoch_end=on_epoch_end)
    if not dist_info.is_main:
        return {}
    write_history(history_path, result.history)  # complete, whatever a kill left behind
    save_model(run_dir / "models" / f"{cell.slug}.pt", result, train_set)
    evals, settings = eval_settings(preset, cell, device=device)
    model, selection = result.model, {}
    if result.best is not None:
        # The selected epoch is the cell's model; the last epoch's is reported beside it.
        save_model(run_dir / "models" / f"{cell.slug}-best.pt", result, train_set, best=True)
        model = result.best_model()
        last = evaluate(result.model, test_set, [e for e in ("clean", "pgd_linf") if
                                                 e == "clean" or e in evals],
                        T=cell.T, train_T=cell.T, settings=settings, cache=cache)
        selection = {"best_epoch": result.best["epoch"], "best_val_acc": result.best["val_acc"],
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
    return _row(cell, config, result.history, metrics)


def _finish_cell(preset: Preset, cell: Cell, run_dir: Path) -> None:
    """The model is saved and the row is written: the epoch checkpoint is no longer needed."""
    if not preset.run["keep_checkpoints"]:
        shutil.rmtree(run_dir / "checkpoints" / cell.slug, ignore_errors=True)


def _barrier(dist_info) -> None:
    if dist_info.active:
        import torch.distributed as dist

        dist.barrier()


def write_report(run_dir: str | os.PathLike, preset: Optional[Preset] = None) -> list[Path]:
    """(Re)write results.md, claims.md and the PNG plots from results.csv; returns the files
    written."""
    from tempsoft.claims import write_claims
    from tempsoft.plots import plot_run

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
                "classes; § (on PGD and audit tables) the audit suspects gradient masking in a "
                "seed: its PGD accuracy overstates robustness. Robust accuracies of cells "
                "marked † or ‡ do not show robustness.")


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
            out += ["Cells where the audit suspects gradient masking:", ""]
            out += [f"- {r['cell']}: {r.get('audit_verdict', '')}" for r in masked] + [""]
        out += ["### Gradient diagnostics (the step-size and direction claim)", ""]
        for key, title, scale in DIAGNOSTIC_TABLES:
            if any(r.get(key) is not None for r in group):
                out += [f"#### {title}", ""] + _table(group, key, scale, False) + [""]
    path.write_text("\n".join(out))
    return path
