"""How long a preset would take on one H100 / H200: an estimate, for presets whose
``[costs]`` table says ``basis = "estimated"`` (``tempsoft reproduce --dry-run`` prints it
through tempsoft.study.costs).

Nothing here is measured on a GPU: no preset has run on one yet, so every figure this module
prints is an estimate until a GPU run replaces it.  Its basis:

* work: each cell's forward and backward passes are counted from the preset (epochs, images,
  batch sizes, attack steps and queries, corrupted copies, sequence frames), and each pass is
  costed by the model's forward FLOPs at the dataset's image size, counted layer by layer
  (convolutions and linear layers; attention's own matmuls, a few percent for these small
  token counts, are left out); a backward pass costs twice a forward;
* speed: ``TRAIN_FLOPS`` and ``EVAL_FLOPS`` below, derived from airbench94 (Jordan 2024):
  3.83 s on one A100 for 0.36 PFLOPs of training, 94 TFLOP/s in fp16 without torch.compile.
  This project trains in eager bf16 with per-step gradient diagnostics and evaluates in fp32
  (TF32 convolutions), so half and a quarter of that rate are assumed on the H100, whose own
  peak is about three times the A100's: a margin for what airbench optimises and this project
  does not;
* latency: every forward call costs at least ``CALL_SECONDS`` and every forward + backward at
  least ``STEP_SECONDS`` (eager PyTorch launches each layer's kernels from Python; small
  batches of small models are bound by that, not by FLOPs);
* the attacks are costed as if every attack ran on every image (an upper bound: AutoAttack and
  Square Attack only attack the images earlier attacks left correct);
* the CPU work, corrupting and perturbing the test images once per dataset, is costed by its
  speed measured on a 2-core AMD EPYC (Zen 5) development machine, one thread, while other
  jobs ran on it (load 4 to 7): 7.6 to 10.3 s per 1,000 CIFAR images for all 75 corrupted
  copies, 17 to 25 s for their ten CIFAR-10-P sequences; the slower figures are used
  (``CPU_SECONDS_PER_IMAGE``), and 64x64 images cost 4x.
"""
from __future__ import annotations

import dataclasses
import math

__all__ = ["Estimate", "estimate_preset", "forward_flops"]

TRAIN_FLOPS = 47e12      # bf16 training and attack passes, FLOP/s: airbench94's 94e12 / 2
EVAL_FLOPS = 23e12       # fp32 (TF32) evaluation forwards and attacks: 94e12 / 4
CALL_SECONDS = 1e-3      # floor of one eager forward call
STEP_SECONDS = 3e-3      # floor of one eager forward + backward (and optimizer step)
STARTUP_SECONDS = 30.0   # interpreter, CUDA context, cuDNN autotuning, loading the data
# Measured here (see the module docstring): all 15 x 5 corrupted copies of one CIFAR image,
# and its 10 CIFAR-10-P sequences.
CPU_SECONDS_PER_IMAGE = {"corruption": 10.3e-3, "perturbation": 24.6e-3}
# (train, test) images of each dataset.
DATASET_SIZES = {"cifar10": (50000, 10000), "cifar100": (50000, 10000),
                 "tinyimagenet": (100000, 10000), "digits": (1437, 360)}
DATASET_SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "tinyimagenet": (3, 64, 200),
                  "digits": (1, 8, 10)}
# Worst-case passes per image of the audit's attacks beyond its PGD runs (see attacks/audit.py
# and attacks/autoattack.py): APGD-T attacks 9 target classes x 100 iterations, FAB-T the same
# with about 2 passes per iteration, standard AutoAttack's Square Attack 5,000 queries.
AUTOATTACK_STEPS = {"off": 0, "custom": 100 + 9 * 100, "standard": 100 + 9 * 100 + 9 * 100 * 2}
AUTOATTACK_QUERIES = {"off": 0, "custom": 0, "standard": 5000}
BASIS = ("estimate, not a measurement (no GPU run yet): FLOPs counted per layer, at "
         f"{TRAIN_FLOPS / 1e12:.0f} TFLOP/s for training and {EVAL_FLOPS / 1e12:.0f} TFLOP/s "
         "for evaluation (half and a quarter of airbench94's 94 TFLOP/s on an A100), at least "
         f"{STEP_SECONDS * 1e3:.0f} ms per forward+backward call, every attack on every image, "
         "CPU image generation at the speed measured on the development machine; see "
         "tempsoft/study/estimate.py")


@dataclasses.dataclass
class Estimate:
    """Seconds on one H100/H200, by part; ``cells`` holds (cell id, train s, eval s)."""

    startup: float
    cpu: float
    train: float
    evaluate: float
    cells: list[tuple[str, float, float]]
    missing: list[str]

    @property
    def total(self) -> float:
        return self.startup + self.cpu + self.train + self.evaluate


def forward_flops(model: str, num_classes: int, channels: int, size: int) -> float:
    """FLOPs (2 x multiply-adds) of one image's forward pass through the convolutions and
    linear layers of ``model``, counted with hooks on one CPU forward."""
    import torch
    from torch import nn

    from tempsoft.models import MODELS

    total = 0.0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_out = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += 2.0 * per_out * output[0].numel()
        elif isinstance(module, nn.Linear):
            total += 2.0 * module.in_features * output[0].numel()

    # The architecture alone: its input normalization costs nothing.
    net = MODELS[model](num_classes=num_classes, in_channels=channels, image_size=size)
    hooks = [m.register_forward_hook(count) for m in net.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net.eval()(torch.zeros(1, channels, size, size))
    for hook in hooks:
        hook.remove()
    return total


def _passes(images: int, batch: int, steps: int) -> tuple[float, int]:
    """(image passes, calls) of ``steps`` passes over ``images`` in batches of ``batch``."""
    return float(images) * steps, math.ceil(images / batch) * steps


def _cell_eval(evals: list[str], s, n_test: int, train_T: float,
               frames: float) -> tuple[float, int, float, int]:
    """(forward images, forward calls, fwd+bwd images, fwd+bwd calls) of one evaluation."""
    fwd = fwd_calls = both = both_calls = 0.0

    def add(kind, images, steps):
        nonlocal fwd, fwd_calls, both, both_calls
        n, c = _passes(images, s.batch_size, steps)
        if kind == "fwd":
            fwd, fwd_calls = fwd + n, fwd_calls + c
        else:
            both, both_calls = both + n, both_calls + c

    add("fwd", n_test, 1)
    add("fwd", s.train_examples or 0, 1)
    if "corruption" in evals or "released_c" in evals:
        copies = len(s.corruptions or range(15)) * len(s.severities)
        images = min(n_test, s.corruption_examples or n_test)
        add("fwd", images, copies * (("corruption" in evals) + ("released_c" in evals)))
    if "perturbation" in evals or "released_p" in evals:
        images = min(n_test, s.perturbation_examples or n_test)
        add("fwd", images, round(frames) * (("perturbation" in evals) + ("released_p" in evals)))
    for norm in ("linf", "l2"):
        if f"pgd_{norm}" in evals:
            images = min(n_test, s.pgd_examples or n_test)
            add("both", images, s.pgd_steps * s.pgd_restarts)
            add("fwd", images, 1)
    if "audit" in evals:
        images = min(n_test, s.audit_examples or n_test)
        pgd_runs = 4 if train_T != 1.0 else 3        # CE@1, CE@T, C&W, unbounded
        add("both", images, pgd_runs * s.audit_steps + 1 + s.audit_apgd_steps
            + AUTOATTACK_STEPS[s.audit_autoattack])
        add("fwd", images, s.audit_square_queries + AUTOATTACK_QUERIES[s.audit_autoattack])
    return fwd, int(fwd_calls), both, int(both_calls)


def estimate_preset(preset) -> Estimate:
    """The estimate for every cell of a loaded preset (``tempsoft.reproduce.load_preset``)."""
    from tempsoft.study.grid import cells, eval_settings, train_config
    from tempsoft.robustness.perturbations import perturbation_names, sequence_length

    flops: dict[tuple[str, str], float] = {}
    missing = [f"no size known for dataset {d!r}" for d in preset.datasets
               if d not in DATASET_SIZES]
    if missing:
        return Estimate(0, 0, 0, 0, [], missing)
    train_total = eval_total = cpu = 0.0
    rows = []
    generated: dict[str, dict[str, int]] = {}
    for cell in cells(preset):
        cfg = train_config(preset, cell, None)
        evals, s = eval_settings(preset, cell)
        n_train, n_test = DATASET_SIZES[cell.dataset]
        channels, size, classes = DATASET_SHAPES[cell.dataset]
        key = (cell.model, cell.dataset)
        if key not in flops:
            flops[key] = forward_flops(cell.model, classes, channels, size)
        f = flops[key]
        n_train -= cfg.val_examples
        steps_per_epoch = n_train // cfg.batch_size
        if cfg.max_batches:
            steps_per_epoch = min(steps_per_epoch, cfg.max_batches)
        per_batch = 1 + (cfg.adv_steps + 1 if cfg.adversarial else 0)
        both = steps_per_epoch * cfg.batch_size * per_batch * cfg.epochs
        calls = steps_per_epoch * per_batch * cfg.epochs
        if cfg.val_examples:
            val_passes = 1 + (cfg.adv_steps if cfg.adversarial else 0)
            both += cfg.val_examples * val_passes * cfg.epochs
            calls += math.ceil(cfg.val_examples / cfg.batch_size) * val_passes * cfg.epochs
        train_s = both * 3 * f / TRAIN_FLOPS + calls * STEP_SECONDS
        names = list(s.perturbations or perturbation_names(cell.dataset))
        frames = sum(s.perturbation_length or sequence_length(n, cell.dataset) for n in names)
        fwd, fwd_calls, both_e, both_calls = _cell_eval(evals, s, n_test, cell.T, frames)
        eval_s = (fwd * f + both_e * 3 * f) / EVAL_FLOPS + fwd_calls * CALL_SECONDS \
            + both_calls * STEP_SECONDS
        made = generated.setdefault(cell.dataset, {})
        if "corruption" in evals:
            made["corruption"] = max(made.get("corruption", 0),
                                     min(n_test, s.corruption_examples or n_test))
        if "perturbation" in evals:
            made["perturbation"] = max(made.get("perturbation", 0),
                                       min(n_test, s.perturbation_examples or n_test))
        train_total += train_s
        eval_total += eval_s
        rows.append((cell.id, train_s, eval_s))
    for dataset, made in generated.items():
        pixels = (DATASET_SHAPES[dataset][1] / 32) ** 2      # per-image work grows with area
        cpu += sum(CPU_SECONDS_PER_IMAGE[k] * n * pixels for k, n in made.items())
    return Estimate(STARTUP_SECONDS, cpu, train_total, eval_total, rows, [])
