"""Cross-entropy / softmax focal loss for the Triton backend; same interface as csrc/cross_entropy.cpp, plus the
route that forms the gradient in backward.

Each program takes ROWS rows (one, or several when a row is shorter than a program's smallest tile: launch_config)
as a (ROWS, BLOCK) tile. Its first loop over the classes keeps each row's online max / sum-exp (plus the target
terms); what follows depends on the route:
  - `cross_entropy` (the kernel ABI both backends share; linear cross-entropy's chunks and in-place backward): a
    second loop writes the gradient, scale * (A * softmax - q) * softcap', in forward while the row is hot in L2.
  - `cross_entropy_forward` / `cross_entropy_backward` (the family's route on this backend): forward reads each row
    once and keeps its (max, log sum-exp, target term); the launch's last program (common.last_program) reduces the
    row losses in a fixed order, sums the mean's denominator and finds the first invalid target; backward reads the
    row once more and writes the gradient with grad_output and the mean's 1/denominator loaded on the device. Three
    reads or writes of N x C in all, one launch each way, no host value and no torch op between them.
Offsets are int64 (rows * classes may exceed 2^31); out-of-range targets are masked (never read) and reported
through a flag that the host checks without reading it (triton_kernels/common.py). When the gradient overwrites
the logits in forward, a device-side "any target invalid" tensor computed before the launch makes every program
skip its gradient stores, so a bad batch raises with the logits intact and without a host read before the kernel.
"""

import torch
import triton
import triton.language as tl

from . import aot
from .common import (FINISH_BLOCK, REDUCTIONS, acc_dtype, assert_targets_valid, expm1, finishing_tickets,
                     float_options, last_program, launch_config, pow_nonneg, raise_if_flagged, softcap, strided)

# What the row kernel does after its statistics (the constexpr MODE).
LOSS_ONLY, WRITE_GRADIENT, SAVE_STATE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
# Per row of the saved state: max, log sum-exp relative to it, and the row's share of the mean's denominator
# (class-index targets) or the sum of its target weights (probability targets); the mean's denominator follows
# the rows.
STATE_WIDTH = 3
_STATE_WIDTH = tl.constexpr(STATE_WIDTH)  # the same, inside kernels


@triton.jit
def load_logits(ptrs, mask, SOFTCAP: tl.constexpr, cap, ACC: tl.constexpr):
    x = tl.load(ptrs, mask=mask, other=float("-inf")).to(ACC)
    if SOFTCAP:
        # Padded lanes must stay -inf: capping them would give -cap and leak into the sums.
        x = tl.where(mask, softcap(x, cap), float("-inf"))
    return x


@triton.jit
def online_logsumexp(m, s, x, KEEP_DIMS: tl.constexpr = False):
    """One block of the running (max, sum of exp(x - max)) over x's last axis; a row of -inf so far shifts by 0, not
    NaN. KEEP_DIMS: m and s keep that axis (length 1), as a block of rows' statistics do."""
    new_m = tl.maximum(m, tl.max(x, axis=-1, keep_dims=KEEP_DIMS))
    safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
    return new_m, s * tl.exp(m - safe_m) + tl.sum(tl.exp(x - safe_m), axis=-1, keep_dims=KEEP_DIMS)


@triton.jit
def _program_rows(ROWS: tl.constexpr):
    """The rows this program takes, as a (ROWS, 1) column of 64-bit indices: each per-row value below has that shape,
    and a block of classes is (ROWS, BLOCK)."""
    return tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)[:, None]


@triton.jit
def _row_pointers(X, stride_xo, stride_xi, G, stride_go, stride_gi, row, inner):
    """Rows `row` of an (outer, C, inner) view: the logits' and the gradient's row pointers and their (outer, inner)
    positions (64-bit, as row is)."""
    outer_idx = row // inner
    inner_idx = row % inner
    return (X + outer_idx * stride_xo + inner_idx * stride_xi, G + outer_idx * stride_go + inner_idx * stride_gi,
            outer_idx, inner_idx)


@triton.jit
def _class_target(T, row, live, C, ignore_index):
    """Rows' class-index targets: (the class, 0 where not valid; kept and in range; kept but out of range). A row
    past the last (not live) reads as ignored."""
    y = tl.load(T + row, mask=live, other=ignore_index)
    in_range = (y >= 0) & (y < C)
    kept = y != ignore_index
    return tl.where(kept & in_range, y, 0), kept & in_range, kept & ~in_range


@triton.jit
def _probability_weights(T, stride_tc, W, cols, mask, eps, smooth, HAS_WEIGHT: tl.constexpr, ACC: tl.constexpr):
    """A block of the smoothed (and class-weighted) probability targets, zeros past the mask."""
    q = tl.load(T + strided(cols, stride_tc), mask=mask, other=0.0).to(ACC) * (1.0 - eps) + smooth
    if HAS_WEIGHT:
        q = q * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
    return tl.where(mask, q, 0.0)


@triton.jit
def _row_statistics(X, stride_xc, T, stride_tc, W, read, C, eps, smooth, cap,
                    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
                    SOFTCAP: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over the rows' first `read` classes: (max, log sum exp(x - max), sum q_c x_c or sum w_c x_c,
    sum q_c), each (ROWS, 1)."""
    # Loop-carried values start in ACC: a Python float is an fp32 constant, and the compiler refuses a loop
    # variable whose type changes (fp32 -> fp64) between iterations.
    m = tl.full((ROWS, 1), float("-inf"), ACC)
    s = tl.zeros((ROWS, 1), ACC)
    dot = tl.zeros((ROWS, 1), ACC)  # sum q_c x_c (probability targets) or sum w_c x_c (smoothing)
    q_sum = tl.zeros((ROWS, 1), ACC)
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        mask = cols < read
        x = load_logits(X + strided(cols, stride_xc), mask, SOFTCAP, cap, ACC)
        m, s = online_logsumexp(m, s, x, True)
        x0 = tl.where(mask, x, 0.0)  # -inf * 0 would be NaN
        if PROB_TARGET:
            q = _probability_weights(T, stride_tc, W, cols, mask, eps, smooth, HAS_WEIGHT, ACC)
            q_sum += tl.sum(q, axis=1, keep_dims=True)
            dot += tl.sum(q * x0, axis=1, keep_dims=True)
        elif SMOOTHING:
            if HAS_WEIGHT:
                dot += tl.sum(x0 * tl.load(W + cols, mask=mask, other=0.0).to(ACC), axis=1, keep_dims=True)
            else:
                dot += tl.sum(x0, axis=1, keep_dims=True)
    # Log-probabilities are formed as (x - max) - log_sum, never x - lse: lse rounds to max's ulp.
    return m, tl.log(s), dot, q_sum


@triton.jit
def _index_row_terms(x_y, w_y, m, log_sum, dot, w_sum, eps, smooth, z, focal_gamma,
                     FOCAL: tl.constexpr, SMOOTHING: tl.constexpr):
    """A class-index row's (loss, softmax coefficient of the loss term, of the z-loss term, one-hot coefficient,
    log p_y): its gradient is (coef + z_coef) * p - onehot_coef * [j = y] - smoothing's share."""
    lse = m + log_sum
    logp = (x_y - m) - log_sum
    if FOCAL:
        # See csrc/softmax_rows.h row_coefficients: no negative power of q for any gamma >= 0.
        p_y = tl.exp(logp)
        q = -expm1(logp)
        qg = pow_nonneg(q, focal_gamma)
        r = tl.where(q > 0, -logp / tl.where(q > 0, q, 1.0), 1.0)
        coef = w_y * qg * (1.0 + focal_gamma * p_y * r)
        loss = -w_y * qg * logp
        onehot_coef = coef
        z_coef = 0.0 * lse
    else:
        loss = -(1.0 - eps) * w_y * logp + z * lse * lse
        coef = (1.0 - eps) * w_y
        z_coef = 2.0 * z * lse
        if SMOOTHING:
            loss += smooth * (w_sum * lse - dot)
            coef += smooth * w_sum
        onehot_coef = (1.0 - eps) * w_y
    return loss, coef, z_coef, onehot_coef, logp


@triton.jit
def _index_target_terms(X, stride_xc, W, WSUM, y, valid, m, log_sum, dot, C, eps, smooth, z, focal_gamma, cap,
                        HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr,
                        FOCAL: tl.constexpr, ACC: tl.constexpr):
    """A class-index row's target logit and class weights, and from them _index_row_terms' results, smoothing's
    share of the target entry (smooth * w_y, 0 without smoothing) and the target's class weight w_y."""
    x_y = tl.where(valid, load_logits(X + y * stride_xc, valid, SOFTCAP, cap, ACC), 0.0)
    w_y = 1.0
    if HAS_WEIGHT:
        w_y = tl.load(W + y, mask=valid, other=0.0).to(ACC)
    w_sum = C * 1.0
    w_y_smooth = 0.0
    if SMOOTHING:
        w_y_smooth = smooth * w_y
        if HAS_WEIGHT:
            w_sum = tl.load(WSUM).to(ACC)
    loss, coef, z_coef, onehot_coef, logp = _index_row_terms(x_y, w_y, m, log_sum, dot, w_sum, eps, smooth, z,
                                                             focal_gamma, FOCAL, SMOOTHING)
    return loss, coef, z_coef, onehot_coef, logp, w_y_smooth, w_y


@triton.jit
def _write_row_gradient(X, stride_xc, T, stride_tc, W, G, stride_gc, y, m, log_sum, logp, coef, onehot_coef,
                        target_scale, w_y_smooth, read, written, C, eps, smooth, cap,
                        PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr,
                        SOFTCAP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Stores softcap' * (coef * p - target_scale * (the target's share)) over the rows: zeros past `read`, nothing
    past `written`. coef and onehot_coef come scaled; target_scale is what scaled them."""
    for start in range(0, C, BLOCK):
        cols = start + tl.arange(0, BLOCK)[None, :]
        mask = cols < read
        x = load_logits(X + strided(cols, stride_xc), mask, SOFTCAP, cap, ACC)
        g = coef * tl.exp((x - m) - log_sum)
        if PROB_TARGET:
            g -= target_scale * _probability_weights(T, stride_tc, W, cols, mask, eps, smooth, HAS_WEIGHT, ACC)
        else:
            if SMOOTHING:
                if HAS_WEIGHT:
                    g -= target_scale * smooth * tl.load(W + cols, mask=mask, other=0.0).to(ACC)
                else:
                    g -= target_scale * smooth
            # coef * p - onehot_coef cancels as p -> 1: use (coef - onehot) p + onehot (p - 1).
            g_y = (coef - onehot_coef) * tl.exp(logp) + onehot_coef * expm1(logp) - target_scale * w_y_smooth
            g = tl.where(cols == y, g_y, g)
        if SOFTCAP:
            t = x / cap
            g = g * (1.0 - t * t)
        g = tl.where(mask, g, 0.0)
        tl.store(G + strided(cols, stride_gc), g.to(G.dtype.element_ty), mask=cols < written)


@triton.jit
def cross_entropy_kernel(
    X, stride_xo, stride_xc, stride_xi,
    T, stride_to, stride_tc, stride_ti,
    W, WSUM,
    G, stride_go, stride_gc, stride_gi,
    LOSS, LSE, STATE, BAD, HOLD, SCALE, OUT, FLAG, TICKETS,
    PARAMS, inner, C, rows, ignore_index,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr,
    FOCAL: tl.constexpr, MODE: tl.constexpr, WEIGHTED_MEAN: tl.constexpr, HOLD_ON_BAD: tl.constexpr,
    FINISH: tl.constexpr, REDUCTION: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = _program_rows(ROWS)
    live = row < rows
    X, G, outer_idx, inner_idx = _row_pointers(X, stride_xo, stride_xi, G, stride_go, stride_gi, row, inner)
    # Float options arrive as a tensor in the accumulation dtype: scalar kernel arguments are fp32. Those the first
    # loop does not use are loaded after it, so they hold no registers across it: every value live across that loop
    # and used only after it is one that ptxas may spill when it picks a lower register count.
    cap = tl.load(PARAMS + 2).to(ACC)
    eps = 0.0
    smooth = 0.0
    valid = live
    y = 0
    if not PROB_TARGET:
        _, valid, _ = _class_target(T, row, live, C, ignore_index)
    else:
        T += outer_idx * stride_to + inner_idx * stride_ti
        eps = tl.load(PARAMS + 0).to(ACC)
        smooth = eps / C
    # Columns read: none for an ignored (or invalid) target, whose loss and gradient are zeros whatever its logits.
    read = tl.where(valid, C, 0)
    m, log_sum, dot, q_sum = _row_statistics(X, stride_xc, T, stride_tc, W, read, C, eps, smooth, cap, PROB_TARGET,
                                             HAS_WEIGHT, SMOOTHING, SOFTCAP, ACC, ROWS, BLOCK)
    if not PROB_TARGET:
        # Read again rather than kept, for the same reason.
        y, valid, out_of_range = _class_target(T, row, live, C, ignore_index)
        if MODE != SAVE_STATE:  # the finishing program finds invalid targets on that route
            tl.store(BAD + row * 0, tl.load(T + row, mask=out_of_range), mask=out_of_range)
        eps = tl.load(PARAMS + 0).to(ACC)
        smooth = eps / C
    lse = m + log_sum
    z = tl.load(PARAMS + 1).to(ACC)
    focal_gamma = tl.load(PARAMS + 3).to(ACC)

    logp = 0.0
    onehot_coef = 0.0
    w_y_smooth = 0.0
    if PROB_TARGET:
        loss = q_sum * lse - dot + z * lse * lse
        coef = q_sum + 2.0 * z * lse
    else:
        loss, coef, z_coef, onehot_coef, logp, w_y_smooth, w_y = _index_target_terms(
            X, stride_xc, W, WSUM, y, valid, m, log_sum, dot, C, eps, smooth, z, focal_gamma, cap, HAS_WEIGHT,
            SMOOTHING, SOFTCAP, FOCAL, ACC)
        coef += z_coef
        loss = tl.where(valid, loss, 0.0)
        lse = tl.where(valid, lse, 0.0)
    tl.store(LOSS + row, loss, mask=live)
    if MODE != SAVE_STATE:
        tl.store(LSE + row, lse, mask=live)
    else:
        tl.store(STATE + row * 3 + 0, tl.where(valid, m, 0.0), mask=live)
        tl.store(STATE + row * 3 + 1, tl.where(valid, log_sum, 0.0), mask=live)
        if PROB_TARGET:
            tl.store(STATE + row * 3 + 2, q_sum, mask=live)
        elif WEIGHTED_MEAN:
            tl.store(STATE + row * 3 + 2, tl.where(valid, w_y, 0.0), mask=live)
        else:
            tl.store(STATE + row * 3 + 2, tl.where(valid, 1.0, 0.0).to(ACC), mask=live)
        # The mean's denominator after the rows: the finishing program writes it for a mean; every byte of the
        # state is defined whatever the reduction.
        tl.store(STATE + rows * 3 + row * 0, tl.zeros((ROWS, 1), ACC), mask=row == 0)
        if FINISH:
            if last_program(TICKETS, tl.cdiv(rows, ROWS)):
                _finish_rows(LOSS, STATE, T, OUT, FLAG, rows, C, ignore_index, PROB_TARGET, REDUCTION, ACC,
                             _STATE_WIDTH, FINISH_BLOCK)
    if MODE == WRITE_GRADIENT:
        scale = tl.load(SCALE).to(ACC)
        if not PROB_TARGET:
            scale = tl.where(valid, scale, 0.0)
        written = tl.where(live, C, 0)  # columns stored per row: none while HOLD says a target is invalid
        if HOLD_ON_BAD:
            written = tl.where(tl.load(HOLD) == 0, written, 0)
        _write_row_gradient(X, stride_xc, T, stride_tc, W, G, stride_gc, y, m, log_sum, logp, coef * scale,
                            onehot_coef * scale, scale, w_y_smooth, read, written, C, eps, smooth, cap,
                            PROB_TARGET, HAS_WEIGHT, SMOOTHING, SOFTCAP, ACC, BLOCK)


@triton.jit
def _finish_rows(LOSS, STATE, T, OUT, FLAG, rows, C, ignore_index, PROB_TARGET: tl.constexpr,
                 REDUCTION: tl.constexpr, ACC: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    """A row kernel's last program, over every row's results in a fixed order (the same sum on every run): the
    reduced loss, the mean's denominator after the rows' state (WIDTH values a row, the last of them the row's share
    of the denominator), and FLAG = [1 if every class-index target is valid else 0, the first invalid one's row].
    What other programs wrote is read past L1 (.cg), which may hold lines from before their stores."""
    total = tl.zeros((), ACC)
    denominator = tl.zeros((), ACC)
    first_bad = tl.full((), rows, tl.int64)
    for start in range(0, rows, BLOCK):
        r = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = r < rows
        if REDUCTION != 0:
            total += tl.sum(tl.load(LOSS + r, mask=mask, other=0.0, cache_modifier=".cg").to(ACC), axis=0)
        if REDUCTION == 2:
            if PROB_TARGET:  # torch divides probability-target losses by the number of rows
                denominator += tl.sum(tl.where(mask, 1.0, 0.0).to(ACC), axis=0)
            else:
                denominator += tl.sum(tl.load(STATE + r * WIDTH + WIDTH - 1, mask=mask, other=0.0,
                                              cache_modifier=".cg").to(ACC), axis=0)
        if not PROB_TARGET:
            y = tl.load(T + r, mask=mask, other=ignore_index)
            bad = mask & (y != ignore_index) & ((y < 0) | (y >= C))
            first_bad = tl.minimum(first_bad, tl.min(tl.where(bad, r, rows), axis=0))
    if REDUCTION == 1:
        tl.store(OUT, total)
    if REDUCTION == 2:
        # A mean over nothing (every target ignored, or every kept weight 0) is NaN, its gradient 0 (lossops._reduce).
        empty = denominator == 0
        tl.store(OUT, tl.where(empty, float("nan"), total / tl.where(empty, 1.0, denominator)))
        tl.store(STATE + rows * WIDTH, denominator)
    else:  # every byte of the state is defined whatever the reduction: it is an output of the op
        tl.store(STATE + rows * WIDTH, tl.zeros((), ACC))
    if not PROB_TARGET:
        tl.store(FLAG, (first_bad == rows).to(tl.int64))
        tl.store(FLAG + 1, first_bad)


@triton.jit
def cross_entropy_backward_kernel(
    X, stride_xo, stride_xc, stride_xi,
    T, stride_to, stride_tc, stride_ti,
    W, WSUM,
    G, stride_go, stride_gc, stride_gi,
    STATE, GRAD_LOSS, PARAMS, inner, C, rows, ignore_index,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, SOFTCAP: tl.constexpr,
    FOCAL: tl.constexpr, REDUCTION: tl.constexpr, ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    """The gradient of the loss cross_entropy_forward returned, from the row state it saved: one read of the row,
    grad_output (one value, or one per row for reduction "none") and the mean's 1/denominator applied here."""
    row = _program_rows(ROWS)
    live = row < rows
    X, G, outer_idx, inner_idx = _row_pointers(X, stride_xo, stride_xi, G, stride_go, stride_gi, row, inner)
    eps = tl.load(PARAMS + 0).to(ACC)
    z = tl.load(PARAMS + 1).to(ACC)
    cap = tl.load(PARAMS + 2).to(ACC)
    focal_gamma = tl.load(PARAMS + 3).to(ACC)
    smooth = eps / C
    m = tl.load(STATE + row * 3 + 0, mask=live, other=0.0).to(ACC)
    log_sum = tl.load(STATE + row * 3 + 1, mask=live, other=0.0).to(ACC)
    if REDUCTION == 0:
        scale = tl.load(GRAD_LOSS + row, mask=live, other=0.0).to(ACC)
    else:
        scale = tl.load(GRAD_LOSS).to(ACC)
    if REDUCTION == 2:
        denominator = tl.load(STATE + rows * 3).to(ACC)
        scale = tl.where(denominator == 0, 0.0, scale / tl.where(denominator == 0, 1.0, denominator))

    y = -1
    read = tl.where(live, C, 0)
    logp = 0.0
    onehot_coef = 0.0
    w_y_smooth = 0.0
    if PROB_TARGET:
        T += outer_idx * stride_to + inner_idx * stride_ti
        coef = scale * (tl.load(STATE + row * 3 + 2, mask=live, other=0.0).to(ACC) + 2.0 * z * (m + log_sum))
    else:
        y, valid, _ = _class_target(T, row, live, C, ignore_index)
        read = tl.where(valid, C, 0)
        scale = tl.where(valid, scale, 0.0)
        _, coef, z_coef, onehot_coef, logp, w_y_smooth, _ = _index_target_terms(
            X, stride_xc, W, WSUM, y, valid, m, log_sum, 0.0, C, eps, smooth, z, focal_gamma, cap, HAS_WEIGHT,
            SMOOTHING, SOFTCAP, FOCAL, ACC)
        coef = (coef + z_coef) * scale
        onehot_coef = onehot_coef * scale
    _write_row_gradient(X, stride_xc, T, stride_tc, W, G, stride_gc, y, m, log_sum, logp, coef, onehot_coef, scale,
                        w_y_smooth, read, tl.where(live, C, 0), C, eps, smooth, cap, PROB_TARGET, HAS_WEIGHT,
                        SMOOTHING, SOFTCAP, ACC, BLOCK)


def strides3(t):
    return t.stride(0), t.stride(1), t.stride(2)


class _RowLaunch:
    """What every row kernel's launch derives from the same arguments: flags, options tensor, block and warps."""

    def __init__(self, logits3, target, weight, grad, label_smoothing, lse_square_scale, softcap, focal_gamma):
        self.acc = torch.float64 if logits3.dtype == torch.float64 else torch.float32
        self.prob_target = target.is_floating_point()
        softcap = 0.0 if softcap is None else softcap
        focal_gamma = -1.0 if focal_gamma is None else focal_gamma
        self.smoothing = label_smoothing > 0 and not self.prob_target and focal_gamma < 0
        self.target_strides = strides3(target) if self.prob_target else (0, 0, 0)
        g = grad if grad is not None else logits3
        gather = logits3.stride(1) != 1 or g.stride(1) != 1 or (self.prob_target and target.stride(1) != 1)
        self.params = float_options((float(label_smoothing), float(lse_square_scale), float(softcap) or 1.0,
                                     float(max(focal_gamma, 0.0))), self.acc, logits3.device)
        self.flags = dict(PROB_TARGET=self.prob_target, HAS_WEIGHT=weight is not None, SMOOTHING=self.smoothing,
                          SOFTCAP=softcap > 0, FOCAL=focal_gamma >= 0, ACC=acc_dtype(logits3.dtype),
                          # probability targets: each step reads a row of them beside the logits
                          **launch_config(logits3.shape[1], acc=self.acc, gather=gather, rows=True,
                                          operands=2 if self.prob_target else 1))

    def grid(self, rows):
        return (triton.cdiv(rows, self.flags["ROWS"]),)

    def weight_sum(self, weight, placeholder):
        return weight.sum() if (weight is not None and self.smoothing) else placeholder  # placeholder: unread


def cross_entropy(*, input, target, weight, grad, ignore_index, label_smoothing, lse_square_scale, softcap,
                  focal_gamma, grad_scale, row_state=None):
    """Same contract as the C++ kernel cross_entropy: returns (row_loss, row_lse, loss_sum). softcap and
    focal_gamma: None when off (focal_gamma set: softmax focal loss, weight = per-class alpha). row_state: left
    empty, which the contract allows (the caller then runs the whole kernel again): this route saves its row state
    through cross_entropy_forward instead."""
    logits3 = input
    outer, C, inner = logits3.shape
    rows = outer * inner
    launch = _RowLaunch(logits3, target, weight, grad, label_smoothing, lse_square_scale, softcap, focal_gamma)
    row_loss = torch.empty(rows, dtype=launch.acc, device=logits3.device)
    row_lse = torch.empty(rows, dtype=launch.acc, device=logits3.device)
    in_place = grad is not None and grad.data_ptr() == logits3.data_ptr()
    hold_on_bad = not launch.prob_target and rows > 0 and in_place
    if _empty_rows(logits3, target, ignore_index):
        row_loss.zero_()
        row_lse.fill_(float("-inf"))
        if grad is not None:
            grad.zero_()
        return row_loss, row_lse, row_loss.sum()
    # Out-of-range class indices are masked by the kernel, which writes one of them here.
    flag = torch.zeros(1, dtype=torch.int64, device=logits3.device)
    g = grad if grad is not None else logits3
    # Device-side, so nothing waits for it: nonzero when some target is invalid (see the module docstring).
    hold = flag
    if hold_on_bad:
        hold = ((target != ignore_index) & ((target < 0) | (target >= C))).any().to(torch.int32).reshape(1)
    cross_entropy_kernel[launch.grid(rows)](
        logits3, *strides3(logits3), target, *launch.target_strides, weight if weight is not None else row_loss,
        launch.weight_sum(weight, flag), g, *strides3(g), row_loss, row_lse, row_loss, flag, hold,
        grad_scale.to(logits3.device), row_loss, flag, flag, launch.params, inner, C, rows, ignore_index,
        MODE=WRITE_GRADIENT if grad is not None else LOSS_ONLY, WEIGHTED_MEAN=False, HOLD_ON_BAD=hold_on_bad,
        FINISH=False, REDUCTION=0, **launch.flags)
    if not launch.prob_target:
        raise_if_flagged(flag, lambda value: out_of_bounds(value, C, ignore_index))
    return row_loss, row_lse, row_loss.sum()


def _empty_rows(logits3, target, ignore_index) -> bool:
    """No row or no class: nothing to launch. Without classes every kept target is out of range (a host read, in
    this corner only)."""
    outer, C, inner = logits3.shape
    if not target.is_floating_point() and outer * inner > 0 and C == 0:
        bad = target != ignore_index
        if bool(bad.any()):
            raise out_of_bounds(int(target[bad.int().argmax()]), C, ignore_index)
    return outer * inner == 0 or C == 0


def cross_entropy_forward(*, input, target, weight, ignore_index, label_smoothing, lse_square_scale, softcap,
                          focal_gamma, reduction, weighted_mean):
    """The family route's forward: (loss, state). loss: one value per row ("none") or the reduced loss, in the
    accumulation dtype; state: what cross_entropy_backward needs (STATE_WIDTH values per row, then the mean's
    denominator). weighted_mean: the mean divides by the kept targets' weights (else by their count)."""
    logits3 = input
    outer, C, inner = logits3.shape
    rows = outer * inner
    launch = _RowLaunch(logits3, target, weight, None, label_smoothing, lse_square_scale, softcap, focal_gamma)
    row_loss = torch.empty(rows, dtype=launch.acc, device=logits3.device)
    state = torch.empty(rows * STATE_WIDTH + 1, dtype=launch.acc, device=logits3.device)
    if _empty_rows(logits3, target, ignore_index):
        state.zero_()
        row_loss.zero_()
        return _reduce_empty(row_loss, reduction), state
    loss = row_loss if reduction == "none" else torch.empty((), dtype=launch.acc, device=logits3.device)
    # The last program reduces the rows (a loss over probability targets without a reduction has nothing to finish).
    finish = not (launch.prob_target and reduction == "none")
    flag = torch.empty(2, dtype=torch.int64, device=logits3.device) if not launch.prob_target else None
    cross_entropy_kernel[launch.grid(rows)](
        logits3, *strides3(logits3), target, *launch.target_strides, weight if weight is not None else row_loss,
        launch.weight_sum(weight, row_loss), logits3, 0, 0, 0, row_loss, row_loss, state, row_loss, row_loss,
        row_loss, loss, flag if flag is not None else row_loss,
        finishing_tickets(logits3.device) if finish else row_loss, launch.params, inner, C, rows, ignore_index,
        MODE=SAVE_STATE, WEIGHTED_MEAN=weighted_mean and weight is not None, HOLD_ON_BAD=False, FINISH=finish,
        REDUCTION=REDUCTIONS[reduction], **launch.flags)
    if flag is not None:
        assert_targets_valid(flag, lambda row: out_of_bounds(int(target[row]), C, ignore_index))
    return loss, state


def _reduce_empty(row_loss, reduction):
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    return total if reduction == "sum" else total * float("nan")  # a mean over nothing


def cross_entropy_backward(*, input, target, weight, grad, state, grad_loss, ignore_index, label_smoothing,
                           lse_square_scale, softcap, focal_gamma, reduction):
    """Writes into `grad` the gradient of the loss cross_entropy_forward returned with this state, times grad_loss
    (one value, or one per row for reduction "none")."""
    logits3 = input
    outer, C, inner = logits3.shape
    rows = outer * inner
    if rows == 0 or C == 0:
        grad.zero_()
        return grad
    launch = _RowLaunch(logits3, target, weight, grad, label_smoothing, lse_square_scale, softcap, focal_gamma)
    grad_loss = grad_loss.reshape(-1).contiguous() if reduction == "none" else grad_loss.reshape(())
    cross_entropy_backward_kernel[launch.grid(rows)](
        logits3, *strides3(logits3), target, *launch.target_strides, weight if weight is not None else state,
        launch.weight_sum(weight, state), grad, *strides3(grad), state, grad_loss, launch.params, inner, C, rows,
        ignore_index, REDUCTION=REDUCTIONS[reduction], **launch.flags)
    return grad


def softcap_launch(input, softcap, grad=None):
    """(accumulation dtype, [softcap] options tensor, launch flags) for the kernels whose only float option is the
    softcap, over rows of input.shape[1] classes (the shard and token-statistics kernels)."""
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    params = float_options((float(softcap) if softcap is not None else 1.0,), acc, input.device)
    gather = input.stride(1) != 1 or (grad is not None and grad.stride(1) != 1)
    return acc, params, dict(SOFTCAP=softcap is not None, ACC=acc_dtype(input.dtype),
                             **launch_config(input.shape[1], acc=acc, gather=gather))


def out_of_bounds(value, C, ignore_index):
    return IndexError(f"Target {value} is out of bounds (number of classes is {C}, ignore_index is {ignore_index}).")


# --- ahead-of-time variants (triton_kernels/aot.py, tests/test_triton_aot.py) ------------------------------------

AOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
AOT_CLASSES = (10, 1000, 32000, 128256, 262144)
_WIDE = 1 << 31  # an integer argument from here on is specialised as i64


def aot_logits(dtype, classes, layout, wide):
    """An (outer, C, inner) view as the route passes it: classes last ("last"; "wide": rows 2^31 elements apart),
    a contiguous class-dim-1 tensor ("dim1"; "wide": inner positions so that C x inner passes 2^31), or class-last
    storage read as class-dim-1 ("transposed", the layout of F.cross_entropy(logits.transpose(1, 2), y))."""
    if layout == "last":
        rows = aot.meta(4, _WIDE + 16 if wide else classes, dtype=dtype)[:, :classes]
        return rows.unsqueeze(-1)
    inner = _WIDE // classes + 1 if wide else 48
    return aot.meta(2, classes, inner, dtype=dtype, order=(0, 2, 1) if layout == "transposed" else None)


def _aot_cross_entropy(dtype, classes, layout, wide, target, weight, smoothing, softcap, focal, grad,
                       reduction="mean"):
    logits3 = aot_logits(dtype, classes, layout, wide)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    outer, C, inner = logits3.shape
    labels = aot.meta(outer * inner, dtype=torch.int64) if target == "index" else torch.empty_like(logits3)
    common = dict(input=logits3, target=labels, weight=aot.meta(C, dtype=acc) if weight else None, ignore_index=-100,
                  label_smoothing=smoothing, lse_square_scale=1e-4, softcap=softcap, focal_gamma=focal)
    if grad == "saved state":
        return cross_entropy_forward, dict(common, reduction=reduction, weighted_mean=True)
    if grad.startswith("backward"):
        reduction = grad.split()[1]
        return cross_entropy_backward, dict(
            common, grad=torch.empty(logits3.shape, dtype=dtype, device="meta"),
            state=aot.meta(outer * inner * STATE_WIDTH + 1, dtype=acc), reduction=reduction,
            grad_loss=aot.meta(outer * inner if reduction == "none" else 1, dtype=acc))
    gradient = {"none": None, "separate": torch.empty(logits3.shape, dtype=dtype, device="meta"),
                "in place": logits3}[grad]
    return cross_entropy, dict(common, grad=gradient, grad_scale=aot.meta(dtype=acc))


def _focal_alone(case):
    # Softmax focal loss: class-index targets, no smoothing and no softcap (lossops.softmax_focal_loss).
    return case["focal"] is None or (case["target"] == "index" and not case["smoothing"] and case["softcap"] is None)


def aot_calls():
    """(host function, arguments) calls covering what the route passes these kernels (see triton_kernels/aot.py)."""
    shape = dict(dtype=AOT_DTYPES, classes=AOT_CLASSES, layout=("last", "dim1", "transposed"), wide=(False, True))
    options = dict(target=("prob", "index"), weight=(False, True), smoothing=(0.0, 0.1), softcap=(None, 30.0),
                   focal=(2.0, None), grad=("none", "separate", "in place", "saved state", "backward none",
                                            "backward mean"))
    heaviest = dict(target="index", weight=True, smoothing=0.1, softcap=30.0, focal=None, grad="in place")
    cases = aot.covering({**shape, **options}, _focal_alone, heaviest, ("dtype", "layout"))
    calls = [_aot_cross_entropy(**case) for case in cases]
    # The forward's last program finishes each reduction its own way (a probability-target loss per row has nothing
    # to finish): every one of them, with the row options that add most to the finish's live values.
    calls += [_aot_cross_entropy(dtype, 32000, "last", wide, target, True, 0.0, None, None, "saved state", reduction)
              for dtype in AOT_DTYPES for target in ("index", "prob") for reduction in ("none", "sum", "mean")
              for wide in (False, True) if not (target == "prob" and reduction == "none")]
    return calls
