"""lossops.soft_margin_loss and lossops.hinge_embedding_loss against torch's, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import assert_gradcheck, backend_cases, forward_backward, grid, leaf_copies, pairwise
from _elementwise_cases import check_reduced_precision, check_torch_module_sample, torch_module_params

# target values: signs, and what torch does with any other value (hinge: both terms; soft margin: a scale)
TARGETS = {"signs": lambda: torch.randint(0, 2, (3, 4)).double() * 2 - 1,
           "any": lambda: torch.tensor([[1.0, -1.0, 0.0, 2.0], [-3.0, 0.5, 1.0, -1.0], [1.0, 1.0, -1.0, 7.0]],
                                       dtype=torch.float64)}
TARGET_SHAPES = ("same", "row", "column")  # broadcast against a (3, 4) input


def _cases(with_margin):
    options = dict(reduction=("none", "mean", "sum"), target=list(TARGETS), target_shape=TARGET_SHAPES)
    if with_margin:
        options["margin"] = (1.0, 0.0, -0.5, 2.5)
    return backend_cases({"cpp": grid(options), "reference": pairwise(options), "triton": pairwise(options)})


def _target(case):
    t = TARGETS[case["target"]]()
    return {"same": t, "row": t[0], "column": t[:, :1]}[case["target_shape"]]


@pytest.mark.parametrize("backend, case", _cases(False), indirect=["backend"])
def test_soft_margin_float64_matches_torch_and_gradcheck(backend, case):
    x = (3 * torch.randn(3, 4, dtype=torch.float64)).requires_grad_()
    t = _target(case)
    fn = lambda x: lossops.soft_margin_loss(x, t, reduction=case["reduction"])  # noqa: E731
    assert_close(forward_backward(fn, [x]),
                 forward_backward(lambda x: F.soft_margin_loss(x, t, reduction=case["reduction"]), leaf_copies([x])))
    assert_gradcheck(fn, (x,), backend)


@pytest.mark.parametrize("backend, case", _cases(True), indirect=["backend"])
def test_hinge_embedding_float64_matches_torch_and_gradcheck(backend, case):
    # inputs away from the margin's kink, where the loss is differentiable
    x = torch.randn(3, 4, dtype=torch.float64)
    x = torch.where((x - case["margin"]).abs() < 0.05, x + 0.2, x).requires_grad_()
    t = _target(case)
    kwargs = dict(margin=case["margin"], reduction=case["reduction"])
    fn = lambda x: lossops.hinge_embedding_loss(x, t, **kwargs)  # noqa: E731
    assert_close(forward_backward(fn, [x]),
                 forward_backward(lambda x: F.hinge_embedding_loss(x, t, **kwargs), leaf_copies([x])))
    assert_gradcheck(fn, (x,), backend)


def test_hinge_embedding_at_the_kink_and_nonfinite(backend):
    # the clamp's gradient passes at margin - x = 0, as torch's clamp_min; a NaN input's loss is NaN
    x = torch.tensor([1.0, 1.0, 0.5, float("nan"), float("nan"), float("inf"), -float("inf")], requires_grad=True)
    t = torch.tensor([-1.0, 0.0, -1.0, -1.0, 1.0, -1.0, 1.0])
    ours = forward_backward(lambda x: lossops.hinge_embedding_loss(x, t, reduction="none"), [x])
    theirs = forward_backward(lambda x: F.hinge_embedding_loss(x, t, reduction="none"), leaf_copies([x]))
    assert_close(ours, theirs, equal_nan=True)


def test_soft_margin_stays_finite_where_torch_overflows(backend):
    x = torch.tensor([100.0, -100.0, 1e4, 3.0], requires_grad=True)
    t = torch.tensor([-1.0, 1.0, -1.0, 1.0])
    loss, (grad,) = forward_backward(lambda x: lossops.soft_margin_loss(x, t, reduction="none"), [x],
                                     torch.ones(4))
    assert_close(loss, torch.tensor([100.0, 100.0, 1e4, F.softplus(torch.tensor(-3.0)).item()]))
    assert_close(grad, torch.tensor([1.0, -1.0, 1.0, -torch.sigmoid(torch.tensor(-3.0)).item()]))
    assert torch.isinf(F.soft_margin_loss(x.detach(), t, reduction="none")[:3]).all()  # torch's values there


@pytest.mark.parametrize("name", ["soft_margin_loss", "hinge_embedding_loss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_precision_matches_torch(backend, name, dtype):
    n = 256 if backend == "triton" else 5003
    x = 3 * torch.randn(n, dtype=torch.float64)
    t = torch.randint(0, 2, (n,)).double() * 2 - 1
    ours_fn, torch_fn = getattr(lossops, name), getattr(F, name)

    def ours(x):
        return ours_fn(x, t.to(x.dtype), reduction="sum")

    def truth(x):
        return torch_fn(x, t.to(x.dtype), reduction="sum")

    check_reduced_precision(ours, truth, x, dtype, name)


@pytest.mark.parametrize("backend, source, dtype, index", torch_module_params("SoftMarginLoss"), indirect=["backend"])
def test_soft_margin_torch_module_samples(backend, source, dtype, index):
    check_torch_module_sample(lossops.nn.SoftMarginLoss, "SoftMarginLoss", source, dtype, index)


@pytest.mark.parametrize("backend, source, dtype, index", torch_module_params("HingeEmbeddingLoss"),
                         indirect=["backend"])
def test_hinge_embedding_torch_module_samples(backend, source, dtype, index):
    check_torch_module_sample(lossops.nn.HingeEmbeddingLoss, "HingeEmbeddingLoss", source, dtype, index)


@pytest.mark.parametrize("call, error, match", [
    (lambda x: lossops.soft_margin_loss(x, torch.rand(3, 4, requires_grad=True)), RuntimeError,
     "not differentiable with respect to argument 'target'"),
    (lambda x: lossops.soft_margin_loss(x, torch.rand(2, 3, 4)), RuntimeError, r"target of shape \(2, 3, 4\)"),
    (lambda x: lossops.soft_margin_loss(x, torch.rand(5)), RuntimeError, r"target of shape \(5,\)"),
    (lambda x: lossops.soft_margin_loss(x, torch.rand(3, 4), reduction="max"), ValueError, "max"),
    (lambda x: lossops.hinge_embedding_loss(x, torch.rand(3, 5)), RuntimeError, r"target of shape \(3, 5\)"),
    (lambda x: lossops.hinge_embedding_loss(x, torch.rand(3, 4), margin="a"), TypeError, "margin"),
    (lambda x: lossops.hinge_embedding_loss(x, torch.rand(3, 4), reduction="max"), ValueError, "max"),
])
def test_bad_arguments(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(3, 4, requires_grad=True)).backward()


def test_hinge_embedding_target_requiring_grad_gets_none(backend):
    x, t = torch.randn(3, 4, requires_grad=True), (torch.randint(0, 2, (3, 4)) * 2 - 1.0).requires_grad_()
    lossops.hinge_embedding_loss(x, t).backward()
    assert t.grad is None and x.grad is not None


def test_dtypes_like_torch(backend):
    x = torch.randn(3, 4)
    for t in (torch.randint(0, 2, (3, 4)) * 2 - 1, torch.rand(3, 4, dtype=torch.float64), torch.rand(4) > 0.5):
        for name in ("soft_margin_loss", "hinge_embedding_loss"):
            ours, theirs = getattr(lossops, name)(x, t), getattr(F, name)(x, t)
            assert ours.dtype == theirs.dtype
            assert_close(ours, theirs)


def test_modules_match_torch_modules(backend):
    x, t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.randint(0, 2, (3, 4)).double() * 2 - 1
    for ours, theirs in ((lossops.nn.SoftMarginLoss(reduction="sum"), torch.nn.SoftMarginLoss(reduction="sum")),
                         (lossops.nn.HingeEmbeddingLoss(0.3, reduction="none"),
                          torch.nn.HingeEmbeddingLoss(0.3, reduction="none"))):
        assert_close(forward_backward(ours, [x, t]), forward_backward(theirs, [*leaf_copies([x]), t]))
    assert repr(lossops.nn.HingeEmbeddingLoss(margin=0.3)) == "HingeEmbeddingLoss(margin=0.3)"
