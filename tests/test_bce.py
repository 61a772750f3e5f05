"""lossops.binary_cross_entropy_with_logits against torch's, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import backend_cases, forward_backward, grid, leaf_copies, pairwise
from _elementwise_cases import check_lowp, check_opinfo_sample, opinfo_params

# broadcastable shapes against a (3, 4) input: each is read through a different [inner, period] layout
OPERAND_SHAPES = {"none": None, "full": (3, 4), "row": (4,), "column": (3, 1), "scalar": (), "expanded": (1, 3, 4)}


def _cases():
    options = dict(weight=list(OPERAND_SHAPES), pos_weight=list(OPERAND_SHAPES), reduction=("none", "mean", "sum"),
                   target_grad=(False, True))
    # a (1, 3, 4) operand would broadcast the loss to 3-D: torch refuses it, tested below
    def valid(c):
        return "expanded" not in (c["weight"], c["pos_weight"])

    return backend_cases({"cpp": grid(options, valid), "reference": pairwise(options, valid),
                          "triton": pairwise(options, valid)})


def _operand(shape, low):
    size = OPERAND_SHAPES[shape]
    return None if size is None else low + torch.rand(size, dtype=torch.float64) * 2


@pytest.mark.parametrize("backend, case", _cases(), indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    x = (4 * torch.randn(3, 4, dtype=torch.float64)).requires_grad_()
    t = torch.rand(3, 4, dtype=torch.float64).requires_grad_(case["target_grad"])
    kwargs = dict(weight=_operand(case["weight"], 0.1), pos_weight=_operand(case["pos_weight"], 0.1),
                  reduction=case["reduction"])
    ours = forward_backward(lambda x, t: lossops.binary_cross_entropy_with_logits(x, t, **kwargs), [x, t])
    theirs = forward_backward(lambda x, t: F.binary_cross_entropy_with_logits(x, t, **kwargs), leaf_copies([x, t]))
    assert_close(ours, theirs)
    assert torch.autograd.gradcheck(lambda x, t: lossops.binary_cross_entropy_with_logits(x, t, **kwargs), (x, t),
                                    fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_precision_matches_torch(backend, dtype):
    n = 256 if backend == "triton" else 5003
    x = 6 * torch.randn(n, dtype=torch.float64)
    t = torch.randint(0, 2, (n,)).double()
    pos_weight = torch.tensor(3.0, dtype=torch.float64)

    def ours(x):
        return lossops.binary_cross_entropy_with_logits(x, t.to(x.dtype), reduction="sum", pos_weight=pos_weight)

    def truth(x):
        return F.binary_cross_entropy_with_logits(x, t.to(x.dtype), reduction="sum", pos_weight=pos_weight.to(x.dtype))

    if dtype == torch.float32:
        x32 = x.float().requires_grad_()
        assert_close(forward_backward(ours, [x32]), forward_backward(truth, leaf_copies([x32])), rtol=1e-5, atol=1e-4)
    else:
        check_lowp(ours, truth, [x.requires_grad_()], dtype, "bce")


@pytest.mark.parametrize("backend, name, dtype, index",
                         opinfo_params(["nn.functional.binary_cross_entropy_with_logits"]), indirect=["backend"])
def test_opinfo_samples(backend, name, dtype, index):
    check_opinfo_sample(lossops.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, name, dtype,
                        index)


def test_saturated_logits_stay_exact(kernel_backend):
    # The loss of a confidently right logit is log1p(exp(-|x|)), not 0: the kernels have no cancellation
    # between x and softplus (torch's (1 - t) x - logsigmoid(x), and so the reference backend, rounds it to 0).
    x = torch.tensor([-40.0, 40.0, 800.0, -800.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    loss, (grad,) = forward_backward(lambda x: lossops.binary_cross_entropy_with_logits(x, t, reduction="none"), [x],
                                     torch.ones(4, dtype=torch.float64))
    tiny = 4.248354255291589e-18  # exp(-40)
    assert_close(loss, torch.tensor([tiny, tiny, 800.0, 800.0], dtype=torch.float64), atol=0, rtol=1e-12)
    assert_close(grad, torch.tensor([tiny, -tiny, 1.0, -1.0], dtype=torch.float64), atol=0, rtol=1e-12)


@pytest.mark.parametrize("call, error, match", [
    (lambda x: lossops.binary_cross_entropy_with_logits(x, torch.rand(2, 4)), ValueError,
     r"Target size \(torch.Size\(\[2, 4\]\)\) must be the same as input size"),
    (lambda x: lossops.binary_cross_entropy_with_logits(x, torch.rand(3, 4), weight=torch.rand(5)), RuntimeError,
     r"weight of shape \(5,\)"),
    (lambda x: lossops.binary_cross_entropy_with_logits(x, torch.rand(3, 4), pos_weight=torch.rand(1, 3, 4)),
     RuntimeError, r"pos_weight of shape \(1, 3, 4\)"),
    (lambda x: lossops.binary_cross_entropy_with_logits(x, torch.rand(3, 4), weight=torch.rand(4, requires_grad=True)),
     RuntimeError, "not differentiable with respect to argument 'weight'"),
    (lambda x: lossops.binary_cross_entropy_with_logits(x, torch.rand(3, 4), reduction="max"), ValueError, "max"),
])
def test_bad_arguments(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(3, 4, requires_grad=True)).backward()


def test_target_dtype_decides_loss_dtype_like_torch(backend):
    x, t = torch.randn(3, 4), torch.rand(3, 4, dtype=torch.float64)
    ours = lossops.binary_cross_entropy_with_logits(x, t)
    theirs = F.binary_cross_entropy_with_logits(x, t)
    assert ours.dtype == theirs.dtype == torch.float64
    assert_close(ours, theirs)


def test_module_matches_torch_module(backend):
    kwargs = dict(weight=torch.rand(4, dtype=torch.float64), pos_weight=torch.rand(4, dtype=torch.float64) + 0.5,
                  reduction="sum")
    x, t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.rand(3, 4, dtype=torch.float64)
    ours = forward_backward(lossops.nn.BCEWithLogitsLoss(**kwargs), [x, t])
    theirs = forward_backward(torch.nn.BCEWithLogitsLoss(**kwargs), [*leaf_copies([x]), t])
    assert_close(ours, theirs)
