"""`lossops.kl_div`: torch's F.kl_div, fused forward+backward, as the custom op `lossops::kl_div`.

input holds log-probabilities, target probabilities (or log-probabilities with log_target=True); the pointwise
term, its gradients with respect to both, and torch's reductions ("batchmean": the sum over the first dimension's
size). Kernels: csrc/divergence.cpp, triton_kernels/divergence.py.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks, _eager, _elementwise, _family
from .._family import GridShapes as G

KERNEL = _elementwise.kernel("kl_div", "divergence", ("log_target",))


@dataclasses.dataclass(frozen=True)
class KLDivOptions(_elementwise.ElementwiseOptions):
    log_target: bool = False


_MEAN_WARNING = ("reduction: 'mean' divides the total loss by both the batch size and the support size."
                 "'batchmean' divides only by the batch size, and aligns with the KL div math definition."
                 "'mean' will be changed to behave the same as 'batchmean' in the next major release.")

# reduction="batchmean" on the C++ eager path: the kernel's mean over the first dimension's size.
EAGER_BATCHMEAN = _elementwise.eager_route(KERNEL, ("input", "target"), denominator="batch")


def kl_div(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
           log_target: bool = False) -> Tensor:
    """Drop-in for torch.nn.functional.kl_div, fused; gradients for input and target.

    Where a class is absent (target 0, or -inf with log_target) its term is 0 whatever input holds, as the
    divergence's limit; torch gives NaN there when input is -inf (docs/differences-from-torch.md).
    """
    if size_average is None and reduce is None and type(log_target) is bool:
        if reduction == "batchmean":
            if type(input) is Tensor and input.dim() > 0 and not _eager.compiling():
                loss = EAGER_BATCHMEAN.call("mean", input, target, float(log_target))
                if loss is not None:
                    return loss
        elif reduction != "mean":  # "mean" warns first, below
            loss = _elementwise.eager(KL_DIV, input, target, reduction, KLDivOptions(log_target=log_target))
            if loss is not None:
                return loss
    if not isinstance(log_target, bool):
        raise TypeError(f"lossops: log_target must be a bool, got {type(log_target).__name__} {log_target!r}")
    batchmean = reduction == "batchmean" and size_average is None and reduce is None
    reduction = "mean" if batchmean else _checks.reduction(reduction, size_average, reduce)
    if reduction == "mean" and not batchmean:
        warnings.warn(_MEAN_WARNING, stacklevel=2)
        loss = _elementwise.eager(KL_DIV, input, target, reduction, KLDivOptions(log_target=log_target))
        if loss is not None:
            return loss
    _checks.floating("input", input)
    _checks.floating("target", target, exception=RuntimeError)
    _checks.same_device(input, target=target)
    shape = _checks.broadcast_shape(input.shape, target.shape)
    x, t = _elementwise.kernel_operands(input, target)
    x, t = x.expand(shape), t.expand(shape)
    denominator = (input.shape[0] if input.dim() > 0 else 1) if batchmean else x.numel()
    options = KLDivOptions(reduction, log_target=log_target)

    def reference():
        return _elementwise.reduce_reference(reference_kl_div(x, t, log_target), reduction, denominator)

    return _elementwise.elementwise_loss(KL_DIV, x, t, options=options, denominator=denominator,
                                         reference=reference)


def reference_kl_div(input: Tensor, target: Tensor, log_target: bool) -> Tensor:
    """Plain PyTorch (the "reference" backend): torch's pointwise term, with an absent class's term 0."""
    if log_target:  # the absent classes' target replaced too, so that no 0 * inf reaches the gradients
        present = target.exp() != 0
        return torch.where(present, F.kl_div(input, torch.where(present, target, 0), reduction="none",
                                             log_target=True), 0)
    return torch.where(target != 0, F.kl_div(input, target, reduction="none"), 0)


def _log_probs_and_probs(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64).log_softmax(1)
    t = torch.rand(6, 5, generator=gen, dtype=torch.float64).softmax(1)
    return [x.to(dtype), t.to(dtype)]


def _selfcheck_inputs(dtype):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(512, 80, generator=gen).log_softmax(1).to(dtype),
            torch.randn(512, 80, generator=gen).softmax(1).to(dtype))


def _probabilities(x: Tensor) -> Tensor:
    return torch.rand_like(x, dtype=torch.float32).softmax(-1).to(x.dtype)


def _torch_kl_div(input, target, **kwargs):
    """What a torch user writes: F.kl_div (the benchmark's eager, and what torch.compile compiles)."""
    return F.kl_div(input, target, **kwargs)


KL_DIV = _elementwise.declare(
    "kl_div", KLDivOptions, KERNEL, lambda _tensors, o: {"log_target": float(o.log_target)},
    extra_eager_routes=(EAGER_BATCHMEAN,), function=kl_div, reference=None, bad_inputs="elementwise",
    torch_fn=F.kl_div,
    cases=(_family.Case(_log_probs_and_probs, dict(reduction="batchmean"), F.kl_div),
           _family.Case(_log_probs_and_probs, dict(reduction="sum"), F.kl_div)),
    selfcheck=(dict(reduction="batchmean"), lambda x, t: F.kl_div(x, t, reduction="batchmean"), _selfcheck_inputs),
    bench=_family.Bench(_torch_kl_div, _probabilities, ((256, 1000), (4096, 1024), (4096, 32000)),
                        kwargs=dict(reduction="batchmean"), columns="classes",
                        grid_shapes=G.TINY + G.MID + G.LLM[:1] + G.ELEMENTWISE_LARGE, grid_quick_shapes=G.TINY,
                        targets=(_family.SpeedTarget((4096, 32000), 3.0),)))
KL_DIV.module = _family.make_module(KL_DIV, "KLDivLoss", doc="Drop-in for torch.nn.KLDivLoss.")
