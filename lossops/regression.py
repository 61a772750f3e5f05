"""Regression losses: `lossops.l1_loss`, `mse_loss`, `smooth_l1_loss`, `huber_loss`, one custom op `lossops::regression`.

Each is torch's function argument for argument (broadcasting of input and target with torch's warning,
the legacy size_average/reduce, torch's errors for negative beta / non-positive delta), fused by the
shared elementwise driver (lossops/_elementwise.py; kernels in csrc/regression.cpp and
triton_kernels/regression.py). Keyword extras, whose defaults reproduce torch:
  weight: per-element weights broadcastable to the loss (torch's own l1/mse/huber `weight` must have the
    input's size; any broadcastable shape is accepted here). The weighted mean follows torch: l1 and mse
    divide by the sum of the (broadcast) weights, huber by the number of elements; smooth-L1, which torch
    does not weight, does as huber (so smooth_l1(beta) * beta == huber(delta=beta) holds with weights).
  avg_factor: the mean divides the (weighted) sum by this number or 0-d tensor instead (mmdetection's
    convention: ignored with reduction='none', an error with 'sum').
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _elementwise

L1, MSE, SMOOTH_L1, HUBER = 0, 1, 2, 3

_op = _elementwise.define_op("regression", "regression")


def l1_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
            weight: Optional[Tensor] = None, *, avg_factor=None) -> Tensor:
    """Drop-in for torch.nn.functional.l1_loss, fused."""
    return _regression(L1, input, target, _checks.reduction(reduction, size_average, reduce), 0.0, weight, avg_factor)


def mse_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
             weight: Optional[Tensor] = None, *, avg_factor=None) -> Tensor:
    """Drop-in for torch.nn.functional.mse_loss, fused."""
    return _regression(MSE, input, target, _checks.reduction(reduction, size_average, reduce), 0.0, weight, avg_factor)


def smooth_l1_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
                   beta: float = 1.0, *, weight: Optional[Tensor] = None, avg_factor=None) -> Tensor:
    """Drop-in for torch.nn.functional.smooth_l1_loss, fused; beta=0 is L1 (gradient 0 where input == target)."""
    if isinstance(beta, Tensor) and beta.numel() != 1:  # torch's `beta == 0.0` test fails the same way
        raise RuntimeError(f"lossops: beta must be a number, got a tensor of shape {tuple(beta.shape)}")
    beta = _checks.real("beta", beta)
    if not beta >= 0:
        raise RuntimeError(f"smooth_l1_loss does not support negative values for beta (got beta={beta}).")
    return _regression(SMOOTH_L1, input, target, _checks.reduction(reduction, size_average, reduce), beta, weight,
                       avg_factor)


def huber_loss(input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0,
               weight: Optional[Tensor] = None, *, avg_factor=None) -> Tensor:
    """Drop-in for torch.nn.functional.huber_loss, fused."""
    delta = _checks.real("delta", delta)
    if not delta > 0:
        raise RuntimeError(f"huber_loss does not support non-positive values for delta (got delta={delta}).")
    # unlike l1 / mse / smooth-L1, torch's huber_loss promotes nothing: one floating dtype for both
    if not _checks.tensor("input", input).is_floating_point():
        raise RuntimeError(f"lossops: huber_loss input must be a floating-point tensor, got dtype {input.dtype}")
    _checks.same_device(input, target=_checks.tensor("target", target))
    _checks.same_dtype(input, target=target)
    return _regression(HUBER, input, target, _checks.reduction(reduction), delta, weight, avg_factor)


def _regression(kind: int, input: Tensor, target: Tensor, reduction: str, param: float, weight: Optional[Tensor],
                avg_factor) -> Tensor:
    if weight is None and avg_factor is None:
        loss = _elementwise.eager(_op, input, target, reduction, (float(kind), param))
        if loss is not None:
            return loss
    _checks.tensor("input", input)
    _checks.tensor("target", target)
    _checks.same_device(input, target=target)
    # promote_types and a pure-Python broadcast check: traceable by torch.compile, so the same error
    # reaches the user in compiled code (checked before the warning, which Dynamo cannot trace in fullgraph).
    dtype = torch.promote_types(input.dtype, target.dtype)
    shape = _checks.broadcast_shape(input.shape, target.shape)
    if target.size() != input.size():
        warnings.warn(f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
                      "This will likely lead to incorrect results due to broadcasting. "
                      "Please ensure they have the same size.", stacklevel=3)
    x, t = _elementwise.kernel_operands(input, target)
    x, t = x.expand(shape), t.expand(shape)
    weight = _checks.broadcastable("weight", weight, x.shape, input)
    factor = _elementwise.avg_factor(avg_factor, reduction)
    if factor is not None:
        denominator = factor
    elif weight is not None and kind in (L1, MSE):
        # torch: sum(loss * weight) / sum(weight); a broadcast weight repeats each element numel / weight.numel() times
        denominator = weight.detach().sum(dtype=_checks.opmath_dtype(dtype)) * (x.numel() // max(weight.numel(), 1))
    else:
        denominator = x.numel()

    def reference():
        return reference_regression(kind, x, t, param, weight, reduction, denominator)

    if not dtype.is_floating_point:  # torch's integer l1/mse: no kernel serves them
        return reference()
    out_dtype = dtype if weight is None else torch.promote_types(dtype, weight.dtype)
    return _elementwise.elementwise_loss(_op, x, t, reduction=reduction, denominator=denominator, reference=reference,
                                         weight=weight, params=(kind, param), out_dtype=out_dtype)


def reference_regression(kind: int, input: Tensor, target: Tensor, param: float, weight: Optional[Tensor],
                         reduction: str, denominator) -> Tensor:
    """Plain PyTorch (the "reference" backend): torch's per-element loss, weighted, reduced like the kernels."""
    if kind == L1:
        loss = F.l1_loss(input, target, reduction="none")
    elif kind == MSE:
        loss = F.mse_loss(input, target, reduction="none")
    elif kind == SMOOTH_L1:
        loss = F.smooth_l1_loss(input, target, reduction="none", beta=param)
    else:
        loss = F.huber_loss(input, target, reduction="none", delta=param)
    if weight is not None:
        loss = loss * weight
    return _elementwise.reduce_reference(loss, reduction, denominator)
