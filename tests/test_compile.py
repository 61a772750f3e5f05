"""Every lossops op as a first-class PyTorch 2 citizen: torch.library.opcheck, torch.compile with
no graph break and eager's values/gradients/errors, and torch.autocast.

OPS is the table, made from the cases each loss family declares (its inputs, keyword arguments, torch
counterpart and the bad arguments it must reject): test_every_public_op_is_in_the_table fails for an
exported function without one.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Callable, Optional

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

import lossops
from lossops._family import FAMILIES
from _cases import leaf_copies, run_python


# --- bad arguments: (args, kwargs) -> (args, kwargs) ---------------------------------------------------------------

def _with(**kwargs):
    def bad(op, args):
        return args, dict(op.kwargs, **kwargs)
    bad.__name__ = "-".join(f"{k}={v}" for k, v in kwargs.items())
    return bad


def _short_target(op, args):
    args = list(args)
    args[op.target] = args[op.target][:-1]
    return args, op.kwargs


def _target_out_of_range(op, args):
    args = list(args)
    args[op.target] = args[op.target].clone().fill_(99)
    return args, op.kwargs


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    make: Callable[[torch.dtype], list]
    kwargs: dict = dataclasses.field(default_factory=dict)
    torch_fn: Optional[Callable] = None  # torch's own function with the same signature, when there is one
    bad: tuple = ()  # op-specific bad arguments, besides an unknown reduction and a target of the wrong shape
    target: int = 1  # position of the target among the inputs
    link: Optional[Callable] = None  # the model's output -> the first argument (torch.sigmoid for probabilities)

    def __call__(self, *args, **kwargs):
        return getattr(lossops, self.name)(*args, **(self.kwargs if not kwargs else kwargs))

    def linked(self, output):
        return output if self.link is None else self.link(output)

    @property
    def id(self):
        return self.name + "".join(f"-{k}={v}" for k, v in self.kwargs.items())


_BAD = {"target_out_of_range": _target_out_of_range}


def _bad(spec):
    return _with(**spec) if isinstance(spec, dict) else _BAD[spec]


# Every registered loss family's declared cases.
OPS = [Op(name, case.make, case.kwargs, case.torch_fn, bad=tuple(map(_bad, case.bad)), target=case.target,
          link=case.link)
       for name, family in FAMILIES.items() for case in family.cases]
OP_PARAMS = [pytest.param(op, id=op.id) for op in OPS]
BAD_PARAMS = [pytest.param(op, bad, id=f"{op.id}-{bad.__name__}")
              for op in OPS for bad in (_with(reduction="bogus"), _short_target, *op.bad)]


def test_every_public_op_is_in_the_table():
    functions = {name for name in lossops.__all__ if inspect.isfunction(getattr(lossops, name))}
    assert functions - set(lossops.SETTINGS) == {op.name for op in OPS}


class _LossopsCalls(TorchDispatchMode):
    """Records the lossops custom-op calls a Python entry point makes."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "lossops":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _requiring_grad(args):
    return [args[0].requires_grad_(), *args[1:]]


def _model_for(inputs, seed=0):
    """A small layer in front of the loss so compile sees a real graph: acts on the first input's last dim."""
    torch.manual_seed(seed)
    return torch.nn.Linear(inputs[0].shape[-1], inputs[0].shape[-1])


def _loss_and_grads(fn, model, inputs):
    model.zero_grad()
    x = inputs[0].detach().requires_grad_()
    loss = fn(model, x, *inputs[1:])
    loss.backward(torch.ones_like(loss) if loss.dim() == 0 else torch.linspace(-1, 2, loss.numel()).view_as(loss))
    return loss.detach(), [x.grad, *(p.grad.clone() for p in model.parameters())]


def _through_model(op):
    return lambda model, x, *rest: op(op.linked(model(x)), *rest)


@pytest.mark.parametrize("op", OP_PARAMS)
def test_opcheck(kernel_backend, op):
    recorder = _LossopsCalls()
    with recorder:
        op(*_requiring_grad(op.make(torch.float32)))
    assert recorder.calls, f"lossops.{op.name} reached no lossops custom op"
    for func, args, kwargs in recorder.calls:
        torch.library.opcheck(func, leaf_copies(args), kwargs)


@pytest.mark.parametrize("op", OP_PARAMS)
def test_compiled_fullgraph_matches_eager(op):
    """aot_eager: Dynamo (graph breaks, fake impls) and AOTAutograd (registered backward), without codegen."""
    torch._dynamo.reset()
    inputs = op.make(torch.float32)
    model = _model_for(inputs)
    step = _through_model(op)
    eager = _loss_and_grads(step, model, inputs)
    compiled = _loss_and_grads(torch.compile(step, fullgraph=True, backend="aot_eager"), model, inputs)
    assert_close(compiled, eager)


def test_inductor_all_ops_in_one_graph():
    """Inductor (default mode) around every op at once, one compile: values, gradients, and the kernels'
    value checks still running inside the compiled graph."""
    torch._dynamo.reset()
    all_inputs = [op.make(torch.float32) for op in OPS]
    models = torch.nn.ModuleList(_model_for(inputs, seed=i) for i, inputs in enumerate(all_inputs))

    def step(models, *flat_inputs):
        losses, start = [], 0
        for op, model, inputs in zip(OPS, models, all_inputs):
            args = flat_inputs[start:start + len(inputs)]
            start += len(inputs)
            losses.append(op(op.linked(model(args[0])), *args[1:]).sum())
        return torch.stack(losses)

    def run(fn, all_inputs):
        models.zero_grad()
        flat = [t.detach().requires_grad_(i == 0) if isinstance(t, torch.Tensor) else t  # numbers: p, margin
                for inputs in all_inputs for i, t in enumerate(inputs)]
        losses = fn(models, *flat)
        losses.backward(torch.arange(1.0, len(OPS) + 1))
        return losses.detach(), [p.grad.clone() for p in models.parameters()]

    compiled = torch.compile(step, fullgraph=True)
    assert_close(run(compiled, all_inputs), run(step, all_inputs))

    ce = next(i for i, op in enumerate(OPS) if op.name == "cross_entropy" and op.target == 1)
    bad_inputs = list(all_inputs)
    bad_inputs[ce] = _target_out_of_range(OPS[ce], all_inputs[ce])[0]
    with pytest.raises(IndexError) as eager_error:
        run(step, bad_inputs)
    with pytest.raises(IndexError, match=re.escape(str(eager_error.value))):
        run(compiled, bad_inputs)


def test_backend_choice_carries_the_mark_torchs_constant_decorator_sets():
    """lossops._backend marks `resolve` for Dynamo without importing it; the mark must be the one
    torch.compiler.assume_constant_result sets, or Dynamo would trace the backend choice (a ContextVar read)."""
    from lossops import _backend

    def probe():
        return 0
    marks = dict(vars(torch.compiler.assume_constant_result(probe)))
    assert marks, "torch's decorator no longer marks the function: see lossops._backend._constant_under_compile"
    assert {name: getattr(_backend.resolve, name, None) for name in marks} == marks


def test_import_leaves_dynamo_unimported():
    # Dynamo's import costs more than lossops' own; a compiled call imports it when it needs it.
    code = "import sys, lossops; assert 'torch._dynamo' not in sys.modules, 'imported torch._dynamo'"
    result = run_python(code, {})
    assert result.returncode == 0, result.stderr


def test_max_autotune_no_cudagraphs():
    torch._dynamo.reset()
    op = OPS[0]
    inputs = op.make(torch.float32)
    model = _model_for(inputs)
    step = _through_model(op)
    compiled = torch.compile(step, fullgraph=True, mode="max-autotune-no-cudagraphs")
    assert_close(_loss_and_grads(compiled, model, inputs), _loss_and_grads(step, model, inputs))


@pytest.mark.parametrize("op, bad", BAD_PARAMS)
def test_bad_arguments_same_error_when_compiled(op, bad):
    args, kwargs = bad(op, op.make(torch.float32))
    with pytest.raises(Exception) as eager:
        op(*args, **kwargs)
    assert isinstance(eager.value, (ValueError, RuntimeError, IndexError, TypeError))
    message = str(eager.value)
    # An error raised by a torch op (e.g. broadcasting) reaches the user the way Dynamo reports torch's own
    # losses' errors (from its fake-tensor run, in its own words); the errors lossops raises must arrive as is.
    from_torch = "/torch/" in str(eager.traceback[-1].path)

    def call(*args):
        return op(*args, **kwargs)

    torch._dynamo.reset()
    with pytest.raises(type(eager.value)) as compiled:
        torch.compile(call, backend="aot_eager")(*args)
    if from_torch:
        assert isinstance(compiled.value, torch._dynamo.exc.TorchRuntimeError)
        return
    assert str(compiled.value) == message
    # fullgraph=True: Dynamo wraps an exception raised while tracing, but it must still say what ours says.
    torch._dynamo.reset()
    with pytest.raises(Exception) as fullgraph:
        torch.compile(call, fullgraph=True, backend="aot_eager")(*args)
    assert message in str(fullgraph.value)


@pytest.mark.parametrize("op", OP_PARAMS)
def test_autocast_bf16(op):
    """Under autocast the op takes the model's bf16 output as is (no float32 copy reaches the kernel),
    returns the loss in torch's autocast dtype for it, and gives a bf16 gradient."""
    inputs = op.make(torch.float32)
    model = _model_for(inputs)
    seen, produced = _LossopsCalls(), {}

    def step(model, x, *rest):
        produced["logits"] = model(x)
        produced["logits"].retain_grad()
        first = op.linked(produced["logits"])
        with seen:
            return op(first, *rest)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(step, model, inputs)
    assert produced["logits"].dtype == torch.bfloat16
    assert produced["logits"].grad.dtype == torch.bfloat16
    assert seen.calls and seen.calls[0][1][0].dtype == torch.bfloat16, "the kernel got an upcast copy"
    if op.torch_fn is None:
        assert loss.dtype == torch.float32  # torch's autocast policy for every loss it has
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_loss, expected_grads = _loss_and_grads(
            lambda model, x, *rest: op.torch_fn(op.linked(model(x)), *rest, **op.kwargs), model, inputs)
    assert loss.dtype == expected_loss.dtype
    assert_close(loss, expected_loss, rtol=1e-4, atol=1e-5)
    assert_close(grads, expected_grads, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
def test_export_records_the_custom_op(strict):
    """torch.export, strict (Dynamo) or not (the function run for real under a mode), records lossops' op rather
    than the C++ eager route's result."""
    class Loss(torch.nn.Module):
        def forward(self, x, target):
            return lossops.cross_entropy(x, target) + lossops.nll_loss(x.log_softmax(1), target)

    x, target = torch.randn(4, 5), torch.randint(0, 5, (4,))
    program = torch.export.export(Loss(), (x, target), strict=strict)
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert any("lossops.cross_entropy" in t for t in targets), targets
    assert any("lossops.nll_loss" in t for t in targets), targets
    assert torch.allclose(program.module()(x, target), Loss()(x, target))
