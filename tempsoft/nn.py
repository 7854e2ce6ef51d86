"""nn.Module wrappers of the functional ops."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from tempsoft.ops.cross_entropy import cross_entropy


class TemperatureCrossEntropyLoss(nn.Module):
    r"""``nn.CrossEntropyLoss`` of ``input / T``; see :func:`tempsoft.cross_entropy`.

    Args:
        T: the temperature (number or tensor; a per-sample (N,) tensor is passed at call
            time instead, as ``loss(input, target, T=...)``).
        learn_T: make T a learnable scalar ``nn.Parameter`` (temperature scaling for
            calibration, Guo et al. 2017). It is stored as log T so it stays positive.
        weight, ignore_index, reduction, label_smoothing, backend, inplace_backward: as in
            :func:`tempsoft.cross_entropy`.

    Example::

        >>> crit = TemperatureCrossEntropyLoss(T=1.0, learn_T=True)
        >>> opt = torch.optim.LBFGS(crit.parameters(), lr=0.1)
        >>> loss = crit(val_logits, val_labels)  # fit T on held-out logits
    """

    def __init__(
        self,
        T: float | Tensor = 1.0,
        weight: Optional[Tensor] = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        learn_T: bool = False,
        backend: str = "auto",
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        if learn_T:
            t0 = torch.as_tensor(T, dtype=torch.float32)
            if t0.dim() != 0 or not bool(t0 > 0):
                raise ValueError(f"learn_T needs a positive scalar initial T, got {T!r}")
            self.log_T = nn.Parameter(t0.log())
            self._T = None
        else:
            self.log_T = None
            self._T = T
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.backend = backend
        self.inplace_backward = inplace_backward

    @property
    def T(self) -> float | Tensor:
        return self.log_T.exp() if self.log_T is not None else self._T

    def forward(self, input: Tensor, target: Tensor, T: float | Tensor | None = None) -> Tensor:
        return cross_entropy(
            input,
            target,
            self.T if T is None else T,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            backend=self.backend,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        T = f"{float(self.T):.4g}" if self.log_T is not None else repr(self._T)
        return f"T={T}, reduction={self.reduction!r}, label_smoothing={self.label_smoothing}"
