"""Whether a call may take the C++ eager path (csrc/eager_path.cpp): one call into C++ that runs the kernel,
reduces, casts and creates the autograd node, instead of the torch.library custom op; and the routes families
declare for it (EagerRoute), the data that path runs on.

It serves plain CPU tensors in eager mode on the cpp backend. It is tried before the Python checks: a route's
callable (EagerRoute.call, C++ called with no Python layer between) returns None for anything it does not
recognise, bad arguments included, and the Python path then raises, so each error keeps one source. It makes its
own checks of the tensors' types and devices, the backend choice (read where lossops._backend keeps it), forward-mode
AD, function and dispatch modes, functorch transforms and autocast. Everything that needs the op to be visible to
PyTorch takes the custom op: torch.compile (the public function calls the route only where `compiling()` is False,
which Dynamo reads as True), tensor subclasses (DTensor, fake and functional tensors), dispatch and function modes
(opcheck, FlopCounterMode, make_fx), functorch transforms, forward-mode AD and autocast.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Callable, Optional

import torch
import torch.autograd.forward_ad as _forward_ad

from . import _backend, _cpp


_Tensor = torch.Tensor
_is_compiling = torch.compiler.is_compiling
# A family's public function calls its route only where this is False: Dynamo reads it as True and traces the op.
# is_dynamo_compiling returns a constant outside Dynamo, a third of is_compiling's cost on a tiny call's path; the
# other tracers (make_fx, non-strict export) run the function for real under a mode, which the route itself refuses.
compiling = torch.compiler.is_dynamo_compiling
_torch_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_autocast = torch.is_autocast_enabled


def _no_mode_active() -> bool:
    return not (_is_compiling() or _torch_function_mode() or _dispatch_modes() or _functorch_active()
                or _forward_ad._current_level >= 0 or _autocast("cpu"))


def applies(*tensors) -> bool:
    for t in tensors:
        if t is not None and type(t) is not _Tensor:
            return False
    return _no_mode_active()


# The kernel operands each layout of csrc/eager_path.cpp makes, in its order; the first ones are the call's tensors.
LAYOUT_OPERANDS = {
    "class_rows": ("input", "target", "weight"),  # (N, C, d...) logits, int64 class indices, optional class weight
    "same_shape": ("input", "target"),  # floating input and target of one shape
    "same_shape_aux": ("input", "target", "aux"),  # and a third operand of that shape and dtype
    "row_pairs": ("input1", "input2", "target"),  # (N, D) rows of one floating dtype and a real (N,) target
    "row_triples": ("anchor", "positive", "negative"),  # three (N, D) rows of one floating dtype
    "sequences": ("log_probs", "targets", "input_lengths", "target_lengths", "target_offsets"),  # CTC
    # two (..., C) logits tensors of one shape (distillation's student and teacher), optional int64 class indices
    "token_rows": ("student", "teacher", "target"),
    "label_lists": ("input", "target"),  # (N, C) input, int64 (N, C) lists of class indices (multi-label)
}
CALL_TENSORS = {"class_rows": 3, "same_shape": 2, "same_shape_aux": 3, "row_pairs": 3, "row_triples": 3, "sequences": 4,
                "token_rows": 3, "label_lists": 2}
# Kernel parameters a layout fills with the [inner, period] broadcast layout of one of its operands: [1, numel], the
# operand having every element of the input.
OPERAND_LAYOUTS = {"same_shape_aux": {"aux_layout": "aux"}}
DENOMINATORS = ("elements", "batch", "kept_rows", "kept_weight", "target_lengths")


@dataclasses.dataclass(frozen=True)
class Scalar:
    """One scalar argument of an eager call, after its tensors: the kernel parameter it fills and the values the
    C++ path serves (anything else returns None there, and the public function's checks raise or serve it)."""
    parameter: str
    kind: str = "real"            # "int", "real" (finite), "flag"
    low: float = -math.inf        # served: low <= value <= high
    high: float = math.inf
    below_classes: bool = False   # an int in [0, C), C the layout's class count
    fills_weight: bool = False    # a real that becomes the per-class weight (every class alike)


@dataclasses.dataclass
class EagerRoute:
    """What the C++ eager path needs to serve a family's plain CPU calls, declared once with the family:

      layout: which call tensors and kernel views (LAYOUT_OPERANDS), the loss's item shape and how a per-item
        grad_output broadcasts against the gradients;
      denominator: the mean's: "elements" (every element), "batch" (the first dimension's size), "kept_rows"
        (rows whose target is not ignore_index; every row without a target), "kept_weight" (their class weights'
        sum in index order, their count without weights), "target_lengths" (each sequence's loss over its target
        length, then over the batch);
      scalars: the call's scalar arguments (Scalar), in call order;
      gradients: kernel parameter -> the call tensor whose gradient it writes (a call tensor that requires grad
        without one takes the custom op);
      constants: every other kernel parameter's value on this route.
    The kernel's "grad_scale", "per_element" and "row_state" parameters are the path's own (row_state: the state an
    in-place call's forward saves for its backward, None otherwise). declare() checks that every kernel
    parameter has exactly one source, so a route cannot drift from its kernel's parameter list."""
    layout: str
    denominator: str
    scalars: tuple[Scalar, ...] = ()
    gradients: dict = dataclasses.field(default_factory=dict)
    constants: dict = dataclasses.field(default_factory=dict)
    node: str = "LossopsBackward"     # the autograd node's name
    number: Optional[int] = None      # set by declare(): the C++ path's route number
    # Set by declare(): call(reduction, *tensors, *scalars) runs the route, returning the loss with its autograd node
    # or None where it does not serve the call; call_in_place the same with inplace_backward=True. The C++ module's
    # callables once it is loaded (the first call loads it); functions returning None without it.
    call: Callable = dataclasses.field(default=None, repr=False, compare=False)
    call_in_place: Callable = dataclasses.field(default=None, repr=False, compare=False)


_ROUTES: list[tuple[str, EagerRoute, tuple]] = []
_sent = 0  # how many of _ROUTES the loaded C++ module holds


def declare(route: EagerRoute, kernel: str, parameters: tuple[str, ...]) -> EagerRoute:
    """Numbers a family's route and works out where each of its kernel's parameters comes from."""
    operands = LAYOUT_OPERANDS[route.layout]
    layouts = OPERAND_LAYOUTS.get(route.layout, {})
    if route.denominator not in DENOMINATORS:
        raise ValueError(f"lossops: unknown eager-route denominator {route.denominator!r}")
    scalars = {s.parameter: i for i, s in enumerate(route.scalars)}
    sources = []
    for name in parameters:
        found = [source for source in (
            ("filled_weight" if route.scalars[scalars[name]].fills_weight else "scalar", scalars[name], None)
            if name in scalars else None,
            ("tensor", operands.index(name), None) if name in operands and name not in scalars else None,
            ("operand_layout", operands.index(layouts[name]), None) if name in layouts else None,
            ("gradient", operands.index(route.gradients[name]), None) if name in route.gradients else None,
            ("grad_scale", 0, None) if name == "grad_scale" else None,
            ("row_state", 0, None) if name == "row_state" else None,
            ("per_item", 0, None) if name == "per_element" else None,
            ("constant", 0, route.constants[name]) if name in route.constants else None) if source]
        if len(found) != 1:
            raise ValueError(f"lossops: eager route for kernel {kernel}: parameter {name} has {len(found)} sources")
        sources.append((name, *found[0]))
    stray = (set(scalars) | set(route.gradients) | set(route.constants)) - set(parameters)
    if stray:
        raise ValueError(f"lossops: eager route for kernel {kernel} names parameters it does not take: {sorted(stray)}")
    route.number = len(_ROUTES)
    _ROUTES.append((kernel, route, tuple(sources)))
    route.call, route.call_in_place = _loading_call(route, False), _loading_call(route, True)
    if _module is not None:
        _bind(_module)
    return route


_module: Any = None    # the C++ module the routes are bound to
_disabled = 0          # disabled() contexts open


def _not_served(*arguments) -> None:
    return None


def _loading_call(route: EagerRoute, in_place: bool) -> Callable:
    """A route's callable until the C++ module is loaded: loads it, binds every route and runs the call."""
    def call(*arguments):
        if not bind() or _disabled:
            return None
        return (route.call_in_place if in_place else route.call)(*arguments)
    return call


def _bind(module: Any) -> None:
    global _sent
    for kernel, route, sources in _ROUTES[_sent:]:
        scalars = [(s.kind, float(s.low), float(s.high), s.below_classes) for s in route.scalars]
        number = module.declare_eager_route(kernel, route.layout, route.denominator, list(sources), scalars,
                                            route.node)
        assert number == route.number, (number, route.number)
        _sent += 1
    if _disabled:
        return
    for _, route, _ in _ROUTES:
        route.call = module.eager_route_callable(route.number, False)
        route.call_in_place = module.eager_route_callable(route.number, True)


def bind() -> bool:
    """Loads the C++ module and binds every declared route to it; False where it cannot be loaded (the routes then
    serve nothing, and every call takes its family's Python path)."""
    global _module
    if _module is None:
        try:
            module = _cpp.module()
        except ImportError:
            for _, route, _ in _ROUTES:
                route.call = route.call_in_place = _not_served
            return False
        # The C++ side reads the backend choice where lossops._backend keeps it (see get_backend there).
        module.set_backend_sources(_backend._override, vars(_backend), vars(os), _backend._ENVIRON,
                                   _backend._ENVIRON_BYTES)
        _module = module
    _bind(_module)
    return True


def routes() -> list[EagerRoute]:
    """Every declared route, in number order."""
    return [route for _, route, _ in _ROUTES]


@contextlib.contextmanager
def disabled():
    """No route serves a call inside (every call takes its family's Python path), for tests of that path."""
    global _disabled
    bind()
    _disabled += 1
    for _, route, _ in _ROUTES:
        route.call = route.call_in_place = _not_served
    try:
        yield
    finally:
        _disabled -= 1
        if _disabled == 0 and _module is not None:
            _bind(_module)
