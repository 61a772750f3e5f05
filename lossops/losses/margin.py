"""Margin losses on a target sign: `lossops.soft_margin_loss` and `lossops.hinge_embedding_loss`, torch's functions
fused as the custom ops `lossops::soft_margin_loss` and `lossops::hinge_embedding_loss`.

One kernel serves both (kind selects the formula; kernels csrc/margin.cpp, triton_kernels/margin.py). Neither has a
target gradient: torch refuses a soft-margin target that requires grad and gives a hinge-embedding one none (that
call takes the reference path). The soft margin loss is computed as softplus(-y x), finite where torch's
log1p(exp(-y x)) overflows (docs/differences-from-torch.md). Calls the kernels do not cover take torch's own
function (the reference): integer inputs, whose dtype rules are torch's.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _elementwise, _family
from .._family import GridShapes as G

SOFT_MARGIN, HINGE_EMBEDDING = 0, 1
KERNEL = _elementwise.kernel("margin", "margin", ("kind", "margin"))


@dataclasses.dataclass(frozen=True)
class SoftMarginOptions(_elementwise.ElementwiseOptions):
    pass


@dataclasses.dataclass(frozen=True)
class HingeEmbeddingOptions(_elementwise.ElementwiseOptions):
    margin: float = 1.0


def _signs(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.randint(0, 2, (6, 5)).to(dtype) * 2 - 1]


def _selfcheck_signs(dtype):
    return torch.randn(4096, dtype=dtype) * 3, torch.randint(0, 2, (4096,)).to(dtype) * 2 - 1


def _sign_target(x: Tensor) -> Tensor:
    return torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1


def _declare(name, options, kind, torch_fn, kwargs=None):
    kwargs = kwargs or {}
    return _elementwise.declare(
        name, options, KERNEL,
        lambda _tensors, o: {"kind": kind, "margin": float(getattr(o, "margin", 0.0))},
        eager_gradients=("input",), bad_inputs="elementwise", torch_fn=torch_fn,
        cases=(_family.Case(_signs, kwargs, torch_fn),),
        selfcheck=(kwargs, functools.partial(torch_fn, **kwargs), _selfcheck_signs),
        bench=_family.Bench(torch_fn, _sign_target, ((256, 1000), (4096, 1024), (4096, 4096)), columns="columns",
                            grid_shapes=G.TINY + G.MID + G.ELEMENTWISE_LARGE, grid_quick_shapes=G.TINY))


SOFT_MARGIN_LOSS = _declare("soft_margin_loss", SoftMarginOptions, SOFT_MARGIN, F.soft_margin_loss)
HINGE_EMBEDDING_LOSS = _declare("hinge_embedding_loss", HingeEmbeddingOptions, HINGE_EMBEDDING,
                                F.hinge_embedding_loss, dict(margin=0.5))


def soft_margin_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.soft_margin_loss, fused: log(1 + exp(-target * input)), finite throughout."""
    if size_average is None and reduce is None:
        loss = _elementwise.eager(SOFT_MARGIN_LOSS, input, target, reduction, SoftMarginOptions())
        if loss is not None:
            return loss
    options = SoftMarginOptions(_checks.reduction(reduction, size_average, reduce))
    _operands("soft_margin_loss", input, target)
    if not input.is_floating_point():  # torch writes the loss into a tensor of the input's dtype
        raise RuntimeError(f"lossops: soft_margin_loss input must be a floating-point tensor, got dtype {input.dtype}")
    if torch.is_grad_enabled() and target.requires_grad:
        raise RuntimeError("The function 'soft_margin_loss' is not differentiable with respect to argument 'target'. "
                           "This input cannot have requires_grad True.")
    shape = _checks.broadcast_shape(input.shape, target.shape)
    if shape != input.shape:
        raise RuntimeError(f"lossops: soft_margin_loss target of shape {tuple(target.shape)} cannot be broadcast to "
                           f"the input's shape {tuple(input.shape)}")

    def reference():  # softplus(-y x): finite where torch's log1p(exp(-y x)) overflows, as the kernels
        loss = F.softplus(-(input * target)).to(_checks.output_dtype(input))
        return _elementwise.reduce_reference(loss, options.reduction, loss.numel())

    return _margin(SOFT_MARGIN_LOSS, options, input, target, shape, reference)


def hinge_embedding_loss(input: Tensor, target: Tensor, margin: float = 1.0, size_average=None, reduce=None,
                         reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.hinge_embedding_loss, fused: input where target is 1, max(0, margin - input)
    where it is -1, and their sum for any other target value, as torch."""
    if size_average is None and reduce is None and type(margin) is float:
        loss = _elementwise.eager(HINGE_EMBEDDING_LOSS, input, target, reduction, HingeEmbeddingOptions(margin=margin))
        if loss is not None:
            return loss
    options = HingeEmbeddingOptions(_checks.reduction(reduction, size_average, reduce),
                                    margin=_checks.real("margin", margin))
    _operands("hinge_embedding_loss", input, target)
    shape = _checks.broadcast_shape(input.shape, target.shape)

    def reference():
        return F.hinge_embedding_loss(input, target, margin=options.margin, reduction=options.reduction)

    if not input.is_floating_point():
        if options.reduction == "mean":  # torch's mean() refuses an integer loss, without naming the argument
            raise RuntimeError(f"lossops: hinge_embedding_loss input must be a floating-point tensor for "
                               f"reduction='mean', got dtype {input.dtype}")
        return reference()
    return _margin(HINGE_EMBEDDING_LOSS, options, input, target, shape, reference)


def _operands(name: str, input, target) -> None:
    _checks.tensor("input", input)
    _checks.tensor("target", target)
    _checks.same_device(input, target=target)
    if target.is_complex():
        raise RuntimeError(f"lossops: {name} target must be real, got dtype {target.dtype}")


def _margin(family: _family.Family, options, input: Tensor, target: Tensor, shape: torch.Size, reference) -> Tensor:
    # torch's loss has the input's dtype (computed with the target promoted against it)
    x, t = _elementwise.kernel_operands(input, target)
    return _elementwise.elementwise_loss(family, x.expand(shape), t.expand(shape), options=options,
                                         denominator=shape.numel(), reference=reference, kernel_target_grad=False,
                                         out_dtype=input.dtype)


SOFT_MARGIN_LOSS.function = soft_margin_loss
HINGE_EMBEDDING_LOSS.function = hinge_embedding_loss
SOFT_MARGIN_LOSS.module = _family.make_module(SOFT_MARGIN_LOSS, "SoftMarginLoss",
                                              doc="Drop-in for torch.nn.SoftMarginLoss.")
HINGE_EMBEDDING_LOSS.module = _family.make_module(HINGE_EMBEDDING_LOSS, "HingeEmbeddingLoss",
                                                  doc="Drop-in for torch.nn.HingeEmbeddingLoss.")
