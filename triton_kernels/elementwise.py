"""One Triton driver for every elementwise loss; same contract as csrc/elementwise.h.

A family module (focal.py, bce.py, regression.py) writes its per-element math as a @triton.jit function
    loss_fn(x, t, a, p0, p1) -> (loss, d loss / d x, d loss / d t)
(a: the auxiliary operand, pos_weight, 1 when absent; p0, p1: the family's parameters) and gets its kernel
entry point from kernel_function(loss_fn, parameter names) and its ahead-of-time compile cases from aot_kernels(loss_fn).
The driver passes loss_fn to elementwise_kernel as a tl.constexpr, so every family compiles to one fused
kernel: load, per-element weight, gradients scaled by the reduction, per-block partial sums (added up in
a fixed order by torch afterwards), all with int64 offsets.
"""
import inspect

import torch
import triton
import triton.language as tl

from .common import acc_dtype, float_options, launch_config, log1p, raise_if_flagged

# Elementwise work needs no large tiles: 4 warps streaming 2048 elements keep loads coalesced and wide.
MAX_ELEMENTWISE_BLOCK = 2048


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
    X, T, W, A, LOSS, GX, GT, PARTIAL, SCALE, PARAMS, BAD,
    n, C, ignore_index, w_inner, w_period, a_inner, a_period,
    LOSS_FN: tl.constexpr, INDEX_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_AUX: tl.constexpr,
    WRITE_LOSS: tl.constexpr, WRITE_GX: tl.constexpr, WRITE_GT: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
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
    a = tl.full([BLOCK], 1.0, ACC)
    if HAS_AUX:
        a = tl.load(A + (offs // a_inner) % a_period, mask=mask, other=1.0).to(ACC)
    loss, gx, gt = LOSS_FN(x, t, a, tl.load(PARAMS + 0).to(ACC), tl.load(PARAMS + 1).to(ACC))
    scale = tl.load(SCALE).to(ACC)
    if HAS_WEIGHT:
        w = tl.load(W + (offs // w_inner) % w_period, mask=mask, other=0.0).to(ACC)
        loss = loss * w
        scale = scale * w
    loss = tl.where(keep, loss, 0.0)
    tl.store(PARTIAL + pid, tl.sum(loss, axis=0))
    if WRITE_LOSS:
        tl.store(LOSS + offs, loss, mask=mask)
    if WRITE_GX:
        tl.store(GX + offs, tl.where(keep, gx * scale, 0.0).to(GX.dtype.element_ty), mask=mask)
    if WRITE_GT:
        tl.store(GT + offs, tl.where(keep, gt * scale, 0.0).to(GT.dtype.element_ty), mask=mask)


ELEMENTWISE_PARAMETERS = ("input", "target", "weight", "weight_layout", "aux", "aux_layout", "ignore_index",
                          "grad_input", "grad_target", "grad_scale", "per_element")
# loss_fn receives this many family parameters (p0, p1); a family with more needs a wider LOSS_FN signature.
MAX_FAMILY_PARAMETERS = 2


def kernel_function(loss_fn, parameters=()):
    """The family's kernel entry point: keyword arguments ELEMENTWISE_PARAMETERS, then the family's own
    `parameters` (passed to loss_fn as p0, p1 in this order), as the C++ kernel registers them."""
    parameters = tuple(parameters)
    if len(parameters) > MAX_FAMILY_PARAMETERS:
        raise ValueError(f"lossops: {loss_fn.__name__} declares {len(parameters)} parameters {parameters}; "
                         f"the elementwise driver passes at most {MAX_FAMILY_PARAMETERS}")

    def run(*, input, target, weight, weight_layout, aux, aux_layout, ignore_index, grad_input, grad_target,
            grad_scale, per_element, **family_parameters):
        if set(family_parameters) != set(parameters):
            raise TypeError(f"lossops: kernel {run.__name__} takes the parameters {parameters}, got "
                            f"{tuple(family_parameters)}")
        params = [float(family_parameters[p]) for p in parameters]
        n = input.numel()
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        loss = torch.empty(n if per_element else 0, dtype=acc, device=input.device)
        if n == 0:
            return loss, torch.zeros((), dtype=acc, device=input.device)
        index_target = not target.is_floating_point()
        cfg = launch_config(n, MAX_ELEMENTWISE_BLOCK)
        blocks = triton.cdiv(n, cfg["BLOCK"])
        partial = torch.empty(blocks, dtype=acc, device=input.device)
        bad = torch.zeros(1, dtype=torch.int64, device=input.device)
        params_t = float_options(tuple(params + [0.0] * (MAX_FAMILY_PARAMETERS - len(params))), acc, input.device)
        elementwise_kernel[(blocks,)](
            input, target, partial if weight is None else weight, partial if aux is None else aux, loss,
            input if grad_input is None else grad_input, input if grad_target is None else grad_target, partial,
            grad_scale.to(device=input.device, dtype=acc), params_t, bad,
            n, input.shape[-1] if index_target else 1, ignore_index, *weight_layout, *aux_layout,
            LOSS_FN=loss_fn, INDEX_TARGET=index_target, HAS_WEIGHT=weight is not None, HAS_AUX=aux is not None,
            WRITE_LOSS=per_element, WRITE_GX=grad_input is not None, WRITE_GT=grad_target is not None,
            ACC=acc_dtype(input.dtype), **cfg)
        if index_target:
            C = input.shape[-1]
            raise_if_flagged(bad, lambda value: IndexError(
                f"Target {value} is out of bounds (classes are 0..{C - 1}, {C} means background, "
                f"ignore_index is {ignore_index})."))
        return loss, partial.sum()

    run.__name__ = loss_fn.__name__.lstrip("_")
    keyword = inspect.Parameter.KEYWORD_ONLY
    run.__signature__ = inspect.Signature([inspect.Parameter(p, keyword) for p in ELEMENTWISE_PARAMETERS + parameters])
    return run




def aot_kernels(loss_fn, index_target=False, grad_target=False):
    """(kernel, signature, constexprs) cases for tests/test_triton_aot.py: bf16 and fp32 inputs, all operands."""
    cases = []
    for dtype in ("bf16", "fp32"):
        ptr = "*" + dtype
        sig = {"X": ptr, "T": "*i64" if index_target else ptr, "W": "*fp32", "A": "*fp32", "LOSS": "*fp32",
               "GX": ptr, "GT": ptr, "PARTIAL": "*fp32", "SCALE": "*fp32", "PARAMS": "*fp32", "BAD": "*i64",
               "n": "i64", "C": "i64", "ignore_index": "i64", "w_inner": "i64", "w_period": "i64",
               "a_inner": "i64", "a_period": "i64"}
        constexprs = {"LOSS_FN": loss_fn, "INDEX_TARGET": index_target, "HAS_WEIGHT": True, "HAS_AUX": True,
                      "WRITE_LOSS": True, "WRITE_GX": True, "WRITE_GT": grad_target, "ACC": tl.float32,
                      "BLOCK": MAX_ELEMENTWISE_BLOCK}
        cases.append((elementwise_kernel, {**sig, **{k: "constexpr" for k in constexprs}}, constexprs))
    return cases
