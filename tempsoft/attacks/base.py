"""The attack base class: argument and input checks, eval mode, bounds, batched restarts.

An attack is called as ``adv = attack(images, labels)``. The base class checks the inputs
once, puts the model in eval mode and its parameters at ``requires_grad=False`` (restoring
every submodule's mode and every flag afterwards, also on error), and hands a
:class:`~tempsoft.attacks.steps.Geometry` to the subclass's ``_run``, which holds only the
attack's loop. Normalization belongs inside the model: images live in
[lower, upper] (default [0, 1]).
"""
import contextlib
import math
import numbers
import warnings
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from tempsoft.ops.pgd import START_MODES, check_bounds, norm_code, per_sample, resolve_backend
from tempsoft.attacks.steps import Geometry, frozen_parameters, succeeded


MODEL_MODES = ("eval", "train", "as-is")


@contextlib.contextmanager
def model_mode(model, mode: str = "eval") -> Iterator[None]:
    """Every submodule in ``mode`` ("eval" or "train") inside the block, each one's own mode
    restored after; "as-is" leaves the model alone.

    Restoring per submodule (not ``model.train(was)``) keeps mixed states intact, such as a
    model in train mode with frozen batch-norm layers. A callable that is not an
    ``nn.Module`` has no mode to set: under "eval" or "train" it gets a warning, because a
    network it wraps may sit in train mode, where batch norm uses (and updates) the
    statistics of each attack batch and dropout draws new masks, so robust accuracy would
    change with the batch and with how restarts are batched.
    """
    if mode not in MODEL_MODES:
        raise ValueError(f"model_mode must be one of {MODEL_MODES}, got {mode!r}")
    if mode == "as-is":
        yield
        return
    if not isinstance(model, nn.Module):
        warnings.warn(
            f"the attacked model is a {type(model).__name__}, not an nn.Module, so it cannot be "
            f"put in {mode} mode; if it wraps a network with batch norm or dropout, put that "
            "network in the mode you want yourself and pass model_mode='as-is' (or pass the "
            "nn.Module itself)", UserWarning, stacklevel=4)
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train(mode == "train")
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


def eval_mode(model) -> contextlib.AbstractContextManager:
    """Every submodule in eval mode inside the block; each one's own mode restored after."""
    return model_mode(model, "eval")


def check_finite_output(adv: Tensor, who: str) -> Tensor:
    """RuntimeError unless every adversarial image is finite.

    A NaN image is classified as some class other than its label (argmax of NaN logits), so
    it would count as a successful attack and lower robust accuracy for no reason: it is a
    bug to report, never a result.
    """
    bad = ~torch.isfinite(adv.reshape(adv.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise RuntimeError(
            f"{who} produced {int(bad.sum())} non-finite adversarial image(s) of "
            f"{adv.shape[0]} (first at index {int(bad.nonzero()[0])}); this is a bug in the "
            "attack, not a success: please report it with the model and inputs")
    return adv


def check_start(start: str) -> str:
    if start not in START_MODES:
        raise ValueError(f"start must be one of {START_MODES}, got {start!r}")
    return start


def check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_radius(name: str, value, finite: bool = False):
    """eps or a step size: a number >= 0 (finite if `finite`), or a tensor (checked per call
    against the batch)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if not value >= 0 or (finite and math.isinf(value)):  # also rejects NaN
        raise ValueError(f"{name} must be >= 0{' and finite' if finite else ''}, got {value}")
    return float(value)


class Attack:
    """Base class of the attacks. Subclasses implement ``_run(geo, labels) -> x_adv``.

    Args:
        model: a module (or callable) mapping images (B, ...) in [lower, upper] to logits (B, C).
        eps: radius of the threat ball: a number >= 0, or a (B,) tensor per sample.
        norm: "linf" or "l2".
        targeted: when True, ``labels`` passed to the call are the target classes.
        lower, upper: the box the images live in.
        generator: torch.Generator for the random starts (reproducible; the global RNG is
            never touched). Its device may differ from the images'.
        backend: backend of the fused step ("auto", "cpu", "cuda", "triton", "torch").
        model_mode: "eval" (default: every submodule in eval mode during the attack, each
            one's mode restored after), "train" (batch norm on the attack batch's statistics,
            as in Madry et al.'s adversarial training), or "as-is" (the caller's choice).
            A model that is not an ``nn.Module`` cannot be switched: "eval" and "train" then
            warn.
    """

    def __init__(self, model, eps=8 / 255, norm: str = "linf", targeted: bool = False,
                 lower: float = 0.0, upper: float = 1.0,
                 generator: Optional[torch.Generator] = None, backend: str = "auto",
                 model_mode: str = "eval") -> None:
        if model_mode not in MODEL_MODES:
            raise ValueError(f"model_mode must be one of {MODEL_MODES}, got {model_mode!r}")
        if not callable(model):
            raise TypeError(f"model must be callable (an nn.Module), got {type(model).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.model = model
        self.eps = check_radius("eps", eps)
        self.norm = norm.lower() if isinstance(norm, str) else norm
        self._code = norm_code(norm)
        self.targeted = bool(targeted)
        self.lower, self.upper = check_bounds(lower, upper)
        self.generator = generator
        self.backend = backend
        self.model_mode = model_mode

    # -- the call ----------------------------------------------------------------------
    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        """Adversarial images for ``images`` (B, ...) and ``labels`` (B,); inputs unchanged.

        Returns:
            a new tensor shaped like ``images``, within the eps-ball and [lower, upper].

        Raises:
            RuntimeError: the attack produced a non-finite image (a bug, never a success).
        """
        self._check_inputs(images, labels)
        if images.shape[0] == 0:
            return images.detach().clone()
        labels = labels.long()  # gather() in the margin losses takes int64 indices
        with model_mode(self.model, self.model_mode), frozen_parameters(self.model):
            self._check_labels_against_model(images, labels)
            adv = self._run(self._geometry(images.detach()), labels)
        return check_finite_output(adv.detach(), type(self).__name__)

    def _run(self, geo: Geometry, labels: Tensor) -> Tensor:
        """The attack's loop, on the checked batch; the model is in eval mode."""
        raise NotImplementedError

    # -- checks --------------------------------------------------------------------------
    def _check_inputs(self, images: Tensor, labels: Tensor) -> None:
        if not isinstance(images, Tensor) or not isinstance(labels, Tensor):
            raise TypeError(
                f"images and labels must be tensors, got {type(images).__name__} and "
                f"{type(labels).__name__}"
            )
        if images.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"images must be float32 or float64, got {images.dtype}")
        if images.dim() < 2:
            raise ValueError(
                f"images must be a batch (B, ...) with B >= 1, got shape {tuple(images.shape)}"
            )
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"expected one label per image: images {tuple(images.shape)} need labels of "
                f"shape ({images.shape[0]},), got {tuple(labels.shape)}"
            )
        if labels.device != images.device:
            raise ValueError(f"labels are on {labels.device} but images on {images.device}")
        if images.numel() == 0:
            return
        lo, hi = torch.aminmax(images.detach())
        lo, hi = float(lo), float(hi)
        if not (self.lower <= lo and hi <= self.upper):  # also catches NaN
            raise ValueError(
                f"images must lie in [lower, upper] = [{self.lower}, {self.upper}] (normalize "
                f"inside the model), got values in [{lo}, {hi}]"
            )

    def _check_labels_against_model(self, images: Tensor, labels: Tensor) -> None:
        """IndexError for a label outside [0, C), C read from one no-grad forward of one image.

        That forward runs in eval mode whatever the attack's mode: in train mode it would move
        batch-norm statistics by a one-image batch.
        """
        mode = model_mode(self.model, "eval") if isinstance(self.model, nn.Module) \
            else contextlib.nullcontext()
        with torch.no_grad(), mode:
            out = self.model(images[:1].detach())
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the model must return logits of shape (B, C); for B=1 got {got}")
        n_classes = out.shape[1]
        lo, hi = (int(v) for v in torch.aminmax(labels.long()))
        if lo < 0 or hi >= n_classes:
            bad = lo if lo < 0 else hi
            raise IndexError(
                f"label {bad} is out of range for a model with {n_classes} classes "
                f"(expected 0 <= label < {n_classes})"
            )

    def _geometry(self, x_nat: Tensor) -> Geometry:
        x_nat = x_nat.contiguous()  # the fused step's fast path takes contiguous buffers
        batch = x_nat.shape[0]
        eps = per_sample("eps", self.eps, batch, x_nat)
        return Geometry(x_nat, eps, self.norm, self._code, self.lower, self.upper,
                        resolve_backend(self.backend, x_nat))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._repr_fields().items())
        return f"{type(self).__name__}({fields})"

    def _repr_fields(self) -> dict:
        return {"eps": self.eps, "norm": self.norm, "targeted": self.targeted}


class RestartsMixin:
    """Batched restarts: run `restarts` independent attempts as one (restarts * B) batch
    (in groups of at most ``max_batch`` images), keep each sample's worst case.

    The worst case of a sample is an attempt that succeeded (the first such), else the one
    with the highest loss. A CUDA out-of-memory error halves the group and retries.
    """

    def _run_restarts(self, geo: Geometry, labels: Tensor, restarts: int,
                      max_batch: Optional[int]) -> Tensor:
        batch = geo.x_nat.shape[0]
        group = restarts if max_batch is None else max(1, min(restarts, max_batch // max(batch, 1)))
        best_x = best_key = None
        done = 0
        while done < restarts:
            r = min(group, restarts - done)
            try:
                x, key = self._attempts(geo, labels, r, need_key=restarts > 1)
            except torch.cuda.OutOfMemoryError:
                if r == 1:
                    raise
                group = max(1, r // 2)
                torch.cuda.empty_cache()
                continue
            if restarts == 1:
                return x
            best_x, best_key = _keep_worst(best_x, best_key, x, key, r, batch)
            done += r
        return best_x

    def _attempts(self, geo: Geometry, labels: Tensor, r: int, need_key: bool):
        """r stacked attempts -> (x (r*B, ...), key (r*B,) or None): key orders the worst case.

        Subclasses implement ``_attempt(geo, labels, r) -> x (r*B, ...)`` for the batch
        stacked r times (``geo.repeat(r)``); they draw the r random starts one after the
        other, so grouping restarts differently draws the same numbers.
        """
        x = self._attempt(geo, labels, r)
        if not need_key:
            return x, None
        labels_r = labels.repeat(r)
        with torch.no_grad():
            logits = self.model(x)
            loss = self.loss_fn(logits, labels_r)
        won = succeeded(logits, labels_r, self.targeted)
        return x, torch.where(won, torch.full_like(loss, float("inf")), loss)


def _keep_worst(best_x, best_key, x, key, r, batch):
    """Fold r attempts (stacked along dim 0) into the running per-sample worst case."""
    x = x.reshape((r, batch) + x.shape[1:])
    key = key.reshape(r, batch)
    # NaN losses never win (a NaN key would poison argmax).
    key = torch.nan_to_num(key, nan=float("-inf"))
    idx = key.argmax(dim=0)
    cols = torch.arange(batch, device=x.device)
    cand_x, cand_key = x[idx, cols], key[idx, cols]
    if best_x is None:
        return cand_x, cand_key
    better = cand_key > best_key
    shape = (batch,) + (1,) * (x.dim() - 2)
    return torch.where(better.reshape(shape), cand_x, best_x), torch.maximum(cand_key, best_key)
