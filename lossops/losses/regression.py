"""Regression losses: `lossops.l1_loss`, `mse_loss`, `smooth_l1_loss`, `huber_loss`, each its own custom op
(`lossops::l1_loss`, ...).

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

import dataclasses
import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _elementwise, _family
from .._family import GridShapes as G

L1, MSE, SMOOTH_L1, HUBER = 0, 1, 2, 3
# One kernel serves the four losses: kind selects the formula, beta is smooth-L1's beta or Huber's delta.
KERNEL = _elementwise.kernel("regression", "regression", ("kind", "beta"))


@dataclasses.dataclass(frozen=True)
class L1Options(_elementwise.ElementwiseOptions):
    pass


@dataclasses.dataclass(frozen=True)
class MSEOptions(_elementwise.ElementwiseOptions):
    pass


@dataclasses.dataclass(frozen=True)
class SmoothL1Options(_elementwise.ElementwiseOptions):
    beta: float = 1.0


@dataclasses.dataclass(frozen=True)
class HuberOptions(_elementwise.ElementwiseOptions):
    delta: float = 1.0


def _pair(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.randn(6, 5, dtype=dtype)]


def _selfcheck_pair(dtype):
    return torch.randn(4096, dtype=dtype), torch.randn(4096, dtype=dtype)


def _regression_target(x: Tensor) -> Tensor:
    return torch.randn_like(x)


ELEMENTWISE_SHAPES = ((256, 1000), (4096, 1024), (4096, 4096))


def _declare(name, options, kind, param, bad=(), selfcheck_kwargs=None) -> _family.Family:
    torch_fn = getattr(F, name)
    kwargs = selfcheck_kwargs or {}
    return _elementwise.declare(
        name, options, KERNEL, lambda _tensors, o: {"kind": kind, "beta": float(getattr(o, param)) if param else 0.0},
        reference=None, bad_inputs="elementwise", torch_fn=torch_fn,
        cases=(_family.Case(_pair, kwargs, torch_fn, bad=bad),),
        selfcheck=(kwargs, functools.partial(torch_fn, **kwargs), _selfcheck_pair),
        bench=_family.Bench(torch_fn, _regression_target, ELEMENTWISE_SHAPES, columns="columns",
                            grid_shapes=G.TINY + ((1000, 80),) + G.MID + G.ELEMENTWISE_LARGE, grid_quick_shapes=G.TINY))


L1_LOSS = _declare("l1_loss", L1Options, L1, None)
MSE_LOSS = _declare("mse_loss", MSEOptions, MSE, None)
SMOOTH_L1_LOSS = _declare("smooth_l1_loss", SmoothL1Options, SMOOTH_L1, "beta", bad=(dict(beta=-1.0),),
                          selfcheck_kwargs=dict(beta=0.5))
HUBER_LOSS = _declare("huber_loss", HuberOptions, HUBER, "delta", bad=(dict(delta=0.0),),
                      selfcheck_kwargs=dict(delta=0.5))


def l1_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
            weight: Optional[Tensor] = None, *, avg_factor=None) -> Tensor:
    """Drop-in for torch.nn.functional.l1_loss, fused."""
    return _regression(L1_LOSS, L1Options(_checks.reduction(reduction, size_average, reduce)), input, target, weight,
                       avg_factor)


def mse_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
             weight: Optional[Tensor] = None, *, avg_factor=None) -> Tensor:
    """Drop-in for torch.nn.functional.mse_loss, fused."""
    return _regression(MSE_LOSS, MSEOptions(_checks.reduction(reduction, size_average, reduce)), input, target, weight,
                       avg_factor)


def smooth_l1_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
                   beta: float = 1.0, *, weight: Optional[Tensor] = None, avg_factor=None) -> Tensor:
    """Drop-in for torch.nn.functional.smooth_l1_loss, fused; beta=0 is L1 (gradient 0 where input == target)."""
    if isinstance(beta, Tensor) and beta.numel() != 1:  # torch's `beta == 0.0` test fails the same way
        raise RuntimeError(f"lossops: beta must be a number, got a tensor of shape {tuple(beta.shape)}")
    beta = _checks.real("beta", beta)
    if not beta >= 0:
        raise RuntimeError(f"smooth_l1_loss does not support negative values for beta (got beta={beta}).")
    return _regression(SMOOTH_L1_LOSS, SmoothL1Options(_checks.reduction(reduction, size_average, reduce), beta=beta),
                       input, target, weight, avg_factor)


def huber_loss(input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0,
               weight: Optional[Tensor] = None, *, avg_factor=None) -> Tensor:
    """Drop-in for torch.nn.functional.huber_loss, fused."""
    # The common call passes the checks below in a few attribute reads (the full checks are a large share of a
    # small call).
    if not (type(delta) is float and delta > 0 and type(input) is Tensor and type(target) is Tensor
            and input.dtype is target.dtype and input.is_floating_point()):
        delta = _checks.real("delta", delta)
        if not delta > 0:
            raise RuntimeError(f"huber_loss does not support non-positive values for delta (got delta={delta}).")
        # unlike l1 / mse / smooth-L1, torch's huber_loss promotes nothing: one floating dtype for both
        if not _checks.tensor("input", input).is_floating_point():
            raise RuntimeError(f"lossops: huber_loss input must be a floating-point tensor, got dtype {input.dtype}")
        _checks.same_device(input, target=_checks.tensor("target", target))
        _checks.same_dtype(input, target=target)
    return _regression(HUBER_LOSS, HuberOptions(_checks.reduction(reduction), delta=delta), input, target, weight,
                       avg_factor)


def _regression(family: _family.Family, options, input: Tensor, target: Tensor, weight: Optional[Tensor],
                avg_factor) -> Tensor:
    reduction = options.reduction
    if weight is None and avg_factor is None:
        loss = _elementwise.eager(family, input, target, reduction, options)
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
    elif weight is not None and family in (L1_LOSS, MSE_LOSS):
        # torch: sum(loss * weight) / sum(weight), differentiable in weight too (the kernels detach it: a weight
        # that requires grad takes the reference path); a broadcast weight repeats each element
        # numel / weight.numel() times
        denominator = weight.sum(dtype=_checks.opmath_dtype(dtype)) * (x.numel() // max(weight.numel(), 1))
    else:
        denominator = x.numel()

    def reference():
        return reference_regression(family, options, x, t, weight, denominator)

    if not dtype.is_floating_point:  # torch's integer l1/mse: no kernel serves them
        return reference()
    out_dtype = dtype if weight is None else torch.promote_types(dtype, weight.dtype)
    return _elementwise.elementwise_loss(family, x, t, options=options, denominator=denominator, reference=reference,
                                         weight=weight, out_dtype=out_dtype)


def reference_regression(family: _family.Family, options, input: Tensor, target: Tensor, weight: Optional[Tensor],
                         denominator) -> Tensor:
    """Plain PyTorch (the "reference" backend): torch's per-element loss, weighted, reduced like the kernels."""
    extra = {f: getattr(options, f) for f in ("beta", "delta") if hasattr(options, f)}
    loss = family.torch_fn(input, target, reduction="none", **extra)
    if weight is not None:
        loss = loss * weight
    return _elementwise.reduce_reference(loss, options.reduction, denominator)


def _huber_delta_type(delta, **_):
    if not isinstance(delta, (float, int)):  # torch.nn.HuberLoss checks this type when constructed
        raise TypeError(f"delta must be a float or int, got: {type(delta)}")


for _declared, _function, _module in ((L1_LOSS, l1_loss, "L1Loss"), (MSE_LOSS, mse_loss, "MSELoss"),
                                      (SMOOTH_L1_LOSS, smooth_l1_loss, "SmoothL1Loss"),
                                      (HUBER_LOSS, huber_loss, "HuberLoss")):
    _declared.reference = reference_regression
    _declared.function = _function
    _declared.module = _family.make_module(
        _declared, _module, per_call=("weight", "avg_factor"),
        check=_huber_delta_type if _declared is HUBER_LOSS else None,
        doc=f"Drop-in for torch.nn.{_module}; forward(input, target, *, weight=None, avg_factor=None).")
