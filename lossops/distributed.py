"""Vocabulary-parallel cross-entropy over a torch.distributed process group.

With tensor parallelism the output projection (the "LM head", weight V x D) is split by rows over the ranks
of a tensor-parallel group: rank r holds the contiguous classes [start_r, start_r + V_r), shards ordered by
rank (sizes may differ; they are all-gathered). Each rank computes only its logits shard (N x V_r) and no
rank ever gathers the N x V logits: the loss needs three all-reduces over N numbers each (row max, then
sum-exp, target logit and, with label smoothing, the row sum, in one call), and the gradient of each shard
is local.

    import torch.distributed as dist
    from lossops.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

    tp_group = dist.new_group(ranks=[...])        # the ranks that share one copy of the batch
    # Either: logits from your own column-parallel head (class dimension last), target replicated.
    loss = vocab_parallel_cross_entropy(local_logits, target, group=tp_group)
    # Or: the head's weight shard, with hidden replicated over the group.
    local_weight = head.weight[start:start + V_local]  # a Parameter in practice, owned by this rank
    loss = vocab_parallel_linear_cross_entropy(hidden, local_weight, target, group=tp_group)
    loss.backward()   # every rank gets the same loss; the weight shard gets its own gradient

Every rank must pass the same target (and hidden for the linear variant) and call in the same order, as for
any collective. vocab_parallel_linear_cross_entropy all-reduces hidden's gradient over the group, so
hidden.grad is the full gradient on every rank, like Megatron-LM's "copy to tensor-parallel region"; pass
reduce_hidden_grad=False when your column-parallel layer already does that reduction. With NCCL the tensors
live on each rank's GPU; the code is the same (gloo serves CPU tensors).

This module builds on the helpers and kernel declarations only: the loss families call it for DTensor inputs
sharded on the classes (lossops.cross_entropy's logits, lossops.linear_cross_entropy's weight).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, _kernels, _reduce


def vocab_parallel_cross_entropy(local_logits: Tensor, target: Tensor, group=None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                                 weight: Optional[Tensor] = None, lse_square_scale: float = 0.0,
                                 softcap: Optional[float] = None) -> Tensor:
    """cross_entropy over the classes of all ranks, each rank holding local_logits (..., V_local).

    The class dimension is the last one (Megatron's layout); target has shape local_logits.shape[:-1] and
    holds global class indices, identical on every rank. weight: the class weights of all V classes
    (replicated, as torch's cross_entropy takes them); lse_square_scale and softcap as lossops.cross_entropy.
    Returns the same loss on every rank; backward gives the gradient of this rank's shard only.
    """
    reduction = _checks.reduction(reduction)
    label_smoothing = _checks.in_range("label_smoothing", label_smoothing, 0.0, 1.0, exception=RuntimeError)
    lse_square_scale = _checks.in_range("lse_square_scale", lse_square_scale, 0.0)
    softcap = _checks.positive_or_none("softcap", softcap)
    ignore_index = _checks.integer("ignore_index", ignore_index)
    _checks.floating("local_logits", local_logits)
    _checks.tensor("target", target)
    _checks.same_device(local_logits, target=target)
    if local_logits.dim() < 1:
        raise ValueError("lossops: local_logits must have at least one dimension (classes), got a 0-d tensor")
    _checks.last_dim_target(target, "local_logits", local_logits)
    start, vocab = _shard_range(local_logits.shape[-1], local_logits.device, group)
    if weight is not None:
        _checks.class_weight(weight, vocab, local_logits)
        _checks.same_dtype(local_logits, weight=weight)
    options = _ShardOptions(start, vocab, ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    loss = _VocabParallelCrossEntropy.apply(local_logits, target, weight, group, options)
    return loss.to(_checks.output_dtype(local_logits))


def vocab_parallel_linear_cross_entropy(hidden: Tensor, local_weight: Tensor, target: Tensor, group=None,
                                        local_bias: Optional[Tensor] = None, ignore_index: int = -100,
                                        reduction: str = "mean", label_smoothing: float = 0.0, *,
                                        reduce_hidden_grad: bool = True, weight: Optional[Tensor] = None,
                                        lse_square_scale: float = 0.0, softcap: Optional[float] = None) -> Tensor:
    """vocab_parallel_cross_entropy(hidden @ local_weight.T + local_bias, target, ...).

    hidden (..., D) is replicated over the group; local_weight (V_local, D) and local_bias (V_local,) are
    this rank's rows of the full weight and bias; weight (V,): the class weights, as torch's
    linear_cross_entropy names them. This rank's logits shard (N x V_local) is materialised.
    """
    _checks.floating("hidden", hidden)
    _checks.floating("local_weight", local_weight)
    if local_weight.dim() != 2 or local_weight.shape[1] != hidden.shape[-1]:
        raise RuntimeError(f"lossops: local_weight must have shape (V_local, {hidden.shape[-1]}) to match hidden of "
                           f"shape {tuple(hidden.shape)}, got {tuple(local_weight.shape)}")
    if reduce_hidden_grad:
        hidden = _SumGradOverGroup.apply(hidden, group)
    return vocab_parallel_cross_entropy(F.linear(hidden, local_weight, local_bias), target, group, ignore_index,
                                        reduction, label_smoothing, weight=weight,
                                        lse_square_scale=lse_square_scale, softcap=softcap)


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("lossops: vocab-parallel losses need an initialized torch.distributed process group "
                           "(dist.init_process_group); for logits on one device use lossops.cross_entropy")


def _shard_range(local_vocab: int, device: torch.device, group) -> tuple[int, int]:
    """(first global class of this rank's shard, total classes), from every rank's shard size."""
    _require_initialized()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([local_vocab], dtype=torch.int64, device=device), group=group)
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def _check_target_range(target: Tensor, valid: Tensor, vocab: int, ignore_index: int) -> None:
    bad = valid & ((target < 0) | (target >= vocab))
    if target.device.type != "cpu":  # no host sync on accelerators: the check fails asynchronously
        torch._assert_async(~bad.any(), "lossops: vocab_parallel_cross_entropy got a target out of bounds")
    elif bool(bad.any()):
        raise IndexError(f"lossops: target {int(target[bad][0])} is out of bounds (number of classes over all "
                         f"ranks is {vocab}, ignore_index is {ignore_index})")


@dataclasses.dataclass(frozen=True)
class _ShardOptions:
    class_offset: int  # this rank's first class
    vocab: int  # classes over all ranks
    ignore_index: int
    reduction: str
    label_smoothing: float
    lse_square_scale: float
    softcap: Optional[float]


def _stats_reference(*, input, target, weight, class_offset, ignore_index, softcap):
    """Plain PyTorch twin of the shard-statistics kernel (the "reference" backend)."""
    x = input.to(_checks.opmath_dtype(input.dtype))
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    keep = target != ignore_index
    m = x.amax(-1) if x.shape[-1] else x.new_full(target.shape, float("-inf"))
    shift = torch.where(torch.isfinite(m), m, 0)
    local = target - class_offset
    owned = keep & (local >= 0) & (local < x.shape[-1])
    x_y = x.gather(1, torch.where(owned, local, 0)[:, None]).squeeze(1) if x.shape[-1] else m.new_zeros(m.shape)
    stats = torch.stack([m, (x - shift[:, None]).exp().sum(-1), torch.where(owned, x_y, 0),
                         (x * weight).sum(-1) if weight is not None else x.sum(-1)], 1)
    return [torch.where(keep[:, None], stats, 0)]


def _grad_reference(*, input, target, weight, grad, lse, coefficients, class_offset, softcap):
    """Plain PyTorch twin of the shard-gradient kernel."""
    x = input.to(lse.dtype)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    a, b, d = coefficients.unbind(1)
    g = a[:, None] * (x - lse[:, None]).exp() - d[:, None] * (weight if weight is not None else 1)
    local = target - class_offset
    owned = (local >= 0) & (local < x.shape[-1])
    if x.shape[-1]:
        g.scatter_add_(1, torch.where(owned, local, 0)[:, None], torch.where(owned, -b, 0)[:, None])
    if softcap is not None:
        g = g * (1 - (x / softcap) ** 2)
    live = (coefficients != 0).any(1)
    grad.copy_(torch.where(live[:, None], g, 0))
    return [grad]


SHARD_STATS = _kernels.Kernel("cross_entropy_shard_stats", "vocab_parallel",
                              ("input", "target", "weight", "class_offset", "ignore_index", "softcap"))
SHARD_GRAD = _kernels.Kernel("cross_entropy_shard_grad", "vocab_parallel",
                             ("input", "target", "weight", "grad", "lse", "coefficients", "class_offset", "softcap"))
_REFERENCE_TWINS = {SHARD_STATS.name: _stats_reference, SHARD_GRAD.name: _grad_reference}


def _shard_kernel(backend: str, name: str):
    if backend == "reference":
        return _REFERENCE_TWINS[name]
    return functools.partial(_kernels.KERNELS[name], backend)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """The fused shard kernels (csrc/vocab_parallel.cpp, triton_kernels/vocab_parallel.py): forward reduces each
    row's (max, sum-exp, target logit, weighted logit sum) over the group; backward recomputes the shard's
    softmax from the saved global logsumexp, as flash-attn's and quack's cross-entropy do."""

    @staticmethod
    def forward(ctx, local_logits, target, weight, group, o: _ShardOptions):
        acc = _checks.opmath_dtype(local_logits.dtype)
        x = local_logits.reshape(-1, local_logits.shape[-1])
        t = target.reshape(-1).to(torch.int64)
        valid = t != o.ignore_index
        _check_target_range(t, valid, o.vocab, o.ignore_index)
        backend = _backend.resolve(x.device)
        local_weight = None
        if weight is not None:
            local_weight = weight[o.class_offset:o.class_offset + x.shape[-1]].to(acc).contiguous()
        (stats,) = _shard_kernel(backend, "cross_entropy_shard_stats")(
            input=x, target=t, weight=local_weight, class_offset=o.class_offset, ignore_index=o.ignore_index,
            softcap=o.softcap)

        row_max = stats[:, 0].clone()
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        # A row of -inf logits everywhere: shift by 0 so exp() gives 0, not nan, and lse is -inf like torch.
        row_max = torch.where(torch.isfinite(row_max), row_max, 0)
        sums = torch.stack([stats[:, 1] * (stats[:, 0] - row_max).exp(), stats[:, 2], stats[:, 3]])
        dist.all_reduce(sums, group=group)
        lse = torch.where(valid, row_max + sums[0].log(), 0)  # ignored rows hold no statistics

        safe_t = torch.where(valid, t, 0)
        w_t = weight.to(acc)[safe_t] if weight is not None else torch.ones_like(lse)
        w_t = torch.where(valid, w_t, 0)
        weight_sum = weight.to(acc).sum() if weight is not None else o.vocab
        eps = o.label_smoothing
        # torch's smoothing term: eps / V * sum_j w_j (lse - x_j).
        ce = (1 - eps) * w_t * (lse - sums[1]) + eps / o.vocab * (weight_sum * lse - sums[2])
        ce = torch.where(valid, ce, 0)
        z = torch.where(valid, o.lse_square_scale * lse * lse, 0) if o.lse_square_scale else None
        ce_denominator = w_t.sum() if weight is not None else valid.sum(dtype=acc)
        z_denominator = valid.sum(dtype=acc)
        if o.reduction == "none":
            loss = (ce if z is None else ce + z).reshape(target.shape)
        elif o.reduction == "sum":
            loss = ce.sum() if z is None else ce.sum() + z.sum()
        else:  # the z-loss is averaged over the non-ignored rows, not weighted (as lossops.cross_entropy)
            loss = _reduce.mean(ce.sum(), ce_denominator)
            if z is not None:
                loss = loss + _reduce.mean(z.sum(), z_denominator)

        ctx.save_for_backward(local_logits, t, local_weight, lse, w_t, ce_denominator, z_denominator)
        ctx.options, ctx.backend, ctx.weight_sum = o, backend, weight_sum
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        local_logits, t, local_weight, lse, w_t, ce_denominator, z_denominator = ctx.saved_tensors
        o = ctx.options
        valid = t != o.ignore_index
        g = grad_loss.reshape(-1).to(lse.dtype) if o.reduction == "none" else grad_loss.to(lse.dtype).expand(lse.shape)
        g_ce, g_z = ((g * _reduce.gradient_scale("mean", ce_denominator),
                      g * _reduce.gradient_scale("mean", z_denominator))
                     if o.reduction == "mean" else (g, g))
        eps = o.label_smoothing
        g_ce = torch.where(valid, g_ce, 0)
        coefficients = torch.stack([
            g_ce * ((1 - eps) * w_t + eps * ctx.weight_sum / o.vocab)
            + torch.where(valid, g_z, 0) * 2 * o.lse_square_scale * lse,
            g_ce * (1 - eps) * w_t,
            g_ce * (eps / o.vocab)], 1).contiguous()
        x = local_logits.reshape(-1, local_logits.shape[-1])
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _shard_kernel(ctx.backend, "cross_entropy_shard_grad")(
            input=x, target=t, weight=local_weight, grad=grad, lse=lse, coefficients=coefficients,
            class_offset=o.class_offset, softcap=o.softcap)
        return grad.reshape(local_logits.shape), None, None, None, None


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (each rank holds a partial one)."""

    @staticmethod
    def forward(ctx, input, group):
        ctx.group = group
        return input.view_as(input)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
