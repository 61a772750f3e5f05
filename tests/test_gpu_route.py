"""The GPU route (the triton backend) without a GPU: what each op's forward+backward asks of the host.

On CUDA a host read of a device value (`.item()`, `int(t)`, `bool(t)`, `.tolist()`) synchronises, and a tensor made
from host values (`torch.tensor(...)`) is a pageable host-to-device copy; neither can be captured in a CUDA graph.
Under Triton's interpreter every tensor is in CPU memory, so the one helper every value-reading check branches on
(lossops._checks.host_readable) is made to answer as it would for device memory, and every such call made from
lossops' own code (not torch's or Triton's) on a second, warmed-up call is recorded: there must be none.
The same run counts the Triton launches and the torch ops each op issues.
"""
from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
import triton.language as tl
import triton.runtime.interpreter as interpreter

import lossops
import lossops.triton_kernels
from lossops import _checks
from lossops._family import FAMILIES

OURS = tuple(os.path.dirname(m.__file__) + os.sep for m in (lossops, lossops.triton_kernels))
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")
HOST_TENSORS = ("tensor", "as_tensor", "scalar_tensor")


def _from_our_code() -> bool:
    caller = sys._getframe(2).f_code.co_filename
    return caller.startswith(OURS)


@contextlib.contextmanager
def device_memory_recorder(monkeypatch):
    """Records (what, where) for every host read and host-built tensor made from lossops' frames."""
    calls = []
    monkeypatch.setattr(_checks, "host_readable", lambda t: False)

    def wrap(owner, name, kind):
        original = getattr(owner, name)

        def recorded(*args, **kwargs):
            if _from_our_code():
                frame = sys._getframe(1)
                calls.append(f"{kind} {name} at {frame.f_code.co_filename}:{frame.f_lineno}")
            return original(*args, **kwargs)
        monkeypatch.setattr(owner, name, recorded)

    for name in HOST_READS:
        wrap(torch.Tensor, name, "host read:")
    for name in HOST_TENSORS:
        wrap(torch, name, "tensor from host values:")
    yield calls


@contextlib.contextmanager
def counting_launches(monkeypatch):
    launches = []
    run = interpreter.InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches.append(self.__name__)
        return run(self, *args, **kwargs)
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)
    yield launches


def _calls():
    for name, family in FAMILIES.items():
        for index, case in enumerate(family.cases):
            yield pytest.param(name, case, id=f"{name}-{index}")


def _inputs(case):
    torch.manual_seed(0)
    args = case.make(torch.float32)  # the declared cases' makers live in lossops' modules: called outside records
    args[0] = args[0].detach().requires_grad_()
    return args


def _forward_backward(name, case, args=None):
    args = args or _inputs(case)
    loss = getattr(lossops, name)(*args, **case.kwargs)
    loss.backward(torch.ones_like(loss))
    return args[0].grad


@pytest.mark.parametrize("name, case", list(_calls()))
def test_no_host_read_and_no_host_built_tensor_on_the_triton_route(monkeypatch, name, case):
    with lossops.backend("triton"):
        _forward_backward(name, case)  # values cached on a first call (kernel options) are allowed
        args = _inputs(case)
        with device_memory_recorder(monkeypatch) as calls:
            grad = _forward_backward(name, case, args)
    assert grad is not None and torch.isfinite(grad).all()
    allowed = [c for c in calls if name == "ctc_loss" and "tolist" in c]  # CTC's lengths on the host, as torch's
    assert [c for c in calls if c not in allowed] == [], "\n".join(calls)


def test_out_of_range_target_on_device_memory_is_a_device_assertion(monkeypatch):
    x, bad = torch.randn(4, 5, requires_grad=True), torch.tensor([0, 7, 1, 2])
    with lossops.backend("triton"):
        monkeypatch.setattr(_checks, "host_readable", lambda t: False)
        # On a CPU tensor torch._assert_async fails at once; on CUDA it fails on the device, without a sync.
        with pytest.raises(RuntimeError, match="class index in target is out of bounds"):
            lossops.cross_entropy(x, bad)
        lossops.set_target_checks("immediate")
        try:
            with pytest.raises(IndexError, match="Target 7 is out of bounds"):
                lossops.cross_entropy(x, bad)
        finally:
            lossops.set_target_checks("device")
    with pytest.raises(ValueError, match="target-check mode 'sometimes'"):
        lossops.set_target_checks("sometimes")


# Triton launches and kernel-launching torch ops per forward+backward on the triton route (plain eager: the op's
# own autograd node, no custom-op dispatch), as they stand: a change that adds one fails here. The torch ops include
# the test's own grad_output (ones_like). Cross-entropy, softmax focal loss and NLL: the row kernel (whose last
# program finishes the reduction), the device-side target assertion, and in backward the gradient kernel. The
# others: their kernel, which writes the gradient in forward scaled by the reduction and whose last program reduces
# the loss, the mean's denominator filled in on the device before it, and in backward the kernel that scales the
# gradient by grad_output unless that is 1 (docs/gpu-route.md). binary_cross_entropy and sigmoid_focal_loss_index
# add a flag's zeros and its device-side assertion (values outside [0, 1]; class indices out of range), the latter
# the count of kept targets; gaussian_nll_loss the device-side assertion of torch's check that no var entry is
# negative. distillation_loss still forms its scale and reduces its rows' losses with torch ops around its kernel.
LAUNCH_BUDGET = {"cross_entropy": 2, "softmax_focal_loss": 2, "binary_cross_entropy_with_logits": 2,
                 "sigmoid_focal_loss": 2, "sigmoid_focal_loss_index": 2, "l1_loss": 2, "mse_loss": 2,
                 "smooth_l1_loss": 2, "huber_loss": 2, "ctc_loss": 2, "linear_cross_entropy": 3,
                 "binary_cross_entropy": 2, "soft_margin_loss": 2, "hinge_embedding_loss": 2, "poisson_nll_loss": 2,
                 "kl_div": 2, "nll_loss": 2, "distillation_loss": 2, "linear_distillation_loss": 3,
                 "margin_ranking_loss": 2, "gaussian_nll_loss": 2, "cosine_embedding_loss": 2,
                 "multilabel_soft_margin_loss": 2, "triplet_margin_loss": 2, "triplet_margin_with_distance_loss": 2,
                 "multi_margin_loss": 2, "multilabel_margin_loss": 2}
TORCH_OP_BUDGET = {"cross_entropy": 2, "softmax_focal_loss": 2, "binary_cross_entropy_with_logits": 2,
                   "sigmoid_focal_loss": 2, "sigmoid_focal_loss_index": 7, "l1_loss": 2, "mse_loss": 2,
                   "smooth_l1_loss": 2, "huber_loss": 2, "ctc_loss": 35, "linear_cross_entropy": 38,
                   "binary_cross_entropy": 5, "soft_margin_loss": 2, "hinge_embedding_loss": 2, "poisson_nll_loss": 2,
                   "kl_div": 2, "nll_loss": 2, "distillation_loss": 11, "linear_distillation_loss": 26,
                   "margin_ranking_loss": 2, "gaussian_nll_loss": 6, "cosine_embedding_loss": 2,
                   "multilabel_soft_margin_loss": 2, "triplet_margin_loss": 6,
                   "triplet_margin_with_distance_loss": 6, "multi_margin_loss": 6, "multilabel_margin_loss": 6}


def test_every_public_family_has_a_launch_budget():
    """A new family states what its forward+backward costs the GPU route here, so a later change is held to it."""
    assert set(LAUNCH_BUDGET) == set(TORCH_OP_BUDGET) == set(FAMILIES)


@pytest.mark.parametrize("name", sorted(LAUNCH_BUDGET))
def test_launches_and_torch_ops_per_forward_backward(monkeypatch, name):
    from bench.gpu_route_host import _torch_ops, stubbed_launches
    case = FAMILIES[name].cases[0]
    with lossops.backend("triton"):
        monkeypatch.setattr(_checks, "host_readable", lambda t: False)
        _forward_backward(name, case)
        args = _inputs(case)
        with counting_launches(monkeypatch) as launches:
            _forward_backward(name, case, args)
            launches = list(launches)  # the counting stays patched until the test ends
        args = _inputs(case)
        # the kernels stubbed out: the interpreter's own work would count as torch ops
        with stubbed_launches():
            ops = _torch_ops(lambda: _forward_backward(name, case, args))
    assert len(launches) <= LAUNCH_BUDGET[name], launches
    assert ops <= TORCH_OP_BUDGET[name], ops


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_row_kernel_last_program_finishes_the_reduction(monkeypatch, reduction):
    """Cross-entropy's forward on this route is one launch whose last program reduces what every other program
    wrote: more rows than the finishing loop's block (several passes of it; the block made small, which the
    interpreter allows, to keep the programs few), ignored rows, class weights. The value is torch's, the mean's
    denominator is left in the state for backward, and the ticket counter is back to 0 for the next launch."""
    from lossops.triton_kernels import common
    from lossops.triton_kernels import cross_entropy as kernels
    monkeypatch.setattr(kernels, "FINISH_BLOCK", tl.constexpr(16))
    torch.manual_seed(0)
    rows = 16 * 2 + 5
    x, y = torch.randn(rows, 3, dtype=torch.float64), torch.randint(0, 3, (rows,))
    y[::5] = -100
    w = torch.rand(3, dtype=torch.float64) + 0.5
    loss, state = kernels.cross_entropy_forward(
        input=x.unsqueeze(-1), target=y, weight=w, ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0,
        softcap=None, focal_gamma=None, reduction=reduction, weighted_mean=True)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, y, w, reduction=reduction))
    if reduction == "mean":
        torch.testing.assert_close(state[-1], w[y[y != -100]].sum())
    assert int(common.finishing_tickets(x.device)) == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_elementwise_and_row_pair_kernels_reduce_in_their_last_program(monkeypatch, reduction):
    """An elementwise family's forward (and cosine embedding's, a program a row pair) on this route is one launch:
    the gradients' scale is formed from the mean's denominator in the kernel, and the last program adds up what the
    others wrote. More programs than the finishing loop's block (several passes of it, the block made small);
    values and gradients are torch's, and the ticket counter is back to 0 for the next launch."""
    from lossops.triton_kernels import common
    monkeypatch.setattr(common, "FINISH_BLOCK", tl.constexpr(16))
    torch.manual_seed(0)
    x, t = torch.randn(9000, dtype=torch.float64, requires_grad=True), torch.randn(9000, dtype=torch.float64)
    a, b = torch.randn(37, 3, dtype=torch.float64, requires_grad=True), torch.randn(37, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (37,)).double() * 2 - 1
    calls = [(lossops.mse_loss, torch.nn.functional.mse_loss, (x, t)),
             (lossops.cosine_embedding_loss, torch.nn.functional.cosine_embedding_loss, (a, b, y))]
    with lossops.backend("triton"):
        for ours, theirs, args in calls:
            got = ours(*args, reduction=reduction)
            upstream = torch.rand_like(got)
            got_grad, = torch.autograd.grad(got, args[0], upstream)
            expected = theirs(*args, reduction=reduction)
            expected_grad, = torch.autograd.grad(expected, args[0], upstream)
            torch.testing.assert_close(got, expected)
            torch.testing.assert_close(got_grad, expected_grad)
            assert int(common.finishing_tickets(x.device)) == 0


def test_mean_over_a_zero_denominator_in_the_kernel_is_the_cpp_backends():
    """avg_factor 0 (mmdetection's denominator): the loss is total / 0 and every gradient 0, on both backends."""
    torch.manual_seed(0)
    x, t = torch.randn(6, 5, dtype=torch.float64, requires_grad=True), torch.rand(6, 5, dtype=torch.float64)
    results = []
    for backend in ("triton", "cpp"):
        with lossops.backend(backend):
            loss = lossops.sigmoid_focal_loss(x, t, reduction="mean", avg_factor=torch.zeros((), dtype=torch.float64))
            results.append((loss, *torch.autograd.grad(loss, x)))
    torch.testing.assert_close(results[0], results[1])
    assert torch.isinf(results[0][0]) and not results[0][1].any()
