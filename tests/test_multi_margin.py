"""lossops.multi_margin_loss and lossops.nn.MultiMarginLoss against torch's, on every backend."""
import unittest.mock

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from lossops import _eager
from _cases import (ISA_ORDER, assert_float64_gradients_match, backend_cases, forced_isa, forward_backward, grid,
                    isa_available, leaf_copies, pairwise, without_eager_routes)
from _elementwise_cases import check_reduced_precision

TORCH_MULTI_MARGIN_LOSS = F.multi_margin_loss
SHAPES = {"rows": (6, 5), "one_row": (5,), "wide": (3, 37)}


def _cases():
    options = dict(shape=list(SHAPES), p=(1, 2), margin=(1.0, 0.3), weight=(False, True),
                   reduction=("none", "mean", "sum"))
    return backend_cases({"cpp": grid(options), "reference": pairwise(options), "triton": pairwise(options)})


def _inputs(shape, weight):
    x = torch.randn(shape, dtype=torch.float64).requires_grad_()
    t = torch.randint(0, shape[-1], shape[:1]) if len(shape) == 2 else torch.tensor(2)
    w = torch.rand(shape[-1], dtype=torch.float64) + 0.5 if weight else None
    return x, t, w


@pytest.mark.parametrize("backend, case", _cases(), indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    torch.manual_seed(0)
    x, t, w = _inputs(SHAPES[case["shape"]], case["weight"])
    kwargs = dict(p=case["p"], margin=case["margin"], weight=w, reduction=case["reduction"])
    fn = lambda x: lossops.multi_margin_loss(x, t, **kwargs)  # noqa: E731
    ours = forward_backward(fn, [x])
    theirs = forward_backward(lambda x: F.multi_margin_loss(x, t, **kwargs), leaf_copies([x]))
    assert ours[0].shape == theirs[0].shape
    assert_close(ours, theirs)
    if backend == "triton":  # the interpreter's gradcheck costs minutes: equal to the gradchecked C++ gradients
        assert_float64_gradients_match(fn, [x], "triton")
    else:
        assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("layout", ["transposed", "sliced", "expanded"])
def test_strided_inputs_match_torch(backend, layout):
    base = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    view = {"transposed": lambda b: b.t(), "sliced": lambda b: b[1::2, ::2],
            "expanded": lambda b: b[:1].expand(4, 7)}[layout]
    shape = view(base).shape
    t = torch.randint(0, shape[1], shape[:1])
    for p in (1, 2):
        ours = forward_backward(lambda b: lossops.multi_margin_loss(view(b), t, p=p), [base])
        theirs = forward_backward(lambda b: F.multi_margin_loss(view(b), t, p=p), leaf_copies([base]))
        assert_close(ours, theirs)


def test_wide_rows_past_one_block_match_torch(backend):
    """Rows longer than a C++ block (2048 classes), with the target in the second block."""
    C = 2500 if backend != "triton" else 300
    x = (0.01 * torch.randn(3, C, dtype=torch.float64)).requires_grad_()
    t = torch.tensor([C - 1, 2100 % C, 0])
    w = torch.rand(C, dtype=torch.float64)
    for p in (1, 2):
        ours = forward_backward(lambda x: lossops.multi_margin_loss(x, t, p=p, weight=w, reduction="none"), [x])
        theirs = forward_backward(lambda x: F.multi_margin_loss(x, t, p=p, weight=w, reduction="none"),
                                  leaf_copies([x]))
        assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [1, 2])
def test_reduced_precision_no_worse_than_torch(backend, dtype, p):
    """torch's CPU kernel has no bf16/fp16: its own error there is its float32 kernel's on the rounded input, rounded
    to the dtype, which is what a user gets by upcasting."""
    torch.manual_seed(0)
    rows = 64 if backend == "triton" else 1031
    x = torch.randn(rows, 37, dtype=torch.float64)
    t = torch.randint(0, 37, (rows,))
    weight = torch.rand(37, dtype=torch.float64) + 0.5

    def ours(x):
        return lossops.multi_margin_loss(x, t, p=p, weight=weight.to(x.dtype))

    def truth(x):
        if x.dtype in (torch.bfloat16, torch.float16):
            return F.multi_margin_loss(x.float(), t, p=p, weight=weight.to(x.dtype).float()).to(x.dtype)
        return F.multi_margin_loss(x, t, p=p, weight=weight.to(x.dtype))

    check_reduced_precision(ours, truth, x, dtype, "multi_margin_loss")


def test_low_precision_gradient_has_the_input_dtype(backend):
    x = torch.randn(5, 6).bfloat16().requires_grad_()
    loss = lossops.multi_margin_loss(x, torch.randint(0, 6, (5,)))
    loss.backward()
    assert loss.dtype == x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(5,), ()], ids=["one_row", "0d_one_class"])
def test_one_row_input_takes_a_0d_or_one_element_target(backend, shape):
    """torch takes a (C,) input, and a 0-d one as a row of one class, with a 0-d or one-element target; the loss
    per row has the target's shape."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    for t in (torch.tensor(3 if shape else 0), torch.tensor([3 if shape else 0])):
        for reduction in ("none", "mean", "sum"):
            ours = forward_backward(lambda x: lossops.multi_margin_loss(x, t, reduction=reduction), [x])
            theirs = forward_backward(lambda x: F.multi_margin_loss(x, t, reduction=reduction), leaf_copies([x]))
            assert ours[0].shape == theirs[0].shape
            assert_close(ours, theirs)


def test_nonfinite_scores_like_torch(backend):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[inf, 0.0, -1.0], [nan, -2.0, 0.0], [-1.0, -inf, -3.0], [0.5, 0.5, 0.5]], requires_grad=True)
    t = torch.tensor([0, 1, 1, 2])
    for p in (1, 2):
        for reduction in ("none", "sum"):
            assert_close(forward_backward(lambda x: lossops.multi_margin_loss(x, t, p=p, reduction=reduction), [x]),
                         forward_backward(lambda x: F.multi_margin_loss(x, t, p=p, reduction=reduction),
                                          leaf_copies([x])), equal_nan=True)


def test_empty_batch_mean_is_nan_and_sum_zero(backend):
    """torch's mean over an empty batch returns whatever its output's memory held; lossops' is NaN, the mean over
    nothing of every other family."""
    x = torch.randn(0, 4, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    assert lossops.multi_margin_loss(x, t).isnan()
    loss = lossops.multi_margin_loss(x, t, reduction="sum")
    assert loss == 0
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape
    assert lossops.multi_margin_loss(x, t, reduction="none").shape == (0,)


def _module_db_samples(dtype):
    from torch.testing._internal.common_modules import module_db

    (info,) = [m for m in module_db if m.module_cls is torch.nn.MultiMarginLoss]
    torch.manual_seed(0)
    return [(dict(s.constructor_input.kwargs), list(s.forward_input.args))
            for s in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)]


def _module_db_params():
    return [pytest.param(backend, dtype, index, id=f"{backend}-{str(dtype)[6:]}-{index}")
            for dtype in (torch.float64, torch.float32) for index in range(len(_module_db_samples(dtype)))
            for backend in ("cpp", "triton", "reference")]


@pytest.mark.parametrize("backend, dtype, index", _module_db_params(), indirect=["backend"])
def test_torch_module_samples(backend, dtype, index):
    kwargs, (input, target) = _module_db_samples(dtype)[index]
    assert_close(forward_backward(lossops.nn.MultiMarginLoss(**kwargs), [input, target]),
                 forward_backward(torch.nn.MultiMarginLoss(**kwargs), leaf_copies([input, target])))


def test_torch_has_no_criterion_tests_of_its_own():
    """common_nn.criterion_tests holds no MultiMarginLoss entry today; when torch adds one, this family's tests must
    run it."""
    from torch.testing._internal.common_nn import criterion_tests

    assert not [test for test in criterion_tests if test.get("fullname", "").startswith("MultiMarginLoss")]


def _new_module_tests():
    from torch.testing._internal.common_nn import get_new_module_tests

    return {test["fullname"]: test for test in get_new_module_tests()
            if test.get("fullname", "").lower().startswith("multimarginloss")}


def test_new_module_tests_are_found():
    assert len(_new_module_tests()) >= 6


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(_new_module_tests()))
def test_torch_functional_module_tests(backend, dtype, name):
    """torch's get_new_module_tests() entries call F.multi_margin_loss inside a module: run with
    lossops.multi_margin_loss in its place, against the same module with torch's."""
    test = _new_module_tests()[name]
    torch.manual_seed(0)
    module = test["constructor"]()
    x = (test["input_fn"]() if "input_fn" in test else test["input"]).to(dtype).requires_grad_()
    with unittest.mock.patch.object(F, "multi_margin_loss", lossops.multi_margin_loss):
        ours = forward_backward(module, [x])
    assert_close(ours, forward_backward(module, leaf_copies([x])))
    assert F.multi_margin_loss is TORCH_MULTI_MARGIN_LOSS


@pytest.mark.parametrize("call, error, match", [
    (lambda f, x: f(x, torch.tensor([0, 5, 1])), RuntimeError, "target out of range"),
    (lambda f, x: f(x, torch.tensor([0, -1, 1])), RuntimeError, "target out of range"),
    (lambda f, x: f(x, torch.tensor([0, 1, 1]), p=3), ValueError, "only p == 1 and p == 2"),
    (lambda f, x: f(x, torch.tensor([0, 1])), RuntimeError, r"Expected target size \[3\], but got \[2\]"),
    (lambda f, x: f(x, torch.tensor([[0, 1, 1]])), RuntimeError, r"Expected target size \[3\]"),
    (lambda f, x: f(x, torch.tensor([0.0, 1.0, 1.0])), RuntimeError, "Long"),
    (lambda f, x: f(x, torch.tensor([0, 1, 1], dtype=torch.int32)), RuntimeError, "Long"),
    (lambda f, x: f(x, torch.tensor([0, 1, 1]), weight=torch.ones(3)), RuntimeError, "inconsistent weight size"),
    (lambda f, x: f(x, torch.tensor([0, 1, 1]), weight=torch.ones(4, 1)), ValueError, "one-dimensional"),
    (lambda f, x: f(x, torch.tensor([0, 1, 1]), weight=torch.ones(4, dtype=torch.float64)), RuntimeError,
     "Float|float32"),
    (lambda f, x: f(x, torch.tensor([0, 1, 1]), weight=torch.ones(4, requires_grad=True)), RuntimeError,
     "not differentiable with respect to argument 'weight'"),
    (lambda f, x: f(x, torch.tensor([0, 1, 1]), reduction="max"), ValueError, "max"),
    (lambda f, x: f(x.unsqueeze(-1), torch.zeros(3, 1, dtype=torch.long)), RuntimeError,
     "Expected non-empty vector or matrix"),
    (lambda f, x: f(x[:, :0], torch.zeros(3, dtype=torch.long)), RuntimeError, "Expected non-empty vector or matrix"),
    (lambda f, x: f(x.detach().long(), torch.tensor([0, 1, 1])), NotImplementedError, "Long|int64"),
])
def test_bad_arguments_raise_torchs_exception(backend, call, error, match):
    x = torch.randn(3, 4).requires_grad_()
    with pytest.raises(error, match=match):
        call(lossops.multi_margin_loss, x).backward()
    with pytest.raises(error):
        call(F.multi_margin_loss, x).backward()


def test_out_of_range_target_names_the_value_and_leaves_no_gradient(backend):
    x = torch.randn(2, 3, requires_grad=True)
    for bad in (3, 2 ** 40, -(2 ** 40)):
        with pytest.raises(RuntimeError, match=f"target out of range.*{bad}"):
            lossops.multi_margin_loss(x, torch.tensor([0, bad]))
    assert x.grad is None


def test_plain_cpu_calls_take_the_eager_route_with_the_custom_op_values(monkeypatch):
    x = torch.randn(7, 5)
    t = torch.randint(0, 5, (7,))
    weight = torch.rand(5) + 0.5
    for p in (1, 2):
        for reduction in ("none", "mean", "sum"):
            go = torch.rand(t.shape) if reduction == "none" else torch.tensor(0.75)

            def run():
                leaf = x.clone().requires_grad_()
                loss = lossops.multi_margin_loss(leaf, t, p, 0.6, weight, reduction=reduction)
                return loss, torch.autograd.grad(loss, leaf, go)[0], loss.grad_fn.name()

            eager, eager_grad, eager_node = run()
            with monkeypatch.context() as m:  # neither the C++ eager path nor the op body without the custom op
                without_eager_routes(m)
                m.setattr(_eager, "_no_mode_active", lambda: False)
                op, op_grad, op_node = run()
            assert eager_node == "LossopsMultiMarginLossBackward" != op_node
            assert torch.equal(eager, op) and torch.equal(eager_grad, op_grad)


def test_module_matches_torch_module(backend):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 2, 1, 2])
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    kwargs = dict(p=2, margin=0.5, weight=weight, reduction="sum")
    assert_close(forward_backward(lossops.nn.MultiMarginLoss(**kwargs), [x, t]),
                 forward_backward(torch.nn.MultiMarginLoss(**kwargs), leaf_copies([x, t])))
    module = lossops.nn.MultiMarginLoss(2, 0.5, weight)
    assert "weight" in dict(module.named_buffers())
    assert module.p == 2 and module.margin == 0.5
    with pytest.warns(UserWarning):
        assert lossops.nn.MultiMarginLoss(size_average=False).reduction == "sum"


@pytest.mark.parametrize("isa", [isa for isa in ISA_ORDER if isa_available(isa)])
def test_short_and_vector_rows_match_torch_on_each_isa(isa):
    """Rows shorter than two vectors of the build (8 or 16 float lanes) take a scalar loop, longer ones the vector
    one: both sides of that bound, with and without gradients and per-row losses, on each ISA build."""
    gen = torch.Generator().manual_seed(3)
    with forced_isa(isa):
        for classes in (4, 10, 15, 16, 31, 32, 40):
            x = torch.randn(33, classes, generator=gen, dtype=torch.float64)
            t = torch.randint(0, classes, (33,), generator=gen)
            w = torch.rand(classes, generator=gen, dtype=torch.float64) + 0.5
            for p, weight, reduction in ((1, None, "mean"), (2, w, "sum"), (1, w, "none")):
                kwargs = dict(p=p, weight=weight, reduction=reduction)
                with torch.no_grad():
                    assert_close(lossops.multi_margin_loss(x, t, **kwargs), F.multi_margin_loss(x, t, **kwargs))
                ours = forward_backward(lambda x: lossops.multi_margin_loss(x, t, **kwargs), leaf_copies([x]))
                theirs = forward_backward(lambda x: F.multi_margin_loss(x, t, **kwargs), leaf_copies([x]))
                assert_close(ours, theirs, msg=lambda m: f"{isa} C={classes} p={p}: {m}")
