"""Multi-class margin loss over class rows for the Triton backend; same contract as csrc/multi_margin.cpp.

One program a row of the (N, C, 1) view: the target's element, then a pass over the row forming the loss's terms
max(0, margin - x[y] + x[i])^p (i != y) and the gradient's sum at the target's class, then, when a gradient buffer is
given, a second pass writing the gradient (scaled by grad_scale; the target's class gets minus the others' sum).
margin and grad_scale travel as a cached device tensor in the accumulation dtype (scalar arguments are fp32). Offsets
are int64; an out-of-range target is never read, and is reported through a flag the host checks without reading it
(triton_kernels/common.py).
"""
import torch
import triton
import triton.language as tl

from . import aot
from .common import acc_dtype, float_options, launch_config, raise_if_flagged, strided
from .cross_entropy import aot_logits


@triton.jit
def _margin_terms(x, cols, y, valid, shift, P: tl.constexpr):
    """A block's terms and their gradients before the row's slope: z = shift + x where z > 0 (a NaN z gives 0),
    nothing at the target's class or past the row."""
    z = shift + x
    keep = (z > 0.0) & valid & (cols != y)
    h = tl.where(keep, z, 0.0)
    term = h
    slope = tl.where(keep, 1.0, 0.0).to(h.dtype)
    if P == 2:
        term = h * h
        slope = 2.0 * h
    return term, slope


@triton.jit
def multi_margin_loss_kernel(X, stride_xr, stride_xc, T, W, G, stride_gr, stride_gc, LOSS, BAD, OPTIONS, C,
                             P: tl.constexpr, HAS_WEIGHT: tl.constexpr, WRITE_GRADIENT: tl.constexpr,
                             ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_xr
    G += row * stride_gr
    target = tl.load(T + row)
    out_of_range = (target < 0) | (target >= C)
    in_range = (target >= 0) & (target < C)
    tl.store(BAD, target, mask=out_of_range)
    y = tl.where(in_range, target, 0)
    margin = tl.load(OPTIONS).to(ACC)
    scale = tl.load(OPTIONS + 1).to(ACC)
    w_y = 1.0
    if HAS_WEIGHT:
        w_y = tl.load(W + y).to(ACC)
    shift = margin - tl.load(X + strided(y, stride_xc)).to(ACC)
    # per-block sums added in order: two running values, not two blocks of them, live across the loop
    total = tl.zeros((), ACC)
    slopes = tl.zeros((), ACC)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < C
        x = tl.load(X + strided(cols, stride_xc), mask=valid, other=0.0).to(ACC)
        term, slope = _margin_terms(x, cols, y, valid, shift, P)
        total += tl.sum(term, axis=0)
        if WRITE_GRADIENT:
            slopes += tl.sum(slope, axis=0)
    # a row with an out-of-range target (reported, never read) gets loss 0 and gradient 0
    loss = tl.where(in_range, w_y * total / C, 0.0)
    tl.store(LOSS + row, loss)
    if WRITE_GRADIENT:
        step = w_y * scale / C
        g_y = -step * slopes
        for start in range(0, C, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            valid = cols < C
            x = tl.load(X + strided(cols, stride_xc), mask=valid, other=0.0).to(ACC)
            _, slope = _margin_terms(x, cols, y, valid, shift, P)
            g = tl.where(cols == y, g_y, step * slope)
            g = tl.where(in_range, g, 0.0)
            tl.store(G + strided(cols, stride_gc), g.to(G.dtype.element_ty), mask=cols < C)


def out_of_range(value, C):
    return RuntimeError(f"multi_margin_loss: target out of range: argument 'target' holds {value}, and the input "
                        f"has {C} classes")


def multi_margin_loss(*, input, target, weight, grad, p, margin, grad_scale, per_element):
    """Same contract as the C++ kernel multi_margin_loss: returns (row_loss, loss_sum) in the accumulation dtype; the
    per-row losses whether or not per_element asks for them (each program stores its own)."""
    rows, C, _ = input.shape
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(rows, dtype=acc, device=input.device)
    if rows == 0:
        return row_loss, row_loss.sum()
    # Out-of-range targets are masked by the kernel, which writes one of them here (never 0, a valid class).
    flag = torch.zeros(1, dtype=torch.int64, device=input.device)
    g = grad if grad is not None else input
    multi_margin_loss_kernel[(rows,)](
        input, input.stride(0), input.stride(1), target, weight if weight is not None else row_loss, g, g.stride(0),
        g.stride(1), row_loss, flag, float_options((float(margin), float(grad_scale)), acc, input.device), C, P=p,
        HAS_WEIGHT=weight is not None, WRITE_GRADIENT=grad is not None, ACC=acc_dtype(input.dtype),
        **launch_config(C, acc=acc, gather=input.stride(1) != 1 or g.stride(1) != 1))
    raise_if_flagged(flag, lambda value: out_of_range(value, C))
    return row_loss, row_loss.sum()


def aot_calls():
    """(host function, arguments) calls covering what the route passes multi_margin_loss_kernel
    (triton_kernels/aot.py): every dtype, p, weight or none, gradient or none, rows far apart and strided classes."""
    calls = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for classes, layout, wide in ((10, "last", False), (32000, "last", True), (1000, "dim1", False)):
            for p in (1, 2):
                for weight, grad in ((False, False), (True, True)):
                    logits3 = aot_logits(dtype, classes, layout, wide)
                    if layout == "dim1":  # classes strided: the rows of a transposed (C, N) tensor
                        logits3 = logits3[0].t().unsqueeze(-1)
                    rows, C, _ = logits3.shape
                    calls.append((multi_margin_loss, dict(
                        input=logits3, target=aot.meta(rows, dtype=torch.int64),
                        weight=aot.meta(C, dtype=acc) if weight else None,
                        grad=torch.empty(logits3.shape, dtype=dtype, device="meta") if grad else None, p=p,
                        margin=1.0, grad_scale=1.0, per_element=False)))
    return calls

