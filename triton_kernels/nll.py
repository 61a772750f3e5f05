"""Negative log-likelihood over class rows for the Triton backend; same contract as csrc/nll.cpp.

Two routes over the (outer, C, inner) view, both reading one element a row (the target's: loss -w[y] x[y], 0 for
ignore_index) and writing a gradient row as -w[y] * scale at the target's class, 0 elsewhere:
  - `nll_loss` (the kernel ABI both backends share): one program a row, the gradient written in forward when a
    buffer is given, scaled by grad_scale;
  - `nll_loss_forward` / `nll_loss_backward` (the family's route on this backend): forward reads ROWS rows a program
    and keeps each row's share of the mean's denominator; its last program (common.last_program) reduces the row
    losses in a fixed order, sums the denominator and finds the first invalid target. Backward writes the gradient
    from the targets alone (it never reads the log-probabilities), grad_output and 1/denominator loaded on the
    device. One launch each way, no host value and no torch op between them.
Offsets are int64; an out-of-range target is never read, and is reported through a flag the host checks without
reading it (triton_kernels/common.py).
"""
import torch
import triton
import triton.language as tl

from . import aot
from .common import (FINISH_BLOCK, REDUCTIONS, acc_dtype, assert_targets_valid, finishing_tickets, last_program,
                     launch_config, raise_if_flagged, strided)
from .cross_entropy import (_class_target, _empty_rows, _finish_rows, _program_rows,
                            _reduce_empty, _row_pointers, aot_logits, out_of_bounds, strides3)

# Target rows a program of the forward route reads: one element each, so a program takes many.
FORWARD_ROWS = tl.constexpr(128)


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


@triton.jit
def nll_loss_forward_kernel(X, stride_xo, stride_xc, stride_xi, T, W, LOSS, STATE, OUT, FLAG, TICKETS, inner, C, rows,
                            ignore_index, HAS_WEIGHT: tl.constexpr, WEIGHTED_MEAN: tl.constexpr,
                            REDUCTION: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr):
    row = _program_rows(ROWS)
    live = row < rows
    X, _, _, _ = _row_pointers(X, stride_xo, stride_xi, X, stride_xo, stride_xi, row, inner)
    y, valid, _ = _class_target(T, row, live, C, ignore_index)
    w_y = tl.full((ROWS, 1), 1.0, ACC)
    if HAS_WEIGHT:
        w_y = tl.load(W + y, mask=valid, other=0.0).to(ACC)
    x_y = tl.load(X + strided(y, stride_xc), mask=valid, other=0.0).to(ACC)
    tl.store(LOSS + row, tl.where(valid, -w_y * x_y, 0.0), mask=live)
    tl.store(STATE + row, tl.where(valid, w_y if WEIGHTED_MEAN else 1.0, 0.0).to(ACC), mask=live)
    if last_program(TICKETS, tl.cdiv(rows, ROWS)):
        _finish_rows(LOSS, STATE, T, OUT, FLAG, rows, C, ignore_index, False, REDUCTION, ACC, 1, FINISH_BLOCK)


@triton.jit
def nll_loss_backward_kernel(T, W, G, stride_go, stride_gc, stride_gi, STATE, GRAD_LOSS, inner, C, rows,
                             ignore_index, HAS_WEIGHT: tl.constexpr, REDUCTION: tl.constexpr, ACC: tl.constexpr,
                             BLOCK: tl.constexpr):
    """The gradient of the loss nll_loss_forward returned, from the targets and the state it saved: grad_output (one
    value, or one a row for reduction "none") and the mean's 1/denominator applied here."""
    row = tl.program_id(0).to(tl.int64)
    G, _, _, _ = _row_pointers(G, stride_go, stride_gi, G, stride_go, stride_gi, row, inner)
    y, valid, _ = _class_target(T, row, True, C, ignore_index)
    if REDUCTION == 0:
        scale = tl.load(GRAD_LOSS + row).to(ACC)
    else:
        scale = tl.load(GRAD_LOSS).to(ACC)
    if REDUCTION == 2:
        denominator = tl.load(STATE + rows).to(ACC)
        scale = tl.where(denominator == 0, 0.0, scale / tl.where(denominator == 0, 1.0, denominator))
    w_y = 1.0
    if HAS_WEIGHT:
        w_y = tl.load(W + y, mask=valid, other=0.0).to(ACC)
    g_y = tl.where(valid, -w_y * scale, 0.0)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        tl.store(G + strided(cols, stride_gc), tl.where(cols == y, g_y, 0.0).to(G.dtype.element_ty), mask=cols < C)


def nll_loss_forward(*, input, target, weight, ignore_index, reduction, weighted_mean):
    """The family route's forward: (loss, state). loss: one value per row ("none") or the reduced loss, in the
    accumulation dtype; state: each row's share of the mean's denominator (its target's weight with weighted_mean,
    else 1; 0 when ignored), then the denominator."""
    outer, C, inner = input.shape
    rows = outer * inner
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(rows, dtype=acc, device=input.device)
    state = torch.empty(rows + 1, dtype=acc, device=input.device)
    if _empty_rows(input, target, ignore_index):
        state.zero_()
        row_loss.zero_()
        return _reduce_empty(row_loss, reduction), state
    loss = row_loss if reduction == "none" else torch.empty((), dtype=acc, device=input.device)
    flag = torch.empty(2, dtype=torch.int64, device=input.device)
    nll_loss_forward_kernel[(triton.cdiv(rows, FORWARD_ROWS),)](
        input, *strides3(input), target, weight if weight is not None else row_loss, row_loss, state, loss, flag,
        finishing_tickets(input.device), inner, C, rows, ignore_index, HAS_WEIGHT=weight is not None,
        WEIGHTED_MEAN=weighted_mean and weight is not None, REDUCTION=REDUCTIONS[reduction],
        ACC=acc_dtype(input.dtype), ROWS=FORWARD_ROWS)
    assert_targets_valid(flag, lambda row: out_of_bounds(int(target[row]), C, ignore_index))
    return loss, state


def nll_loss_backward(*, input, target, weight, grad, state, grad_loss, ignore_index, reduction):
    """Writes into `grad` the gradient of the loss nll_loss_forward returned with this state, times grad_loss (one
    value, or one per row for reduction "none"); `input` only gives the shape."""
    outer, C, inner = input.shape
    rows = outer * inner
    if rows == 0 or C == 0:
        grad.zero_()
        return grad
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    grad_loss = grad_loss.reshape(-1).contiguous() if reduction == "none" else grad_loss.reshape(())
    nll_loss_backward_kernel[(rows,)](
        target, weight if weight is not None else state, grad, *strides3(grad), state, grad_loss, inner, C, rows,
        ignore_index, HAS_WEIGHT=weight is not None, REDUCTION=REDUCTIONS[reduction], ACC=acc_dtype(input.dtype),
        **launch_config(C, acc=acc, gather=grad.stride(1) != 1))
    return grad


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
    # The family route's forward (each reduction its last program finishes) and backward (per-row and scalar
    # grad_output), with a weight, in every dtype and layout.
    for dtype in factors["dtype"]:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for layout in factors["layout"]:
            for wide in (False, True):
                logits3 = aot_logits(dtype, 32000, layout, wide)
                outer, C, inner = logits3.shape
                rows = outer * inner
                common = dict(input=logits3, target=aot.meta(rows, dtype=torch.int64),
                              weight=aot.meta(C, dtype=acc), ignore_index=-100)
                calls += [(nll_loss_forward, dict(common, reduction=reduction, weighted_mean=True))
                          for reduction in ("none", "sum", "mean")]
                calls += [(nll_loss_backward, dict(
                    common, grad=torch.empty(logits3.shape, dtype=dtype, device="meta"),
                    state=aot.meta(rows + 1, dtype=acc), reduction=reduction,
                    grad_loss=aot.meta(rows if reduction == "none" else 1, dtype=acc)))
                    for reduction in ("none", "mean")]
    return calls
