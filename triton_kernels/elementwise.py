"""One Triton driver for every elementwise loss; same contract as csrc/elementwise.h.

A family module (focal.py, bce.py, regression.py) writes its per-element math as a @triton.jit function
    loss_fn(x, t, a, p0, p1) -> (loss, d loss / d x, d loss / d t)
(a: the auxiliary operand, pos_weight, 1 when absent; p0, p1: the family's parameters) and gets its kernel
entry point from kernel_function(loss_fn, parameter names) and its ahead-of-time calls from family_calls(entry point).
The driver passes loss_fn to elementwise_kernel as a tl.constexpr, so every family compiles to one fused
kernel: load, per-element weight, gradients scaled by the reduction, per-block partial sums (added up in
a fixed order by torch afterwards), all with int64 offsets.
"""
import inspect

import torch
import triton
import triton.language as tl

from . import aot
from .. import _checks
from .common import (REDUCTIONS, SCALE_GIVEN, acc_dtype, float_options, gradient_scale, immediate_checks,
                     launch_config, log1p, raise_if_flagged, reduce_in_last_program, reduction_outputs)

INT32_MAX = (1 << 31) - 1
# Elementwise work needs no large tiles: 4 warps streaming 1024 elements keep loads coalesced and 128 bits wide,
# and leave registers for the families' per-element math and the weights' broadcast indices.
MAX_ELEMENTWISE_BLOCK = 1024


@triton.jit
def logistic(x):
    """(sigmoid(x), sigmoid(-x), log1p(exp(-|x|))), each without overflow or cancellation."""
    e = tl.exp(-tl.abs(x))
    big = 1.0 / (1.0 + e)
    small = e / (1.0 + e)
    positive = x >= 0
    return tl.where(positive, big, small), tl.where(positive, small, big), log1p(e)


@triton.jit
def elementwise_kernel(
    X, T, W, A, LOSS, GX, GT, PARTIAL, SCALE, PARAMS, BAD, DEN, OUT, TICKETS,
    n, C, ignore_index, w_inner, w_period, a_inner, a_period,
    LOSS_FN: tl.constexpr, INDEX_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_AUX: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GX: tl.constexpr, WRITE_GT: tl.constexpr, ACC: tl.constexpr,
    INDEX_64: tl.constexpr, CHECK_UNIT: tl.constexpr, REDUCTION: tl.constexpr, BLOCK: tl.constexpr,
):
    # REDUCTION: SCALE_GIVEN (the gradients scaled by SCALE, the caller adds up the per-block sums in PARTIAL), or
    # one of REDUCTIONS: the gradients' scale formed from the mean's denominator DEN, and for a sum or a mean the
    # launch's last program adds up the blocks in a fixed order and stores the reduced loss in OUT.
    # Offsets, and the divisions that broadcast the operands, are 32-bit when every offset of the launch fits:
    # 64-bit division is a long software sequence per element that alone filled the registers.
    pid = tl.program_id(0)
    if INDEX_64:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # The gradients' scale: in float32 formed first, while nothing else is live; in float64, whose division (a mean's
    # 1/denominator) is a call, after the family's math, so that the call is not made beside its live values.
    if ACC != tl.float64:
        scale = gradient_scale(SCALE, DEN, REDUCTION, ACC)
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    keep = mask
    if INDEX_TARGET:
        # Element (row, c) of an (N, C) input has target 1 where index[row] == c; C is background.
        y = tl.load(T + offs // C, mask=mask, other=ignore_index)
        keep = mask & (y != ignore_index)
        tl.store(BAD + offs * 0, y, mask=keep & ((y < 0) | (y > C)))
        t = tl.where(y == offs % C, 1.0, 0.0).to(ACC)
    else:
        t = tl.load(T + offs, mask=mask, other=0.0).to(ACC)
    if CHECK_UNIT:
        # probabilities: a value outside [0, 1] (NaN included) flags its operand, 1 input, 2 target
        tl.store(BAD + offs * 0, tl.full([BLOCK], 1, tl.int64), mask=mask & ((x < 0) | (x > 1) | (x != x)))
        tl.store(BAD + offs * 0, tl.full([BLOCK], 2, tl.int64), mask=mask & ((t < 0) | (t > 1) | (t != t)))
    a = tl.full([BLOCK], 1.0, ACC)
    if HAS_AUX:
        a = tl.load(A + (offs // a_inner) % a_period, mask=mask, other=1.0).to(ACC)
    # The weight's broadcast index (a division and a remainder, software sequences where 64-bit) is formed before
    # the family's math, whose float64 divisions call a slow path that needs the registers.
    w = 1.0
    if HAS_WEIGHT:
        w = tl.load(W + (offs // w_inner) % w_period, mask=mask, other=0.0).to(ACC)
    loss, gx, gt = LOSS_FN(x, t, a, tl.load(PARAMS + 0).to(ACC), tl.load(PARAMS + 1).to(ACC))
    if ACC == tl.float64:
        scale = gradient_scale(SCALE, DEN, REDUCTION, ACC)
    if HAS_WEIGHT:
        loss = loss * w
        scale = scale * w
    loss = tl.where(keep, loss, 0.0)
    # The per-element stores come before the block's sum: what they store would otherwise stay live across the
    # reduction's shuffles and barrier, beside its partial sums.
    if WRITE_LOSS:
        tl.store(LOSS + offs, loss, mask=mask)
    if WRITE_GX:
        tl.store(GX + offs, tl.where(keep, gx * scale, 0.0).to(GX.dtype.element_ty), mask=mask)
    if WRITE_GT:
        tl.store(GT + offs, tl.where(keep, gt * scale, 0.0).to(GT.dtype.element_ty), mask=mask)
    tl.store(PARTIAL + pid, tl.sum(loss, axis=0))
    reduce_in_last_program(PARTIAL, tl.num_programs(0), DEN, OUT, TICKETS, REDUCTION, ACC)


ELEMENTWISE_PARAMETERS = ("input", "target", "weight", "weight_layout", "aux", "aux_layout", "ignore_index",
                          "grad_input", "grad_target", "grad_scale", "per_element")
# The Triton route's entry point (kernel_function's `reduced`): the reduction done in the launch.
REDUCED_PARAMETERS = ELEMENTWISE_PARAMETERS[:-2] + ("reduction", "denominator")
# loss_fn receives this many family parameters (p0, p1); a family with more needs a wider LOSS_FN signature.
MAX_FAMILY_PARAMETERS = 2


def kernel_function(loss_fn, parameters=(), probabilities=False):
    """The family's kernel entry point: keyword arguments ELEMENTWISE_PARAMETERS, then the family's own
    `parameters` (passed to loss_fn as p0, p1 in this order), as the C++ kernel registers them. probabilities:
    input and target must lie in [0, 1], as torch's binary_cross_entropy checks them (checked in the same pass)."""
    parameters = tuple(parameters)
    if len(parameters) > MAX_FAMILY_PARAMETERS:
        raise ValueError(f"lossops: {loss_fn.__name__} declares {len(parameters)} parameters {parameters}; "
                         f"the elementwise driver passes at most {MAX_FAMILY_PARAMETERS}")

    def launch(input, target, weight, weight_layout, aux, aux_layout, ignore_index, grad_input, grad_target,
               family_parameters, reduction, per_element, grad_scale=None, denominator=None):
        """(per-element loss or an empty tensor, per-block sums, reduced loss or None) for elementwise_kernel's
        REDUCTION `reduction`."""
        if set(family_parameters) != set(parameters):
            raise TypeError(f"lossops: kernel {run.__name__} takes the parameters {parameters}, got "
                            f"{tuple(family_parameters)}")
        params = [float(family_parameters[p]) for p in parameters]
        n = input.numel()
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        loss = torch.empty(n if per_element else 0, dtype=acc, device=input.device)
        cfg = launch_config(max(n, 1), MAX_ELEMENTWISE_BLOCK, acc)
        blocks = triton.cdiv(n, cfg["BLOCK"])
        partial = torch.empty(max(blocks, 1), dtype=acc, device=input.device)
        if n == 0:
            return loss, partial.zero_(), None
        out, tickets = reduction_outputs(reduction, acc, input.device, partial)
        index_target = not target.is_floating_point()
        flagged = index_target or probabilities
        bad = torch.zeros(1, dtype=torch.int64, device=input.device) if flagged else partial  # unread: nothing flags
        params_t = float_options(tuple(params + [0.0] * (MAX_FAMILY_PARAMETERS - len(params))), acc, input.device)
        elementwise_kernel[(blocks,)](
            input, target, partial if weight is None else weight, partial if aux is None else aux, loss,
            input if grad_input is None else grad_input, input if grad_target is None else grad_target, partial,
            partial if grad_scale is None else grad_scale.to(device=input.device, dtype=acc), params_t, bad,
            partial if denominator is None else denominator, out, tickets,
            n, input.shape[-1] if index_target else 1, ignore_index, *weight_layout, *aux_layout,
            LOSS_FN=loss_fn, INDEX_TARGET=index_target, HAS_WEIGHT=weight is not None, HAS_AUX=aux is not None,
            WRITE_LOSS=per_element, WRITE_GX=grad_input is not None, WRITE_GT=grad_target is not None,
            ACC=acc_dtype(input.dtype), INDEX_64=blocks * cfg["BLOCK"] > INT32_MAX, CHECK_UNIT=probabilities,
            REDUCTION=reduction, **cfg)
        if probabilities:
            _raise_if_not_probabilities(bad, input, target)
        if index_target:
            C = input.shape[-1]
            raise_if_flagged(bad, lambda value: IndexError(
                f"Target {value} is out of bounds (classes are 0..{C - 1}, {C} means background, "
                f"ignore_index is {ignore_index})."))
        return loss, partial, out if reduction in (1, 2) else None

    def run(*, input, target, weight, weight_layout, aux, aux_layout, ignore_index, grad_input, grad_target,
            grad_scale, per_element, **family_parameters):
        loss, partial, _ = launch(input, target, weight, weight_layout, aux, aux_layout, ignore_index, grad_input,
                                  grad_target, family_parameters, SCALE_GIVEN.value, per_element, grad_scale=grad_scale)
        return loss, partial.sum()

    def reduced(*, input, target, weight, weight_layout, aux, aux_layout, ignore_index, grad_input, grad_target,
                reduction, denominator, **family_parameters):
        """The route's call: the loss reduced as `reduction` says, the gradients scaled by the reduction (a mean's
        by 1/denominator, denominator a 0-d tensor in the accumulation dtype), in one launch and no other op."""
        code = REDUCTIONS[reduction]
        loss, partial, out = launch(input, target, weight, weight_layout, aux, aux_layout, ignore_index,
                                    grad_input, grad_target, family_parameters, code, code == 0,
                                    denominator=denominator)
        if code == 0:
            return loss
        if input.numel() == 0:  # nothing launched: the sum of nothing, and a mean over nothing as torch's
            return partial[0] if code == 1 else partial[0] / denominator
        return out

    run.__name__ = reduced.__name__ = loss_fn.__name__.lstrip("_")
    keyword = inspect.Parameter.KEYWORD_ONLY
    run.__signature__ = inspect.Signature([inspect.Parameter(p, keyword) for p in ELEMENTWISE_PARAMETERS + parameters])
    reduced.__signature__ = inspect.Signature([inspect.Parameter(p, keyword)
                                               for p in REDUCED_PARAMETERS + parameters])
    run.reduced = reduced
    return run


def _raise_if_not_probabilities(flag, input, target):
    """flag[0]: 0, or which operand (1 input, 2 target) holds a value outside [0, 1]. Read where that costs no sync
    (then the error names the first such value, found again on this error path only), a device-side assertion
    otherwise, as raise_if_flagged does for class indices."""
    if not (_checks.host_readable(flag) or immediate_checks(flag)):
        torch._assert_async(flag == 0, "lossops: all elements of input and target should be between 0 and 1")
        return
    code = int(flag[0])
    if code == 0:
        return
    name, values = (("input", input), ("target", target))[code - 1]
    flat = values.reshape(-1)
    index = int(((flat < 0) | (flat > 1) | flat.isnan()).nonzero()[0])
    raise RuntimeError(f"all elements of {name} should be between 0 and 1 (lossops: got {flat[index].item()} at "
                       f"flat index {index})")


def family_calls(host, index_target=False, has_aux=False, grad_target=False):
    """(host, arguments) calls covering what the route passes an elementwise family's kernel (its `reduced` entry,
    triton_kernels/aot.py): every dtype, a compact (C,) or (N, 1) weight (and aux operand, where the family has
    one), a materialised one, none; each reduction; the gradients it can ask for; element counts below and beyond
    2^31 (i32 and i64 specialisations)."""
    family = tuple(inspect.signature(host).parameters)[len(ELEMENTWISE_PARAMETERS):]
    classes = 80

    def call(dtype, wide, weight, aux, reduction, grad_input, grad_target):
        rows = (1 << 31) // classes + 16 if wide else 4096
        input = aot.meta(rows, classes, dtype=dtype)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        operands = {"none": (None, [1, 1]), "per class": (aot.meta(classes, dtype=acc), [1, classes]),
                    "per row": (aot.meta(rows, dtype=acc), [classes, rows]),
                    "per element": (aot.meta(rows * classes, dtype=acc), [1, rows * classes]),
                    # an aux operand of the input's shape and dtype, without a weight (lossops._elementwise)
                    "per element, input dtype": (aot.meta(rows * classes, dtype=dtype), [1, rows * classes])}
        w, w_layout = operands[weight]
        a, a_layout = operands[aux]
        return host.reduced, dict(
            input=input, target=aot.meta(rows, dtype=torch.int64) if index_target else torch.empty_like(input),
            weight=w, weight_layout=w_layout, aux=a, aux_layout=a_layout, ignore_index=-100,
            grad_input=torch.empty_like(input) if grad_input else None,
            grad_target=torch.empty_like(input) if grad_target else None, reduction=reduction,
            denominator=aot.meta(dtype=acc), **{name: 0.5 for name in family})

    layouts = ("none", "per class", "per row", "per element")
    factors = dict(dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64), wide=(False, True),
                   weight=layouts, aux=layouts + ("per element, input dtype",) if has_aux else ("none",),
                   reduction=("none", "sum", "mean"), grad_input=(False, True),
                   grad_target=(False, True) if grad_target else (False,))
    heaviest = dict(weight="per row", aux="per row" if has_aux else "none", reduction="mean", grad_input=True,
                    grad_target=grad_target)

    def valid(case):
        return case["aux"] != "per element, input dtype" or case["weight"] == "none"

    return [call(**case) for case in aot.covering(factors, valid, heaviest, ("dtype", "wide"))]

