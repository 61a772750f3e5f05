"""Turns measured rows into the markdown table, the CSV, the PNG plot and the speed targets' verdict."""
from __future__ import annotations

import csv
import math
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .cases import FAMILIES
from .runner import Row

CSV_COLUMNS = ("op", "dtype", "rows", "cols", "impl", "fwd_ms", "fwd_iqr_ms", "bwd_ms", "bwd_iqr_ms", "fwdbwd_ms",
               "fwdbwd_iqr_ms", "repeats", "peak_extra_mib", "floor", "pct_of_floor", "speedup_vs_eager",
               "speedup_vs_compile", "loss", "error", "device", "machine", "torch", "threads", "memory_method")


@dataclass(frozen=True)
class Stamp:
    device: str
    machine: str
    torch: str
    threads: int
    memory_method: str

    @classmethod
    def current(cls, device: torch.device, memory_method: str) -> "Stamp":
        machine = _cpu_model()
        if device.type == "cuda":
            machine = f"{torch.cuda.get_device_name(device)} (host {machine})"
        return cls(device.type, machine, torch.__version__, torch.get_num_threads(), memory_method)

    def file_stem(self) -> str:
        machine = re.sub(r"[^A-Za-z0-9]+", "-", self.machine).strip("-")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return f"bench_{stamp}_{self.device}_{machine}_torch-{self.torch}_{self.threads}threads"

    def header(self) -> str:
        return f"{self.machine}, torch {self.torch}, {self.threads} threads, device {self.device}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        if model:
            return model.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def records(rows: list[Row], stamp: Stamp) -> list[dict]:
    """One flat dict per row, with the ratios against eager, compile and the floor of the same case."""
    time_of = {(r.op, r.dtype, r.shape, r.impl): r.fwdbwd.median_ms for r in rows if r.fwdbwd and not r.error}
    out = []
    for r in rows:
        case = (r.op, r.dtype, r.shape)
        ours = time_of.get(case + (r.impl,))
        floor = time_of.get(case + (f"floor {r.floor}",)) if r.floor else None
        out.append({
            "op": r.op, "dtype": r.dtype, "rows": r.shape[0], "cols": r.shape[1], "impl": r.impl,
            **{f"{phase}_{kind}": getattr(getattr(r, phase), attr) if getattr(r, phase) else None
               for phase in ("fwd", "bwd", "fwdbwd") for kind, attr in (("ms", "median_ms"), ("iqr_ms", "iqr_ms"))},
            "repeats": r.fwdbwd.samples if r.fwdbwd else None,
            "peak_extra_mib": None if r.peak_bytes is None else r.peak_bytes / 2**20,
            "floor": r.floor, "pct_of_floor": None if r.floor is None else _percent(_ratio(floor, ours)),
            "speedup_vs_eager": None if r.floor is None else _ratio(time_of.get(case + ("eager",)), ours),
            "speedup_vs_compile": None if r.floor is None else _ratio(time_of.get(case + ("compile",)), ours),
            "loss": r.loss, "error": r.error, "device": stamp.device, "machine": stamp.machine, "torch": stamp.torch,
            "threads": stamp.threads, "memory_method": stamp.memory_method,
        })
    return out


def _percent(ratio):
    return None if ratio is None else 100 * ratio


def _fmt(value, suffix="", digits=3) -> str:
    if value is None:
        return "–"
    if value == 0:
        return f"0{suffix}"
    places = max(0, digits - 1 - int(math.floor(math.log10(abs(value)))))
    return f"{value:.{places}f}{suffix}"


def markdown(recs: list[dict], stamp: Stamp, settings_line: str) -> str:
    lines = [f"## lossops benchmark: {stamp.header()}", "", settings_line, f"Peak memory: {stamp.memory_method}.", ""]
    for op in dict.fromkeys(r["op"] for r in recs):
        lines += [f"### {op}", "",
                  "| dtype | shape | impl | fwd ms | bwd ms | fwd+bwd ms (IQR) | peak extra MiB | % of floor "
                  "| vs eager | vs compile |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        errors = []
        for r in (r for r in recs if r["op"] == op):
            if r["error"]:
                errors.append(f"- {r['dtype']} {r['rows']}x{r['cols']} {r['impl']}: {r['error']}")
            fwdbwd = "–" if r["fwdbwd_ms"] is None else f"{_fmt(r['fwdbwd_ms'])} ({_fmt(r['fwdbwd_iqr_ms'], digits=2)})"
            floor = "" if r["floor"] is None else f" ({r['floor']})"
            lines.append(f"| {r['dtype']} | {r['rows']}x{r['cols']} | {r['impl']}{' ⚠' if r['error'] else ''} "
                         f"| {_fmt(r['fwd_ms'])} | {_fmt(r['bwd_ms'])} | {fwdbwd} | {_fmt(r['peak_extra_mib'])} "
                         f"| {_fmt(r['pct_of_floor'], '%')}{floor if r['pct_of_floor'] is not None else ''} "
                         f"| {_fmt(r['speedup_vs_eager'], '×')} | {_fmt(r['speedup_vs_compile'], '×')} |")
        lines += [""] + errors + ([""] if errors else [])
    return "\n".join(lines)


def write_csv(path: Path, recs: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in recs)


def write_plot(path: Path, recs: list[dict], stamp: Stamp) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["op"], r["dtype"], r["rows"]) for r in recs if r["fwdbwd_ms"] is not None))
    columns = min(3, max(1, len(panels)))
    grid_rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(grid_rows, columns, figsize=(5.5 * columns, 4 * grid_rows), squeeze=False)
    for ax, (op, dtype, n) in zip(axes.flat, panels):
        mine = [r for r in recs if (r["op"], r["dtype"], r["rows"]) == (op, dtype, n) and r["fwdbwd_ms"] is not None]
        for impl in dict.fromkeys(r["impl"] for r in mine):
            points = sorted((r["cols"], r["fwdbwd_ms"]) for r in mine if r["impl"] == impl)
            ax.plot(*zip(*points), marker="o", label=impl, linestyle="--" if impl.startswith("floor") else "-")
        ax.set_xscale("log")
        ax.set_yscale("log")
        family = FAMILIES.get(op)
        ax.set_xlabel(family.columns if family else "columns")
        ax.set_ylabel("forward+backward, ms (median)")
        ax.set_title(f"{op} {dtype} N={n}", fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(stamp.header(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class Target:
    case: str
    op: str
    dtype: str
    shape: tuple[int, int]
    inplace: bool
    metric: str  # "vs eager", "vs compile" (at least `bound`), "x clone floor", "x copy_ floor" (at most)
    bound: float


SPEED_TARGETS = (
    Target("CE fp32 N=4096 V=32000", "cross_entropy", "float32", (4096, 32000), False, "vs eager", 3),
    Target("CE fp32 N=4096 V=32000", "cross_entropy", "float32", (4096, 32000), False, "vs compile", 1.5),
    Target("CE fp32 N=4096 V=32000", "cross_entropy", "float32", (4096, 32000), False, "x clone floor", 1.25),
    Target("same, inplace_backward=True", "cross_entropy", "float32", (4096, 32000), True, "x copy_ floor", 1.5),
    Target("CE bf16 N=4096 V=32000", "cross_entropy", "bfloat16", (4096, 32000), False, "vs eager", 8),
    Target("CE bf16 N=4096 V=32000", "cross_entropy", "bfloat16", (4096, 32000), False, "vs compile", 1.5),
    Target("sigmoid focal fp32 N=65536 C=80", "sigmoid_focal_loss", "float32", (65536, 80), False, "vs eager", 5),
    Target("sigmoid focal fp32 N=65536 C=80", "sigmoid_focal_loss", "float32", (65536, 80), False, "vs compile", 1.5),
    Target("smooth-L1 fp32 16M elements", "smooth_l1_loss", "float32", (4096, 4096), False, "vs eager", 1.5),
    Target("smooth-L1 fp32 16M elements", "smooth_l1_loss", "float32", (4096, 4096), False, "vs compile", 1),
)


def _target_value(target: Target, recs: list[dict], ours: str):
    def time_of(impl):
        for r in recs:
            key = (r["op"], r["dtype"], (r["rows"], r["cols"]), r["impl"])
            if key == (target.op, target.dtype, target.shape, impl):
                return None if r["error"] else r["fwdbwd_ms"]
        return None

    mine = time_of(ours + (" inplace" if target.inplace else ""))
    other = {"vs eager": "eager", "vs compile": "compile"}.get(target.metric)
    if other:
        return _ratio(time_of(other), mine)
    return _ratio(mine, time_of("floor " + target.metric.split()[1]))


def targets(recs: list[dict], ours: str, device: str) -> str:
    """The targets table, each line met / missed from ratios measured side by side in this run."""
    lines = [f"## Targets (forward+backward, {ours} measured in this run)", ""]
    if device != "cpu":
        lines += ["The targets are stated for the CPU; on this device they are shown for reference only.", ""]
    lines += ["| case | criterion | measured | verdict |", "|---|---|---:|---|"]
    for target in SPEED_TARGETS:
        value = _target_value(target, recs, ours)
        at_least = target.metric.startswith("vs")
        criterion = f"{'≥' if at_least else '≤'} {target.bound:g}× {target.metric.removeprefix('x ')}"
        if value is None:
            verdict = "not run"
        else:
            verdict = "met" if (value >= target.bound if at_least else value <= target.bound) else "missed"
        lines.append(f"| {target.case} | {criterion} | {_fmt(value, '×')} | {verdict} |")
    return "\n".join(lines)
