"""Cosine embedding loss over rows for the Triton backend; same contract and formulas as csrc/cosine_embedding.cpp.

One program a row pair: a first loop over the row forms x1 . x2, |x1|^2 and |x2|^2, a second (when a gradient is
asked for) writes both gradients from them. input2 may be in float32 beside a low-precision input1 (autocast); each
gradient is stored in its input's dtype. Offsets are int64.
"""
import torch
import triton
import triton.language as tl

from . import aot
from .common import (REDUCTIONS, SCALE_GIVEN, acc_dtype, float_options, gradient_scale, launch_config,
                     reduce_in_last_program, reduction_outputs)

EPSILON = tl.constexpr(1e-12)  # torch's, added to each squared norm


@triton.jit
def cosine_embedding_kernel(X1, X2, Y, G1, G2, LOSS, SCALE, OPTIONS, DEN, OUT, TICKETS, D, WRITE_G1: tl.constexpr,
                            WRITE_G2: tl.constexpr, ACC: tl.constexpr, REDUCTION: tl.constexpr, BLOCK: tl.constexpr):
    # REDUCTION: SCALE_GIVEN (the gradients scaled by SCALE, the caller reduces the rows' losses), or one of
    # REDUCTIONS: the scale formed from the mean's denominator DEN, and for a sum or a mean the launch's last program
    # adds up the rows' losses in a fixed order into OUT.
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    dot = tl.zeros([BLOCK], ACC)
    n1 = tl.zeros([BLOCK], ACC)
    n2 = tl.zeros([BLOCK], ACC)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        a = tl.load(X1 + base + cols, mask=mask, other=0.0).to(ACC)
        b = tl.load(X2 + base + cols, mask=mask, other=0.0).to(ACC)
        dot += a * b
        n1 += a * a
        n2 += b * b
    p = tl.sum(dot, axis=0)
    m1 = tl.sum(n1, axis=0) + EPSILON
    m2 = tl.sum(n2, axis=0) + EPSILON
    denom = tl.sqrt(m1 * m2)
    cos = p / denom
    y = tl.load(Y + row).to(ACC)
    gap = cos - tl.load(OPTIONS).to(ACC)
    # a NaN gap stays NaN (gap < 0 ? 0 : gap), as torch's clamp_min; its gradient passes at 0
    value = tl.where(y == 1.0, 1.0 - cos, tl.where(y == -1.0, tl.where(gap < 0, 0.0, gap), 0.0))
    slope = tl.where(y == 1.0, -1.0, tl.where(y == -1.0, tl.where(gap >= 0, 1.0, 0.0), 0.0))
    tl.store(LOSS + row, value)
    reduce_in_last_program(LOSS, tl.num_programs(0), DEN, OUT, TICKETS, REDUCTION, ACC)
    if WRITE_G1 or WRITE_G2:
        c = slope * gradient_scale(SCALE, DEN, REDUCTION, ACC) / denom
        k1 = c * p / m1
        k2 = c * p / m2
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < D
            a = tl.load(X1 + base + cols, mask=mask, other=0.0).to(ACC)
            b = tl.load(X2 + base + cols, mask=mask, other=0.0).to(ACC)
            if WRITE_G1:
                tl.store(G1 + base + cols, (c * b - k1 * a).to(G1.dtype.element_ty), mask=mask)
            if WRITE_G2:
                tl.store(G2 + base + cols, (c * a - k2 * b).to(G2.dtype.element_ty), mask=mask)


def _launch(input1, input2, target, margin, grad_input1, grad_input2, reduction, grad_scale=None, denominator=None):
    """(per-row losses, reduced loss or None) for cosine_embedding_kernel's REDUCTION `reduction`."""
    N, D = input1.shape
    acc = torch.float64 if input1.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(N, dtype=acc, device=input1.device)
    finish = reduction in (REDUCTIONS["sum"], REDUCTIONS["mean"])
    out, tickets = reduction_outputs(reduction, acc, input1.device, row_loss)
    if N > 0:
        cosine_embedding_kernel[(N,)](
            input1, input2, target, input1 if grad_input1 is None else grad_input1,
            input1 if grad_input2 is None else grad_input2, row_loss,
            row_loss if grad_scale is None else grad_scale.to(device=input1.device, dtype=acc),
            float_options((float(margin),), acc, input1.device), row_loss if denominator is None else denominator,
            out, tickets, D, WRITE_G1=grad_input1 is not None,
            WRITE_G2=grad_input2 is not None, ACC=acc_dtype(input1.dtype), REDUCTION=reduction,
            **launch_config(D, acc=acc, operands=2))
    elif finish:  # nothing launched: the sum of nothing, and a mean over nothing as torch's
        out = row_loss.sum() if reduction == REDUCTIONS["sum"] else row_loss.sum() / denominator
    return row_loss, out if finish else None


def cosine_embedding_loss(*, input1, input2, target, margin, grad_input1, grad_input2, grad_scale, per_element):
    """Same contract as the C++ kernel cosine_embedding_loss: returns (per-row loss, or an empty tensor unless
    per_element; the losses' sum) in the accumulation dtype."""
    row_loss, _ = _launch(input1, input2, target, margin, grad_input1, grad_input2, SCALE_GIVEN.value,
                          grad_scale=grad_scale)
    return (row_loss if per_element else row_loss[:0]), row_loss.sum()


def reduced(*, input1, input2, target, margin, grad_input1, grad_input2, reduction, denominator):
    """The route's call: the loss reduced as `reduction` says, the gradients scaled by the reduction (a mean's by
    1/denominator, a 0-d tensor in the accumulation dtype), in one launch and no other op."""
    row_loss, out = _launch(input1, input2, target, margin, grad_input1, grad_input2, REDUCTIONS[reduction],
                            denominator=denominator)
    return row_loss if reduction == "none" else out


cosine_embedding_loss.reduced = reduced


def aot_calls():
    """(host function, arguments) calls covering what the route passes cosine_embedding_kernel
    (triton_kernels/aot.py): every dtype, short and long rows, offsets below and beyond 2^31, each gradient."""
    factors = dict(dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64), dim=(16, 4096),
                   wide=(False, True), second_in_acc=(False, True), grad_input1=(False, True),
                   grad_input2=(False, True), reduction=("none", "sum", "mean"))

    def valid(case):  # input2 in float32 beside a low-precision input1: autocast's mixed pair
        return not case["second_in_acc"] or case["dtype"] in (torch.bfloat16, torch.float16)

    calls = []
    heaviest = dict(grad_input1=True, grad_input2=True, reduction="mean")
    for case in aot.covering(factors, valid, heaviest, ("dtype", "wide")):
        dtype, dim, wide, second_in_acc, g1, g2, reduction = case.values()
        rows = (1 << 31) // dim + 16 if wide else 4096
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x1, x2 = aot.meta(rows, dim, dtype=dtype), aot.meta(rows, dim, dtype=acc if second_in_acc else dtype)
        calls.append((reduced, dict(
            input1=x1, input2=x2, target=aot.meta(rows, dtype=acc), margin=0.5,
            grad_input1=torch.empty_like(x1) if g1 else None, grad_input2=torch.empty_like(x2) if g2 else None,
            reduction=reduction, denominator=aot.meta(dtype=acc))))
    return calls
