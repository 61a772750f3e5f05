"""The GPU route on a real GPU (skipped without CUDA; scripts/gpu_check.sh runs it on a lent machine).

Every op against torch on CUDA (fp32 and bf16: values and gradients), the out-of-range target error (immediate mode
raises IndexError; the default device-side assertion fails the CUDA context, so it runs in a subprocess), forward
and backward captured in a CUDA graph and replayed, torch.compile(mode="reduce-overhead") of a training step, and
torch.cuda.set_sync_debug_mode("error") over every op: no host synchronisation anywhere.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import lossops
from lossops._family import FAMILIES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _case_inputs(case, dtype):
    torch.manual_seed(0)
    args = [a.to(CUDA) if isinstance(a, torch.Tensor) else a for a in case.make(dtype)]
    args[0] = args[0].detach().requires_grad_()
    return args


def _torch_cases():
    for name, family in FAMILIES.items():
        for index, case in enumerate(family.cases):
            if case.torch_fn is not None:
                yield pytest.param(name, case, id=f"{name}-{index}")


def _all_cases():
    for name, family in FAMILIES.items():
        for index, case in enumerate(family.cases):
            yield pytest.param(name, case, id=f"{name}-{index}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, case", list(_torch_cases()))
def test_every_op_matches_torch_on_cuda(name, case, dtype):
    args = _case_inputs(case, dtype)
    theirs_args = [a.detach().clone().requires_grad_() if i == 0 else a for i, a in enumerate(args)]
    ours = getattr(lossops, name)(*args, **case.kwargs)
    if name == "ctc_loss" and dtype == torch.bfloat16:  # torch's CUDA CTC refuses bf16: compare in float32
        theirs_args[0] = theirs_args[0].float().detach().requires_grad_()
    theirs = case.torch_fn(*theirs_args, **case.kwargs)
    grad_out = torch.rand_like(ours, dtype=torch.float32).to(ours.dtype)
    ours.backward(grad_out)
    theirs.backward(grad_out.to(theirs.dtype))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.float(), theirs.float(), **tol)
    torch.testing.assert_close(args[0].grad.float(), theirs_args[0].grad.float(), **tol)


def test_out_of_range_target_raises_index_error_in_immediate_mode():
    x = torch.randn(4, 5, device=CUDA, requires_grad=True)
    lossops.set_target_checks("immediate")
    try:
        with pytest.raises(IndexError, match="7"):
            lossops.cross_entropy(x, torch.tensor([0, 7, 1, 2], device=CUDA))
    finally:
        lossops.set_target_checks("device")


def test_out_of_range_target_fails_on_the_device_by_default():
    script = textwrap.dedent("""
        import torch, lossops
        x = torch.randn(4, 5, device="cuda", requires_grad=True)
        loss = lossops.cross_entropy(x, torch.tensor([0, 7, 1, 2], device="cuda"))
        torch.cuda.synchronize()
        print("NO ERROR", float(loss))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "NO ERROR" not in result.stdout, result.stdout + result.stderr
    assert "assert" in (result.stderr + result.stdout).lower()


@pytest.mark.parametrize("name, case", list(_all_cases()))
def test_forward_backward_has_no_host_sync(name, case):
    args = _case_inputs(case, torch.float32)
    fn = getattr(lossops, name)
    loss = fn(*args, **case.kwargs)  # first call: compiles kernels, caches kernel options
    loss.backward(torch.ones_like(loss))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = fn(*args, **case.kwargs)
        loss.backward(torch.ones_like(loss))
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("name, case", list(_all_cases()))
def test_forward_backward_captured_in_a_cuda_graph(name, case):
    if name == "ctc_loss":
        pytest.skip("CTC's lengths are read on the host, as torch's CUDA CTC does")
    args = _case_inputs(case, torch.float32)
    fn = getattr(lossops, name)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture, as CUDA graphs require
        for _ in range(2):
            args[0].grad = None
            fn(*args, **case.kwargs).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    eager_loss = fn(*args, **case.kwargs).detach().clone()
    args[0].grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fn(*args, **case.kwargs)
        loss.sum().backward()
    with torch.no_grad():
        args[0].mul_(0.5)  # new values in the same memory: the replay must see them
    graph.replay()
    torch.cuda.synchronize()
    expected_args = [a.detach().clone().requires_grad_() if i == 0 else a for i, a in enumerate(args)]
    expected = fn(*expected_args, **case.kwargs)
    expected.sum().backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(args[0].grad, expected_args[0].grad, rtol=1e-5, atol=1e-6)
    assert not torch.equal(loss, eager_loss)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_last_program_reduction_over_many_programs(reduction):
    """Cross-entropy's forward is one launch whose last program reduces every row (triton_kernels/common.py,
    last_program): with tens of thousands of programs in flight at once, every row's value must reach it. Repeated
    calls reuse the stream's counter, a second stream has its own, and a captured graph replays with its own."""
    torch.manual_seed(0)
    x = torch.randn(40000, 37, device=CUDA, dtype=torch.float64)
    y = torch.randint(0, 37, (40000,), device=CUDA)
    y[::7] = -100
    w = torch.rand(37, device=CUDA, dtype=torch.float64) + 0.5
    expected = torch.nn.functional.cross_entropy(x, y, w, reduction=reduction)
    for _ in range(3):
        torch.testing.assert_close(lossops.cross_entropy(x, y, w, reduction=reduction), expected)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = lossops.cross_entropy(x, y, w, reduction=reduction)
        on_main_inputs = lossops.cross_entropy(x * 2, y, w, reduction=reduction)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(on_side, expected)
    torch.testing.assert_close(on_main_inputs, torch.nn.functional.cross_entropy(x * 2, y, w, reduction=reduction))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lossops.cross_entropy(x, y, w, reduction=reduction)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured, expected)
    torch.testing.assert_close(lossops.cross_entropy(x, y, w, reduction=reduction), expected)


def test_compiled_training_step_with_reduce_overhead():
    """Forward compiled with CUDA graphs (AOTAutograd graphs the backward too); the step's backward and optimizer
    outside, as a training loop has them."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 1000).to(CUDA)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_of(x, y):
        return lossops.cross_entropy(model(x), y, label_smoothing=0.1)

    compiled = torch.compile(loss_of, mode="reduce-overhead", fullgraph=True)
    x, y = torch.randn(256, 64, device=CUDA), torch.randint(0, 1000, (256,), device=CUDA)
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        ours = compiled(x, y)
        ours.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        ours = ours.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        reference = loss_of(x, y)
        reference.backward()
        for g, p in zip(grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours, reference.detach(), rtol=1e-5, atol=1e-6)
        optimizer.step()
