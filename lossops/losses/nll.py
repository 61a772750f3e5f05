"""`lossops.nll_loss`: torch's negative log-likelihood loss, fused, as the custom op `lossops::nll_loss`.

The input holds log-probabilities, (N, C), (N, C, d1, ..., dk) or (C,); a row with class-index target y (not
ignore_index) has loss -weight[y] * input[y] and gradient -weight[y] at class y, 0 elsewhere. The mean divides by
the kept targets' weights (their count without weights). Layout, checks and backend choice are cross-entropy's class
rows (lossops.losses.cross_entropy.row_softmax_loss: the input is viewed as (outer, C, inner) without moving the class
dimension), the denominator is lossops._reduce.class_index_denominator, and plain CPU calls take the C++ eager path's
class_rows route. Kernels: csrc/nll.cpp, triton_kernels/nll.py (they read one element a row and write the gradient
whole).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor
from torch.nn.functional import nll_loss as torch_nll_loss

from .. import _backend, _checks, _eager, _family, _reduce
from .._family import GridShapes as G
from .cross_entropy import (ROW_INPUTS, _rows_item_shape, _rows_loss_like, class_index, row_softmax_loss,
                            row_state_like)

KERNEL = _family.Kernel("nll_loss", "nll", ("input", "target", "weight", "grad", "ignore_index", "grad_scale",
                                           "per_element"))
# torch's options, for plain CPU calls (lossops._eager): the mean over the kept targets' weights.
EAGER_ROUTE = _eager.EagerRoute("class_rows", "kept_weight", scalars=(_eager.Scalar("ignore_index", "int"),),
                                gradients={"grad": "input"}, node="LossopsNllLossBackward")


@dataclasses.dataclass(frozen=True)
class NLLOptions:
    ignore_index: int = -100
    reduction: str = "mean"


def nll_loss(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
             ignore_index: int = -100, reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.nll_loss (log-probabilities in), fused forward+backward."""
    # The C++ eager path first: it returns None for anything it does not serve, errors included, which then take
    # the checks below and their messages.
    if size_average is None and reduce is None and not _eager.compiling():
        loss = EAGER_ROUTE.call(reduction, input, target, weight, ignore_index)
        if loss is not None:
            return loss
    return NLL_LOSS.full_path(input, target, weight, size_average, ignore_index, reduce, reduction)


def _full_nll_loss(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                   ignore_index: int = -100, reduce=None, reduction: str = "mean") -> Tensor:
    """nll_loss past its C++ eager path: every check, backend and input kind."""
    reduction = _checks.reduction(reduction, size_average, reduce)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    _checks.tensor("input", input)
    _checks.tensor("target", target)
    if input.dim() == 0:
        raise ValueError(f"Expected 1 or more dimensions (got {input.dim()})")
    target = _class_target(input, target)
    if not input.is_floating_point():  # torch's kernel is not defined for integer log-probabilities
        raise NotImplementedError(f"lossops: nll_loss input must be a floating-point tensor, got dtype {input.dtype}")
    if weight is not None:
        _checks.tensor("weight", weight)
        classes = input.shape[1] if input.dim() > 1 else input.shape[0]
        if weight.dim() != 1 or weight.numel() != classes:
            raise RuntimeError(f"weight tensor should be defined either for all {classes} classes or no classes but "
                               f"got weight tensor of shape: {list(weight.shape)}")
        # torch's kernel takes one dtype for both; under autocast torch runs the loss in float32, casting both
        if weight.dtype != input.dtype and not _checks.autocast_enabled(input.device):
            raise RuntimeError(f"lossops: nll_loss weight must have the input's dtype {input.dtype}, got "
                               f"{weight.dtype}")
        if torch.is_grad_enabled() and weight.requires_grad:
            raise RuntimeError("The function 'nll_loss_forward' is not differentiable with respect to argument "
                               "'weight'. This input cannot have requires_grad True.")
        weight = weight.reshape(classes)
    return row_softmax_loss(NLL_LOSS, input, target, weight, NLLOptions(ignore_index, reduction))


def _class_target(input: Tensor, target: Tensor) -> Tensor:
    """torch's target rules: int64 or uint8 class indices of the input's shape without the class dimension (a
    one-element target for a (C,) input)."""
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"lossops: nll_loss expected target dtype to be Long or Byte (int64 or uint8 class "
                           f"indices), got target of dtype {target.dtype} and shape {tuple(target.shape)}")
    if input.dim() == 1:
        if target.dim() > 1 or target.numel() != 1:
            raise RuntimeError(f"lossops: nll_loss target for an input of shape {tuple(input.shape)} must have one "
                               f"element, got target of shape {tuple(target.shape)}")
        return target.reshape(())
    if target.dim() >= 1 and target.shape[0] != input.shape[0]:
        raise ValueError(f"Expected input batch_size ({input.shape[0]}) to match target batch_size "
                         f"({target.shape[0]}).")
    expected = input.shape[:1] + input.shape[2:]
    if target.shape != expected:
        raise RuntimeError(f"lossops: nll_loss expected target size {list(expected)} for input of shape "
                           f"{tuple(input.shape)}, got target of shape {tuple(target.shape)} ({list(target.shape)})")
    return target


def _gradient_in_backward(backend: str, options) -> bool:
    # The Triton route writes the gradient in backward from the targets alone (the log-probabilities are never read
    # again), grad_output and the mean's denominator applied on the device; the C++ route writes it in forward.
    return backend == "triton"


def _run(family, backend, t, o, grads):
    logits3, target = t["input"], t["target"]
    acc = _checks.opmath_dtype(logits3.dtype)
    if _gradient_in_backward(backend, o):
        weight = None if t["weight"] is None else t["weight"].to(acc).contiguous()
        loss, state = _backend.kernel(backend, "nll", "nll_loss_forward")(
            input=logits3, target=target, weight=weight, ignore_index=o.ignore_index, reduction=o.reduction,
            weighted_mean=True)
        return loss, {"input": None}, state
    denominator = _reduce.class_index_denominator(target, t["weight"], o.ignore_index, logits3.shape[1], acc)
    weight = None if t["weight"] is None else t["weight"].to(acc).contiguous()
    grad = _backend.empty_gradient(logits3) if grads["input"] else None
    row_loss, total = KERNEL(backend, input=logits3, target=target, weight=weight, grad=grad,
                             ignore_index=o.ignore_index, grad_scale=_reduce.gradient_scale(o.reduction, denominator),
                             per_element=o.reduction == "none")
    return _reduce.reduce(o.reduction, row_loss, total, denominator), {"input": grad}


def _gradient(family, backend, t, o, grad_loss, needs, state, out=None):
    """The gradient of the loss _run returned on a backend that forms it in backward, into `out` when given."""
    if not needs["input"]:
        return {}
    logits3 = t["input"]
    weight = None if t["weight"] is None else t["weight"].to(_checks.opmath_dtype(logits3.dtype)).contiguous()
    grad = _backend.empty_gradient(logits3) if out is None else out
    _backend.kernel(backend, "nll", "nll_loss_backward")(
        input=logits3, target=t["target"], weight=weight, grad=grad, state=state, grad_loss=grad_loss,
        ignore_index=o.ignore_index, reduction=o.reduction)
    return {"input": grad}


def reference_nll_loss(input: Tensor, target: Tensor, weight: Optional[Tensor], options: NLLOptions) -> Tensor:
    """Plain PyTorch (the "reference" backend): torch's loss, with lossops' rule for a mean over nothing (every
    target ignored, or every kept weight 0: NaN loss, zero gradient; torch's gradient is NaN in the second case).
    torch's function as imported, so that a caller who replaces F.nll_loss by lossops.nll_loss does not recurse."""
    if options.reduction != "mean":
        return torch_nll_loss(input, target, weight, ignore_index=options.ignore_index, reduction=options.reduction)
    total = torch_nll_loss(input, target, weight, ignore_index=options.ignore_index, reduction="sum")
    classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    return _reduce.mean(total, _reduce.class_index_denominator(target, weight, options.ignore_index, classes,
                                                               total.dtype))


def _log_probabilities(dtype):
    return [torch.randn(6, 5, dtype=dtype).log_softmax(1), torch.tensor([0, 4, -100, 2, 2, 1])]


def _log_probabilities_4d_weighted(dtype):
    target = torch.randint(0, 5, (2, 3, 4))
    target[0, 0, 0] = 1
    return [torch.randn(2, 5, 3, 4, dtype=dtype).log_softmax(1), target, torch.rand(5, dtype=dtype) + 0.5]


def _selfcheck_inputs(dtype):
    return torch.randn(64, 1000, dtype=dtype).log_softmax(1), torch.randint(0, 1000, (64,))


NLL_LOSS = _family.register(_family.Family(
    name="nll_loss", inputs=ROW_INPUTS, options=NLLOptions, kernel=KERNEL, run=_run, loss_like=_rows_loss_like,
    item_shape=_rows_item_shape, reference=reference_nll_loss, function=nll_loss, full_path=_full_nll_loss,
    recompute=_gradient, gradient_in_backward=_gradient_in_backward, state_like=row_state_like(1),
    bad_inputs="classes",
    eager_routes=(EAGER_ROUTE,), torch_fn=torch_nll_loss,
    cases=(_family.Case(_log_probabilities, {}, torch_nll_loss, bad=("target_out_of_range",)),
           _family.Case(_log_probabilities_4d_weighted, dict(reduction="none", ignore_index=1), torch_nll_loss)),
    selfcheck=({}, torch_nll_loss, _selfcheck_inputs),
    bench=_family.Bench(torch_nll_loss, class_index, ((256, 1000), (4096, 1024), (4096, 32000)), columns="classes",
                        grid_shapes=G.TINY + G.SMALL_CLASSES + G.CLASS_DIM_1 + G.MID + G.LLM,
                        grid_quick_shapes=G.TINY + ((2, 5, 4, 4),))))
NLL_LOSS.module = _family.make_module(NLL_LOSS, "NLLLoss", doc="Drop-in for torch.nn.NLLLoss.")
