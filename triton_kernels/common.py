"""Shared @triton.jit helpers and the launch-configuration policy for every lossops Triton kernel.

Only tl.exp / tl.log are used for transcendental functions: libdevice is not available under Triton's
interpreter (TRITON_INTERPRET=1), which is how these kernels are tested without a GPU.
"""
import functools

import torch
import triton
import triton.language as tl

from .. import _backend, _checks
from . import aot

# Largest class/element tile a program holds in registers at once; larger rows are looped over. The same under the
# interpreter, so the tests take the GPU's multi-block path (C > MAX_BLOCK, its last block partly masked).
MAX_BLOCK = 8192
# Values a thread holds per block: the warps grow with the block to keep it at this. Each value's per-element terms
# (softcap, weights, smoothing, the gradient) are live at once, so twice as many values per thread put the
# option-heavy variants at one block per SM or into spills (docs/triton-kernels.md). float64 values take two
# registers each: half as many per thread, in a quarter of the tile.
VALUES_PER_THREAD = 16
FLOAT64_BLOCK_DIVISOR = 4
MIN_WARPS = 4
# A program of several rows holds this fraction of those values per thread: each row also carries its own statistics
# and coefficients (a dozen values, with their logs and exps), and at the full 16 a 128-row tile took up to 240
# registers.
ROW_TILE_DIVISOR = 4
MAX_WARPS = 16


def launch_config(n: int, max_block: int = MAX_BLOCK, acc: torch.dtype = torch.float32, gather: bool = False,
                  operands: int = 1, rows: bool = False) -> dict:
    """Block size and warp count for a loop over n elements accumulated in `acc`: the one place this policy lives
    (docs/triton-kernels.md has the registers and occupancy of every variant it produces).

    gather: the elements are strided (a class-dim-1 layout), so each one is loaded or stored through its own 64-bit
    address instead of one vector per thread: half the block, or the addresses alone fill the registers (in float64,
    where value and address take two registers each, half the values per thread as well).

    operands: how many rows of n elements each step reads together (a student's and a teacher's logits): each one's
    per-element values are live at once, so a 32-bit tile and its values per thread shrink by that factor (a
    float64 tile is a quarter of one already).

    rows: the n elements are one row of a row kernel, which also gets ROWS, the rows a program takes (a power of
    two): rows shorter than the smallest program's tile (MIN_WARPS warps, ROW_TILE_DIVISOR times fewer values per
    thread) are taken several per program, so that a small class count is neither a program per few bytes nor a
    block of idle threads."""
    double = acc == torch.float64
    if double:
        max_block //= FLOAT64_BLOCK_DIVISOR
    else:
        max_block //= operands
    if gather:
        max_block //= 2
    block = min(triton.next_power_of_2(max(int(n), 1)), max_block)
    block = max(block, 16)
    per_thread = VALUES_PER_THREAD // (2 if double else operands) // (2 if double and gather else 1)
    config = {"BLOCK": block}
    tile = block
    if rows:
        config["ROWS"] = max(1, MIN_WARPS * 32 * per_thread // ROW_TILE_DIVISOR // block)
        tile = block * config["ROWS"]
    config["num_warps"] = min(max(tile // (32 * per_thread), MIN_WARPS), MAX_WARPS)
    return config


def acc_dtype(torch_dtype):
    """Accumulation dtype: float64 inputs accumulate in float64 (gradcheck), the rest in float32."""
    return tl.float64 if torch_dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=64)
def float_options(values: tuple, acc, device):
    """Float kernel options as a device tensor in the accumulation dtype (scalar kernel arguments are fp32).

    Cached: a fresh host-to-device copy per call would sync and cannot be captured in a CUDA graph.
    """
    return torch.tensor(values, dtype=acc, device=device)


_DEVICE_MESSAGE = ("lossops: a class index in target is out of bounds (lossops.set_target_checks('immediate') raises "
                   "an IndexError naming it)")


def immediate_checks(flag) -> bool:
    """Whether the "immediate" target-check mode reads a kernel's flag on the host (lossops.set_target_checks)."""
    return _backend.target_checks() == "immediate" and not (
        flag.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def raise_if_flagged(flag, out_of_bounds):
    """flag[0] holds an offending target written by a kernel, or 0 when there was none (the kernels only flag
    values that cannot be valid, and 0 always is); out_of_bounds(value) builds the exception to raise.

    Where reading the flag costs a host sync (device memory) the check is a device-side assertion instead, as in
    torch's CUDA losses: nothing waits for it and it can be captured in a CUDA graph. The "immediate" target-check
    mode (lossops.set_target_checks) reads it anyway, outside a capture, for an IndexError naming the value."""
    if not (_checks.host_readable(flag) or immediate_checks(flag)):
        torch._assert_async(flag == 0, _DEVICE_MESSAGE)
        return
    value = int(flag[0])
    if value != 0:
        raise out_of_bounds(value)


def assert_targets_valid(flag, out_of_bounds):
    """flag = [1 if every target is valid else 0, the first invalid target's position], written by a kernel;
    out_of_bounds(position) builds the exception to raise. Checked as raise_if_flagged checks its flag: a device-side
    assertion where reading it would synchronise, an exception naming the value where it does not (or in the
    "immediate" target-check mode, outside a CUDA graph capture)."""
    if not (_checks.host_readable(flag) or immediate_checks(flag)):
        torch._assert_async(flag[0], _DEVICE_MESSAGE)
        return
    if int(flag[0]) == 0:
        raise out_of_bounds(int(flag[1]))


_TICKETS: dict = {}


def finishing_tickets(device) -> torch.Tensor:
    """The one-element int32 counter a kernel's programs take tickets from (last_program) to let the last one of
    them finish the launch's work (a reduction over what the others wrote) in the same launch. The last program
    sets it back to 0, so one zeroed counter serves every launch on a stream, in stream order; launches on other
    streams could overlap, so each stream has its own. Inside a CUDA-graph capture a fresh zeroed counter is made
    in the graph's memory, so every replay starts from 0 whatever ran before."""
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            return torch.zeros(1, dtype=torch.int32, device=device)
        key = (device, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device, None)
    tickets = _TICKETS.get(key)
    if tickets is None:
        tickets = _TICKETS[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return tickets


# Reductions as kernels take them (a constexpr REDUCTION).
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}
# A REDUCTION for a kernel that can also be handed its gradients' scale, the reduction then left to the caller.
SCALE_GIVEN = tl.constexpr(-1)
# Values the finishing program of a launch adds per step (last_program).
FINISH_BLOCK = tl.constexpr(1024)


@triton.jit
def last_program(TICKETS, programs):
    """Whether this program is the launch's last to get here (see finishing_tickets): every store this program made
    before the call is visible to that one. The barrier orders every thread's stores before the ticket, whose
    acquire-release atomic publishes them at GPU scope; the last program reads the others' results with L1-bypassing
    loads (.cg) after it, and resets the counter."""
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKETS, 1, sem="acq_rel", scope="gpu")
    last = ticket == programs - 1
    if last:
        tl.atomic_xchg(TICKETS, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def sum_in_order(VALUES, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """VALUES[0] + ... + VALUES[n - 1], added in the same order on every run, for a launch's last program: read past
    L1 (.cg), which may hold lines from before the other programs' stores."""
    total = tl.zeros((), ACC)
    for start in range(0, n, BLOCK):
        i = start + tl.arange(0, BLOCK)
        total += tl.sum(tl.load(VALUES + i, mask=i < n, other=0.0, cache_modifier=".cg").to(ACC), axis=0)
    return total


@triton.jit
def reciprocal_or_zero(denominator):
    """1 / denominator, 0 where that is not finite (a mean over nothing): lossops._reduce.gradient_scale's rule. In
    float32 the division is the full-range approximate one (within 2 ulp): the correctly rounded one's slow path is a
    call, whose stack frame is local memory in every program; float64 keeps the correctly rounded division."""
    scale = tl.fdiv(tl.full((), 1.0, denominator.dtype), denominator)
    return tl.where(tl.abs(scale) < float("inf"), scale, 0.0)


@triton.jit
def gradient_scale(SCALE, DEN, REDUCTION: tl.constexpr, ACC: tl.constexpr):
    """What a kernel taking a REDUCTION (SCALE_GIVEN or one of REDUCTIONS) multiplies its gradients by: SCALE[0] as
    given, 1/DEN[0] for a mean (see reciprocal_or_zero), 1 otherwise."""
    if REDUCTION == SCALE_GIVEN:
        scale = tl.load(SCALE).to(ACC)
    elif REDUCTION == 2:
        scale = reciprocal_or_zero(tl.load(DEN).to(ACC))
    else:
        scale = tl.full((), 1.0, ACC)
    return scale


@triton.jit
def reduce_in_last_program(VALUES, n, DEN, OUT, TICKETS, REDUCTION: tl.constexpr, ACC: tl.constexpr):
    """For a sum or a mean (REDUCTION 1 or 2): the launch's last program adds up VALUES[0..n), which every program
    has stored its share of, in a fixed order, and stores the sum, or the mean over DEN[0], in OUT."""
    if REDUCTION >= 1:
        if last_program(TICKETS, tl.num_programs(0)):
            total = sum_in_order(VALUES, n, ACC, FINISH_BLOCK)
            if REDUCTION == 2:
                total = total / tl.load(DEN).to(ACC)
            tl.store(OUT, total)


def reduction_outputs(reduction: int, acc: torch.dtype, device, unused: torch.Tensor):
    """(OUT, TICKETS) for a kernel finishing `reduction` (a REDUCTIONS code or SCALE_GIVEN) in its last program:
    a fresh 0-d output and the stream's ticket counter for a sum or a mean, `unused` for both otherwise."""
    if reduction in (REDUCTIONS["sum"], REDUCTIONS["mean"]):
        return torch.empty((), dtype=acc, device=device), finishing_tickets(device)
    return unused, unused


# Elements a program of scale_gradient_kernel scales.
SCALE_BLOCK = 2048


@triton.jit
def scale_gradient_kernel(G, GRAD_OUTPUT, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """G *= grad_output in place. A grad_output of 1 (what loss.backward() passes) reads and writes nothing more: the
    test is made on the device by every program, so no host read is needed to skip the pass."""
    scale = tl.load(GRAD_OUTPUT).to(ACC)
    if scale != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask).to(ACC)
        tl.store(G + offs, (g * scale).to(G.dtype.element_ty), mask=mask)


def aot_calls():
    """(host function, arguments) calls covering what the route passes scale_gradient_kernel (triton_kernels/aot.py)."""
    calls = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for n in (4096, (1 << 31) + 16):  # i32 and i64 element counts
            calls.append((scale_gradient, dict(grad=aot.meta(n, dtype=dtype), grad_output=aot.meta(dtype=acc))))
    return calls


def scale_gradient(*, grad, grad_output):
    """grad (contiguous) times the one-element grad_output, in place, without a pass when grad_output is 1."""
    n = grad.numel()
    if n:
        scale_gradient_kernel[(triton.cdiv(n, SCALE_BLOCK),)](grad, grad_output, n, ACC=acc_dtype(grad.dtype),
                                                              BLOCK=SCALE_BLOCK, num_warps=4)
    return grad


@triton.jit
def strided(index, stride):
    """index * stride as a 64-bit offset. A class index is 32-bit, and so is a stride below 2^31 once Triton
    specialises it: their product wraps for class-dim-1 layouts (the class stride is the inner size, and
    128256 classes x 16744 positions pass 2^31) unless it is formed in 64 bits."""
    return index.to(tl.int64) * stride


@triton.jit
def expm1(x):
    # Kahan's trick: the rounding error of exp(x) cancels in (u - 1) * x / log(u).
    u = tl.exp(x)
    um1 = u - 1.0
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, um1 * x / tl.log(u)))


@triton.jit
def log1p(x):
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def tanh(x):
    # tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|)): (1 - e) / (1 + e) cancels near 0, and a truncated odd series
    # there (with float literals, which are float32 constants) is only float32-accurate, ~1e-9 off in float64.
    ax = tl.abs(x)
    m = expm1(-2.0 * ax)
    t = -m / (2.0 + m)
    return tl.where(x < 0, -t, t)


@triton.jit
def softplus_neg_abs(x):
    """log(1 + exp(-|x|)), the stable core of softplus and log-sigmoid."""
    return log1p(tl.exp(-tl.abs(x)))


@triton.jit
def pow_nonneg(base, exponent):
    """base ** exponent for base >= 0, exponent >= 0, with 0 ** 0 = 1 and no NaN from log(0)."""
    safe = tl.where(base > 0, base, 1.0)
    powered = tl.exp(exponent * tl.log(safe))
    return tl.where(base > 0, powered, tl.where(exponent == 0, 1.0, 0.0))


@triton.jit
def softcap(x, cap):
    return cap * tanh(x / cap)
