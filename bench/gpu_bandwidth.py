"""`python -m bench.gpu_bandwidth`: the LLM-vocabulary losses on a GPU as a share of its measured copy bandwidth.

For each case, forward+backward of eager torch, torch.compile, lossops and Liger-Kernel (when installed), timed
with CUDA events (median of interleaved repeats), and peak memory beyond the inputs. A cross-entropy forward+backward
must at least read the logits once and write their gradient once: bytes = 2 x N x V x itemsize, reported as GB/s and
as % of the card's device-to-device copy bandwidth measured in the same run (a copy reads and writes each byte
too). The fused linear cross-entropy is compared in time and memory. Results: a Markdown table under
bench/results/ named after the card. --cpu runs the same code on tiny CPU shapes (a check of the script itself).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import lossops

RESULTS = Path(__file__).resolve().parent / "results"


def _timed(device, fn, setup, repeats):
    """Median milliseconds of fn(setup()) and the peak memory it allocated beyond setup's tensors."""
    times = []
    peak = 0
    for _ in range(repeats):
        state = setup()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(state)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        else:
            import time
            t0 = time.perf_counter()
            fn(state)
            times.append((time.perf_counter() - t0) * 1e3)
        del state
    return statistics.median(times), peak


def copy_bandwidth(device, nbytes, repeats):
    """Bytes read + written per second by a device-to-device copy of nbytes."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms, _ = _timed(device, lambda _: dst.copy_(src), lambda: None, repeats)
    return 2 * nbytes / (ms / 1e3)


def cross_entropy_impls(device):
    impls = {"eager": lambda x, y: F.cross_entropy(x, y), "lossops": lambda x, y: lossops.cross_entropy(x, y)}
    impls["compile"] = torch.compile(lambda x, y: F.cross_entropy(x, y))
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel"):
        from liger_kernel.transformers import LigerCrossEntropyLoss
        impls["liger"] = LigerCrossEntropyLoss()
    return impls


def run_cross_entropy(device, shapes, dtypes, repeats, bandwidth, rows):
    for (n, v) in shapes:
        for dtype in dtypes:
            x0 = torch.randn(n, v, dtype=dtype, device=device)
            y = torch.randint(0, v, (n,), device=device)
            minimum = 2 * x0.numel() * x0.element_size()
            for name, impl in cross_entropy_impls(device).items():
                def setup():
                    return x0.clone().requires_grad_()

                def step(x, impl=impl):
                    impl(x, y).backward()
                _timed(device, step, setup, 2)  # compile / autotune outside the timing
                ms, peak = _timed(device, step, setup, repeats)
                rate = minimum / (ms / 1e3)
                rows.append(dict(case=f"cross_entropy {n}x{v}", dtype=str(dtype).split(".")[-1], impl=name, ms=ms,
                                 gbps=rate / 1e9, share=rate / bandwidth, peak_mib=peak / 2 ** 20))


def run_linear_cross_entropy(device, n, d, v, dtype, repeats, rows):
    hidden = torch.randn(n, d, dtype=dtype, device=device) / d ** 0.5
    weight = torch.randn(v, d, dtype=dtype, device=device) / d ** 0.5
    y = torch.randint(0, v, (n,), device=device)
    impls = {"lossops": lambda h, w: lossops.linear_cross_entropy(h, w, y),
             "eager": lambda h, w: F.cross_entropy(F.linear(h, w).float(), y)}
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel"):
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        impls["liger"] = lambda h, w: liger(w, h, y)
    for name, impl in impls.items():
        def setup():
            return hidden.clone().requires_grad_(), weight.clone().requires_grad_()

        def step(state, impl=impl):
            impl(*state).backward()
        _timed(device, step, setup, 1)
        ms, peak = _timed(device, step, setup, repeats)
        rows.append(dict(case=f"linear_cross_entropy N={n} D={d} V={v}", dtype=str(dtype).split(".")[-1], impl=name,
                         ms=ms, gbps=float("nan"), share=float("nan"), peak_mib=peak / 2 ** 20))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_bandwidth", description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="tiny CPU shapes: checks the script, measures nothing")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if device.type == "cuda":
        shapes, lce = [(4096, 32000), (4096, 128256), (16384, 131072)], (8192, 4096, 128256)
        bandwidth = copy_bandwidth(device, 1 << 30, args.repeats)
    else:
        shapes, lce = [(64, 1000)], (64, 32, 1000)
        bandwidth = copy_bandwidth(device, 1 << 22, 3)
    rows = []
    run_cross_entropy(device, shapes, [torch.float32, torch.bfloat16], args.repeats, bandwidth, rows)
    run_linear_cross_entropy(device, *lce, torch.bfloat16, max(3, args.repeats // 3), rows)
    lines = [f"# {card}: loss forward+backward vs copy bandwidth ({datetime.datetime.now():%Y-%m-%d %H:%M})", "",
             f"torch {torch.__version__}; device-to-device copy: {bandwidth / 1e9:.0f} GB/s (read + write); "
             "bytes for cross-entropy = read the logits once + write their gradient once.", "",
             "| case | dtype | impl | ms | GB/s | % of copy | peak MiB |", "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['dtype']} | {r['impl']} | {r['ms']:.3f} | {r['gbps']:.0f} | "
                     f"{100 * r['share']:.0f} % | {r['peak_mib']:.0f} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "".join(c if c.isalnum() else "-" for c in card)
    path = args.out / f"gpu_bandwidth_{datetime.datetime.now():%Y%m%d-%H%M%S}_{name}.md"
    path.write_text(text + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
