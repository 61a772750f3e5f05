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
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import _checks, _reduce
from .linear_cross_entropy import check_last_dim_target


def vocab_parallel_cross_entropy(local_logits: Tensor, target: Tensor, group=None, ignore_index: int = -100,
                                 reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """cross_entropy over the classes of all ranks, each rank holding local_logits (..., V_local).

    The class dimension is the last one (Megatron's layout); target has shape local_logits.shape[:-1] and
    holds global class indices, identical on every rank. Returns the same loss on every rank; backward
    gives the gradient of this rank's shard only.
    """
    reduction = _checks.reduction(reduction)
    label_smoothing = _checks.in_range("label_smoothing", label_smoothing, 0.0, 1.0, exception=RuntimeError)
    _checks.floating("local_logits", local_logits)
    _checks.tensor("target", target)
    _checks.same_device(local_logits, target=target)
    if local_logits.dim() < 1:
        raise ValueError("lossops: local_logits must have at least one dimension (classes), got a 0-d tensor")
    check_last_dim_target(target, "local_logits", local_logits)
    start, vocab = _shard_range(local_logits.shape[-1], local_logits.device, group)
    loss = _VocabParallelCrossEntropy.apply(local_logits, target, start, vocab, group, ignore_index, reduction,
                                            label_smoothing)
    return loss.to(_checks.output_dtype(local_logits))


def vocab_parallel_linear_cross_entropy(hidden: Tensor, local_weight: Tensor, target: Tensor, group=None,
                                        local_bias: Optional[Tensor] = None, ignore_index: int = -100,
                                        reduction: str = "mean", label_smoothing: float = 0.0, *,
                                        reduce_hidden_grad: bool = True) -> Tensor:
    """vocab_parallel_cross_entropy(hidden @ local_weight.T + local_bias, target, ...).

    hidden (..., D) is replicated over the group; local_weight (V_local, D) and local_bias (V_local,) are
    this rank's rows of the full weight and bias. This rank's logits shard (N x V_local) is materialised.
    """
    _checks.floating("hidden", hidden)
    _checks.floating("local_weight", local_weight)
    if local_weight.dim() != 2 or local_weight.shape[1] != hidden.shape[-1]:
        raise RuntimeError(f"lossops: local_weight must have shape (V_local, {hidden.shape[-1]}) to match hidden of "
                           f"shape {tuple(hidden.shape)}, got {tuple(local_weight.shape)}")
    if reduce_hidden_grad:
        hidden = _SumGradOverGroup.apply(hidden, group)
    return vocab_parallel_cross_entropy(F.linear(hidden, local_weight, local_bias), target, group, ignore_index,
                                        reduction, label_smoothing)


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


class _VocabParallelCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, local_logits, target, start, vocab, group, ignore_index, reduction, label_smoothing):
        acc = _checks.opmath_dtype(local_logits.dtype)
        x = local_logits.reshape(-1, local_logits.shape[-1]).to(acc)
        t = target.reshape(-1).to(torch.int64)
        valid = t != ignore_index
        _check_target_range(t, valid, vocab, ignore_index)

        row_max = x.amax(-1) if x.shape[-1] else x.new_full(t.shape, float("-inf"))
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        # A row of -inf logits everywhere: shift by 0 so exp() gives 0, not nan, and lse is -inf like torch.
        row_max = torch.where(torch.isfinite(row_max), row_max, 0)
        owned = valid & (t >= start) & (t < start + x.shape[-1])
        local_index = torch.where(owned, t - start, 0)
        target_logit = torch.where(owned, x.gather(1, local_index[:, None]).squeeze(1) if x.shape[-1] else 0, 0)
        stats = [(x - row_max[:, None]).exp().sum(-1), target_logit]
        if label_smoothing > 0:
            stats.append(x.sum(-1))
        stats = torch.stack(stats)
        dist.all_reduce(stats, group=group)

        lse = row_max + stats[0].log()
        loss = (1 - label_smoothing) * (lse - stats[1])
        if label_smoothing > 0:
            # torch's smoothing term: eps * mean over classes of -log_softmax = eps * (lse - mean logit).
            loss = loss + label_smoothing * (lse - stats[2] / vocab)
        loss = torch.where(valid, loss, 0)
        denominator = valid.sum(dtype=acc)

        ctx.save_for_backward(local_logits, lse, local_index, owned, valid, denominator)
        ctx.options = (reduction, label_smoothing, vocab)
        loss = _reduce.reduce(reduction, loss, loss.sum(), denominator)
        return loss.reshape(target.shape) if reduction == "none" else loss

    @staticmethod
    def backward(ctx, grad_loss):
        local_logits, lse, local_index, owned, valid, denominator = ctx.saved_tensors
        reduction, label_smoothing, vocab = ctx.options
        acc = lse.dtype
        x = local_logits.reshape(-1, local_logits.shape[-1]).to(acc)
        grad = (x - lse[:, None]).exp_()
        if label_smoothing > 0:
            grad -= label_smoothing / vocab
        # In the accumulation dtype: torch.where(owned, 1 - label_smoothing, 0) would round it to float32.
        onehot = owned.to(acc) * (1 - label_smoothing)
        if grad.shape[-1]:
            grad.scatter_add_(1, local_index[:, None], -onehot[:, None])
        row_scale = grad_loss.reshape(-1).to(acc) if reduction == "none" else grad_loss.to(acc).expand(lse.shape)
        if reduction == "mean":
            row_scale = row_scale / denominator
        grad *= torch.where(valid, row_scale, 0)[:, None]
        return (grad.to(local_logits.dtype).reshape(local_logits.shape),) + (None,) * 7


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
