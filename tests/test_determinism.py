"""Determinism and thread safety of the C++ backend.

- The same input gives bitwise-identical losses and gradients run to run and for 1 or 2 torch threads:
  rows are independent, and every reduction sums fixed-size chunks in index order (csrc/reduction.h
  deterministic_sum), so neither the thread count nor the scheduling changes a bit.
- Calls from several Python threads at once give the same results as sequential calls (no shared
  mutable state in the kernels or in the dispatch: the backend choice is a context variable).

GPU (Triton) behaviour, not testable here: each row's loss, lse and gradient come from one program, so
they are bitwise reproducible run to run; the batch reduction is torch's own sum over those per-row
losses, which is run-to-run deterministic on a given GPU and launch configuration, but may differ in
the last bits from the C++ backend's fixed-chunk double sum and between GPU models.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

import lossops
from _cases import forward_backward
from test_bad_inputs import KINDS, OPS

# Big enough that at::parallel_for splits rows over both threads and the reduction has several chunks
# (kReduceChunk = 2^13 rows or elements).
PROBLEMS = {
    "many_short_rows": dict(shape=(70_001, 7)),
    "long_rows": dict(shape=(96, 5_003), label_smoothing=0.2),
    "class_dim_1": dict(shape=(40, 33, 900), weight=True),  # (N, C, d): strided rows
    "probabilities": dict(shape=(20_000, 9), probabilities=True),
}


def class_problem(op, shape, probabilities=False, weight=False, **options):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen).requires_grad_()
    if probabilities:
        target = torch.randn(shape, generator=gen).softmax(1)
    else:
        target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen)
        target[::7] = -100
    if weight:
        options["alpha" if op.name == "softmax_focal_loss" else "weight"] = torch.rand(shape[1], generator=gen)
    if op.name != "cross_entropy":
        options.pop("label_smoothing", None)
    return x, target, options


def elementwise_problem(op, shape, **_):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(shape, generator=gen).requires_grad_(), torch.rand(shape, generator=gen), {}


def operand_problem(op, shape, **_):
    """The first operand, the second, and the others by name, made by the op's kind (test_bad_inputs.KINDS)."""
    torch.manual_seed(3)
    kind = KINDS[op.kind]
    x = torch.randn(shape).requires_grad_()
    others = kind.others(x.detach())
    return x, others.pop(kind.operands[1]), others


def problem(op, name):
    spec = PROBLEMS[name]
    if op.kind == "classes":
        return class_problem(op, **spec)
    if "elementwise" in KINDS[op.kind].groups:
        return elementwise_problem(op, (spec["shape"][0], spec["shape"][1]))
    return operand_problem(op, (spec["shape"][0], spec["shape"][1]))


def evaluate(op, x, target, options, reduction):
    with lossops.backend("cpp"):
        return forward_backward(lambda x: op.ours(x, target, reduction=reduction, **options), [x])


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_bitwise_equal(a, b):
    (loss_a, (grad_a,)), (loss_b, (grad_b,)) = a, b
    assert torch.equal(bits(loss_a), bits(loss_b)), "loss differs"
    assert torch.equal(bits(grad_a), bits(grad_b)), "gradient differs"


@contextlib.contextmanager
def torch_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


CASES = [pytest.param(op, name, reduction, id=f"{op.name}-{name}-{reduction}")
         for op in OPS for name in PROBLEMS
         if op.name == "cross_entropy" or name == "many_short_rows" or op.kind == "classes" and name != "probabilities"
         for reduction in ("none", "mean", "sum")]


@pytest.mark.parametrize("op, name, reduction", CASES)
def test_bitwise_identical_run_to_run_and_across_thread_counts_cpp(op, name, reduction):
    x, target, options = problem(op, name)
    with torch_threads(2):
        assert torch.get_num_threads() == 2  # else "across thread counts" would compare 1 with 1
        first = evaluate(op, x, target, options, reduction)
        assert_bitwise_equal(first, evaluate(op, x, target, options, reduction))
    with torch_threads(1):
        assert_bitwise_equal(first, evaluate(op, x, target, options, reduction))


def _task(i: int):
    """Distinct shapes and options per task, half of them under the reference backend: each thread has
    its own backend choice, and none may see another's data."""
    gen = torch.Generator().manual_seed(100 + i)
    n, c = 257 + 31 * i, 11 + 97 * i
    x = (4 * torch.randn(n, c, generator=gen)).requires_grad_()
    target = torch.randint(0, c, (n,), generator=gen)
    options = dict(reduction=("none", "mean", "sum")[i % 3], label_smoothing=0.1 * (i % 2))
    return x, target, options, ("cpp", "reference")[i % 4 == 3]


def _run_task(i):
    x, target, options, backend = _task(i)
    with lossops.backend(backend):
        assert lossops.get_backend() == backend
        result = forward_backward(lambda x: lossops.cross_entropy(x, target, **options), [x])
        assert lossops.get_backend() == backend
    return result


def test_concurrent_calls_from_python_threads():
    tasks = range(16)
    sequential = [_run_task(i) for i in tasks]
    with ThreadPoolExecutor(max_workers=6) as pool:
        concurrent = list(pool.map(_run_task, [i for _ in range(3) for i in tasks]))
    for k, (loss, (grad,)) in enumerate(concurrent):
        i = tasks[k % len(tasks)]
        assert_bitwise_equal((loss, (grad,)), sequential[i])
        x, target, options, _ = _task(i)
        expected, (expected_grad,) = forward_backward(lambda x: F.cross_entropy(x, target, **options), [x])
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
