"""`lossops.multi_margin_loss`: torch's multi-class margin (hinge) loss, fused, as the custom op
`lossops::multi_margin_loss`.

torch's definition (F.multi_margin_loss): the input is (N, C) or (C,), the target one class index a row; row r's loss
is w[y] / C * sum over i != y of max(0, margin - x[y] + x[i])^p, p 1 or 2 (a NaN term adds 0). The mean divides by N
(never by the weights). The input is viewed as cross-entropy's class rows, (N, C, 1); plain CPU calls of 2-D inputs
take the C++ eager path's class_rows route with the batch as the mean's denominator. Kernels: csrc/multi_margin.cpp,
triton_kernels/multi_margin.py (one pass over each row: the target's element, then the terms and the gradient).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor
from torch.nn.functional import multi_margin_loss as torch_multi_margin_loss

from .. import _backend, _checks, _eager, _family, _reduce
from .._family import GridShapes as G
from .cross_entropy import ROW_INPUTS, _rows_item_shape, _rows_loss_like, class_index, class_rows

KERNEL = _family.Kernel("multi_margin_loss", "multi_margin",
                        ("input", "target", "weight", "grad", "p", "margin", "grad_scale", "per_element"))
# torch's options, for plain CPU calls of (N, C) inputs (lossops._eager): the mean over the batch.
EAGER_ROUTE = _eager.EagerRoute("class_rows", "batch",
                                scalars=(_eager.Scalar("p", "int", 1, 2), _eager.Scalar("margin", "real")),
                                gradients={"grad": "input"}, node="LossopsMultiMarginLossBackward")


@dataclasses.dataclass(frozen=True)
class MultiMarginOptions:
    p: int = 1
    margin: float = 1.0
    reduction: str = "mean"


def multi_margin_loss(input: Tensor, target: Tensor, p: int = 1, margin: float = 1, weight: Optional[Tensor] = None,
                      size_average=None, reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.multi_margin_loss, fused forward+backward."""
    # The C++ eager path first: it returns None for anything it does not serve, errors included, which then take
    # the checks below and their messages. A (C,) input's mean divides by 1, not by its first dimension.
    if (size_average is None and reduce is None and type(input) is Tensor and input.dim() == 2
            and not _eager.compiling()):
        loss = EAGER_ROUTE.call(reduction, input, target, weight, p, margin)
        if loss is not None:
            return loss
    return MULTI_MARGIN_LOSS.full_path(input, target, p, margin, weight, size_average, reduce, reduction)


def _full_multi_margin_loss(input: Tensor, target: Tensor, p: int = 1, margin: float = 1,
                            weight: Optional[Tensor] = None, size_average=None, reduce=None,
                            reduction: str = "mean") -> Tensor:
    """multi_margin_loss past its C++ eager path: every check (torch's, in torch's order), backend and input kind."""
    if size_average is not None or reduce is not None:
        reduction = _checks.reduction(reduction, size_average, reduce)
    elif reduction not in _checks.REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if p != 1 and p != 2:
        raise ValueError(f"only p == 1 and p == 2 supported (lossops: got p={p!r})")
    p = int(p)
    if weight is not None:
        _checks.tensor("weight", weight)
        if weight.dim() != 1:
            raise ValueError("weight must be one-dimensional")
    if isinstance(margin, complex):  # torch's Scalar: a complex margin converts only without an imaginary part
        if margin.imag != 0:
            raise RuntimeError(f"value cannot be converted to type float without overflow: margin={margin}")
        margin = margin.real
    margin = _checks.real("margin", margin)
    _checks.tensor("input", input)
    _checks.tensor("target", target)
    _checks.margin_scores(input)
    rows = input.shape[0] if input.dim() == 2 else 1
    C = input.shape[-1] if input.dim() > 0 else 1
    if target.dim() > 1 or target.numel() != rows:
        raise RuntimeError(f"multi_margin_loss: target tensor should be 1-D with size equal to the number of input "
                           f"samples (batch size). Expected target size [{rows}], but got {list(target.shape)}. "
                           f"Input has shape {list(input.shape)}.")
    if target.dtype != torch.int64:
        raise RuntimeError(f"lossops: multi_margin_loss expected scalar type Long for target (int64 class indices), "
                           f"but found {target.dtype}")
    if not input.is_floating_point():  # torch's kernel is not defined for integer inputs
        raise NotImplementedError(f"lossops: multi_margin_loss input must be a floating-point tensor, got dtype "
                                  f"{input.dtype}")
    _checks.same_device(input, target=target, weight=weight)
    if weight is not None:
        if weight.numel() != C:
            raise RuntimeError(f"inconsistent weight size, expected {C} but got {list(weight.shape)}")
        # torch's kernel takes one dtype for both; under autocast torch runs the loss in float32, casting both
        if weight.dtype != input.dtype and not _checks.autocast_enabled(input.device):
            raise RuntimeError(f"lossops: multi_margin_loss weight must have the input's dtype {input.dtype}, got "
                               f"{weight.dtype}")
        if torch.is_grad_enabled() and weight.requires_grad:
            raise RuntimeError("The function 'multi_margin_loss' is not differentiable with respect to argument "
                               "'weight'. This input cannot have requires_grad True.")
    options = MultiMarginOptions(p, margin, reduction)
    backend = _backend.resolve(input.device)
    if backend == "reference":
        return reference_multi_margin_loss(input, target, weight, options)
    tensors = {"input": class_rows(input.reshape(1) if input.dim() == 0 else input),
               "target": target.reshape(-1).contiguous(), "weight": weight}
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    loss = MULTI_MARGIN_LOSS.apply(backend, tensors, options, {"input": needs_grad})
    if reduction == "none":  # torch's loss per row has the target's shape (0-d or (1,) for one row)
        loss = loss.reshape(target.shape)
    return loss.to(_checks.output_dtype(input))


def _run(family, backend, t, o, grads):
    logits3 = t["input"]
    acc = _checks.opmath_dtype(logits3.dtype)
    rows = logits3.shape[0]
    weight = None if t["weight"] is None else t["weight"].to(acc).contiguous()
    grad = _backend.empty_gradient(logits3) if grads["input"] else None
    # The mean's denominator is the batch, a shape: a host number, no device read.
    scale = 1.0 / rows if o.reduction == "mean" and rows > 0 else 1.0
    row_loss, total = KERNEL(backend, input=logits3, target=t["target"], weight=weight, grad=grad, p=o.p,
                             margin=o.margin, grad_scale=scale, per_element=o.reduction == "none")
    return _reduce.reduce(o.reduction, row_loss, total, rows), {"input": grad}


def reference_multi_margin_loss(input: Tensor, target: Tensor, weight: Optional[Tensor],
                                options: MultiMarginOptions) -> Tensor:
    """Plain PyTorch (the "reference" backend): torch's formula, in the accumulation dtype for low-precision inputs
    (torch's CPU kernel has none), and a NaN mean over an empty batch (torch's reads uninitialised memory)."""
    x = input.reshape(-1, input.shape[-1] if input.dim() > 0 else 1)
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    C = x.shape[1]
    y = target.reshape(-1, 1)
    bad = (y < 0) | (y >= C)
    if _checks.host_readable(bad):
        if bool(bad.any()):
            raise _out_of_range(int(y[bad][0]), C)
    else:
        torch._assert_async(~bad.any(), "multi_margin_loss: target out of range")
    z = options.margin - x.gather(1, y) + x
    # torch's kernel: a term where z > 0 only (gradient 0 at z = 0, a NaN z adds nothing)
    h = torch.where(z > 0, z, torch.zeros((), dtype=z.dtype))
    if options.p == 2:
        h = h * h
    h = h.scatter(1, y, 0.0)
    if weight is not None:
        h = h * weight.to(h.dtype)[y]
    loss = h.sum(1) / C
    if options.reduction == "none":
        loss = loss.reshape(target.shape)
    elif options.reduction == "sum":
        loss = loss.sum()
    else:
        loss = _reduce.mean(loss.sum(), x.shape[0])
    return loss.to(_checks.output_dtype(input))


def _out_of_range(value: int, C: int) -> RuntimeError:
    return RuntimeError(f"multi_margin_loss: target out of range: argument 'target' holds {value}, and the input has "
                        f"{C} classes")


def _eager_multi_margin_loss(input: Tensor, target: Tensor, **kwargs) -> Tensor:
    """What eager PyTorch users run: torch's CPU kernel has no bf16/fp16, so those inputs go through float32."""
    if input.dtype in (torch.bfloat16, torch.float16) and input.device.type == "cpu":
        return torch_multi_margin_loss(input.float(), target, **kwargs).to(input.dtype)
    return torch_multi_margin_loss(input, target, **kwargs)


def _scores(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.tensor([0, 4, 3, 2, 2, 1])]


def _scores_weighted_squared(dtype):
    return [torch.randn(7, 4, dtype=dtype), torch.randint(0, 4, (7,)), 2, 0.7, torch.rand(4, dtype=dtype) + 0.5]


def _selfcheck_inputs(dtype):
    return torch.randn(64, 1000, dtype=dtype), torch.randint(0, 1000, (64,))


MULTI_MARGIN_LOSS = _family.register(_family.Family(
    name="multi_margin_loss", inputs=ROW_INPUTS, options=MultiMarginOptions, kernel=KERNEL, run=_run,
    loss_like=_rows_loss_like, item_shape=_rows_item_shape, reference=reference_multi_margin_loss,
    function=multi_margin_loss, full_path=_full_multi_margin_loss, eager_routes=(EAGER_ROUTE,),
    torch_fn=torch_multi_margin_loss, bad_inputs="class_hinge",
    cases=(_family.Case(_scores, {}, torch_multi_margin_loss, bad=("target_out_of_range", dict(p=3))),
           _family.Case(_scores_weighted_squared, dict(reduction="none"), torch_multi_margin_loss)),
    selfcheck=({}, torch_multi_margin_loss, _selfcheck_inputs),
    bench=_family.Bench(_eager_multi_margin_loss, class_index, ((256, 1000), (4096, 1024), (4096, 8192)),
                        columns="classes", grid_shapes=G.TINY + ((65536, 10), (1000, 80)) + G.MID + ((4096, 8192),),
                        grid_quick_shapes=G.TINY)))


def _check_module_arguments(p, weight, **_):
    """What torch.nn.MultiMarginLoss checks when constructed."""
    if p != 1 and p != 2:
        raise ValueError("only p == 1 and p == 2 supported")
    if isinstance(weight, Tensor) and weight.dim() != 1:  # anything else is refused as a buffer, after this
        raise ValueError(f"MultiMarginLoss: expected weight to be None or 1D tensor, got {weight.dim()}D instead")


MULTI_MARGIN_LOSS.module = _family.make_module(MULTI_MARGIN_LOSS, "MultiMarginLoss", check=_check_module_arguments,
                                               doc="Drop-in for torch.nn.MultiMarginLoss.")
