"""lossops.binary_cross_entropy (probabilities in) against torch's, on every backend."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import (ISA_ORDER, assert_float64_gradients_match, backend_cases, forced_isa, forward_backward, grid,
                    isa_available, leaf_copies, pairwise)
from _elementwise_cases import check_reduced_precision, check_torch_module_sample, torch_module_params

# broadcastable weight shapes against a (3, 4) input: each is read through a different [inner, period] layout
WEIGHT_SHAPES = {"none": None, "full": (3, 4), "row": (4,), "column": (3, 1), "scalar": ()}


def _cases():
    options = dict(weight=list(WEIGHT_SHAPES), reduction=("none", "mean", "sum"), target_grad=(False, True))
    return backend_cases({"cpp": grid(options), "reference": pairwise(options), "triton": pairwise(options)})


def _probabilities(*shape):
    return torch.rand(*shape, dtype=torch.float64) * 0.9 + 0.05


@pytest.mark.parametrize("backend, case", _cases(), indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    x = _probabilities(3, 4).requires_grad_()
    t = torch.rand(3, 4, dtype=torch.float64).requires_grad_(case["target_grad"])
    size = WEIGHT_SHAPES[case["weight"]]
    weight = None if size is None else torch.rand(size, dtype=torch.float64) * 2 + 0.1
    kwargs = dict(weight=weight, reduction=case["reduction"])
    ours = forward_backward(lambda x, t: lossops.binary_cross_entropy(x, t, **kwargs), [x, t])
    theirs = forward_backward(lambda x, t: F.binary_cross_entropy(x, t, **kwargs), leaf_copies([x, t]))
    assert_close(ours, theirs)
    fn = lambda x, t: lossops.binary_cross_entropy(x, t, **kwargs)  # noqa: E731
    if backend == "triton":  # the interpreter's gradcheck is slow: equal to the gradchecked C++ gradients
        assert_float64_gradients_match(fn, [x, t], "triton")
    else:
        assert torch.autograd.gradcheck(fn, (x, t))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clamped_logs_at_zero_and_one(backend, dtype):
    # log(0) is clamped at -100 in the loss; the input gradient's denominator at 1e-12; the target's gradient is
    # torch's unclamped -logit(x), infinite at 0 and 1
    x = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1e-30, 1 - 1e-7, 0.5], dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 0.25, 1.0, 0.0, 0.5], dtype=dtype, requires_grad=True)
    for reduction in ("none", "sum", "mean"):
        ours = forward_backward(lambda x, t: lossops.binary_cross_entropy(x, t, reduction=reduction), [x, t])
        theirs = forward_backward(lambda x, t: F.binary_cross_entropy(x, t, reduction=reduction), leaf_copies([x, t]))
        assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduced_precision_matches_torch(backend, dtype):
    n = 256 if backend == "triton" else 5003
    x = torch.rand(n, dtype=torch.float64) * 0.98 + 0.01
    t = torch.rand(n, dtype=torch.float64).round()

    def ours(x):
        return lossops.binary_cross_entropy(x, t.to(x.dtype), reduction="sum")

    def truth(x):
        return F.binary_cross_entropy(x, t.to(x.dtype), reduction="sum")

    check_reduced_precision(ours, truth, x, dtype, "bce")


@pytest.mark.parametrize("backend, source, dtype, index", torch_module_params("BCELoss"), indirect=["backend"])
def test_torch_module_samples(backend, source, dtype, index):
    check_torch_module_sample(lossops.nn.BCELoss, "BCELoss", source, dtype, index, target_grad=True)


@pytest.mark.parametrize("name, value", [("input", 1.5), ("input", -0.5), ("input", float("nan")), ("target", 1.5),
                                         ("target", float("nan")), ("target", -0.25)])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_values_outside_0_1_raise_torch_error(backend, name, value, requires_grad):
    x, t = torch.rand(3, 4), torch.rand(3, 4)
    (x if name == "input" else t)[1, 2] = value
    x.requires_grad_(requires_grad)
    with pytest.raises(RuntimeError, match=f"all elements of {name} should be between 0 and 1"):
        F.binary_cross_entropy(x, t)
    with pytest.raises(RuntimeError, match=f"all elements of {name} should be between 0 and 1") as error:
        lossops.binary_cross_entropy(x, t)
    if backend != "reference":
        assert str(value) in str(error.value) and "index 6" in str(error.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["input", "target"])
def test_a_value_outside_0_1_anywhere_is_found(name, dtype):
    """The C++ range check reads whole vectors of the accumulation type: a bad value in the first lane, inside a
    vector, in the last full vector and in the short tail of a chunk is found and named."""
    n = 1013
    for index in (0, 5, 517, n - 14, n - 1):
        x, t = torch.full((n,), 0.5, dtype=dtype), torch.full((n,), 0.25, dtype=dtype)
        (x if name == "input" else t)[index] = 1.5
        message = rf"all elements of {name} should be between 0 and 1.*got 1.5 at flat index {index}\)"
        with lossops.backend("cpp"), pytest.raises(RuntimeError, match=message):
            lossops.binary_cross_entropy(x, t)


def _probabilities_over_every_scale() -> torch.Tensor:
    """float32 probabilities: uniform, down to 1e-45 (subnormals included), up to 1 - 1e-8, and the edges."""
    gen = torch.Generator().manual_seed(0)
    parts = [torch.rand(1 << 16, generator=gen, dtype=torch.float64),
             10 ** (-45 * torch.rand(1 << 14, generator=gen, dtype=torch.float64)),
             1 - 10 ** (-8 * torch.rand(1 << 14, generator=gen, dtype=torch.float64)),
             torch.tensor([0.0, 1.0, 1e-45, 1e-40, 2.0 ** -126, 2.0 ** -25, 2.0 ** -24, 1 - 2.0 ** -24, 0.5,
                           0.70710677, 0.70710683], dtype=torch.float64)]
    return torch.cat(parts).float().clamp(0, 1)


@pytest.mark.parametrize("isa", [isa for isa in ISA_ORDER if isa_available(isa)])
def test_float32_logs_within_two_epsilon_of_float64(isa):
    """Each element's loss with target 0 (its log(1 - x)) and 1 (its log x), on each build's logs of a probability,
    is within 2 float32 epsilons (relative) of the float64 loss wherever the clamp at 100 does not apply, and
    clamps at the same elements as torch's."""
    x = _probabilities_over_every_scale()
    for value in (0.0, 1.0):
        t = torch.full_like(x, value)
        with forced_isa(isa):
            ours = lossops.binary_cross_entropy(x, t, reduction="none")
        exact = F.binary_cross_entropy(x.double(), t.double(), reduction="none")
        theirs = F.binary_cross_entropy(x, t, reduction="none")
        assert torch.equal(ours == 100, theirs == 100)
        kept = exact < 100
        error = (ours.double() - exact)[kept].abs() / exact[kept].clamp_min(1e-38)
        assert error.max() <= 2 * torch.finfo(torch.float32).eps, (value, error.max())


@pytest.mark.parametrize("call, error, match", [
    (lambda x: lossops.binary_cross_entropy(x, torch.rand(2, 4)), ValueError,
     r"Using a target size \(torch.Size\(\[2, 4\]\)\) that is different to the input size"),
    (lambda x: lossops.binary_cross_entropy(x, torch.rand(3, 4, dtype=torch.float64)), RuntimeError,
     "target has dtype torch.float64"),
    (lambda x: lossops.binary_cross_entropy(x, torch.rand(3, 4), weight=torch.rand(5)), RuntimeError,
     r"weight of shape \(5,\)"),
    (lambda x: lossops.binary_cross_entropy(x, torch.rand(3, 4), weight=torch.rand(4, requires_grad=True)),
     RuntimeError, "weight"),
    (lambda x: lossops.binary_cross_entropy(x, torch.rand(3, 4), reduction="max"), ValueError, "max"),
])
def test_bad_arguments(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(torch.rand(3, 4, requires_grad=True)).backward()


def test_module_matches_torch_module(backend):
    weight = torch.rand(4, dtype=torch.float64)
    x, t = _probabilities(3, 4).requires_grad_(), torch.rand(3, 4, dtype=torch.float64)
    ours = forward_backward(lossops.nn.BCELoss(weight, reduction="sum"), [x, t])
    theirs = forward_backward(torch.nn.BCELoss(weight, reduction="sum"), [*leaf_copies([x]), t])
    assert_close(ours, theirs)
    assert repr(lossops.nn.BCELoss(reduction="sum")) == "BCELoss(reduction='sum')"
