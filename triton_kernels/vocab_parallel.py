"""Vocabulary-parallel cross-entropy for the Triton backend (lossops.distributed): a rank holds the classes
[class_offset, class_offset + C) of every row. Same interface as the C++ kernels of the same names: the statistics
a rank contributes to the all-reduce, then the gradient of its shard from the combined logsumexp.
"""
import torch
import triton
import triton.language as tl

from . import aot
from .common import strided
from .cross_entropy import AOT_CLASSES, AOT_DTYPES, aot_logits, load_logits, online_logsumexp, softcap_launch


@triton.jit
def shard_stats_kernel(
    X, stride_xr, stride_xc, T, W, STATS, PARAMS, C, class_offset, ignore_index,
    HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_xr
    cap = tl.load(PARAMS).to(ACC)
    y = tl.load(T + row)
    keep = y != ignore_index
    read = tl.where(keep, C, 0)  # columns to read: none for an ignored row
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    dot = tl.zeros((), ACC)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < read
        x = load_logits(X + strided(cols, stride_xc), mask, SOFTCAP, cap, ACC)
        m, s = online_logsumexp(m, s, x)
        x0 = tl.where(mask, x, 0.0)
        if HAS_WEIGHT:
            x0 = x0 * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        dot += tl.sum(x0, axis=0)
    local = y - class_offset
    owned = keep & (local >= 0) & (local < C)
    x_y = load_logits(X + tl.where(owned, local, 0) * stride_xc, owned, SOFTCAP, cap, ACC)
    tl.store(STATS + row * 4 + 0, tl.where(keep, m, 0.0))
    tl.store(STATS + row * 4 + 1, s)
    tl.store(STATS + row * 4 + 2, tl.where(owned, x_y, 0.0))
    tl.store(STATS + row * 4 + 3, dot)


@triton.jit
def shard_grad_kernel(
    X, stride_xr, stride_xc, T, W, G, LSE, COEF, PARAMS, C, class_offset,
    HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_xr
    G += row * C
    cap = tl.load(PARAMS).to(ACC)
    a = tl.load(COEF + row * 3 + 0).to(ACC)
    b = tl.load(COEF + row * 3 + 1).to(ACC)
    d = tl.load(COEF + row * 3 + 2).to(ACC)
    live = (a != 0.0) | (b != 0.0) | (d != 0.0)  # an ignored row: zeros, its logits never read
    read = tl.where(live, C, 0)
    lse = tl.load(LSE + row).to(ACC)
    local = tl.load(T + row) - class_offset
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < read
        x = load_logits(X + strided(cols, stride_xc), mask, SOFTCAP, cap, ACC)
        g = a * tl.exp(x - lse) - tl.where(cols == local, b, 0.0)
        if HAS_WEIGHT:
            g -= d * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
        else:
            g -= d
        if SOFTCAP:
            t = x / cap
            g = g * (1.0 - t * t)
        tl.store(G + cols, tl.where(mask, g, 0.0).to(G.dtype.element_ty), mask=cols < C)


def cross_entropy_shard_stats(*, input, target, weight, class_offset, ignore_index, softcap):
    """Same contract as the C++ kernel: per row [max, sum exp(x - max), owned target logit, sum_j w_j x_j] of
    this shard's (capped) logits, zeros for ignored rows."""
    acc, params, flags = softcap_launch(input, softcap)
    stats = torch.empty((input.shape[0], 4), dtype=acc, device=input.device)
    if input.shape[0]:
        shard_stats_kernel[(input.shape[0],)](
            input, *input.stride(), target, weight if weight is not None else stats, stats, params, input.shape[1],
            class_offset, ignore_index, HAS_WEIGHT=weight is not None, **flags)
    return [stats]


def cross_entropy_shard_grad(*, input, target, weight, grad, lse, coefficients, class_offset, softcap):
    """Writes grad = softcap' * (A exp(x - lse) - B [j = target - class_offset] - D w_j) per row (coefficients
    (N, 3) = A, B, D; a row of three zeros gets zeros)."""
    _, params, flags = softcap_launch(input, softcap, grad)
    if input.shape[0]:
        shard_grad_kernel[(input.shape[0],)](
            input, *input.stride(), target, weight if weight is not None else lse, grad, lse, coefficients, params,
            input.shape[1], class_offset, HAS_WEIGHT=weight is not None, **flags)
    return [grad]



def _aot_shard(dtype, classes, wide, weight, softcap, grad):
    shard = aot_logits(dtype, classes, "last", wide)[:, :, 0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = shard.shape[0]
    common = dict(input=shard, target=aot.meta(rows, dtype=torch.int64),
                  weight=aot.meta(classes, dtype=acc) if weight else None, class_offset=classes, softcap=softcap)
    if not grad:
        return cross_entropy_shard_stats, dict(common, ignore_index=-100)
    return cross_entropy_shard_grad, dict(common, grad=torch.empty(shard.shape, dtype=dtype, device="meta"),
                                          lse=aot.meta(rows, dtype=acc), coefficients=aot.meta(rows, 3, dtype=acc))


def aot_calls():
    """(host function, arguments) calls covering what the route passes these kernels (see triton_kernels/aot.py)."""
    shard = aot.covering({"dtype": AOT_DTYPES, "classes": AOT_CLASSES, "wide": (False, True), "weight": (False, True),
                          "softcap": (None, 30.0), "grad": (False, True)}, lambda case: True,
                         dict(weight=True, softcap=30.0), ("dtype", "grad"))
    return [_aot_shard(**case) for case in shard]
