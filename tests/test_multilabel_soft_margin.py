"""lossops.multilabel_soft_margin_loss and lossops.nn.MultiLabelSoftMarginLoss against torch's, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import assert_gradcheck, backend_cases, forward_backward, grid, leaf_copies, pairwise
from _elementwise_cases import check_reduced_precision, check_torch_module_sample, torch_module_params

WEIGHTS = {"none": None, "classes": (4,), "rows": (3, 1), "full": (3, 4)}
TARGETS = {"labels": lambda: torch.randint(0, 2, (3, 4)).double(), "soft": lambda: torch.rand(3, 4).double()}


def _cases():
    options = dict(reduction=("none", "mean", "sum"), weight=list(WEIGHTS), target=list(TARGETS),
                   grads=("input", "input_target", "all"))

    def valid(case):
        return not (case["grads"] == "all" and case["weight"] == "none")

    return backend_cases({"cpp": grid(options, valid), "reference": pairwise(options, valid),
                          "triton": pairwise(options, valid)})


@pytest.mark.parametrize("backend, case", _cases(), indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    torch.manual_seed(0)
    x = (3 * torch.randn(3, 4, dtype=torch.float64)).requires_grad_()
    t = TARGETS[case["target"]]().requires_grad_(case["grads"] != "input")
    shape = WEIGHTS[case["weight"]]
    inputs = [x, t]
    if shape is not None:
        inputs.append((torch.rand(shape, dtype=torch.float64) + 0.5).requires_grad_(case["grads"] == "all"))

    def ours(*a):
        return lossops.multilabel_soft_margin_loss(*a, reduction=case["reduction"])

    def theirs(*a):
        return F.multilabel_soft_margin_loss(*a, reduction=case["reduction"])

    assert_close(forward_backward(ours, inputs), forward_backward(theirs, leaf_copies(inputs)))
    assert_gradcheck(ours, tuple(inputs), backend)


def test_shapes_nonfinite_and_dtypes_like_torch(backend):
    # 1-D input (one row), a 3-D input (the class dimension last), infinite logits, a broadcast target
    for x, t in ((torch.randn(5), torch.rand(5)), (torch.randn(2, 3, 4), torch.rand(2, 3, 4)),
                 (torch.tensor([[float("inf"), -float("inf"), 30.0, -30.0]]), torch.tensor([[1.0, 0.0, 0.0, 1.0]])),
                 (torch.randn(3, 4), torch.rand(4))):
        for reduction in ("none", "mean", "sum"):
            x = x.detach().requires_grad_()
            ours = forward_backward(lambda a: lossops.multilabel_soft_margin_loss(a, t, reduction=reduction), [x])
            theirs = forward_backward(lambda a: F.multilabel_soft_margin_loss(a, t, reduction=reduction),
                                      leaf_copies([x]))
            assert ours[0].shape == theirs[0].shape
            assert_close(ours, theirs, equal_nan=True)
    x = torch.randn(3, 4)
    for t in (torch.randint(0, 2, (3, 4)), torch.rand(3, 4, dtype=torch.float64)):
        ours, theirs = lossops.multilabel_soft_margin_loss(x, t), F.multilabel_soft_margin_loss(x, t)
        assert ours.dtype == theirs.dtype
        assert_close(ours, theirs)
    empty = [torch.empty(0, 4, requires_grad=True), torch.empty(0, 4)]
    assert_close(forward_backward(lossops.multilabel_soft_margin_loss, empty),
                 forward_backward(F.multilabel_soft_margin_loss, leaf_copies(empty)), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_precision_matches_torch(backend, dtype):
    n = 16 if backend == "triton" else 500
    torch.manual_seed(0)
    t = torch.randint(0, 2, (n, 37)).double()

    def ours(x):
        return lossops.multilabel_soft_margin_loss(x, t.to(x.dtype), reduction="sum")

    def truth(x):
        return F.multilabel_soft_margin_loss(x, t.to(x.dtype), reduction="sum")

    check_reduced_precision(ours, truth, 3 * torch.randn(n, 37, dtype=torch.float64), dtype,
                            "multilabel_soft_margin_loss")


@pytest.mark.parametrize("backend, source, dtype, index", torch_module_params("MultiLabelSoftMarginLoss"),
                         indirect=["backend"])
def test_torch_module_samples(backend, source, dtype, index):
    check_torch_module_sample(lossops.nn.MultiLabelSoftMarginLoss, "MultiLabelSoftMarginLoss", source, dtype, index,
                              target_grad=True)


@pytest.mark.parametrize("call, error", [
    (lambda x: lossops.multilabel_soft_margin_loss(x, torch.rand(3, 5)), RuntimeError),
    (lambda x: lossops.multilabel_soft_margin_loss(x, torch.rand(3, 4), reduction="max"), ValueError),
    (lambda x: lossops.multilabel_soft_margin_loss(x, torch.rand(3, 4), reduction=None), TypeError),
    (lambda x: lossops.multilabel_soft_margin_loss(x, torch.rand(3, 4), weight=torch.rand(5)), RuntimeError),
    (lambda x: lossops.multilabel_soft_margin_loss(x[0, 0], torch.rand(())), IndexError),
    (lambda x: lossops.multilabel_soft_margin_loss(x, [1.0]), TypeError),
])
def test_bad_arguments_like_torch(backend, call, error):
    with pytest.raises(error):
        call(torch.randn(3, 4, requires_grad=True)).backward()
    with pytest.raises(error), lossops.backend("reference"):  # the reference is torch's own function
        call(torch.randn(3, 4, requires_grad=True))


def test_autocast_closer_to_float64_than_torch():
    """Under autocast torch computes its formula's log-sigmoids in bf16; lossops reads the bf16 logits as they are
    and computes in float32: a float32 loss at least as close to the float64 value."""
    torch.manual_seed(0)
    x, t = torch.randn(64, 37).bfloat16(), torch.randint(0, 2, (64, 37)).float()
    truth = F.multilabel_soft_margin_loss(x.double(), t.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = lossops.multilabel_soft_margin_loss(x, t), F.multilabel_soft_margin_loss(x, t)
    assert ours.dtype == theirs.dtype == torch.float32
    assert (ours.double() - truth).abs() <= (theirs.double() - truth).abs()


def test_module_matches_torch_module(backend):
    x, t = torch.randn(3, 4, dtype=torch.float64, requires_grad=True), torch.rand(3, 4, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64)
    ours = lossops.nn.MultiLabelSoftMarginLoss(weight=w, reduction="sum")
    theirs = torch.nn.MultiLabelSoftMarginLoss(weight=w, reduction="sum")
    assert_close(forward_backward(ours, [x, t]), forward_backward(theirs, leaf_copies([x, t])))
    assert "weight" in dict(ours.named_buffers())
