"""Bad and unusual inputs, for every op on every backend.

The table below is run for each op x backend. The contract is torch's behaviour on the same call:
- where torch raises, lossops raises too, and its message names the argument and the offending value
  (torch's own messages often do not, e.g. "expected scalar type Float but found Double");
- where torch returns, lossops returns the same values (NaN and Inf where torch has them), gradients
  and dtype, and warns when torch warns.
Checks lossops makes on purpose where torch has no such argument, or silently accepts nonsense, are
marked `ours_only` with the reason.

Ops: every loss family that declares `bad_inputs` (its kind of inputs: KINDS below) joins the table. A kind says how
its ops are called (their tensor operands in order, and how the others are made to fit the first), which layouts
they take and which shared cases apply; the family's declared cases add their option sets (which must behave as
torch's) and their bad options (which must raise as torch's). Families without a
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
from lossops.losses.multilabel_margin import label_lists
from _cases import forward_backward, leaf_copies

BACKENDS = ("cpp", "triton", "reference")
N, C = 4, 5
NONFINITE = (float("nan"), float("inf"), float("-inf"))


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    kind: str  # a key of KINDS
    torch_fn: Optional[Callable]  # None: the reference backend in float64 is the oracle
    link: Optional[Callable] = None  # applied to a floating input first (lossops._family.Case.link)
    declared_options: tuple = ()  # the family's declared cases' keyword arguments: calls torch must accept
    declared_bad: tuple = ()  # the family's declared bad keyword arguments: calls torch must refuse

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
# A declared case's options are torch's where it names torch's function (others may add lossops' own options).
ALL_OPS = tuple(Op(name, family.bad_inputs, family.torch_fn, family.cases[0].link if family.cases else None,
                   tuple(dict(c.kwargs) for c in family.cases
                         if c.kwargs and (c.torch_fn is not None or family.torch_fn is None)),
                   tuple(bad for c in family.cases for bad in c.bad if isinstance(bad, dict)))
                for name, family in FAMILIES.items() if family.bad_inputs)
OPS = ALL_OPS


@dataclasses.dataclass
class Call:
    """One call: leaf tensors (those named in `positional` passed in that order, the rest as keywords), options,
    and how the op sees each leaf (a transposed, expanded or sliced view of it); gradients are taken w.r.t. the
    leaves."""
    tensors: dict
    options: dict = dataclasses.field(default_factory=dict)
    views: dict = dataclasses.field(default_factory=dict)
    positional: tuple = ("input", "target")

    def bind(self, fn):
        names = list(self.tensors)

        def call(*leaves):
            seen = {n: self.views.get(n, lambda t: t)(t) for n, t in zip(names, leaves)}
            options = dict(self.options)  # a positional operand given as a number is an option here
            positional = [seen.pop(n) if n in seen else options.pop(n) for n in self.positional]
            return fn(*positional, **seen, **options)
        return call


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Op], Call]
    # which ops: "any", a kind or a group of kinds (Kind.groups), a tuple of op names, or a predicate on the op
    kind: object = "any"
    # non-empty: an error is expected and its message must contain these ("{first}" / "{second}": the kind's
    # first / second operand's name, "{weight}": the op's class weight)
    mentions: tuple = ()
    exc: type = Exception  # the type lossops must raise where torch's type matters to callers
    ours_only: bool = False  # a check torch lacks (reason in a comment): the oracle is not consulted
    some_ops_accept: bool = False  # torch raises for some of the ops only: `mentions` applies where it does

    def applies_to(self, op: Op) -> bool:
        if callable(self.kind):
            return self.kind(op)
        if isinstance(self.kind, tuple):
            return op.name in self.kind
        return self.kind == "any" or self.kind in KINDS[op.kind].groups


LAYOUTS = ("transposed", "sliced", "expanded", "channels_last")


def signs(*shape) -> torch.Tensor:
    """A target of +-1 (float), as torch documents the sign targets."""
    return (torch.randint(0, 2, shape) * 2 - 1).float()


@dataclasses.dataclass(frozen=True)
class Kind:
    """How the ops of one kind are called: their tensor operands in positional order (the first is what a model
    produces, (N, C) in the shared cases), how the others are made to fit a given first one, and which shared
    layouts and hazards apply to them."""
    operands: tuple[str, ...]
    others: Callable[[torch.Tensor], dict]  # the first operand -> the other operands by name
    groups: tuple[str, ...] = ()  # the kinds whose cases this kind joins (its own included)
    like_first: tuple[str, ...] = ()  # operands of the first one's shape: laid out as it is in the layout cases
    per_row: tuple[str, ...] = ()  # one entry per row of the first operand: sliced with its rows
    hazards: tuple[str, ...] = ()  # operands besides the first that get NaN, +-Inf and +-1e4 in the nonfinite cases
    layouts: tuple[str, ...] = LAYOUTS
    min_dims: int = 0  # the fewest dimensions its first operand has (the fuzz draws no fewer)
    low_precision: bool = True  # torch's CPU kernel takes bf16/fp16 (the fuzz's same-dtype oracle needs it)
    # Shared cases where lossops differs from torch as docs/differences-from-torch.md says: there the oracle is the
    # reference backend in float64, which computes what those docs state.
    documented_differences: tuple[str, ...] = ()

    def call(self, first: torch.Tensor, **options) -> Call:
        return Call({self.operands[0]: first, **self.others(first)}, options, positional=self.operands)


def _class_indices(x: torch.Tensor) -> dict:
    rows = x.shape[:1] + x.shape[2:] if x.dim() > 1 else ()
    return {"target": torch.randint(0, max(x.shape[1 if x.dim() > 1 else 0], 1) if x.dim() else 1, rows)}


def _label_lists(x: torch.Tensor) -> dict:
    return {"target": label_lists(x.detach())}


def _second_input(x: torch.Tensor) -> torch.Tensor:
    return torch.randn(x.shape).requires_grad_()


KINDS = {
    # (N, C, d...) logits and class-index targets (ignore_index, class weights)
    "classes": Kind(("input", "target"), _class_indices, groups=("classes",), per_row=("target",)),
    # input and target alike, broadcasting as torch's elementwise operations
    "elementwise": Kind(("input", "target"), lambda x: {"target": torch.rand(x.shape)}, groups=("elementwise",),
                        like_first=("target",), hazards=("target",)),
    # elementwise, summed over the last (class) dimension: at least one dimension
    "multilabel": Kind(("input", "target"), lambda x: {"target": torch.randint(0, 2, x.shape).float()},
                       groups=("multilabel", "elementwise"), like_first=("target",), min_dims=1),
    # two inputs and a +-1 target of one shape, elementwise (margin ranking)
    "ranked_pairs": Kind(("input1", "input2", "target"),
                         lambda x: {"input2": _second_input(x), "target": signs(*x.shape)},
                         groups=("ranked_pairs",), like_first=("input2", "target"), hazards=("input2",)),
    # a prediction, its target and the prediction's variance (Gaussian NLL), var of the input's shape
    "variance": Kind(("input", "target", "var"),
                     lambda x: {"target": torch.randn(x.shape), "var": (torch.rand(x.shape) + 0.1).requires_grad_()},
                     groups=("variance",), like_first=("target", "var"), hazards=("target",)),
    # (N, D) row pairs and a (N,) +-1 target (cosine embedding)
    "row_pairs": Kind(("input1", "input2", "target"),
                      lambda x: {"input2": _second_input(x), "target": signs(*x.shape[:-1])},
                      groups=("row_pairs",), like_first=("input2",), per_row=("target",), hazards=("input2",),
                      layouts=("transposed", "sliced", "expanded"), min_dims=2),
    # (N, D) row triples (triplet margin)
    "row_triples": Kind(("anchor", "positive", "negative"),
                        lambda x: {"positive": _second_input(x), "negative": _second_input(x)},
                        groups=("row_triples",), like_first=("positive", "negative"),
                        hazards=("positive", "negative"), min_dims=1),
    # (N, C) scores and a (N,) class-index target, no ignore_index (multi-class hinge); torch's CPU kernel returns
    # uninitialised memory as the mean over an empty batch
    "class_hinge": Kind(("input", "target"), _class_indices, groups=("class_hinge",), per_row=("target",),
                        layouts=("transposed", "sliced", "expanded"), min_dims=2, low_precision=False,
                        documented_differences=("empty_mean",)),
    # (N, C) scores and an int64 target of their shape listing each row's classes up to the first -1
    "label_lists": Kind(("input", "target"), _label_lists, groups=("label_lists",),
                        layouts=("transposed", "sliced", "expanded"), min_dims=2, low_precision=False,
                        documented_differences=("empty_mean",)),
}


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
    if op.kind == "classes":
        return index_call(labels(), **options)
    if op.kind == "elementwise":
        return elementwise_call(**options)
    return with_input(op, logits(), **options)


def with_input(op: Op, x: torch.Tensor, **options) -> Call:
    """A call whose first operand is x, the others made to fit it (class targets for x's rows, an elementwise
    target of x's shape, ...)."""
    if op.kind == "elementwise":
        return elementwise_call(x, **options)
    call = KINDS[op.kind].call(x)
    for name, value in options.items():
        if isinstance(value, torch.Tensor):
            call.tensors[name] = value
        else:  # an operand given as a number (gaussian's float var) is no leaf
            call.tensors.pop(name, None)
            call.options[name] = value
    return call


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
    kind = KINDS[op.kind]
    if op.kind in ("classes", "class_hinge"):
        return with_input(op, nonfinite_rows(), target=torch.arange(8) % C, reduction=reduction)
    if "elementwise" in kind.groups:
        target = torch.rand(3, 4)
        if "target" in kind.hazards and op.name not in PROBABILITY_TARGETS:  # values: NaN/Inf ones propagate too
            target[2, :3] = torch.tensor(NONFINITE)
        x = nonfinite_elements()
        if op.link is not None:  # a NaN probability is an error there (case probability_input_nan)
            x = torch.nan_to_num(x.detach(), nan=0.0).requires_grad_()
        return with_input(op, x, target=target, reduction=reduction)
    call = with_input(op, nonfinite_rows(), reduction=reduction)
    for shift, name in enumerate(kind.hazards, start=1):  # the other operands' hazards on other rows
        call.tensors[name] = nonfinite_rows().detach().roll(shift, 0).requires_grad_(call.tensors[name].requires_grad)
    return call


def _empty(op: Op, reduction: str) -> Call:
    if op.kind == "classes":
        return index_call(torch.zeros(0, dtype=torch.long), logits(0, C), reduction=reduction)
    return with_input(op, logits(0, C), reduction=reduction)


def _views(op: Op, layout: str) -> Call:
    """The first operand (and those shaped like it) laid out non-contiguously; the op must see torch's values and
    grads."""
    kind = KINDS[op.kind]
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
    first = kind.operands[0]
    call.tensors[first] = base
    call.views[first] = view
    like_base = kind.others(base.detach())
    for name in kind.like_first:  # the same treatment
        call.tensors[name] = like_base[name].requires_grad_(call.tensors[name].requires_grad)
        call.views[name] = view
    if layout == "sliced":
        for name in kind.per_row:  # every other row's entry
            if op.kind == "classes":
                call.tensors[name] = torch.randint(0, C, (2 * N,))
            else:
                call.tensors[name] = call.tensors[name].repeat_interleave(2, 0)
            call.views[name] = lambda t: t[::2]
    return call


def _lists_with(row: int, column: int, value: int) -> torch.Tensor:
    """A multi-label target for (N, C) scores with one value set."""
    target = label_lists(torch.zeros(N, C))
    target[row, column] = value
    return target


def _on_meta(op: Op, position: int) -> Call:
    call = any_call(op)
    name = KINDS[op.kind].operands[position]
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
    Case("input_int64", lambda op: with_input(op, torch.randint(0, 3, (N, C))), "any", ("{first}", "int64"),
         some_ops_accept=True),  # smooth_l1, l1 and mse take integer inputs
    Case("target_on_meta", lambda op: _on_meta(op, 1), "any", ("{second}", "meta")),
    Case("input_on_meta", lambda op: _on_meta(op, 0), "any", ("{first}", "meta")),
    Case("third_operand_on_meta", lambda op: _on_meta(op, 2), lambda op: len(KINDS[op.kind].operands) > 2,
         ("{third}", "meta")),
    Case("reduction_misspelt", lambda op: any_call(op, reduction="avg"), "any", ("reduction", "avg"), ValueError),
    *(Case(f"nonfinite_{r}", lambda op, r=r: _nonfinite(op, r)) for r in REDUCTIONS),
    *(Case(f"empty_{r}", lambda op, r=r: _empty(op, r)) for r in REDUCTIONS),
    Case("single_element", lambda op: with_input(op, logits(1, 1))),
    *(Case(f"layout_{layout}", lambda op, layout=layout: _views(op, layout),
           lambda op, layout=layout: layout in KINDS[op.kind].layouts) for layout in LAYOUTS),
    # ---- the family's declared cases: their options as torch's, their bad options refused as torch refuses them
    *(Case(f"declared_options_{i}", lambda op, i=i: any_call(op, **op.declared_options[i]),
           lambda op, i=i: len(op.declared_options) > i) for i in range(3)),
    *(Case(f"declared_bad_option_{i}", lambda op, i=i: any_call(op, **op.declared_bad[i]),
           lambda op, i=i: len(op.declared_bad) > i, ("{bad_name}", "{bad_value}")) for i in range(3)),
    # ---- multi-label soft margin: a class weight broadcast over the rows
    Case("multilabel_weight", lambda op: _weight_call(op, torch.rand(C)), "multilabel"),
    Case("multilabel_weight_requires_grad", lambda op: _weight_call(op, torch.rand(C, requires_grad=True)),
         "multilabel"),
    Case("multilabel_weight_not_broadcastable", lambda op: _weight_call(op, torch.rand(C + 1)), "multilabel",
         ("weight", str(C + 1))),
    Case("multilabel_input_0d", lambda op: with_input(op, logits(), target=torch.rand(())), "multilabel"),
    # ---- ranked pairs (margin ranking): any target value, torch's broadcasting and promotion
    Case("pair_target_other_values", lambda op: with_input(op, logits(), target=torch.tensor([0.0, 2.0, -0.5, 1.0,
                                                                                            -1.0]).expand(N, C)),
         "ranked_pairs"),
    Case("pair_target_bool", lambda op: with_input(op, logits(), target=torch.rand(N, C) > 0.5), "ranked_pairs",
         ("target", "bool")),
    Case("pair_target_int64", lambda op: with_input(op, logits(), target=signs(N, C).long()), "ranked_pairs"),
    Case("pair_target_requires_grad", lambda op: with_input(op, logits(), target=signs(N, C).requires_grad_()),
         "ranked_pairs"),
    Case("pair_dims_differ", lambda op: with_input(op, logits(), input2=logits(C)), "ranked_pairs",
         ("input2", f"[{C}]")),
    Case("pair_broadcast", lambda op: with_input(op, logits(), input2=logits(N, 1), target=signs(1, C)),
         "ranked_pairs"),
    Case("pair_not_broadcastable", lambda op: with_input(op, logits(), input2=logits(N, C + 1)), "ranked_pairs",
         ("input2", f"({N}, {C + 1})")),
    Case("pair_second_double", lambda op: with_input(op, logits(), input2=torch.randn(N, C, dtype=torch.float64)),
         "ranked_pairs"),
    Case("pair_margin_negative", lambda op: any_call(op, margin=-0.5), "ranked_pairs"),
    # ---- variance (Gaussian NLL): torch's checks of var's entries and size, its clamp at eps
    Case("var_negative_entry", lambda op: with_input(op, logits(), var=torch.tensor([0.5, -0.1, 1, 1, 1]).expand(N, C)),
         "variance", ("var", "negative"), ValueError),
    Case("var_float", lambda op: with_input(op, logits(), var=0.5), "variance"),
    Case("var_float_negative", lambda op: with_input(op, logits(), var=-0.5), "variance", ("var", "negative"),
         ValueError),
    Case("var_one_dimension_short", lambda op: with_input(op, logits(), var=torch.rand(N, requires_grad=True) + 0.1),
         "variance"),
    Case("var_one_dimension_of_size_1", lambda op: with_input(op, logits(), var=torch.rand(1, C) + 0.1), "variance"),
    Case("var_wrong_size", lambda op: with_input(op, logits(), var=torch.rand(N, C + 1)), "variance",
         ("var", f"({N}, {C + 1})"), ValueError),
    Case("var_two_dimensions_of_size_1", lambda op: with_input(op, logits(), var=torch.rand(1, 1)), "variance",
         ("var", "(1, 1)"), ValueError),
    Case("var_nonfinite_zero_and_tiny", lambda op: with_input(
        op, logits(), var=torch.tensor([float("nan"), float("inf"), 0.0, 1e-9, 2.0]).expand(N, C).clone()
        .requires_grad_()), "variance"),
    Case("var_zero_eps_zero", lambda op: with_input(op, logits(), var=torch.zeros(N, C), eps=0.0), "variance"),
    Case("eps_negative", lambda op: any_call(op, eps=-1.0), "variance"),  # torch clamps at it without a word
    Case("eps_above_var", lambda op: any_call(op, eps=10.0, full=True), "variance"),
    Case("var_int64", lambda op: with_input(op, logits(), var=torch.ones(N, C, dtype=torch.long)), "variance",
         ("var", "int64")),
    Case("var_int64_integer_eps", lambda op: with_input(op, logits(), var=torch.ones(N, C, dtype=torch.long), eps=1),
         "variance"),
    Case("var_double", lambda op: with_input(op, logits(), var=torch.rand(N, C, dtype=torch.float64) + 0.1),
         "variance"),
    Case("var_with_target_requires_grad", lambda op: with_input(op, logits(), target=logits()), "variance"),
    Case("var_target_broadcast", lambda op: with_input(op, logits(), target=torch.randn(N, 1)), "variance"),
    # ---- row pairs (cosine embedding): (N, D) rows with a (N,) target, or (D,) with a 0-d one
    Case("rows_target_other_values", lambda op: with_input(op, logits(), target=torch.tensor([0.0, 2.0, 1.0, -1.0])),
         "row_pairs"),
    Case("rows_target_int64", lambda op: with_input(op, logits(), target=signs(N).long()), "row_pairs"),
    Case("rows_target_requires_grad", lambda op: with_input(op, logits(), target=signs(N).requires_grad_()),
         "row_pairs"),
    Case("rows_target_2d", lambda op: with_input(op, logits(), target=signs(N, 1)), "row_pairs",
         ("target", f"({N}, 1)")),
    Case("rows_input_3d", lambda op: with_input(op, logits(N, C, 2), target=signs(N)), "row_pairs",
         ("input", f"[{N}, {C}, 2]")),
    Case("rows_one_row_0d_target", lambda op: with_input(op, logits(C), target=torch.tensor(-1.0)), "row_pairs"),
    Case("rows_zero_rows", lambda op: with_input(op, torch.zeros(N, C, requires_grad=True)), "row_pairs"),
    Case("rows_broadcast", lambda op: with_input(op, logits(), input2=logits(1, C)), "row_pairs"),
    Case("rows_second_double", lambda op: with_input(op, logits(), input2=torch.randn(N, C, dtype=torch.float64)),
         "row_pairs"),
    Case("rows_margin_negative", lambda op: any_call(op, margin=-0.5), "row_pairs"),
    # ---- row triples (triplet margin): one number of dimensions, torch's broadcasting, margin > 0
    Case("triples_dims_differ", lambda op: with_input(op, logits(), negative=logits(C)), "row_triples",
         ("negative", "1D")),
    Case("triples_broadcast", lambda op: with_input(op, logits(), positive=logits(1, C)), "row_triples"),
    Case("triples_not_broadcastable", lambda op: with_input(op, logits(), negative=logits(N, C + 1)), "row_triples",
         ("negative", str(C + 1))),
    Case("triples_one_row", lambda op: with_input(op, logits(C)), "row_triples"),
    Case("triples_identical_rows", lambda op: (lambda call: dataclasses.replace(
        call, tensors={**call.tensors, "positive": call.tensors["anchor"].detach().clone().requires_grad_()}))(
        any_call(op)), "row_triples"),
    Case("triples_second_double", lambda op: with_input(op, logits(), positive=torch.randn(N, C, dtype=torch.float64)),
         "row_triples"),
    Case("triples_margin_zero", lambda op: any_call(op, margin=0.0), "row_triples", ("margin", "0"), ValueError),
    Case("triples_margin_negative", lambda op: any_call(op, margin=-1.0), "row_triples", ("margin", "-1"),
         ValueError),
    Case("triples_swap", lambda op: any_call(op, swap=True), "row_triples"),
    # p outside (0, inf) is torch's own function's (docs/differences-from-torch.md)
    *(Case(f"triples_p_{p}", lambda op, p=p: any_call(op, p=p), ("triplet_margin_loss",))
      for p in (1, 1.5, 3, 0.5, float("inf"))),
    Case("triples_eps_negative", lambda op: any_call(op, eps=-1e-3), ("triplet_margin_loss",)),
    Case("triples_pairwise_distance_module", lambda op: any_call(
        op, distance_function=torch.nn.PairwiseDistance(p=1.5, eps=1e-4)), ("triplet_margin_with_distance_loss",)),
    Case("triples_own_distance", lambda op: any_call(op, distance_function=lambda x, y: (x - y).abs().sum(-1)),
         ("triplet_margin_with_distance_loss",)),
    # ---- multi-class hinge (multi margin): class indices in [0, C), p 1 or 2, a weight of the input's dtype
    Case("hinge_target_equal_to_C", lambda op: with_input(op, logits(), target=labels(C)), "class_hinge",
         ("target", str(C)), RuntimeError),
    Case("hinge_target_negative", lambda op: with_input(op, logits(), target=labels(0, -1)), "class_hinge",
         ("target", "-1"), RuntimeError),
    Case("hinge_target_int32", lambda op: with_input(op, logits(), target=labels().int()), "class_hinge",
         ("target", "int32")),
    Case("hinge_target_float", lambda op: with_input(op, logits(), target=labels().float()), "class_hinge",
         ("target", "float32")),
    Case("hinge_target_batch_mismatch", lambda op: with_input(op, logits(), target=labels()[:N - 1]), "class_hinge",
         ("target", f"[{N - 1}]")),
    Case("hinge_input_3d", lambda op: with_input(op, logits(N, C, 2)), "class_hinge", ("input", f"[{N}, {C}, 2]")),
    Case("hinge_no_classes", lambda op: with_input(op, logits(N, 0), target=torch.zeros(N, dtype=torch.long)),
         "class_hinge", ("input", f"[{N}, 0]")),
    Case("hinge_one_row", lambda op: with_input(op, logits(C), target=torch.tensor(2)), "class_hinge"),
    Case("hinge_one_class", lambda op: with_input(op, logits(N, 1), target=torch.zeros(N, dtype=torch.long)),
         "class_hinge"),
    Case("hinge_squared_negative_margin", lambda op: any_call(op, p=2, margin=-0.5), "class_hinge"),
    Case("hinge_p_zero", lambda op: any_call(op, p=0), "class_hinge", ("p", "0"), ValueError),
    Case("hinge_weight", lambda op: _weight_call(op, torch.rand(C)), "class_hinge"),
    Case("hinge_weight_wrong_length", lambda op: _weight_call(op, torch.rand(C + 1)), "class_hinge",
         ("weight", str(C + 1))),
    Case("hinge_weight_2d", lambda op: _weight_call(op, torch.rand(1, C)), "class_hinge", ("weight", "dimension"),
         ValueError),
    Case("hinge_weight_double", lambda op: _weight_call(op, torch.rand(C, dtype=torch.float64)), "class_hinge",
         ("weight", "float64")),
    Case("hinge_weight_requires_grad", lambda op: _weight_call(op, torch.rand(C, requires_grad=True)), "class_hinge",
         ("weight",)),
    # ---- label lists (multi-label margin): values in [-1, C) up to the end of the row, lists ended by -1
    Case("lists_target_equal_to_C", lambda op: with_input(op, logits(), target=_lists_with(0, 0, C)), "label_lists",
         ("target", str(C)), RuntimeError),
    Case("lists_target_below_minus_1", lambda op: with_input(op, logits(), target=_lists_with(1, 0, -2)),
         "label_lists", ("target", "-2"), RuntimeError),
    Case("lists_out_of_range_after_the_end", lambda op: with_input(op, logits(), target=_lists_with(2, C - 1, C)),
         "label_lists", ("target", str(C)), RuntimeError),
    Case("lists_repeated_and_all_classes", lambda op: with_input(op, logits(), target=torch.tensor(
        [[1, 1, -1, 0, 0], [0, 1, 2, 3, 4], [-1, 4, 4, 4, 4], [4, 3, 3, -1, 7 - 7]])), "label_lists"),
    Case("lists_target_int32", lambda op: with_input(op, logits(), target=_lists_with(0, 0, 1).int()), "label_lists",
         ("target", "int32")),
    Case("lists_target_shape_mismatch", lambda op: with_input(op, logits(), target=torch.full((N, C + 1), -1)),
         "label_lists", ("target", f"[{N}, {C + 1}]")),
    Case("lists_one_row", lambda op: with_input(op, logits(C), target=torch.tensor([3, 0, -1, 2, 2])), "label_lists"),
    Case("lists_0d", lambda op: with_input(op, torch.randn((), requires_grad=True), target=torch.tensor(0)),
         "label_lists"),
    Case("lists_input_3d", lambda op: with_input(op, logits(N, C, 2), target=torch.zeros(N, C, 2, dtype=torch.long)),
         "label_lists", ("input", f"[{N}, {C}, 2]")),
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


def assert_names_it(error: Exception, mentions: tuple, op: Op, case: Case):
    message = str(error)
    operands = KINDS[op.kind].operands
    bad = op.declared_bad[int(case.id[-1])] if case.id.startswith("declared_bad_option_") else {"": ""}
    for needle in mentions:
        needle = needle.format(weight=CLASS_WEIGHT.get(op.name, "weight"), first=operands[0], second=operands[1],
                               third=operands[-1], bad_name=next(iter(bad)), bad_value=next(iter(bad.values())))
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
        assert_names_it(ours.error, case.mentions, op, case)
        return

    oracle = op.oracle
    documented = case.id in KINDS[op.kind].documented_differences
    if (op.name in STABLE_FORMS and case.id.startswith("nonfinite")) or documented:
        oracle = dataclasses.replace(op, torch_fn=None).oracle
    theirs = run(call.bind(oracle), fresh(call.tensors))
    if theirs.error is not None:
        assert ours.error is not None, f"torch raised {theirs.error!r}; lossops returned {ours.out}"
        assert isinstance(ours.error, case.exc), repr(ours.error)
        assert case.mentions, f"torch raised {theirs.error!r}: the table must say what the message names"
        assert_names_it(ours.error, case.mentions, op, case)
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
