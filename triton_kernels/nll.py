"""Negative log-likelihood over class rows for the Triton backend; same contract as csrc/nll.cpp.

One program a row of the (outer, C, inner) view: it reads the target's element only (loss -w[y] x[y], 0 for
ignore_index) and, when a gradient buffer is given, writes the whole gradient row: -w[y] * grad_scale at the target's
class, 0 elsewhere. Offsets are int64; an out-of-range target is never read, and is reported through a flag the host
checks without reading it (triton_kernels/common.py).
"""
import torch
import triton
import triton.language as tl

from . import aot
from .common import acc_dtype, launch_config, raise_if_flagged, strided
from .cross_entropy import _class_target, _empty_rows, _row_pointers, aot_logits, out_of_bounds, strides3


@triton.jit
def nll_loss_kernel(X, stride_xo, stride_xc, stride_xi, T, W, G, stride_go, stride_gc, stride_gi, LOSS, BAD, SCALE,
                    inner, C, ignore_index, HAS_WEIGHT: tl.constexpr, WRITE_GRADIENT: tl.constexpr,
                    ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X, G, _, _ = _row_pointers(X, stride_xo, stride_xi, G, stride_go, stride_gi, row, inner)
    y, valid, out_of_range = _class_target(T, row, True, C, ignore_index)
    tl.store(BAD, tl.load(T + row), mask=out_of_range)
    w_y = 1.0
    if HAS_WEIGHT:
        w_y = tl.load(W + y, mask=valid, other=0.0).to(ACC)
    x_y = tl.load(X + strided(y, stride_xc), mask=valid, other=0.0).to(ACC)
    tl.store(LOSS + row, tl.where(valid, -w_y * x_y, 0.0))
    if WRITE_GRADIENT:
        g_y = tl.where(valid, -w_y * tl.load(SCALE).to(ACC), 0.0)
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            g = tl.where(cols == y, g_y, 0.0)
            tl.store(G + strided(cols, stride_gc), g.to(G.dtype.element_ty), mask=cols < C)


def nll_loss(*, input, target, weight, grad, ignore_index, grad_scale, per_element):
    """Same contract as the C++ kernel nll_loss: returns (row_loss, loss_sum) in the accumulation dtype; the per-row
    losses whether or not per_element asks for them (each program stores its own)."""
    outer, C, inner = input.shape
    rows = outer * inner
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    row_loss = torch.zeros(rows, dtype=acc, device=input.device)
    if _empty_rows(input, target, ignore_index):
        if grad is not None:
            grad.zero_()
        return row_loss, row_loss.sum()
    flag = torch.zeros(1, dtype=torch.int64, device=input.device)
    g = grad if grad is not None else input
    nll_loss_kernel[(rows,)](
        input, *strides3(input), target, weight if weight is not None else row_loss, g, *strides3(g), row_loss, flag,
        grad_scale.to(input.device), inner, C, ignore_index, HAS_WEIGHT=weight is not None,
        WRITE_GRADIENT=grad is not None, ACC=acc_dtype(input.dtype),
        **launch_config(C, acc=acc, gather=g.stride(1) != 1))
    raise_if_flagged(flag, lambda value: out_of_bounds(value, C, ignore_index))
    return row_loss, row_loss.sum()


def aot_calls():
    """(host function, arguments) calls covering what the route passes nll_loss_kernel (triton_kernels/aot.py)."""
    factors = dict(dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64), classes=(10, 32000, 128256),
                   layout=("last", "dim1", "transposed"), wide=(False, True), weight=(False, True), grad=(False, True))
    calls = []
    for case in aot.covering(factors, lambda case: True, dict(weight=True, grad=True), ("dtype", "layout")):
        dtype, classes, layout, wide, weight, grad = case.values()
        logits3 = aot_logits(dtype, classes, layout, wide)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        outer, C, inner = logits3.shape
        calls.append((nll_loss, dict(
            input=logits3, target=aot.meta(outer * inner, dtype=torch.int64),
            weight=aot.meta(C, dtype=acc) if weight else None,
            grad=torch.empty(logits3.shape, dtype=dtype, device="meta") if grad else None, ignore_index=-100,
            grad_scale=aot.meta(dtype=acc), per_element=False)))
    return calls
