"""CTC loss for the Triton backend; same contract and gradient convention as csrc/ctc.cpp.

One program per sequence loops over time with the extended labels in one block. Alpha rows go to a global
workspace (N, T, BLOCK_L) so that the next row can read them shifted by one and two positions; beta needs two
rows. The gradient of time step t is formed right after its beta row: the posterior of each class is a masked
(BLOCK_C x BLOCK_L) reduction over the label positions, in a fixed order (no atomics), so results are
bitwise reproducible.
"""
import torch
import triton
import triton.language as tl

from .. import _checks

from . import aot
from .common import MAX_BLOCK, acc_dtype, launch_config, strided

# The label block's warps are sized as for a block this many label rows long (see _blocks).
LABEL_ROWS = 2

@triton.jit
def _log_add3(a, b, c):
    m = tl.maximum(a, tl.maximum(b, c))
    shift = tl.where(m == float("-inf"), 0.0, m)
    return shift + tl.log(tl.exp(a - shift) + tl.exp(b - shift) + tl.exp(c - shift))


@triton.jit
def ctc_kernel(
    LP, stride_t, stride_n, stride_c, TGT, OFF, IN_LEN, TGT_LEN, ALPHA, BETA, GRAD, SCALE, NLL,
    T, N, C, blank,
    ZERO_INFINITY: tl.constexpr, WRITE_GRAD: tl.constexpr, ACC: tl.constexpr, BLOCK_L: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    Tn = tl.load(IN_LEN + n)
    S = tl.load(TGT_LEN + n)
    off = tl.load(OFF + n)
    L = 2 * S + 1
    s = tl.arange(0, BLOCK_L)
    valid = s < L
    odd = (s % 2) == 1
    label = tl.where(odd & valid, tl.load(TGT + off + (s - 1) // 2, mask=odd & valid, other=0), blank)
    label_m2 = tl.load(TGT + off + (s - 3) // 2, mask=odd & (s >= 3) & valid, other=-1)
    skip_from_m2 = odd & (s >= 3) & valid & (label != label_m2)
    label_p2 = tl.load(TGT + off + (s + 1) // 2, mask=odd & (s + 2 < L), other=-1)
    skip_to_p2 = odd & (s + 2 < L) & (label != label_p2)
    row_base = LP + n * stride_n
    alpha_base = ALPHA + n * T * BLOCK_L
    neg = float("-inf")

    e = tl.load(row_base + label * stride_c, mask=valid & ((s * 0 + Tn) > 0), other=neg).to(ACC)
    tl.store(alpha_base + s, tl.where(valid & (s < 2), e, neg))
    for t in range(1, Tn):
        tl.debug_barrier()
        prev = alpha_base + (t - 1) * BLOCK_L
        a0 = tl.load(prev + s)
        a1 = tl.load(prev + s - 1, mask=s >= 1, other=neg)
        a2 = tl.load(prev + s - 2, mask=skip_from_m2, other=neg)
        e = tl.load(row_base + t * stride_t + label * stride_c, mask=valid, other=neg).to(ACC)
        tl.store(alpha_base + t * BLOCK_L + s, tl.where(valid, _log_add3(a0, a1, a2) + e, neg))
    tl.debug_barrier()
    # Row 0 is always written, so no input length needs a mask here (Tn = 0 is decided below): a mask that the
    # first row's load also uses would be kept live across the loop.
    last = tl.load(alpha_base + tl.maximum(Tn - 1, 0) * BLOCK_L + s, mask=valid, other=neg)
    final = tl.where((s == L - 1) | (s == L - 2), last, neg)
    top = tl.max(final, axis=0)
    shift = tl.where(top == neg, 0.0, top)
    nll = -(shift + tl.log(tl.sum(tl.exp(final - shift), axis=0)))
    nll = tl.where(Tn == 0, tl.where(S == 0, 0.0, float("inf")), nll)
    impossible = nll == float("inf")
    tl.store(NLL + n, tl.where(impossible & ZERO_INFINITY, 0.0, nll))

    if WRITE_GRAD:
        scale = tl.load(SCALE + n).to(ACC)
        for t in range(Tn, T):
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                tl.store(GRAD + (t * N + n) * C + cs, tl.zeros([BLOCK_C], ACC).to(GRAD.dtype.element_ty),
                         mask=cs < C)
        beta_base = BETA + n * 2 * BLOCK_L
        for i in range(0, Tn):
            t = Tn - 1 - i
            e = tl.load(row_base + t * stride_t + label * stride_c, mask=valid, other=neg).to(ACC)
            nxt = beta_base + ((i + 1) % 2) * BLOCK_L
            later = (s * 0 + i) > 0  # every step but the last one reads the beta row after it
            b0 = tl.load(nxt + s, mask=valid & later, other=neg)
            b1 = tl.load(nxt + s + 1, mask=(s + 1 < L) & later, other=neg)
            b2 = tl.load(nxt + s + 2, mask=skip_to_p2 & later, other=neg)
            first = tl.where(valid & ((s == L - 1) | (s == L - 2)), e, neg)
            b = tl.where(i == 0, first, tl.where(valid, _log_add3(b0, b1, b2) + e, neg))
            tl.debug_barrier()
            tl.store(beta_base + (i % 2) * BLOCK_L + s, b)
            alpha = tl.load(alpha_base + t * BLOCK_L + s, mask=valid, other=neg)
            term = alpha + b + nll - e
            # e = -inf makes term -inf + inf (NaN); the posterior's limit there is 0 (see csrc/ctc.cpp).
            post_s = tl.where(valid & (term != neg) & (e != neg), tl.exp(term), 0.0)
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                x = tl.load(row_base + t * stride_t + strided(cs, stride_c), mask=cs < C, other=0.0).to(ACC)
                match = label[None, :] == cs[:, None]
                post = tl.sum(tl.where(match, post_s[None, :], 0.0), axis=1)
                g = (tl.exp(x) - post) * scale
                g = tl.where(impossible, tl.where(ZERO_INFINITY, 0.0, float("nan")), g)
                tl.store(GRAD + (t * N + n) * C + cs, g.to(GRAD.dtype.element_ty), mask=cs < C)
            tl.debug_barrier()


def _blocks(C: int, S: int, acc: torch.dtype, gather: bool) -> dict:
    """The label block (the longest extended label sequence) and the (classes x labels) posterior tile, sized by
    launch_config like every other block: a longer label block leaves fewer classes per tile, down to one.
    gather: classes are strided in log_probs (each read through its own address). The label block's rows (alpha,
    beta, labels, transitions) stay live beside the tile, which therefore gets half the largest block; and the warps
    are at least those of a block of two label rows, so that a long label block (in float64, where each value takes
    two registers) does not put all its rows on a few threads."""
    block_l = max(16, triton.next_power_of_2(2 * S + 1))
    policy = dict(max_block=MAX_BLOCK // 2, acc=acc, gather=gather)
    tile = launch_config(block_l * max(C, 1), **policy)
    block_c = max(1, min(triton.next_power_of_2(max(C, 1)), tile["BLOCK"] // block_l))
    warps = max(launch_config(block_l * block_c, **policy)["num_warps"],
                launch_config(LABEL_ROWS * block_l, acc=acc)["num_warps"])
    return dict(BLOCK_L=block_l, BLOCK_C=block_c, num_warps=warps)


def ctc_loss(*, log_probs, targets, target_offsets, input_lengths, target_lengths, blank, zero_infinity, grad,
             grad_scale):
    """Same contract as the C++ kernel ctc_loss: returns [per-sequence nll] in the accumulation dtype."""
    T, N, C = log_probs.shape
    acc = torch.float64 if log_probs.dtype == torch.float64 else torch.float32
    nll = torch.empty(N, dtype=acc, device=log_probs.device)
    if N == 0:
        return [nll]
    if not 0 <= blank < C:
        raise RuntimeError(f"lossops: blank must be in [0, {C}), got {blank}")
    # Checked before the launch: the kernel masks its loads, but a bad value must be an error, not a number.
    # Only values inside a sequence count (padding may hold anything): a difference array marks them. On a GPU
    # the check is a device-side assertion, so the call never waits for the device (CUDA graphs can capture it).
    flat = targets.reshape(-1)
    if flat.numel():
        marks = torch.zeros(flat.numel() + 1, dtype=torch.int64, device=flat.device)
        marks.index_add_(0, target_offsets, torch.ones_like(target_offsets))
        marks.index_add_(0, target_offsets + target_lengths, -torch.ones_like(target_offsets))
        bad = (marks.cumsum(0)[:-1] > 0) & ((flat < 0) | (flat >= C))
        if not _checks.host_readable(flat):
            torch._assert_async(~bad.any(), f"lossops: a targets value is out of bounds for {C} classes")
        elif bool(bad.any()):
            raise IndexError(f"lossops: targets value {int(flat[bad][0])} is out of bounds for {C} classes")
    # The label block must hold the longest target: padded (N, S) targets bound it by S with no device round
    # trip; concatenated ones need the longest length from the device (one synchronisation).
    S = targets.shape[1] if targets.dim() == 2 else int(target_lengths.max())
    blocks = _blocks(C, S, acc, gather=log_probs.stride(2) != 1)
    block_l = blocks["BLOCK_L"]
    alpha = torch.empty((N, max(T, 1), block_l), dtype=acc, device=log_probs.device)
    beta = torch.empty((N, 2, block_l), dtype=acc, device=log_probs.device) if grad is not None else alpha
    ctc_kernel[(N,)](
        log_probs, *log_probs.stride(), flat if flat.numel() else target_offsets, target_offsets,
        input_lengths, target_lengths, alpha, beta, grad if grad is not None else alpha,
        grad_scale.to(device=log_probs.device, dtype=acc), nll, T, N, C, blank,
        ZERO_INFINITY=bool(zero_infinity), WRITE_GRAD=grad is not None, ACC=acc_dtype(log_probs.dtype),
        **blocks)
    return [nll]


def _aot_call(dtype, classes, label_length, layout, wide, grad, zero_infinity):
    """A ctc_loss call as the route makes it: (T, N, C) log-probabilities, contiguous or class-strided (a (N, C, T)
    tensor permuted), sequences 2^31 elements apart when wide (a view of a larger tensor); padded (N, S) targets."""
    steps, batch = 50, 8
    order = (2, 0, 1) if layout == "class-strided" else None
    log_probs = aot.meta(steps, batch, classes + ((1 << 31) if wide else 0), dtype=dtype, order=order)[..., :classes]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lengths = aot.meta(batch, dtype=torch.int64)
    return ctc_loss, dict(log_probs=log_probs, targets=aot.meta(batch, label_length, dtype=torch.int64),
                          target_offsets=lengths, input_lengths=lengths, target_lengths=lengths, blank=0,
                          zero_infinity=zero_infinity,
                          grad=torch.empty((steps, batch, classes), dtype=dtype, device="meta") if grad else None,
                          grad_scale=aot.meta(batch, dtype=acc))


def aot_calls():
    """(host, arguments) calls covering what the route passes ctc_kernel (see triton_kernels/aot.py)."""
    factors = dict(dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64), classes=(30, 1000, 32000),
                   label_length=(5, 100, 300), layout=("contiguous", "class-strided"), wide=(False, True),
                   grad=(False, True), zero_infinity=(False, True))
    cases = aot.covering(factors, lambda case: True, dict(grad=True), ("dtype", "label_length"))
    return [_aot_call(**case) for case in cases]
