"""Helpers shared by the elementwise-loss tests (test_regression.py, test_bce.py, test_focal.py)."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

from _cases import forward_backward, leaf_copies, lowp_error_no_worse

# The interpreter makes Triton far slower: it runs the first few OpInfo samples of each op.
TRITON_OPINFO_SAMPLES = 3


@functools.lru_cache(maxsize=None)
def _opinfo(name):
    from torch.testing._internal.common_methods_invocations import op_db

    (opinfo,) = [op for op in op_db if op.name == name]
    return opinfo


def opinfo_params(names):
    """pytest params (backend, name, dtype, index) for the OpInfo samples of each op: all of them on cpp and
    reference, the first TRITON_OPINFO_SAMPLES (float64) on triton."""
    params = []
    for name in names:
        for dtype in (torch.float32, torch.float64):
            count = len(list(_opinfo(name).sample_inputs("cpu", dtype, requires_grad=True)))
            for i in range(count):
                with_triton = dtype == torch.float64 and i < TRITON_OPINFO_SAMPLES
                backends = ["cpp", "reference"] + (["triton"] if with_triton else [])
                params += [pytest.param(b, name, dtype, i, id=f"{b}-{name.split('.')[-1]}-{str(dtype)[6:]}-{i}")
                           for b in backends]
    return params


def check_opinfo_sample(ours, theirs, name, dtype, index):
    """Our function against torch's on one OpInfo sample: values and gradients of every differentiable input."""
    sample = list(_opinfo(name).sample_inputs("cpu", dtype, requires_grad=True))[index]
    inputs = [sample.input, *sample.args]
    got = forward_backward(lambda *a: ours(*a, **sample.kwargs), inputs)
    expected = forward_backward(lambda *a: theirs(*a, **sample.kwargs), leaf_copies(inputs))
    assert_close(got, expected, equal_nan=True)


def check_lowp(ours, truth_fn, inputs, dtype, what):
    """At `dtype`, our loss and input gradient are no further from the float64 truth than torch's own result
    at that dtype (truth_fn is the torch expression, run at float64 and at `dtype`)."""
    truth = forward_backward(truth_fn, leaf_copies(inputs, torch.float64))
    low = leaf_copies(inputs, dtype)
    got = forward_backward(ours, low)
    theirs = forward_backward(truth_fn, leaf_copies(inputs, dtype))
    lowp_error_no_worse(got[0], theirs[0].to(got[0].dtype), truth[0], f"{what} loss", slack_ulps=2.0)
    lowp_error_no_worse(got[1][0], theirs[1][0], truth[1][0], f"{what} gradient", slack_ulps=2.0)


def check_reduced_precision(ours, truth, x, dtype, what, rtol=1e-5, atol=1e-4):
    """ours(x) against torch's truth(x), x a float64 input: in float32 the same loss and input gradient (to rtol and
    atol), in a lower precision no further from the float64 truth than torch's own result (check_lowp)."""
    if dtype == torch.float32:
        x32 = x.float().requires_grad_()
        assert_close(forward_backward(ours, [x32]), forward_backward(truth, leaf_copies([x32])), rtol=rtol, atol=atol)
    else:
        check_lowp(ours, truth, [x.requires_grad_()], dtype, what)


def _module_db_samples(class_name, dtype):
    from torch.testing._internal.common_modules import module_db

    (info,) = [m for m in module_db if m.module_cls.__name__ == class_name]
    torch.manual_seed(0)
    return [(dict(s.constructor_input.kwargs), list(s.forward_input.args))
            for s in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)]


def module_db_forward_inputs(module_cls, dtype):
    """torch's module_db samples of a loss Module as (constructor kwargs, *every forward argument), for Modules whose
    forward takes more than an input and a target."""
    from torch.testing._internal.common_modules import module_db

    torch.manual_seed(0)
    (info,) = [m for m in module_db if m.module_cls is module_cls]
    return [(dict(s.constructor_input.kwargs), *s.forward_input.args)
            for s in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)]


def pair_module_samples(module_cls, dtype):
    """torch's own inputs of a loss Module on two inputs and a target (MarginRankingLoss, CosineEmbeddingLoss): its
    module_db samples and its criterion_tests entries, as (constructor kwargs, input1, input2, target), both
    inputs requiring grad."""
    from torch.testing._internal.common_nn import criterion_tests

    samples = module_db_forward_inputs(module_cls, dtype)
    for test in criterion_tests:
        if test["fullname"].startswith(module_cls.__name__ + "_"):
            module = test["constructor"]()
            x1, x2 = (x.to(dtype).requires_grad_() for x in test["input_fn"]())
            samples.append((dict(margin=module.margin, reduction=module.reduction), x1, x2,
                            test["target_fn"]().to(dtype)))
    return samples


def check_module_samples(ours_cls, theirs_cls, samples):
    """Our Module against torch's on (constructor kwargs, *forward arguments) samples: loss and every gradient."""
    for kwargs, *inputs in samples:
        got = forward_backward(ours_cls(**kwargs), inputs)
        want = forward_backward(theirs_cls(**kwargs), leaf_copies(inputs))
        assert_close(got, want)


def _criterion_test_samples(class_name, dtype):
    from torch.testing._internal.common_nn import criterion_tests

    samples = []
    torch.manual_seed(0)
    for test in criterion_tests:
        if not test["fullname"].startswith(class_name + "_"):
            continue
        module = test["constructor"]()
        options = ("margin", "log_input", "full", "eps")
        kwargs = {"reduction": module.reduction, **{k: getattr(module, k) for k in options if hasattr(module, k)}}
        make_input = test.get("input_fn") or (lambda size=test.get("input_size"): torch.randn(size))
        make_target = test.get("target_fn") or (lambda size=test.get("target_size"): torch.randn(size))
        samples.append((kwargs, [make_input().to(dtype).requires_grad_(), make_target().to(dtype)]))
    return samples


def torch_module_params(class_name, backends=("cpp", "triton", "reference")):
    """pytest params (backend, source, dtype, index) for torch's own test inputs of torch.nn.<class_name>: the
    module_db samples (common_modules) and the common_nn.criterion_tests entries, float64 and float32."""
    params = []
    for source, make in (("module_db", _module_db_samples), ("criterion_tests", _criterion_test_samples)):
        for dtype in (torch.float64, torch.float32):
            for index in range(len(make(class_name, dtype))):
                params += [pytest.param(b, source, dtype, index, id=f"{b}-{source}-{str(dtype)[6:]}-{index}")
                           for b in backends]
    return params


def check_torch_module_sample(ours_cls, class_name, source, dtype, index, target_grad=False, expected=None):
    """lossops.nn.<class_name> against torch.nn.<class_name> on one of torch's samples: the loss and the gradients
    of the input (and of a floating target, where target_grad). expected(input, target, **kwargs) -> (loss,
    gradients) replaces torch's Module where lossops differs from it on purpose."""
    make = _module_db_samples if source == "module_db" else _criterion_test_samples
    kwargs, args = make(class_name, dtype)[index]
    input, target = args[0], args[1]
    target = target.detach().requires_grad_(target_grad and target.is_floating_point())
    got = forward_backward(ours_cls(**kwargs), [input, target])
    if expected is None:
        want = forward_backward(getattr(torch.nn, class_name)(**kwargs), leaf_copies([input, target]))
    else:
        want = expected(input, target, **kwargs)
    assert_close(got, want, equal_nan=True)
