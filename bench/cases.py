"""What is benchmarked: the loss families (from each one's declared `Bench`) and the implementations compared.

A family names its lossops function, the plain-PyTorch formula it replaces (that formula is also what
torch.compile compiles), how to draw a target, its keyword arguments (passed to both sides) and its shapes
as (rows, columns).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import lossops
from lossops._family import FAMILIES as LOSS_FAMILIES

Shape = tuple[int, int]
# The dtype names the command line takes (--dtype).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "fp64": torch.float64}


@dataclass(frozen=True)
class Family:
    name: str
    eager: Callable
    make_target: Callable[[torch.Tensor], torch.Tensor]
    shapes: tuple[Shape, ...]
    quick_shapes: tuple[Shape, ...]
    kwargs: dict = field(default_factory=dict)
    columns: str = "classes"  # what the second dimension means, for the plot's x axis
    inplace_variant: bool = False  # lossops takes inplace_backward=True
    make_inputs: Optional[Callable] = None  # (shape, dtype, device) -> (x, *rest) when not (x, make_target(x))
    grid_shapes: tuple = ()  # --grid's shapes, and its --quick ones
    grid_quick_shapes: tuple = ()
    targets: tuple = ()  # lossops._family.SpeedTarget
    floor: Optional[Callable] = None  # lossops._family.Bench.floor
    floor_name: str = "floor"

    @property
    def ours(self) -> Optional[Callable]:
        return getattr(lossops, self.name, None)

    def inputs(self, shape: Shape, dtype: torch.dtype, device: torch.device):
        if self.make_inputs is not None:  # (x, the other arguments as a tuple)
            x, *rest = self.make_inputs(shape, dtype, device)
            return x, tuple(rest)
        x = torch.randn(shape, dtype=dtype, device=device).requires_grad_()
        return x, self.make_target(x.detach())


# Every loss family that declares a benchmark (lossops._family.Bench).
FAMILIES: dict[str, Family] = {
    name: Family(name, b.eager, b.make_target, tuple(b.shapes), tuple(b.quick_shapes), dict(b.kwargs), b.columns,
                 b.inplace_variant, b.make_inputs, tuple(b.grid_shapes), tuple(b.grid_quick_shapes), tuple(b.targets),
                 b.floor, b.floor_name)
    for name, declared in LOSS_FAMILIES.items() if (b := declared.bench) is not None
}


@dataclass(frozen=True)
class Impl:
    """One implementation of a loss. `loss(x, target)` returns the scalar loss.

    overwrites_input: it writes into the logits, so every call gets a fresh non-leaf copy made untimed.
    floor: the memory floor it is held against ("clone" = read the logits and write a new gradient,
    "copy_" = read them and write into memory that already exists).
    """
    name: str
    loss: Callable
    overwrites_input: bool = False
    floor: str = "clone"
    warm: Optional[Callable] = None  # run once before timing (compilation)


FLOORS = {
    "clone": lambda x, _buffer: x.clone(),
    "copy_": lambda x, buffer: buffer.copy_(x),
}


def ours_name(device: torch.device) -> str:
    return "lossops-cpp" if device.type == "cpu" else "lossops-triton"


def _arguments(target) -> tuple:
    """The loss's arguments after x: one target, or a family's tuple of them (make_inputs)."""
    return target if isinstance(target, tuple) else (target,)


def differentiable(x: torch.Tensor, target) -> tuple:
    """What forward+backward differentiates: x and every other argument that requires grad (a fused linear loss's
    weight), as a training step would."""
    return (x, *(t for t in _arguments(target) if isinstance(t, torch.Tensor) and t.requires_grad))


def floor_call(family: Family, x: torch.Tensor, target, gradients: bool) -> Optional[Callable]:
    """The family's floor (Bench.floor) for these inputs, or None."""
    if family.floor is None:
        return None
    return family.floor(x.detach(), *(t.detach() if isinstance(t, torch.Tensor) else t for t in _arguments(target)),
                        gradients=gradients)


def implementations(family: Family, device: torch.device) -> list[Impl]:
    def eager(x, target):
        return family.eager(x, *_arguments(target), **family.kwargs)

    compiled = _Compiled(eager)
    impls = [Impl("eager", eager), Impl("compile", compiled, warm=compiled.warm)]
    backend = "cpp" if device.type == "cpu" else "triton"

    def ours(x, target, **extra):
        with lossops.backend(backend):
            return family.ours(x, *_arguments(target), **family.kwargs, **extra)

    impls.append(Impl(ours_name(device), ours, floor=family.floor_name if family.floor is not None else "clone"))
    if family.inplace_variant:
        impls.append(Impl(ours_name(device) + " inplace", lambda x, t: ours(x, t, inplace_backward=True),
                          overwrites_input=True, floor="copy_"))
    if family.name == "cross_entropy" and device.type == "cuda" and importlib.util.find_spec("liger_kernel"):
        from liger_kernel.transformers import LigerCrossEntropyLoss
        # Liger writes the gradient into the logits in forward, like inplace_backward=True.
        impls.append(Impl("liger", LigerCrossEntropyLoss(), overwrites_input=True, floor="copy_"))
    return impls


class _Compiled:
    """torch.compile of a loss for one shape (dynamic=False); warm() compiles it, outside any timing."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled = None

    def warm(self, x, target):
        # Earlier cases' graphs go, so this one compiles afresh and dynamo's recompile limit (after which it
        # silently runs eager) is never reached.
        torch._dynamo.reset()
        self.compiled = torch.compile(self.fn, dynamic=False)
        torch.autograd.grad(self.compiled(x, target), x)

    def __call__(self, x, target):
        return self.compiled(x, target)
