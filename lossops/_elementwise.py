"""What every elementwise loss family shares: its op's inputs and plumbing options, the kernel call, the eager path.

Call path (the family modules: focal.py, bce.py, regression.py): the public function validates and works out
the mean's denominator -> elementwise_loss() picks the backend -> the family's custom op (`lossops::<name>`,
made by lossops._family from declare()'s Family) runs the backend's fused kernel (csrc/<family>.cpp or
triton_kernels/<family>.py through triton_kernels/elementwise.py), which returns the per-element loss
(reduction="none") or its sum and, in the same pass, the gradients with respect to input and target,
already multiplied by the per-element weight and 1/denominator -> backward multiplies them by
grad_output (lossops._reduce.apply_grad_output).

Every elementwise kernel takes the keyword parameters ELEMENTWISE_PARAMETERS followed by its family's own
(beta, gamma, ...): weight and aux (pos_weight) are compact broadcast operands, element i reads
operand[(i // inner) % period] with layout = [inner, period] (see broadcast_layout), so a (C,) pos_weight is
never expanded to (N, C). An aux operand of the input's shape and dtype (the third tensor of margin_ranking_loss and
gaussian_nll_loss), in a call without weight, is read as it is by the kernels' dense pass.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from . import _backend, _checks, _eager, _family, _reduce, _sharding

ELEMENTWISE_PARAMETERS = ("input", "target", "weight", "weight_layout", "aux", "aux_layout", "ignore_index",
                          "grad_input", "grad_target", "grad_scale", "per_element")
INPUTS = (_family.Input("input", differentiable=True), _family.Input("target", differentiable=True),
          _family.Input("weight", optional=True), _family.Input("aux", optional=True), _family.Input("denominator"))


@dataclasses.dataclass(frozen=True)
class ElementwiseOptions:
    """The op arguments every elementwise family has; a family's options record extends it."""
    reduction: str = "mean"
    ignore_index: int = -100           # class-index targets only
    weight_layout: list[int] = dataclasses.field(default_factory=lambda: [1, 1])
    aux_layout: list[int] = dataclasses.field(default_factory=lambda: [1, 1])


def kernel(name: str, module: str, parameters: tuple[str, ...] = ()) -> _family.Kernel:
    """An elementwise kernel: the shared parameters, then the family's own (in the order its functor reads them)."""
    return _family.Kernel(name, module, ELEMENTWISE_PARAMETERS + tuple(parameters))


def _run(family, backend, t, o, grads):
    input = t["input"]
    gi = _backend.empty_gradient(input) if grads["input"] else None
    gt = _backend.empty_gradient(input) if grads["target"] else None
    common = dict(input=input, target=t["target"], weight=t["weight"], weight_layout=o.weight_layout, aux=t["aux"],
                  aux_layout=o.aux_layout, ignore_index=o.ignore_index, grad_input=gi, grad_target=gt,
                  **family.kernel_options(t, o))
    if backend == "triton":
        # The launch forms the gradients' scale from the denominator and reduces the loss itself: no torch op
        # before or after it on the device.
        reduced = _backend.kernel(backend, family.kernel.module, family.kernel.name).reduced
        loss = reduced(**common, reduction=o.reduction, denominator=t["denominator"])
        return (loss.view(input.shape) if o.reduction == "none" else loss), {"input": gi, "target": gt}
    loss, total = family.kernel(backend, **common, grad_scale=_reduce.gradient_scale(o.reduction, t["denominator"]),
                                per_element=o.reduction == "none")
    out = _reduce.reduce(o.reduction, loss.view(input.shape) if o.reduction == "none" else loss, total,
                         t["denominator"])
    return out, {"input": gi, "target": gt}


def _loss_like(t, o):
    input = t["input"]
    return input.new_empty(input.shape if o.reduction == "none" else (), dtype=_checks.opmath_dtype(input.dtype))


def declare(name: str, options: type, kernel: _family.Kernel, kernel_options: Callable,
            eager_gradients: tuple[str, ...] = ("input", "target"), extra_eager_routes: tuple = (),
            eager_layout: str = "same_shape", **declaration) -> _family.Family:
    """Registers an elementwise family: kernel_options(tensors, options) -> its own kernel parameters by name.
    eager_gradients: the inputs whose gradients its kernel writes on the C++ eager path (eager()); () for none.
    eager_layout: "same_shape_aux" for a family whose eager calls pass the aux operand, of the input's shape, too.
    extra_eager_routes: the family's other routes (eager_route with another denominator), which it calls itself."""
    declaration.setdefault("sharding", _sharding.Sharding())  # every dimension an item dimension; mean over all
    if eager_gradients:
        declaration["eager_routes"] = (eager_route(kernel, eager_gradients, layout=eager_layout),
                                       *extra_eager_routes)
    return _family.register(_family.Family(name=name, inputs=INPUTS, options=options, kernel=kernel, run=_run,
                                           loss_like=_loss_like, kernel_options=kernel_options, **declaration))


def eager_route(kernel: _family.Kernel, gradients: tuple[str, ...], denominator: str = "elements",
                layout: str = "same_shape") -> _eager.EagerRoute:
    """An unweighted call on input and target (layout "same_shape_aux": and aux) of one shape and dtype: the mean
    over every element (or over the first dimension's size: denominator="batch"); the family's own kernel
    parameters are the call's scalars."""
    own = kernel.parameters[len(ELEMENTWISE_PARAMETERS):]
    no_aux = {} if layout == "same_shape_aux" else {"aux": None, "aux_layout": [1, 1]}
    return _eager.EagerRoute(
        layout, denominator, scalars=tuple(_eager.Scalar(p) for p in own),
        gradients={f"grad_{n}": n for n in gradients},
        constants={"weight": None, "weight_layout": [1, 1], **no_aux, "ignore_index": -100,
                   **{f"grad_{n}": None for n in ("input", "target") if n not in gradients}},
        node="LossopsElementwiseBackward")


def broadcast_layout(operand: Optional[Tensor], shape: torch.Size,
                     dtype: torch.dtype) -> tuple[Optional[Tensor], list[int]]:
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


def eager(family: _family.Family, input: Tensor, target: Tensor, reduction, options, *aux: Tensor
          ) -> Optional[Tensor]:
    """The C++ eager path (lossops/_eager.py) for a call with input and target (and, for a family declared with the
    "same_shape_aux" layout, aux) of one shape and dtype, no weights and the mean over all elements (the family's
    eager route); None where it does not apply, and then the family's checks and custom op run (they raise the
    errors, so this is tried first). options: the family's options record."""
    if _eager.compiling():
        return None
    extra = family.kernel_options(None, options)
    return family.eager_routes[0].call(reduction, input, target, *aux,
                                       *(extra[p] for p in family.kernel.parameters[len(ELEMENTWISE_PARAMETERS):]))


def denominator_tensor(value, input: Tensor) -> Tensor:
    """The mean's denominator as a tensor in the accumulation dtype: no host sync for tensors, and a number is
    filled in on the device (a kernel argument, capturable), never copied from host memory."""
    dtype = _checks.opmath_dtype(input.dtype)
    if isinstance(value, Tensor):
        return value.detach().to(device=input.device, dtype=dtype).reshape(())
    return torch.full((), float(value), dtype=dtype, device=input.device)


def avg_factor(value, reduction: str):
    """mmdetection's convention: `avg_factor` replaces the mean's denominator, is ignored for 'none' and is an
    error with 'sum'. Returns None when it does not apply."""
    if value is None or reduction == "none":
        return None
    if reduction == "sum":
        raise ValueError('lossops: avg_factor can not be used with reduction="sum"')
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"lossops: avg_factor must be a number or a one-element tensor, got a tensor of shape "
                             f"{tuple(value.shape)}")
        value = value.reshape(())  # the loss stays 0-d whatever the factor's shape
    else:
        value = float(value)
        if value != value:
            raise ValueError(f"lossops: avg_factor must be a number, got {value}")
    return value


def kernel_operands(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """input and target in the dtypes the kernels read: torch's promoted dtype, except that under autocast
    low-precision input with a float32 target is read as is (the kernels accumulate in float32 anyway), so no
    float32 copy of the input is made. A target that needs a gradient is always promoted."""
    dtype = torch.promote_types(input.dtype, target.dtype)
    if (_checks.autocast_enabled(input.device) and input.dtype in (torch.bfloat16, torch.float16)
            and target.dtype == torch.float32 and not (torch.is_grad_enabled() and target.requires_grad)):
        return input, target
    return input.to(dtype), target.to(dtype)


def elementwise_loss(family: _family.Family, input: Tensor, target: Tensor, *, options, denominator,
                     reference: Callable[[], Tensor], weight: Optional[Tensor] = None, aux: Optional[Tensor] = None,
                     kernel_target_grad: bool = True, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Runs a family's op on the backend serving `input`, or `reference()` (plain PyTorch) where the kernels do not
    apply: the reference backend, and gradients the kernels do not compute (weights; targets when
    kernel_target_grad is False).

    input and target (floating, same shape and dtype, or int64 class indices per row) are already validated.
    options: the family's options record (reduction and family options; layouts are filled in here).
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
    if weight is None and aux is not None and aux.shape == input.shape and aux.dtype == input.dtype and input.numel():
        a, a_layout = aux.reshape(-1).contiguous(), [1, input.numel()]  # read in the input's dtype by the dense pass
    else:
        a, a_layout = broadcast_layout(aux, input.shape, acc)
    options = family.replace(options, weight_layout=w_layout, aux_layout=a_layout)
    tensors = {"input": input.contiguous(), "target": target.contiguous(), "weight": w, "aux": a,
               "denominator": denominator_tensor(denominator, input)}
    loss = family.apply(backend, tensors, options,
                        {"input": grad_enabled and input.requires_grad, "target": target_grad})
    if out_dtype is None or _checks.autocast_enabled(input.device):
        out_dtype = _checks.output_dtype(input)
    return loss.to(out_dtype)


def reduce_reference(loss: Tensor, reduction: str, denominator) -> Tensor:
    """The reduction the kernels apply, for reference implementations that compute per-element losses."""
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    return _reduce.mean(total, denominator.to(total.dtype) if isinstance(denominator, Tensor) else denominator)
