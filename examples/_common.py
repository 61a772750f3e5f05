"""Pieces shared by the training examples: device/dtype choice, the optimizer recipe, text progress and plots,
and a deterministic peak-memory measure."""
from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def set_threads(threads: int) -> None:
    """0 keeps torch's default. Ops this small gain nothing from threads, and on a busy machine the OpenMP
    barriers between them can make each step ten times slower."""
    if threads > 0:
        torch.set_num_threads(threads)


def autocast_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """bf16 where the hardware has it (CPU autocast supports only bf16 well), fp16 on older GPUs."""
    if name != "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay the weight matrices and kernels only.

    Decaying biases and normalisation scales/shifts pulls them towards 0, which fights the normalisation
    rather than regularising the model; they are exactly the parameters with fewer than two dimensions.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def adamw(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr)


class Progress:
    """A one-line text progress bar; redrawn in place on a terminal, a few plain lines in logs."""

    def __init__(self, total: int, label: str = "", *, stream=None, enabled: bool = True, width: int = 30):
        self.total, self.label, self.width, self.enabled = max(total, 1), label, width, enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self._start = time.perf_counter()
        self._last_line = -1

    def update(self, done: int, **metrics: float) -> None:
        if not self.enabled:
            return
        # A CI log keeps every \r-separated redraw, so outside a terminal print about ten lines per bar.
        tenth = done * 10 // self.total
        if not self.tty and tenth == self._last_line and done != self.total:
            return
        self._last_line = tenth
        filled = done * self.width // self.total
        rate = done / max(time.perf_counter() - self._start, 1e-9)
        text = " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {done}/{self.total} {rate:.1f}/s {text}"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def text_curve(values: list[float], *, width: int = 60, height: int = 10, title: str = "") -> str:
    """An ASCII line plot of `values` (bucket means when longer than `width`); non-finite values are dropped."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return f"{title}: no finite values"
    columns = min(width, len(finite))
    buckets = [finite[i * len(finite) // columns:(i + 1) * len(finite) // columns] for i in range(columns)]
    means = [sum(b) / len(b) for b in buckets]
    lo, hi = min(means), max(means)
    levels = [round((m - lo) / (hi - lo) * (height - 1)) if hi > lo else 0 for m in means]
    label_width = max(len(f"{hi:.4g}"), len(f"{lo:.4g}"))
    rows = [title] if title else []
    for level in range(height - 1, -1, -1):
        label = f"{hi:.4g}" if level == height - 1 else f"{lo:.4g}" if level == 0 else ""
        rows.append(f"{label:>{label_width}} |" + "".join("*" if v == level else " " for v in levels))
    rows.append(" " * label_width + " +" + "-" * columns)
    rows.append(" " * label_width + f"  1{'':>{max(columns - 1 - len(str(len(values))), 1)}}{len(values)}")
    return "\n".join(rows)


class TensorMemoryPeak(TorchDispatchMode):
    """Within the block, the peak bytes of tensor storage that ops allocated there and that are still alive:
    on CPU a deterministic stand-in for torch.cuda.max_memory_allocated.

        with TensorMemoryPeak() as memory:
            model(input_ids, labels=labels).loss.backward()
        memory.peak  # bytes

    An op's output counts as an allocation unless it shares storage with one of the op's inputs (views,
    in-place ops), so what existed before the block (parameters, inputs) is never counted; gradients made
    inside it are. Frees are noticed at the next op. Memory an op uses only internally is not seen, e.g. lossops'
    fused linear cross-entropy holds one chunk of logits (1/8 of them by default) while it runs.
    """

    def __enter__(self):
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        self._live = {key: entry for key, entry in self._live.items() if not entry[0].expired()}
        for tensor in pytree.tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if storage.nbytes() and key not in inputs and key not in self._live:
                self._live[key] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self._live.values()))
        return out
