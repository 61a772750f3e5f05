"""lossops.multilabel_margin_loss and lossops.nn.MultiLabelMarginLoss against torch's, on every backend."""
import unittest.mock

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from lossops import _eager
from lossops.losses.multilabel_margin import label_lists
from _cases import (assert_float64_gradients_match, backend_cases, forward_backward, grid,
                    leaf_copies, pairwise, without_eager_routes)
from _elementwise_cases import check_reduced_precision

TORCH_MULTILABEL_MARGIN_LOSS = F.multilabel_margin_loss
SHAPES = {"rows": (6, 5), "one_row": (5,), "wide": (3, 37), "one_class": ()}


def _target(shape):
    """Lists of up to 3 classes, one row listing a class twice and one listing none, values past the -1."""
    x = torch.empty(shape)
    t = label_lists(x)
    if len(shape) == 2:
        t[0, :3] = torch.tensor([1, 1, -1])
        t[1, 0] = -1
    return t


def _cases():
    options = dict(shape=list(SHAPES), reduction=("none", "mean", "sum"))
    return backend_cases({"cpp": grid(options), "reference": pairwise(options), "triton": pairwise(options)})


@pytest.mark.parametrize("backend, case", _cases(), indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    torch.manual_seed(0)
    shape = SHAPES[case["shape"]]
    x = torch.randn(shape, dtype=torch.float64).requires_grad_()
    t = _target(shape)
    fn = lambda x: lossops.multilabel_margin_loss(x, t, reduction=case["reduction"])  # noqa: E731
    ours = forward_backward(fn, [x])
    theirs = forward_backward(lambda x: F.multilabel_margin_loss(x, t, reduction=case["reduction"]), leaf_copies([x]))
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
    t = _target(view(base).shape)
    ours = forward_backward(lambda b: lossops.multilabel_margin_loss(view(b), t), [base])
    theirs = forward_backward(lambda b: F.multilabel_margin_loss(view(b), t), leaf_copies([base]))
    assert_close(ours, theirs)


def test_long_lists_match_torch(backend):
    """Every class listed but one, and every class listed (no -1: no unlisted class, loss 0)."""
    C = 40
    x = torch.randn(3, C, dtype=torch.float64, requires_grad=True)
    t = torch.stack([torch.randperm(C), torch.randperm(C), torch.randperm(C)])
    t[0, C - 1] = -1
    t[1, C // 2] = -1
    ours = forward_backward(lambda x: lossops.multilabel_margin_loss(x, t, reduction="none"), [x])
    theirs = forward_backward(lambda x: F.multilabel_margin_loss(x, t, reduction="none"), leaf_copies([x]))
    assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reduced_precision_no_worse_than_torch(backend, dtype):
    """torch's CPU kernel has no bf16/fp16: its own error there is its float32 kernel's on the rounded input, rounded
    to the dtype, which is what a user gets by upcasting."""
    torch.manual_seed(0)
    rows = 32 if backend == "triton" else 517
    x = torch.randn(rows, 37, dtype=torch.float64)
    t = label_lists(x, 6)

    def ours(x):
        return lossops.multilabel_margin_loss(x, t)

    def truth(x):
        if x.dtype in (torch.bfloat16, torch.float16):
            return F.multilabel_margin_loss(x.float(), t).to(x.dtype)
        return F.multilabel_margin_loss(x, t)

    check_reduced_precision(ours, truth, x, dtype, "multilabel_margin_loss")


def test_low_precision_gradient_has_the_input_dtype(backend):
    x = torch.randn(5, 6).bfloat16().requires_grad_()
    loss = lossops.multilabel_margin_loss(x, label_lists(x))
    loss.backward()
    assert loss.dtype == x.grad.dtype == torch.bfloat16


def test_one_row_input_takes_a_one_dimensional_target(backend):
    for shape in ((5,), ()):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        t = torch.tensor([3, 0, -1, 4, 2]) if shape else torch.tensor(0)
        for target in (t, t.reshape(-1)):
            for reduction in ("none", "mean", "sum"):
                ours = forward_backward(lambda x: lossops.multilabel_margin_loss(x, target, reduction=reduction), [x])
                theirs = forward_backward(lambda x: F.multilabel_margin_loss(x, target, reduction=reduction),
                                          leaf_copies([x]))
                assert ours[0].shape == theirs[0].shape
                assert_close(ours, theirs)


def test_nonfinite_scores_like_torch(backend):
    inf, nan = float("inf"), float("nan")
    x = torch.tensor([[inf, 0.0, -1.0], [nan, -2.0, 0.0], [-1.0, -inf, -3.0], [0.5, 0.5, 0.5]], requires_grad=True)
    t = torch.tensor([[0, -1, 2], [1, -1, 0], [1, 2, -1], [2, 0, -1]])
    for reduction in ("none", "sum"):
        assert_close(forward_backward(lambda x: lossops.multilabel_margin_loss(x, t, reduction=reduction), [x]),
                     forward_backward(lambda x: F.multilabel_margin_loss(x, t, reduction=reduction),
                                      leaf_copies([x])), equal_nan=True)


def test_empty_batch_mean_is_nan_and_sum_zero(backend):
    """torch's mean over an empty batch returns whatever its output's memory held; lossops' is NaN, the mean over
    nothing of every other family."""
    x = torch.randn(0, 4, requires_grad=True)
    t = torch.zeros(0, 4, dtype=torch.long)
    assert lossops.multilabel_margin_loss(x, t).isnan()
    loss = lossops.multilabel_margin_loss(x, t, reduction="sum")
    assert loss == 0
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.shape == x.shape
    assert lossops.multilabel_margin_loss(x, t, reduction="none").shape == (0,)


def _module_db_samples(dtype):
    from torch.testing._internal.common_modules import module_db

    (info,) = [m for m in module_db if m.module_cls is torch.nn.MultiLabelMarginLoss]
    torch.manual_seed(0)
    return [(dict(s.constructor_input.kwargs), list(s.forward_input.args))
            for s in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)]


def _criterion_samples(dtype):
    from torch.testing._internal.common_nn import criterion_tests

    torch.manual_seed(0)
    return [(dict(reduction=test["constructor"]().reduction),
             [test["input_fn"]().to(dtype).requires_grad_(), test["target_fn"]()])
            for test in criterion_tests if test["fullname"].startswith("MultiLabelMarginLoss_")]


SAMPLES = {"module_db": _module_db_samples, "criterion_tests": _criterion_samples}


def _sample_params():
    return [pytest.param(backend, source, dtype, index, id=f"{backend}-{source}-{str(dtype)[6:]}-{index}")
            for source, make in SAMPLES.items() for dtype in (torch.float64, torch.float32)
            for index in range(len(make(dtype))) for backend in ("cpp", "triton", "reference")]


def test_torch_samples_are_found():
    assert len(_module_db_samples(torch.float64)) >= 8 and len(_criterion_samples(torch.float64)) >= 3


@pytest.mark.parametrize("backend, source, dtype, index", _sample_params(), indirect=["backend"])
def test_torch_module_samples(backend, source, dtype, index):
    kwargs, (input, target) = SAMPLES[source](dtype)[index]
    assert_close(forward_backward(lossops.nn.MultiLabelMarginLoss(**kwargs), [input, target]),
                 forward_backward(torch.nn.MultiLabelMarginLoss(**kwargs), leaf_copies([input, target])))


def _new_module_tests():
    from torch.testing._internal.common_nn import get_new_module_tests

    return {test["fullname"]: test for test in get_new_module_tests()
            if test.get("fullname", "").startswith("MultiLabelMarginLoss")}


def test_new_module_tests_are_found():
    assert len(_new_module_tests()) >= 4


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(_new_module_tests()))
def test_torch_functional_module_tests(backend, dtype, name):
    """torch's get_new_module_tests() entries call F.multilabel_margin_loss inside a module: run with
    lossops.multilabel_margin_loss in its place, against the same module with torch's."""
    test = _new_module_tests()[name]
    torch.manual_seed(0)
    module = test["constructor"]()
    x = (test["input_fn"]() if "input_fn" in test else test["input"]).to(dtype).requires_grad_()
    with unittest.mock.patch.object(F, "multilabel_margin_loss", lossops.multilabel_margin_loss):
        ours = forward_backward(module, [x])
    assert_close(ours, forward_backward(module, leaf_copies([x])))
    assert F.multilabel_margin_loss is TORCH_MULTILABEL_MARGIN_LOSS


LISTS = torch.tensor([[0, 1, -1, 2], [3, -1, 0, 0], [1, 2, 3, 0]])


@pytest.mark.parametrize("call, error, match", [
    (lambda f, x: f(x, LISTS.clone().index_put_((torch.tensor(1), torch.tensor(0)), torch.tensor(4))), RuntimeError,
     "out of range"),
    (lambda f, x: f(x, LISTS.clone().index_put_((torch.tensor(1), torch.tensor(3)), torch.tensor(9))), RuntimeError,
     "out of range"),
    (lambda f, x: f(x, LISTS.clone().index_put_((torch.tensor(0), torch.tensor(3)), torch.tensor(-2))), RuntimeError,
     "out of range"),
    (lambda f, x: f(x, LISTS[:, :3]), RuntimeError, "inconsistent target size"),
    (lambda f, x: f(x, LISTS[:2]), RuntimeError, "inconsistent target size"),
    (lambda f, x: f(x, LISTS.float()), RuntimeError, "Long"),
    (lambda f, x: f(x, LISTS.int()), RuntimeError, "Long"),
    (lambda f, x: f(x, LISTS, reduction="max"), ValueError, "max"),
    (lambda f, x: f(x.unsqueeze(-1), LISTS.unsqueeze(-1)), RuntimeError, "Expected non-empty vector or matrix"),
    (lambda f, x: f(x[:, :0], LISTS[:, :0]), RuntimeError, "Expected non-empty vector or matrix"),
    (lambda f, x: f(x.detach().long(), LISTS), NotImplementedError, "Long|int64"),
])
def test_bad_arguments_raise_torchs_exception(backend, call, error, match):
    x = torch.randn(3, 4).requires_grad_()
    with pytest.raises(error, match=match):
        call(lossops.multilabel_margin_loss, x).backward()
    with pytest.raises(error):
        call(F.multilabel_margin_loss, x).backward()


def test_out_of_range_target_names_the_value_and_leaves_no_gradient(backend):
    x = torch.randn(2, 3, requires_grad=True)
    for bad in (3, 2 ** 40, -2, -(2 ** 40)):
        with pytest.raises(RuntimeError, match=f"out of range.*{bad}"):
            lossops.multilabel_margin_loss(x, torch.tensor([[0, -1, 2], [1, bad, -1]]))
    assert x.grad is None


def test_plain_cpu_calls_take_the_eager_route_with_the_custom_op_values(monkeypatch):
    x = torch.randn(7, 5)
    t = label_lists(x)
    for reduction in ("none", "mean", "sum"):
        go = torch.rand(7) if reduction == "none" else torch.tensor(0.75)

        def run():
            leaf = x.clone().requires_grad_()
            loss = lossops.multilabel_margin_loss(leaf, t, reduction=reduction)
            return loss, torch.autograd.grad(loss, leaf, go)[0], loss.grad_fn.name()

        eager, eager_grad, eager_node = run()
        with monkeypatch.context() as m:  # neither the C++ eager path nor the op body without the custom op
            without_eager_routes(m)
            m.setattr(_eager, "_no_mode_active", lambda: False)
            op, op_grad, op_node = run()
        assert eager_node == "LossopsMultilabelMarginLossBackward" != op_node
        assert torch.equal(eager, op) and torch.equal(eager_grad, op_grad)


def test_module_matches_torch_module(backend):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0, 2, -1], [1, -1, 0], [2, 1, 0], [-1, 0, 0]])
    assert_close(forward_backward(lossops.nn.MultiLabelMarginLoss(reduction="sum"), [x, t]),
                 forward_backward(torch.nn.MultiLabelMarginLoss(reduction="sum"), leaf_copies([x, t])))
    with pytest.warns(UserWarning):
        assert lossops.nn.MultiLabelMarginLoss(size_average=False).reduction == "sum"
