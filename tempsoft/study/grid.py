"""The cells of a study: one training run and its evaluation each, and the configs a cell gets
from its preset (defaults <- [train] <- [datasets.X.train] <- [models.Y] <- the cell)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from tempsoft.robustness.evaluate import EvalSettings
from tempsoft.study.presets import Preset
from tempsoft.train import TrainConfig


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

