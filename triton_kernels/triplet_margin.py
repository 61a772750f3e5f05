"""Triplet margin loss over rows for the Triton backend; same contract and formulas as csrc/triplet_margin.cpp.

One program a row triple: a first loop over the row forms the p-norm sums of a - p + eps, a - n + eps (and, with
swap, p - n + eps), a second (when a gradient is asked for) writes the three gradients from them. Positive and
negative may be in float32 beside a low-precision anchor (autocast); each gradient is stored in its input's dtype.
NORM picks the norm: 1, 2, or 0 for any other p (|u|^p as exp(p log |u|): the interpreter has no libdevice pow).
Offsets are int64.
"""
import torch
import triton
import triton.language as tl

from . import aot
from .common import MAX_BLOCK, acc_dtype, float_options, launch_config, pow_nonneg


@triton.jit
def _power(base, exponent):
    """base ** exponent for base >= 0 or NaN (which stays NaN, as in torch's pow), exponent > 0."""
    return tl.where(base != base, base, pow_nonneg(base, exponent))


@triton.jit
def _term(u, p, NORM: tl.constexpr):
    """u's term of the p-norm's sum."""
    if NORM == 1:
        return tl.abs(u)
    elif NORM == 2:
        return u * u
    else:
        return _power(tl.abs(u), p)


@triton.jit
def _root(total, p, NORM: tl.constexpr):
    if NORM == 1:
        return total
    elif NORM == 2:
        return tl.sqrt(total)
    else:
        return _power(total, 1.0 / p)


@triton.jit
def _factor(d, p, NORM: tl.constexpr):
    """The row's factor of the norm's gradient: 1, 1 / d, d^(1-p); 0 where d = 0 (torch's masks)."""
    if NORM == 1:
        return tl.where(d == d, 1.0, 1.0)  # p = 1's gradient does not depend on d, even a NaN one
    elif NORM == 2:
        return tl.where(d == 0.0, 0.0, 1.0 / tl.where(d == 0.0, 1.0, d))
    else:
        safe = tl.where(d == 0.0, 1.0, d)
        return tl.where(d == 0.0, 0.0, tl.exp((1.0 - p) * tl.log(safe)))


@triton.jit
def _shape(u, p, NORM: tl.constexpr):
    """The element's gradient shape: sgn(u), u, sgn(u) |u|^(p-1) (0 at u = 0). torch's sign is 0 at NaN: p = 1's
    gradient is 0 there, other p's NaN through |u|^(p-1)."""
    sign = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
    if NORM == 1:
        return sign
    elif NORM == 2:
        return u
    else:
        magnitude = tl.abs(u)
        safe = tl.where(magnitude > 0, magnitude, 1.0)
        return tl.where(u == 0.0, 0.0, sign * tl.exp((p - 1.0) * tl.log(tl.where(u == u, safe, u))))


@triton.jit
def triplet_margin_kernel(A, P, N, GA, GP, GN, LOSS, SCALE, OPTIONS, D, NORM: tl.constexpr, SWAP: tl.constexpr,
                          WRITE_GA: tl.constexpr, WRITE_GP: tl.constexpr, WRITE_GN: tl.constexpr, ACC: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * D
    margin = tl.load(OPTIONS).to(ACC)
    p = tl.load(OPTIONS + 1).to(ACC)
    eps = tl.load(OPTIONS + 2).to(ACC)
    sum_p = tl.zeros([BLOCK], ACC)
    sum_n = tl.zeros([BLOCK], ACC)
    sum_s = tl.zeros([BLOCK], ACC)
    for start in range(0, D, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < D
        a = tl.load(A + base + cols, mask=mask, other=0.0).to(ACC)
        b = tl.load(P + base + cols, mask=mask, other=0.0).to(ACC)
        c = tl.load(N + base + cols, mask=mask, other=0.0).to(ACC)
        # padded lanes would add eps's term: they add nothing
        sum_p += tl.where(mask, _term(a - b + eps, p, NORM), 0.0)
        sum_n += tl.where(mask, _term(a - c + eps, p, NORM), 0.0)
        if SWAP:
            sum_s += tl.where(mask, _term(b - c + eps, p, NORM), 0.0)
    dp = _root(tl.sum(sum_p, axis=0), p, NORM)
    dn = _root(tl.sum(sum_n, axis=0), p, NORM)
    negative = dn
    wn = 1.0
    ws = 0.0
    ds = 0.0
    if SWAP:
        ds = _root(tl.sum(sum_s, axis=0), p, NORM)
        # torch's minimum: NaN if either is; its gradient halves a tie and goes both ways past a NaN
        negative = tl.where((dn != dn) | (ds != ds), dn + ds, tl.minimum(dn, ds))
        wn = tl.where(dn == ds, 0.5, tl.where(dn > ds, 0.0, 1.0))
        ws = tl.where(dn == ds, 0.5, tl.where(dn < ds, 0.0, 1.0))
    gap = margin + dp - negative
    tl.store(LOSS + row, tl.where(gap < 0, 0.0, gap))  # a NaN gap stays NaN, as torch's clamp_min
    if WRITE_GA or WRITE_GP or WRITE_GN:
        h = tl.where(gap >= 0, tl.load(SCALE).to(ACC), 0.0)
        cp = h * _factor(dp, p, NORM)
        cn = h * wn * _factor(dn, p, NORM)
        cs = 0.0
        if SWAP:
            cs = h * ws * _factor(ds, p, NORM)
        for start in range(0, D, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < D
            a = tl.load(A + base + cols, mask=mask, other=0.0).to(ACC)
            b = tl.load(P + base + cols, mask=mask, other=0.0).to(ACC)
            c = tl.load(N + base + cols, mask=mask, other=0.0).to(ACC)
            fp = cp * _shape(a - b + eps, p, NORM)
            fn = cn * _shape(a - c + eps, p, NORM)
            fs = tl.zeros([BLOCK], ACC)
            if SWAP:
                fs = cs * _shape(b - c + eps, p, NORM)
            if WRITE_GA:
                tl.store(GA + base + cols, (fp - fn).to(GA.dtype.element_ty), mask=mask)
            if WRITE_GP:
                tl.store(GP + base + cols, (-fp - fs).to(GP.dtype.element_ty), mask=mask)
            if WRITE_GN:
                tl.store(GN + base + cols, (fn + fs).to(GN.dtype.element_ty), mask=mask)


def _launch_policy(D: int, acc: torch.dtype) -> dict:
    """Three rows are read together and the gradient loop keeps three differences' terms beside them: a tile of four
    operands' worth (the policy's factors are powers of two). The policy leaves a float64 tile at a quarter of the
    float32 one whatever the operands, which spills on sm_80 with three rows: half of that."""
    if acc == torch.float64:
        return launch_config(D, max_block=MAX_BLOCK // 2, acc=acc)
    return launch_config(D, acc=acc, operands=4)


def norm_code(p: float) -> int:
    return 1 if p == 1.0 else 2 if p == 2.0 else 0


def triplet_margin_loss(*, anchor, positive, negative, margin, p, eps, swap, grad_anchor, grad_positive,
                        grad_negative, grad_scale, per_element):
    """Same contract as the C++ kernel triplet_margin_loss: returns (per-row loss, or an empty tensor unless
    per_element; the losses' sum) in the accumulation dtype."""
    rows, D = anchor.shape
    acc = torch.float64 if anchor.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(rows, dtype=acc, device=anchor.device)
    if rows > 0:
        triplet_margin_kernel[(rows,)](
            anchor, positive, negative, anchor if grad_anchor is None else grad_anchor,
            positive if grad_positive is None else grad_positive, negative if grad_negative is None else grad_negative,
            row_loss, grad_scale.to(device=anchor.device, dtype=acc),
            float_options((float(margin), float(p), float(eps)), acc, anchor.device), D, NORM=norm_code(p),
            SWAP=bool(swap), WRITE_GA=grad_anchor is not None, WRITE_GP=grad_positive is not None,
            WRITE_GN=grad_negative is not None, ACC=acc_dtype(anchor.dtype),
            **_launch_policy(D, acc))
    return (row_loss if per_element else row_loss[:0]), row_loss.sum()


def aot_calls():
    """(host function, arguments) calls covering what the route passes triplet_margin_kernel (triton_kernels/aot.py):
    every dtype and norm, swap, short and long rows, offsets below and beyond 2^31, each gradient."""
    factors = dict(dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64), p=(2.0, 1.0, 1.5),
                   swap=(False, True), dim=(16, 4096), wide=(False, True), others_in_acc=(False, True),
                   grads=("anchor", "all"))

    def valid(case):  # positive and negative in float32 beside a low-precision anchor: autocast's mixed triple
        return not case["others_in_acc"] or case["dtype"] in (torch.bfloat16, torch.float16)

    calls = []
    for case in aot.covering(factors, valid, dict(swap=True, grads="all"), ("dtype", "p", "wide")):
        dtype, p, swap, dim, wide, others_in_acc, grads = case.values()
        rows = (1 << 31) // dim + 16 if wide else 4096
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        a = aot.meta(rows, dim, dtype=dtype)
        pos, neg = (aot.meta(rows, dim, dtype=acc if others_in_acc else dtype) for _ in range(2))
        everything = grads == "all"
        calls.append((triplet_margin_loss, dict(
            anchor=a, positive=pos, negative=neg, margin=1.0, p=p, eps=1e-6, swap=swap,
            grad_anchor=torch.empty_like(a), grad_positive=torch.empty_like(pos) if everything else None,
            grad_negative=torch.empty_like(neg) if everything else None, grad_scale=aot.meta(dtype=acc),
            per_element=False)))
    return calls
