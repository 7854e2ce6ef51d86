"""Training at softmax temperature T: standard, and PGD adversarial training (Madry et al.).

    >>> from tempsoft.train import TrainConfig, train
    >>> result = train(TrainConfig(dataset="digits", model="small_cnn", T=2.0, epochs=3))
    >>> result.history[-1]["train_acc"], result.history[-1]["grad_logits_norm"]

Sections, top to bottom: configuration -> the loss, the learning-rate rule and the schedule ->
diagnostics of the gradient the paper's theory is about -> checkpoints (atomic, exact resume)
-> distributed setup (torchrun + DistributedDataParallel) -> the epoch loop -> ``train``.

Why the learning-rate rule exists: d CE(z/T) / dz = (softmax(z/T) - onehot) / T, so at a fixed
SGD learning rate a higher T is also a smaller step. ``lr_scaling="linear"`` multiplies the SGD
learning rate by T (and divides the weight decay by T, so the decay step lr * wd is unchanged),
which leaves the direction effect of T alone. Adam-style optimizers normalise the gradient's
scale away, so for AdamW the rule is a no-op (documented, not an error).

Adversarial training follows Madry et al. (2018) and Rice et al. (2020): the inner PGD runs with
batch norm in train mode (``adv_model_mode``), and with ``val_examples`` a held-out part of the
training set picks the epoch with the best validation PGD accuracy (robust overfitting: the
last epoch is often not the most robust); the last-epoch model is kept as well.

Exact resume: the loader's order and augmentation are functions of (seed, epoch), and a
checkpoint holds the model, optimizer, scheduler, every RNG state (torch CPU and CUDA, Python,
NumPy, the attack's generator), the history and the best validation epoch so far. A run killed
at any point restarts from the last completed epoch and ends with the same weights as an
uninterrupted run on the same device (bitwise on the CPU at the same thread count; GPU kernels
are deterministic only under ``torch.use_deterministic_algorithms``), also under torchrun with
the same number of processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle", "constant")
LR_SCALINGS = ("none", "linear")
AMP_MODES = ("auto", "bf16", "off")
ADV_MODEL_MODES = ("train", "eval")
STRONG_AUGMENTS = ("none", "trivialaugment")
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
# The held-out validation split is the same for every run (Rice et al. draw it once, with
# seed 0, in generate_validation.py), so cells that differ only in T select on the same images.
VAL_SPLIT_SEED = 0
# Fields added after checkpoints were first written, with the value that reproduces the runs
# written before them: a checkpoint without the field resumes only under that value.
LEGACY_VALUES = {"adv_model_mode": "eval", "val_examples": 0, "strong_augment": "none",
                 "decay_all_params": True}
# Result columns of a run with a validation split: the selected epoch and the last epoch's model.
SELECTION_COLUMNS = ["best_epoch", "best_val_acc", "best_val_pgd_acc", "last_clean_acc",
                     "last_pgd_linf_acc"]


# ======================================================================================
# Configuration
# ======================================================================================
@dataclass
class TrainConfig:
    """Everything that defines a training run; two runs with equal configs are the same run.

    Args:
        dataset: a name in ``tempsoft.data.DATASETS`` ("digits", "cifar10", ...).
        model: a name in ``tempsoft.models.MODELS`` ("small_cnn", "resnet18", "vit", ...).
        T: softmax temperature of the training loss, CE(logits / T, y); > 0.
        epochs: passes over the training set.
        batch_size: global batch (split evenly over processes under torchrun).
        optimizer: "sgd" (momentum, optional Nesterov) or "adamw".
        lr: peak learning rate before any T scaling.
        momentum: SGD momentum (ignored by AdamW, which uses betas (0.9, 0.999)).
        nesterov: SGD Nesterov momentum.
        weight_decay: L2 decay for SGD, decoupled decay for AdamW.
        decay_all_params: False leaves biases, normalization weights and the parameters a
            model lists in ``no_weight_decay()`` (the ViT's position embedding and class
            token) without weight decay, as timm and DeiT do for vision transformers.
        schedule: "cosine" (per-step cosine to 0 after a linear warmup), "onecycle"
            (torch OneCycleLR), or "constant".
        warmup_epochs: linear warmup length for "cosine" (may be fractional).
        lr_scaling: "none", or "linear": SGD lr x T and weight decay / T (no-op for AdamW).
        label_smoothing: passed to the loss.
        augment: random crop (+ horizontal flip where the dataset allows) on the device.
        strong_augment: "none" or "trivialaugment" (TrivialAugmentWide, Mueller & Hutter
            2021, on the device before the crop and flip).
        adversarial: PGD adversarial training (Madry et al. 2018): every batch is replaced by
            its PGD-Linf adversarial examples before the update.
        adv_eps, adv_alpha, adv_steps: the inner attack's radius, step and steps (Linf).
        adv_T: temperature of the inner attack's loss; None uses the training T.
        adv_model_mode: the model's mode during the inner attack: "train" (batch norm on the
            attack batch's statistics, updating its running statistics, as in Madry et al.'s
            cifar10_challenge train.py, which attacks its Model(mode='train'), and Rice et
            al.'s train_cifar.py, which attacks after model.train()) or "eval".
        val_examples: hold out this many training images (a fixed seeded draw, the same for
            every run) and evaluate on them after each epoch: clean accuracy, and for
            adversarial training PGD accuracy under the training attack in eval mode; the
            epoch with the best such accuracy is kept (``TrainResult.best_model()``, and
            ``best-epoch<e>.pt`` next to the checkpoint).  0: train on everything.
        seed: model init, data order, augmentation and attack starts derive from it.
        device: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
        amp: "auto" (bf16 autocast on CUDA, off on CPU), "bf16", or "off".
        channels_last: None (on CUDA only), True or False.
        compile: wrap the model in ``torch.compile``.
        data_root: where the dataset lives (None: the data module's default).
        download: let the data module download a missing dataset (with its checksum).
        checkpoint_dir: where ``checkpoint.pt`` is written after each epoch; None: no
            checkpoints. A checkpoint there from an earlier run of the same config is resumed.
        max_batches: stop each epoch after this many batches (smoke tests, benchmarks).
        progress: show a tqdm bar (rank 0 only).
        diagnostics: log the gradient norms and the wrong-class entropy per epoch.
        backend: backend of ``tempsoft.cross_entropy`` ("auto", "cpu", "torch", ...).
    """

    dataset: str = "digits"
    model: str = "small_cnn"
    T: float = 1.0
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    lr_scaling: str = "none"
    label_smoothing: float = 0.0
    augment: bool = True
    strong_augment: str = "none"
    decay_all_params: bool = True
    adversarial: bool = False
    adv_eps: float = 8 / 255
    adv_alpha: float = 2 / 255
    adv_steps: int = 10
    adv_T: Optional[float] = None
    adv_model_mode: str = "train"
    val_examples: int = 0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    channels_last: Optional[bool] = None
    compile: bool = False
    data_root: Optional[str] = None
    download: bool = False
    checkpoint_dir: Optional[str] = None
    max_batches: Optional[int] = None
    progress: bool = True
    diagnostics: bool = True
    backend: str = "auto"

    def validate(self) -> "TrainConfig":
        """Raise ValueError/TypeError naming the first bad field; return self."""
        _check_temperature("T", self.T)
        if self.adv_T is not None:
            _check_temperature("adv_T", self.adv_T)
        _check_int("epochs", self.epochs, minimum=1)
        _check_int("batch_size", self.batch_size, minimum=1)
        _check_int("adv_steps", self.adv_steps, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        _check_int("val_examples", self.val_examples, minimum=0)
        if self.max_batches is not None:
            _check_int("max_batches", self.max_batches, minimum=1)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("lr_scaling", self.lr_scaling, LR_SCALINGS)
        _check_choice("amp", self.amp, AMP_MODES)
        _check_choice("adv_model_mode", self.adv_model_mode, ADV_MODEL_MODES)
        _check_choice("strong_augment", self.strong_augment, STRONG_AUGMENTS)
        for name in ("lr", "adv_eps", "adv_alpha"):
            _check_positive(name, getattr(self, name))
        for name in ("momentum", "weight_decay", "warmup_epochs"):
            _check_nonnegative(name, getattr(self, name))
        if not 0.0 <= float(self.label_smoothing) < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.warmup_epochs >= self.epochs and self.schedule == "cosine":
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})"
            )
        _check_registry_name("dataset", self.dataset)
        _check_registry_name("model", self.model)
        return self

    def effective_lr_and_decay(self) -> tuple[float, float]:
        """The (learning rate, weight decay) the optimizer is built with, after lr_scaling.

        Example: ``TrainConfig(T=10, lr=0.1, lr_scaling="linear").effective_lr_and_decay()``
        is ``(1.0, 5e-05)``: the loss gradient is 1/T smaller, so the step is restored and the
        decay step lr * wd stays 5e-5.
        """
        if self.lr_scaling == "linear" and self.optimizer == "sgd":
            return self.lr * self.T, self.weight_decay / self.T
        return self.lr, self.weight_decay

    def inner_attack_T(self) -> float:
        """Temperature of the adversarial-training attack's loss."""
        return float(self.T if self.adv_T is None else self.adv_T)

    def trajectory_fields(self) -> dict[str, Any]:
        """The fields that change the weights a run ends with (a resumed run must match)."""
        cosmetic = {"progress", "checkpoint_dir", "data_root", "download", "device"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in cosmetic}


def _check_temperature(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {name}={value!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")


def _check_nonnegative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be >= 0 and finite, got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_registry_name(kind: str, name: Any) -> None:
    """ValueError for a dataset or model name the other modules do not know."""
    if kind == "dataset":
        from tempsoft.data import DATASETS as known
    else:
        from tempsoft.models import MODELS as known
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {sorted(known)}")


@dataclass
class TrainResult:
    """What ``train`` returns.

    Attributes:
        model: the trained network (unwrapped from DDP/compile), in eval mode.
        config: the config it was trained with.
        history: one dict per epoch: loss, train_acc, lr, images_per_s, seconds and the
            diagnostics (grad_logits_norm, grad_features_norm, wrong_class_entropy,
            wrong_class_entropy_norm, logit_std).
        num_classes: C.
        resumed_from: the number of epochs a checkpoint already held, or None.
        seconds: wall time of this call.
        best: with a validation split, the selected epoch: {"epoch", "val_acc",
            "val_pgd_acc" (NaN for standard training), "path" (its weights file or None)};
            None without one.
        best_state: that epoch's weights (a CPU state_dict), or None.
    """

    model: nn.Module
    config: TrainConfig
    history: list[dict[str, float]]
    num_classes: int
    resumed_from: Optional[int] = None
    seconds: float = 0.0
    best: Optional[dict[str, Any]] = None
    best_state: Optional[dict[str, Tensor]] = None

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's record."""
        return self.history[-1]

    def best_model(self) -> nn.Module:
        """A copy of the model with the selected epoch's weights, in eval mode (``model``
        stays the last epoch's).

        Raises:
            ValueError: the run had no validation split (``val_examples=0``).
        """
        if self.best_state is None:
            raise ValueError("this run selected no epoch: train with val_examples > 0")
        import copy

        chosen = copy.deepcopy(self.model)
        chosen.load_state_dict(self.best_state)
        return chosen.eval()


# ======================================================================================
# The loss, the learning-rate rule and the schedule
# ======================================================================================
def temperature_loss(logits: Tensor, labels: Tensor, T: float, *, label_smoothing: float = 0.0,
                     backend: str = "auto") -> Tensor:
    """Mean CE(logits / T, labels) through ``tempsoft.cross_entropy`` (the fused kernels).

    Args:
        logits: (B, C) scores; cast to float32 so bf16 autocast does not round the loss.
        labels: (B,) int64.
        T: temperature > 0.

    Example:
        >>> temperature_loss(torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), T=2.0)
    """
    import tempsoft

    return tempsoft.cross_entropy(logits.float(), labels, T, label_smoothing=label_smoothing,
                                  backend=backend)


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the model's parameters, with ``lr_scaling`` applied, and
    without weight decay on ``decay_free_parameters`` unless ``decay_all_params``."""
    lr, decay = config.effective_lr_and_decay()
    params = [p for p in model.parameters() if p.requires_grad]
    if not config.decay_all_params:
        free = {id(p) for p in decay_free_parameters(model)}
        params = [{"params": [p for p in params if id(p) not in free], "weight_decay": decay},
                  {"params": [p for p in params if id(p) in free], "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=decay,
                               nesterov=config.nesterov and config.momentum > 0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=decay)


def decay_free_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Biases, normalization weights (every parameter of fewer than 2 dimensions) and the
    parameters each submodule names in ``no_weight_decay()``: timm's rule for vision
    transformers (``param_groups_weight_decay``), used by DeiT and Compact Transformers."""
    named = set()
    for prefix, module in model.named_modules():
        if hasattr(module, "no_weight_decay"):
            named |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return [p for name, p in model.named_parameters() if p.ndim <= 1 or name in named]


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule over ``epochs * steps_per_epoch`` steps."""
    total = config.epochs * steps_per_epoch
    if config.schedule == "onecycle":
        lr = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _CosineFactor(total, warmup))


class _CosineFactor:
    """lr multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to 0."""

    def __init__(self, total: int, warmup: int) -> None:
        self.total, self.warmup = total, warmup

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


# ======================================================================================
# Diagnostics: the gradient's step size and direction (the paper's theory)
# ======================================================================================
DIAGNOSTICS = ("grad_logits_norm", "grad_features_norm", "wrong_class_entropy",
               "wrong_class_entropy_norm", "logit_std")


def gradient_diagnostics(logits: Tensor, labels: Tensor, T: float,
                         head_weight: Optional[Tensor] = None) -> dict[str, Tensor]:
    """Per-batch sums of the quantities the step-size / direction claim is about.

    For one example with logits z, p = softmax(z / T) and label y, the per-example loss
    l = CE(z / T, y) has
        dl/dz = (p - e_y) / T                   (size shrinks as 1/T at fixed p)
        dl/dh = W^T dl/dz                       (h: the features entering the last layer W)
    and dl/dz_j for j != y is proportional to the wrong-class weights
        q_j = p_j / sum_{k != y} p_k = softmax over the wrong classes of z_j / T,
    whose entropy H(q) measures the direction: 0 when the gradient pushes against one hardest
    wrong class (T -> 0), ln(C - 1) when it pushes against all of them equally (T -> inf).

    Args:
        logits: (B, C), any float dtype (computed in float32).
        labels: (B,) int64.
        T: the training temperature.
        head_weight: (C, D) weight of the last linear layer (logits = W h + b), or None.

    Returns:
        Sums over the batch (divide by the count for means): "grad_logits_norm",
        "grad_features_norm" (NaN without head_weight), "wrong_class_entropy" (nats),
        "wrong_class_entropy_norm" (H / ln(C - 1)), "logit_std" (std of each row's logits).

    Example:
        >>> d = gradient_diagnostics(torch.randn(8, 10), torch.randint(0, 10, (8,)), T=1.0)
        >>> float(d["wrong_class_entropy"]) / 8 <= math.log(9)
    """
    z = logits.detach().float()
    n_cls = z.shape[1]
    p = torch.softmax(z / T, dim=1)
    onehot = F.one_hot(labels, n_cls).to(z.dtype)
    g = (p - onehot) / T
    out = {"grad_logits_norm": g.norm(dim=1).sum(), "logit_std": z.std(dim=1).sum()}
    if head_weight is not None:
        g_feat = g @ head_weight.detach().float()
        out["grad_features_norm"] = g_feat.norm(dim=1).sum()
    else:
        out["grad_features_norm"] = torch.tensor(float("nan"), device=z.device)
    # The wrong-class softmax is computed from logits directly (not p / (1 - p_y)), which
    # stays exact when p_y rounds to 1 at low T.
    wrong_logits = (z / T).masked_fill(onehot.bool(), float("-inf"))
    log_q = torch.log_softmax(wrong_logits, dim=1)
    q = log_q.exp()
    entropy = -(q * log_q.masked_fill(onehot.bool(), 0.0)).sum(dim=1)
    out["wrong_class_entropy"] = entropy.sum()
    out["wrong_class_entropy_norm"] = entropy.sum() / math.log(max(n_cls - 1, 2))
    return out


def classifier_head(model: nn.Module, num_classes: int) -> Optional[nn.Linear]:
    """The last ``nn.Linear`` with ``out_features == num_classes``: logits = W h + b.

    dl/dh = W^T dl/dz needs only W, so the feature-gradient diagnostic works without hooks
    (and so under DDP and torch.compile). A model without such a layer gets NaN, never a
    wrong number.
    """
    heads = [m for m in model.modules()
             if isinstance(m, nn.Linear) and m.out_features == num_classes]
    return heads[-1] if heads else None


# ======================================================================================
# Checkpoints
# ======================================================================================
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "gauss": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples where serialisation may have produced lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` atomically: to a temporary file in the same folder, then os.replace.

    A kill during the write leaves the previous checkpoint intact, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors and plain Python only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {saved.get('format')!r} is not "
                         f"{CHECKPOINT_FORMAT}; delete it or use another checkpoint_dir")
    mine = config.trajectory_fields()
    # A field the checkpoint predates had the value that reproduces its run.
    theirs = {**LEGACY_VALUES, **saved.get("trajectory", {})}
    unused = set() if config.adversarial else {"adv_model_mode"}
    differ = sorted(k for k in (set(mine) | set(theirs)) - unused
                    if mine.get(k) != theirs.get(k))
    if differ:
        details = ", ".join(f"{k}: saved {theirs.get(k)!r} vs now {mine.get(k)!r}"
                            for k in differ)
        raise ValueError(f"{path} was written by a different run ({details}); resume with the "
                         "same settings, or use another checkpoint_dir")


# ======================================================================================
# Distributed setup (torchrun)
# ======================================================================================
@dataclass
class DistInfo:
    """This process's place in a torchrun job (world_size 1 when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def distributed_info() -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(dist_info: DistInfo, device: torch.device) -> None:
    """Join torchrun's process group once (NCCL on CUDA, Gloo on the CPU)."""
    import torch.distributed as dist

    if not dist_info.active or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    # Rank 0 evaluates between cells while the others wait, so the default 10 min is short.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))


def resolve_device(name: str, dist_info: Optional[DistInfo] = None) -> torch.device:
    """"auto" -> cuda (this process's local GPU under torchrun) when available, else cpu."""
    dist_info = dist_info or DistInfo()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    return device


def shard_for_rank(dataset, dist_info: DistInfo, seed: int):
    """This rank's equal share of ``dataset`` (an ImageDataset), for DDP training.

    A fixed seeded permutation is cut into ``world_size`` equal strided shards (the remainder
    is dropped so that every rank runs the same number of steps, as DistributedSampler with
    drop_last does); each rank's DeviceLoader then shuffles its shard per epoch. Unlike
    DistributedSampler the split between ranks is fixed across epochs; every example is still
    seen once per epoch by exactly one rank.
    """
    if not dist_info.active:
        return dataset
    n = len(dataset.labels)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    per_rank = n // dist_info.world_size
    idx = order[dist_info.rank::dist_info.world_size][:per_rank]
    return dataclasses.replace(dataset, images=dataset.images[idx], labels=dataset.labels[idx])


def _all_reduce_sum(values: Tensor, dist_info: DistInfo) -> Tensor:
    if dist_info.active:
        import torch.distributed as dist

        dist.all_reduce(values)
    return values


# ======================================================================================
# The epoch loop
# ======================================================================================
@dataclass
class _Parts:
    """Everything one run builds before its first epoch."""

    config: TrainConfig
    device: torch.device
    dist: DistInfo
    model: nn.Module           # unwrapped: state_dicts, the attack, the classifier head
    net: nn.Module             # what the step calls: maybe DDP- and compile-wrapped
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any
    steps_per_epoch: int
    num_classes: int
    attack: Any = None
    attack_gen: Optional[torch.Generator] = None
    head: Optional[nn.Linear] = None
    amp_dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    history: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)   # what load_trained needs to rebuild the model
    val_images: Optional[Tensor] = None        # uint8, on the device
    val_labels: Optional[Tensor] = None
    best: Optional[dict] = None                # the selected epoch so far
    best_state: Optional[dict] = None


def _autocast(parts: _Parts):
    if parts.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(parts.device.type, dtype=parts.amp_dtype)


def _train_step(parts: _Parts, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """One update; returns (loss, logits) detached."""
    cfg = parts.config
    if parts.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if parts.attack is not None:
        with _autocast(parts):
            x = parts.attack(x, y)
    with _autocast(parts):
        logits = parts.net(x)
    if parts.amp_dtype is not None and cfg.T != 1.0 and logits.dtype != torch.float32:
        raise ValueError(
            f"the model returns {str(logits.dtype).replace('torch.', '')} logits under "
            f"{str(parts.amp_dtype).replace('torch.', '')} autocast; the "
            f"loss divides them by T={cfg.T:g}, which scales their rounding error by 1/T: end "
            "the model with tempsoft.models.Head (a linear layer computed in fp32), or set "
            "amp='off'")
    loss = temperature_loss(logits, y, cfg.T, label_smoothing=cfg.label_smoothing,
                            backend=cfg.backend)
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts.optimizer.step()
    parts.scheduler.step()
    return loss.detach(), logits.detach()


def _run_epoch(parts: _Parts, epoch: int) -> dict[str, float]:
    """Train one epoch; return its record (means over all ranks)."""
    cfg = parts.config
    parts.model.train()
    parts.loader.set_epoch(epoch)
    sums = _EpochSums(parts.device)
    bar = _progress_bar(parts, epoch)
    lr = parts.optimizer.param_groups[0]["lr"]
    start = time.perf_counter()
    for step, (x, y) in enumerate(parts.loader):
        if step >= parts.steps_per_epoch:
            break
        loss, logits = _train_step(parts, x, y)
        sums.add_batch(loss, logits, y)
        if cfg.diagnostics:
            weight = parts.head.weight if parts.head is not None else None
            sums.add_diagnostics(gradient_diagnostics(logits, y, cfg.T, weight))
        if bar is not None:
            _update_bar(bar, sums, start, step)
    record = sums.finish(parts.dist)
    seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()
    record.update(epoch=epoch + 1, lr=lr, seconds=seconds,
                  images_per_s=record.pop("count") / max(seconds, 1e-9))
    return record


class _EpochSums:
    """Device-side running sums, so the loop never waits on the GPU except to print."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.count = 0                                                    # known on the host
        self.base = torch.zeros(2, dtype=torch.float64, device=device)    # loss * n, correct
        self.diag = torch.zeros(len(DIAGNOSTICS), dtype=torch.float64, device=device)

    def add_batch(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        n = y.shape[0]
        self.count += n
        correct = (logits.argmax(dim=1) == y).sum()
        self.base += torch.stack([loss.double() * n, correct.double()])

    def add_diagnostics(self, d: dict[str, Tensor]) -> None:
        self.diag += torch.stack([d[k].double() for k in DIAGNOSTICS])

    def running(self) -> tuple[float, float, int]:
        loss_sum, correct = self.base.tolist()
        n = max(self.count, 1)
        return loss_sum / n, correct / n, self.count

    def finish(self, dist_info: DistInfo) -> dict[str, float]:
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        total = _all_reduce_sum(torch.cat([self.base, count, self.diag]), dist_info).tolist()
        loss_sum, correct, n = total[:3]
        n = max(n, 1)
        record = {"loss": loss_sum / n, "train_acc": correct / n, "count": total[2]}
        for name, value in zip(DIAGNOSTICS, total[3:]):
            record[name] = value / n
        return record


def _progress_bar(parts: _Parts, epoch: int):
    if not (parts.config.progress and parts.dist.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=parts.steps_per_epoch, desc=f"epoch {epoch + 1}/{parts.config.epochs}",
                leave=False, dynamic_ncols=True)


_BAR_EVERY = 10  # reading the sums syncs with the GPU, so the bar refreshes every 10 steps


def _update_bar(bar, sums: _EpochSums, start: float, step: int) -> None:
    bar.update(1)
    if step % _BAR_EVERY == 0 or step + 1 == bar.total:
        loss, acc, n = sums.running()
        rate = n / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.3f}", img_s=f"{rate:.0f}")


# ======================================================================================
# Building a run
# ======================================================================================
def _amp_dtype(config: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    if config.amp == "bf16" or (config.amp == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _steps_per_epoch(n_examples: int, batch_size: int, max_batches: Optional[int]) -> int:
    steps = n_examples // batch_size  # training drops the last partial batch
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the training set "
                         f"({n_examples} examples on this process)")
    return min(steps, max_batches) if max_batches else steps


def _build(config: TrainConfig, train_set, model: Optional[nn.Module]) -> _Parts:
    from tempsoft.data import DeviceLoader, load_dataset
    from tempsoft.models import build_model

    dist_info = distributed_info()
    device = resolve_device(config.device, dist_info)
    init_distributed(dist_info, device)
    if train_set is None:
        train_set = load_dataset(config.dataset, root=config.data_root, split="train",
                                 download=config.download)
    num_classes = len(train_set.classes)
    val_set = None
    if config.val_examples:
        train_set, val_set = split_validation(train_set, config.val_examples)
    torch.manual_seed(config.seed)  # model initialisation
    if model is None:
        _, channels, height, _ = train_set.images.shape
        model = build_model(config.model, num_classes, in_channels=channels, image_size=height,
                            mean=train_set.mean, std=train_set.std)
    channels_last = (device.type == "cuda") if config.channels_last is None \
        else bool(config.channels_last)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist_info.active and config.batch_size % dist_info.world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                         f"{dist_info.world_size} processes")
    per_rank_batch = config.batch_size // dist_info.world_size
    shard = shard_for_rank(train_set, dist_info, config.seed)
    loader = DeviceLoader(shard, per_rank_batch, shuffle=True, augment=config.augment,
                          device=device, seed=config.seed + 1000 * dist_info.rank,
                          drop_last=True, strong_augment=config.strong_augment)
    steps = _steps_per_epoch(len(shard.labels), per_rank_batch, config.max_batches)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps)
    net = model
    if dist_info.active:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)
    if config.compile:
        net = torch.compile(net)
    parts = _Parts(config=config, device=device, dist=dist_info, model=model, net=net,
                   optimizer=optimizer, scheduler=scheduler, loader=loader,
                   steps_per_epoch=steps, num_classes=num_classes,
                   amp_dtype=_amp_dtype(config, device), channels_last=channels_last)
    parts.meta = dataset_meta(train_set)
    parts.head = classifier_head(model, num_classes)
    if val_set is not None and dist_info.is_main:
        parts.val_images = val_set.images.to(device)
        parts.val_labels = val_set.labels.to(device)
    if config.adversarial:
        parts.attack_gen, parts.attack = _build_attack(config, model, device, dist_info)
    return parts


def _build_attack(config: TrainConfig, model: nn.Module, device: torch.device,
                  dist_info: DistInfo):
    """The inner PGD-Linf of adversarial training, with its own seeded generator."""
    from tempsoft.attacks import PGD

    gen = torch.Generator(device=device)
    gen.manual_seed(config.seed * 7919 + 17 + dist_info.rank)
    attack = PGD(model, eps=config.adv_eps, alpha=config.adv_alpha, steps=config.adv_steps,
                 norm="linf", T=config.inner_attack_T(), random_start=True, restarts=1,
                 generator=gen, model_mode=config.adv_model_mode)
    return gen, attack


def _checkpoint_state(parts: _Parts, epochs_done: int) -> dict[str, Any]:
    state = {
        "format": CHECKPOINT_FORMAT,
        "trajectory": parts.config.trajectory_fields(),
        "world_size": parts.dist.world_size,
        "epoch": epochs_done,
        "model": parts.model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "rng": _rng_state(),
        "history": parts.history,
        "num_classes": parts.num_classes,
        **parts.meta,
    }
    if parts.attack_gen is not None:
        state["attack_generator"] = parts.attack_gen.get_state()
    if parts.best is not None:
        state["best"] = parts.best
    return state


def _restore(parts: _Parts, saved: dict[str, Any], ckpt_path: Path) -> int:
    world = int(saved.get("world_size", 1))
    if world != parts.dist.world_size:
        raise ValueError(f"{ckpt_path} was written by {world} process(es) and this run has "
                         f"{parts.dist.world_size}: each process's data shard and random "
                         "streams differ, so resume with the same number of processes")
    epoch = int(saved["epoch"])
    parts.model.load_state_dict(saved["model"])
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    streams = saved if not parts.dist.active else \
        load_checkpoint(_rank_streams_path(ckpt_path, parts.dist.rank, epoch))
    _set_rng_state(streams["rng"])
    if "buffers" in streams:
        with torch.no_grad():
            for name, buf in parts.model.named_buffers():
                buf.copy_(streams["buffers"][name])
    if parts.attack_gen is not None and "attack_generator" in streams:
        parts.attack_gen.set_state(streams["attack_generator"])
    parts.history = list(saved["history"])
    parts.best = saved.get("best")
    if parts.best is not None and parts.dist.is_main:
        best_path = ckpt_path.parent / parts.best["path"]
        if not best_path.exists():
            raise ValueError(f"{ckpt_path} selected epoch {parts.best['epoch']}, whose weights "
                             f"{best_path} are missing; restore that file or start over")
        parts.best_state = load_checkpoint(best_path)["model"]
    return epoch


def _rank_streams_path(ckpt_path: Path, rank: int, epoch: int) -> Path:
    return ckpt_path.with_name(f"rng-rank{rank}-epoch{epoch}.pt")


def _save_epoch(parts: _Parts, ckpt_path: Path, epochs_done: int) -> None:
    """Checkpoint after an epoch. Under torchrun each rank first writes its own random
    streams and batch-norm buffers (they differ per rank), then rank 0 writes the shared state;
    the previous epoch's rank files go only after the new checkpoint is in place."""
    if parts.dist.active:
        # Each rank's batch-norm buffers differ too (DDP broadcasts rank 0's only at the next
        # forward), and the adversarial-training attack reads them before that broadcast.
        streams = {"rng": _rng_state(),
                   "buffers": {k: v.detach().cpu() for k, v in parts.model.named_buffers()}}
        if parts.attack_gen is not None:
            streams["attack_generator"] = parts.attack_gen.get_state()
        save_checkpoint(_rank_streams_path(ckpt_path, parts.dist.rank, epochs_done), streams)
        _barrier(parts.dist)
    if parts.dist.is_main:
        save_checkpoint(ckpt_path, _checkpoint_state(parts, epochs_done))
        _remove_stale_best(parts, ckpt_path.parent)
    _barrier(parts.dist)
    if parts.dist.active:
        _rank_streams_path(ckpt_path, parts.dist.rank, epochs_done - 1).unlink(missing_ok=True)


# ======================================================================================
# Validation split and the selected epoch (Rice et al. 2020, robust overfitting)
# ======================================================================================
def split_validation(train_set, n: int):
    """(the rest, ``n`` held-out images): a fixed draw (``VAL_SPLIT_SEED``), the same for
    every run on this training set, as Rice et al.'s generate_validation.py (1,000 images)."""
    if n >= len(train_set.labels):
        raise ValueError(f"val_examples={n} leaves no training images (the training set has "
                         f"{len(train_set.labels)})")
    order = torch.randperm(len(train_set.labels),
                           generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    return (train_set.subset(order[n:].sort().values),
            train_set.subset(order[:n].sort().values))


def _validate(parts: _Parts, epoch: int) -> dict[str, float]:
    """Clean accuracy on the held-out images and, for adversarial training, accuracy under the
    training attack (its eps, step, steps and loss temperature) with the model in eval mode,
    as Rice et al. validate.  The attack's starts come from a generator seeded by (seed,
    epoch): validating touches none of the training's random streams."""
    from tempsoft.attacks import PGD

    cfg = parts.config
    model = parts.model
    model.eval()
    attack = None
    if cfg.adversarial:
        gen = torch.Generator(device=parts.device)
        gen.manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, 0x7A1])
                            .generate_state(1, dtype=np.uint64)[0] >> 1))
        attack = PGD(model, eps=cfg.adv_eps, alpha=cfg.adv_alpha, steps=cfg.adv_steps,
                     norm="linf", T=cfg.inner_attack_T(), random_start=True, restarts=1,
                     generator=gen, model_mode="eval")
    clean = robust = 0
    total = parts.val_labels.shape[0]
    for start in range(0, total, cfg.batch_size):
        x = parts.val_images[start:start + cfg.batch_size].float().div_(255.0)
        y = parts.val_labels[start:start + cfg.batch_size]
        if parts.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), _autocast(parts):
            clean += int((model(x).argmax(dim=1) == y).sum())
        if attack is not None:
            with _autocast(parts):
                adv = attack(x, y)
            with torch.no_grad(), _autocast(parts):
                robust += int((model(adv).argmax(dim=1) == y).sum())
    model.train()
    return {"val_acc": clean / total,
            "val_pgd_acc": robust / total if attack is not None else float("nan")}


def _select(parts: _Parts, epoch: int, record: dict[str, float], folder: Optional[Path]) -> None:
    """Keep this epoch if its validation accuracy (PGD accuracy for adversarial training) is
    the best so far (strictly, as Rice et al.); its weights go to best-epoch<e>.pt first, and
    the checkpoint that names that file comes after, so a kill between the two loses
    nothing."""
    key = "val_pgd_acc" if parts.config.adversarial else "val_acc"
    if parts.best is not None and not record[key] > parts.best[key]:
        return
    name = f"best-epoch{epoch + 1}.pt"
    parts.best = {"epoch": epoch + 1, "val_acc": record["val_acc"],
                  "val_pgd_acc": record["val_pgd_acc"], "path": name}
    parts.best_state = {k: v.detach().cpu().clone() for k, v in parts.model.state_dict().items()}
    if folder is not None:
        save_checkpoint(folder / name, {
            "format": CHECKPOINT_FORMAT, "trajectory": parts.config.trajectory_fields(),
            "model": parts.best_state, "num_classes": parts.num_classes,
            "history": parts.history, "best": parts.best, **parts.meta})


def _remove_stale_best(parts: _Parts, folder: Path) -> None:
    """Delete best-epoch files other than the one the checkpoint now names."""
    keep = parts.best["path"] if parts.best is not None else None
    for path in folder.glob("best-epoch*.pt"):
        if path.name != keep:
            path.unlink(missing_ok=True)


def _barrier(dist_info: DistInfo) -> None:
    if dist_info.active:
        import torch.distributed as dist

        dist.barrier()


# ======================================================================================
# train
# ======================================================================================
def train(config: TrainConfig, *, train_set=None, model: Optional[nn.Module] = None,
          on_epoch_end: Optional[Callable[[int, dict], None]] = None) -> TrainResult:
    """Train ``config.model`` on ``config.dataset`` at temperature ``config.T``.

    Args:
        config: the run (validated here).
        train_set: an ``ImageDataset`` to use instead of loading ``config.dataset``.
        model: a model to train instead of building ``config.model``.
        on_epoch_end: called as ``on_epoch_end(epoch, record)`` after each epoch's checkpoint
            is written (progress reports; tests use it to interrupt a run).

    Returns:
        TrainResult: the model in eval mode, the per-epoch history, C.

    Under torchrun every process calls ``train`` with the same config; each trains on its
    shard of the data, DDP averages the gradients, rank 0 writes the checkpoint and every rank
    its own random streams (``rng-rank<r>-epoch<e>.pt`` next to it); a resumed run needs the
    same number of processes.

    Example:
        >>> cfg = TrainConfig(dataset="digits", model="small_cnn", T=0.5, epochs=2,
        ...                   checkpoint_dir="runs/t05")
        >>> res = train(cfg)        # rerunning after a kill resumes from runs/t05
    """
    config.validate()
    started = time.perf_counter()
    parts = _build(config, train_set, model)
    ckpt_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
    start_epoch, resumed_from = 0, None
    if ckpt_path is not None and ckpt_path.exists():
        saved = load_checkpoint(ckpt_path)
        _check_resumable(saved, config, ckpt_path)
        start_epoch = resumed_from = _restore(parts, saved, ckpt_path)
    for epoch in range(start_epoch, config.epochs):
        record = _run_epoch(parts, epoch)
        if parts.val_images is not None:
            record.update(_validate(parts, epoch))
        parts.history.append(record)
        if parts.val_images is not None:
            _select(parts, epoch, record, ckpt_path.parent if ckpt_path is not None else None)
        if ckpt_path is not None:
            _save_epoch(parts, ckpt_path, epoch + 1)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
    parts.model.eval()
    best = None
    if parts.best is not None:
        best = dict(parts.best, path=str(ckpt_path.parent / parts.best["path"])
                    if ckpt_path is not None else None)
    return TrainResult(model=parts.model, config=config, history=parts.history,
                       num_classes=parts.num_classes, resumed_from=resumed_from,
                       seconds=time.perf_counter() - started, best=best,
                       best_state=parts.best_state)


def load_trained(path: str | os.PathLike, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a model from a checkpoint or a ``save_model`` file; returns (model, metadata).

    Example:
        >>> model, meta = load_trained("runs/t05/checkpoint.pt")
        >>> meta["trajectory"]["T"]
    """
    from tempsoft.models import build_model

    saved = load_checkpoint(path)
    if "model" not in saved or "trajectory" not in saved or "input_shape" not in saved:
        raise ValueError(f"{path} is not a tempsoft checkpoint (missing keys: "
                         f"{sorted({'model', 'trajectory', 'input_shape'} - set(saved))})")
    traj = saved["trajectory"]
    channels, size = saved["input_shape"]
    model = build_model(traj["model"], saved["num_classes"], in_channels=channels,
                        image_size=size, mean=tuple(saved["mean"]), std=tuple(saved["std"]))
    model.load_state_dict(saved["model"])
    return model.to(device).eval(), {k: v for k, v in saved.items() if k != "model"}


def dataset_meta(train_set) -> dict[str, Any]:
    """The facts about the data a saved model needs to be rebuilt and evaluated."""
    _, channels, height, _ = train_set.images.shape
    return {
        "input_shape": [int(channels), int(height)],
        "mean": [float(v) for v in train_set.mean],
        "std": [float(v) for v in train_set.std],
        "classes": list(train_set.classes),
        "dataset": train_set.name,
    }


def save_model(path: str | os.PathLike, result: TrainResult, train_set, *,
               best: bool = False) -> None:
    """Save the trained weights (the selected epoch's with ``best=True``) with what
    ``load_trained`` needs to rebuild the model.

    Example:
        >>> save_model("model.pt", result, train_set); model, meta = load_trained("model.pt")
    """
    save_checkpoint(path, {
        "format": CHECKPOINT_FORMAT,
        "trajectory": result.config.trajectory_fields(),
        "model": result.best_model().state_dict() if best else result.model.state_dict(),
        "num_classes": result.num_classes,
        "history": result.history,
        **dataset_meta(train_set),
    })
