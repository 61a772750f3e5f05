"""lossops.margin_ranking_loss and lossops.nn.MarginRankingLoss against torch's, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import assert_gradcheck, backend_cases, forward_backward, grid, leaf_copies, pairwise
from _elementwise_cases import check_module_samples, check_reduced_precision, pair_module_samples

# target values: signs, and what torch does with any other value (a scale of the difference)
TARGETS = {"signs": lambda: torch.randint(0, 2, (3, 4)).double() * 2 - 1,
           "any": lambda: torch.tensor([[1.0, -1.0, 0.0, 2.0], [-3.0, 0.5, 1.0, -1.0], [1.0, 1.0, -1.0, 7.0]],
                                       dtype=torch.float64)}
# shapes broadcast against (3, 4) inputs; every operand keeps two dimensions, as torch requires
TARGET_SHAPES = ("same", "row", "column")
# which operands require grad: input2 as a constant score (a fixed baseline), and the target too (torch
# differentiates it; the reference path serves that)
GRADS = ("both", "input1", "all")


def _cases():
    options = dict(reduction=("none", "mean", "sum"), target=list(TARGETS), target_shape=TARGET_SHAPES,
                   margin=(0.0, 0.7, -0.5), grads=GRADS)

    def valid(case):  # a 0 target with no margin sits on the kink for the target's gradient, whatever the inputs
        return not (case["target"] == "any" and case["margin"] == 0.0 and case["grads"] == "all")

    return backend_cases({"cpp": grid(options, valid), "reference": pairwise(options, valid),
                          "triton": pairwise(options, valid)})


def _operands(case):
    torch.manual_seed(0)
    x1, x2 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    t = TARGETS[case["target"]]()
    t = {"same": t, "row": t[:1], "column": t[:, :1]}[case["target_shape"]]
    # away from the clamp's kink, where the loss is differentiable
    gap = case["margin"] - t * (x1 - x2)
    x1 = torch.where(gap.abs() < 0.05, x1 + 0.2 * torch.where(t == 0, 0.0, t.sign()), x1)
    x1.requires_grad_()
    x2.requires_grad_(case["grads"] != "input1")
    t.requires_grad_(case["grads"] == "all")
    return [x1, x2, t]


@pytest.mark.parametrize("backend, case", _cases(), indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    inputs = _operands(case)
    kwargs = dict(margin=case["margin"], reduction=case["reduction"])
    fn = lambda *a: lossops.margin_ranking_loss(*a, **kwargs)  # noqa: E731
    assert_close(forward_backward(fn, inputs),
                 forward_backward(lambda *a: F.margin_ranking_loss(*a, **kwargs), leaf_copies(inputs)))
    assert_gradcheck(fn, tuple(inputs), backend)


def test_at_the_kink_and_nonfinite(backend):
    # the clamp's gradient passes where margin - target * (input1 - input2) = 0, as torch's clamp_min; NaN stays NaN
    x1 = torch.tensor([1.0, 0.5, float("nan"), 2.0, float("inf"), -float("inf"), 0.0], requires_grad=True)
    x2 = torch.tensor([0.5, 1.0, 0.0, float("nan"), 0.0, 0.0, 0.0], requires_grad=True)
    t = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, -1.0, float("nan")])
    kwargs = dict(margin=0.5, reduction="none")
    ours = forward_backward(lambda a, b: lossops.margin_ranking_loss(a, b, t, **kwargs), [x1, x2])
    theirs = forward_backward(lambda a, b: F.margin_ranking_loss(a, b, t, **kwargs), leaf_copies([x1, x2]))
    assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_precision_matches_torch(backend, dtype):
    n = 256 if backend == "triton" else 5003
    torch.manual_seed(0)
    x2 = 3 * torch.randn(n, dtype=torch.float64)
    t = torch.randint(0, 2, (n,)).double() * 2 - 1

    def ours(x):
        return lossops.margin_ranking_loss(x, x2.to(x.dtype), t.to(x.dtype), margin=0.5, reduction="sum")

    def truth(x):
        return F.margin_ranking_loss(x, x2.to(x.dtype), t.to(x.dtype), margin=0.5, reduction="sum")

    check_reduced_precision(ours, truth, 3 * torch.randn(n, dtype=torch.float64), dtype, "margin_ranking_loss")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_module_samples(backend, dtype):
    samples = pair_module_samples(torch.nn.MarginRankingLoss, dtype)
    assert len(samples) == 8
    check_module_samples(lossops.nn.MarginRankingLoss, torch.nn.MarginRankingLoss, samples)


@pytest.mark.parametrize("call, error, match", [
    (lambda a, b: lossops.margin_ranking_loss(a, b, torch.ones(4)), RuntimeError,
     "All input tensors should have same dimension"),
    (lambda a, b: lossops.margin_ranking_loss(a, b[:2], torch.ones(3, 4)), RuntimeError, r"input2 of shape \(2, 4\)"),
    (lambda a, b: lossops.margin_ranking_loss(a, b, torch.ones(3, 5)), RuntimeError, r"target of shape \(3, 5\)"),
    (lambda a, b: lossops.margin_ranking_loss(a, b, torch.ones(3, 4), reduction="max"), ValueError, "max"),
    (lambda a, b: lossops.margin_ranking_loss(a, b, torch.ones(3, 4), margin="a"), TypeError, "margin"),
    (lambda a, b: lossops.margin_ranking_loss(a, [1.0], torch.ones(3, 4)), TypeError, "input2"),
    (lambda a, b: lossops.margin_ranking_loss(a, b, torch.ones(3, 4, dtype=torch.complex64)), RuntimeError, None),
    (lambda a, b: lossops.margin_ranking_loss(a, b, torch.ones(3, 4, dtype=torch.bool)), RuntimeError, "bool"),
])
def test_bad_arguments(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)).backward()


def test_dtypes_and_broadcasting_like_torch(backend):
    x1, x2 = torch.randn(3, 4), torch.randn(1, 4, dtype=torch.float64)
    for t in (torch.randint(0, 2, (3, 1)) * 2 - 1, torch.rand(3, 4, dtype=torch.float64), torch.rand(1, 1)):
        for reduction in ("none", "mean", "sum"):
            ours = lossops.margin_ranking_loss(x1, x2, t, margin=0.25, reduction=reduction)
            theirs = F.margin_ranking_loss(x1, x2, t, margin=0.25, reduction=reduction)
            assert ours.dtype == theirs.dtype
            assert_close(ours, theirs)
    ints = torch.arange(6).reshape(2, 3), torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    assert_close(lossops.margin_ranking_loss(*ints, reduction="sum"), F.margin_ranking_loss(*ints, reduction="sum"))
    empty = [torch.empty(0, 3, requires_grad=True), torch.empty(0, 3), torch.empty(0, 3)]
    assert_close(forward_backward(lossops.margin_ranking_loss, empty),
                 forward_backward(F.margin_ranking_loss, leaf_copies(empty)), equal_nan=True)


def test_module_matches_torch_module(backend):
    inputs = [torch.randn(5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    t = torch.randint(0, 2, (5,)).double() * 2 - 1
    ours, theirs = lossops.nn.MarginRankingLoss(0.3, reduction="sum"), torch.nn.MarginRankingLoss(0.3, reduction="sum")
    assert_close(forward_backward(ours, [*inputs, t]), forward_backward(theirs, [*leaf_copies(inputs), t]))
    assert repr(lossops.nn.MarginRankingLoss(margin=0.3)) == "MarginRankingLoss(margin=0.3)"
    assert repr(lossops.nn.MarginRankingLoss()) == "MarginRankingLoss()"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_eager_path_matches_the_custom_op(monkeypatch, dtype, reduction):
    """Plain CPU calls take the C++ eager path (one call, its own autograd node): the custom op's values, bit for
    bit, and both inputs' gradients."""
    from test_cpp_eager_path import ELEMENTWISE_NODE, assert_same_as_custom_op

    def make():
        torch.manual_seed(0)
        return (torch.randn(7, 9, dtype=dtype, requires_grad=True), torch.randn(7, 9, dtype=dtype, requires_grad=True),
                (torch.randint(0, 2, (7, 9)) * 2 - 1).to(dtype))

    grad_output = torch.randn(7, 9, dtype=dtype) if reduction == "none" else None
    assert_same_as_custom_op(monkeypatch, lambda *a: lossops.margin_ranking_loss(*a, margin=0.2, reduction=reduction),
                             make, ELEMENTWISE_NODE, grad_output)
