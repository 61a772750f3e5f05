"""Reduction, weighting and ignore-index bookkeeping shared by every loss family.

Kernels return per-row (or per-chunk) losses in the accumulation dtype and, when a gradient is needed,
write it in forward already scaled for the reduction; what remains is done here, identically for all
backends: the mean's denominator, applying the reduction, and applying grad_output in backward.
"""
from __future__ import annotations

import torch

from . import _backend, _checks, _cpp


def class_index_denominator(target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int,
                            num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Sum of the weights of non-ignored targets (their count without weights), as torch's mean divides.

    A tensor, never a Python number: no host sync, and 0 stays 0 so an all-ignored mean is nan like torch.
    Out-of-range targets are clamped here only to keep the gather in bounds; the kernels reject them.
    """
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)  # an integer count: exact in any order
    safe = torch.where(valid, target, 0).clamp_(0, max(num_classes - 1, 0))
    # cumsum adds in index order whatever the thread count (sum does not): bitwise-reproducible means.
    terms = (weight.to(torch.float64)[safe] * valid).reshape(-1)
    if terms.numel() == 0:
        return terms.new_zeros((), dtype=dtype)
    return terms.cumsum(0)[-1].to(dtype)


def gradient_scale(reduction: str, denominator: torch.Tensor) -> torch.Tensor:
    """What the kernels multiply the gradient by in forward: 1/denominator for mean (0 when the denominator
    is 0, see mean()), 1 otherwise."""
    if reduction == "mean":  # 1/0 = inf becomes 0 (denominators are sums of counts or weights)
        return torch.nan_to_num(denominator.reciprocal(), nan=0.0, posinf=0.0, neginf=0.0)
    return torch.ones((), dtype=denominator.dtype, device=denominator.device)


def mean(total: torch.Tensor, denominator) -> torch.Tensor:
    """total / denominator for a mean over kept items, with one rule for a mean over nothing (every target
    ignored, or every kept item's weight 0): the loss is NaN, as torch's, and every gradient through it 0,
    never NaN or inf (torch's cross-entropy agrees when all targets are ignored). No host sync."""
    if not isinstance(denominator, torch.Tensor):
        return total / denominator if denominator != 0 else total * 0 + float("nan")
    empty = denominator == 0
    return torch.where(empty, float("nan"), total / torch.where(empty, 1, denominator))


def reduce(reduction: str, per_item: torch.Tensor, total: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """An op's loss from its kernel's results. No gradient flows through it (the kernels wrote theirs, scaled by
    gradient_scale), so a mean over nothing needs no guard here: 0 / 0 is NaN."""
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return total
    return total / denominator


def _tracing(t: torch.Tensor) -> bool:
    # Under torch.compile, and under AOTAutograd/make_fx without Dynamo (opcheck), where tensors are
    # Fake/Functional subclasses: no data-dependent branches and no in-place tricks there.
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def _is_one(grad_output: torch.Tensor) -> bool:
    # Free on CPU; on CUDA it would sync, so there the multiplication always runs (on the device).
    return (_checks.host_readable(grad_output) and grad_output.numel() == 1
            and not _tracing(grad_output) and grad_output.item() == 1)  # item(): a fifth of a tensor compare


def _graph_kept() -> bool:
    """Inside a backward: whether it keeps the graph (retain_graph=True); True when that cannot be known."""
    try:
        return _cpp.host().graph_kept()
    except ImportError:
        return True


def refuse_double_backward() -> None:
    """For backward functions: with create_graph=True the result would silently have no second derivative."""
    if torch.is_grad_enabled():
        raise RuntimeError("lossops: double backward (create_graph=True through a lossops loss) is not supported")


def apply_grad_output(grad: torch.Tensor, grad_output: torch.Tensor, item_shape=None):
    """grad_input = (gradient written in forward) * grad_output.

    grad_output is a scalar, or one value per item for reduction='none' (item_shape: how it broadcasts
    against the gradient, e.g. (outer, 1, inner) for row losses). A backward that frees the graph scales the
    buffer in place (no second N x C buffer, e.g. for GradScaler's scale) and hands the buffer itself out: the
    node lets go of it, so nothing else reads it. A backward that keeps the graph (retain_graph=True,
    gradcheck) hands out a new tensor, so a hook that modifies its gradient in place cannot change what a
    later backward through the same graph computes.
    """
    if grad_output is None:  # the loss did not reach the result (materialize_grads is off): no gradient
        return None
    refuse_double_backward()
    if item_shape is not None and grad_output.dim() > 0:
        grad_output = grad_output.reshape(item_shape)
    if _tracing(grad_output) or grad_output.dim() > 0 or _graph_kept():
        return grad * grad_output
    if not _is_one(grad_output):
        if _scaled_on_the_device(grad, grad_output):
            _backend.kernel("triton", "common", "scale_gradient")(grad=grad.data, grad_output=grad_output)
        else:
            grad.data.mul_(grad_output)  # .data: no version bump on a buffer nobody else holds
    return grad


def _scaled_on_the_device(grad: torch.Tensor, grad_output: torch.Tensor) -> bool:
    """Whether the Triton route scales this gradient: where grad_output's value cannot be read without a sync, a
    kernel that tests it on the device skips the pass over the gradient when it is 1 (a torch multiply would
    always read and write it)."""
    return (not _checks.host_readable(grad_output) and grad.is_contiguous() and grad_output.numel() == 1
            and _backend.resolve(grad.device) == "triton")
