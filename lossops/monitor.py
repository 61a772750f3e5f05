"""Gradient monitoring: loss and per-layer gradient norms recorded through hooks, NaN/Inf flagged on arrival.

    monitor = lossops.monitor.GradientMonitor(model, log_dir="runs/exp1")
    for x, y in loader:
        loss = lossops.cross_entropy(model(x), y)
        loss.backward()
        monitor.step(loss)                  # after backward, before the gradients are zeroed
        optimizer.step()
        optimizer.zero_grad()
    monitor.close()

Each parameter's gradient norm is taken by a post-accumulate-grad hook the moment backward finishes with it,
so `step()` only gathers values (one host sync per step). Hooks fire in backward order, nearest the loss
first; when a NaN/Inf enters in the middle of the network every parameter upstream of that point is poisoned
too, and the first one to fire names the layer where it entered. With `tensorboard` installed the values go
to a `torch.utils.tensorboard.SummaryWriter`, otherwise to `<log_dir>/metrics.csv`.
"""
from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn

__all__ = ["GradientMonitor", "NonFiniteEvent", "NonFiniteGradientError", "StepRecord"]


class NonFiniteGradientError(FloatingPointError):
    """Raised by GradientMonitor.step(raise_on_nonfinite=True) when a loss or gradient is NaN/Inf."""


@dataclass(frozen=True)
class NonFiniteEvent:
    step: int
    layer: str  # module owning `parameter` ("" for the model itself), or "loss"
    parameter: Optional[str]  # None when the loss itself is non-finite
    kind: str  # "nan" or "inf"
    parameters: tuple[str, ...] = ()  # every non-finite gradient of the step, in backward order

    def __str__(self) -> str:
        where = "the loss" if self.parameter is None else f"gradient of {self.parameter} (layer {self.layer!r})"
        also = len(self.parameters) - (self.parameter is not None)
        return f"step {self.step}: {self.kind.upper()} in {where}" + (f", and {also} more parameters" if also else "")


@dataclass
class StepRecord:
    step: int
    loss: float
    total_grad_norm: float
    layer_grad_norms: dict[str, float] = field(default_factory=dict)
    event: Optional[NonFiniteEvent] = None


def _layer_of(parameter_name: str) -> str:
    return parameter_name.rpartition(".")[0]


def _kind(value: float) -> str:
    return "nan" if math.isnan(value) else "inf"


def _root_sum_squares(values) -> float:
    return math.sqrt(math.fsum(v * v for v in values))


class _CsvWriter:
    """One row per step; columns fixed at construction so the file loads as a table."""

    def __init__(self, log_dir: str, tags: list[str]):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "metrics.csv")
        self._file = open(self.path, "w", newline="")
        self._columns = ["step", *tags, "nonfinite"]
        self._csv = csv.DictWriter(self._file, self._columns, restval="")
        self._csv.writeheader()

    def write(self, step: int, scalars: dict[str, float], event: Optional[NonFiniteEvent]) -> None:
        self._csv.writerow({"step": step, **scalars, "nonfinite": str(event) if event else ""})
        # Flushed per step so a run that dies (the case this monitor exists for) leaves its rows on disk.
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _TensorBoardWriter:
    def __init__(self, log_dir: str, summary_writer_cls):
        self._writer = summary_writer_cls(log_dir=log_dir)
        self.path = self._writer.get_logdir()

    def write(self, step: int, scalars: dict[str, float], event: Optional[NonFiniteEvent]) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        if event is not None:
            self._writer.add_text("nonfinite", str(event), step)

    def close(self) -> None:
        self._writer.close()


def _summary_writer_cls():
    # torch.utils.tensorboard imports the optional `tensorboard` package and raises ImportError without it.
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter


class GradientMonitor:
    """Records the loss and per-layer gradient norms of `model` each step; flags the first NaN/Inf.

    log_dir: where to write (None: keep the records in memory only).
    writer: "auto" (TensorBoard when installed, else CSV), "tensorboard" or "csv".
    raise_on_nonfinite: raise NonFiniteGradientError from step() instead of only warning.
    A warning is issued on the step a NaN/Inf first appears (and again whenever it reappears after finite
    steps); every non-finite step is kept in `events`.
    """

    def __init__(self, model: nn.Module, log_dir: Optional[Union[str, os.PathLike]] = None, *,
                 writer: str = "auto", raise_on_nonfinite: bool = False):
        if writer not in ("auto", "tensorboard", "csv"):
            raise ValueError(f"writer must be 'auto', 'tensorboard' or 'csv', got {writer!r}")
        self.raise_on_nonfinite = raise_on_nonfinite
        self.history: list[StepRecord] = []
        self.events: list[NonFiniteEvent] = []
        self._step = 0
        self._previous_finite = True
        self._pending: dict[str, Tensor] = {}
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.layers = list(dict.fromkeys(_layer_of(name) for name, _ in named))
        self._handles = [p.register_post_accumulate_grad_hook(self._norm_hook(name)) for name, p in named]
        self.writer_kind = None
        self._writer = None
        if log_dir is not None:
            self._writer = self._open_writer(os.fspath(log_dir), writer)

    def _open_writer(self, log_dir: str, writer: str):
        if writer != "csv":
            try:
                summary_writer_cls = _summary_writer_cls()
            except ImportError as error:
                if writer == "tensorboard":
                    raise ImportError("lossops.monitor: writer='tensorboard' needs the `tensorboard` package "
                                      "(pip install tensorboard)") from error
            else:
                self.writer_kind = "tensorboard"
                return _TensorBoardWriter(log_dir, summary_writer_cls)
        self.writer_kind = "csv"
        return _CsvWriter(log_dir, ["loss", "grad_norm/total"] + [f"grad_norm/{layer}" for layer in self.layers])

    @property
    def log_path(self) -> Optional[str]:
        """The CSV file or the TensorBoard run directory being written, if any."""
        return None if self._writer is None else self._writer.path

    @property
    def first_nonfinite(self) -> Optional[NonFiniteEvent]:
        return self.events[0] if self.events else None

    def _norm_hook(self, name: str):
        def hook(param: Tensor) -> None:
            # float64: squares of large finite fp32 gradients (GradScaler-scaled ones) overflow an fp32 sum to
            # inf, which would be reported as a non-finite gradient. MPS has no float64.
            dtype = torch.float32 if param.device.type == "mps" else torch.float64
            self._pending[name] = torch.linalg.vector_norm(param.grad.detach(), dtype=dtype)
        return hook

    def step(self, loss: Union[Tensor, float], *, grad_scale: Optional[float] = None) -> StepRecord:
        """Records this step's loss and the gradient norms gathered since the previous call.

        grad_scale: the GradScaler scale the gradients were multiplied by (scaler.get_scale()), divided out
        of the recorded norms; the hooks run during backward, before scaler.unscale_().
        """
        names = list(self._pending)
        pending = list(self._pending.values())
        norms = torch.stack([n.to(pending[0].device) for n in pending]).tolist() if pending else []
        self._pending.clear()
        if grad_scale:
            norms = [n / grad_scale for n in norms]
        loss_value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        by_layer: dict[str, list[float]] = {}
        for name, norm in zip(names, norms):
            by_layer.setdefault(_layer_of(name), []).append(norm)
        record = StepRecord(self._step, loss_value, _root_sum_squares(norms),
                            {layer: _root_sum_squares(v) for layer, v in by_layer.items()},
                            self._nonfinite_event(loss_value, names, norms))
        self.history.append(record)
        if self._writer is not None:
            scalars = {"loss": loss_value, "grad_norm/total": record.total_grad_norm}
            scalars.update({f"grad_norm/{layer}": v for layer, v in record.layer_grad_norms.items()})
            self._writer.write(self._step, scalars, record.event)
        self._step += 1
        self._report(record.event)
        return record

    def _nonfinite_event(self, loss_value: float, names: list[str], norms: list[float]) -> Optional[NonFiniteEvent]:
        bad = [(name, norm) for name, norm in zip(names, norms) if not math.isfinite(norm)]
        bad_names = tuple(name for name, _ in bad)
        # A non-finite loss came from the forward pass and poisons every gradient: the loss is the origin.
        if not math.isfinite(loss_value):
            return NonFiniteEvent(self._step, "loss", None, _kind(loss_value), bad_names)
        if bad:
            name, norm = bad[0]
            return NonFiniteEvent(self._step, _layer_of(name), name, _kind(norm), bad_names)
        return None

    def _report(self, event: Optional[NonFiniteEvent]) -> None:
        onset = event is not None and self._previous_finite
        self._previous_finite = event is None
        if event is None:
            return
        self.events.append(event)
        if self.raise_on_nonfinite:
            raise NonFiniteGradientError(f"lossops.monitor: {event}")
        if onset:
            warnings.warn(f"lossops.monitor: {event}", RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        """Removes the hooks and closes the writer; the records stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "GradientMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
