"""lossops.cosine_embedding_loss and lossops.nn.CosineEmbeddingLoss against torch's, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import (assert_float64_gradients_match, assert_gradcheck, backend_cases, forward_backward, grid,
                    leaf_copies, pairwise)
from _elementwise_cases import check_module_samples, check_reduced_precision, pair_module_samples

# target values: signs, and any other value (torch: loss 0 there)
TARGETS = {"signs": lambda n: torch.randint(0, 2, (n,)).double() * 2 - 1,
           "any": lambda n: torch.tensor([1.0, -1.0, 0.0, 2.0, -1.0, 1.0, 0.5][:n], dtype=torch.float64)}
# (input1 rows, input2 rows, target): torch's products broadcast
LAYOUTS = {"rows": (5, 5, 5), "unbatched": (None, None, None), "input2_row": (5, 1, 5), "target_row": (5, 5, 1)}


def _cases():
    options = dict(reduction=("none", "mean", "sum"), target=list(TARGETS), layout=list(LAYOUTS),
                   margin=(0.0, 0.4, -0.3), features=(3, 40), grads=("both", "input1"))
    return backend_cases({"cpp": grid(options), "reference": pairwise(options), "triton": pairwise(options)})


def _operands(case):
    torch.manual_seed(0)
    n1, n2, nt = LAYOUTS[case["layout"]]
    d = case["features"]
    x1 = torch.randn(*(() if n1 is None else (n1,)), d, dtype=torch.float64)
    x2 = torch.randn(*(() if n2 is None else (n2,)), d, dtype=torch.float64)
    t = TARGETS[case["target"]](nt or 1)
    t = t.reshape(()) if nt is None else t
    return [x1.requires_grad_(), x2.requires_grad_(case["grads"] == "both"), t]


@pytest.mark.parametrize("backend, case", _cases(), indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    inputs = _operands(case)
    kwargs = dict(margin=case["margin"], reduction=case["reduction"])

    def ours(*a):
        return lossops.cosine_embedding_loss(*a, **kwargs)

    assert_close(forward_backward(ours, inputs),
                 forward_backward(lambda *a: F.cosine_embedding_loss(*a, **kwargs), leaf_copies(inputs)))
    # away from the clamp's kink (cos = margin), where the loss is differentiable
    cos = F.cosine_similarity(*(x.detach() for x in inputs[:2]), dim=-1, eps=0)
    if ((cos - case["margin"]).abs() < 1e-3).any():
        return
    if backend == "triton" and case["features"] > 3:
        # the interpreter's gradcheck is slow at 40 features; the C++ grid gradchecks this very case
        assert_float64_gradients_match(ours, inputs, backend)
    else:
        assert_gradcheck(ours, inputs, backend)


def test_kink_zero_rows_and_nonfinite(backend):
    # cos = margin exactly (the clamp's gradient passes there), zero rows (torch's 1e-12 keeps them finite), NaN
    x1 = torch.tensor([[1.0, 0.0], [0.0, 0.0], [float("nan"), 1.0], [1.0, 2.0], [3.0, -1.0]], requires_grad=True)
    x2 = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 2.0]], requires_grad=True)
    t = torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0])
    kwargs = dict(margin=1.0, reduction="none")
    ours = forward_backward(lambda a, b: lossops.cosine_embedding_loss(a, b, t, **kwargs), [x1, x2])
    theirs = forward_backward(lambda a, b: F.cosine_embedding_loss(a, b, t, **kwargs), leaf_copies([x1, x2]))
    assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_precision_matches_torch(backend, dtype):
    n, d = (16, 40) if backend == "triton" else (300, 257)
    torch.manual_seed(0)
    x2 = torch.randn(n, d, dtype=torch.float64)
    t = torch.randint(0, 2, (n,)).double() * 2 - 1

    def ours(x):
        return lossops.cosine_embedding_loss(x, x2.to(x.dtype), t.to(x.dtype), margin=0.1, reduction="sum")

    def truth(x):
        return F.cosine_embedding_loss(x, x2.to(x.dtype), t.to(x.dtype), margin=0.1, reduction="sum")

    check_reduced_precision(ours, truth, torch.randn(n, d, dtype=torch.float64), dtype, "cosine_embedding_loss",
                            atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [1, 9, 16, 33, 257])
def test_forward_without_gradients_matches_float64(backend, dtype, d):
    """Under no_grad each row's sums are read straight from the stored dtype (two vectors a step, a scalar tail):
    every row length of full steps and tails gives torch's float64 loss within the dtype's rounding."""
    torch.manual_seed(d)
    x1, x2 = torch.randn(6, d, dtype=dtype), torch.randn(6, d, dtype=dtype)
    t = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 1.0], dtype=dtype)
    with torch.no_grad():
        ours = lossops.cosine_embedding_loss(x1, x2, t, margin=-0.2, reduction="none")
    exact = F.cosine_embedding_loss(x1.double(), x2.double(), t.double(), margin=-0.2, reduction="none")
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(ours.double(), exact, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_module_samples(backend, dtype):
    samples = pair_module_samples(torch.nn.CosineEmbeddingLoss, dtype)
    assert len(samples) >= 5
    check_module_samples(lossops.nn.CosineEmbeddingLoss, torch.nn.CosineEmbeddingLoss, samples)


@pytest.mark.parametrize("call, error, match", [
    (lambda a, b: lossops.cosine_embedding_loss(a, b, torch.ones(3, 1)), RuntimeError, "0D or 1D target"),
    (lambda a, b: lossops.cosine_embedding_loss(a[0], b[0], torch.ones(3)), RuntimeError, "1D target tensor expects"),
    (lambda a, b: lossops.cosine_embedding_loss(a, b, torch.tensor(1.0)), RuntimeError, "0D target tensor expects"),
    (lambda a, b: lossops.cosine_embedding_loss(a, b[:2], torch.ones(3)), RuntimeError, "size"),
    (lambda a, b: lossops.cosine_embedding_loss(a, b, torch.ones(2)), RuntimeError, "size"),
    (lambda a, b: lossops.cosine_embedding_loss(a, b, torch.ones(3), reduction="max"), ValueError, "max"),
    (lambda a, b: lossops.cosine_embedding_loss(a, b, torch.ones(3), margin="a"), TypeError, "margin"),
    (lambda a, b: lossops.cosine_embedding_loss(a, [1.0], torch.ones(3)), TypeError, "input2"),
])
def test_bad_arguments(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)).backward()
    with pytest.raises(error):  # torch raises the same type
        with lossops.backend("reference"):
            call(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4))


def test_target_gets_no_gradient_and_dtypes_like_torch(backend):
    x1, x2 = torch.randn(3, 4, requires_grad=True), torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([1.0, -1.0, 1.0], requires_grad=True)
    lossops.cosine_embedding_loss(x1, x2, t).backward()
    assert t.grad is None and x1.grad is not None
    for target in (torch.tensor([1, -1, 1]), torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)):
        ours, theirs = lossops.cosine_embedding_loss(x1, x2, target), F.cosine_embedding_loss(x1, x2, target)
        assert ours.dtype == theirs.dtype
        assert_close(ours, theirs)
    ints = torch.arange(6).reshape(2, 3), torch.ones(2, 3, dtype=torch.long), torch.tensor([1, -1])
    assert_close(lossops.cosine_embedding_loss(*ints), F.cosine_embedding_loss(*ints))
    empty = [torch.empty(0, 3, requires_grad=True), torch.empty(0, 3), torch.empty(0)]
    assert_close(forward_backward(lossops.cosine_embedding_loss, empty),
                 forward_backward(F.cosine_embedding_loss, leaf_copies(empty)), equal_nan=True)


def test_module_matches_torch_module(backend):
    inputs = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    t = torch.randint(0, 2, (5,)).double() * 2 - 1
    ours = lossops.nn.CosineEmbeddingLoss(0.3, reduction="sum")
    theirs = torch.nn.CosineEmbeddingLoss(0.3, reduction="sum")
    assert_close(forward_backward(ours, [*inputs, t]), forward_backward(theirs, [*leaf_copies(inputs), t]))
    assert repr(lossops.nn.CosineEmbeddingLoss(margin=0.3)) == "CosineEmbeddingLoss(margin=0.3)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("grads", ["both", "input1"])
def test_eager_path_matches_the_custom_op(monkeypatch, dtype, reduction, grads):
    """Plain CPU calls of (N, D) rows take the C++ eager path (one call, its own autograd node): the custom op's
    values and gradients, bit for bit."""
    from test_cpp_eager_path import assert_same_as_custom_op

    def make():
        torch.manual_seed(0)
        return (torch.randn(7, 9, dtype=dtype, requires_grad=True),
                torch.randn(7, 9, dtype=dtype, requires_grad=grads == "both"), torch.tensor([1, -1, 1, 0, -1, 1, -1]))

    grad_output = torch.randn(7, dtype=dtype) if reduction == "none" else None
    assert_same_as_custom_op(monkeypatch, lambda *a: lossops.cosine_embedding_loss(*a, margin=0.1, reduction=reduction),
                             make, "LossopsCosineEmbeddingLossBackward", grad_output)
