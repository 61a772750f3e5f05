"""`lossops.multilabel_margin_loss`: torch's multi-label margin (hinge) loss, fused, as the custom op
`lossops::multilabel_margin_loss`.

torch's definition (F.multilabel_margin_loss): the input is (N, C), (C,) or 0-d; the target has its shape and lists
each row's classes, ended by the first -1 (values after it are not classes, though torch still requires every value
to lie in [-1, C)). Row r's loss is 1/C * sum over listed y and over classes i not listed of max(0, 1 - x[y] + x[i]);
the mean divides by N. Plain CPU calls of 2-D inputs take the C++ eager path's label_lists route with the batch as
the mean's denominator. Kernels: csrc/multilabel_margin.cpp, triton_kernels/multilabel_margin.py (the gradient
written in forward with the loss).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from torch.nn.functional import multilabel_margin_loss as torch_multilabel_margin_loss

from .. import _backend, _checks, _eager, _family, _reduce
from .._family import GridShapes as G

INPUTS = (_family.Input("input", differentiable=True), _family.Input("target"))
KERNEL = _family.Kernel("multilabel_margin_loss", "multilabel_margin",
                        ("input", "target", "grad", "grad_scale", "per_element"))
# torch's options, for plain CPU calls of (N, C) inputs (lossops._eager): the mean over the batch.
EAGER_ROUTE = _eager.EagerRoute("label_lists", "batch", gradients={"grad": "input"},
                                node="LossopsMultilabelMarginLossBackward")


@dataclasses.dataclass(frozen=True)
class MultilabelMarginOptions:
    reduction: str = "mean"


def multilabel_margin_loss(input: Tensor, target: Tensor, size_average=None, reduce=None,
                           reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.multilabel_margin_loss, fused forward+backward."""
    # The C++ eager path first: it returns None for anything it does not serve, errors included, which then take
    # the checks below and their messages. A (C,) input's mean divides by 1, not by its first dimension.
    if (size_average is None and reduce is None and type(input) is Tensor and input.dim() == 2
            and not _eager.compiling()):
        loss = EAGER_ROUTE.call(reduction, input, target)
        if loss is not None:
            return loss
    return MULTILABEL_MARGIN_LOSS.full_path(input, target, size_average, reduce, reduction)


def _full_multilabel_margin_loss(input: Tensor, target: Tensor, size_average=None, reduce=None,
                                 reduction: str = "mean") -> Tensor:
    """multilabel_margin_loss past its C++ eager path: every check (torch's, in torch's order), backend and input
    kind."""
    if size_average is not None or reduce is not None:
        reduction = _checks.reduction(reduction, size_average, reduce)
    elif reduction not in _checks.REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    _checks.tensor("input", input)
    _checks.tensor("target", target)
    _checks.margin_scores(input)
    C = input.shape[-1] if input.dim() > 0 else 1
    if input.dim() <= 1:
        if target.dim() > 1 or target.numel() != C:
            raise RuntimeError(f"inconsistent target size: {list(target.shape)} for input of size: "
                               f"{list(input.shape)}")
    elif target.shape != input.shape:
        raise RuntimeError(f"inconsistent target size: {list(target.shape)} for input of size: {list(input.shape)}")
    if target.dtype != torch.int64:
        raise RuntimeError(f"lossops: multilabel_margin_loss expected scalar type Long for target (int64 class "
                           f"indices), but found {target.dtype}")
    if not input.is_floating_point():  # torch's kernel is not defined for integer inputs
        raise NotImplementedError(f"lossops: multilabel_margin_loss input must be a floating-point tensor, got "
                                  f"dtype {input.dtype}")
    _checks.same_device(input, target=target)
    options = MultilabelMarginOptions(reduction)
    backend = _backend.resolve(input.device)
    if backend == "reference":
        return reference_multilabel_margin_loss(input, target, options)
    tensors = {"input": input.reshape(-1, C) if input.dim() < 2 else input,
               "target": target.reshape(-1, C).contiguous()}
    needs_grad = torch.is_grad_enabled() and input.requires_grad
    loss = MULTILABEL_MARGIN_LOSS.apply(backend, tensors, options, {"input": needs_grad})
    if reduction == "none" and input.dim() < 2:  # one row: torch's loss per row is 0-d
        loss = loss.reshape(())
    return loss.to(_checks.output_dtype(input))


def _run(family, backend, t, o, grads):
    input = t["input"]
    rows = input.shape[0]
    grad = _backend.empty_gradient(input) if grads["input"] else None
    # The mean's denominator is the batch, a shape: a host number, no device read.
    scale = 1.0 / rows if o.reduction == "mean" and rows > 0 else 1.0
    row_loss, total = KERNEL(backend, input=input, target=t["target"], grad=grad, grad_scale=scale,
                             per_element=o.reduction == "none")
    return _reduce.reduce(o.reduction, row_loss, total, rows), {"input": grad}


def _loss_like(t, o):
    input = t["input"]
    return input.new_empty((input.shape[0],) if o.reduction == "none" else (),
                           dtype=_checks.opmath_dtype(input.dtype))


def _item_shape(t, o):
    return (t["input"].shape[0], 1)


def _out_of_range(value: int, C: int) -> RuntimeError:
    return RuntimeError(f"multilabel_margin_loss: argument #2 'target' is out of range: it holds {value}; values must "
                        f"lie in [-1, {C})")


def reference_multilabel_margin_loss(input: Tensor, target: Tensor, options: MultilabelMarginOptions) -> Tensor:
    """Plain PyTorch (the "reference" backend): torch's formula, in float32 for low-precision inputs (torch's CPU
    kernel has none), and a NaN mean over an empty batch (torch's reads uninitialised memory)."""
    C = input.shape[-1] if input.dim() > 0 else 1
    x = input.reshape(-1, C)
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.float()
    t = target.reshape(-1, C)
    bad = (t < -1) | (t >= C)
    if _checks.host_readable(bad):
        if bool(bad.any()):
            raise _out_of_range(int(t[bad][0]), C)
    else:
        torch._assert_async(~bad.any(), "multilabel_margin_loss: argument #2 'target' is out of range")
    # listed: positions before the row's first -1
    listed = (t < 0).int().cumsum(1) == 0
    classes = torch.where(listed, t, 0)
    is_target = torch.zeros(x.shape, dtype=torch.int64, device=x.device).scatter_add_(1, classes, listed.long()) > 0
    x_listed = x.gather(1, classes)  # (N, C): the listed classes' scores (unused positions masked below)
    z = 1 - x_listed.unsqueeze(2) + x.unsqueeze(1)  # [r, j, i]
    keep = listed.unsqueeze(2) & ~is_target.unsqueeze(1) & (z > 0)
    loss = torch.where(keep, z, torch.zeros((), dtype=z.dtype)).sum((1, 2)) / C
    if options.reduction == "none":
        loss = loss.reshape(()) if input.dim() < 2 else loss
    elif options.reduction == "sum":
        loss = loss.sum()
    else:
        loss = _reduce.mean(loss.sum(), x.shape[0])
    return loss.to(_checks.output_dtype(input))


def _eager_multilabel_margin_loss(input: Tensor, target: Tensor, **kwargs) -> Tensor:
    """What eager PyTorch users run: torch's CPU kernel has no bf16/fp16, so those inputs go through float32."""
    if input.dtype in (torch.bfloat16, torch.float16) and input.device.type == "cpu":
        return torch_multilabel_margin_loss(input.float(), target, **kwargs).to(input.dtype)
    return torch_multilabel_margin_loss(input, target, **kwargs)


def label_lists(x: Tensor, listed: int = 3) -> Tensor:
    """A multi-label target for scores x: up to `listed` distinct classes a row, then -1 and values past it."""
    C = x.shape[-1] if x.dim() > 0 else 1
    rows = x.reshape(-1, C).shape[0]
    target = torch.rand(rows, C, device=x.device).argsort(1)
    count = torch.randint(0, min(listed, C) + 1, (rows, 1), device=x.device)
    target = torch.where(torch.arange(C, device=x.device) == count, -1, target)
    return target.reshape(x.shape)


def _scores(dtype):
    torch.manual_seed(0)
    x = torch.randn(6, 5, dtype=dtype)
    return [x, label_lists(x)]


def _selfcheck_inputs(dtype):
    x = torch.randn(64, 200, dtype=dtype)
    return x, label_lists(x, 20)


MULTILABEL_MARGIN_LOSS = _family.register(_family.Family(
    name="multilabel_margin_loss", inputs=INPUTS, options=MultilabelMarginOptions, kernel=KERNEL, run=_run,
    loss_like=_loss_like, item_shape=_item_shape, reference=reference_multilabel_margin_loss,
    function=multilabel_margin_loss, full_path=_full_multilabel_margin_loss, eager_routes=(EAGER_ROUTE,),
    torch_fn=torch_multilabel_margin_loss, bad_inputs="label_lists",
    cases=(_family.Case(_scores, {}, torch_multilabel_margin_loss, bad=("target_out_of_range",)),
           _family.Case(_scores, dict(reduction="none"), torch_multilabel_margin_loss)),
    selfcheck=({}, torch_multilabel_margin_loss, _selfcheck_inputs),
    # torch.compile's multilabel_margin_loss forms an (N, C, C) tensor (1.2 s a call at 1024x1000): the shapes stop
    # where the compile column stays minutes, not hours; the loss reads 8 MB at 8192x256.
    bench=_family.Bench(_eager_multilabel_margin_loss, label_lists, ((256, 1000), (4096, 256), (8192, 256)),
                        columns="classes", grid_shapes=G.TINY + ((65536, 10), (1000, 80), (8192, 256)),
                        grid_quick_shapes=G.TINY)))
MULTILABEL_MARGIN_LOSS.module = _family.make_module(MULTILABEL_MARGIN_LOSS, "MultiLabelMarginLoss",
                                                    doc="Drop-in for torch.nn.MultiLabelMarginLoss.")
