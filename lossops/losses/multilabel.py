"""`lossops.multilabel_soft_margin_loss`: torch's function, fused, as the custom op
`lossops::multilabel_soft_margin_loss`.

torch's definition (F.multilabel_soft_margin_loss): each element's -(t log sigmoid(x) + (1 - t) log sigmoid(-x)),
times weight, summed over the last (class) dimension and divided by its size C; then per row ('none'), their mean
or their sum. That element is binary cross-entropy with logits, so the op runs its kernel (csrc/bce.cpp,
triton_kernels/bce.py: the input's and target's gradients in one pass, a (C,) weight read compactly). The
reduction maps onto the elementwise op's: 'mean' is the mean over every element; 'sum' the mean with denominator C;
'none' the per-element losses summed over C here. A weight that requires grad takes the reference path (torch
differentiates it), as do integer inputs and a target that broadcasts the input to a larger shape.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _elementwise, _family
from .._family import GridShapes as G
from .bce import _binary_target, _logits_and_binary, _selfcheck_inputs


@dataclasses.dataclass(frozen=True)
class MultiLabelSoftMarginOptions(_elementwise.ElementwiseOptions):
    pass


def _labels_weighted(dtype):
    return [*_logits_and_binary(dtype), torch.rand(5, dtype=dtype) + 0.5]


MULTILABEL_SOFT_MARGIN_LOSS = _elementwise.declare(
    "multilabel_soft_margin_loss", MultiLabelSoftMarginOptions, _elementwise.kernel("bce_with_logits", "bce"),
    lambda _tensors, _options: {}, bad_inputs="multilabel", torch_fn=F.multilabel_soft_margin_loss,
    # No torch_fn in the cases: under autocast torch computes its formula's log-sigmoids in bf16, lossops in float32
    # from the bf16 logits (closer to the float64 value, tests/test_multilabel_soft_margin.py), so torch is no
    # oracle there; the tests compare with it everywhere else.
    cases=(_family.Case(_logits_and_binary, {}), _family.Case(_labels_weighted, dict(reduction="sum"))),
    selfcheck=({}, F.multilabel_soft_margin_loss, _selfcheck_inputs),
    bench=_family.Bench(F.multilabel_soft_margin_loss, _binary_target, ((256, 1000), (4096, 1024), (4096, 4096)),
                        columns="classes", grid_shapes=G.TINY + G.SMALL_CLASSES + G.MID + G.ELEMENTWISE_LARGE,
                        grid_quick_shapes=G.TINY),
    sharding=None)


def multilabel_soft_margin_loss(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                                reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.multilabel_soft_margin_loss, fused forward+backward (the target's gradient
    in the same pass)."""
    if (weight is None and size_average is None and reduce is None and reduction in ("mean", "sum", "none")
            and isinstance(input, Tensor) and input.dim() > 0):
        loss = _elementwise.eager(MULTILABEL_SOFT_MARGIN_LOSS, input, target, reduction,
                                  MultiLabelSoftMarginOptions())
        if loss is not None:
            return _per_row(loss, reduction, input)
    if size_average is not None or reduce is not None:
        reduction = _checks.reduction(reduction, size_average, reduce)
    elif reduction not in ("none", "mean", "sum"):  # torch adds the reduction to a string: a TypeError for others
        raise ValueError(reduction + " is not valid (lossops: reduction must be 'none', 'mean' or 'sum')")
    _checks.tensor("input", input)
    _checks.tensor("target", target)
    if weight is not None:
        _checks.tensor("weight", weight)
    _checks.same_device(input, target=target, weight=weight)

    def reference():
        return F.multilabel_soft_margin_loss(input, target, weight, reduction=reduction)

    def per_element_reference():  # what the op computes: per element for 'none' (summed over C below)
        if reduction != "none":
            return reference()
        loss = -(target * F.logsigmoid(input) + (1 - target) * F.logsigmoid(-input))
        return loss * weight if weight is not None else loss

    shape = _checks.broadcast_shape(input.shape, target.shape)
    if weight is not None:
        shape = _checks.broadcast_shape(shape, weight.shape, ("the input and target", "weight"))
    dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        dtype = torch.promote_types(dtype, weight.dtype)
    if not input.is_floating_point() and not input.is_complex():  # torch's log-sigmoid of the input refuses them
        raise NotImplementedError(f"lossops: multilabel_soft_margin_loss input must be a floating-point tensor, got "
                                  f"dtype {input.dtype}")
    if input.dim() == 0 or shape != input.shape or not dtype.is_floating_point or input.is_complex():
        return reference()  # torch's errors and dtype rules, and a target that makes the loss larger than the input
    x, t = _elementwise.kernel_operands(input, target)
    if not _checks.autocast_enabled(input.device):
        x, t = x.to(dtype), t.to(dtype)
    C = input.shape[-1]
    # 'sum' is the mean with denominator C (the sum of the rows' means over C)
    options = MultiLabelSoftMarginOptions("mean" if reduction != "none" else "none")
    loss = _elementwise.elementwise_loss(MULTILABEL_SOFT_MARGIN_LOSS, x, t.expand(shape), options=options,
                                         denominator=input.numel() if reduction == "mean" else C,
                                         reference=per_element_reference, weight=weight, out_dtype=dtype)
    return loss.sum(-1) / C if reduction == "none" else loss


def _per_row(loss: Tensor, reduction: str, input: Tensor) -> Tensor:
    """The loss from the eager path's elementwise one (mean over every element, sum, or per element)."""
    if reduction == "mean":
        return loss
    C = input.shape[-1]
    return loss / C if reduction == "sum" else loss.sum(-1) / C


MULTILABEL_SOFT_MARGIN_LOSS.function = multilabel_soft_margin_loss
MULTILABEL_SOFT_MARGIN_LOSS.module = _family.make_module(MULTILABEL_SOFT_MARGIN_LOSS, "MultiLabelSoftMarginLoss",
                                                         doc="Drop-in for torch.nn.MultiLabelSoftMarginLoss.")
