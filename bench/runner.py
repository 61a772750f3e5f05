"""Runs one case (family, dtype, shape) against every implementation and the memory floors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .cases import FLOORS, Family, Impl, Shape
from .measure import PeakMemory, Stats, time_call


@dataclass(frozen=True)
class Settings:
    warmup: int
    repeats: int
    device: torch.device
    memory: PeakMemory


@dataclass
class Row:
    op: str
    dtype: str
    shape: Shape
    impl: str
    fwd: Optional[Stats] = None
    bwd: Optional[Stats] = None
    fwdbwd: Optional[Stats] = None
    peak_bytes: Optional[int] = None
    floor: Optional[str] = None  # the floor this row is held against; None for the floor rows themselves
    loss: Optional[float] = None
    error: str = ""


# How far (relative) a loss may be from eager's float32 loss on the same inputs before its row is flagged:
# a fast kernel that computes something else is not a result. Low precision allows a few output roundings.
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _fresh_input(impl: Impl, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    if not impl.overwrites_input:
        return lambda: x

    def copy():
        # A non-leaf copy (in-place gradients refuse leaves); autograd.grad stops at it, so its MulBackward
        # never runs and nothing but the loss itself is timed.
        with torch.enable_grad():
            return x * 1
    return copy


def _gradient(loss: torch.Tensor, inp: torch.Tensor):
    return torch.autograd.grad(loss, inp)


def _forward_done(impl: Impl, fresh: Callable, target: torch.Tensor):
    def setup():
        inp = fresh()
        return inp, impl.loss(inp, target)
    return setup


def measure_impl(impl: Impl, x: torch.Tensor, target: torch.Tensor, reference_loss: float, settings: Settings,
                 row: Row) -> Row:
    fresh = _fresh_input(impl, x)
    if impl.warm is not None:
        impl.warm(x, target)
    with torch._dynamo.config.patch(error_on_recompile=True):
        # Compilation happened in warm(); a recompile now would bill compile time, so it is an error.
        row.loss = float(impl.loss(fresh(), target).detach().float())
        if not _close(row.loss, reference_loss, x.dtype):
            row.error = f"loss {row.loss:.6g} differs from eager float32's {reference_loss:.6g}"
        timed = dict(warmup=settings.warmup, repeats=settings.repeats)
        row.fwd = time_call(settings.device, fresh, lambda inp: impl.loss(inp, target), **timed)
        row.bwd = time_call(settings.device, _forward_done(impl, fresh, target), lambda s: _gradient(s[1], s[0]),
                            **timed)
        fwdbwd = lambda inp: _gradient(impl.loss(inp, target), inp)  # noqa: E731
        row.fwdbwd = time_call(settings.device, fresh, fwdbwd, **timed)
        row.peak_bytes = settings.memory.measure(fresh, fwdbwd)
    return row


def _close(value: float, reference: float, dtype: torch.dtype) -> bool:
    return abs(value - reference) <= LOSS_TOLERANCE.get(dtype, 1e-3) * max(abs(reference), 1e-6)


def _float32_loss(family: Family, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        rest = target if isinstance(target, tuple) else (target,)
        rest = tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in rest)
        return float(family.eager(x.detach().float(), *rest, **family.kwargs))


def measure_floor(name: str, x: torch.Tensor, settings: Settings, row: Row) -> Row:
    logits = x.detach()
    buffer = torch.zeros_like(logits)  # zeros, not empty: its pages are resident before timing starts
    run = lambda inp: FLOORS[name](inp, buffer)  # noqa: E731
    row.fwdbwd = time_call(settings.device, lambda: logits, run, warmup=settings.warmup, repeats=settings.repeats)
    row.peak_bytes = settings.memory.measure(lambda: logits, run)
    return row


def run_case(family: Family, shape: Shape, dtype: torch.dtype, impls: list[Impl], settings: Settings,
             step: Callable[[str], None]) -> list[Row]:
    """Every implementation and both floors on one case; a failing implementation becomes an error row."""
    torch.manual_seed(0)
    x, target = family.inputs(shape, dtype, settings.device)
    dtype_name = str(dtype).removeprefix("torch.")
    reference_loss = _float32_loss(family, x, target)
    rows = []
    for impl in impls:
        step(impl.name)
        row = Row(family.name, dtype_name, shape, impl.name, floor=impl.floor)
        try:
            rows.append(measure_impl(impl, x, target, reference_loss, settings, row))
        except Exception as error:  # noqa: BLE001 - one broken implementation must not end the run
            row.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            rows.append(row)
    for name in FLOORS:
        step(f"floor {name}")
        rows.append(measure_floor(name, x, settings, Row(family.name, dtype_name, shape, f"floor {name}")))
    return rows
