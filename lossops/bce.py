"""`lossops.binary_cross_entropy_with_logits`: torch's function, fused, as the custom op `lossops::bce_with_logits`.

weight and pos_weight broadcast to the input's shape as in torch; a (C,) pos_weight is read in place, never
expanded (lossops/_elementwise.py). The gradient with respect to the target is computed in the same pass
when the target requires grad. Kernels: csrc/bce.cpp, triton_kernels/bce.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _elementwise

_op = _elementwise.define_op("bce_with_logits", "bce")


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                                     size_average=None, reduce=None, reduction: str = "mean",
                                     pos_weight: Optional[Tensor] = None) -> Tensor:
    """Drop-in for torch.nn.functional.binary_cross_entropy_with_logits, fused forward+backward."""
    reduction = _checks.reduction(reduction, size_average, reduce)
    _checks.floating("input", input)
    _checks.tensor("target", target)
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    _checks.floating("target", target)
    _checks.same_device(input, target=target)
    weight = _checks.broadcastable("weight", weight, input.shape, input, exception=RuntimeError)
    pos_weight = _checks.broadcastable("pos_weight", pos_weight, input.shape, input, exception=RuntimeError)

    def reference():
        return F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)

    # torch's loss has the target's dtype: it is computed as (1 - target) * input - ..., in place.
    input_k, target_k = _elementwise.kernel_operands(input, target)
    return _elementwise.elementwise_loss(_op, input_k, target_k, reduction=reduction,
                                         denominator=input.numel(), reference=reference, weight=weight,
                                         aux=pos_weight, out_dtype=target.dtype)
