"""Knowledge distillation over pairs of softmax rows for the Triton backend; same contract and formulas as
csrc/distillation.cpp (its header has the divergences and their gradients).

One program per token: a first loop keeps both rows' online max / sum-exp (and the raw student row's, for the
cross-entropy term at a temperature other than 1), a second forms the divergence and the row sum its gradient needs
(writing forward KL's gradient), a third writes the other divergences' gradient. The gradient scale (the mean's
1/denominator) and the float options are loaded on the device: no host value per call. Out-of-range targets are
masked and reported through a flag (triton_kernels/common.py).
"""
import torch
import triton
import triton.language as tl

from . import aot
from .common import acc_dtype, float_options, launch_config, raise_if_flagged
from .cross_entropy import online_logsumexp, out_of_bounds

FORWARD_KL, REVERSE_KL, TVD, JSD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


@triton.jit
def _softened(X, cols, mask, inv_t, SCALED: tl.constexpr, ACC: tl.constexpr):
    """A block of logits (-inf past the mask) and the same block divided by the temperature."""
    raw = tl.load(X + cols, mask=mask, other=float("-inf")).to(ACC)
    if SCALED:
        return raw, raw * inv_t
    return raw, raw


@triton.jit
def _where_positive(p, value):
    # 0 log 0 = 0: the term of a class with probability 0 is 0 whatever the other log-probability is
    return tl.where(p > 0.0, value, 0.0)


@triton.jit
def _log_mixture(pt, ps, beta):
    return tl.log(beta * pt + (1.0 - beta) * ps)


@triton.jit
def _terms(ls, lt, ps, pt, beta, DIVERGENCE: tl.constexpr):
    """(loss term, row-sum term) per element: the row sum is what the divergence's gradient needs."""
    if DIVERGENCE == FORWARD_KL:
        loss = _where_positive(pt, pt * (lt - ls))
        row_sum = 0.0 * loss
    elif DIVERGENCE == REVERSE_KL:
        loss = _where_positive(ps, ps * (ls - lt))
        row_sum = 0.0 * loss
    elif DIVERGENCE == TVD:
        d = ps - pt
        loss = 0.5 * tl.abs(d)
        row_sum = ps * tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, 0.0))
    else:
        lm = _log_mixture(pt, ps, beta)
        row_sum = _where_positive(ps, ps * (ls - lm))
        loss = beta * _where_positive(pt, pt * (lt - lm)) + (1.0 - beta) * row_sum
    return loss, row_sum


@triton.jit
def _soft_gradient(ls, lt, ps, pt, beta, row_sum, divergence, DIVERGENCE: tl.constexpr):
    """d(divergence)/d(student logits / T) per element."""
    if DIVERGENCE == FORWARD_KL:
        g = ps - pt
    elif DIVERGENCE == REVERSE_KL:
        g = _where_positive(ps, ps * ((ls - lt) - divergence))
    elif DIVERGENCE == TVD:
        d = ps - pt
        g = ps * (tl.where(d > 0.0, 0.5, tl.where(d < 0.0, -0.5, 0.0)) - row_sum)
    else:
        g = (1.0 - beta) * _where_positive(ps, ps * ((ls - _log_mixture(pt, ps, beta)) - row_sum))
    return g


@triton.jit
def _log_probabilities(S_row, T_row, start, C, ms, lss, mt, lst, inv_t, SCALED: tl.constexpr, ACC: tl.constexpr,
                       BLOCK: tl.constexpr):
    """One block of both rows: (columns, mask, raw student logits, log p_s, log p_t, p_s, p_t)."""
    cols = start + tl.arange(0, BLOCK)
    mask = cols < C
    raw, zs = _softened(S_row, cols, mask, inv_t, SCALED, ACC)
    _, zt = _softened(T_row, cols, mask, inv_t, SCALED, ACC)
    ls = (zs - ms) - lss
    lt = (zt - mt) - lst
    return cols, mask, raw, ls, lt, tl.exp(ls), tl.exp(lt)


@triton.jit
def _write_gradient(S_row, T_row, G_row, start, C, y, keep, ms, lss, mt, lst, mh, lsh, inv_t, beta, row_sum,
                    divergence, soft_coef, hard_coef, DIVERGENCE: tl.constexpr, HARD: tl.constexpr,
                    SCALED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    cols, mask, raw, ls, lt, ps, pt = _log_probabilities(S_row, T_row, start, C, ms, lss, mt, lst, inv_t, SCALED, ACC,
                                                         BLOCK)
    g = soft_coef * _soft_gradient(ls, lt, ps, pt, beta, row_sum, divergence, DIVERGENCE)
    if HARD:
        if SCALED:
            ph = tl.exp((raw - mh) - lsh)
        else:
            ph = ps
        g += hard_coef * (ph - tl.where(cols == y, 1.0, 0.0))
    g = tl.where(keep, g, 0.0)
    tl.store(G_row + cols, g.to(G_row.dtype.element_ty), mask=mask)


@triton.jit
def _gradient_coefficients(SCALE, PARAMS, inv_t, ACC: tl.constexpr):
    """(soft, hard) gradient coefficients: grad_scale times the soft weight / T and the hard weight."""
    scale = tl.load(SCALE).to(ACC)
    return scale * tl.load(PARAMS + 3).to(ACC) * inv_t, scale * tl.load(PARAMS + 2).to(ACC)


@triton.jit
def distillation_kernel(S, stride_s, T, stride_t, Y, G, stride_g, LOSS, FLAG, SCALE, PARAMS, C, ignore_index,
                        DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, HARD: tl.constexpr, SCALED: tl.constexpr,
                        WRITE_GRADIENT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    S_row = S + row * stride_s
    T_row = T + row * stride_t
    G_row = G + row * stride_g
    # The hard and soft weights (PARAMS + 2, + 3) and grad_scale are loaded where they are used: a value held across
    # a loop that does not read it is one that ptxas may park on the stack (see triton_kernels/cross_entropy.py).
    beta = tl.load(PARAMS).to(ACC)
    inv_t = tl.load(PARAMS + 1).to(ACC)
    y = tl.zeros((), tl.int64) - 1
    keep = tl.full((), 1, tl.int1)
    if HAS_TARGET:
        label = tl.load(Y + row)
        kept = label != ignore_index
        in_range = (label >= 0) & (label < C)
        bad = kept & (not in_range)
        tl.store(FLAG, label, mask=bad)
        keep = kept & in_range
        y = tl.where(keep, label, -1)

    # Loop-carried values start in ACC (see triton_kernels/cross_entropy.py).
    ms = tl.full((), float("-inf"), ACC)
    ss = tl.zeros((), ACC)
    mt = tl.full((), float("-inf"), ACC)
    st = tl.zeros((), ACC)
    mh = tl.full((), float("-inf"), ACC)
    sh = tl.zeros((), ACC)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < C
        raw, zs = _softened(S_row, cols, mask, inv_t, SCALED, ACC)
        _, zt = _softened(T_row, cols, mask, inv_t, SCALED, ACC)
        ms, ss = online_logsumexp(ms, ss, zs)
        mt, st = online_logsumexp(mt, st, zt)
        if HARD and SCALED:
            mh, sh = online_logsumexp(mh, sh, raw)
    lss = tl.log(ss)
    lst = tl.log(st)
    if HARD and SCALED:
        lsh = tl.log(sh)
    else:
        mh = ms
        lsh = lss

    # Read before the gradient is written: it may overwrite the student's logits (the fused linear loss's chunks).
    cross_entropy = tl.zeros((), ACC)
    if HARD:
        cross_entropy = -((tl.load(S_row + tl.where(keep, y, 0)).to(ACC) - mh) - lsh)

    # The divergence as per-lane partial sums, reduced once after the loop (a reduction per block made ptxas spill
    # the loss-only variants); the row sum, which only the gradient variants form, per block.
    divergence_lanes = tl.zeros((BLOCK,), ACC)
    row_sum = tl.zeros((), ACC)
    if WRITE_GRADIENT and DIVERGENCE == FORWARD_KL:
        soft_coef, hard_coef = _gradient_coefficients(SCALE, PARAMS, inv_t, ACC)
    for start in range(0, C, BLOCK):
        _, mask, _, ls, lt, ps, pt = _log_probabilities(S_row, T_row, start, C, ms, lss, mt, lst, inv_t, SCALED, ACC,
                                                        BLOCK)
        loss, rs = _terms(ls, lt, ps, pt, beta, DIVERGENCE)
        divergence_lanes += tl.where(mask, loss, 0.0)
        if WRITE_GRADIENT and DIVERGENCE != FORWARD_KL:  # only the gradient reads the row sum
            row_sum += tl.sum(tl.where(mask, rs, 0.0), axis=0)
        if WRITE_GRADIENT and DIVERGENCE == FORWARD_KL:  # needs no row sum: written while the block is loaded
            _write_gradient(S_row, T_row, G_row, start, C, y, keep, ms, lss, mt, lst, mh, lsh, inv_t, beta, 0.0, 0.0,
                            soft_coef, hard_coef, DIVERGENCE, HARD, SCALED, ACC, BLOCK)
    divergence = tl.sum(divergence_lanes, axis=0)
    loss = tl.load(PARAMS + 3).to(ACC) * divergence + tl.load(PARAMS + 2).to(ACC) * cross_entropy
    tl.store(LOSS + row, tl.where(keep, loss, 0.0))
    if WRITE_GRADIENT and DIVERGENCE != FORWARD_KL:
        soft_coef, hard_coef = _gradient_coefficients(SCALE, PARAMS, inv_t, ACC)
        for start in range(0, C, BLOCK):
            _write_gradient(S_row, T_row, G_row, start, C, y, keep, ms, lss, mt, lst, mh, lsh, inv_t, beta, row_sum,
                            divergence, soft_coef, hard_coef, DIVERGENCE, HARD, SCALED, ACC, BLOCK)


def distillation(*, student, teacher, target, grad, divergence, beta, temperature, ignore_index, hard_weight,
                 soft_weight, grad_scale):
    """Same contract as the C++ kernel distillation: returns (row_loss, loss_sum) in the accumulation dtype and
    writes the student's gradient, times grad_scale (a one-element tensor), into grad when given."""
    rows, C = student.shape
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    row_loss = torch.empty(rows, dtype=acc, device=student.device)
    if rows == 0 or C == 0:
        row_loss.zero_()
        if grad is not None:
            grad.zero_()
        return row_loss, row_loss.sum()
    params = float_options((float(beta), 1.0 / float(temperature), float(hard_weight), float(soft_weight)), acc,
                           student.device)
    flag = torch.zeros(1, dtype=torch.int64, device=student.device)
    g = grad if grad is not None else student
    distillation_kernel[(rows,)](
        student, student.stride(0), teacher, teacher.stride(0), target if target is not None else flag, g,
        g.stride(0), row_loss, flag, grad_scale.to(student.device), params, C, ignore_index,
        DIVERGENCE=divergence, HAS_TARGET=target is not None, HARD=hard_weight != 0, SCALED=temperature != 1,
        WRITE_GRADIENT=grad is not None, ACC=acc_dtype(student.dtype), **launch_config(C, acc=acc, operands=2))
    if target is not None:
        raise_if_flagged(flag, lambda value: out_of_bounds(value, C, ignore_index))
    return row_loss, row_loss.sum()


# --- ahead-of-time variants (triton_kernels/aot.py, tests/test_triton_aot.py) ------------------------------------

_WIDE = 1 << 31  # an integer argument from here on is specialised as i64


def _aot_call(dtype, classes, wide, divergence, target, hard, scaled, grad, teacher_in_acc):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = 4
    width = _WIDE + 16 if wide else classes

    def matrix(of=dtype):
        return aot.meta(rows, width, dtype=of)[:, :classes]

    return distillation, dict(
        student=matrix(), teacher=matrix(acc if teacher_in_acc else dtype),
        target=aot.meta(rows, dtype=torch.int64) if target else None, grad=matrix() if grad else None,
        divergence=divergence, beta=0.3, temperature=2.0 if scaled else 1.0, ignore_index=-100,
        hard_weight=0.5 if hard else 0.0, soft_weight=1.0, grad_scale=aot.meta(dtype=acc))


def aot_calls():
    """(host function, arguments) calls covering what the route passes the kernel (see triton_kernels/aot.py)."""
    shape = dict(dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64), classes=(1000, 32000, 128256),
                 wide=(False, True))
    options = dict(divergence=(0, 1, 2, 3), target=(False, True), hard=(False, True), scaled=(False, True),
                   grad=(False, True), teacher_in_acc=(False, True))
    heaviest = dict(divergence=3, target=True, hard=True, scaled=True, grad=True, teacher_in_acc=True)
    cases = aot.covering({**shape, **options}, lambda case: case["target"] or not case["hard"], heaviest,
                         ("dtype", "divergence"))
    return [_aot_call(**case) for case in cases]

