"""A loss family is declared once; its op, fake implementation, autograd, Module and registry entries are made here.

A family module (lossops/<family>.py) writes, per public loss:
  - its options as a frozen dataclass (typed fields whose defaults reproduce torch),
  - a `Family`: the op's tensor inputs (which of them receive gradients), that options record, its `Kernel`
    (one name, the same keyword parameters on both backends), `run` (the op's body: one kernel call), the
    loss's shape for the fake implementation, the plain-PyTorch reference, and its test and benchmark cases,
  - its public function (torch's signature and checks), which ends in `family.apply(...)`.
`register(family)` then makes the custom op `lossops::<name>`: its schema comes from the inputs and the options'
fields, its autograd rebuilds the options by name (never by position) and multiplies the gradients the kernel
wrote in forward by grad_output (lossops._reduce). An op may also return per-row `Statistics` after its loss (or
instead of one), with incoming gradients of their own, which lossops::<name>_backward turns into input gradients.
`FAMILIES` holds the public losses (`Family.public`): it is what lossops' exports, lossops.nn, the
compile / opcheck / bad-input / Triton-AOT / kernel-ABI tests, selfcheck and the benchmark iterate. `OPS` holds
every registered op, those the public functions call inside (the token statistics) too.
Nothing here knows DTensors: once every family is registered, lossops (its __init__) makes each public function
serve them too (lossops._dtensor.serve_dtensors), from the family's `sharding` record (lossops._sharding).
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from . import _eager, _reduce
from ._kernels import KERNELS as KERNELS, Kernel
from ._sharding import Sharding


@dataclasses.dataclass(frozen=True)
class Input:
    name: str
    optional: bool = False       # Tensor? in the schema
    differentiable: bool = False  # the kernel writes its gradient in forward when asked
    # differentiable through the op's statistics only: its gradient is always formed in backward, so the op takes no
    # grad_ flag and returns no gradient for it
    recomputed: bool = False


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Per-row outputs an op returns after its loss, or instead of one: the `differentiable` ones, each with an
    incoming gradient of its own, then the `other` ones (integers). Autograd keeps the `saved` ones; backward turns
    the incoming gradients into gradient(incoming, saved) (dicts by name): the tensors named `gradient_names`, or
    None when no statistic has a gradient. lossops::<name>_backward takes those tensors and hands them to the
    family's recompute as statistics_gradient."""
    differentiable: tuple[str, ...]
    other: tuple[str, ...]
    like: Callable  # (tensors, options) -> the outputs, empty, in order (the fake implementation)
    saved: tuple[str, ...]
    gradient: Callable
    gradient_names: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return self.differentiable + self.other


@dataclasses.dataclass(frozen=True)
class Case:
    """One call for the shared tests: make(dtype) -> positional arguments (the first is what a model produces),
    keyword arguments, torch's own function where one has this signature, and bad arguments that must raise:
    dicts of keyword overrides, or "target_out_of_range" (a target value no class has); where the target
    sits among the arguments; and what turns a model's output into the first argument where not every value is
    valid there (torch.sigmoid for probabilities)."""
    make: Callable[[torch.dtype], list]
    kwargs: dict = dataclasses.field(default_factory=dict)
    torch_fn: Optional[Callable] = None
    bad: tuple = ()
    target: int = 1
    link: Optional[Callable] = None


@dataclasses.dataclass(frozen=True)
class Bench:
    """How `python -m bench` measures the loss: the plain-PyTorch formula it replaces (also what torch.compile
    compiles), a target for a given input, keyword arguments for both sides, shapes, and what the columns mean."""
    eager: Callable
    make_target: Callable[[Tensor], Tensor]
    shapes: tuple
    quick_shapes: tuple = ((128, 256), (128, 1024))
    kwargs: dict = dataclasses.field(default_factory=dict)
    columns: str = "classes"
    inplace_variant: bool = False
    make_inputs: Optional[Callable] = None  # (shape, dtype, device) -> (x, target...) when not (x, make_target(x))
    # `python -m bench --grid`: the shapes users have, tiny to LLM-sized (GridShapes), and its --quick subset
    grid_shapes: tuple = ()
    grid_quick_shapes: tuple = ()
    targets: tuple = ()  # SpeedTarget: forward+backward speed-ups over eager beyond "at least 1x"
    # The work the loss cannot avoid, timed beside it: floor(x, *rest, gradients=bool) -> a callable doing that work
    # in plain torch for the call's inputs (a fused linear loss's matrix products), with or without what the
    # gradients need; SpeedTarget.within_floor bounds lossops' time against it.
    floor: Optional[Callable] = None
    floor_name: str = "floor"


@dataclasses.dataclass(frozen=True)
class SpeedTarget:
    """lossops at least `speedup` times eager's speed, forward+backward, at `shape`; dtype ("float32",
    "bfloat16") and threads ("1", "all") restrict it, None meaning every one."""
    shape: tuple
    speedup: float
    dtype: Optional[str] = None
    threads: Optional[str] = None
    within_floor: Optional[float] = None  # and at most this many times the time of the family's Bench.floor


class GridShapes:
    """The benchmark grid's shape groups, which families pick from in their Bench declaration."""
    TINY = ((32, 10), (256, 4))  # per-call overhead is the cost
    SMALL_CLASSES = ((65536, 10), (65536, 100), (1000, 80))  # CIFAR-10, detection heads
    CLASS_DIM_1 = ((8, 21, 128, 128), (4, 150, 64, 64))  # segmentation (N, C, H, W)
    MID = ((16384, 1000),)
    LLM = ((4096, 32000), (1024, 128000))
    ELEMENTWISE_LARGE = ((65536, 80), (4096, 8192))


@dataclasses.dataclass
class Family:
    name: str                                # the public function, and the op lossops::<name>
    inputs: tuple[Input, ...]
    options: type                            # frozen dataclass; its fields follow the inputs in the schema
    kernel: Kernel
    # (family, backend, tensors, options, grads) -> (loss, {input: grad}[, statistics][, state]); loss None without one
    run: Callable
    loss_like: Optional[Callable]            # (tensors, options) -> an empty tensor shaped like the loss (None: none)
    reference: Optional[Callable] = None     # plain PyTorch, the "reference" backend
    item_shape: Callable = lambda tensors, options: None  # how a per-item grad_output broadcasts on a gradient
    function: Optional[Callable] = None      # the public function (given in the declaration)
    # A public function that serves plain calls itself first (the C++ eager path) and calls family.full_path with
    # the same arguments for everything else: lossops._dtensor makes full_path, not function, serve DTensors, so
    # no wrapper runs before the eager path.
    full_path: Optional[Callable] = None
    module: Optional[type] = None            # its nn.Module (set from make_module)
    cases: tuple[Case, ...] = ()
    # its kind of inputs in tests/test_bad_inputs.py (KINDS: "classes", "elementwise", "multilabel", "ranked_pairs",
    # "variance", "row_pairs", "row_triples", "class_hinge", "label_lists"), which test_fuzz.py fuzzes too
    bad_inputs: Optional[str] = None
    torch_fn: Optional[Callable] = None      # torch's counterpart with the same signature, the tests' oracle
    selfcheck: Optional[tuple] = None        # (keyword arguments, truth(x, t), make(dtype)) for lossops.selfcheck
    bench: Optional[Bench] = None
    sharding: Optional[Sharding] = None      # how it splits over a DTensor device mesh (None: Replicate only)
    # Gradients formed in backward instead of written in forward, where gradient_in_backward(backend, options)
    # says so: where they cannot be formed in forward and scaled afterwards (a weight's gradient sums rows that
    # each have their own grad_output), or where a backend reads the input once more rather than write and scale
    # a gradient. recompute(family, backend, tensors, options, grad_loss, needs[, state][, statistics_gradient]) ->
    # {input: gradient}, run by the op lossops::<name>_backward from the inputs saved in forward and, for a family
    # with a state_like, the state its run returned last: state_like(tensors, options) is an empty tensor shaped as
    # that state. With statistics, grad_loss is None where only they have gradients, and statistics_gradient is
    # None where they have none.
    recompute: Optional[Callable] = None
    gradient_in_backward: Callable = lambda backend, options: False
    # The input whose gradient the loss may write over that input's own storage (inplace_backward=True; see
    # InPlaceGradient): run(..., in_place=True) is called without its gradient and may return a state, and
    # recompute(..., state, out=<its kernel view>) writes the gradient there in backward, whether or not the backend
    # forms gradients in backward otherwise.
    overwritable: Optional[str] = None
    state_like: Optional[Callable] = None
    statistics: Optional[Statistics] = None  # per-row outputs after the loss, differentiable in their own right
    # False: an op that public functions call inside, in OPS only: no lossops.<name>, Module, tests' cases or benchmark
    public: bool = True
    kernel_options: Optional[Callable] = None  # (tensors, options) -> its own kernel arguments (shared drivers)
    # The C++ eager path's routes for plain CPU calls (lossops._eager.EagerRoute): the public function calls
    # route.call(reduction, ...) with them before its own checks.
    eager_routes: tuple = ()
    op: Any = None
    option_fields: tuple = ()
    option_converters: tuple = ()
    # the op's positional arguments -> (tensors by name, options record, {input: grad flag}, backend), by register()
    split_arguments: Optional[Callable] = None
    eager_parts: tuple = ()  # (impl, setup_context, backward, number of tensor inputs) for LossopsEager

    def option_names(self) -> tuple[str, ...]:
        # computed once by register(): torch.compile traces apply() and cannot trace dataclasses.fields
        return self.option_fields

    def replace(self, options, **changes):
        """dataclasses.replace for this family's options, in a form torch.compile traces."""
        return self.options(**{n: changes[n] if n in changes else getattr(options, n) for n in self.option_fields})

    def apply(self, backend: str, tensors: dict, options, grads: dict):
        """Runs the op: tensors by input name, the options record, which differentiable inputs want a gradient.
        Returns the loss, or with statistics the tuple (loss, *statistics) (the statistics alone without a loss)."""
        args = [tensors.get(i.name) for i in self.inputs]
        # as the custom op's schema would convert them (numpy scalars, one-element tensors): the eager call below
        # passes them straight to the kernels
        args += [convert(getattr(options, n)) for n, convert in zip(self.option_fields, self.option_converters)]
        args += [bool(grads.get(i.name, False)) for i in self.inputs if i.differentiable]
        args.append(backend)
        tensor_inputs = args[:len(self.inputs)]
        if _eager.applies(*tensor_inputs):
            if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensor_inputs)):
                return self.results(self.eager_parts[0](*args))  # nothing to differentiate: no autograd node
            return LossopsEager.apply((self, args), *tensor_inputs)
        return self.results(self.op(*args))

    def results(self, outputs):
        """What a call returns of the op's outputs (the rest are buffers for backward): see apply."""
        if self.statistics is None:
            return outputs[0]
        return tuple(outputs[:(self.loss_like is not None) + len(self.statistics.names)])


class LossopsEager(torch.autograd.Function):
    """A family's op body and autograd (the same functions the custom op registers) without the custom-op
    dispatch, for plain eager calls (lossops._eager.applies: no torch.compile, tensor subclass, dispatch or
    function mode, functorch transform, forward AD or autocast); everything else goes through the custom op, so
    tracing, opcheck and FakeTensor see it. The custom-op machinery costs more per call than a small problem's
    whole kernel (docs/eager-path.md)."""

    @staticmethod
    def forward(ctx, call, *tensor_inputs):
        family, args = call
        impl, setup_context, _, _ = family.eager_parts
        outputs = impl(*args)
        setup_context(ctx, args, outputs, eager=True)
        ctx.family = family
        return family.results(outputs)

    @staticmethod
    def backward(ctx, *grads):
        _, _, backward, n_in = ctx.family.eager_parts
        return (None, *backward(ctx, *grads, first_input=1)[:n_in])


class InPlaceGradient(torch.autograd.Function):
    """A family's loss whose backward writes the gradient with respect to its `overwritable` input over that input's
    storage: one input-sized buffer in all.

    Forward only reads the input, so reads between the loss and backward (an accuracy metric, another loss term)
    see it unchanged. Backward writes into the kernel's view of the input (tensors[name]: a view of its storage
    wherever one exists; where the family's layout had to copy, into that copy) and bumps the input's version: a
    node that saved the input and runs after this one fails its version check instead of reading the gradient, a
    change to the input before backward fails this node's, and so does a second backward through it
    (retain_graph=True), which would have nothing left to recompute from.
    """

    @staticmethod
    def forward(ctx, input, family, backend, tensors, options):
        name = family.overwritable
        loss, _, *rest = family.run(family, backend, tensors, options, {name: False}, in_place=True)
        ctx.names = tuple(tensors)
        ctx.save_for_backward(input, *tensors.values(), rest[0] if rest else None)
        ctx.family, ctx.backend, ctx.options = family, backend, options
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        family = ctx.family
        if ctx.consumed:
            raise RuntimeError(f"lossops: inplace_backward=True wrote the first backward's gradient over the "
                               f"{family.overwritable}, so a second backward through this loss (retain_graph=True) "
                               f"has nothing to recompute from; use inplace_backward=False")
        if grad_loss is None:
            return (None,) * 5
        _reduce.refuse_double_backward()
        input, *values, state = ctx.saved_tensors
        ctx.consumed = True
        tensors = dict(zip(ctx.names, values))
        view = tensors[family.overwritable]
        family.recompute(family, ctx.backend, tensors, ctx.options, grad_loss, {family.overwritable: True}, state,
                         out=view)
        torch.autograd.graph.increment_version(input)
        return view.reshape(input.shape), None, None, None, None


def in_place_loss(family: Family, input: Tensor, backend: str, tensors: dict, options) -> Tensor:
    """The loss of family.apply, with the gradient with respect to `input` (its overwritable input, whose kernel view
    is tensors[family.overwritable]) written over input's storage in backward: InPlaceGradient."""
    return InPlaceGradient.apply(input, family, backend, tensors, options)


FAMILIES: dict[str, Family] = {}
OPS: dict[str, Family] = {}

_SCHEMA_TYPES = {int: "int", float: "float", bool: "bool", str: "str", list[int]: "int[]", list[float]: "float[]",
                 Tensor: "Tensor"}


def _schema_type(annotation) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _schema_type(inner) + "?"
    return _SCHEMA_TYPES[annotation]


def _tensor_and_option_parameters(family: Family) -> tuple[list[str], list[str]]:
    hints = typing.get_type_hints(family.options)
    return ([f"Tensor{'?' if i.optional else ''} {i.name}" for i in family.inputs],
            [f"{_schema_type(hints[n])} {n}" for n in family.option_names()])


def _schema(family: Family) -> str:
    tensors, options = _tensor_and_option_parameters(family)
    grads = [i.name for i in family.inputs if i.differentiable]
    params = tensors + options + [f"bool grad_{n}" for n in grads] + ["str backend"]
    statistics = family.statistics.names if family.statistics is not None else ()
    outputs = (["Tensor loss"] * has_loss(family) + [f"Tensor {n}" for n in statistics]
               + [f"Tensor grad_{n}" for n in grads] + ["Tensor state"] * has_state(family))
    return f"({', '.join(params)}) -> ({', '.join(outputs)})"


def _backward_schema(family: Family) -> str:
    """lossops::<name>_backward's: [grad_loss], the inputs, [the state], [the statistics' gradient], the options,
    which gradients are needed, the backend."""
    tensors, options = _tensor_and_option_parameters(family)
    statistics = family.statistics
    params = [f"Tensor{'' if statistics is None else '?'} grad_loss"] * has_loss(family) + tensors
    params += ["Tensor state"] * has_state(family)
    params += [f"Tensor? {n}" for n in (statistics.gradient_names if statistics is not None else ())]
    params += options + [f"bool needs_{n}" for n in gradient_inputs(family)] + ["str backend"]
    return f"({', '.join(params)}) -> ({', '.join(f'Tensor grad_{n}' for n in gradient_inputs(family))})"


def has_state(family: Family) -> bool:
    """Whether the family's op has a state output (the values its backward reads besides the inputs)."""
    return family.state_like is not None


def has_loss(family: Family) -> bool:
    """Whether the family's op returns a loss (its first output), or statistics only."""
    return family.loss_like is not None


def gradient_inputs(family: Family) -> list[str]:
    """The inputs the op's backward can return a gradient for."""
    return [i.name for i in family.inputs if i.differentiable or i.recomputed]


def _identity(value):
    return value


def _converter(annotation) -> Callable:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        convert = _converter(inner)
        return lambda value: None if value is None else convert(value)
    return {int: int, float: float, bool: bool}.get(annotation, _identity)


def register(family: Family) -> Family:
    """Makes the custom op lossops::<name> with its fake implementation and autograd, and records the family in OPS,
    and in FAMILIES when it is a public loss."""
    if family.name in OPS:
        raise RuntimeError(f"lossops: a loss family named {family.name} is already registered")
    names = [i.name for i in family.inputs]
    family.option_fields = options = tuple(f.name for f in dataclasses.fields(family.options))
    hints = typing.get_type_hints(family.options)
    family.option_converters = tuple(_converter(hints[n]) for n in options)
    differentiable = [i.name for i in family.inputs if i.differentiable]
    n_in, n_opt = len(names), len(options)

    def split(args):
        tensors = dict(zip(names, args[:n_in]))
        opts = family.options(**dict(zip(options, args[n_in:n_in + n_opt])))
        grads = dict(zip(differentiable, args[n_in + n_opt:n_in + n_opt + len(differentiable)]))
        return tensors, opts, grads, args[-1]

    family.split_arguments = split
    op, impl = _forward_op(family, names, differentiable, split)
    for route in family.eager_routes:
        _eager.declare(route, family.kernel.name, family.kernel.parameters)
    backward_parts = _backward_op(family, split) if family.recompute is not None else None
    setup_context, backward = _autograd(family, backward_parts)
    op.register_autograd(backward, setup_context=setup_context)
    family.eager_parts = (impl, setup_context, backward, n_in)
    family.op = op
    OPS[family.name] = family
    if family.public:
        FAMILIES[family.name] = family
    return family


def _forward_op(family: Family, names, differentiable, split):
    """lossops::<name> with its fake implementation: ([loss], [statistics], the gradients written in forward,
    [the state its backward reads]). Returns the op and its body."""
    stateful, statistics = has_state(family), family.statistics

    def empty(like: Tensor) -> Tensor:
        return like.new_empty((0,))

    def impl(*args):
        tensors, opts, grads, backend = split(args)
        loss, written, *rest = family.run(family, backend, tensors, opts, grads)
        first = tensors[names[0]]
        values = tuple(rest.pop(0)) if statistics is not None else ()
        state = (rest[0] if rest and rest[0] is not None else empty(first),) if stateful else ()
        return ((loss,) * has_loss(family) + values
                + tuple(written.get(n) if written.get(n) is not None else empty(first) for n in differentiable)
                + state)

    def fake(*args):
        tensors, opts, grads, backend = split(args)
        first = tensors[names[0]]
        in_forward = not family.gradient_in_backward(backend, opts)
        state = ((empty(first) if in_forward else family.state_like(tensors, opts)),) if stateful else ()
        loss = (family.loss_like(tensors, opts),) if has_loss(family) else ()
        values = tuple(statistics.like(tensors, opts)) if statistics is not None else ()
        return (*loss, *values,
                *(tensors[n].new_empty(tensors[n].shape) if grads[n] and in_forward else empty(first)
                  for n in differentiable), *state)

    op = torch.library.custom_op(f"lossops::{family.name}", impl, mutates_args=(), schema=_schema(family))
    op.register_fake(fake)
    return op, impl


def _autograd(family: Family, backward_parts):
    """setup_context and backward of lossops::<name> (LossopsEager's too). The gradients written in forward are
    multiplied by grad_output; lossops::<name>_backward forms the others from the saved inputs (and state): all of
    them where gradient_in_backward(backend, options), and the statistics' wherever one has an incoming gradient."""
    names = [i.name for i in family.inputs]
    written = [i.name for i in family.inputs if i.differentiable]
    gradients = gradient_inputs(family)
    statistics = family.statistics
    n_in, n_opt, n_loss, stateful = len(names), len(family.option_fields), int(has_loss(family)), has_state(family)
    n_statistics = len(statistics.names) if statistics is not None else 0
    n_differentiable = len(statistics.differentiable) if statistics is not None else 0
    n_tail = n_opt + len(written) + 1  # the op's non-tensor arguments, which get no gradient
    split = family.split_arguments

    def setup_context(ctx, inputs, output, eager=False):
        tensors, opts, grads, backend = split(inputs)
        ctx.recompute = family.gradient_in_backward(backend, opts)
        ctx.eager = eager
        ctx.set_materialize_grads(False)
        values = output[n_loss:n_loss + n_statistics]
        if not eager:  # LossopsEager returns the loss and the statistics only
            ctx.mark_non_differentiable(*values[n_differentiable:], *output[n_loss + n_statistics:])
        kept_inputs = []
        if ctx.recompute or statistics is not None:  # lossops::<name>_backward reads them
            kept_inputs = [*(tensors[n] for n in names), *output[len(output) - stateful:]]
            ctx.arguments = inputs[n_in:]
        kept_values = [values[statistics.names.index(n)] for n in statistics.saved] if statistics is not None else []
        written_grads = []
        if not ctx.recompute:
            written_grads = output[n_loss + n_statistics:n_loss + n_statistics + len(written)]
            ctx.computed = grads
            ctx.item_shape = family.item_shape(tensors, opts) if written and opts.reduction == "none" else None
        ctx.save_for_backward(*kept_inputs, *kept_values, *written_grads)
        ctx.kept = (len(kept_inputs), len(kept_values))

    def backward(ctx, *output_grads, first_input=0):
        needed = ctx.needs_input_grad[first_input:first_input + n_in]
        for name, need in zip(names, needed):
            if need and name not in gradients:
                raise RuntimeError(f"lossops: {family.name} computes no gradient with respect to {name} (torch "
                                   "defines none, or the public function takes the reference path for it)")
        grad_loss = output_grads[0] if n_loss else None
        saved = ctx.saved_tensors
        n_inputs, n_values = ctx.kept
        result = {}
        if not ctx.recompute and grad_loss is not None:
            result = scaled_gradients(ctx, grad_loss, saved[n_inputs + n_values:], needed)
        statistics_gradient = None
        if statistics is not None:
            incoming = dict(zip(statistics.differentiable, output_grads[n_loss:]))
            kept = dict(zip(statistics.saved, saved[n_inputs:n_inputs + n_values]))
            statistics_gradient = statistics.gradient(incoming, kept)
        if statistics_gradient is not None or (ctx.recompute and grad_loss is not None):
            _reduce.refuse_double_backward()
            recomputed = recomputed_gradients(ctx, grad_loss if ctx.recompute else None, saved[:n_inputs],
                                              statistics_gradient, needed)
            for name, gradient in recomputed.items():
                result[name] = gradient if result.get(name) is None else result[name] + gradient
        return (*(result.get(n) if need else None for n, need in zip(names, needed)), *(None,) * n_tail)

    def scaled_gradients(ctx, grad_loss, written_grads, needed) -> dict:
        result = {}
        for name, gradient in zip(written, written_grads):
            if not needed[names.index(name)]:
                continue
            if not ctx.computed[name]:
                raise RuntimeError(f"lossops: lossops::{family.name} ran with grad_{name}=False; call "
                                   f"lossops.{family.name} with grad mode enabled and {name} requiring grad")
            result[name] = _reduce.apply_grad_output(gradient, grad_loss, ctx.item_shape)
        return result

    def recomputed_gradients(ctx, grad_loss, inputs_and_state, statistics_gradient, needed) -> dict:
        needs = [needed[names.index(n)] for n in gradients]
        if statistics is not None and statistics_gradient is None:
            statistics_gradient = (None,) * len(statistics.gradient_names)
        # A plain eager call runs the backward op's body directly, as LossopsEager runs the op's: same code, without
        # the custom-op dispatch.
        run = backward_parts[1] if ctx.eager else backward_parts[0]
        recomputed = run(*(grad_loss,) * n_loss, *inputs_and_state, *(statistics_gradient or ()),
                         *ctx.arguments[:n_opt], *needs, ctx.arguments[-1])
        recomputed = (recomputed,) if isinstance(recomputed, Tensor) else recomputed
        return {n: g for n, g, need in zip(gradients, recomputed, needs) if need}

    return setup_context, backward


def _backward_op(family: Family, split):
    """lossops::<name>_backward: the gradients recomputed from the inputs (and the forward's state, and the
    statistics' gradient). Returns the op and its body."""
    names = [i.name for i in family.inputs]
    gradients = gradient_inputs(family)
    n_in, n_opt, n_loss, stateful = len(names), len(family.option_fields), int(has_loss(family)), has_state(family)
    statistics = family.statistics
    n_statistics = len(statistics.gradient_names) if statistics is not None else 0
    n_written = sum(i.differentiable for i in family.inputs)

    def arguments(args):
        """(grad_loss, tensors, options, needs, backend, recompute's keyword arguments) from the op's arguments."""
        inputs, rest = list(args[n_loss:n_loss + n_in]), args[n_loss + n_in:]
        state, statistics_gradient, rest = rest[:stateful], rest[stateful:stateful + n_statistics], \
            rest[stateful + n_statistics:]
        tensors, opts, _, _ = split(inputs + list(rest[:n_opt]) + [False] * n_written + [args[-1]])
        needs = dict(zip(gradients, rest[n_opt:-1]))
        keywords = {"state": state[0]} if stateful else {}
        if statistics is not None:
            keywords["statistics_gradient"] = (None if any(t is None for t in statistics_gradient)
                                               else tuple(statistics_gradient))
        return args[0] if n_loss else None, tensors, opts, needs, args[-1], keywords

    def impl(*args):
        grad_loss, tensors, opts, needs, backend, keywords = arguments(args)
        grads = family.recompute(family, backend, tensors, opts, grad_loss, needs, **keywords)
        first = tensors[names[0]]
        return single(grads.get(n) if grads.get(n) is not None else first.new_empty((0,)) for n in gradients)

    def fake(*args):
        _, tensors, _, needs, _, _ = arguments(args)
        first = tensors[names[0]]
        return single(tensors[n].new_empty(tensors[n].shape) if needs[n] and tensors[n] is not None
                      else first.new_empty((0,)) for n in gradients)

    def single(values):  # a schema with one result returns a tensor, not a tuple
        values = tuple(values)
        return values[0] if len(values) == 1 else values

    op = torch.library.custom_op(f"lossops::{family.name}_backward", impl, mutates_args=(),
                                 schema=_backward_schema(family))
    op.register_fake(fake)
    return op, impl


_TENSOR_ANNOTATIONS = ("Tensor", "Optional[Tensor]", Tensor, Optional[Tensor])


def make_module(family: Family, class_name: str, *, inputs: int = 2, per_call: tuple[str, ...] = (),
                doc: Optional[str] = None, check: Optional[Callable] = None, keyword_only: bool = False) -> type:
    """The nn.Module of a public function: the constructor takes its arguments after the first `inputs` (tensor
    ones become buffers, so they move with .to()), forward(*inputs, **per_call) calls the function with them.

    As torch's loss Modules do, legacy size_average/reduce become a reduction when the Module is constructed
    (with torch's warning); everything else is checked by the function on the first call. check(**arguments)
    runs in the constructor for the checks torch makes there, after the buffers are registered, as torch's.
    keyword_only: the constructor takes its arguments by keyword only, as torch's does for some losses
    (GaussianNLLLoss).
    """
    signature = inspect.signature(family.function)
    params = [p for p in list(signature.parameters.values())[inputs:] if p.name not in per_call]
    if keyword_only:
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    legacy = {"size_average", "reduce"} & {p.name for p in params}
    stored = [p.name for p in params if p.name not in legacy]
    init_signature = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + params)

    def __init__(self, *args, **kwargs):
        bound = init_signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        torch.nn.Module.__init__(self)
        if legacy and (arguments.get("size_average") is not None or arguments.get("reduce") is not None):
            from torch.nn import _reduction
            arguments["reduction"] = _reduction.legacy_get_string(arguments.get("size_average"),
                                                                  arguments.get("reduce"))
        for name in stored:
            value = arguments[name]
            # torch registers its tensor arguments as buffers whatever they are (a list is refused here)
            if isinstance(value, Tensor) or signature.parameters[name].annotation in _TENSOR_ANNOTATIONS:
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)
        # torch's loss Modules make their own checks after their base class has taken the reduction and registered
        # the buffers (a list weight is that registration's TypeError, whatever else is wrong)
        if check is not None:
            check(**arguments)

    def forward(self, *args, **kwargs):
        # family.function as it is when called: the one lossops made serve DTensors after this Module was made
        return family.function(*args, **{name: getattr(self, name) for name in stored}, **kwargs)

    def extra_repr(self):
        return options_repr({name: getattr(self, name) for name in stored},
                            {p.name: p.default for p in params if p.name in stored})

    __init__.__signature__ = init_signature
    return type(class_name, (torch.nn.Module,), {
        "__init__": __init__, "forward": forward, "extra_repr": extra_repr, "__module__": "lossops.nn",
        "__doc__": doc or f"lossops.{family.name} as a Module: arguments as the function's, stored at construction.",
    })


def options_repr(values: dict, defaults: dict) -> str:
    """A loss Module's options for its repr: those that differ from the defaults (tensors by shape)."""
    shown = []
    for name, value in values.items():
        if isinstance(value, Tensor):
            shown.append(f"{name}=Tensor{tuple(value.shape)}")
        elif name not in defaults or not (value is defaults[name] or value == defaults[name]):
            shown.append(f"{name}={value!r}")
    return ", ".join(shown)

