"""Presets: a study as data. A TOML file names datasets, models, temperatures, seeds, training
kinds and evaluations; this module reads, overrides and validates it.

    >>> from tempsoft.study import load_preset, available_presets
    >>> preset = load_preset("demo", ["grid.seeds=[0]"])

Sections of a preset:

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
                             intra-op threads while a cell runs; 0 = torch's default)
    [costs]                  (optional) what a cell costs, for --dry-run: see costs.py

The presets shipped with tempsoft live in this package (``tempsoft/study/presets/*.toml``), so
an installed wheel finds them; a path to any .toml file works too.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

from tempsoft.robustness.evaluate import EVALS, EvalSettings
from tempsoft.study.costs import validate_costs
from tempsoft.train import TrainConfig

# Log-spaced 1-2-5 steps from 0.1 to 100, with 1 among them: 10 temperatures.
DEFAULT_TEMPERATURES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
TRAINING_KINDS = ("standard", "adversarial")

_TOP_KEYS = {"name", "description", "grid", "train", "adversarial", "eval", "models", "costs",
             "datasets", "run"}
_GRID_KEYS = {"datasets", "models", "temperatures", "seeds", "training"}
# Fields the grid or the runner sets; a preset may not set them in [train].
_CELL_FIELDS = {"dataset", "model", "T", "seed", "adversarial", "adv_eps", "adv_alpha",
                "adv_steps", "adv_T", "checkpoint_dir", "progress"}
_ADV_KEYS = {"eps": "adv_eps", "alpha": "adv_alpha", "steps": "adv_steps", "T": "adv_T"}
_RUN_KEYS = {"keep_checkpoints": False, "disk_cache": False, "threads": 0}
_OPTIONAL_ALIASES = {"all": None, "train": None}


class PresetError(ValueError):
    """A preset file or override is wrong; the message names the key and the value."""


# ======================================================================================
# Presets
# ======================================================================================
def presets_dir() -> Path:
    """The presets shipped with tempsoft (package data: works from a checkout or a wheel)."""
    return Path(__file__).resolve().parent / "presets"


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
    candidate = presets_dir() / f"{name}.toml"
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
    costs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """Everything but the grid, the description and the cost figures: what a resumed run
        must keep."""
        return {k: v for k, v in self.raw.items() if k not in ("grid", "description", "costs")}


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
                    run=run, raw=raw, path=source,
                    costs=validate_costs(raw.get("costs"), where))
    from tempsoft.study.grid import cells, eval_settings, train_config

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

