"""A study: preset -> cells -> executor -> results -> report.

    presets.py    a preset (TOML, shipped in presets/) read, overridden and validated
    grid.py       its cells, and each cell's training and evaluation configs
    cell.py       one cell, start to finish, wherever it runs (resumes from its checkpoint)
    executors.py  where cells run: local, ray (Ray tasks), slurm (submitit job array)
    runner.py     the driver: skips finished cells, writes results.csv as cells finish
    store.py      the run folder: config.json, invocations.jsonl, results.csv
    report.py     results.md, claims.md, plots; merging runs from several machines
    claims.py     each claim of the paper, its comparison and its verdict (fixed rules)
    costs.py      what a preset will cost, before it runs (--dry-run)

    >>> from tempsoft.study import reproduce
    >>> reproduce("demo").run_dir
"""
from tempsoft.study.cell import HISTORY_COLUMNS, CellTask, run_cell
from tempsoft.study.costs import project
from tempsoft.study.executors import EXECUTORS, make_executor
from tempsoft.study.grid import Cell, cells, eval_settings, train_config
from tempsoft.study.presets import (DEFAULT_TEMPERATURES, Preset, PresetError,
                                    available_presets, find_preset, load_preset,
                                    parse_override, presets_dir, validate_preset)
from tempsoft.study.report import merge_runs, write_report
from tempsoft.study.runner import RunSummary, reproduce
from tempsoft.study.store import read_results, result_columns

__all__ = [
    "Cell", "CellTask", "DEFAULT_TEMPERATURES", "EXECUTORS", "HISTORY_COLUMNS", "Preset",
    "PresetError", "RunSummary", "available_presets", "cells", "eval_settings", "find_preset",
    "load_preset", "make_executor", "merge_runs", "parse_override", "presets_dir", "project",
    "read_results", "reproduce", "result_columns", "run_cell", "train_config",
    "validate_preset", "write_report",
]
