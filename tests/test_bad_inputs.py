"""Bad and unusual inputs, for every op on every backend.

The table below is run for each op x backend. The contract is torch's behaviour on the same call:
- where torch raises, lossops raises too, and its message names the argument and the offending value
  (torch's own messages often do not, e.g. "expected scalar type Float but found Double");
- where torch returns, lossops returns the same values (NaN and Inf where torch has them), gradients
  and dtype, and warns when torch warns.
Checks lossops makes on purpose where torch has no such argument, or silently accepts nonsense, are
marked `ours_only` with the reason.

Ops: every loss family that declares `bad_inputs` (its kind of inputs, below) joins the table. Families without a
torch counterpart (the focal losses) have as oracle lossops' plain-PyTorch reference backend in float64,
itself checked against a transcription of torchvision's formula in their own tests. An op whose input is not any
real number (binary_cross_entropy's probabilities) sees a floating input through its declared case's link
(torch.sigmoid), on both sides: +-Inf and +-1e4 then reach it as exact 0 and 1.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Callable, Optional

import pytest
import torch
from torch.testing import assert_close

import lossops
from lossops._family import FAMILIES
from _cases import forward_backward, leaf_copies

BACKENDS = ("cpp", "triton", "reference")
N, C = 4, 5
NONFINITE = (float("nan"), float("inf"), float("-inf"))


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    kind: str  # "classes": (N, C, ...) logits and class targets; "elementwise": input and target alike
    torch_fn: Optional[Callable]  # None: the reference backend in float64 is the oracle
    link: Optional[Callable] = None  # applied to a floating input first (lossops._family.Case.link)

    def linked(self, input):
        return input if self.link is None or not input.is_floating_point() else self.link(input)

    def ours(self, input, *args, **kwargs):
        return getattr(lossops, self.name)(self.linked(input), *args, **kwargs)

    def oracle(self, input, *args, **kwargs):
        if self.torch_fn is not None:
            return self.torch_fn(self.linked(input), *args, **kwargs)
        with lossops.backend("reference"):
            return self.ours(input, *args, **kwargs)


# Every loss family that declares its kind of inputs for this table.
ALL_OPS = tuple(Op(name, family.bad_inputs, family.torch_fn, family.cases[0].link if family.cases else None)
                for name, family in FAMILIES.items() if family.bad_inputs)
OPS = ALL_OPS


@dataclasses.dataclass
class Call:
    """One call: leaf tensors ("input" and "target" positional, the rest keywords), options, and how the
    op sees each leaf (a transposed, expanded or sliced view of it); gradients are taken w.r.t. the leaves."""
    tensors: dict
    options: dict = dataclasses.field(default_factory=dict)
    views: dict = dataclasses.field(default_factory=dict)

    def bind(self, fn):
        names = list(self.tensors)

        def call(*leaves):
            seen = {n: self.views.get(n, lambda t: t)(t) for n, t in zip(names, leaves)}
            return fn(seen.pop("input"), seen.pop("target"), **seen, **self.options)
        return call


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Op], Call]
    kind: str = "any"  # which ops: "classes", "elementwise", "any", or a tuple of op names
    mentions: tuple = ()  # non-empty: an error is expected and its message must contain these
    exc: type = Exception  # the type lossops must raise where torch's type matters to callers
    ours_only: bool = False  # a check torch lacks (reason in a comment): the oracle is not consulted
    some_ops_accept: bool = False  # torch raises for some of the ops only: `mentions` applies where it does

    def applies_to(self, op: Op) -> bool:
        return self.kind in ("any", op.kind) or op.name in self.kind


def logits(*shape, requires_grad=True):
    return torch.randn(shape or (N, C)).requires_grad_(requires_grad)


def index_call(target, input=None, **options) -> Call:
    return Call({"input": logits() if input is None else input, "target": torch.as_tensor(target)}, options)


def labels(*values):
    """A class-index target of N entries: the given ones first, valid classes after them."""
    return torch.tensor(list(values) + [i % C for i in range(N - len(values))])


def elementwise_call(input=None, target=None, **extra) -> Call:
    x = logits() if input is None else input
    t = torch.rand(x.shape) if target is None else target
    tensors = {"input": x, "target": t, **{k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}}
    return Call(tensors, {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)})


def any_call(op: Op, **options) -> Call:
    return index_call(labels(), **options) if op.kind == "classes" else elementwise_call(**options)


def with_input(op: Op, x: torch.Tensor, **options) -> Call:
    """A call whose input is x: class targets for x's rows, or an elementwise target of x's shape."""
    if op.kind == "elementwise":
        return elementwise_call(x, **options)
    rows = x.shape[:1] + x.shape[2:]
    return index_call(torch.randint(0, max(x.shape[1], 1), rows), x, **options)


def nonfinite_rows() -> torch.Tensor:
    """Rows that are each one hazard: NaN, +-Inf at the target or elsewhere, all -Inf, +-1e4 mixed."""
    x = torch.randn(8, C)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")        # at the target (targets below are 0, 1, 2, ...)
    x[3, 0] = float("inf")        # elsewhere
    x[4, 1] = float("-inf")       # elsewhere: finite loss, zero probability
    x[5, 0] = float("-inf")       # at the target: infinite loss
    x[6] = float("-inf")
    x[7] = torch.tensor([1e4, -1e4, 1e4, -1e4, 0.0])
    return x.requires_grad_()


def nonfinite_elements() -> torch.Tensor:
    x = torch.randn(3, 4)
    x[0, :3] = torch.tensor(NONFINITE)
    x[1, :2] = torch.tensor([1e4, -1e4])
    return x.requires_grad_()


def _nonfinite(op: Op, reduction: str) -> Call:
    if op.kind == "classes":
        return index_call(torch.arange(8) % C, nonfinite_rows(), reduction=reduction)
    target = torch.rand(3, 4)
    if op.name not in PROBABILITY_TARGETS:  # regression targets are values: NaN/Inf ones propagate too
        target[2, :3] = torch.tensor(NONFINITE)
    x = nonfinite_elements()
    if op.link is not None:  # a NaN probability is an error there (case probability_input_nan)
        x = torch.nan_to_num(x.detach(), nan=0.0).requires_grad_()
    return elementwise_call(x, target, reduction=reduction)


def _empty(op: Op, reduction: str) -> Call:
    if op.kind == "classes":
        return index_call(torch.zeros(0, dtype=torch.long), logits(0, C), reduction=reduction)
    return elementwise_call(logits(0, C), reduction=reduction)


def _views(op: Op, layout: str) -> Call:
    """Input (and target) laid out non-contiguously; the op must see torch's values and grads."""
    base = {
        "transposed": lambda: logits(C, N),
        "sliced": lambda: logits(2 * N, C + 3),
        "expanded": lambda: logits(1, C),
        "channels_last": lambda: logits(2, 3, C),  # (N, d, C) seen as (N, C, d): class stride 1
    }[layout]()
    view = {
        "transposed": lambda t: t.t(),
        "sliced": lambda t: t[::2, 1:C + 1],
        "expanded": lambda t: t.expand(N, C),
        "channels_last": lambda t: t.permute(0, 2, 1),
    }[layout]
    call = with_input(op, view(base.detach()))
    call.tensors["input"] = base
    call.views["input"] = view
    if op.kind == "elementwise":  # the target gets the same treatment
        call.tensors["target"] = torch.rand(base.shape)
        call.views["target"] = view
    elif layout == "sliced":
        call.tensors["target"] = torch.randint(0, C, (2 * N,))
        call.views["target"] = lambda t: t[::2]
    return call


def _on_meta(op: Op, name: str) -> Call:
    call = any_call(op)
    call.tensors[name] = call.tensors[name].detach().to("meta")
    return call


def _weight_call(op: Op, weight: torch.Tensor, name="weight") -> Call:
    call = any_call(op)
    call.tensors[name] = weight
    return call


REDUCTIONS = ("none", "mean", "sum")
PROBABILITY_TARGETS = ("binary_cross_entropy_with_logits", "sigmoid_focal_loss", "binary_cross_entropy")
# Where lossops computes a stable form on purpose and torch's formula overflows to inf, and its gradient to NaN
# (docs/differences-from-torch.md): on non-finite inputs the oracle is the reference backend, which computes the
# same form and is checked against torch on finite values.
STABLE_FORMS = ("soft_margin_loss",)
# torch refuses a target that requires grad there (the others differentiate it, or give it no gradient)
TARGET_NOT_DIFFERENTIABLE = ("soft_margin_loss",)
LAYOUTS = ("transposed", "sliced", "expanded", "channels_last")
CLASS_WEIGHT = {"cross_entropy": "weight", "softmax_focal_loss": "alpha"}

CASES = (
    # ---- class-index targets
    Case("target_equal_to_C", lambda op: index_call(labels(0, C)), "classes", ("target", str(C)), IndexError),
    Case("target_negative", lambda op: index_call(labels(0, -1)), "classes", ("target", "-1"), IndexError),
    Case("target_huge", lambda op: index_call(labels(2 ** 40)), "classes", ("target", str(2 ** 40)), IndexError),
    Case("target_sentinel_not_ignored", lambda op: index_call(labels(-100), ignore_index=2), "classes",
         ("target", "-100"), IndexError),
    Case("target_ignored_even_if_out_of_range", lambda op: index_call(labels(-7, 3), ignore_index=-7), "classes"),
    Case("target_float_for_indices", lambda op: index_call(labels().float()), "classes", ("target", "float32")),
    Case("target_int32", lambda op: index_call(labels().int()), "classes", ("target", "int32")),
    Case("target_uint8", lambda op: index_call(labels().to(torch.uint8)), "classes"),
    Case("target_bool", lambda op: index_call(labels().bool()), "classes", ("target", "bool")),
    Case("target_int_probabilities", lambda op: index_call(torch.ones(N, C, dtype=torch.long)), "classes",
         ("target", f"({N}, {C})")),
    Case("target_batch_mismatch", lambda op: index_call(labels()[:N - 1]), "classes", ("target", str(N - 1)),
         ValueError),
    Case("target_extra_dim", lambda op: index_call(labels()[:, None]), "classes", ("target", f"({N}, 1)")),
    Case("target_probabilities_wrong_shape", lambda op: index_call(torch.rand(N, C + 1)), "classes",
         ("target", f"({N}, {C + 1})")),
    Case("probabilities_with_ignore_index", lambda op: index_call(torch.rand(N, C), ignore_index=1),
         ("cross_entropy",), ("ignore_index", "1")),
    Case("zero_classes_with_a_target", lambda op: index_call(torch.zeros(3, dtype=torch.long), logits(3, 0)),
         "classes", ("target", "0"), IndexError),
    Case("target_0d_for_1d_input", lambda op: index_call(torch.tensor(2), logits(C)), "classes"),
    Case("target_probabilities_double", lambda op: index_call(torch.rand(N, C, dtype=torch.float64)),
         ("cross_entropy",)),
    *(Case(f"all_targets_ignored_{r}", lambda op, r=r: index_call(torch.full((N,), -100), reduction=r), "classes")
      for r in REDUCTIONS),
    *(Case(f"zero_classes_all_ignored_{r}",
           lambda op, r=r: index_call(torch.full((3,), -100), logits(3, 0), reduction=r), "classes")
      for r in REDUCTIONS),
    *(Case(f"zero_classes_probabilities_{r}", lambda op, r=r: index_call(torch.rand(3, 0), logits(3, 0),
                                                                        reduction=r), ("cross_entropy",))
      # torch's mean here is nan only because it counts rows as numel / C = 0 / 0; 3 rows of loss 0 have
      # mean 0, which the kernels return: "mean" is left out rather than copying that.
      for r in ("none", "sum")),
    # ---- elementwise targets
    Case("target_shape_mismatch", lambda op: elementwise_call(target=torch.rand(N, C + 1)), "elementwise",
         ("target", f"{N}, {C + 1}")),
    # torch: an error for BCE, a warning and broadcasting for the regression losses
    Case("target_broadcast", lambda op: elementwise_call(target=torch.rand(N, 1)), "elementwise",
         ("target", f"{N}, 1"), some_ops_accept=True),
    Case("target_int64", lambda op: elementwise_call(target=torch.randint(0, 2, (N, C))), "elementwise",
         ("target", "int64"), some_ops_accept=True),
    # torch: huber_loss alone requires matching dtypes; the others promote
    Case("target_double", lambda op: elementwise_call(target=torch.rand(N, C, dtype=torch.float64)), "elementwise",
         ("target", "torch.float64"), some_ops_accept=True),
    Case("pos_weight_wrong_length", lambda op: _weight_call(op, torch.ones(C + 1), "pos_weight"),
         ("binary_cross_entropy_with_logits",), ("pos_weight", str(C + 1))),
    Case("pos_weight_on_meta", lambda op: _weight_call(op, torch.ones(C, device="meta"), "pos_weight"),
         ("binary_cross_entropy_with_logits",), ("pos_weight", "meta")),
    Case("weight_not_broadcastable", lambda op: _weight_call(op, torch.ones(C + 1)),
         ("binary_cross_entropy_with_logits",), ("weight", str(C + 1))),
    Case("weight_broadcast_row", lambda op: _weight_call(op, torch.rand(C)), ("binary_cross_entropy_with_logits",)),
    # probabilities: torch checks every value of input and target (a NaN one too)
    Case("probability_input_nan", lambda op: elementwise_call(torch.tensor([[0.5, float("nan")]]).requires_grad_(),
                                                              torch.rand(1, 2)),
         ("binary_cross_entropy",), ("input",), RuntimeError),
    Case("probability_target_above_1", lambda op: elementwise_call(target=torch.rand(N, C) + 0.5),
         ("binary_cross_entropy",), ("target",), RuntimeError),
    Case("probability_target_nan", lambda op: elementwise_call(target=torch.full((N, C), float("nan"))),
         ("binary_cross_entropy",), ("target",), RuntimeError),
    Case("probability_weight_broadcast_column", lambda op: _weight_call(op, torch.rand(N, 1)),
         ("binary_cross_entropy",)),
    Case("probability_weight_not_broadcastable", lambda op: _weight_call(op, torch.ones(C + 1)),
         ("binary_cross_entropy",), ("weight", str(C + 1))),
    # ---- every op
    Case("input_int64", lambda op: with_input(op, torch.randint(0, 3, (N, C))), "any", ("input", "int64"),
         some_ops_accept=True),  # smooth_l1, l1 and mse take integer inputs
    Case("target_on_meta", lambda op: _on_meta(op, "target"), "any", ("target", "meta")),
    Case("input_on_meta", lambda op: _on_meta(op, "input"), "any", ("input", "meta")),
    Case("reduction_misspelt", lambda op: any_call(op, reduction="avg"), "any", ("reduction", "avg"), ValueError),
    *(Case(f"nonfinite_{r}", lambda op, r=r: _nonfinite(op, r)) for r in REDUCTIONS),
    *(Case(f"empty_{r}", lambda op, r=r: _empty(op, r)) for r in REDUCTIONS),
    Case("single_element", lambda op: with_input(op, logits(1, 1))),
    *(Case(f"layout_{layout}", lambda op, layout=layout: _views(op, layout)) for layout in LAYOUTS),
    # ---- options
    Case("label_smoothing_above_1", lambda op: index_call(labels(), label_smoothing=1.5), ("cross_entropy",),
         ("label_smoothing", "1.5")),
    # torch ignores a negative label_smoothing without a word; lossops refuses it.
    Case("label_smoothing_negative", lambda op: index_call(labels(), label_smoothing=-0.1), ("cross_entropy",),
         ("label_smoothing", "-0.1"), ours_only=True),
    Case("lse_square_scale_negative", lambda op: index_call(labels(), lse_square_scale=-1.0), ("cross_entropy",),
         ("lse_square_scale", "-1"), ours_only=True),
    Case("softcap_negative", lambda op: index_call(labels(), softcap=-2.0), ("cross_entropy",),
         ("softcap", "-2"), ours_only=True),
    Case("softcap_zero", lambda op: index_call(labels(), softcap=0.0), ("cross_entropy",), ("softcap", "0"),
         ours_only=True),
    Case("beta_negative", lambda op: any_call(op, beta=-1.0), ("smooth_l1_loss",), ("beta", "-1")),
    Case("beta_zero_is_l1", lambda op: any_call(op, beta=0.0), ("smooth_l1_loss",)),
    # L1's convention at NaN too: torch's gradient there is sign(NaN) = 0
    Case("beta_zero_nonfinite", lambda op: dataclasses.replace(_nonfinite(op, "none"), options={"beta": 0.0}),
         ("smooth_l1_loss",)),
    Case("delta_zero", lambda op: any_call(op, delta=0.0), ("huber_loss",), ("delta", "0")),
    Case("delta_negative", lambda op: any_call(op, delta=-1.0), ("huber_loss",), ("delta", "-1")),
    # Focal losses (no torch counterpart): gamma is an exponent of a probability, alpha a class balance.
    Case("gamma_negative", lambda op: any_call(op, gamma=-1.0), ("sigmoid_focal_loss", "softmax_focal_loss"),
         ("gamma", "-1"), ours_only=True),
    Case("gamma_below_one", lambda op: any_call(op, gamma=0.5),
         ("sigmoid_focal_loss", "softmax_focal_loss")),
    Case("alpha_above_one", lambda op: any_call(op, alpha=1.5), ("sigmoid_focal_loss",)),  # torchvision takes it
    Case("alpha_negative_disables", lambda op: any_call(op, alpha=-1.0), ("sigmoid_focal_loss",)),
    # ---- per-class weights (cross_entropy's weight, softmax focal's alpha tensor)
    *(Case(case_id, lambda op, make=make: _weight_call(op, make(), CLASS_WEIGHT[op.name]), tuple(CLASS_WEIGHT),
           mentions) for case_id, make, mentions in (
        ("class_weight_too_short", lambda: torch.ones(C - 1), ("{weight}", f"({C - 1},)")),
        ("class_weight_2d", lambda: torch.ones(1, C), ("{weight}", f"(1, {C})")),
        ("class_weight_int", lambda: torch.ones(C, dtype=torch.long), ("{weight}", "int64")),
        ("class_weight_on_meta", lambda: torch.ones(C, device="meta"), ("{weight}", "meta")),
        ("class_weight_strided", lambda: torch.rand(2 * C)[::2], ()),
    )),
    Case("class_weight_double", lambda op: _weight_call(op, torch.ones(C, dtype=torch.float64)), ("cross_entropy",),
         ("weight", "float64")),
    # ---- tensors that require grad besides the input: torch either differentiates or refuses
    Case("probability_target_requires_grad", lambda op: index_call(torch.rand(N, C, requires_grad=True)),
         ("cross_entropy",)),
    Case("class_weight_requires_grad", lambda op: _weight_call(op, torch.rand(C, requires_grad=True),
                                                               CLASS_WEIGHT[op.name]),
         ("cross_entropy",), ("weight",)),
    Case("target_requires_grad", lambda op: elementwise_call(target=torch.rand(N, C, requires_grad=True)),
         tuple(op.name for op in ALL_OPS if op.kind == "elementwise" and op.name not in TARGET_NOT_DIFFERENTIABLE)),
    Case("target_requires_grad_not_differentiable",
         lambda op: elementwise_call(target=torch.rand(N, C, requires_grad=True)), TARGET_NOT_DIFFERENTIABLE,
         ("target",), RuntimeError),
    Case("weights_require_grad", lambda op: elementwise_call(weight=torch.rand(C, requires_grad=True),
                                                             pos_weight=torch.rand(C, requires_grad=True)),
         ("binary_cross_entropy_with_logits",), ("weight",)),  # torch 2.13: not differentiable w.r.t. weight
)


@dataclasses.dataclass
class Outcome:
    error: Optional[Exception] = None
    out: Optional[torch.Tensor] = None
    grads: tuple = ()
    warned: bool = False


def run(fn, leaves) -> Outcome:
    """Forward and backward (random upstream gradient); an exception in either counts as raising."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out, grads = forward_backward(fn, leaves)
        except Exception as e:  # noqa: BLE001 - which exception is what the caller compares
            return Outcome(error=e)
    return Outcome(out=out, grads=tuple(grads), warned=any(issubclass(w.category, UserWarning) for w in caught))


def fresh(tensors: dict, dtype=None) -> list:
    return leaf_copies([t.detach().requires_grad_(t.requires_grad) for t in tensors.values()], dtype)


def assert_names_it(error: Exception, mentions: tuple, op: Op):
    message = str(error)
    for needle in mentions:
        needle = needle.format(weight=CLASS_WEIGHT.get(op.name, "weight"))
        assert re.search(re.escape(needle), message, re.IGNORECASE), f"{needle!r} not named in: {message!r}"


PARAMS = [pytest.param(op, case, backend, id=f"{op.name}-{case.id}-{backend}")
          for op in OPS for case in CASES if case.applies_to(op) for backend in BACKENDS]


@pytest.mark.parametrize("op, case, backend", PARAMS)
def test_behaves_like_torch(op, case, backend):
    call = case.make(op)
    with lossops.backend(backend):
        ours = run(call.bind(op.ours), fresh(call.tensors))
    if case.ours_only:
        assert ours.error is not None, f"{case.id}: lossops accepted it"
        assert isinstance(ours.error, case.exc), repr(ours.error)
        assert_names_it(ours.error, case.mentions, op)
        return

    oracle = op.oracle
    if op.name in STABLE_FORMS and case.id.startswith("nonfinite"):
        oracle = dataclasses.replace(op, torch_fn=None).oracle
    theirs = run(call.bind(oracle), fresh(call.tensors))
    if theirs.error is not None:
        assert ours.error is not None, f"torch raised {theirs.error!r}; lossops returned {ours.out}"
        assert isinstance(ours.error, case.exc), repr(ours.error)
        assert case.mentions, f"torch raised {theirs.error!r}: the table must say what the message names"
        assert_names_it(ours.error, case.mentions, op)
        return
    if ours.error is not None:
        raise AssertionError(f"torch accepted this call, lossops raised {ours.error!r}") from ours.error
    assert not case.mentions or case.some_ops_accept, "torch accepted a call the table expects it to reject"

    # Values against the same oracle in float64, so that only lossops' rounding is measured.
    truth = run(call.bind(oracle), fresh(call.tensors, torch.float64))
    assert ours.out.dtype == theirs.out.dtype and ours.out.shape == theirs.out.shape
    assert ours.warned == theirs.warned, f"torch warned: {theirs.warned}, lossops warned: {ours.warned}"
    assert_close(ours.out.double(), truth.out, rtol=2e-5, atol=2e-6, equal_nan=True)
    for name, ours_grad, true_grad in zip(call.tensors, ours.grads, truth.grads):
        assert (ours_grad is None) == (true_grad is None), name
        if ours_grad is not None:
            assert_close(ours_grad.double(), true_grad, rtol=2e-5, atol=2e-6, equal_nan=True, msg=name)


def test_every_op_of_the_table_is_known():
    """The table names ops by string: a renamed export would silently drop its rows."""
    families = {"cross_entropy", "softmax_focal_loss", "sigmoid_focal_loss", "binary_cross_entropy_with_logits",
                "smooth_l1_loss", "huber_loss", "l1_loss", "mse_loss"}
    assert families <= {op.name for op in ALL_OPS}
    families = {op.name for op in ALL_OPS}
    assert "cross_entropy" in {op.name for op in OPS}
    for case in CASES:
        if isinstance(case.kind, tuple):
            assert set(case.kind) <= families, case.id
