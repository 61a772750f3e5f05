"""lossops.l1_loss / mse_loss / smooth_l1_loss / huber_loss against torch, on every backend.

The oracle is torch: F.<loss>(reduction="none") and, for the keyword extras (broadcast weights,
avg_factor), the torch expression the module docstring (lossops/regression.py) defines.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import backend_cases, forward_backward, grid, leaf_copies, pairwise
from _elementwise_cases import check_lowp, check_opinfo_sample, opinfo_params

OPS = {
    "l1_loss": (lambda x, t, p, **kw: lossops.l1_loss(x, t, **kw),
                lambda x, t, p: F.l1_loss(x, t, reduction="none")),
    "mse_loss": (lambda x, t, p, **kw: lossops.mse_loss(x, t, **kw),
                 lambda x, t, p: F.mse_loss(x, t, reduction="none")),
    "smooth_l1_loss": (lambda x, t, p, **kw: lossops.smooth_l1_loss(x, t, beta=p, **kw),
                       lambda x, t, p: F.smooth_l1_loss(x, t, reduction="none", beta=p)),
    "huber_loss": (lambda x, t, p, **kw: lossops.huber_loss(x, t, delta=p, **kw),
                   lambda x, t, p: F.huber_loss(x, t, reduction="none", delta=p)),
}
PARAMS = {"l1_loss": [None], "mse_loss": [None], "smooth_l1_loss": [0.0, 0.6], "huber_loss": [0.7]}
WEIGHT_SHAPES = {"none": None, "full": (3, 4), "column": (3, 1), "row": (4,)}


def expected(op, x, t, param, reduction, weight=None, avg_factor=None):
    """torch's per-element loss, weighted and reduced as lossops/regression.py documents (torch's own
    weighted l1/mse divide by the sum of the weights, huber by the element count)."""
    loss = OPS[op][1](x, t, param)
    if weight is not None:
        loss = loss * weight
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if avg_factor is not None:
        return loss.sum() / avg_factor
    if weight is not None and op in ("l1_loss", "mse_loss"):
        return loss.sum() / weight.expand_as(loss).sum()
    return loss.sum() / loss.numel()


def _cases():
    options = dict(op=list(OPS), param_index=(0, 1), reduction=("none", "mean", "sum"), weight=list(WEIGHT_SHAPES),
                   avg_factor=(None, 2.5), target_grad=(False, True))

    def valid(c):
        return c["param_index"] < len(PARAMS[c["op"]]) and not (c["avg_factor"] and c["reduction"] != "mean")

    return backend_cases({"cpp": grid(options, valid), "reference": pairwise(options, valid),
                          "triton": pairwise(options, valid)})


@pytest.mark.parametrize("backend, case", _cases(), indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    op, param = case["op"], PARAMS[case["op"]][case["param_index"]]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, requires_grad=case["target_grad"])
    shape = WEIGHT_SHAPES[case["weight"]]
    weight = None if shape is None else torch.rand(shape, dtype=torch.float64) + 0.1
    kwargs = dict(reduction=case["reduction"], weight=weight, avg_factor=case["avg_factor"])
    ours = forward_backward(lambda x, t: OPS[op][0](x, t, param, **kwargs), [x, t])
    theirs = forward_backward(lambda x, t: expected(op, x, t, param, **kwargs), leaf_copies([x, t]))
    assert_close(ours, theirs)
    assert torch.autograd.gradcheck(lambda x, t: OPS[op][0](x, t, param, **kwargs), (x, t), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", list(OPS))
def test_reduced_precision_matches_torch(backend, op, dtype):
    n = 256 if backend == "triton" else 4099  # odd: not a multiple of any vector width or block
    x, t = 4 * torch.randn(n, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    param = PARAMS[op][-1]
    def ours(x):
        return OPS[op][0](x, t.to(x.dtype), param, reduction="sum")

    torch_fn = {"l1_loss": F.l1_loss, "mse_loss": F.mse_loss, "smooth_l1_loss": F.smooth_l1_loss,
                "huber_loss": F.huber_loss}[op]
    extra = {"smooth_l1_loss": {"beta": param}, "huber_loss": {"delta": param}}.get(op, {})

    def truth(x):
        return torch_fn(x, t.to(x.dtype), reduction="sum", **extra)

    if dtype == torch.float32:
        x32 = x.float().requires_grad_()
        assert_close(forward_backward(ours, [x32]), forward_backward(truth, leaf_copies([x32])), rtol=1e-5, atol=1e-4)
    else:
        check_lowp(ours, truth, [x.requires_grad_()], dtype, op)


@pytest.mark.parametrize("backend, name, dtype, index", opinfo_params(
    ["nn.functional.smooth_l1_loss", "nn.functional.huber_loss", "nn.functional.l1_loss", "nn.functional.mse_loss"]),
    indirect=["backend"])
def test_opinfo_samples(backend, name, dtype, index):
    fn = name.split(".")[-1]
    check_opinfo_sample(getattr(lossops, fn), getattr(F, fn), name, dtype, index)


@pytest.mark.parametrize("op", list(OPS))
def test_broadcast_target_warns_like_torch(backend, op):
    param = PARAMS[op][-1]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with pytest.warns(UserWarning, match=r"Using a target size \(torch.Size\(\[4\]\)\) that is different"):
        ours = forward_backward(lambda x, t: OPS[op][0](x, t, param), [x, t])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = forward_backward(lambda x, t: expected(op, *torch.broadcast_tensors(x, t), param, "mean"),
                                  leaf_copies([x, t]))
    assert_close(ours, theirs)


def test_smooth_l1_beta_zero_is_l1_with_zero_subgradient(backend):
    x = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 0.5, 1.0], dtype=torch.float64)  # x == t at two elements
    loss = lossops.smooth_l1_loss(x, t, beta=0.0, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 4.0
    assert grad.tolist() == [0.0, -1.0, 0.0, 1.0]


def test_nan_gradients_follow_torch(backend):
    # torch: sgn(NaN) = 0 for L1's gradient, NaN for smooth-L1 / Huber / MSE
    x = torch.tensor([float("nan"), 2.0], dtype=torch.float64, requires_grad=True)
    t = torch.zeros(2, dtype=torch.float64)
    for op in OPS:
        param = PARAMS[op][-1]
        ours = forward_backward(lambda x: OPS[op][0](x, t, param, reduction="sum"), [x])
        theirs = forward_backward(lambda x: OPS[op][1](x, t, param).sum(), leaf_copies([x]))
        assert_close(ours, theirs, equal_nan=True, msg=op)


@pytest.mark.parametrize("call, error, match", [
    (lambda x: lossops.smooth_l1_loss(x, x.detach(), beta=-0.5), RuntimeError, "negative values for beta.*-0.5"),
    (lambda x: lossops.huber_loss(x, x.detach(), delta=0.0), RuntimeError, "non-positive values for delta.*0.0"),
    (lambda x: lossops.huber_loss(x, x.detach(), delta=-1.0), RuntimeError, "non-positive values for delta"),
    (lambda x: lossops.l1_loss(x, x.detach(), reduction="avg"), ValueError, "avg is not a valid value for reduction"),
    (lambda x: lossops.mse_loss(x, x.detach(), weight=torch.ones(5)), ValueError, r"weight of shape \(5,\)"),
    (lambda x: lossops.mse_loss(x, x.detach(), reduction="sum", avg_factor=2.0), ValueError, "avg_factor"),
    (lambda x: lossops.mse_loss(x, torch.ones(5)), RuntimeError, "size of tensor"),
])
def test_bad_arguments(backend, call, error, match):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error, match=match):
            call(torch.randn(3, 4, requires_grad=True))


def test_avg_factor_tensor_and_none_reduction(backend):
    x, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    factor = torch.tensor(7.0, dtype=torch.float64)
    assert_close(lossops.smooth_l1_loss(x, t, avg_factor=factor), F.smooth_l1_loss(x, t, reduction="sum") / 7)
    # mmdetection's convention: 'none' ignores avg_factor
    assert_close(lossops.l1_loss(x, t, reduction="none", avg_factor=factor), F.l1_loss(x, t, reduction="none"))


def test_non_contiguous_and_expanded_inputs(backend):
    base = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    x = base.t()  # (3, 5), transposed
    t = torch.randn(3, 1, dtype=torch.float64).expand(3, 5)  # stride 0
    ours = forward_backward(lambda b: lossops.huber_loss(b.t(), t, reduction="none", delta=0.5), [base])
    theirs = forward_backward(lambda b: F.huber_loss(b.t(), t, reduction="none", delta=0.5), leaf_copies([base]))
    assert_close(ours, theirs)
    assert x.shape == (3, 5)


@pytest.mark.parametrize("module, torch_module", [
    (lambda: lossops.nn.L1Loss(), lambda: torch.nn.L1Loss()),
    (lambda: lossops.nn.MSELoss(reduction="sum"), lambda: torch.nn.MSELoss(reduction="sum")),
    (lambda: lossops.nn.SmoothL1Loss(beta=0.3), lambda: torch.nn.SmoothL1Loss(beta=0.3)),
    (lambda: lossops.nn.HuberLoss(reduction="none", delta=0.4),
     lambda: torch.nn.HuberLoss(reduction="none", delta=0.4)),
])
def test_modules_match_torch_modules(backend, module, torch_module):
    x, t = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(4, 3, dtype=torch.float64)
    assert_close(forward_backward(module(), [x, t]), forward_backward(torch_module(), [*leaf_copies([x]), t]))


def test_module_forward_takes_weight_and_avg_factor(backend):
    x, t, w = torch.randn(4, 3), torch.randn(4, 3), torch.rand(3)
    got = lossops.nn.SmoothL1Loss(beta=0.5)(x, t, weight=w, avg_factor=5.0)
    assert_close(got, (F.smooth_l1_loss(x, t, reduction="none", beta=0.5) * w).sum() / 5.0)
