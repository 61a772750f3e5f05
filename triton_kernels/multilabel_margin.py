"""Multi-label margin loss over rows for the Triton backend; same contract as csrc/multilabel_margin.cpp.

One program a row of the (N, C) input. The target row lists the row's classes up to its first -1: the program finds
that length, checks every value lies in [-1, C) (reported through a flag the host checks without reading it,
triton_kernels/common.py), and marks the listed classes in an int8 scratch row (torch's forward keeps the same
`is_target` tensor). Then, a block of classes at a time, each listed class's terms max(0, 1 - x[y] + x[i]) over the
unlisted classes i: their sum is the loss, and each class's count of passing terms its gradient (scaled by
grad_scale / C). A listed class's gradient (minus its count of passing terms, once per listing) is formed in a last
loop over the list and written over the 0 the block loop left there. Offsets are int64.
"""
import torch
import triton
import triton.language as tl

from . import aot
from .common import MAX_BLOCK, acc_dtype, float_options, launch_config, raise_if_flagged, strided


@triton.jit
def _listed_count(T, BAD, C, BLOCK: tl.constexpr):
    """The length of a target row's list (the position of its first negative value, C without one), and whether the
    row holds a value outside [-1, C): each such value is written to BAD (any one of them may remain there)."""
    listed = C
    bad = tl.zeros((), tl.int32)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < C
        t = tl.load(T + cols, mask=valid, other=0)
        listed = tl.minimum(listed, tl.min(tl.where(valid & (t < 0), cols, C), axis=0))
        out = valid & ((t < -1) | (t >= C))
        tl.store(BAD + tl.zeros((BLOCK,), tl.int32), t, mask=out)
        bad = tl.maximum(bad, tl.max(out.to(tl.int32), axis=0))
    return listed, bad


@triton.jit
def multilabel_margin_loss_kernel(X, stride_xr, stride_xc, T, G, stride_gr, IS_TARGET, LOSS, BAD, OPTIONS, C,
                                  WRITE_GRADIENT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_xr
    T += row * C
    G += row * stride_gr
    IS_TARGET += row * C
    listed, bad = _listed_count(T, BAD, C, BLOCK)
    ok = bad == 0
    listed = tl.where(ok, listed, 0)  # a row with an out-of-range value (reported) reads no class
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        tl.store(IS_TARGET + cols, tl.zeros((BLOCK,), tl.int8), mask=cols < C)
    tl.debug_barrier()
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < listed
        t = tl.load(T + cols, mask=inside, other=0)
        tl.store(IS_TARGET + t, tl.full((BLOCK,), 1, tl.int8), mask=inside)
    tl.debug_barrier()
    step = tl.load(OPTIONS).to(ACC) / C
    total = tl.zeros((), ACC)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < C
        x = tl.load(X + strided(cols, stride_xc), mask=valid, other=0.0).to(ACC)
        other = valid & (tl.load(IS_TARGET + cols, mask=valid, other=1) == 0)
        count = tl.zeros((BLOCK,), ACC)
        for j in range(0, listed):
            x_y = tl.load(X + strided(tl.load(T + j), stride_xc)).to(ACC)
            z = 1.0 - x_y + x
            keep = other & (z > 0.0)
            total += tl.sum(tl.where(keep, z, 0.0), axis=0)
            count += tl.where(keep, 1.0, 0.0).to(ACC)
        if WRITE_GRADIENT:
            tl.store(G + cols, (count * step).to(G.dtype.element_ty), mask=valid)
    tl.store(LOSS + row, total / C)
    if WRITE_GRADIENT:
        # each listed class: minus its passing terms' count, times how often it is listed
        tl.debug_barrier()
        for j in range(0, listed):
            y = tl.load(T + j)
            shift = 1.0 - tl.load(X + strided(y, stride_xc)).to(ACC)
            passed = tl.zeros((), ACC)
            repeats = tl.zeros((), ACC)
            for start in range(0, C, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                valid = cols < C
                x = tl.load(X + strided(cols, stride_xc), mask=valid, other=0.0).to(ACC)
                other = valid & (tl.load(IS_TARGET + cols, mask=valid, other=1) == 0)
                passed += tl.sum(tl.where(other & (shift + x > 0.0), 1.0, 0.0).to(ACC), axis=0)
                listing = tl.load(T + cols, mask=cols < listed, other=-1)
                repeats += tl.sum(tl.where(listing == y, 1.0, 0.0).to(ACC), axis=0)
            tl.store(G + y, (-step * passed * repeats).to(G.dtype.element_ty))


def out_of_range(value, C):
    return RuntimeError(f"multilabel_margin_loss: argument #2 'target' is out of range: it holds {value}; values must "
                        f"lie in [-1, {C})")


def multilabel_margin_loss(*, input, target, grad, grad_scale, per_element):
    """Same contract as the C++ kernel multilabel_margin_loss: returns (row_loss, loss_sum) in the accumulation
    dtype; the per-row losses whether or not per_element asks for them (each program stores its own)."""
    rows, C = input.shape
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(rows, dtype=acc, device=input.device)
    if rows == 0:
        return row_loss, row_loss.sum()
    flag = torch.zeros(1, dtype=torch.int64, device=input.device)
    is_target = torch.empty((rows, C), dtype=torch.int8, device=input.device)
    g = grad if grad is not None else input
    multilabel_margin_loss_kernel[(rows,)](
        input, input.stride(0), input.stride(1), target, g, g.stride(0), is_target, row_loss, flag,
        float_options((float(grad_scale),), acc, input.device), C, WRITE_GRADIENT=grad is not None,
        ACC=acc_dtype(input.dtype),
        # a block of scores, the passing terms' counts and the listing's values are live together: half a block
        **launch_config(C, max_block=MAX_BLOCK // 2, acc=acc, gather=input.stride(1) != 1))
    raise_if_flagged(flag, lambda value: out_of_range(value, C))
    return row_loss, row_loss.sum()


def aot_calls():
    """(host function, arguments) calls covering what the route passes multilabel_margin_loss_kernel
    (triton_kernels/aot.py): every dtype, gradient or none, rows far apart and strided classes."""
    calls = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for classes, wide, transposed in ((10, False, False), (32000, True, False), (1000, False, True)):
            for grad in (False, True):
                if transposed:  # classes strided: the rows of a transposed (C, N) tensor
                    scores = aot.meta(classes, 48, dtype=dtype).t()
                else:
                    scores = aot.meta(4, (1 << 31) + 16 if wide else classes, dtype=dtype)[:, :classes]
                rows, C = scores.shape
                calls.append((multilabel_margin_loss, dict(
                    input=scores, target=aot.meta(rows, C, dtype=torch.int64),
                    grad=torch.empty((rows, C), dtype=dtype, device="meta") if grad else None, grad_scale=1.0,
                    per_element=False)))
    return calls
