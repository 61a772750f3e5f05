"""What is benchmarked: the op families (one `register(...)` each) and the implementations compared.

A family names its lossops function, the plain-PyTorch formula it replaces (that formula is also what
torch.compile compiles), how to draw a target, its keyword arguments (passed to both sides) and its shapes
as (rows, columns). Families whose function lossops does not have yet are skipped.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import lossops

Shape = tuple[int, int]


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

    @property
    def ours(self) -> Optional[Callable]:
        return getattr(lossops, self.name, None)

    def inputs(self, shape: Shape, dtype: torch.dtype, device: torch.device):
        x = torch.randn(shape, dtype=dtype, device=device).requires_grad_()
        return x, self.make_target(x.detach())


FAMILIES: dict[str, Family] = {}


def register(name: str, eager: Callable, make_target: Callable, shapes, quick_shapes=((128, 256), (128, 1024)),
             **options) -> None:
    FAMILIES[name] = Family(name, eager, make_target, tuple(shapes), tuple(quick_shapes), **options)


def class_index(x: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, x.shape[1], x.shape[:1], device=x.device)


def binary(x: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, x.shape, device=x.device).to(x.dtype)


def regression(x: torch.Tensor) -> torch.Tensor:
    return torch.randn_like(x)


def torchvision_sigmoid_focal_loss(x, target, alpha=0.25, gamma=2.0, reduction="mean"):
    """torchvision.ops.sigmoid_focal_loss, written out so torchvision is not needed."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


def softmax_focal_loss(x, target, gamma=2.0, reduction="mean"):
    log_p = F.log_softmax(x, dim=1).gather(1, target[:, None]).squeeze(1)
    loss = -((1 - log_p.exp()) ** gamma) * log_p
    return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss


LLM_SHAPES = ((256, 1000), (4096, 1024), (4096, 8192), (4096, 32000), (4096, 128256))
ELEMENTWISE_SHAPES = ((256, 1000), (4096, 1024), (4096, 4096))

register("cross_entropy", F.cross_entropy, class_index, LLM_SHAPES, columns="vocab size", inplace_variant=True)
register("softmax_focal_loss", softmax_focal_loss, class_index, ((256, 1000), (65536, 80), (4096, 8192), (4096, 32000)),
         kwargs={"gamma": 2.0, "reduction": "mean"})
register("sigmoid_focal_loss", torchvision_sigmoid_focal_loss, binary, ((256, 80), (65536, 80), (4096, 1000)),
         quick_shapes=((128, 80), (128, 320)), kwargs={"alpha": 0.25, "gamma": 2.0, "reduction": "mean"})
register("binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits, binary, ELEMENTWISE_SHAPES,
         columns="columns")
for _name in ("smooth_l1_loss", "huber_loss", "l1_loss", "mse_loss"):
    register(_name, getattr(F, _name), regression, ELEMENTWISE_SHAPES, columns="columns")


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


def implementations(family: Family, device: torch.device) -> list[Impl]:
    def eager(x, target):
        return family.eager(x, target, **family.kwargs)

    compiled = _Compiled(eager)
    impls = [Impl("eager", eager), Impl("compile", compiled, warm=compiled.warm)]
    backend = "cpp" if device.type == "cpu" else "triton"

    def ours(x, target, **extra):
        with lossops.backend(backend):
            return family.ours(x, target, **family.kwargs, **extra)

    impls.append(Impl(ours_name(device), ours))
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
