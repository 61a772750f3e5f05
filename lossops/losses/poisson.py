"""`lossops.poisson_nll_loss`: torch's function, fused, as the custom op `lossops::poisson_nll_loss`.

torch's definition (torch.poisson_nll_loss): exp(input) - target * input for log_input, else
input - target * log(input + eps); full adds Stirling's approximation of log(target!) where target > 1. The
gradient with respect to the target is computed in the same pass when the target requires grad; where the Stirling
term is masked out it contributes 0 to it (torch's is NaN at target <= 0; docs/differences-from-torch.md). input
and target broadcast and promote as in torch. Integer inputs take torch's own function (the reference). Kernels:
csrc/poisson.cpp, triton_kernels/poisson.py.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _elementwise, _family
from .._family import GridShapes as G


@dataclasses.dataclass(frozen=True)
class PoissonNLLOptions(_elementwise.ElementwiseOptions):
    log_input: bool = True
    full: bool = False
    eps: float = 1e-8


def _kernel_options(_tensors, o: PoissonNLLOptions) -> dict:
    return {"mode": float(bool(o.log_input)) + 2.0 * float(bool(o.full)), "eps": float(o.eps)}


def _log_rates_and_counts(dtype):
    return [torch.randn(6, 5, dtype=dtype), (torch.rand(6, 5, dtype=dtype) * 4).floor()]


def _rates_and_values(dtype):
    # non-integer targets: the Stirling term switches on at exactly 1, where the loss is not continuous
    return [torch.rand(6, 5, dtype=dtype) * 3 + 0.1, torch.rand(6, 5, dtype=dtype) * 4]


def _selfcheck_inputs(dtype):
    return torch.randn(4096, dtype=dtype), (torch.rand(4096, dtype=dtype) * 6).floor()


def _count_target(x: Tensor) -> Tensor:
    return (torch.rand_like(x) * 6).floor()


POISSON_NLL_LOSS = _elementwise.declare(
    "poisson_nll_loss", PoissonNLLOptions, _elementwise.kernel("poisson_nll", "poisson", ("mode", "eps")),
    _kernel_options, bad_inputs="elementwise", torch_fn=F.poisson_nll_loss,
    cases=(_family.Case(_log_rates_and_counts, {}, F.poisson_nll_loss),
           # rates, not log-rates: a model's output reaches them through exp
           _family.Case(_rates_and_values, dict(log_input=False, full=True), F.poisson_nll_loss, link=torch.exp)),
    selfcheck=(dict(full=True), functools.partial(F.poisson_nll_loss, full=True), _selfcheck_inputs),
    bench=_family.Bench(F.poisson_nll_loss, _count_target, ((256, 1000), (4096, 1024), (4096, 4096)),
                        columns="columns", grid_shapes=G.TINY + G.MID + G.ELEMENTWISE_LARGE,
                        grid_quick_shapes=G.TINY))


def poisson_nll_loss(input: Tensor, target: Tensor, log_input: bool = True, full: bool = False, size_average=None,
                     eps: float = 1e-8, reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for torch.nn.functional.poisson_nll_loss, fused forward+backward (target gradient included)."""
    if (size_average is None and reduce is None and type(log_input) is bool and type(full) is bool
            and type(eps) is float):
        loss = _elementwise.eager(POISSON_NLL_LOSS, input, target, reduction,
                                  PoissonNLLOptions(log_input=log_input, full=full, eps=eps))
        if loss is not None:
            return loss
    if size_average is None and reduce is None and not isinstance(reduction, str):
        # torch builds its error message by adding the reduction to a string: a TypeError there
        raise TypeError(f"lossops: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    reduction = _checks.reduction(reduction, size_average, reduce)
    options = PoissonNLLOptions(reduction, log_input=_flag("log_input", log_input), full=_flag("full", full),
                                eps=_checks.real("eps", eps))
    _checks.tensor("input", input)
    _checks.tensor("target", target)
    _checks.same_device(input, target=target)
    for name, value in (("input", input), ("target", target)):
        if value.is_complex():
            raise RuntimeError(f"lossops: poisson_nll_loss {name} must be real, got dtype {value.dtype}")
    shape = _checks.broadcast_shape(input.shape, target.shape)

    def reference():
        return reference_poisson(input, target, options)

    dtype = torch.promote_types(input.dtype, target.dtype)
    if not input.is_floating_point():  # exp / log of an integer input: torch's own dtype rules
        return reference()
    x, t = _elementwise.kernel_operands(input, target)
    return _elementwise.elementwise_loss(POISSON_NLL_LOSS, x.expand(shape), t.expand(shape), options=options,
                                         denominator=shape.numel(), reference=reference, out_dtype=dtype)


def reference_poisson(input: Tensor, target: Tensor, options: PoissonNLLOptions) -> Tensor:
    """Plain PyTorch (the "reference" backend): torch's loss, with the Stirling term's target gradient 0 where the
    term is masked out (torch's is NaN at target <= 0: 0 * log(0) through its masked_fill)."""
    loss = F.poisson_nll_loss(input, target, log_input=options.log_input, full=False, eps=options.eps,
                              reduction="none")
    if options.full:
        kept = ~(target <= 1)  # a NaN target keeps its (NaN) term, as torch's mask does
        counts = torch.where(kept, target, 2)
        stirling = counts * counts.log() - counts + 0.5 * (2 * math.pi * counts).log()
        loss = loss + torch.where(kept, stirling, 0).to(loss.dtype)
    return _elementwise.reduce_reference(loss, options.reduction, loss.numel())


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):  # torch's argument parser takes a bool only
        raise TypeError(f"lossops: poisson_nll_loss {name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


POISSON_NLL_LOSS.function = poisson_nll_loss
POISSON_NLL_LOSS.module = _family.make_module(POISSON_NLL_LOSS, "PoissonNLLLoss",
                                              doc="Drop-in for torch.nn.PoissonNLLLoss.")
