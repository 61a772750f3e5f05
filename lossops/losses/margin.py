"""Margin losses on a target sign: `lossops.soft_margin_loss`, `lossops.hinge_embedding_loss` and
`lossops.margin_ranking_loss`, torch's functions fused as the custom ops `lossops::<name>`.

One kernel serves them all (kind selects the formula; kernels csrc/margin.cpp, triton_kernels/margin.py). Soft
margin and hinge embedding have no target gradient: torch refuses a soft-margin target that requires grad and gives
a hinge-embedding one none (that call takes the reference path). Margin ranking reads input1 and input2 as the
kernel's input and target, both differentiated in the same pass, and the sign target as its auxiliary operand; a
sign target that requires grad (torch differentiates it) takes the reference path. The soft margin loss is
computed as softplus(-y x), finite where torch's log1p(exp(-y x)) overflows (docs/differences-from-torch.md). Calls
the kernels do not cover take torch's own function (the reference): integer inputs, whose dtype rules are torch's.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _elementwise, _family
from .._family import GridShapes as G

SOFT_MARGIN, HINGE_EMBEDDING, MARGIN_RANKING = 0, 1, 2
KERNEL = _elementwise.kernel("margin", "margin", ("kind", "margin"))


@dataclasses.dataclass(frozen=True)
class SoftMarginOptions(_elementwise.ElementwiseOptions):
    pass


@dataclasses.dataclass(frozen=True)
class HingeEmbeddingOptions(_elementwise.ElementwiseOptions):
    margin: float = 1.0


@dataclasses.dataclass(frozen=True)
class MarginRankingOptions(_elementwise.ElementwiseOptions):
    margin: float = 0.0


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


def _ranked_pairs(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.randn(6, 5, dtype=dtype),
            torch.randint(0, 2, (6, 5)).to(dtype) * 2 - 1]


def _selfcheck_ranked_pairs(dtype):
    return (torch.randn(4096, dtype=dtype), torch.randn(4096, dtype=dtype),
            torch.randint(0, 2, (4096,)).to(dtype) * 2 - 1)


def _bench_ranked_pairs(shape, dtype, device):
    x1 = torch.randn(shape, dtype=dtype, device=device).requires_grad_()
    return x1, torch.randn(shape, dtype=dtype, device=device), _sign_target(x1.detach())


SOFT_MARGIN_LOSS = _declare("soft_margin_loss", SoftMarginOptions, SOFT_MARGIN, F.soft_margin_loss)
HINGE_EMBEDDING_LOSS = _declare("hinge_embedding_loss", HingeEmbeddingOptions, HINGE_EMBEDDING,
                                F.hinge_embedding_loss, dict(margin=0.5))


MARGIN_RANKING_LOSS = _elementwise.declare(
    "margin_ranking_loss", MarginRankingOptions, KERNEL,
    lambda _tensors, o: {"kind": MARGIN_RANKING, "margin": float(o.margin)}, eager_layout="same_shape_aux",
    bad_inputs="ranked_pairs", torch_fn=F.margin_ranking_loss,
    cases=(_family.Case(_ranked_pairs, dict(margin=0.3), F.margin_ranking_loss, target=2),),
    selfcheck=(dict(margin=0.5), functools.partial(F.margin_ranking_loss, margin=0.5), _selfcheck_ranked_pairs),
    bench=_family.Bench(F.margin_ranking_loss, _sign_target, ((256, 1000), (4096, 1024), (4096, 4096)),
                        kwargs=dict(margin=0.5), columns="columns", make_inputs=_bench_ranked_pairs,
                        grid_shapes=G.TINY + G.MID + G.ELEMENTWISE_LARGE, grid_quick_shapes=G.TINY))


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


def margin_ranking_loss(input1: Tensor, input2: Tensor, target: Tensor, margin: float = 0, size_average=None,
                        reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.margin_ranking_loss, fused: max(0, -target * (input1 - input2) + margin),
    with the gradients of input1 and input2 from the same pass (target's, which torch gives too, from the
    reference path)."""
    if size_average is None and reduce is None and type(margin) in (float, int):
        loss = _elementwise.eager(MARGIN_RANKING_LOSS, input1, input2, reduction, MarginRankingOptions(margin=margin),
                                  target)
        if loss is not None:
            return loss
    options = MarginRankingOptions(_checks.reduction(reduction, size_average, reduce),
                                   margin=_checks.real("margin", margin))
    operands = {"input1": input1, "input2": input2, "target": target}
    for name, value in operands.items():
        _checks.tensor(name, value)
    _checks.same_device(input1, "input1", input2=input2, target=target)
    if input1.dim() != input2.dim() or input1.dim() != target.dim():
        raise RuntimeError(f"margin_ranking_loss : All input tensors should have same dimension but got sizes: "
                           f"input1: {input1.size()}, input2: {input2.size()}, target: {target.size()} ")
    if target.dtype == torch.bool:  # torch negates the target
        raise RuntimeError("lossops: margin_ranking_loss target must not be a bool tensor: Negation, the `-` "
                           "operator, on a bool tensor is not supported.")
    shape = _broadcast_operands(operands)

    def reference():
        return F.margin_ranking_loss(input1, input2, target, margin=options.margin, reduction=options.reduction)

    dtype = torch.promote_types(torch.promote_types(input1.dtype, input2.dtype), target.dtype)
    if not dtype.is_floating_point:  # integer arithmetic and complex refusals: torch's own
        return reference()
    if _checks.autocast_enabled(input1.device):  # a low-precision input1 is read as is
        x1, x2 = _elementwise.kernel_operands(input1, input2)
    else:
        x1, x2 = input1.to(dtype), input2.to(dtype)
    return _elementwise.elementwise_loss(MARGIN_RANKING_LOSS, x1.expand(shape), x2.expand(shape), options=options,
                                         denominator=shape.numel(), reference=reference, aux=target, out_dtype=dtype)


def _broadcast_operands(operands: dict) -> torch.Size:
    """The shape the operands broadcast to, as torch's rule; the error names the operands that differ."""
    ndim = max(t.dim() for t in operands.values())
    shape = [1] * ndim
    for name, value in operands.items():
        for dim, size in enumerate((1,) * (ndim - value.dim()) + tuple(value.shape)):
            if size != 1 and shape[dim] not in (1, size):
                raise RuntimeError(f"lossops: {name} of shape {tuple(value.shape)} cannot be broadcast with the other "
                                   f"operands: the size of tensor a ({shape[dim]}) must match the size of tensor b "
                                   f"({size}) at non-singleton dimension {dim}")
            shape[dim] = size if size != 1 else shape[dim]
    return torch.Size(shape)


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


MARGIN_RANKING_LOSS.function = margin_ranking_loss
SOFT_MARGIN_LOSS.function = soft_margin_loss
HINGE_EMBEDDING_LOSS.function = hinge_embedding_loss
SOFT_MARGIN_LOSS.module = _family.make_module(SOFT_MARGIN_LOSS, "SoftMarginLoss",
                                              doc="Drop-in for torch.nn.SoftMarginLoss.")
HINGE_EMBEDDING_LOSS.module = _family.make_module(HINGE_EMBEDDING_LOSS, "HingeEmbeddingLoss",
                                                  doc="Drop-in for torch.nn.HingeEmbeddingLoss.")
MARGIN_RANKING_LOSS.module = _family.make_module(MARGIN_RANKING_LOSS, "MarginRankingLoss", inputs=3,
                                                  doc="Drop-in for torch.nn.MarginRankingLoss.")
