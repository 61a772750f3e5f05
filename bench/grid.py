"""`python -m bench --grid`: every op family over the shapes users have, tiny to LLM-sized, in float32 and
bfloat16, forward+backward and forward under no_grad, on 1 thread and on all of them, against eager and
torch.compile, timed interleaved (one sample of each implementation in turn, medians), with a verdict per cell:
lossops at least as fast as eager, and the speed targets where one is set.
"""
from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional
from pathlib import Path

import torch

from .cases import DTYPES, FAMILIES, Family, _arguments, differentiable, floor_call
from .measure import MIN_SAMPLE_S, time_interleaved
from .report import Stamp

# Each family declares its grid shapes and speed targets (lossops._family.Bench, GridShapes).
GRID_SHAPES = {name: family.grid_shapes for name, family in FAMILIES.items() if family.grid_shapes}
QUICK_SHAPES = {name: FAMILIES[name].grid_quick_shapes for name in GRID_SHAPES}
# (op, shape, dtype or None, threads "all"/"1"/None) -> the lowest acceptable lossops speed-up over eager,
# forward+backward, beyond "at least eager's speed".
TARGETS = {(name, tuple(t.shape), t.dtype, t.threads): t.speedup
           for name, family in FAMILIES.items() for t in family.targets}
# the same keys -> the most lossops may take as a multiple of the family's floor (Bench.floor), forward+backward
FLOOR_TARGETS = {(name, tuple(t.shape), t.dtype, t.threads): t.within_floor
                 for name, family in FAMILIES.items() for t in family.targets if t.within_floor is not None}
MODES = ("fwd+bwd", "no_grad fwd")


def _matching(targets: dict, op: str, shape: tuple, dtype: str, threads: str) -> list:
    return [bound for (t_op, t_shape, t_dtype, t_threads), bound in targets.items()
            if (t_op, t_shape) == (op, shape) and t_dtype in (None, dtype) and t_threads in (None, threads)]


def target_for(op: str, shape: tuple, dtype: str, threads: str, mode: str) -> float:
    if mode != "fwd+bwd":
        return 1.0
    return max([1.0, *_matching(TARGETS, op, shape, dtype, threads)])


def floor_bound_for(op: str, shape: tuple, dtype: str, threads: str, mode: str):
    bounds = _matching(FLOOR_TARGETS, op, shape, dtype, threads) if mode == "fwd+bwd" else []
    return min(bounds) if bounds else None


def class_target(x: torch.Tensor) -> torch.Tensor:
    """Class indices for (N, C) or (N, C, d1, ..., dk) logits."""
    return torch.randint(0, x.shape[1], x.shape[:1] + x.shape[2:], device=x.device)


@dataclass
class Cell:
    op: str
    dtype: str
    shape: tuple
    mode: str
    threads: int
    thread_setting: str  # "1" or "all"
    times_ms: dict  # implementation -> median ms
    target: float
    error: str = ""
    floor_bound: Optional[float] = None  # at most this many times times_ms["floor"]

    @property
    def of_floor(self):
        ours, floor = self.ours, self.times_ms.get("floor")
        return None if not ours or not floor else ours / floor

    @property
    def ours(self):
        return self.times_ms.get("lossops")

    def speedup(self, other: str):
        ours, theirs = self.ours, self.times_ms.get(other)
        return None if not ours or theirs is None else theirs / ours

    @property
    def verdict(self) -> str:
        if self.error:
            return "error"
        s = self.speedup("eager")
        if s is None:
            return "n/a"
        if s < 1.0:
            return "SLOWER than eager"
        if s < self.target:
            return f"target {self.target:g}x missed"
        if self.floor_bound is not None and (self.of_floor is None or self.of_floor > self.floor_bound):
            return f"{self.floor_bound:g}x floor missed"
        return "ok" if self.target <= 1.0 and self.floor_bound is None else "target met"


def interleaved_medians(fns: dict, repeats: int, warmup: int, device: torch.device = torch.device("cpu")) -> dict:
    """Median seconds per call of each function, sampled in turn so that drift and noise hit all alike (the
    timing `python -m bench` uses too: bench.measure.time_interleaved)."""
    calls = {name: (_no_setup, lambda _, fn=fn: fn()) for name, fn in fns.items()}
    return {name: stats.median_ms / 1e3 for name, stats in time_interleaved(device, calls, warmup, repeats).items()}


def _no_setup():
    return None


def _callables(family: Family, device: torch.device, x: torch.Tensor, target: torch.Tensor, mode: str):
    def eager(inp, tgt):
        return family.eager(inp, *_arguments(tgt), **family.kwargs)

    def ours(inp, tgt):  # what a user's call gets: the default backend for the device
        return family.ours(inp, *_arguments(tgt), **family.kwargs)

    compiled = torch.compile(eager, dynamic=False)

    if mode == "fwd+bwd":
        def wrap(loss):
            return lambda: torch.autograd.grad(loss(x, target), differentiable(x, target))
    else:
        def wrap(loss):
            def run():
                with torch.no_grad():
                    return loss(x, target)
            return run
    fns = {"eager": wrap(eager), "compile": wrap(compiled), "lossops": wrap(ours)}
    if (floor := floor_call(family, x, target, gradients=mode == "fwd+bwd")) is not None:
        fns["floor"] = floor
    return fns


def run_grid(args, note) -> list[Cell]:
    device = args.device
    ops = args.op or list(GRID_SHAPES)
    dtypes = args.dtype or ["float32", "bfloat16"]
    all_threads = os.cpu_count() or 1
    thread_settings = [("1", 1)] + ([("all", all_threads)] if all_threads > 1 else [])
    cells = []
    plan = [(op, shape, dtype) for op in ops for dtype in dict.fromkeys(dtypes)
            for shape in (QUICK_SHAPES if args.quick else GRID_SHAPES)[op]]
    if args.shape:
        plan = [p for p in plan if p[1] in args.shape]
    start = time.monotonic()
    for index, (op, shape, dtype_name) in enumerate(plan):
        family = FAMILIES[op]
        dtype = DTYPES[dtype_name]
        torch.manual_seed(0)
        if family.make_inputs is not None:
            x, target = family.inputs(shape, dtype, device)
        else:
            x = torch.randn(shape, dtype=dtype, device=device).requires_grad_()
            target = class_target(x) if family.make_target.__name__ == "class_index" else family.make_target(x.detach())
        label = f"{op} {dtype_name} {'x'.join(map(str, shape))}"
        print(f"[{index + 1}/{len(plan)} {time.monotonic() - start:5.0f}s] {label}", file=sys.stderr, flush=True)
        for mode in MODES:
            torch._dynamo.reset()  # each cell compiles afresh: dynamo's recompile limit is never reached
            error = ""
            try:
                fns = _callables(family, device, x, target, mode)
                if args.impl:  # lossops is what the verdict judges, and the floors always run
                    fns = {name: fn for name, fn in fns.items() if name in args.impl or name in ("lossops", "floor")}
                for fn in fns.values():  # compiles, and fails early on an implementation that cannot run
                    fn()
            except Exception as exc:  # noqa: BLE001 - one broken cell must not end the grid
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                fns = {}
            for setting, threads in thread_settings:
                torch.set_num_threads(threads)
                times = {}
                if fns:
                    times = {k: v * 1e3 for k, v in interleaved_medians(fns, args.repeats, args.warmup, device).items()}
                cells.append(Cell(op, dtype_name, shape, mode, threads, setting, times,
                                  target_for(op, shape, dtype_name, setting, mode), error,
                                  floor_bound_for(op, shape, dtype_name, setting, mode)))
        del x, target
    torch.set_num_threads(all_threads)
    return cells


def _fmt_ms(value) -> str:
    if value is None:
        return "–"
    return f"{value * 1e3:.1f} µs" if value < 1 else f"{value:.2f} ms"


def _fmt_x(value) -> str:
    return "–" if value is None else f"{value:.2f}×"


def isa_line() -> str:
    from lossops import _cpp
    try:
        kernels = _cpp.capability()
    except Exception as exc:  # noqa: BLE001
        kernels = f"unavailable ({exc})"
    return (f"CPU capability (torch): {torch.backends.cpu.get_cpu_capability()}; lossops kernels in use: {kernels}"
            + (f" (forced by LOSSOPS_CPU_CAPABILITY={os.environ['LOSSOPS_CPU_CAPABILITY']})"
               if "LOSSOPS_CPU_CAPABILITY" in os.environ else ""))


def markdown(cells: list[Cell], stamp: Stamp, settings: str) -> str:
    floors = any("floor" in c.times_ms for c in cells)  # a family's unavoidable work (Bench.floor), when timed
    lines = [f"### lossops grid — {stamp.machine}, torch {stamp.torch}, {os.cpu_count()} CPUs", "",
             isa_line() + ".", settings, "",
             "| op | dtype | shape | mode | threads | eager | compile | lossops | vs eager | vs compile |"
             + (" floor | lossops ÷ floor |" if floors else "") + " verdict |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if floors else "") + "---|"]
    for c in cells:
        t = c.times_ms
        floor = f" {_fmt_ms(t.get('floor'))} | {_fmt_x(c.of_floor)} |" if floors else ""
        lines.append(f"| {c.op} | {c.dtype} | {'×'.join(map(str, c.shape))} | {c.mode} | {c.threads} | "
                     f"{_fmt_ms(t.get('eager'))} | {_fmt_ms(t.get('compile'))} | {_fmt_ms(c.ours)} | "
                     f"{_fmt_x(c.speedup('eager'))} | {_fmt_x(c.speedup('compile'))} |{floor} "
                     f"{c.verdict}{': ' + c.error if c.error else ''} |")
    below = [c for c in cells if c.verdict not in ("ok", "target met")]
    lines += ["", f"{len(cells) - len(below)} of {len(cells)} cells at least as fast as eager and on target; "
              f"{len(below)} not" + (":" if below else ".")]
    for c in below:
        floor = f", {_fmt_x(c.of_floor)} the floor (wanted ≤ {c.floor_bound:g}×)" if c.floor_bound is not None else ""
        lines.append(f"- {c.op} {c.dtype} {'×'.join(map(str, c.shape))} {c.mode} {c.threads} thread(s): "
                     f"{_fmt_x(c.speedup('eager'))} eager (wanted ≥ {c.target:g}×){floor} — {c.verdict}")
    return "\n".join(lines)


CSV_COLUMNS = ("op", "dtype", "shape", "mode", "threads", "eager_ms", "compile_ms", "lossops_ms", "speedup_vs_eager",
               "speedup_vs_compile", "target_vs_eager", "floor_ms", "lossops_of_floor", "target_of_floor", "verdict",
               "error", "machine", "isa", "torch")


def write_csv(path: Path, cells: list[Cell], stamp: Stamp) -> None:
    isa = isa_line()
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for c in cells:
            writer.writerow({"op": c.op, "dtype": c.dtype, "shape": "x".join(map(str, c.shape)), "mode": c.mode,
                             "threads": c.threads, "eager_ms": c.times_ms.get("eager"),
                             "compile_ms": c.times_ms.get("compile"), "lossops_ms": c.ours,
                             "speedup_vs_eager": c.speedup("eager"), "speedup_vs_compile": c.speedup("compile"),
                             "target_vs_eager": c.target, "floor_ms": c.times_ms.get("floor"),
                             "lossops_of_floor": c.of_floor, "target_of_floor": c.floor_bound,
                             "verdict": c.verdict, "error": c.error,
                             "machine": stamp.machine, "isa": isa, "torch": stamp.torch})


def write_plot(path: Path, cells: list[Cell], stamp: Stamp) -> None:
    """A heat map of lossops' speed-up over eager: a row per (op, dtype, shape), a column per (mode, threads)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = list(dict.fromkeys((c.op, c.dtype, c.shape) for c in cells))
    cols = list(dict.fromkeys((c.mode, c.thread_setting) for c in cells))
    values = np.full((len(rows), len(cols)), np.nan)
    for c in cells:
        s = c.speedup("eager")
        if s is not None:
            values[rows.index((c.op, c.dtype, c.shape)), cols.index((c.mode, c.thread_setting))] = s
    fig, ax = plt.subplots(figsize=(2.2 * len(cols) + 4, 0.28 * len(rows) + 1.6))
    image = ax.imshow(np.log2(values), cmap="RdYlGn", vmin=-3, vmax=3, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2f}×", ha="center", va="center", fontsize=6)
    ax.set_xticks(range(len(cols)), [f"{m}\n{t} thread{'s' if t != '1' else ''}" for m, t in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{op} {dt} {'×'.join(map(str, sh))}" for op, dt, sh in rows], fontsize=6)
    fig.colorbar(image, ax=ax, label="log2(lossops speed-up over eager)")
    ax.set_title(f"lossops vs eager — {stamp.header()}\n{isa_line()}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


GRID_IMPLEMENTATIONS = ("eager", "compile", "lossops")


def main(args) -> int:
    if args.impl and not set(args.impl) <= set(GRID_IMPLEMENTATIONS):
        print(f"--impl: unknown {sorted(set(args.impl) - set(GRID_IMPLEMENTATIONS))} for --grid; choose from "
              f"{list(GRID_IMPLEMENTATIONS)} (lossops and the floors always run)", file=sys.stderr)
        return 2
    notes = []
    cells = run_grid(args, notes.append)
    stamp = Stamp.current(args.device, "n/a")
    settings = (f"Forward+backward = torch.autograd.grad of the loss; no_grad fwd = the loss under torch.no_grad(). "
                f"Medians of {args.repeats} interleaved samples per implementation after {args.warmup} warm-up calls; "
                f"a sample times a batch of calls at least {MIN_SAMPLE_S * 1e3:g} ms long. 'compile' is "
                f"torch.compile(dynamic=False) of the eager formula.")
    text = markdown(cells, stamp, settings)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = str(args.out / stamp.file_stem().replace("bench_", "grid_", 1))
    write_csv(Path(stem + ".csv"), cells, stamp)
    write_plot(Path(stem + ".png"), cells, stamp)
    Path(stem + ".md").write_text(text + "\n")
    print(f"\nwrote {stem}.csv, .png and .md", file=sys.stderr)
    return 0
