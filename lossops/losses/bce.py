"""`lossops.binary_cross_entropy_with_logits` and `lossops.binary_cross_entropy`: torch's functions, fused, as the
custom ops `lossops::binary_cross_entropy_with_logits` and `lossops::binary_cross_entropy`.

weight and pos_weight broadcast to the input's shape as in torch; a (C,) pos_weight is read in place, never
expanded (lossops/_elementwise.py). The gradient with respect to the target is computed in the same pass
when the target requires grad. binary_cross_entropy takes probabilities: each log is clamped at -100 and the
input gradient's denominator x (1 - x) at 1e-12, as torch does, and input or target values outside [0, 1] raise
torch's RuntimeError (the kernels check them). Kernels: csrc/bce.cpp, triton_kernels/bce.py.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _elementwise, _family
from .._family import GridShapes as G


@dataclasses.dataclass(frozen=True)
class BCEWithLogitsOptions(_elementwise.ElementwiseOptions):
    pass


def _logits_and_binary(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.randint(0, 2, (6, 5)).to(dtype)]


def _selfcheck_inputs(dtype):
    return torch.randn(512, 80, dtype=dtype) * 4, torch.rand(512, 80, dtype=dtype).round()


def _binary_target(x: Tensor) -> Tensor:
    return torch.randint(0, 2, x.shape, device=x.device).to(x.dtype)


BCE_WITH_LOGITS = _elementwise.declare(
    "binary_cross_entropy_with_logits", BCEWithLogitsOptions, _elementwise.kernel("bce_with_logits", "bce"),
    lambda _tensors, _options: {}, bad_inputs="elementwise", torch_fn=F.binary_cross_entropy_with_logits,
    cases=(_family.Case(_logits_and_binary, {}, F.binary_cross_entropy_with_logits),),
    selfcheck=({}, F.binary_cross_entropy_with_logits, _selfcheck_inputs),
    bench=_family.Bench(F.binary_cross_entropy_with_logits, _binary_target,
                        ((256, 1000), (4096, 1024), (4096, 4096)), columns="columns",
                        grid_shapes=G.TINY + G.SMALL_CLASSES + G.MID + G.ELEMENTWISE_LARGE, grid_quick_shapes=G.TINY,
                        targets=(_family.SpeedTarget((1000, 80), 2.0),)))


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                                     size_average=None, reduce=None, reduction: str = "mean",
                                     pos_weight: Optional[Tensor] = None) -> Tensor:
    """Drop-in for torch.nn.functional.binary_cross_entropy_with_logits, fused forward+backward."""
    if weight is None and pos_weight is None and size_average is None and reduce is None:
        loss = _elementwise.eager(BCE_WITH_LOGITS, input, target, reduction, BCEWithLogitsOptions())
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
    return _elementwise.elementwise_loss(BCE_WITH_LOGITS, input_k, target_k, options=BCEWithLogitsOptions(reduction),
                                         denominator=input.numel(), reference=reference, weight=weight,
                                         aux=pos_weight, out_dtype=target.dtype)


BCE_WITH_LOGITS.function = binary_cross_entropy_with_logits


def _real_weight(name: str, value: Optional[Tensor], input: Tensor, bool_ok: bool) -> Optional[Tensor]:
    """torch multiplies by an integer (or, for weight, boolean) tensor in the loss's dtype; a complex one cannot be
    cast to that dtype, and pos_weight - 1 is undefined for a boolean one: both are RuntimeErrors there."""
    if not isinstance(value, Tensor) or value.is_floating_point():
        return value
    if value.is_complex() or (value.dtype == torch.bool and not bool_ok):
        raise RuntimeError(f"lossops: {name} must be a real{'' if bool_ok else ', non-boolean'} tensor, "
                           f"got dtype {value.dtype}")
    return value.to(input.dtype)


BCE_WITH_LOGITS.module = _family.make_module(BCE_WITH_LOGITS, "BCEWithLogitsLoss",
                                             doc="Drop-in for torch.nn.BCEWithLogitsLoss.")


@dataclasses.dataclass(frozen=True)
class BCEOptions(_elementwise.ElementwiseOptions):
    pass


def _probabilities_and_targets(dtype):
    return [torch.rand(6, 5, dtype=dtype) * 0.98 + 0.01, torch.rand(6, 5, dtype=dtype)]


def _selfcheck_probabilities(dtype):
    return torch.rand(512, 80, dtype=dtype), torch.rand(512, 80, dtype=dtype).round()


def _bench_probabilities(shape, dtype, device):
    return (torch.rand(shape, dtype=dtype, device=device).requires_grad_(),
            torch.rand(shape, dtype=dtype, device=device).round())


BCE = _elementwise.declare(
    "binary_cross_entropy", BCEOptions, _elementwise.kernel("binary_cross_entropy", "bce"),
    lambda _tensors, _options: {}, bad_inputs="elementwise", torch_fn=F.binary_cross_entropy,
    cases=(_family.Case(_probabilities_and_targets, {}, F.binary_cross_entropy, link=torch.sigmoid),),
    selfcheck=({}, F.binary_cross_entropy, _selfcheck_probabilities),
    bench=_family.Bench(F.binary_cross_entropy, _binary_target, ((256, 1000), (4096, 1024), (4096, 4096)),
                        columns="columns", make_inputs=_bench_probabilities,
                        grid_shapes=G.TINY + G.MID + G.ELEMENTWISE_LARGE, grid_quick_shapes=G.TINY))


def binary_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                         reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.binary_cross_entropy (probabilities in), fused forward+backward."""
    if weight is None and size_average is None and reduce is None:
        loss = _elementwise.eager(BCE, input, target, reduction, BCEOptions())
        if loss is not None:
            return loss
    reduction = _checks.reduction(reduction, size_average, reduce)
    _checks.tensor("input", input)
    _checks.tensor("target", target)
    if target.size() != input.size():
        raise ValueError(f"Using a target size ({target.size()}) that is different to the input size "
                         f"({input.size()}) is deprecated. Please ensure they have the same size.")
    _checks.same_device(input, target=target)
    _checks.floating("input", input, exception=RuntimeError)
    _checks.same_dtype(input, target=target)  # torch's kernel takes one dtype for both; a weight is cast
    weight = _real_weight("weight", weight, input, bool_ok=True)
    weight = _checks.broadcastable("weight", weight, input.shape, input, exception=RuntimeError)

    def reference():
        return F.binary_cross_entropy(input, target, weight, reduction=reduction)

    input_k, target_k = _elementwise.kernel_operands(input, target)
    return _elementwise.elementwise_loss(BCE, input_k, target_k, options=BCEOptions(reduction),
                                         denominator=input.numel(), reference=reference, weight=weight)


BCE.function = binary_cross_entropy
BCE.module = _family.make_module(BCE, "BCELoss", doc="Drop-in for torch.nn.BCELoss.")
