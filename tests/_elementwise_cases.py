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
