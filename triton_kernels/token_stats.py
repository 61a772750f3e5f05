"""Per-token statistics for the Triton backend (lossops/losses/token_stats.py): per row the logsumexp, the target's
log-probability, the entropy and the first argmax, read-only, one program per row; and the gradient of any
combination of the first three. Same interface as the C++ kernels of the same names.
"""
import torch
import triton
import triton.language as tl

from . import aot
from .common import expm1, raise_if_flagged, strided
from .cross_entropy import AOT_CLASSES, AOT_DTYPES, aot_logits, load_logits, out_of_bounds, softcap_launch, strides3


# Lower bound of x - max where x may be -inf: e^(x - max) is then 0 (already below -746 in float64) and
# 0 * (x - max), or 0 * (a + b (x - max)), stays 0 instead of NaN.
_LOWEST_SHIFT = tl.constexpr(-1.0e4)


@triton.jit
def token_stats_kernel(
    X, stride_xo, stride_xc, stride_xi, T, STATS, ARGMAX, BAD, PARAMS, inner, C, ignore_index,
    SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """[logsumexp, target log-probability, entropy] and the first argmax of a row; the entropy as
    log s - u / s with u = sum e^(x - m) (x - m) kept relative to the running max m (see csrc EntropyStats)."""
    row = tl.program_id(0).to(tl.int64)
    X += (row // inner) * stride_xo + (row % inner) * stride_xi
    cap = tl.load(PARAMS).to(ACC)
    y = tl.load(T + row)
    in_range = (y >= 0) & (y < C)
    keep = (y != ignore_index) & in_range
    tl.store(BAD, y, mask=(y != ignore_index) & (not in_range))
    read = tl.where(keep, C, 0)
    m = tl.full((), float("-inf"), ACC)
    s = tl.zeros((), ACC)
    u = tl.zeros((), ACC)
    best = tl.zeros((), dtype=tl.int64)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = load_logits(X + strided(cols, stride_xc), cols < read, SOFTCAP, cap, ACC)
        block_max = tl.max(x, axis=0)
        new_m = tl.maximum(m, block_max)
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        d = tl.maximum(x - safe_m, _LOWEST_SHIFT)
        e = tl.exp(d)
        k = tl.maximum(m - safe_m, _LOWEST_SHIFT)
        r = tl.exp(k)
        u = r * (u + k * s) + tl.sum(e * d, axis=0)
        s = r * s + tl.sum(e, axis=0)
        first = tl.min(tl.where(x == block_max, cols, C), axis=0).to(tl.int64)
        best = tl.where(block_max > m, first, best)
        m = new_m
    log_sum = tl.log(s)
    x_y = load_logits(X + tl.where(keep, y, 0) * stride_xc, keep, SOFTCAP, cap, ACC)
    tl.store(STATS + row * 3 + 0, tl.where(keep, m + log_sum, 0.0))
    tl.store(STATS + row * 3 + 1, tl.where(keep, (x_y - m) - log_sum, 0.0))
    tl.store(STATS + row * 3 + 2, tl.where(keep, log_sum - u / s, 0.0))
    tl.store(ARGMAX + row, tl.where(keep, best, -1))


@triton.jit
def token_stats_grad_kernel(
    X, stride_xo, stride_xc, stride_xi, T, G, stride_go, stride_gc, stride_gi, LSE, COEF, PARAMS, inner, C,
    ignore_index, SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """grad_j = softcap'(x_j) (p_j (a + b (x_j - lse)) + c [j == y]), the target's entry formed without the
    cancellation of p_y a + c as p_y -> 1 (see csrc token_stats_grad_rows)."""
    row = tl.program_id(0).to(tl.int64)
    X += (row // inner) * stride_xo + (row % inner) * stride_xi
    G += (row // inner) * stride_go + (row % inner) * stride_gi
    cap = tl.load(PARAMS).to(ACC)
    a = tl.load(COEF + row * 3 + 0).to(ACC)
    b = tl.load(COEF + row * 3 + 1).to(ACC)
    c = tl.load(COEF + row * 3 + 2).to(ACC)
    y = tl.load(T + row)
    live = (y != ignore_index) & (y >= 0) & (y < C) & ((a != 0.0) | (b != 0.0) | (c != 0.0))
    read = tl.where(live, C, 0)
    lse = tl.load(LSE + row).to(ACC)
    x_y = load_logits(X + tl.where(live, y, 0) * stride_xc, live, SOFTCAP, cap, ACC)
    d_y = tl.maximum(x_y - lse, _LOWEST_SHIFT)
    g_y = tl.exp(d_y) * (a + c + b * d_y) - c * expm1(d_y)
    if SOFTCAP:
        t_y = x_y / cap
        g_y = g_y * (1.0 - t_y * t_y)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < read
        x = load_logits(X + strided(cols, stride_xc), mask, SOFTCAP, cap, ACC)
        d = tl.maximum(x - lse, _LOWEST_SHIFT)
        g = tl.exp(d) * (a + b * d)
        if SOFTCAP:
            t = x / cap
            g = g * (1.0 - t * t)
        g = tl.where(cols == y, g_y, g)
        tl.store(G + strided(cols, stride_gc), tl.where(mask, g, 0.0).to(G.dtype.element_ty), mask=cols < C)


def cross_entropy_token_stats(*, input, target, ignore_index, softcap):
    """Same contract as the C++ kernel: (stats (rows, 3) [lse, target log-probability, entropy], argmax (rows,)),
    zeros and argmax -1 for ignored rows; an out-of-range target raises IndexError."""
    outer, C, inner = input.shape
    rows = outer * inner
    acc, params, flags = softcap_launch(input, softcap)
    stats = torch.empty((rows, 3), dtype=acc, device=input.device)
    argmax = torch.empty(rows, dtype=torch.int64, device=input.device)
    if rows:
        flag = torch.zeros(1, dtype=torch.int64, device=input.device)
        token_stats_kernel[(rows,)](input, *strides3(input), target, stats, argmax, flag, params, inner, C,
                                    ignore_index, **flags)
        raise_if_flagged(flag, lambda value: out_of_bounds(value, C, ignore_index))
    return [stats, argmax]


def cross_entropy_token_stats_grad(*, input, target, grad, lse, coefficients, ignore_index, softcap):
    """Writes grad (input's shape, not aliasing it) from per-row [a, b, c] coefficients; see the C++ kernel."""
    outer, C, inner = input.shape
    _, params, flags = softcap_launch(input, softcap, grad)
    if outer * inner and C:
        token_stats_grad_kernel[(outer * inner,)](input, *strides3(input), target, grad, *strides3(grad), lse,
                                                  coefficients, params, inner, C, ignore_index, **flags)
    return []



def _aot_token_stats(dtype, classes, layout, wide, softcap, grad):
    logits3 = aot_logits(dtype, classes, layout, wide)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    outer, C, inner = logits3.shape
    target = aot.meta(outer * inner, dtype=torch.int64)
    if not grad:
        return cross_entropy_token_stats, dict(input=logits3, target=target, ignore_index=-100, softcap=softcap)
    return cross_entropy_token_stats_grad, dict(
        input=logits3, target=target, grad=torch.empty(logits3.shape, dtype=dtype, device="meta"),
        lse=aot.meta(outer * inner, dtype=acc), coefficients=aot.meta(outer * inner, 3, dtype=acc), ignore_index=-100,
        softcap=softcap)


def aot_calls():
    """(host function, arguments) calls covering what the route passes these kernels (see triton_kernels/aot.py)."""
    shape = dict(dtype=AOT_DTYPES, classes=AOT_CLASSES, layout=("last", "dim1", "transposed"), wide=(False, True))
    stats = aot.covering({**shape, "softcap": (None, 30.0), "grad": (False, True)}, lambda case: True,
                         dict(softcap=30.0), ("dtype", "grad"))
    return [_aot_token_stats(**case) for case in stats]
