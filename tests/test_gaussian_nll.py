"""lossops.gaussian_nll_loss and lossops.nn.GaussianNLLLoss against torch's, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import assert_gradcheck, backend_cases, forward_backward, grid, leaf_copies, pairwise
from _elementwise_cases import check_lowp, check_module_samples, module_db_forward_inputs

# var's shapes against a (3, 4) input, as torch takes them: the input's; one dimension short (unsqueezed); one
# dimension of size 1; and a float
VAR_SHAPES = {"same": (3, 4), "short": (3,), "column": (3, 1), "row": (1, 4), "float": None}
# which tensors require grad: the kernel differentiates the input and var, or the input and the target; all three
# take the reference path
GRADS = ("input_var", "input_target", "input", "all")


def _cases():
    options = dict(reduction=("none", "mean", "sum"), full=(False, True), eps=(1e-6, 0.3), var=list(VAR_SHAPES),
                   grads=GRADS)

    def valid(case):
        return not (case["var"] == "float" and case["grads"] in ("input_var", "all"))

    return backend_cases({"cpp": grid(options, valid), "reference": pairwise(options, valid),
                          "triton": pairwise(options, valid)})


def _operands(case):
    torch.manual_seed(0)
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    shape = VAR_SHAPES[case["var"]]
    if shape is None:
        var = 0.7
    else:
        # some entries below eps = 0.3 (clamped), none within reach of it for gradcheck's steps
        var = torch.rand(shape, dtype=torch.float64) + 0.05
        var = torch.where((var - 0.3).abs() < 0.02, var + 0.05, var)
        var.requires_grad_(case["grads"] in ("input_var", "all"))
    x.requires_grad_()
    t.requires_grad_(case["grads"] in ("input_target", "all"))
    return x, t, var


@pytest.mark.parametrize("backend, case", _cases(), indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    x, t, var = _operands(case)
    kwargs = dict(full=case["full"], eps=case["eps"], reduction=case["reduction"])
    inputs = [x, t] + ([var] if isinstance(var, torch.Tensor) else [])

    def ours(x, t, *v):
        return lossops.gaussian_nll_loss(x, t, v[0] if v else var, **kwargs)

    def theirs(x, t, *v):
        return F.gaussian_nll_loss(x, t, v[0] if v else var, **kwargs)

    assert_close(forward_backward(ours, inputs), forward_backward(theirs, leaf_copies(inputs)))
    if len(inputs) == 3 and inputs[2].requires_grad:
        # var's gradient is taken at the clamped value, as if unclamped (torch's definition): the loss does not
        # change with var below eps, so gradcheck differentiates var where it is above eps
        inputs[2] = (inputs[2].detach() + case["eps"]).requires_grad_()
    assert_gradcheck(ours, tuple(inputs), backend)


def test_clamped_and_nonfinite_like_torch(backend):
    # var below eps is clamped (its gradient taken there, as if unclamped); NaN and infinite values as torch's
    x = torch.tensor([0.0, 1.0, float("nan"), 2.0, float("inf"), 0.5, 1.0], requires_grad=True)
    t = torch.tensor([1.0, 1.0, 0.0, float("nan"), 0.0, 0.5, 3.0], requires_grad=True)
    var = torch.tensor([0.0, 1e-9, 1.0, 2.0, 1.0, float("nan"), float("inf")], requires_grad=True)
    ours = forward_backward(lambda *a: lossops.gaussian_nll_loss(*a, reduction="none"), [x, t, var])
    theirs = forward_backward(lambda *a: F.gaussian_nll_loss(*a, reduction="none"), leaf_copies([x, t, var]))
    assert_close(ours, theirs, equal_nan=True)
    for wrt in ([x, var], [x, t]):
        leaves = leaf_copies([x, t, var])
        for leaf, original in zip(leaves, [x, t, var]):
            leaf.requires_grad_(any(original is w for w in wrt))
        ours = forward_backward(lambda *a: lossops.gaussian_nll_loss(*a, reduction="none"), leaves)
        theirs = forward_backward(lambda *a: F.gaussian_nll_loss(*a, reduction="none"), leaf_copies(leaves))
        assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grads", ["input_var", "input_target"])
def test_reduced_precision_matches_torch(backend, dtype, grads):
    n = 256 if backend == "triton" else 5003
    torch.manual_seed(0)
    t = torch.randn(n, dtype=torch.float64)
    var = torch.rand(n, dtype=torch.float64) + 0.1
    x = torch.randn(n, dtype=torch.float64)
    if grads == "input_var":
        def ours(x, v):
            return lossops.gaussian_nll_loss(x, t.to(x.dtype), v, reduction="sum")

        def truth(x, v):
            return F.gaussian_nll_loss(x, t.to(x.dtype), v, reduction="sum")
        inputs = [x.requires_grad_(), var.requires_grad_()]
    else:
        def ours(x, t):
            return lossops.gaussian_nll_loss(x, t, var.to(x.dtype), reduction="sum")

        def truth(x, t):
            return F.gaussian_nll_loss(x, t, var.to(x.dtype), reduction="sum")
        inputs = [x.requires_grad_(), t.requires_grad_()]
    if dtype == torch.float32:
        low = leaf_copies(inputs, torch.float32)
        assert_close(forward_backward(ours, low), forward_backward(truth, leaf_copies(low)), rtol=1e-5, atol=1e-4)
    else:
        check_lowp(ours, truth, inputs, dtype, "gaussian_nll_loss")
        # the second operand's gradient as well
        truth64 = forward_backward(truth, leaf_copies(inputs))
        got = forward_backward(ours, leaf_copies(inputs, dtype))
        theirs = forward_backward(truth, leaf_copies(inputs, dtype))
        err = (got[1][1].double() - truth64[1][1]).abs().max()
        assert err <= (theirs[1][1].double() - truth64[1][1]).abs().max() + 2 * torch.finfo(dtype).eps * \
            truth64[1][1].abs().max()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_module_samples(backend, dtype):
    samples = module_db_forward_inputs(torch.nn.GaussianNLLLoss, dtype)
    assert len(samples) == 5
    check_module_samples(lossops.nn.GaussianNLLLoss, torch.nn.GaussianNLLLoss, samples)


@pytest.mark.parametrize("call, error, match", [
    (lambda x, t: lossops.gaussian_nll_loss(x, t, torch.full((3, 4), -1.0)), ValueError, "negative"),
    (lambda x, t: lossops.gaussian_nll_loss(x, t, -0.5), ValueError, "negative"),
    (lambda x, t: lossops.gaussian_nll_loss(x, t, torch.ones(3, 2)), ValueError, "incorrect size"),
    (lambda x, t: lossops.gaussian_nll_loss(x, t, torch.ones(2, 4, 1)), ValueError, "incorrect size"),
    (lambda x, t: lossops.gaussian_nll_loss(x, t, torch.ones(1, 1)), ValueError, "incorrect size"),
    (lambda x, t: lossops.gaussian_nll_loss(x, t, torch.ones(3, 4), reduction="max"), ValueError, "max is not valid"),
    (lambda x, t: lossops.gaussian_nll_loss(x, t, torch.ones(3, 4), reduction=None), TypeError, None),
    (lambda x, t: lossops.gaussian_nll_loss(x, t, 1), TypeError, "var"),
    (lambda x, t: lossops.gaussian_nll_loss(x, t[:2], torch.ones(3, 4)), RuntimeError, r"\(2, 4\)"),
    (lambda x, t: lossops.gaussian_nll_loss(x, t, torch.ones(3, 4), eps="a"), TypeError, "eps"),
])
def test_bad_arguments_like_torch(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(3, 4, requires_grad=True), torch.randn(3, 4)).backward()


def test_torch_raises_the_same_types():
    x, t = torch.randn(3, 4), torch.randn(3, 4)
    for var, kwargs, error in ((torch.full((3, 4), -1.0), {}, ValueError), (-0.5, {}, ValueError),
                               (torch.ones(3, 2), {}, ValueError),
                               (torch.ones(3, 4), dict(reduction="max"), ValueError),
                               (torch.ones(3, 4), dict(reduction=None), TypeError), (1, {}, TypeError)):
        for fn in (F.gaussian_nll_loss, lossops.gaussian_nll_loss):
            with pytest.raises(error):
                fn(x, t, var, **kwargs)


def test_dtypes_and_shapes_like_torch(backend):
    x = torch.randn(3, 4)
    for t, var in ((torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 1) + 0.1),
                   (torch.randn(4), torch.rand(3, dtype=torch.float64) + 0.1), (torch.randn(3, 4), 0.5)):
        for reduction in ("none", "mean", "sum"):
            ours = lossops.gaussian_nll_loss(x, t, var, reduction=reduction)
            theirs = F.gaussian_nll_loss(x, t, var, reduction=reduction)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert_close(ours, theirs)
    empty = [torch.empty(0, 3, requires_grad=True), torch.empty(0, 3), torch.empty(0, 3, requires_grad=True)]
    assert_close(forward_backward(lossops.gaussian_nll_loss, empty),
                 forward_backward(F.gaussian_nll_loss, leaf_copies(empty)), equal_nan=True)


def test_module_matches_torch_module(backend):
    x, t = torch.randn(5, 2, dtype=torch.float64, requires_grad=True), torch.randn(5, 2, dtype=torch.float64)
    var = (torch.rand(5, dtype=torch.float64) + 0.1).requires_grad_()
    ours = lossops.nn.GaussianNLLLoss(full=True, eps=1e-3, reduction="sum")
    theirs = torch.nn.GaussianNLLLoss(full=True, eps=1e-3, reduction="sum")
    assert_close(forward_backward(ours, [x, t, var]), forward_backward(theirs, leaf_copies([x, t, var])))
    assert repr(lossops.nn.GaussianNLLLoss(full=True)) == "GaussianNLLLoss(full=True)"
    with pytest.raises(TypeError):  # keyword-only, as torch's constructor
        lossops.nn.GaussianNLLLoss(True)
    with pytest.raises(TypeError):
        torch.nn.GaussianNLLLoss(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("grads", ["input_var", "input_target"])
def test_eager_path_matches_the_custom_op(monkeypatch, dtype, reduction, grads):
    """Plain CPU calls take the C++ eager path (one call, its own autograd node): the custom op's values, bit for
    bit, and both gradients."""
    from test_cpp_eager_path import ELEMENTWISE_NODE, assert_same_as_custom_op

    def make():
        torch.manual_seed(0)
        return (torch.randn(7, 9, dtype=dtype, requires_grad=True),
                torch.randn(7, 9, dtype=dtype, requires_grad=grads == "input_target"),
                (torch.rand(7, 9, dtype=dtype) + 0.1).requires_grad_(grads == "input_var"))

    grad_output = torch.randn(7, 9, dtype=dtype) if reduction == "none" else None
    assert_same_as_custom_op(monkeypatch, lambda *a: lossops.gaussian_nll_loss(*a, full=True, reduction=reduction),
                             make, ELEMENTWISE_NODE, grad_output)
