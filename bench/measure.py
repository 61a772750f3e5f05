"""Timing and peak-memory measurement for one callable, on CPU or CUDA.

Every measurement is split into an untimed `setup()` that builds the call's inputs and a timed `run(state)`;
whatever `run` returns is released only after the clock stops, so freeing a large gradient is never billed
to the implementation that produced it.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

import lossops


@dataclass(frozen=True)
class Stats:
    median_ms: float
    iqr_ms: float
    samples: int


def summarize(samples_ms: list[float]) -> Stats:
    if len(samples_ms) < 2:
        return Stats(samples_ms[0], 0.0, len(samples_ms))
    q1, q2, q3 = statistics.quantiles(samples_ms, n=4, method="inclusive")
    return Stats(q2, q3 - q1, len(samples_ms))


@contextlib.contextmanager
def _no_gc():
    # A collection landing inside one sample would show up as an outlier of that implementation only (and
    # free memory mid-measurement). Nothing is collected up front: with torch.compile loaded that takes ~0.5 s.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_call(device: torch.device, setup: Callable[[], Any], run: Callable[[Any], Any], warmup: int,
              repeats: int) -> Stats:
    """Median and IQR of `run(setup())` over `repeats` calls after `warmup` discarded ones."""
    cuda = device.type == "cuda"
    samples = []
    with _no_gc():
        for i in range(warmup + repeats):
            elapsed = _sample(cuda, setup, run, 1)
            if i >= warmup:
                samples.append(elapsed)
    return summarize(samples)


# On the CPU a sample is at least this long: a tiny call is timed in a batch of calls (bench/grid.py does the same),
# so neither the timer's own cost nor one preempted call decides a sample.
MIN_SAMPLE_S = 2e-3
MAX_CALLS_PER_SAMPLE = 2000


def time_interleaved(device: torch.device, calls: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]],
                     warmup: int, repeats: int) -> dict[str, Stats]:
    """Median and IQR per call of each `name -> (setup, run)`, sampled in turn as the grid does: one sample of
    every implementation, then the next round, so that drift and noise on a shared machine hit them alike
    instead of whichever ran during a busy second. `warmup` discarded calls of each first.

    CUDA: a sample is one call, timed with events. CPU: a sample is a batch of calls at least MIN_SAMPLE_S long
    (one call when a call is that long already); the batch's setups run untimed before the clock starts. Within a
    batch each call's result is dropped as soon as it returns, as in a training loop (so a tiny call's freeing is
    timed with it; a call of MIN_SAMPLE_S or more is a batch of one, whose result is freed after the clock stops).
    """
    cuda = device.type == "cuda"
    with _no_gc():
        batch = {}
        for name, (setup, run) in calls.items():
            for _ in range(warmup):
                out = run(setup())
                del out
            state = setup()
            begin = time.perf_counter()
            out = run(state)
            once = max(time.perf_counter() - begin, 1e-7)
            del out, state
            batch[name] = 1 if cuda else int(min(MAX_CALLS_PER_SAMPLE, max(1, MIN_SAMPLE_S / once)))
        samples = {name: [] for name in calls}
        for _ in range(repeats):
            for name, (setup, run) in calls.items():
                samples[name].append(_sample(cuda, setup, run, batch[name]))
    return {name: summarize(values) for name, values in samples.items()}


def _sample(cuda: bool, setup, run, calls: int) -> float:
    """Milliseconds per call of one sample of `calls` calls."""
    if cuda:  # events time the GPU work itself, not Python's launch latency
        state = setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = run(state)
        end.record()
        end.synchronize()
        del out, state
        return start.elapsed_time(end)
    if calls == 1:
        state = setup()
        begin = time.perf_counter_ns()
        out = run(state)
        elapsed = time.perf_counter_ns() - begin
        del out, state
        return elapsed / 1e6
    states = [setup() for _ in range(calls)]
    begin = time.perf_counter_ns()
    for state in states:
        run(state)
    elapsed = time.perf_counter_ns() - begin
    del states
    return elapsed / 1e6 / calls


_KIB = 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE).group(1))


def _libc_malloc_trim() -> Callable[[], None] | None:
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


class PeakMemory:
    """Peak memory a call adds on top of what is live before it, in bytes.

    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats (the caching allocator's own count,
    so cached-but-free blocks are not counted). CPU: the process's resident-set high-water mark (VmHWM),
    reset by writing 5 to /proc/self/clear_refs, minus the resident set just before the call. torch's CPU
    allocator returns memory to malloc, and glibc may keep freed heap pages resident and reuse them without
    new page faults, which would hide them from the high-water mark; malloc_trim(0) before each
    measurement hands those pages back so every page the call touches must be faulted in and is counted.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._trim = _libc_malloc_trim()
        if device.type == "cuda":
            self.method = "CUDA: torch.cuda.max_memory_allocated() delta"
        elif self._hwm_resettable() and self._trim is not None:
            self.method = "CPU: peak RSS delta (VmHWM reset via /proc/self/clear_refs, after malloc_trim(0))"
        else:
            self.method = "unavailable (needs Linux /proc/self/clear_refs and glibc malloc_trim)"

    @property
    def available(self) -> bool:
        return not self.method.startswith("unavailable")

    @staticmethod
    def _hwm_resettable() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _proc_status_kib("VmHWM")
            return True
        except OSError:
            return False

    def measure(self, setup: Callable[[], Any], run: Callable[[Any], Any]) -> int | None:
        if not self.available:
            return None
        with _no_gc():
            return self._measure(setup, run)

    def _measure(self, setup, run) -> int:
        state = setup()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = run(state)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - before
        else:
            # A buffer kept for reuse (lossops.set_gradient_cache) would already be resident and go uncounted.
            lossops.empty_cache()
            self._trim()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _proc_status_kib("VmRSS")
            out = run(state)
            peak = (_proc_status_kib("VmHWM") - before) * _KIB
        del out, state
        return max(peak, 0)
