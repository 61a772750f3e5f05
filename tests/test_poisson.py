"""lossops.poisson_nll_loss against torch's, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import assert_gradcheck, backend_cases, forward_backward, grid, leaf_copies, pairwise
from _elementwise_cases import check_reduced_precision, check_torch_module_sample, torch_module_params


def torch_expected(x, t, **kwargs):
    """torch's loss and gradients, except the target's where full=True meets a target <= 0: torch's is NaN there
    (0 * log 0 through its masked_fill of the Stirling term), lossops' that of the loss without the masked-out term
    (docs/differences-from-torch.md)."""
    out, grads = forward_backward(lambda x, t: F.poisson_nll_loss(x, t, **kwargs), leaf_copies([x, t]))
    if kwargs.get("full") and t.requires_grad:
        plain = forward_backward(lambda x, t: F.poisson_nll_loss(x, t, **{**kwargs, "full": False}),
                                 leaf_copies([x, t]))[1]
        grads[-1] = torch.where(t.detach() <= 0, plain[-1], grads[-1])
    return out, grads


def _cases():
    options = dict(log_input=(True, False), full=(False, True), reduction=("none", "mean", "sum"),
                   target_grad=(False, True), eps=(1e-8, 0.5))
    return backend_cases({"cpp": grid(options), "reference": pairwise(options), "triton": pairwise(options)})


def _input(log_input, *shape):
    x = torch.randn(*shape, dtype=torch.float64)
    return x if log_input else x.exp()


@pytest.mark.parametrize("backend, case", _cases(), indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    x = _input(case["log_input"], 3, 4).requires_grad_()
    # counts around the Stirling term's threshold t > 1, away from it for the gradient check
    t = torch.tensor([[0.0, 0.5, 2.0, 3.0], [1.5, 4.0, 0.25, 7.0], [0.75, 2.5, 9.0, 1.25]],
                     dtype=torch.float64).requires_grad_(case["target_grad"])
    kwargs = {k: case[k] for k in ("log_input", "full", "reduction", "eps")}
    fn = lambda x, t: lossops.poisson_nll_loss(x, t, **kwargs)  # noqa: E731
    assert_close(forward_backward(fn, [x, t]), torch_expected(x, t, **kwargs))
    assert_gradcheck(fn, (x, t), backend)


@pytest.mark.parametrize("full", [False, True])
def test_target_values_at_and_around_one_and_nonfinite(backend, full):
    x = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, float("nan"), 30.0, 0.0], requires_grad=True)
    t = torch.tensor([1.0, 1.0 + 1e-6, 0.0, float("nan"), 1e30, 2.0, 3.0, -2.0], requires_grad=True)
    for log_input in (True, False):
        kwargs = dict(log_input=log_input, full=full, reduction="none")
        ours = forward_backward(lambda x, t: lossops.poisson_nll_loss(x, t, **kwargs), [x, t])
        assert_close(ours, torch_expected(x, t, **kwargs), equal_nan=True)


def test_broadcasting_and_dtypes_like_torch(backend):
    x = torch.randn(3, 4, requires_grad=True)
    for t in ((torch.rand(4) * 3).floor(), (torch.rand(2, 1, 4) * 3).floor(), torch.randint(0, 4, (3, 4)),
              torch.rand(3, 4, dtype=torch.float64) * 3):
        for full in (False, True):
            ours = forward_backward(lambda x: lossops.poisson_nll_loss(x, t, full=full), [x])
            theirs = forward_backward(lambda x: F.poisson_nll_loss(x, t, full=full), leaf_copies([x]))
            assert ours[0].dtype == theirs[0].dtype
            assert_close(ours, theirs)
    integer, rates = torch.randint(0, 3, (3, 4)), torch.rand(3, 4)
    assert_close(lossops.poisson_nll_loss(integer, rates), F.poisson_nll_loss(integer, rates))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log_input, full", [(True, False), (True, True), (False, True)])
def test_reduced_precision_matches_torch(backend, dtype, log_input, full):
    n = 256 if backend == "triton" else 5003
    x = torch.randn(n, dtype=torch.float64) if log_input else torch.rand(n, dtype=torch.float64) * 4 + 0.1
    t = (torch.rand(n, dtype=torch.float64) * 6).floor()

    def ours(x):
        return lossops.poisson_nll_loss(x, t.to(x.dtype), log_input=log_input, full=full, reduction="sum")

    def truth(x):
        return F.poisson_nll_loss(x, t.to(x.dtype), log_input=log_input, full=full, reduction="sum")

    check_reduced_precision(ours, truth, x, dtype, "poisson")


@pytest.mark.parametrize("backend, source, dtype, index", torch_module_params("PoissonNLLLoss"), indirect=["backend"])
def test_torch_module_samples(backend, source, dtype, index):
    check_torch_module_sample(lossops.nn.PoissonNLLLoss, "PoissonNLLLoss", source, dtype, index, target_grad=True,
                              expected=torch_expected)


@pytest.mark.parametrize("call, error, match", [
    (lambda x: lossops.poisson_nll_loss(x, torch.rand(3, 5)), RuntimeError, r"target of shape \(3, 5\)"),
    (lambda x: lossops.poisson_nll_loss(x, torch.rand(3, 4), eps="a"), TypeError, "eps"),
    (lambda x: lossops.poisson_nll_loss(x, torch.rand(3, 4), full="yes"), TypeError, "full"),
    (lambda x: lossops.poisson_nll_loss(x, torch.rand(3, 4), reduction="max"), ValueError, "max"),
])
def test_bad_arguments(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(3, 4, requires_grad=True)).backward()


def test_module_matches_torch_module(backend):
    x, t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), (torch.rand(3, 4, dtype=torch.float64) * 5)
    kwargs = dict(full=True, eps=1e-3, reduction="sum")
    assert_close(forward_backward(lossops.nn.PoissonNLLLoss(**kwargs), [x, t]),
                 forward_backward(torch.nn.PoissonNLLLoss(**kwargs), [*leaf_copies([x]), t]))
    assert repr(lossops.nn.PoissonNLLLoss(full=True)) == "PoissonNLLLoss(full=True)"
