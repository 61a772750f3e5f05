"""Differential fuzzing against torch.

hypothesis draws shapes (dims of 1, odd sizes, class counts that are no multiple of any block or vector
width, vocabularies up to 256k on the C++ backend), dtypes, option combinations and values (ordinary,
+-1e4 mixed into rows, +-inf and NaN mixed into rows), and every loss and gradient is compared with:
- the float64 truth: torch (or, for the focal losses, which torch lacks, lossops' plain-PyTorch reference
  backend) on the same values in float64;
- torch's own result in the same dtype: lossops must be no further from the truth than torch is (plus
  rounding slack), and must have NaN/Inf exactly where torch has them.

Profiles: "ci" (default; derandomized, ~120 examples in all, no example database) and "long"
(LOSSOPS_FUZZ_PROFILE=long or `pytest --fuzz-long`; 25x the examples, random). Show how many examples ran
with `--hypothesis-show-statistics`.

Triton runs under the interpreter on CPU: tiny shapes, few examples. Ops other than cross_entropy join as
lossops exports them (see test_bad_inputs.OPS).

Torch behaviour not copied (documented where the strategies avoid it):
- an ignored row whose log_softmax is NaN (a NaN logit, all -inf) gets a NaN gradient from torch
  (NaN times its zero upstream gradient); lossops gives every ignored row a zero gradient.
Found in lossops by this fuzzing and fixed: log-probabilities formed as x - lse (wrong low bits for logits
near 1e4), a NaN logit dropped from the row max (loss -inf instead of NaN), and the target-class gradient
A p - c cancelling for p -> 1 with z-loss (csrc/softmax_rows.h).
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import lossops
from _cases import leaf_copies, lowp_error_no_worse
from test_bad_inputs import KINDS, OPS, Op
from test_cross_entropy import torch_loss

LONG = os.environ.get("LOSSOPS_FUZZ_PROFILE", "ci") == "long"
settings.register_profile("ci", deadline=None, database=None, derandomize=True, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("long", deadline=None, database=None, derandomize=False, print_blob=True,
                          suppress_health_check=list(HealthCheck))


def examples(ci: int):
    """hypothesis settings for a test that runs `ci` examples in CI and 25x as many in the long profile."""
    return settings(settings.get_profile("long" if LONG else "ci"), max_examples=ci * 25 if LONG else ci)


DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
VALUE_MODES = ("normal", "wide", "extreme", "nonfinite")
CLASS_OPS = tuple(op for op in OPS if op.kind == "classes" and op.name != "cross_entropy")
ELEMENTWISE_OPS = tuple(op for op in OPS if "elementwise" in KINDS[op.kind].groups)
# ops of several operands (test_bad_inputs.KINDS): drawn through their kind
OPERAND_OPS = tuple(op for op in OPS if op.kind not in ("classes", "elementwise", "multilabel"))
# Class counts around the C++ block (2048) and vector widths (8/16), and Triton's power-of-two tiles.
AWKWARD_CLASSES = (1, 2, 3, 7, 15, 17, 31, 33, 127, 129, 2047, 2049, 4095, 4097, 8191, 8193)


def values(draw, shape, dtype) -> torch.Tensor:
    """Logits of one of VALUE_MODES, drawn through a seed (hypothesis picks the hazards, torch the bulk)."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    mode = draw(st.sampled_from(VALUE_MODES))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * (30.0 if mode == "wide" else 3.0)
    hazards = {"extreme": (1e4, -1e4), "nonfinite": (float("inf"), float("-inf"), float("nan"), 1e4)}.get(mode)
    if hazards and x.numel():
        where = torch.rand(shape, generator=gen) < draw(st.sampled_from((0.05, 0.3)))
        pick = torch.randint(0, len(hazards), shape, generator=gen)
        x = torch.where(where, torch.tensor(hazards, dtype=torch.float64)[pick], x)
    note(f"values: {mode}")
    return x.to(dtype)


@st.composite
def class_problems(draw, op: Op, max_classes: int, max_elements: int, dtypes=DTYPES, min_classes=1):
    """(input, target, options) for a loss over the class dimension."""
    dtype = draw(st.sampled_from(dtypes))
    awkward = [c for c in AWKWARD_CLASSES if min_classes <= c <= max_classes]
    C = draw(st.one_of(st.integers(min_classes, max_classes), st.sampled_from(awkward or [max_classes])))
    rows = max(1, min(9, max_elements // C))
    layout = draw(st.sampled_from(("(C)", "(N,C)", "(N,C)", "(N,C,d...)")))
    if layout == "(C)":
        shape = (C,)
    elif layout == "(N,C)":
        shape = (draw(st.integers(1, rows)), C)
    else:
        shape = (draw(st.integers(1, rows)), C) + tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    x = values(draw, shape, dtype)
    item_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    options = {"reduction": draw(st.sampled_from(("none", "mean", "sum")))}
    probabilities = op.name == "cross_entropy" and draw(st.booleans())
    if probabilities:
        logits = torch.randn(shape, generator=gen, dtype=torch.float64) * draw(st.sampled_from((0.5, 5.0)))
        target = logits.softmax(1 if len(shape) > 1 else 0).to(dtype)
    else:
        target = torch.randint(0, C, item_shape, generator=gen)
        ignored = draw(st.sampled_from((0.0, 0.0, 0.3, 1.0)))
        if ignored:
            options["ignore_index"] = draw(st.sampled_from((-100, -1, 0, C - 1)))
            target = torch.where(torch.rand(item_shape, generator=gen) < ignored, options["ignore_index"], target)
            # Torch discrepancy, not copied: an ignored row whose log_softmax is NaN (a NaN logit, all -inf)
            # gets a NaN gradient in torch (NaN * its zero upstream gradient); lossops gives it 0, as for
            # every ignored row. Ignored rows are kept finite here so that torch's NaN is not demanded.
            ignored_rows = (target == options["ignore_index"]).unsqueeze(1 if x.dim() > 1 else 0)
            x = torch.where(ignored_rows & ~torch.isfinite(x), torch.zeros((), dtype=x.dtype), x)
    weight_name = "alpha" if op.name == "softmax_focal_loss" else "weight"
    weight_kind = draw(st.sampled_from(("none", "none", "positive", "with_zeros")))
    if op.name == "nll_loss" and options["reduction"] == "mean" and weight_kind == "with_zeros":
        # Torch discrepancy, not copied (docs/differences-from-torch.md): a mean whose kept targets all weigh 0 has
        # a NaN loss and a zero gradient in lossops, a NaN gradient in torch; tests/test_nll.py checks it.
        weight_kind = "positive"
    if weight_kind != "none":
        w = 0.1 + 2 * torch.rand(C, generator=gen, dtype=torch.float64)
        if weight_kind == "with_zeros":
            w = torch.where(torch.rand(C, generator=gen) < 0.5, 0.0, w)
        options[weight_name] = w.to(dtype)
    if op.name == "cross_entropy":
        if draw(st.booleans()):
            options["label_smoothing"] = draw(st.sampled_from((0.1, 0.5, 1.0)))
        # Not with a mean that may divide by a zero total weight: torch_loss's z-term is then +-inf/0 beside a
        # 0/0 cross-entropy term (nan), where lossops' one division gives inf.
        if draw(st.booleans()) and not (weight_kind == "with_zeros" and options["reduction"] == "mean"):
            options["lse_square_scale"] = draw(st.sampled_from((1e-4, 1e-2)))
        if draw(st.booleans()):
            options["softcap"] = draw(st.sampled_from((0.5, 15.0, 30.0)))
    elif op.name == "softmax_focal_loss":
        options["gamma"] = draw(st.sampled_from((0.0, 0.5, 1.0, 2.0, 3.3)))
    return x, target, options


@st.composite
def elementwise_problems(draw, ops, max_elements: int, dtypes=DTYPES):
    """(op, input, target, options) for an elementwise loss."""
    op = draw(st.sampled_from(ops))
    if op.name == "binary_cross_entropy":
        # float16: the input gradient is written in forward before grad_output scales it, and 1 / (x (1 - x))
        # passes float16's range first where torch's grad * (x - t) / ... does not (docs/differences-from-torch.md)
        dtypes = tuple(d for d in dtypes if d != torch.float16)
    dtype = draw(st.sampled_from(dtypes))
    if max_elements > 40_000 and draw(st.booleans()):  # long enough for several reduction chunks
        shape = (draw(st.integers(40_000, max_elements)),)
    else:
        shape = tuple(draw(st.lists(st.integers(1, 9), min_size=KINDS[op.kind].min_dims, max_size=4)))
        while torch.Size(shape).numel() > max_elements and len(shape) > KINDS[op.kind].min_dims:
            shape = shape[1:]
    x = values(draw, shape, dtype)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    options = {"reduction": draw(st.sampled_from(("none", "mean", "sum")))}
    if op.name == "soft_margin_loss":
        # torch's log1p(exp(-y x)) overflows to inf past exp's range where lossops' softplus stays finite
        # (docs/differences-from-torch.md): ±1 targets, as torch documents, and inputs within that range
        limit = 0.9 * math.log(torch.finfo(dtype).max)
        x = torch.where(torch.isfinite(x), x.clamp(-limit, limit), x)
        target = (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(dtype)
    elif op.name in ("binary_cross_entropy_with_logits", "sigmoid_focal_loss", "binary_cross_entropy"):
        target = torch.rand(shape, generator=gen, dtype=torch.float64)
        if draw(st.booleans()):
            target = target.round()
        target = target.to(dtype)
    else:
        target = values(draw, shape, dtype)
    last = shape[-1:] if shape else ()
    if op.name == "binary_cross_entropy_with_logits":
        for name in ("weight", "pos_weight"):
            if draw(st.booleans()):
                options[name] = (3 * torch.rand(last, generator=gen, dtype=torch.float64)).to(dtype)
    elif op.name == "sigmoid_focal_loss":
        options["alpha"] = draw(st.sampled_from((-1.0, 0.0, 0.25, 1.0)))
        options["gamma"] = draw(st.sampled_from((0.0, 0.5, 1.0, 2.0, 3.3)))
    elif op.name == "smooth_l1_loss":
        options["beta"] = draw(st.sampled_from((0.0, 1e-3, 0.5, 1.0, 3.0)))
    elif op.name == "huber_loss":
        options["delta"] = draw(st.sampled_from((1e-3, 0.5, 1.0, 3.0)))
    return op, x, target, options


def run(fn, leaves, grad_output):
    out = fn(*leaves)
    wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_output.to(out.dtype), allow_unused=True) if out.requires_grad else ()
    return out.detach(), [g.detach() for g in grads]


def assert_like_torch(ours, same, truth, what, nonfinite_from_truth=False, floor=0.0):
    """NaN/Inf exactly where torch's same-dtype result has them (or, for ops torch lacks, where the float64
    truth has them); elsewhere no further from the truth than the same-dtype oracle, up to rounding slack
    relative to max(|truth|, floor)."""
    assert ours.dtype == same.dtype and ours.shape == same.shape, (what, ours.dtype, same.dtype)
    pattern = truth.to(ours.dtype) if nonfinite_from_truth else same
    # Where torch's own dtype overflows an intermediate (inf - inf: NaN) the float64 truth, rounded once to the
    # dtype, may be +-inf or finite: that value, or one within an ulp of it (a kernel that accumulates in float32
    # rounds its bf16/fp16 gradient from a rounded intermediate), is never worse than torch's, so it is accepted.
    rounded = truth.to(ours.dtype)
    ulp = (torch.nextafter(rounded, torch.full_like(rounded, math.inf)) - rounded).abs()
    correctly_rounded = ((ours == rounded) | (ours.isnan() & rounded.isnan())
                         | (torch.isfinite(rounded) & ((ours - rounded).abs() <= ulp)))
    finite = torch.isfinite(pattern)
    nonfinite = ~finite & ~(torch.isfinite(truth) & correctly_rounded)
    torch.testing.assert_close(ours[nonfinite], pattern[nonfinite], equal_nan=True, msg=what)
    assert torch.isfinite(ours[finite]).all(), f"{what}: lossops non-finite where the oracle is finite"
    comparable = finite & torch.isfinite(truth)
    baseline = torch.where(torch.isfinite(same), same, truth.to(same.dtype))[comparable]
    truth = truth[comparable]
    # Below the smallest normal number rounding is absolute (fp16: 6e-8 for gradients of a long mean).
    floor = max(floor, torch.finfo(ours.dtype).smallest_normal)
    if truth.numel():  # a stand-in element of the natural scale, where the truth is all ~0
        truth, baseline = torch.cat([truth, truth.new_full((1,), floor)]), torch.cat([baseline, baseline.new_full(
            (1,), floor)])
        ours = torch.cat([ours[comparable], ours.new_full((1,), floor)])
    else:
        ours = ours[comparable]
    # float64: torch's result is the truth itself, so any other formula differs by more than rounding (the
    # Triton kernels' own tanh, for softcap, is good to ~1e-12, ample for gradcheck); float32 gets 4 ulps;
    # bf16/fp16 round their output once more than torch does.
    slack = {torch.float64: 1e5, torch.float32: 4.0}.get(ours.dtype, 1.0)
    lowp_error_no_worse(ours, baseline, truth, what, slack_ulps=slack)


def compare(ours_fn, oracle_fn, input, target, options, torch_has_op=True, softmax_rows=0,
            names=("input", "target")):
    """ours_fn against oracle_fn on the same values, in the same dtype and in float64 (the truth). names: the first
    two arguments' names (the others are passed by the names options gives them).

    softmax_rows: for losses over a softmax, the number of rows, which sets their natural scale: they round
    log(sum(exp)) near 1 even where the truth is 0 (one class: p = 1), so their error is judged against a
    scale of at least 1 per row, and grad_output / rows for the gradient. Losses over rows whose gradient is a
    difference of unit-scale terms (normalised rows, distances' directions) pass it too: a row of one feature
    cancels them to a true 0 that either side rounds."""
    tensors = {names[0]: input.requires_grad_(), names[1]: target, **{k: v for k, v in options.items()
                                                                     if isinstance(v, torch.Tensor)}}
    scalars = {k: v for k, v in options.items() if not isinstance(v, torch.Tensor)}

    def call(fn):
        return lambda i, t, *rest: fn(i, t, **dict(zip(list(tensors)[2:], rest)), **scalars)

    leaves = list(tensors.values())
    with torch.no_grad():
        out_shape = call(oracle_fn)(*[t.detach() for t in leaves]).shape
    grad_output = torch.randn(out_shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_output = grad_output.to(input.dtype)  # one upstream gradient, exactly representable in every dtype
    ours = run(call(ours_fn), leaf_copies(leaves), grad_output)
    same = run(call(oracle_fn), leaf_copies(leaves), grad_output)
    truth = run(call(oracle_fn), leaf_copies(leaves, torch.float64), grad_output.double())
    loss_floor, grad_floor = (1.0, grad_output.abs().max().item() / softmax_rows) if softmax_rows else (0.0, 0.0)
    assert_like_torch(ours[0], same[0], truth[0], "loss", not torch_has_op, loss_floor)
    assert len(ours[1]) == len(truth[1])
    for i, (g, g_same, g_true) in enumerate(zip(ours[1], same[1], truth[1])):
        assert_like_torch(g, g_same, g_true, f"gradient of {list(tensors)[i]}", not torch_has_op, grad_floor)


def _with_backend(backend, fn):
    def call(*args, **kwargs):
        with lossops.backend(backend):
            return fn(*args, **kwargs)
    return call


def check_class_op(op: Op, backend: str, problem):
    x, target, options = problem
    note(f"{op.name} {tuple(x.shape)} {x.dtype} target {target.dtype} {options}")
    oracle = torch_loss if op.name == "cross_entropy" else op.oracle
    rows = max(1, x.numel() // x.shape[1 if x.dim() > 1 else 0]) if x.numel() else 1
    compare(_with_backend(backend, op.ours), oracle, x, target, options, torch_has_op=op.torch_fn is not None,
            softmax_rows=rows)


CE = next(op for op in OPS if op.name == "cross_entropy")


@examples(50)
@given(problem=class_problems(CE, max_classes=600, max_elements=6000))
def test_cross_entropy_cpp(problem):
    check_class_op(CE, "cpp", problem)


@examples(6)
@given(problem=class_problems(CE, max_classes=262_144, max_elements=2 * 262_144, min_classes=100_000,
                              dtypes=(torch.float32, torch.bfloat16)))
def test_cross_entropy_large_vocabulary_cpp(problem):
    check_class_op(CE, "cpp", problem)


@examples(10)
@given(problem=class_problems(CE, max_classes=40, max_elements=80))
def test_cross_entropy_triton(problem):
    check_class_op(CE, "triton", problem)


# The tests below exist once lossops exports the ops they fuzz (no placeholder skips before that).
if CLASS_OPS:
    @pytest.mark.parametrize("backend, budget, max_classes", [("cpp", 12, 300), ("triton", 4, 24)])
    @pytest.mark.parametrize("op", CLASS_OPS, ids=lambda op: op.name)
    def test_class_losses(op, backend, budget, max_classes):
        @examples(budget)
        @given(problem=class_problems(op, max_classes=max_classes, max_elements=4 * max_classes))
        def fuzz(problem):
            check_class_op(op, backend, problem)
        fuzz()


if ELEMENTWISE_OPS:
    @pytest.mark.parametrize("backend, budget, max_elements", [("cpp", 30, 80_000), ("triton", 8, 48)])
    def test_elementwise_losses(backend, budget, max_elements):
        _fuzz_elementwise(backend, budget, max_elements)


def _kl_div_as_documented(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """torch's kl_div with the one difference docs/differences-from-torch.md states: a class the target gives no
    mass (probability 0, or log-probability -inf) contributes 0 whatever the input holds there, where torch forms
    0 * log 0 and 0 * inf products (NaN when the input is infinite there, or the log-target -inf)."""
    absent = target == (float("-inf") if log_target else 0)
    terms = torch.where(absent, 0, torch.nn.functional.kl_div(input, target, reduction="none", log_target=log_target))
    if reduction == "none":
        return terms
    if reduction == "batchmean":
        return terms.sum() / (input.shape[0] if input.dim() else 1)
    return terms.sum() if reduction == "sum" else terms.mean()


# Oracles for the ops whose documented semantics differ from torch's on some inputs.
DOCUMENTED_ORACLES = {"kl_div": _kl_div_as_documented}


def _fuzz_elementwise(backend, budget, max_elements):
    @examples(budget)
    @given(problem=elementwise_problems(ELEMENTWISE_OPS, max_elements))
    def fuzz(problem):
        op, x, target, options = problem
        note(f"{op.name} {tuple(x.shape)} {x.dtype} {options}")
        compare(_with_backend(backend, op.ours), DOCUMENTED_ORACLES.get(op.name, op.oracle), x, target, options,
                torch_has_op=op.torch_fn is not None)
    fuzz()


@st.composite
def operand_problems(draw, op: Op, max_elements: int):
    """(first operand, second operand, {the others by name, options}) for an op of several operands: rows of awkward
    widths, the kind's other operands made to fit, its hazard operands drawn as the first one is, and one of the
    family's declared option sets."""
    kind = KINDS[op.kind]
    dtype = draw(st.sampled_from(DTYPES if kind.low_precision else (torch.float32, torch.float64)))
    width = draw(st.one_of(st.integers(1, 40), st.sampled_from([c for c in AWKWARD_CLASSES if c <= max_elements])))
    rows = draw(st.integers(1, max(1, min(9, max_elements // width))))
    shape = (width,) if kind.min_dims < 2 and draw(st.booleans()) else (rows, width)
    first = values(draw, shape, dtype)
    operands = kind.others(first)
    for name in kind.hazards:
        operands[name] = values(draw, shape, dtype)
    for name, value in operands.items():
        if value.is_floating_point():
            operands[name] = value.detach().to(dtype).requires_grad_(value.requires_grad)
    options = {"reduction": draw(st.sampled_from(("none", "mean", "sum")))}
    if op.declared_options and draw(st.booleans()):
        options.update({k: v for k, v in draw(st.sampled_from(op.declared_options)).items() if k != "reduction"})
    second = kind.operands[1]
    return first, operands.pop(second), {**operands, **options}


if OPERAND_OPS:
    @pytest.mark.parametrize("backend, budget, max_elements", [("cpp", 12, 2000), ("triton", 4, 48)])
    @pytest.mark.parametrize("op", OPERAND_OPS, ids=lambda op: op.name)
    def test_losses_of_several_operands(op, backend, budget, max_elements):
        @examples(budget)
        @given(problem=operand_problems(op, max_elements))
        def fuzz(problem):
            first, second, options = problem
            note(f"{op.name} {tuple(first.shape)} {first.dtype} {options}")
            rows = first.numel() // first.shape[-1] if first.dim() > 1 else 1
            compare(_with_backend(backend, op.ours), op.oracle, first, second, options,
                    softmax_rows=rows if KINDS[op.kind].min_dims else 0, names=KINDS[op.kind].operands[:2])
        fuzz()
