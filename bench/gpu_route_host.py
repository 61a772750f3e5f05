"""`python -m bench.gpu_route_host`: the host time of the GPU route (the triton backend) per call, without a GPU.

Every Triton launch is stubbed out (Triton's interpreter is on, its kernel runs are no-ops), and the checks that
read values back take the branch they take on device memory, so what is timed is the Python and torch work the
route does around its kernels: checks, backend choice, the op's autograd node, small torch ops, launch
preparation. Forward+backward on each family's tiny declared case, median of interleaved repeats, next to the
launches and torch ops counted on the same call. On a GPU every torch op is also a kernel launch (each with its
own host cost in eager torch): their count is what the route costs the device's launch queue.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import triton.runtime.interpreter as interpreter  # noqa: E402

import lossops  # noqa: E402
from lossops import _checks  # noqa: E402
from lossops._family import FAMILIES  # noqa: E402


# Ops that only describe memory (views, allocations, metadata): no kernel runs for them on a GPU.
_NOT_LAUNCHED = frozenset({"empty", "empty_strided", "empty_like", "view", "reshape", "_reshape_alias", "as_strided",
                           "unsqueeze", "squeeze", "flatten", "detach", "alias", "expand", "select", "slice", "t",
                           "transpose", "lift_fresh", "resolve_conj", "resolve_neg", "_unsafe_view", "contiguous",
                           "result_type", "promote_types", "is_nonzero", "new_empty"})


def _torch_ops(call) -> int:
    """The torch ops one call issues that launch a kernel on a GPU (outermost aten ops only: an op's own inner
    ops run inside its kernel or its host code)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    outermost = [e for e in events if not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))]
    return sum(e.name[len("aten::"):] not in _NOT_LAUNCHED and not _no_op_conversion(e) for e in outermost)


def _no_op_conversion(event) -> bool:
    # `to` a tensor already has the dtype and device of returns it: no copy, no kernel
    return event.name == "aten::to" and not any(c.name == "aten::_to_copy" for c in event.cpu_children)


def _inputs(case):
    torch.manual_seed(0)
    args = case.make(torch.float32)
    args[0] = args[0].detach().requires_grad_()
    return args


@contextlib.contextmanager
def stubbed_launches():
    """Every Triton launch recorded by kernel name and not run. What the kernels would have written stays
    uninitialised, so the device-side target assertion is handed a constant true flag instead: the same host
    work, without reading a flag no kernel wrote."""
    launches = []
    run, assert_async = interpreter.InterpretedFunction.run, torch._assert_async
    valid = torch.ones((), dtype=torch.bool)
    interpreter.InterpretedFunction.run = lambda self, *a, **k: launches.append(self.__name__)
    torch._assert_async = lambda flag, *message: assert_async(valid, *message)
    try:
        yield launches
    finally:
        interpreter.InterpretedFunction.run, torch._assert_async = run, assert_async


def measure(repeats: int = 200) -> list[dict]:
    _checks.host_readable = lambda t: False
    rows = []
    with lossops.backend("triton"), stubbed_launches() as launches:
        for name, family in FAMILIES.items():
            case = family.cases[0]
            fn = getattr(lossops, name)
            args = _inputs(case)

            def call():
                loss = fn(*args, **case.kwargs)
                loss.backward(torch.ones_like(loss))
                args[0].grad = None
            for _ in range(10):
                call()
            launches.clear()
            torch_ops = _torch_ops(call)
            counted = dict(launches=len(launches), torch_ops=torch_ops)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            rows.append(dict(op=name, shape=tuple(args[0].shape), us=statistics.median(times) * 1e6, **counted))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_route_host", description=__doc__)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; host time per forward+backward with Triton launches stubbed (median of "
          f"{args.repeats})")
    print(f"{'op':34} {'input':>10} {'host us':>8} {'launches':>8} {'torch ops':>9}"
          "  (ops that launch a kernel on a GPU)")
    for r in measure(args.repeats):
        shape = "x".join(map(str, r["shape"]))
        print(f"{r['op']:34} {shape:>10} {r['us']:8.1f} {r['launches']:8d} {r['torch_ops']:9d}")


if __name__ == "__main__":
    main()
