"""lossops.nll_loss against torch's, on every backend."""
import unittest.mock

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from lossops import _eager
from _cases import (ISA_ORDER, assert_float64_gradients_match, backend_cases, forced_isa, forward_backward, grid,
                    isa_available, leaf_copies, pairwise, without_eager_routes)
from _elementwise_cases import check_lowp

TORCH_NLL_LOSS = F.nll_loss
SHAPES = {"rows": (6, 5), "class_dim_1": (2, 5, 3, 4), "one_row": (5,)}


def _targets(shape, ignore_index):
    """Class indices for an input of `shape`, with ignore_index at some positions."""
    if len(shape) == 1:  # one row, kept: a mean over nothing has its own test
        return torch.tensor(3)
    target = torch.randint(0, shape[1], shape[:1] + shape[2:])
    target.view(-1)[::3] = ignore_index
    return target


def _cases():
    options = dict(shape=list(SHAPES), weight=(False, True), ignore_index=(-100, 1),
                   reduction=("none", "mean", "sum"))
    return backend_cases({"cpp": grid(options), "reference": pairwise(options), "triton": pairwise(options)})


@pytest.mark.parametrize("backend, case", _cases(), indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    shape = SHAPES[case["shape"]]
    class_dim = 1 if len(shape) > 1 else 0
    x = torch.randn(shape, dtype=torch.float64).log_softmax(class_dim).requires_grad_()
    t = _targets(shape, case["ignore_index"])
    weight = torch.rand(shape[class_dim], dtype=torch.float64) + 0.5 if case["weight"] else None
    kwargs = dict(weight=weight, ignore_index=case["ignore_index"], reduction=case["reduction"])
    fn = lambda x: lossops.nll_loss(x, t, **kwargs)  # noqa: E731
    assert_close(forward_backward(fn, [x]), forward_backward(lambda x: F.nll_loss(x, t, **kwargs), leaf_copies([x])))
    if backend == "triton":  # the interpreter's gradcheck costs minutes: equal to the gradchecked C++ gradients
        assert_float64_gradients_match(fn, [x], "triton")
    else:
        assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "sliced"])
def test_strided_inputs_match_torch(backend, layout):
    base = torch.randn(4, 6, 7, dtype=torch.float64, requires_grad=True)
    view = {"transposed": lambda b: b[0].t(), "channels_last": lambda b: b.permute(0, 2, 1),
            "sliced": lambda b: b[:, ::2, 1:6]}[layout]
    shape = view(base).shape
    t = torch.randint(0, shape[1], shape[:1] + shape[2:])
    weight = torch.rand(shape[1], dtype=torch.float64)
    ours = forward_backward(lambda b: lossops.nll_loss(view(b), t, weight), [base])
    theirs = forward_backward(lambda b: F.nll_loss(view(b), t, weight), leaf_copies([base]))
    assert_close(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_reduced_precision_no_worse_than_torch(backend, dtype, weighted):
    rows = 64 if backend == "triton" else 4099
    x = torch.randn(rows, 37, dtype=torch.float64).log_softmax(1) * 3
    t = torch.randint(0, 37, (rows,))
    t[::7] = -100
    weight = (torch.rand(37, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    ours = lambda x: lossops.nll_loss(x, t, None if weight is None else weight.to(x.dtype))  # noqa: E731
    truth = lambda x: F.nll_loss(x, t, None if weight is None else weight.to(x.dtype))  # noqa: E731
    if dtype == torch.float32:
        x32 = x.float().requires_grad_()
        assert_close(forward_backward(ours, [x32]), forward_backward(truth, leaf_copies([x32])))
    else:
        check_lowp(ours, truth, [x.requires_grad_()], dtype, "nll_loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(64, 8192), (2, 7, 256, 256), (2, 7, 301, 301)],
                         ids=["wide_rows", "class_planes", "class_planes_ragged"])
@pytest.mark.parametrize("isa", [isa for isa in ISA_ORDER if isa_available(isa)])
def test_gradients_into_kept_buffers_match_torch(shape, dtype, isa):
    """From the second call on, a gradient of 1 MiB or more lands in the buffer the previous call freed, whose pages
    are resident: the C++ kernel then writes it with non-temporal stores (zeros and the row's value over them for
    wide rows; whole class planes for a class dimension ahead of the positions, in blocks of positions the last of
    which is ragged for 301 x 301)."""
    with lossops.backend("cpp"), forced_isa(isa):
        for call in range(3):
            x = torch.randn(shape, dtype=dtype).requires_grad_()
            t = torch.randint(0, shape[1], shape[:1] + shape[2:])
            t.view(-1)[::5] = 3
            weight = torch.rand(shape[1], dtype=dtype)
            ours = forward_backward(lambda x: lossops.nll_loss(x, t, weight, ignore_index=3), [x], seed=call)
            # the float64 truth, rounded: torch's own bf16 and fp16 sums are further from it than the dtype's step
            loss, (grad,) = forward_backward(lambda x: F.nll_loss(x, t, weight.double(), ignore_index=3),
                                             leaf_copies([x], torch.float64), seed=call)
            assert_close(ours, (loss.to(dtype), [grad.to(dtype)]))
            del ours  # the gradient's buffer goes back to the cache for the next call
            assert lossops.gradient_cache_bytes() >= x.numel() * x.element_size()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_class_planes_past_a_16_bit_class_index_match_torch(dtype):
    """16-bit class planes compare targets narrowed to 16-bit integers; more than 32767 classes take int64 compares."""
    gen = torch.Generator().manual_seed(5)
    with lossops.backend("cpp"):
        for classes in (32767, 70000):  # 70000: classes 0 and 65536 would share a 16-bit index
            x = torch.randn(2, classes, 3, generator=gen).to(dtype).requires_grad_()
            t = torch.randint(0, classes, (2, 3), generator=gen)
            t[0, 0], t[0, 1], t[1, 0], t[1, 2] = classes - 1, 0, min(65536, classes - 2), 3
            weight = torch.rand(classes, generator=gen).to(dtype)
            ours = forward_backward(lambda x: lossops.nll_loss(x, t, weight, ignore_index=3), [x])
            loss, (grad,) = forward_backward(lambda x: F.nll_loss(x, t, weight.double(), ignore_index=3),
                                             leaf_copies([x], torch.float64))
            assert_close(ours, (loss.to(dtype), [grad.to(dtype)]))


def test_one_row_input_takes_a_0d_or_one_element_target(backend):
    """torch's forward takes both; its backward fails on the one-element target (a size mismatch), so the 0-d
    target's gradient is the oracle for both."""
    x = torch.randn(5, dtype=torch.float64).log_softmax(0).requires_grad_()
    for t in (torch.tensor(3), torch.tensor([3])):
        assert_close(forward_backward(lambda x: lossops.nll_loss(x, t, reduction="none"), [x]),
                     forward_backward(lambda x: F.nll_loss(x, t.reshape(()), reduction="none"), leaf_copies([x])))


def test_uint8_targets_and_dtypes_like_torch(backend):
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x = torch.randn(6, 5).log_softmax(1).to(dtype).requires_grad_()
        t = torch.randint(0, 5, (6,), dtype=torch.uint8)
        ours, theirs = lossops.nll_loss(x, t), F.nll_loss(x, t)
        assert ours.dtype == theirs.dtype == dtype
        assert_close(ours, theirs)


def test_mean_over_nothing_is_nan_with_a_zero_gradient(backend):
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    for t, weight in ((torch.full((4,), -100), None), (torch.tensor([0, 0, 1, 1]), torch.tensor([0.0, 0.0, 1.0]))):
        loss = lossops.nll_loss(x, t, None if weight is None else weight.double())
        assert loss.isnan()
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.equal(grad, torch.zeros_like(x))


def test_nonfinite_log_probabilities_like_torch(backend):
    x = torch.tensor([[float("-inf"), 0.0, -1.0], [float("nan"), -2.0, 0.0], [-1.0, float("-inf"), -3.0]],
                     requires_grad=True)
    t = torch.tensor([0, 1, 1])
    for reduction in ("none", "sum"):
        assert_close(forward_backward(lambda x: lossops.nll_loss(x, t, reduction=reduction), [x]),
                     forward_backward(lambda x: F.nll_loss(x, t, reduction=reduction), leaf_copies([x])),
                     equal_nan=True)


def _module_db_samples(dtype):
    from torch.testing._internal.common_modules import module_db

    (info,) = [m for m in module_db if m.module_cls is torch.nn.NLLLoss]
    torch.manual_seed(0)
    return [(dict(s.constructor_input.kwargs), list(s.forward_input.args))
            for s in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)]


def _criterion_samples(dtype):
    from torch.testing._internal.common_nn import criterion_tests

    torch.manual_seed(0)
    return [(dict(reduction=test["constructor"]().reduction),
             [test["input_fn"]().to(dtype).requires_grad_(), test["target_fn"]()])
            for test in criterion_tests if test["fullname"].startswith("NLLLoss_")]


SAMPLES = {"module_db": _module_db_samples, "criterion_tests": _criterion_samples}


def _sample_params():
    return [pytest.param(backend, source, dtype, index, id=f"{backend}-{source}-{str(dtype)[6:]}-{index}")
            for source, make in SAMPLES.items() for dtype in (torch.float64, torch.float32)
            for index in range(len(make(dtype))) for backend in ("cpp", "triton", "reference")]


@pytest.mark.parametrize("backend, source, dtype, index", _sample_params(), indirect=["backend"])
def test_torch_module_samples(backend, source, dtype, index):
    kwargs, (input, target) = SAMPLES[source](dtype)[index]
    assert_close(forward_backward(lossops.nn.NLLLoss(**kwargs), [input, target]),
                 forward_backward(torch.nn.NLLLoss(**kwargs), leaf_copies([input, target])))


def _new_module_tests():
    from torch.testing._internal.common_nn import get_new_module_tests

    return {test["fullname"]: test for test in get_new_module_tests() if test.get("fullname", "").startswith("NLLLoss")}


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"], indirect=True)
@pytest.mark.parametrize("name", sorted(_new_module_tests()))
def test_torch_functional_module_tests(backend, name):
    """torch's get_new_module_tests() entries call F.nll_loss inside a module: run with lossops.nll_loss in its
    place, against the same module with torch's."""
    test = _new_module_tests()[name]
    torch.manual_seed(0)
    module = test["constructor"]()
    x = (test["input_fn"]() if "input_fn" in test else test["input"]).double().requires_grad_()
    with unittest.mock.patch.object(F, "nll_loss", lossops.nll_loss):
        ours = forward_backward(module, [x])
    assert_close(ours, forward_backward(module, leaf_copies([x])))
    assert F.nll_loss is TORCH_NLL_LOSS


@pytest.mark.parametrize("call, error, match", [
    (lambda nll, x: nll(x, torch.tensor([0, 5, 1])), IndexError, "Target 5 is out of bounds"),
    (lambda nll, x: nll(x, torch.tensor([0, -2, 1])), IndexError, "Target -2 is out of bounds"),
    (lambda nll, x: nll(x, torch.tensor([0.0, 1.0, 1.0])), RuntimeError, "Long or Byte.*torch.float32"),
    (lambda nll, x: nll(x, torch.tensor([0, 1, 1], dtype=torch.int32)), RuntimeError, "Long or Byte.*torch.int32"),
    (lambda nll, x: nll(x, torch.tensor([0, 1])), ValueError, r"batch_size \(3\) to match target batch_size \(2\)"),
    (lambda nll, x: nll(x, torch.tensor([0, 1, 1]), torch.ones(4)), RuntimeError, "for all 5 classes"),
    (lambda nll, x: nll(x, torch.tensor([0, 1, 1]), torch.ones(5, dtype=torch.float64)), RuntimeError, "dtype"),
    (lambda nll, x: nll(x, torch.tensor([0, 1, 1]), torch.ones(5, requires_grad=True)), RuntimeError,
     "not differentiable with respect to argument 'weight'"),
    (lambda nll, x: nll(x, torch.tensor([0, 1, 1]), ignore_index=1.5), TypeError, "ignore_index"),
    (lambda nll, x: nll(x, torch.tensor([0, 1, 1]), reduction="max"), ValueError, "max"),
    (lambda nll, x: nll(x[0, 0], torch.tensor(0)), ValueError, "1 or more dimensions"),
    (lambda nll, x: nll(x.unsqueeze(-1), torch.zeros(3, 2, dtype=torch.long)), RuntimeError,
     r"target size \[3, 1\].*\(3, 2\)"),
])
def test_bad_arguments_raise_torchs_exception(backend, call, error, match):
    x = torch.randn(3, 5).log_softmax(1).requires_grad_()
    with pytest.raises(error, match=match):
        call(lossops.nll_loss, x).backward()
    with pytest.raises(error):
        call(F.nll_loss, x).backward()


def test_out_of_range_target_leaves_no_gradient_and_reads_nothing(backend):
    x = torch.randn(2, 3, requires_grad=True)
    for bad in (3, 2 ** 40, -(2 ** 40)):
        with pytest.raises(IndexError, match=f"Target {bad} is out of bounds"):
            lossops.nll_loss(x, torch.tensor([0, bad]))
    assert x.grad is None


def test_plain_cpu_calls_take_the_eager_route_with_the_custom_op_values(monkeypatch):
    x = torch.randn(2, 5, 3, 4).log_softmax(1)
    t = torch.randint(0, 5, (2, 3, 4))
    t[0, 0] = 2
    weight = torch.rand(5) + 0.5
    for reduction in ("none", "mean", "sum"):
        go = torch.rand(t.shape) if reduction == "none" else torch.tensor(0.75)

        def run():
            leaf = x.clone().requires_grad_()
            loss = lossops.nll_loss(leaf, t, weight, ignore_index=2, reduction=reduction)
            return loss, torch.autograd.grad(loss, leaf, go)[0], loss.grad_fn.name()

        eager, eager_grad, eager_node = run()
        with monkeypatch.context() as m:  # neither the C++ eager path nor the op body without the custom op
            without_eager_routes(m)
            m.setattr(_eager, "_no_mode_active", lambda: False)
            op, op_grad, op_node = run()
        assert eager_node == "LossopsNllLossBackward" != op_node
        assert torch.equal(eager, op) and torch.equal(eager_grad, op_grad)


def test_module_matches_torch_module(backend):
    x = torch.randn(4, 3, 2, dtype=torch.float64).log_softmax(1).requires_grad_()
    t = torch.tensor([[0, 1], [2, 2], [1, 0], [2, 1]])
    weight = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    kwargs = dict(weight=weight, ignore_index=1, reduction="sum")
    assert_close(forward_backward(lossops.nn.NLLLoss(**kwargs), [x, t]),
                 forward_backward(torch.nn.NLLLoss(**kwargs), leaf_copies([x, t])))
    module = lossops.nn.NLLLoss(weight)
    assert "weight" in dict(module.named_buffers())
    assert repr(lossops.nn.NLLLoss(ignore_index=3)) == "NLLLoss(ignore_index=3)"


@pytest.mark.parametrize("shape", [(5, 40000), (3, 33000), (20, 30000), (40, 12000), (37, 1000), (2500, 300),
                                   (300, 10), (2, 7, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("isa", [isa for isa in ISA_ORDER if isa_available(isa)])
def test_loss_without_gradients_has_the_bits_of_the_loss_with_them(shape, dtype, isa):
    """A forward without gradients takes its own loop (lossops' nll kernel): the same sum order, so the same bits,
    on the C++ eager path and the custom op; a target out of range raises there too. The shapes reach rows far apart
    read in runs (blocks of 1, 2, 5, 65 and 218 rows; 2500 rows of 300 take three runs) and nearby rows summed as
    they are read."""
    with forced_isa(isa):
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(shape, generator=gen, dtype=torch.float64).log_softmax(1).to(dtype)
        target = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=gen)
        target.view(-1)[::3] = -100
        # ignore_index 1 is a class: its rows are left out, and -100 (out of range then) becomes class 0.
        for ignore_index, targets in ((-100, target), (1, target.clamp_min(0))):
            for weight in (None, torch.rand(shape[1], generator=gen, dtype=torch.float64).to(dtype) + 0.5):
                for reduction in ("mean", "sum", "none"):
                    kwargs = dict(weight=weight, ignore_index=ignore_index, reduction=reduction)
                    with torch.no_grad():
                        without = lossops.nll_loss(x, targets, **kwargs)
                    with_grad = lossops.nll_loss(x.clone().requires_grad_(), targets, **kwargs)
                    assert torch.equal(without, with_grad.detach()), (ignore_index, weight is None, reduction)
                    expected = F.nll_loss(x.double(), targets, None if weight is None else weight.double(),
                                          ignore_index=ignore_index, reduction=reduction)
                    torch.testing.assert_close(without, expected.to(dtype))
        bad = target.clone()
        bad.view(-1)[1] = shape[1]
        with torch.no_grad(), pytest.raises(IndexError, match=f"Target {shape[1]} is out of bounds"):
            lossops.nll_loss(x, bad)
