"""A loss family is declared once; its op, fake implementation, autograd, Module and registry entries are made here.

A family module (lossops/<family>.py) writes, per public loss:
  - its options as a frozen dataclass (typed fields whose defaults reproduce torch),
  - a `Family`: the op's tensor inputs (which of them receive gradients), that options record, its `Kernel`
    (one name, the same keyword parameters on both backends), `run` (the op's body: one kernel call), the
    loss's shape for the fake implementation, the plain-PyTorch reference, and its test and benchmark cases,
  - its public function (torch's signature and checks), which ends in `family.apply(...)`.
`register(family)` then makes the custom op `lossops::<name>`: its schema comes from the inputs and the options'
fields, its autograd rebuilds the options by name (never by position) and multiplies the gradients the kernel
wrote in forward by grad_output (lossops._reduce). `FAMILIES` is what lossops' exports, lossops.nn, the
compile / opcheck / bad-input / Triton-AOT / kernel-ABI tests, selfcheck and the benchmark iterate.
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


@dataclasses.dataclass(frozen=True)
class SpeedTarget:
    """lossops at least `speedup` times eager's speed, forward+backward, at `shape`; dtype ("float32",
    "bfloat16") and threads ("1", "all") restrict it, None meaning every one."""
    shape: tuple
    speedup: float
    dtype: Optional[str] = None
    threads: Optional[str] = None


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
    run: Callable                            # (family, backend, tensors, options, grads) -> (loss, {input: grad})
    loss_like: Callable                      # (tensors, options) -> an empty tensor shaped like the op's loss
    reference: Optional[Callable] = None     # plain PyTorch, the "reference" backend
    item_shape: Callable = lambda tensors, options: None  # how a per-item grad_output broadcasts on a gradient
    function: Optional[Callable] = None      # the public function (given in the declaration)
    # A public function that serves plain calls itself first (the C++ eager path) and calls family.full_path with
    # the same arguments for everything else: lossops._dtensor makes full_path, not function, serve DTensors, so
    # no wrapper runs before the eager path.
    full_path: Optional[Callable] = None
    module: Optional[type] = None            # its nn.Module (set from make_module)
    cases: tuple[Case, ...] = ()
    bad_inputs: Optional[str] = None         # its kind in tests/test_bad_inputs.py ("classes", "elementwise")
    torch_fn: Optional[Callable] = None      # torch's counterpart with the same signature, the tests' oracle
    selfcheck: Optional[tuple] = None        # (keyword arguments, truth(x, t), make(dtype)) for lossops.selfcheck
    bench: Optional[Bench] = None
    sharding: Optional[Sharding] = None      # how it splits over a DTensor device mesh (None: Replicate only)
    # Gradients formed in backward instead of written in forward, where gradient_in_backward(backend, options)
    # says so: where they cannot be formed in forward and scaled afterwards (a weight's gradient sums rows that
    # each have their own grad_output), or where a backend reads the input once more rather than write and scale
    # a gradient. recompute(family, backend, tensors, options, grad_loss, needs[, state]) -> {input: gradient},
    # run by the op lossops::<name>_backward from the inputs saved in forward and, for a family with a state_like,
    # the state its run returned third: state_like(tensors, options) is an empty tensor shaped as that state.
    recompute: Optional[Callable] = None
    gradient_in_backward: Callable = lambda backend, options: False
    state_like: Optional[Callable] = None
    kernel_options: Optional[Callable] = None  # (tensors, options) -> its own kernel arguments (shared drivers)
    # The C++ eager path's routes for plain CPU calls (lossops._eager.EagerRoute): the public function calls
    # cpp.eager_loss(route.number, ...) with them before its own checks.
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

    def apply(self, backend: str, tensors: dict, options, grads: dict) -> Tensor:
        """Runs the op: tensors by input name, the options record, which differentiable inputs want a gradient."""
        args = [tensors.get(i.name) for i in self.inputs]
        # as the custom op's schema would convert them (numpy scalars, one-element tensors): the eager call below
        # passes them straight to the kernels
        args += [convert(getattr(options, n)) for n, convert in zip(self.option_fields, self.option_converters)]
        args += [bool(grads.get(i.name, False)) for i in self.inputs if i.differentiable]
        args.append(backend)
        tensor_inputs = args[:len(self.inputs)]
        if _eager.applies(*tensor_inputs):
            if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensor_inputs)):
                return self.eager_parts[0](*args)[0]  # nothing to differentiate: no autograd node at all
            return LossopsEager.apply((self, args), *tensor_inputs)
        return self.op(*args)[0]


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
        return outputs[0]

    @staticmethod
    def backward(ctx, grad_loss):
        _, _, backward, n_in = ctx.family.eager_parts
        return (None, *backward(ctx, grad_loss, first_input=1)[:n_in])


FAMILIES: dict[str, Family] = {}

_SCHEMA_TYPES = {int: "int", float: "float", bool: "bool", str: "str", list[int]: "int[]", list[float]: "float[]",
                 Tensor: "Tensor"}


def _schema_type(annotation) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _schema_type(inner) + "?"
    return _SCHEMA_TYPES[annotation]


def _schema(family: Family) -> str:
    hints = typing.get_type_hints(family.options)
    params = [f"Tensor{'?' if i.optional else ''} {i.name}" for i in family.inputs]
    params += [f"{_schema_type(hints[n])} {n}" for n in family.option_names()]
    grads = [i.name for i in family.inputs if i.differentiable]
    params += [f"bool grad_{n}" for n in grads] + ["str backend"]
    outputs = ", ".join(["Tensor loss"] + [f"Tensor grad_{n}" for n in grads] + ["Tensor state"] * has_state(family))
    return f"({', '.join(params)}) -> ({outputs})"


def has_state(family: Family) -> bool:
    """Whether the family's op has a state output (the values its backward reads besides the inputs)."""
    return family.state_like is not None


def _identity(value):
    return value


def _converter(annotation) -> Callable:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        convert = _converter(inner)
        return lambda value: None if value is None else convert(value)
    return {int: int, float: float, bool: bool}.get(annotation, _identity)


def register(family: Family) -> Family:
    """Makes the custom op lossops::<name> with its fake implementation and autograd, and records the family."""
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

    stateful = has_state(family)
    op, impl = _forward_op(family, names, differentiable, split)

    def setup_context(ctx, inputs, output, eager=False):
        tensors, opts, grads, backend = split(inputs)
        ctx.recompute = family.gradient_in_backward(backend, opts)
        ctx.eager = eager
        if ctx.recompute:  # backward recomputes from the inputs and the state (lossops::<name>_backward)
            ctx.save_for_backward(*(tensors[n] for n in names), *output[len(output) - stateful:])
            ctx.arguments = inputs[n_in:]
            ctx.set_materialize_grads(False)
            if not eager:
                ctx.mark_non_differentiable(*output[1:])
            return
        ctx.save_for_backward(*output[1:1 + len(differentiable)])
        ctx.computed = grads
        ctx.item_shape = family.item_shape(tensors, opts) if opts.reduction == "none" else None
        if eager:  # the gradients are not outputs there
            ctx.set_materialize_grads(False)
        else:
            _reduce.mark_gradient_outputs(ctx, *output[1:])

    def backward(ctx, grad_loss, *_unused, first_input=0):
        if ctx.recompute:
            return recomputed_backward(ctx, grad_loss, first_input)
        saved = dict(zip(differentiable, ctx.saved_tensors))
        result = []
        for index, name in enumerate(names):
            if not ctx.needs_input_grad[first_input + index]:
                result.append(None)
                continue
            if name not in saved:
                raise RuntimeError(f"lossops: {family.name} computes no gradient with respect to {name} (torch "
                                   "defines none, or the public function takes the reference path for it)")
            if not ctx.computed[name]:
                raise RuntimeError(f"lossops: lossops::{family.name} ran with grad_{name}=False; call "
                                   f"lossops.{family.name} with grad mode enabled and {name} requiring grad")
            result.append(_reduce.apply_grad_output(saved[name], grad_loss, ctx.item_shape))
        return (*result, *(None,) * (n_opt + len(differentiable) + 1))

    def recomputed_backward(ctx, grad_loss, first_input):
        needs = [ctx.needs_input_grad[first_input + names.index(n)] for n in differentiable]
        for index, name in enumerate(names):
            if ctx.needs_input_grad[first_input + index] and name not in differentiable:
                raise RuntimeError(f"lossops: {family.name} computes no gradient with respect to {name}")
        if grad_loss is None:
            return (None,) * (n_in + n_opt + len(differentiable) + 1)
        _reduce.refuse_double_backward()
        saved = ctx.saved_tensors
        # A plain eager call runs the backward op's body directly, as LossopsEager runs the op's: same code, without
        # the custom-op dispatch.
        run = backward_parts[1] if ctx.eager else backward_parts[0]
        recomputed = run(grad_loss, *saved, *ctx.arguments[:n_opt], *needs, ctx.arguments[-1])
        grads = dict(zip(differentiable, (recomputed,) if isinstance(recomputed, Tensor) else recomputed))
        result = [grads[n] if n in grads and need_grad else None
                  for n, need_grad in zip(names, ctx.needs_input_grad[first_input:first_input + n_in])]
        return (*result, *(None,) * (n_opt + len(differentiable) + 1))

    for route in family.eager_routes:
        _eager.declare(route, family.kernel.name, family.kernel.parameters)
    backward_parts = None
    if family.recompute is not None:
        backward_parts = _backward_op(family, names, differentiable, n_in, n_opt, split)
    op.register_autograd(backward, setup_context=setup_context)
    family.eager_parts = (impl, setup_context, backward, n_in)
    family.split_arguments = split
    family.op = op
    if family.name in FAMILIES:
        raise RuntimeError(f"lossops: a loss family named {family.name} is already registered")
    FAMILIES[family.name] = family
    return family


def _forward_op(family: Family, names, differentiable, split):
    """lossops::<name> with its fake implementation: (loss, the gradients written in forward, [the state its
    backward reads]). Returns the op and its body."""
    stateful = has_state(family)

    def empty(like: Tensor) -> Tensor:
        return like.new_empty((0,))

    def impl(*args):
        tensors, opts, grads, backend = split(args)
        loss, written, *state = family.run(family, backend, tensors, opts, grads)
        first = tensors[names[0]]
        state = (state[0] if state and state[0] is not None else empty(first),) if stateful else ()
        return (loss, *(written.get(n) if written.get(n) is not None else empty(first) for n in differentiable),
                *state)

    def fake(*args):
        tensors, opts, grads, backend = split(args)
        first = tensors[names[0]]
        in_forward = not family.gradient_in_backward(backend, opts)
        state = ((empty(first) if in_forward else family.state_like(tensors, opts)),) if stateful else ()
        return (family.loss_like(tensors, opts),
                *(tensors[n].new_empty(tensors[n].shape) if grads[n] and in_forward else empty(first)
                  for n in differentiable), *state)

    op = torch.library.custom_op(f"lossops::{family.name}", impl, mutates_args=(), schema=_schema(family))
    op.register_fake(fake)
    return op, impl


def _backward_op(family: Family, names, differentiable, n_in: int, n_opt: int, split):
    """lossops::<name>_backward: the gradients recomputed from the inputs (and the forward's state). Returns the op
    and its body."""
    stateful = has_state(family)
    params = _schema(family)[1:].split(") -> (")[0].split(", ")
    params = [p for p in params if not p.startswith("bool grad_")]
    params[n_in:n_in] = ["Tensor state"] * stateful
    params = ["Tensor grad_loss"] + params
    params[-1:-1] = [f"bool needs_{n}" for n in differentiable]
    schema = f"({', '.join(params)}) -> ({', '.join(f'Tensor grad_{n}' for n in differentiable)})"

    def arguments(args):
        inputs, state = list(args[1:n_in + 1]), args[n_in + 1:n_in + 1 + stateful]
        options = list(args[n_in + 1 + stateful:n_in + 1 + stateful + n_opt])
        tensors, opts, _, _ = split(inputs + options + [False] * len(differentiable) + [args[-1]])
        needs = dict(zip(differentiable, args[n_in + 1 + stateful + n_opt:-1]))
        return args[0], tensors, opts, needs, args[-1], {"state": state[0]} if stateful else {}

    def impl(*args):
        grad_loss, tensors, opts, needs, backend, state = arguments(args)
        grads = family.recompute(family, backend, tensors, opts, grad_loss, needs, **state)
        first = tensors[names[0]]
        return single(grads.get(n) if grads.get(n) is not None else first.new_empty((0,)) for n in differentiable)

    def fake(*args):
        _, tensors, _, needs, _, _ = arguments(args)
        first = tensors[names[0]]
        return single(tensors[n].new_empty(tensors[n].shape) if needs[n] and tensors[n] is not None
                      else first.new_empty((0,)) for n in differentiable)

    def single(gradients):  # a schema with one result returns a tensor, not a tuple
        gradients = tuple(gradients)
        return gradients[0] if len(gradients) == 1 else gradients

    op = torch.library.custom_op(f"lossops::{family.name}_backward", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op, impl


_TENSOR_ANNOTATIONS = ("Tensor", "Optional[Tensor]", Tensor, Optional[Tensor])


def make_module(family: Family, class_name: str, *, inputs: int = 2, per_call: tuple[str, ...] = (),
                doc: Optional[str] = None, check: Optional[Callable] = None) -> type:
    """The nn.Module of a public function: the constructor takes its arguments after the first `inputs` (tensor
    ones become buffers, so they move with .to()), forward(*inputs, **per_call) calls the function with them.

    As torch's loss Modules do, legacy size_average/reduce become a reduction when the Module is constructed
    (with torch's warning); everything else is checked by the function on the first call. check(**arguments)
    runs in the constructor for the checks torch makes there.
    """
    signature = inspect.signature(family.function)
    params = [p for p in list(signature.parameters.values())[inputs:] if p.name not in per_call]
    legacy = {"size_average", "reduce"} & {p.name for p in params}
    stored = [p.name for p in params if p.name not in legacy]
    init_signature = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)] + params)

    def __init__(self, *args, **kwargs):
        bound = init_signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.pop("self")
        torch.nn.Module.__init__(self)
        if check is not None:
            check(**arguments)
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

