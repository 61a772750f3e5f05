"""Per-token outputs beside a cross-entropy loss (return_token_stats=True on cross_entropy and
linear_cross_entropy): what LLM trainers log or train on besides the loss, without materialising the softmax.

For token i with kept target y (and the logits the loss's softmax sees: soft-capped, divided by the temperature):
  target_logprob  log p_y                   (differentiable)
  entropy         -sum_j p_j log p_j        (differentiable: an RL entropy bonus trains through it)
  correct         argmax_j x_j == y         (bool; the first index of the largest logit, as torch.argmax)
  logsumexp       log sum_j e^(x_j)         (differentiable)
  z_loss          lse_square_scale * logsumexp**2, the loss's z-loss term on its own (differentiable)
Ignored tokens (target == ignore_index) get 0 in every float output and False in `correct`, and no gradient.
Class weights, label smoothing and token weights shape the loss, not these statistics. They are float32
(float64 for float64 logits) with the target's shape.

One read-only kernel per backend computes all of them per row (csrc/token_stats.cpp token_stats_rows,
triton_kernels/token_stats.py token_stats_kernel); their gradient is one more kernel that writes
grad_j = softcap'(x_j) (p_j (a + b (x_j - lse)) + c [j == y]) from per-row coefficients (below). cross_entropy
runs the statistics kernel as one extra read of the logits; linear_cross_entropy runs it on each chunk of logits
inside its fused pass, before the loss kernel overwrites the chunk.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend, _checks, _family

STATS_KERNEL = _family.Kernel("cross_entropy_token_stats", "token_stats",
                              ("input", "target", "ignore_index", "softcap"))
STATS_GRAD_KERNEL = _family.Kernel("cross_entropy_token_stats_grad", "token_stats",
                                   ("input", "target", "grad", "lse", "coefficients", "ignore_index", "softcap"))


class LossWithTokenStats(NamedTuple):
    """What cross_entropy / linear_cross_entropy return with return_token_stats=True (see this module)."""
    loss: Tensor
    target_logprob: Tensor
    entropy: Tensor
    correct: Tensor
    logsumexp: Tensor
    z_loss: Tensor


def check_request(value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"lossops: return_token_stats must be a bool, got {value!r}")
    return value


def check_targets(target: Tensor) -> None:
    if target.is_floating_point():
        raise ValueError("lossops: return_token_stats=True needs class-index targets (a target log-probability and "
                         f"argmax match are per class index), got a {target.dtype} target of shape "
                         f"{tuple(target.shape)}")


def coefficients(grad_lse: Optional[Tensor], grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor],
                 entropy: Tensor) -> Optional[Tensor]:
    """Per-row [a, b, c] of the statistics' gradient (None when no statistic has one): for
    g_lse lse + g_lp log p_y + g_H H, d/dx_j = p_j (g_lse - g_lp - g_H (x_j - lse + H)) + g_lp [j == y]."""
    if grad_lse is None and grad_logprob is None and grad_entropy is None:
        return None
    zero = torch.zeros_like(entropy)
    g_lse = zero if grad_lse is None else grad_lse.reshape(entropy.shape).to(entropy.dtype)
    g_lp = zero if grad_logprob is None else grad_logprob.reshape(entropy.shape).to(entropy.dtype)
    g_h = zero if grad_entropy is None else grad_entropy.reshape(entropy.shape).to(entropy.dtype)
    return torch.stack((g_lse - g_lp - g_h * entropy, -g_h, g_lp), dim=1).contiguous()


def _gradient_of_statistics(incoming: dict, saved: dict) -> Optional[tuple[Tensor, Tensor]]:
    """(logsumexp, coefficients): what the statistics' gradient kernel reads, None when no statistic has a gradient."""
    coef = coefficients(incoming["logsumexp"], incoming["target_logprob"], incoming["entropy"], saved["entropy"])
    return None if coef is None else (saved["logsumexp"], coef)


def statistics(row_like: Callable[[dict], Tensor]) -> _family.Statistics:
    """The statistics as an op's outputs, one element per row; row_like(tensors): an empty float tensor shaped so."""
    def like(tensors, options):
        row = row_like(tensors)
        return (*(row.new_empty(row.shape) for _ in range(3)), row.new_empty(row.shape, dtype=torch.int64))

    return _family.Statistics(differentiable=("logsumexp", "target_logprob", "entropy"), other=("argmax",),
                              like=like, saved=("logsumexp", "entropy"), gradient=_gradient_of_statistics,
                              gradient_names=("logsumexp", "coefficients"))


@dataclasses.dataclass(frozen=True)
class TokenStatsOptions:
    ignore_index: int = -100
    softcap: Optional[float] = None


def _run(family, backend, t, o, grads):
    stats, argmax = STATS_KERNEL(backend, input=t["input"], target=t["target"], ignore_index=o.ignore_index,
                                 softcap=o.softcap)
    return None, {}, (stats[:, 0].clone(), stats[:, 1].clone(), stats[:, 2].clone(), argmax)


def _recompute(family, backend, t, o, grad_loss, needs, statistics_gradient):
    if not needs["input"] or statistics_gradient is None:
        return {}
    logsumexp, row_coefficients = statistics_gradient
    grad = _backend.empty_gradient(t["input"])  # on CPU: huge pages, the gradient cache (fresh pages cost more)
    STATS_GRAD_KERNEL(backend, input=t["input"], target=t["target"], grad=grad, lse=logsumexp,
                      coefficients=row_coefficients, ignore_index=o.ignore_index, softcap=o.softcap)
    return {"input": grad}


def _rows_like(t):
    input = t["input"]
    return input.new_empty((input.shape[0] * input.shape[2],), dtype=_checks.opmath_dtype(input.dtype))


# The op lossops::token_stats: the statistics of a (outer, C, inner) view of logits, beside a loss computed by
# another op; lossops.cross_entropy calls it through rows_stats.
TOKEN_STATS = _family.register(_family.Family(
    name="token_stats", inputs=(_family.Input("input", recomputed=True), _family.Input("target")),
    options=TokenStatsOptions, kernel=STATS_KERNEL, run=_run, loss_like=None, recompute=_recompute,
    statistics=statistics(_rows_like), public=False))


def rows_stats(input: Tensor, target: Tensor, ignore_index: int, softcap: Optional[float], backend: str):
    """(logsumexp, target_logprob, entropy, argmax) per row of a (outer, C, inner) view, differentiable."""
    return TOKEN_STATS.apply(backend, {"input": input, "target": target}, TokenStatsOptions(ignore_index, softcap), {})


def finish(loss: Tensor, target: Tensor, ignore_index: int, lse_square_scale: float, logsumexp: Tensor,
           target_logprob: Tensor, entropy: Tensor, argmax: Tensor) -> LossWithTokenStats:
    """The result from per-row statistics: the target's shape, `correct` and the z-loss term formed here."""
    shape = target.shape
    logsumexp = logsumexp.reshape(shape)
    correct = (argmax.reshape(shape) == target) & (target != ignore_index)
    return LossWithTokenStats(loss, target_logprob.reshape(shape), entropy.reshape(shape), correct, logsumexp,
                              lse_square_scale * logsumexp * logsumexp)


def reference_rows(logits: Tensor, target: Tensor, ignore_index: int, softcap: Optional[float], class_dim: int):
    """Plain PyTorch, the "reference" backend (it materialises the softmax): the same four per-token tensors."""
    acc = _checks.opmath_dtype(logits.dtype)
    x = logits.to(acc)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    keep = target != ignore_index
    index = torch.where(keep, target, 0).long().unsqueeze(class_dim)
    log_p = x.log_softmax(class_dim)
    lse = x.logsumexp(class_dim)
    p = log_p.exp()
    # -sum p log p with 0 log 0 = 0 (a -inf logit), as the kernels' sum of p (x - lse) would give
    entropy = -(p * torch.where(p > 0, log_p, 0)).sum(class_dim)
    zero = torch.zeros((), dtype=acc, device=x.device)
    argmax = torch.where(keep, x.argmax(class_dim), -1)
    return (torch.where(keep, lse, zero), torch.where(keep, log_p.gather(class_dim, index).squeeze(class_dim), zero),
            torch.where(keep, entropy, zero), argmax)
