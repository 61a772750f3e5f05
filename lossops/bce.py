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
    if weight is None and pos_weight is None and size_average is None and reduce is None:
        loss = _elementwise.eager(_op, input, target, reduction)
        if loss is not None:
            return loss
    reduction = _checks.reduction(reduction, size_average, reduce)
    _checks.floating("input", input)
    _checks.tensor("target", target)
    if target.size() != input.size():
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    _checks.floating("target", target)
    _checks.same_device(input, target=target)
    weight = _real_weight("weight", weight, input, bool_ok=True)
    pos_weight = _real_weight("pos_weight", pos_weight, input, bool_ok=False)
    weight = _checks.broadcastable("weight", weight, input.shape, input, exception=RuntimeError)
    pos_weight = _checks.broadcastable("pos_weight", pos_weight, input.shape, input, exception=RuntimeError)

    def reference():
        return F.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction, pos_weight=pos_weight)

    # torch's loss has the target's dtype: it is computed as (1 - target) * input - ..., in place.
    input_k, target_k = _elementwise.kernel_operands(input, target)
    return _elementwise.elementwise_loss(_op, input_k, target_k, reduction=reduction,
                                         denominator=input.numel(), reference=reference, weight=weight,
                                         aux=pos_weight, out_dtype=target.dtype)


def _real_weight(name: str, value: Optional[Tensor], input: Tensor, bool_ok: bool) -> Optional[Tensor]:
    """torch multiplies by an integer (or, for weight, boolean) tensor in the loss's dtype; a complex one cannot be
    cast to that dtype, and pos_weight - 1 is undefined for a boolean one: both are RuntimeErrors there."""
    if not isinstance(value, Tensor) or value.is_floating_point():
        return value
    if value.is_complex() or (value.dtype == torch.bool and not bool_ok):
        raise RuntimeError(f"lossops: {name} must be a real{'' if bool_ok else ', non-boolean'} tensor, "
                           f"got dtype {value.dtype}")
    return value.to(input.dtype)
