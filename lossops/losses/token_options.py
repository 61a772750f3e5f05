"""What LLM trainers add to a cross-entropy call, shared by cross_entropy and linear_cross_entropy:
temperature, per-token loss weights, and Hugging Face's gradient-accumulation normaliser.

They compose on the fused op rather than adding kernel parameters: temperature scales the logits (or, for the
linear variant, the much smaller hidden states and bias) before the op, and token weights multiply the op's
per-token losses, whose gradient the op already wrote in forward (class weights with z-loss under
"mean" take two fused passes: the two terms have their own denominators). The rules, for a kept (non-ignored) token i
with token weight t_i, class weight w_i = weight[target_i] (1 without weight), cross-entropy term ce_i and
z-loss term z_i = lse_square_scale * lse_i**2:
  reduction="none": t_i * (w_i * ce_i + z_i)   (0 for ignored tokens)
  reduction="sum":  sum_i t_i * (w_i * ce_i + z_i)
  reduction="mean": sum_i t_i w_i ce_i / sum_i t_i w_i  +  sum_i t_i z_i / sum_i t_i   (z-loss is never
                    class-weighted, as without token weights; probability targets divide by sum_i t_i)
  num_items_in_batch=n (reduction="mean" only): the "sum" value / n, the normaliser Hugging Face passes.
Label smoothing belongs to ce_i. With every t_i = 1 each rule is the plain call's.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import _checks, _reduce


# The keywords and their defaults, with the per-token outputs' (lossops/losses/token_stats.py): the DTensor paths
# serve them on replicated inputs only.
DEFAULTS = {"temperature": 1.0, "token_weight": None, "num_items_in_batch": None, "return_token_stats": False}


def temperature(value) -> float:
    value = _checks.real("temperature", value)
    if not (value > 0 and value < math.inf):  # comparisons only: a SymFloat under dynamic shapes has no isfinite
        raise ValueError(f"lossops: temperature must be a positive finite number, got {value}")
    return value


def scaled_softcap(softcap, temperature: float):
    """softcap(x) / T == softcap_{c / T}(x / T): the temperature applies after the cap, as to a model's output."""
    softcap = _checks.positive_or_none("softcap", softcap)
    return None if softcap is None else softcap / temperature


def requested(temperature_value, token_weight, num_items_in_batch) -> bool:
    return token_weight is not None or num_items_in_batch is not None or temperature_value != 1.0


def reduce_tokens(per_token: Callable[[Optional[Tensor], str, float], Tensor], target: Tensor, item_shape, weight,
                  ignore_index: int, reduction: str, lse_square_scale: float, token_weight: Optional[Tensor],
                  num_items_in_batch, probabilities: bool) -> Tensor:
    """The loss under the module docstring's rules; per_token(weight, reduction, lse_square_scale) runs the fused op."""
    if num_items_in_batch is not None:
        _check_num_items(num_items_in_batch, reduction, target)
    if token_weight is None:
        if num_items_in_batch is None:
            return per_token(weight, reduction, lse_square_scale)
        loss = per_token(weight, "sum", lse_square_scale)
        return (loss / num_items_in_batch).to(loss.dtype)
    _check_token_weight(token_weight, item_shape, target)
    if reduction == "none":
        loss = per_token(weight, "none", lse_square_scale)
        return (loss * token_weight).to(loss.dtype)
    acc = torch.float64 if token_weight.dtype == torch.float64 else torch.float32
    tw = token_weight.to(acc)
    if probabilities:
        keep_weight, denominator = tw, tw.sum()
    else:
        keep = target != ignore_index
        keep_weight = torch.where(keep, tw, 0)
        denominator = keep_weight.sum()
        if weight is not None:
            index = torch.where(keep, target.long(), 0).clamp(0, weight.shape[0] - 1)
            weighted = (keep_weight * weight.to(acc)[index]).sum()
            if lse_square_scale > 0 and reduction == "mean" and num_items_in_batch is None:
                # two means with their own denominators: the class-weighted cross-entropy and the z-loss
                cross_entropy_part = per_token(weight, "none", 0.0)
                both = per_token(weight, "none", lse_square_scale)
                ce = _reduce.mean((cross_entropy_part.to(acc) * keep_weight).sum(), weighted)
                z = _reduce.mean(((both.to(acc) - cross_entropy_part.to(acc)) * keep_weight).sum(), denominator)
                return (ce + z).to(both.dtype)
            denominator = weighted
    loss = per_token(weight, "none", lse_square_scale)
    total = (loss.to(acc) * keep_weight).sum()
    if reduction == "sum":
        return total.to(loss.dtype)
    if num_items_in_batch is not None:
        return (total / num_items_in_batch).to(loss.dtype)
    return _reduce.mean(total, denominator).to(loss.dtype)


def _check_num_items(value, reduction: str, target: Tensor) -> None:
    if reduction != "mean":
        raise ValueError(f"lossops: num_items_in_batch replaces the mean's denominator and needs reduction='mean', "
                         f"got reduction={reduction!r}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"lossops: num_items_in_batch must be a number or a one-element tensor, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        _checks.same_device(target, num_items_in_batch=value)
        return
    _checks.real("num_items_in_batch", value)
    if isinstance(value, bool) or not value > 0:
        raise ValueError(f"lossops: num_items_in_batch must be > 0, got {value!r}")


def _check_token_weight(token_weight, item_shape, target: Tensor) -> None:
    _checks.tensor("token_weight", token_weight)
    if not token_weight.is_floating_point():
        raise TypeError(f"lossops: token_weight must be a floating-point tensor, got dtype {token_weight.dtype}")
    if tuple(token_weight.shape) != tuple(item_shape):
        raise ValueError(f"lossops: token_weight must have one weight per token, shape {tuple(item_shape)}, got "
                         f"{tuple(token_weight.shape)}")
    _checks.same_device(target, token_weight=token_weight)
