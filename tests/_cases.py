"""Shared test helpers: option grids, gradient collection, and the low-precision accuracy criterion."""
from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp


def grid(factors: dict, valid=lambda case: True) -> list[dict]:
    """Every valid combination of the factors' values."""
    names = list(factors)
    cases = (dict(zip(names, values)) for values in itertools.product(*factors.values()))
    return [case for case in cases if valid(case)]


def pairwise(factors: dict, valid=lambda case: True) -> list[dict]:
    """A small subset of grid() in which every pair of values of any two factors still appears together.

    For backends too slow to run the full grid (Triton's interpreter): interactions between two options
    are where bugs hide, and all of those stay covered.
    """
    names = list(factors)
    candidates = grid(factors, valid)
    # Each candidate's pairs are formed once: the greedy loop below intersects them with what is left on every
    # round, for every candidate.
    covers = [{(a, repr(case[a]), b, repr(case[b])) for a, b in itertools.combinations(names, 2)}
              for case in candidates]
    uncovered = set().union(*covers)
    chosen = []
    while uncovered:
        best = max(range(len(candidates)), key=lambda i: len(covers[i] & uncovered))
        chosen.append(candidates[best])
        uncovered -= covers[best]
    return chosen


def case_id(case: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


def backend_cases(full: dict[str, list[dict]]) -> list:
    """pytest params (backend, case) for `@pytest.mark.parametrize("backend, case", ..., indirect=["backend"])`."""
    return [pytest.param(b, c, id=f"{b}-{case_id(c)}") for b, cases in full.items() for c in cases]


def forward_backward(fn, inputs: list[torch.Tensor], grad_output: torch.Tensor | None = None, seed: int = 1):
    """fn(*inputs) and the gradients of every input that requires grad, for a random upstream gradient
    (a non-uniform grad_output is where reduction='none' backward bugs show) unless one is given.

    The random upstream values are multiples of 1/8 in [-4, 4]: exact in every float dtype, so runs in
    different dtypes see the same upstream gradient.
    """
    out = fn(*inputs)
    if grad_output is None:
        gen = torch.Generator().manual_seed(seed)
        grad_output = (torch.randint(-32, 33, out.shape, generator=gen) / 8).to(out.dtype)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_output, allow_unused=True) if out.requires_grad else [None] * len(wrt)
    return out.detach(), [None if g is None else g.detach() for g in grads]


def leaf_copies(tensors, dtype=None):
    """Fresh leaves (same values, optionally another dtype) so two implementations get identical inputs."""
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out.append(t.detach().to(dtype or t.dtype).requires_grad_(t.requires_grad))
        else:
            out.append(t)
    return out


def assert_float64_gradients_match(fn, inputs: list[torch.Tensor], backend: str, gradchecked: str = "cpp",
                                   seed: int = 2):
    """fn's float64 outputs and analytic gradients on `backend` equal those on `gradchecked`, a backend whose
    float64 gradcheck of the same call on the same inputs stands elsewhere: equal to rounding, they are right too.

    fn returns one tensor or a tuple of them. The gradients compared are those of each output alone (as gradcheck
    takes them, the other outputs' gradients undefined) and of all outputs at once, each under a random upstream
    gradient (non-uniform: reduction='none' backward bugs show there, and not with ones)."""
    import lossops

    def run(name):
        leaves = leaf_copies(inputs)
        wrt = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
        with lossops.backend(name):
            outputs = fn(*leaves)
            outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
            gen = torch.Generator().manual_seed(seed)
            upstream = [(torch.randint(-32, 33, out.shape, generator=gen) / 8).to(out.dtype) for out in outputs]
            grads = [torch.autograd.grad(out, wrt, up, retain_graph=True, allow_unused=True)
                     for out, up in zip(outputs, upstream)]
            grads.append(torch.autograd.grad(outputs, wrt, upstream, allow_unused=True))
        return [out.detach() for out in outputs], grads

    assert all(t.dtype == torch.float64 for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point())
    (outputs, grads), (expected_outputs, expected_grads) = run(backend), run(gradchecked)
    torch.testing.assert_close(outputs, expected_outputs, rtol=1e-10, atol=1e-12)
    for which, (got, expected) in enumerate(zip(grads, expected_grads)):
        assert [g is None for g in got] == [e is None for e in expected], which
        assert any(g is not None for g in expected), which
        torch.testing.assert_close([g for g in got if g is not None], [e for e in expected if e is not None],
                                   rtol=1e-10, atol=1e-12, msg=lambda m: f"gradient {which}: {m}")


def assert_gradcheck(fn, inputs, backend: str):
    """float64 gradcheck of fn at inputs. Under Triton's interpreter a projection of the Jacobian (fast_mode), and
    gradients equal to the C++ backend's: for tests whose C++ grid, a superset of the interpreter's cases,
    gradchecks every element."""
    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=backend == "triton")
    if backend == "triton":
        assert_float64_gradients_match(fn, list(inputs), backend)


def lowp_error_no_worse(ours: torch.Tensor, theirs: torch.Tensor, truth: torch.Tensor, what: str, slack_ulps=1.0):
    """Our low-precision result is at least as close to the float64 truth as torch's own same-dtype result,
    up to `slack_ulps` units of the dtype's epsilon relative to the truth's scale (both round the final
    value to the same dtype, so the result rounding alone can differ by that much)."""
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    eps = torch.finfo(ours.dtype).eps
    truth = truth.double()
    our_err = (ours.double() - truth).abs().max().item() if truth.numel() else 0.0
    their_err = (theirs.double() - truth).abs().max().item() if truth.numel() else 0.0
    scale = truth.abs().max().item() if truth.numel() else 0.0
    assert our_err <= their_err + slack_ulps * eps * scale, (
        f"{what}: our {ours.dtype} error {our_err:.3g} vs torch's {their_err:.3g} (scale {scale:.3g})")


def run_python(code: str, env_update: dict, *args: str, drop=("TRITON_INTERPRET",), timeout=300):
    """Runs `code` in a fresh interpreter (environment variables that are read once at import need one)."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


_LINEAR_LOSS_PEAK = """
import sys
import torch
import lossops
from bench.measure import PeakMemory

op, (n, d, v) = sys.argv[1], map(int, sys.argv[2:5])
memory = PeakMemory(torch.device("cpu"))
if not memory.available:
    print("unavailable", memory.method)
    sys.exit()
gen = torch.Generator().manual_seed(0)
hidden = torch.randn(n, d, generator=gen).requires_grad_()
weight = (torch.randn(v, d, generator=gen) / 16).requires_grad_()
teacher_hidden, teacher_weight = torch.randn(n, d, generator=gen), torch.randn(v, d, generator=gen) / 16
target = torch.randint(0, v, (n,), generator=gen)
target[::17] = -100


def setup():
    hidden.grad = weight.grad = None


def run(_):
    with lossops.backend("cpp"):
        if op == "linear_cross_entropy":
            loss = lossops.linear_cross_entropy(hidden, weight, target)
        else:
            loss = lossops.linear_distillation_loss(hidden, weight, teacher_hidden, teacher_weight, target,
                                                    hard_weight=0.5)
        loss.backward()
    return hidden.grad, weight.grad


run(setup())  # the process's one-time allocations (thread pools, BLAS buffers) outside the measurement
print(min(memory.measure(setup, run) for _ in range(3)))
"""


def linear_loss_peak_beyond_gradients(op: str, n: int, d: int, v: int) -> int:
    """Peak process RSS that one forward+backward of a fused linear loss ("linear_cross_entropy" or
    "linear_distillation_loss", float32, the cpp backend) adds beyond the student's hidden and weight gradients,
    measured in a fresh interpreter (bench.measure.PeakMemory) after a first call; skips where RSS cannot be read."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    result = run_python(_LINEAR_LOSS_PEAK, {"PYTHONPATH": path}, op, str(n), str(d), str(v))
    assert result.returncode == 0, result.stderr
    if result.stdout.startswith("unavailable"):
        pytest.skip(result.stdout)
    return int(result.stdout.split()[-1]) - (n * d + v * d) * 4


# The C++ kernels' per-instruction-set builds, lowest first, as LOSSOPS_CPU_CAPABILITY names them.
ISA_ORDER = ("default", "avx2", "avx512")


def cpu_supports(isa: str) -> bool:
    rank = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}.get(torch.backends.cpu.get_cpu_capability(), 0)
    return ISA_ORDER.index(isa) <= rank


def isa_available(isa: str) -> bool:
    """This CPU runs the build and it was built: the main suite has every build (test_build checks it); the
    sanitized one (.ci/sanitize.sh) only those of distinct vector widths."""
    import lossops._cpp
    return cpu_supports(isa) and lossops._cpp.kernel_library(isa) is not None


@contextlib.contextmanager
def forced_isa(isa: str):
    """The C++ backend served by one ISA build, chosen the way a user forces it (LOSSOPS_CPU_CAPABILITY).
    In this process: the builds are separate kernel libraries with hidden symbols, so they load side by side."""
    import lossops
    # The library is loaded at once, on entry and after: the C++ eager routes call whichever was loaded last.
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LOSSOPS_CPU_CAPABILITY", isa)
            lossops._cpp.module.cache_clear()
            assert lossops._cpp.capability().lower() == isa.lower(), (lossops._cpp.capability(), isa)
            yield
    finally:
        lossops._cpp.module.cache_clear()
        lossops._cpp.module()


def without_eager_routes(m: pytest.MonkeyPatch) -> None:
    """No C++ eager route serves a call for the rest of m's context: every call takes its family's Python path."""
    from lossops import _eager
    _eager.bind()
    for route in _eager.routes():
        m.setattr(route, "call", lambda *arguments: None)
        m.setattr(route, "call_in_place", lambda *arguments: None)


# The native route's bound on a fused linear loss's low-precision weight gradient: it rounds each chunk's product to
# the operands' dtype before the float32 sum (CPU matmuls have no float32 output for them), which with few chunks is
# up to about twice the error of torch's one rounded product.
NATIVE_WEIGHT_GRADIENT_BOUND = 2.5


def assert_no_worse_than_torch(names, exact, ours, torchs, dtype, bounds=None) -> None:
    """Each of ours (in dtype) within `bound` times torch's own largest error against the float64 truth (1.5 unless
    bounds names another), plus 1e-3 of the truth's largest magnitude."""
    for name, e, o, t in zip(names, exact, ours, torchs):
        assert o.dtype == dtype, (name, o.dtype)
        ours_err, torch_err = (o.double() - e).abs().max(), (t.double() - e).abs().max()
        bound = (bounds or {}).get(name, 1.5)
        assert ours_err <= bound * torch_err + 1e-3 * e.abs().max(), (name, ours_err, torch_err)


# --- processes for the distributed tests ---------------------------------------------------------------------------

# What the workers import, imported once by the forkserver the processes are forked from (by name: the forkserver
# does not see the tests folder on its path). Importing them costs a spawned interpreter seconds, and several of
# them on two cores most of a test's time.
FORKSERVER_PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.tensor",
                      "torch.distributed.tensor.parallel", "transformers", "lossops",
                      "lossops.integrations.transformers", "transformers.models.llama.modeling_llama",
                      "transformers.models.qwen2.modeling_qwen2", "pytest", "tqdm", "triton"]
FORKSERVER_MMAP_THRESHOLD = str(64 << 10)


def start_forkserver():
    """The forkserver the distributed tests' processes (and examples/train_hf_causal_lm.py's, in this process) are
    forked from: it imports FORKSERVER_PRELOAD once, and glibc reads MALLOC_MMAP_THRESHOLD_ when it starts, so in its
    forks every allocation of 64 KiB or more is mmapped and goes back to the system when freed (glibc's adaptive
    threshold keeps freed memory): their resident set follows their live tensors. Its environment is this process's
    when it starts (TRITON_INTERPRET among it). Nothing if it runs already."""
    from multiprocessing import forkserver
    mp.get_context("forkserver").set_forkserver_preload(FORKSERVER_PRELOAD)
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = FORKSERVER_MMAP_THRESHOLD
    try:
        forkserver.ensure_running()
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


def spawn(worker, nprocs: int, *args):
    """worker(rank, *args) in nprocs processes forked from the forkserver; a worker's exception fails the call."""
    start_forkserver()
    mp.start_processes(_forked, args=(worker, args), nprocs=nprocs, join=True, start_method="forkserver")


def _forked(rank, worker, args):
    # conftest's interpreter speedup, which these processes do not import
    from _interpreter_speedup import install
    install()
    worker(rank, *args)
    # Done, and reported by the exit code: skip the interpreter's teardown of torch and transformers (seconds).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
