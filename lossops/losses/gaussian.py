"""`lossops.gaussian_nll_loss`: torch's function, fused, as the custom op `lossops::gaussian_nll_loss`.

torch's definition (F.gaussian_nll_loss): (log v + (input - target)^2 / v) / 2, plus log(2 pi) / 2 when full, with
v = max(var, eps) taken on a copy under no_grad, so var's gradient is formed at the clamped value as if unclamped.
var has the input's shape, or the input's without its last dimension, or that of the input with one dimension of
size 1 (homoscedastic; the one-dimension-short form is unsqueezed), or is a float; torch's errors: a negative
entry, an incorrect size, an unknown reduction (ValueError each).

The kernel (csrc/gaussian_nll.cpp, triton_kernels/gaussian_nll.py) differentiates the input and one more operand in
its pass: var where var requires grad (the target is then its compact auxiliary operand), else the target (var is
then the auxiliary operand, never expanded). A call that differentiates input, target and var together, and
integer inputs, take the reference path.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from .. import _checks, _elementwise, _family
from .._family import GridShapes as G

HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


@dataclasses.dataclass(frozen=True)
class GaussianNLLOptions(_elementwise.ElementwiseOptions):
    full: bool = False
    eps: float = 1e-6
    var_in_aux: bool = False  # var is the auxiliary operand and the target the second one (else the other way)


def _kernel_options(_tensors, o: GaussianNLLOptions) -> dict:
    return {"mode": float(bool(o.full)) + 2.0 * float(bool(o.var_in_aux)), "eps": float(o.eps)}


def _heteroscedastic(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.randn(6, 5, dtype=dtype), torch.rand(6, 5, dtype=dtype) + 0.1]


def _homoscedastic(dtype):
    return [torch.randn(6, 5, dtype=dtype), torch.randn(6, 5, dtype=dtype), torch.rand(6, dtype=dtype) + 0.1]


def _selfcheck_inputs(dtype):
    return torch.randn(4096, dtype=dtype), torch.randn(4096, dtype=dtype), torch.rand(4096, dtype=dtype) + 0.05


def _bench_inputs(shape, dtype, device):
    """A model predicting a mean and a variance (through softplus, as such models do), both differentiated."""
    mean = torch.randn(shape, dtype=dtype, device=device).requires_grad_()
    return mean, torch.randn(shape, dtype=dtype, device=device), (torch.rand(shape, dtype=dtype, device=device)
                                                                   + 0.1).requires_grad_()


def _torch_gaussian_nll(input, target, var, **kwargs):
    return torch.nn.functional.gaussian_nll_loss(input, target, var, **kwargs)


GAUSSIAN_NLL_LOSS = _elementwise.declare(
    "gaussian_nll_loss", GaussianNLLOptions, _elementwise.kernel("gaussian_nll", "gaussian_nll", ("mode", "eps")),
    _kernel_options, eager_layout="same_shape_aux", bad_inputs="variance", torch_fn=_torch_gaussian_nll,
    cases=(_family.Case(_heteroscedastic, {}, _torch_gaussian_nll),
           _family.Case(_homoscedastic, dict(full=True, eps=1e-3, reduction="sum"), _torch_gaussian_nll)),
    selfcheck=(dict(full=True), lambda *a: _torch_gaussian_nll(*a, full=True), _selfcheck_inputs),
    bench=_family.Bench(_torch_gaussian_nll, torch.randn_like, ((256, 1000), (4096, 1024), (4096, 4096)),
                        columns="columns", make_inputs=_bench_inputs,
                        grid_shapes=G.TINY + G.MID + G.ELEMENTWISE_LARGE, grid_quick_shapes=G.TINY))


def gaussian_nll_loss(input: Tensor, target: Tensor, var: Tensor | float, full: bool = False, eps: float = 1e-6,
                      reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.gaussian_nll_loss, fused forward+backward: the input's gradient and var's
    (or, where var needs none, the target's) from one pass."""
    if isinstance(var, float):
        if var < 0:
            raise ValueError("var has negative entry/entries")
    else:
        _checks.tensor("var", var)
        _no_negative_entry(var)
        if type(full) is bool and type(eps) is float:
            var_grad = torch.is_grad_enabled() and var.requires_grad
            second, aux = (var, target) if var_grad else (target, var)
            loss = _elementwise.eager(GAUSSIAN_NLL_LOSS, input, second, reduction,
                                      GaussianNLLOptions(full=full, eps=eps, var_in_aux=not var_grad), aux)
            if loss is not None:
                return loss
    _checks.tensor("input", input)
    _checks.tensor("target", target)
    if isinstance(var, float):
        var = var * torch.ones_like(input)
    _checks.same_device(input, target=target, var=var)
    for name, value in (("input", input), ("target", target), ("var", var)):
        if value.is_complex():
            raise RuntimeError(f"lossops: gaussian_nll_loss {name} must be real, got dtype {value.dtype}")
    var = _var_against_input(var, input)
    if reduction not in ("none", "mean", "sum"):  # torch adds the reduction to a string: a TypeError for others
        raise ValueError(reduction + " is not valid (lossops: reduction must be 'none', 'mean' or 'sum')")
    if not var.is_floating_point() and not var.is_complex() and not isinstance(eps, (int, bool)):
        # torch clamps a copy of var in place at eps: an integer var cannot hold a floating eps
        raise RuntimeError(f"lossops: gaussian_nll_loss var must be a floating-point tensor for a floating eps "
                           f"(torch clamps it in place at eps), got var of dtype {var.dtype} and eps={eps!r}")
    options = GaussianNLLOptions(reduction, full=bool(full), eps=_eps(eps))  # torch tests `if full:`
    shape = _checks.broadcast_shape(_checks.broadcast_shape(input.shape, target.shape), var.shape)

    def reference():
        return reference_gaussian_nll(input, target, var, options)

    dtype = torch.promote_types(torch.promote_types(input.dtype, target.dtype), var.dtype)
    if not dtype.is_floating_point:
        return reference()
    var_grad = torch.is_grad_enabled() and var.requires_grad
    second, aux = (var, target) if var_grad else (target, var)
    options = GAUSSIAN_NLL_LOSS.replace(options, var_in_aux=not var_grad)
    x, s = _operands_in(dtype, input, second)
    return _elementwise.elementwise_loss(GAUSSIAN_NLL_LOSS, x.expand(shape), s.expand(shape), options=options,
                                         denominator=shape.numel(), reference=reference, aux=aux, out_dtype=dtype)


def _operands_in(dtype: torch.dtype, input: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel's input and second operand: in the promoted dtype, except under autocast, where a low-precision
    input is read as is (lossops._elementwise.kernel_operands)."""
    if _checks.autocast_enabled(input.device):
        return _elementwise.kernel_operands(input, second)
    return input.to(dtype), second.to(dtype)


def reference_gaussian_nll(input: Tensor, target: Tensor, var: Tensor, options: GaussianNLLOptions) -> Tensor:
    """Plain PyTorch (the "reference" backend): torch's formula, var already checked and shaped against the input."""
    var = var.clone()
    with torch.no_grad():
        # an integer var comes with an integral eps only (gaussian_nll_loss refuses others, as torch's clamp_ does)
        var.clamp_(min=options.eps if var.is_floating_point() else int(options.eps))
    loss = 0.5 * (torch.log(var) + (input - target) ** 2 / var)
    if options.full:
        loss = loss + HALF_LOG_TWO_PI
    return _elementwise.reduce_reference(loss, options.reduction, loss.numel())


def _no_negative_entry(var: Tensor) -> None:
    """torch's check of var's entries, without a host sync where the values are on a device (a device-side
    assertion there, and in a compiled graph, where it is a RuntimeError)."""
    if not _checks.host_readable(var) or torch.compiler.is_compiling():
        torch._assert_async(~(var < 0).any(), "var has negative entry/entries")
        return
    # the smallest entry: one read of var, where var < 0 writes a mask and reads it again; NaN (the smallest of a
    # var with a NaN) says nothing of the other entries, which the mask then checks
    smallest = var.amin() if var.numel() else var.new_zeros(())
    if smallest < 0 or (smallest != smallest and (var < 0).any()):
        raise ValueError("var has negative entry/entries")


def _var_against_input(var: Tensor, input: Tensor) -> Tensor:
    """torch's size rules for var: the input's size; the input's without its last dimension (unsqueezed here); or
    the input's number of dimensions with one mismatched dimension, of size 1 in var."""
    if var.size() == input.size():
        return var
    if input.size()[:-1] == var.size():
        return torch.unsqueeze(var, -1)
    if input.ndim == var.ndim and sum(v for i, v in zip(input.size(), var.size()) if i != v) == 1:
        return var
    raise ValueError(f"var is of incorrect size (lossops: var of shape {tuple(var.shape)} for input of shape "
                     f"{tuple(input.shape)})")


def _eps(value) -> float:
    """eps as torch's clamp_(min=eps) takes it: a number or a one-element tensor; None and other tensors are
    clamp's RuntimeError, anything else a TypeError."""
    if value is None or (isinstance(value, Tensor) and value.numel() != 1):
        raise RuntimeError(f"lossops: gaussian_nll_loss eps must be a number or a one-element tensor, got {value!r}")
    return _checks.real("eps", value)


GAUSSIAN_NLL_LOSS.function = gaussian_nll_loss
GAUSSIAN_NLL_LOSS.module = _family.make_module(GAUSSIAN_NLL_LOSS, "GaussianNLLLoss", inputs=3, keyword_only=True,
                                               doc="Drop-in for torch.nn.GaussianNLLLoss.")
