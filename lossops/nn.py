"""nn.Module wrappers: each forward calls the functional op with the module's stored arguments."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import cross_entropy as _ce


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss, plus lossops.cross_entropy's keyword extras."""

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, lse_square_scale: float = 0.0,
                 softcap: Optional[float] = None, inplace_backward: bool = False):
        super().__init__()
        from ._checks import reduction as _reduction
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _reduction(reduction, size_average, reduce)
        self.label_smoothing = label_smoothing
        self.lse_square_scale = lse_square_scale
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _ce.cross_entropy(input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
                                 label_smoothing=self.label_smoothing, lse_square_scale=self.lse_square_scale,
                                 softcap=self.softcap, inplace_backward=self.inplace_backward)
