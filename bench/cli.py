"""`python -m bench`: parses the flags, plans the cases, runs them with a progress bar, writes the reports."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import lossops

from . import grid, report
from .cases import DTYPES, FAMILIES, FLOORS, Shape, implementations, ours_name
from .measure import MIN_SAMPLE_S, PeakMemory
from .runner import Settings, run_case

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# Headroom for a case: the logits, eager's saved softmax, the gradient and a float32 temporary, with slack.
MEMORY_COPIES = 6


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (a smoke run)")
    parser.add_argument("--grid", action="store_true",
                        help="every family x shapes tiny to LLM x dtype x {fwd+bwd, no_grad fwd} x {1, all threads} "
                             "against eager and torch.compile, interleaved, with a verdict per cell (bench/grid.py)")
    parser.add_argument("--op", action="append", choices=sorted(FAMILIES),
                        help="op family to run (repeatable; default: every family lossops has)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                        help="dtype (repeatable; default float32 and bfloat16)")
    parser.add_argument("--shape", action="append", type=_shape, help="ROWSxCOLS, e.g. 4096x32000 (repeatable; "
                        "default: each family's own list; --grid also takes NxCxD1x... and runs only its own shapes "
                        "that are named)")
    parser.add_argument("--impl", action="append", help="only these implementations (repeatable; names as in the "
                        "table, e.g. eager, compile, lossops-cpp; the floors always run)")
    parser.add_argument("--repeats", type=int, help="interleaved samples per phase (default 10, --grid 7, --quick 3)")
    parser.add_argument("--warmup", type=int, help="discarded calls before timing (default 3, --quick 1)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    parser.add_argument("--no-gradient-cache", action="store_true",
                        help="CPU: allocate every lossops gradient afresh (lossops.set_gradient_cache(False)) instead "
                             "of reusing the buffer the previous call freed, as a training loop does by default")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results folder (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (3 if args.quick else 7 if args.grid else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2 if args.grid else 3)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def _shape(text: str) -> Shape:
    """ROWSxCOLS, or NxCxD1x... for the grid's class-dim-1 layouts."""
    try:
        dims = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        dims = ()
    if len(dims) < 2:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 4096x32000, got {text!r}")
    return dims


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def plan(args: argparse.Namespace, note) -> list[tuple]:
    """(family, shape, dtype) cases to run; those whose memory would not fit are left out with a note."""
    names = args.op or list(FAMILIES)
    cases = []
    for name in names:
        family = FAMILIES[name]
        if family.ours is None:
            note(f"skipped {name}: lossops has no {name} yet")
            continue
        shapes = args.shape or (family.quick_shapes if args.quick else family.shapes)
        for dtype_name in dict.fromkeys(args.dtype or ["float32", "bfloat16"]):
            dtype = DTYPES[dtype_name]
            for shape in shapes:
                if len(shape) != 2 and family.make_inputs is None:
                    note(f"skipped {name} {'x'.join(map(str, shape))}: only --grid runs shapes of more than 2 dims")
                    continue
                needed = shape[0] * shape[1] * max(4, dtype.itemsize) * MEMORY_COPIES
                if needed > _available_bytes(args.device):
                    note(f"skipped {name} {dtype_name} {shape[0]}x{shape[1]}: needs ~{needed / 2**30:.1f} GiB, "
                         f"more than is available")
                    continue
                cases.append((family, shape, dtype))
    return cases


class Progress:
    """A one-line bar on stderr when it is a terminal, one line per step otherwise (logs, CI)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        width = 30
        filled = width * self.done // max(self.total, 1)
        elapsed = time.monotonic() - self.start
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.0f}s  {label}"
        self.done += 1
        if self.tty:
            sys.stderr.write(f"\r\033[K{line}")
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.grid:
        return grid.main(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_gradient_cache:
        lossops.set_gradient_cache(False)
    notes = []
    cases = plan(args, notes.append)
    for line in notes:
        print(line, file=sys.stderr)
    if not cases:
        print("nothing to run", file=sys.stderr)
        return 1

    memory = PeakMemory(args.device)
    settings = Settings(args.warmup, args.repeats, args.device, memory)
    stamp = report.Stamp.current(args.device, memory.method)
    runs = [(family, shape, dtype, implementations(family, args.device)) for family, shape, dtype in cases]
    names = {impl.name for *_, impls in runs for impl in impls}
    if args.impl and not set(args.impl) <= names:
        print(f"--impl: unknown {sorted(set(args.impl) - names)}; choose from {sorted(names)}", file=sys.stderr)
        return 2
    if args.impl:
        runs = [(*case, [impl for impl in impls if impl.name in args.impl]) for *case, impls in runs]
    progress = Progress(sum(len(impls) + len(FLOORS) for *_, impls in runs))
    rows = []
    for family, shape, dtype, impls in runs:
        label = f"{family.name} {str(dtype).removeprefix('torch.')} {shape[0]}x{shape[1]}"
        rows += run_case(family, shape, dtype, impls, settings, lambda impl: progress.step(f"{label} {impl}"))
    progress.finish()

    recs = report.records(rows, stamp)
    settings_line = (f"Timer: {'CUDA events' if args.device.type == 'cuda' else 'time.perf_counter_ns'}; "
                     f"{args.warmup} warm-up calls, then {args.repeats} samples per phase, interleaved (one sample of "
                     f"each implementation in turn; on the CPU a sample is a batch of calls at least "
                     f"{MIN_SAMPLE_S * 1e3:g} ms long); median and IQR per call in ms."
                     + ("" if args.device.type == "cuda" else
                        f" lossops gradient cache: {'on' if lossops.gradient_cache_enabled() else 'off'} (each "
                        "call after the first reuses the gradient buffer the previous one freed, as in a training "
                        "loop; peak memory is measured with it emptied first, so it counts the gradient)."))
    sections = [report.markdown(recs, stamp, settings_line), report.targets(recs, ours_name(args.device),
                                                                            args.device.type)]
    if notes:
        sections.append("\n".join(notes))
    text = "\n\n".join(sections)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = str(args.out / stamp.file_stem())  # not Path.with_suffix: the torch version's dots are no suffix
    report.write_csv(Path(stem + ".csv"), recs)
    report.write_plot(Path(stem + ".png"), recs, stamp)
    Path(stem + ".md").write_text(text + "\n")
    print(f"\nwrote {stem}.csv, .png and .md", file=sys.stderr)
    return 0

