"""The custom op, autograd and backend plumbing shared by every elementwise loss family.

Call path (one per family module: focal.py, bce.py, regression.py): the public function validates and
works out the mean's denominator -> elementwise_loss() picks the backend -> the family's custom op
(`lossops::<name>`, defined here by define_op) runs the backend's fused kernel (csrc/<family>.cpp or
triton_kernels/<family>.py through triton_kernels/elementwise.py), which returns the per-element loss
(reduction="none") or its sum and, in the same pass, the gradients with respect to input and target,
already multiplied by the per-element weight and 1/denominator -> backward multiplies them by
grad_output (lossops._reduce.apply_grad_output).

Both kernel backends expose, per family, the same function:
    kernel(input, target, weight, weight_layout, aux, aux_layout, params, ignore_index,
           grad_input, grad_target, grad_scale, per_element) -> [per-element loss or empty, sum]
where weight and aux (pos_weight) are compact broadcast operands: element i reads operand[(i // inner) % period]
with layout = [inner, period] (see broadcast_layout), so a (C,) pos_weight is never expanded to (N, C).
"""
from __future__ import annotations

import math
import types
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from . import _backend, _checks, _eager, _reduce

# custom op -> the name of its kernel in each backend (the C++ eager path calls it by that name)
_KERNEL_NAMES = {}


def broadcast_layout(operand: Optional[Tensor], shape: torch.Size, dtype: torch.dtype) -> tuple[Optional[Tensor], list[int]]:
    """A contiguous compact copy of an operand broadcast to `shape`, and its [inner, period] layout.

    The compact form applies when the operand's non-1 dimensions form one run equal to the output's
    (e.g. (C,) or (N, 1) against (N, C)); any other pattern is materialised once.
    """
    numel = math.prod(shape)
    if operand is None or numel == 0:
        return None, [1, 1]
    sizes = [1] * (len(shape) - operand.dim()) + list(operand.shape)
    varying = [i for i, s in enumerate(sizes) if s != 1]
    if not varying:
        return operand.reshape(1).to(dtype).contiguous(), [1, 1]
    first, last = varying[0], varying[-1] + 1
    if all(sizes[i] == shape[i] for i in range(first, last)):
        period = math.prod(shape[first:last])
        return operand.reshape(period).to(dtype).contiguous(), [math.prod(shape[last:]), period]
    return operand.expand(shape).reshape(numel).to(dtype).contiguous(), [1, numel]


def define_op(name: str, module: str):
    """Registers `lossops::<name>` with its fake implementation and autograd; returns the op. Its kernel is the
    function `name` of the C++ module, or of lossops.triton_kernels.<module>."""

    def op(input: Tensor, target: Tensor, weight: Optional[Tensor], weight_layout: list[int], aux: Optional[Tensor],
           aux_layout: list[int], params: list[float], ignore_index: int, reduction: str, denominator: Tensor,
           grad_input: bool, grad_target: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
        gi = _backend.empty_gradient(input) if grad_input else None
        gt = _backend.empty_gradient(input) if grad_target else None
        kernel = getattr(_backend.kernels(backend, module), name)
        loss, total = kernel(input, target, weight, weight_layout, aux, aux_layout, params, ignore_index, gi, gt,
                             _reduce.gradient_scale(reduction, denominator), reduction == "none")
        out = _reduce.reduce(reduction, loss.view(input.shape) if reduction == "none" else loss, total, denominator)
        return out, input.new_empty((0,)) if gi is None else gi, input.new_empty((0,)) if gt is None else gt

    op.__name__ = name
    custom = torch.library.custom_op(f"lossops::{name}", op, mutates_args=())

    @custom.register_fake
    def _(input, target, weight, weight_layout, aux, aux_layout, params, ignore_index, reduction, denominator,
          grad_input, grad_target, backend):
        loss = input.new_empty(input.shape if reduction == "none" else (), dtype=_checks.opmath_dtype(input.dtype))
        return (loss, input.new_empty(input.shape if grad_input else (0,)),
                input.new_empty(input.shape if grad_target else (0,)))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[1], output[2])
        # apply_grad_output keeps per-gradient state on the object it is given: one per gradient.
        ctx.target_state = types.SimpleNamespace()
        _reduce.mark_gradient_outputs(ctx, output[1], output[2])

    def backward(ctx, grad_loss, _grad_input, _grad_target):
        if any(ctx.needs_input_grad[2:]):
            raise RuntimeError(f"lossops: {name} computes no gradient with respect to weights; "
                               "the public function routes such calls to the reference backend")
        gi, gt = ctx.saved_tensors
        grad_input = _reduce.apply_grad_output(ctx, gi, grad_loss) if ctx.needs_input_grad[0] else None
        grad_target = _reduce.apply_grad_output(ctx.target_state, gt, grad_loss) if ctx.needs_input_grad[1] else None
        return (grad_input, grad_target) + (None,) * 11

    custom.register_autograd(backward, setup_context=setup_context)
    _KERNEL_NAMES[custom] = name
    return custom


def eager(op, input: Tensor, target: Tensor, reduction, params: Sequence[float] = (),
          kernel_target_grad: bool = True) -> Optional[Tensor]:
    """The C++ eager path (lossops/_eager.py) for a call with input and target of one shape and dtype, no weights
    and the mean over all elements; None where it does not apply, and then the family's checks and custom op
    run (they raise the errors, so this is tried first)."""
    if type(reduction) is not str or not (cpp := _eager.cpp_module(input, target)):
        return None
    return cpp.eager_elementwise(_KERNEL_NAMES[op], input, target, params, reduction, kernel_target_grad)


def denominator_tensor(value, input: Tensor) -> Tensor:
    """The mean's denominator as a tensor in the accumulation dtype (no host sync for tensors)."""
    dtype = _checks.opmath_dtype(input.dtype)
    if isinstance(value, Tensor):
        return value.detach().to(device=input.device, dtype=dtype).reshape(())
    return torch.tensor(float(value), dtype=dtype, device=input.device)


def avg_factor(value, reduction: str):
    """mmdetection's convention: `avg_factor` replaces the mean's denominator, is ignored for 'none' and is an
    error with 'sum'. Returns None when it does not apply."""
    if value is None or reduction == "none":
        return None
    if reduction == "sum":
        raise ValueError('lossops: avg_factor can not be used with reduction="sum"')
    if not isinstance(value, Tensor):
        value = float(value)
        if value != value:
            raise ValueError(f"lossops: avg_factor must be a number, got {value}")
    return value


def kernel_operands(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """input and target in the dtypes the kernels read: torch's promoted dtype, except that under autocast
    low-precision input with a float32 target is read as is (the kernels accumulate in float32 anyway), so no
    float32 copy of the input is made. A target that needs a gradient is always promoted."""
    dtype = torch.promote_types(input.dtype, target.dtype)
    if (torch.is_autocast_enabled(input.device.type) and input.dtype in (torch.bfloat16, torch.float16)
            and target.dtype == torch.float32 and not (torch.is_grad_enabled() and target.requires_grad)):
        return input, target
    return input.to(dtype), target.to(dtype)


def elementwise_loss(op, input: Tensor, target: Tensor, *, reduction: str, denominator, reference: Callable[[], Tensor],
                     weight: Optional[Tensor] = None, aux: Optional[Tensor] = None, params: Sequence[float] = (),
                     ignore_index: int = -100, kernel_target_grad: bool = True,
                     out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Runs a family's op on the backend serving `input`, or `reference()` (plain PyTorch) where the kernels do not
    apply: the reference backend, and gradients the kernels do not compute (weights; targets when
    kernel_target_grad is False).

    input and target (floating, same shape and dtype, or int64 class indices per row) are already validated.
    out_dtype: the loss's dtype where torch's differs from the input's (outside autocast).
    """
    backend = _backend.resolve(input.device)
    grad_enabled = torch.is_grad_enabled()
    target_grad = grad_enabled and target.requires_grad
    extra_grad = grad_enabled and any(t is not None and t.requires_grad for t in (weight, aux))
    if backend == "reference" or extra_grad or (target_grad and not kernel_target_grad):
        return reference()
    acc = _checks.opmath_dtype(input.dtype)
    w, w_layout = broadcast_layout(weight, input.shape, acc)
    a, a_layout = broadcast_layout(aux, input.shape, acc)
    loss, _, _ = op(input.contiguous(), target.contiguous(), w, w_layout, a, a_layout, [float(p) for p in params],
                    ignore_index, reduction, denominator_tensor(denominator, input),
                    grad_enabled and input.requires_grad, target_grad, backend)
    if out_dtype is None or torch.is_autocast_enabled(input.device.type):
        out_dtype = _checks.output_dtype(input)
    return loss.to(out_dtype)


def reduce_reference(loss: Tensor, reduction: str, denominator) -> Tensor:
    """The reduction the kernels apply, for reference implementations that compute per-element losses."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return total / (denominator.to(total.dtype) if isinstance(denominator, Tensor) else denominator)
