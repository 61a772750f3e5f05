"""Fused linear + cross-entropy against the unfused paths: peak extra memory and fwd+bwd time.

    python -m bench.linear_ce                       # N=4096, D=1024, V=32000, float32, on CPU
    python -m bench.linear_ce --vocab 32000 128000 --dtype bfloat16 --repeats 5

Compared, each as loss.backward() from a leaf hidden (N x D) and weight (V x D):
  fused           lossops.linear_cross_entropy (chunks of tokens, no N x V logits)
  unfused-lossops hidden @ W.T, then lossops.cross_entropy
  unfused-torch   hidden @ W.T, then torch.nn.functional.cross_entropy
  torch-chunked   torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (torch's chunked path)
  cce             Apple's cut-cross-entropy, impl="torch_compile", when it is installed (it is not a dependency)
Peak memory is what one fwd+bwd adds on top of the inputs (bench.measure.PeakMemory says how it is taken);
it includes the gradients of hidden and weight, which every method must produce, so the table also gives
the peak beyond those, against the size of the N x V logits.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import lossops
from bench.measure import PeakMemory, time_call

_MIB = 1 << 20


def _unfused_lossops(hidden, weight, target):
    return lossops.cross_entropy(hidden @ weight.t(), target)


def _unfused_torch(hidden, weight, target):
    return F.cross_entropy(hidden @ weight.t(), target)


def _torch_chunked(hidden, weight, target):
    return F.linear_cross_entropy(hidden, weight, target, options=torch.nn.LinearCrossEntropyOptions())


METHODS = {"fused": lossops.linear_cross_entropy, "unfused-lossops": _unfused_lossops,
           "unfused-torch": _unfused_torch}
if hasattr(torch.nn, "LinearCrossEntropyOptions"):
    METHODS["torch-chunked"] = _torch_chunked
try:
    from cut_cross_entropy import linear_cross_entropy as _cce

    METHODS["cce"] = lambda hidden, weight, target: _cce(hidden, weight, target, impl="torch_compile")
except ImportError:
    pass


def bench_case(n: int, d: int, v: int, dtype: torch.dtype, warmup: int, repeats: int, memory: PeakMemory):
    device = torch.device("cpu")
    hidden = (torch.randn(n, d, dtype=dtype) / d ** 0.5).requires_grad_()
    weight = torch.randn(v, d, dtype=dtype).requires_grad_()
    target = torch.randint(0, v, (n,))
    target[::17] = -100

    def setup():
        hidden.grad = weight.grad = None
        return hidden, weight, target

    rows = []
    for name, fn in METHODS.items():
        def run(state, fn=fn):
            h, w, t = state
            fn(h, w, t).backward()
            return h.grad, w.grad

        # Timing first: its warm-up takes the process's one-time allocations (thread pools, MKL buffers)
        # out of the peak measured next.
        stats = time_call(device, setup, run, max(warmup, 1), repeats)
        peak = memory.measure(setup, run)
        rows.append((name, peak, stats))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    memory = PeakMemory(torch.device("cpu"))
    print(f"peak memory: {memory.method}; torch threads: {torch.get_num_threads()}; "
          f"lossops backend: {lossops._backend.resolve(torch.device('cpu'))}")
    for v in args.vocab:
        n, d = args.tokens, args.hidden
        itemsize = torch.empty((), dtype=dtype).element_size()
        logits_mib = n * v * itemsize / _MIB
        grads_mib = (n * d + v * d) * itemsize / _MIB
        print(f"\nN={n} D={d} V={v} {args.dtype}: logits {logits_mib:.0f} MiB, gradients of hidden+weight "
              f"{grads_mib:.0f} MiB")
        print(f"{'method':<16} {'peak MiB':>9} {'beyond grads':>13} {'/ logits':>9} {'median ms':>10} {'IQR ms':>8}"
              f" {'vs unfused-lossops':>19}")
        rows = bench_case(n, d, v, dtype, args.warmup, args.repeats, memory)
        base = dict((name, stats.median_ms) for name, _, stats in rows)["unfused-lossops"]
        for name, peak, stats in rows:
            peak_mib = float("nan") if peak is None else peak / _MIB
            beyond = peak_mib - grads_mib
            print(f"{name:<16} {peak_mib:>9.0f} {beyond:>13.0f} {beyond / logits_mib:>9.3f} {stats.median_ms:>10.0f} "
                  f"{stats.iqr_ms:>8.0f} {stats.median_ms / base:>18.2f}x")


if __name__ == "__main__":
    main()
