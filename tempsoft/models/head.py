"""The classifier head every model ends with: a linear layer whose logits stay in fp32.

The training loss divides the logits by T. Under bf16 autocast a linear layer would round its
output to bf16 (8 significant bits) before that division: a logit of 8 moves in steps of
1/32, which at T = 0.1 are steps of 0.3 in the loss's softmax input. The head is a tiny share
of a network's cost, so it always runs in fp32, under autocast or not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Head"]


class Head(nn.Linear):
    """``nn.Linear`` computed in fp32 even under autocast (same parameters, same state_dict).

    Shape: (B, in_features) of any float dtype -> (B, out_features) float32 (or the input's
    dtype when that is float64 and autocast is off).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return F.linear(x.float(), self.weight.float(),
                                None if self.bias is None else self.bias.float())
        return super().forward(x)
