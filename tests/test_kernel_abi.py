"""The kernel ABI is checked, not trusted: every family's kernel takes the same named parameters on both backends.

A family declares its kernel's parameters once (lossops._family.Kernel); the C++ library registers its own
list (LOSSOPS_REGISTER_KERNEL) and the Triton module defines a function. A count, order or name mismatch
fails here, and at run time a call with a missing or extra keyword is refused by name.
"""
import importlib
import inspect

import pytest
import torch

import lossops
from lossops import _cpp
from lossops._family import FAMILIES, KERNELS as DECLARED

# Every family's kernel, and the helpers' (the vocabulary-parallel shard kernels) declared the same way.
KERNELS = sorted({(k.name, k.module, k.parameters) for k in DECLARED.values()})
assert {f.kernel.name for f in FAMILIES.values()} <= {k[0] for k in KERNELS}
IDS = [k[0] for k in KERNELS]


@pytest.mark.parametrize("name, module, parameters", KERNELS, ids=IDS)
def test_cpp_registers_the_declared_parameters(name, module, parameters):
    assert tuple(_cpp.module().kernel_parameters(name)) == parameters


@pytest.mark.parametrize("name, module, parameters", KERNELS, ids=IDS)
def test_triton_function_takes_the_declared_parameters(name, module, parameters):
    fn = getattr(importlib.import_module(f"lossops.triton_kernels.{module}"), name)
    assert tuple(inspect.signature(fn).parameters) == parameters


def test_every_registered_cpp_kernel_belongs_to_a_family():
    assert set(_cpp.module().kernel_names()) == {k[0] for k in KERNELS}


def _regression_arguments(**changes):
    x = torch.randn(4, 3)
    arguments = dict(input=x, target=torch.randn(4, 3), weight=None, weight_layout=[1, 1], aux=None,
                     aux_layout=[1, 1], ignore_index=-100, grad_input=None, grad_target=None,
                     grad_scale=torch.tensor(1.0), per_element=False, kind=1, beta=0.0)
    arguments.update(changes)
    return arguments


def test_cpp_call_refuses_missing_extra_and_mistyped_arguments():
    host = _cpp.module()
    arguments = _regression_arguments()
    _, total = host.call_kernel("regression", **arguments)
    expected = torch.nn.functional.mse_loss(arguments["input"], arguments["target"], reduction="sum")
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    arguments = _regression_arguments()
    del arguments["beta"]
    with pytest.raises(RuntimeError, match="without its argument beta"):
        host.call_kernel("regression", **arguments)
    with pytest.raises(RuntimeError, match="takes 13 arguments"):
        host.call_kernel("regression", **_regression_arguments(delta=1.0))
    with pytest.raises(RuntimeError, match="argument per_element must be a bool"):
        host.call_kernel("regression", **_regression_arguments(per_element=1.5))
    with pytest.raises(RuntimeError, match="no kernel nonexistent"):
        host.call_kernel("nonexistent")


def test_cpp_and_triton_agree_through_named_arguments():
    """Same named call, same numbers (the Triton function runs under the interpreter on CPU tensors)."""
    triton_regression = importlib.import_module("lossops.triton_kernels.regression").regression
    arguments = _regression_arguments(kind=2, beta=0.5, per_element=True)
    ours = _cpp.module().call_kernel("regression", **arguments)
    theirs = triton_regression(**arguments)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(ours[1], theirs[1])
    with pytest.raises(TypeError):
        triton_regression(**_regression_arguments(delta=1.0))


def test_family_ops_are_traced_under_their_own_names():
    for name, family in FAMILIES.items():
        assert family.op._qualname == f"lossops::{name}"
        assert getattr(lossops, name) is family.function
