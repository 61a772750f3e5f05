"""Runs one case (family, dtype, shape) against every implementation and the memory floors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .cases import FLOORS, Family, Impl, Shape, differentiable, floor_call
from .measure import PeakMemory, Stats, time_interleaved


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


def _gradient(loss: torch.Tensor, inp: torch.Tensor, target):
    return torch.autograd.grad(loss, differentiable(inp, target))


def _forward_done(impl: Impl, fresh: Callable, target: torch.Tensor):
    def setup():
        inp = fresh()
        return inp, impl.loss(inp, target)
    return setup


def prepare_impl(impl: Impl, x: torch.Tensor, target: torch.Tensor, reference_loss: float, row: Row):
    """Compiles (warm) and checks the loss; returns the three phases' (setup, run) pairs, timed by run_case."""
    fresh = _fresh_input(impl, x)
    if impl.warm is not None:
        impl.warm(x, target)
    with torch._dynamo.config.patch(error_on_recompile=True):  # warm() compiled; a recompile now is an error
        row.loss = float(impl.loss(fresh(), target).detach().float())
    if not _close(row.loss, reference_loss, x.dtype):
        row.error = f"loss {row.loss:.6g} differs from eager float32's {reference_loss:.6g}"
    return {"fwd": (fresh, lambda inp: impl.loss(inp, target)),
            "bwd": (_forward_done(impl, fresh, target), lambda s: _gradient(s[1], s[0], target)),
            "fwdbwd": (fresh, lambda inp: _gradient(impl.loss(inp, target), inp, target))}


def _close(value: float, reference: float, dtype: torch.dtype) -> bool:
    return abs(value - reference) <= LOSS_TOLERANCE.get(dtype, 1e-3) * max(abs(reference), 1e-6)


def _float32_loss(family: Family, x: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        rest = target if isinstance(target, tuple) else (target,)
        rest = tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in rest)
        return float(family.eager(x.detach().float(), *rest, **family.kwargs))


def _floor_call(name: str, x: torch.Tensor):
    logits = x.detach()
    buffer = torch.zeros_like(logits)  # zeros, not empty: its pages are resident before timing starts
    return (lambda: logits), (lambda inp: FLOORS[name](inp, buffer))


def run_case(family: Family, shape: Shape, dtype: torch.dtype, impls: list[Impl], settings: Settings,
             step: Callable[[str], None]) -> list[Row]:
    """Every implementation and both floors on one case; a failing implementation becomes an error row.

    Each phase is timed interleaved, as the grid does (bench.measure.time_interleaved): one sample of every
    implementation (and, for fwd+bwd, of each floor) in turn, medians and IQR over `settings.repeats` rounds.
    """
    torch.manual_seed(0)
    x, target = family.inputs(shape, dtype, settings.device)
    dtype_name = str(dtype).removeprefix("torch.")
    reference_loss = _float32_loss(family, x, target)
    rows, phases = [], {}
    for impl in impls:
        step(impl.name)
        row = Row(family.name, dtype_name, shape, impl.name, floor=impl.floor)
        rows.append(row)
        try:
            phases[impl.name] = (row, prepare_impl(impl, x, target, reference_loss, row))
        except Exception as error:  # noqa: BLE001 - one broken implementation must not end the run
            row.error = _error(error)
    floors = {}
    for name in FLOORS:
        step(f"floor {name}")
        floors[f"floor {name}"] = (Row(family.name, dtype_name, shape, f"floor {name}"), _floor_call(name, x))
    if (work := floor_call(family, x, target, gradients=True)) is not None:
        step(f"floor {family.floor_name}")
        floors[f"floor {family.floor_name}"] = (Row(family.name, dtype_name, shape, f"floor {family.floor_name}"),
                                                (lambda: None, lambda _: work()))
    rows += [row for row, _ in floors.values()]
    timed = dict(warmup=settings.warmup, repeats=settings.repeats)
    # torch.compile happened in prepare_impl (warm); a recompile while timing would bill compile time: an error.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for phase in ("fwd", "bwd", "fwdbwd"):
            calls = {name: calls[phase] for name, (row, calls) in phases.items() if not row.error.startswith("!")}
            if phase == "fwdbwd":
                calls.update({name: call for name, (row, call) in floors.items()})
            try:
                stats = time_interleaved(settings.device, calls, **timed)
            except Exception:  # noqa: BLE001 - find the implementation that fails alone, time the others
                stats = {}
                for name, call in calls.items():
                    try:
                        stats.update(time_interleaved(settings.device, {name: call}, **timed))
                    except Exception as error:  # noqa: BLE001
                        (phases[name][0] if name in phases else floors[name][0]).error = "!" + _error(error)
            for name, value in stats.items():
                setattr(phases[name][0] if name in phases else floors[name][0], phase, value)
        for name, (row, calls) in [*phases.items(), *floors.items()]:
            if not row.error.startswith("!"):
                setup, run = calls["fwdbwd"] if name in phases else calls
                row.peak_bytes = settings.memory.measure(setup, run)
    for row in rows:
        row.error = row.error.removeprefix("!")
    return rows


def _error(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
