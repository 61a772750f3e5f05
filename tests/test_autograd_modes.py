"""A differential harness over every loss family x backend x option set, in the autograd modes users have.

Each case is one call (the families' own declared cases, plus the option sets below) in float64. Every float
tensor among its arguments is a possible differentiable input. The modes, each compared with what must hold:
  - forward AD (torch.func.jvp, forward_ad.make_dual, jacfwd): the tangent is J v, with J assembled from the
    backend's ordinary backward (so a zero or missing tangent, or a wrong backward, fails);
  - torch.func.grad, vmap, hessian: grad equals the ordinary backward's gradient, vmap equals a loop, the
    hessian is finite and symmetric;
  - gradcheck in float64 of every float input at once (weights and targets included);
  - a hook that scales its gradient in place, with retain_graph: the second backward is the first's;
  - non-finite class weights of a class no target has, all-ignored batches, expanded and overlapping logits:
    torch's result where torch defines it, lossops' one rule otherwise.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import lossops
from lossops._family import FAMILIES

BACKENDS = ("cpp", "triton", "reference")


@dataclasses.dataclass(frozen=True)
class Call:
    """fn(*args, **kwargs) with args/kwargs rebuilt around the float tensors, which become the inputs."""
    id: str
    fn: Callable
    make: Callable[[], tuple[list, dict]]
    # positions (ints) or keyword names of the float tensors that are differentiated; None: every float tensor
    wrt: Optional[tuple] = None
    prepare: Callable = staticmethod(lambda name, t: t)  # e.g. log_softmax for CTC's log_probs

    def inputs(self):
        args, kwargs = self.make()
        slots = [i for i, a in enumerate(args) if _float(a)] + [k for k, v in kwargs.items() if _float(v)]
        if self.wrt is not None:
            slots = [s for s in slots if s in self.wrt]
        values = [args[s] if isinstance(s, int) else kwargs[s] for s in slots]
        return args, kwargs, slots, values

    def function(self):
        """(f(*differentiable tensors) -> loss, the tensors)."""
        args, kwargs, slots, values = self.inputs()

        def f(*tensors):
            a, k = list(args), dict(kwargs)
            for slot, t in zip(slots, tensors):
                t = self.prepare(slot, t)
                if isinstance(slot, int):
                    a[slot] = t
                else:
                    k[slot] = t
            return self.fn(*a, **k)
        return f, values


def _float(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _declared_calls():
    calls = []
    for name, family in FAMILIES.items():
        for index, case in enumerate(family.cases):
            def make(case=case):
                torch.manual_seed(0)
                return case.make(torch.float64), dict(case.kwargs)
            prepare = staticmethod(lambda slot, t: t.log_softmax(-1) if slot == 0 else t) if name == "ctc_loss" \
                else staticmethod(lambda slot, t: t)
            # torch differentiates no class weight with class-index targets (nll_loss refuses it), nor CTC's
            # anything but log_probs, nor the margin and cosine embedding losses' target signs
            index_targets = any(isinstance(a, torch.Tensor) and not a.is_floating_point() for a in make()[0])
            input_only = name in ("ctc_loss", "soft_margin_loss", "hinge_embedding_loss")
            wrt = (0,) if input_only or (name in ("cross_entropy", "nll_loss", "multi_margin_loss")
                                         and index_targets) else None
            if name == "cosine_embedding_loss":  # its target only selects a formula
                wrt = (0, 1)
            calls.append(Call(f"{name}-{index}", getattr(lossops, name), make, wrt=wrt, prepare=prepare))
    return calls


def _d(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _seeded(make):
    def seeded():
        torch.manual_seed(1)
        return make()
    return seeded


T_IDX = torch.tensor([0, 4, -100, 2, 2, 1])
EXTRA_CALLS = [
    Call("ce-weight-smoothing", lossops.cross_entropy,
         _seeded(lambda: ([_d(6, 5), T_IDX, torch.rand(5, dtype=torch.float64) + 0.5], dict(label_smoothing=0.2))),
         wrt=(0,)),
    Call("ce-zloss-weight-mean", lossops.cross_entropy,
         _seeded(lambda: ([_d(6, 5), T_IDX, torch.rand(5, dtype=torch.float64) + 0.5], dict(lse_square_scale=0.1))),
         wrt=(0,)),
    Call("ce-token-options", lossops.cross_entropy,
         _seeded(lambda: ([_d(6, 5), T_IDX], dict(temperature=1.7, softcap=3.0,
                                                  token_weight=torch.rand(6, dtype=torch.float64))))),
    Call("ce-probabilities-weight", lossops.cross_entropy,
         _seeded(lambda: ([_d(6, 5), _d(6, 5).softmax(1), torch.rand(5, dtype=torch.float64) + 0.5], {}))),
    Call("ce-class-dim-1-none", lossops.cross_entropy,
         _seeded(lambda: ([_d(2, 5, 3), torch.tensor([[0, 4, -100], [2, 2, 1]])], dict(reduction="none")))),
    Call("softmax-focal-alpha-tensor", lossops.softmax_focal_loss,
         _seeded(lambda: ([_d(6, 5), T_IDX], dict(alpha=torch.rand(5, dtype=torch.float64), gamma=0.5)))),
    Call("sigmoid-focal-alpha-above-1", lossops.sigmoid_focal_loss,
         _seeded(lambda: ([_d(6, 5), torch.randint(0, 2, (6, 5)).double()], dict(alpha=1.5, reduction="sum")))),
    Call("bce-weight-pos-weight", lossops.binary_cross_entropy_with_logits,
         _seeded(lambda: ([_d(6, 5), torch.rand(6, 5, dtype=torch.float64)],
                          dict(weight=torch.rand(5, dtype=torch.float64),
                               pos_weight=torch.rand(5, dtype=torch.float64) + 0.5))),
         wrt=(0, 1)),  # torch differentiates neither BCE weight
    Call("mse-weight-mean", lossops.mse_loss,
         _seeded(lambda: ([_d(4, 5), _d(4, 5)], dict(weight=torch.rand(4, 5, dtype=torch.float64) + 0.1)))),
    Call("l1-weight-broadcast", lossops.l1_loss,
         _seeded(lambda: ([_d(4, 5), _d(4, 5)], dict(weight=torch.rand(5, dtype=torch.float64) + 0.1)))),
    Call("huber-none", lossops.huber_loss, _seeded(lambda: ([_d(4, 5), _d(4, 5)], dict(reduction="none", delta=0.7)))),
    Call("linear-ce-options", lossops.linear_cross_entropy,
         _seeded(lambda: ([_d(6, 8), _d(11, 8), torch.tensor([0, 10, -100, 3, 3, 7])],
                          dict(linear_bias=_d(11), label_smoothing=0.1, lse_square_scale=0.01, chunk_size=4)))),
]
CALLS = _declared_calls() + EXTRA_CALLS
IDS = [c.id for c in CALLS]


@pytest.fixture(params=BACKENDS)
def on_backend(request):
    with lossops.backend(request.param):
        yield request.param


def _kernel_jacobian(f, values):
    """The Jacobian of f's (flattened) output with respect to each input, from ordinary backward passes."""
    leaves = [v.detach().requires_grad_() for v in values]
    out = f(*leaves).reshape(-1)
    rows = [torch.autograd.grad(out[i], leaves, retain_graph=True, allow_unused=True) for i in range(out.numel())]
    return out.detach(), [torch.stack([torch.zeros_like(leaves[j]) if r[j] is None else r[j] for r in rows])
                          for j in range(len(leaves))]


def _jv(jacobians, tangents):
    return sum((j.reshape(j.shape[0], -1) @ v.reshape(-1)) for j, v in zip(jacobians, tangents))


def _ctc_forward_ad_unsupported(call: Call) -> bool:
    # torch's ctc_loss has no forward-mode formula: the reference path raises torch's NotImplementedError.
    return call.id.startswith("ctc_loss")


@pytest.mark.parametrize("call", CALLS, ids=IDS)
def test_forward_ad_gives_the_jacobian_vector_product(call, on_backend):
    f, values = call.function()
    tangents = [torch.randn_like(v) for v in values]
    if _ctc_forward_ad_unsupported(call):
        with pytest.raises((NotImplementedError, RuntimeError)):
            torch.func.jvp(f, tuple(values), tuple(tangents))
        return
    out, jacobians = _kernel_jacobian(f, values)
    expected = _jv(jacobians, tangents)
    primal, tangent = torch.func.jvp(f, tuple(values), tuple(tangents))
    torch.testing.assert_close(primal.reshape(-1), out, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(tangent.reshape(-1), expected, rtol=1e-7, atol=1e-10)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(v, t) for v, t in zip(values, tangents)]
        dual_tangent = fwAD.unpack_dual(f(*duals)).tangent
    assert dual_tangent is not None, "forward_ad: the loss has no tangent"
    torch.testing.assert_close(dual_tangent.reshape(-1), expected, rtol=1e-7, atol=1e-10)
    first = torch.func.jacfwd(lambda x: f(x, *values[1:]))(values[0])
    torch.testing.assert_close(first.reshape(out.numel(), -1), jacobians[0].reshape(out.numel(), -1),
                               rtol=1e-7, atol=1e-10)


def _scalar(f):
    return lambda *t: f(*t).sum()


@pytest.mark.parametrize("call", CALLS, ids=IDS)
def test_functorch_grad_vmap_and_hessian(call, on_backend):
    f, values = call.function()
    leaves = [v.detach().requires_grad_() for v in values]
    expected = torch.autograd.grad(f(*leaves).sum(), leaves[0])[0]
    got = torch.func.grad(_scalar(f))(*values)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    batch = torch.stack([values[0], values[0] * 0.5 + 0.1])
    looped = torch.stack([f(b, *values[1:]) for b in batch])
    torch.testing.assert_close(torch.func.vmap(lambda b: f(b, *values[1:]))(batch), looped, rtol=1e-9, atol=1e-12)
    if call.id.startswith("ctc_loss"):
        return  # torch's ctc_loss has no double backward
    hessian = torch.func.hessian(lambda x: _scalar(f)(x, *values[1:]))(values[0])
    flat = hessian.reshape(values[0].numel(), -1)
    assert torch.isfinite(flat).all()
    torch.testing.assert_close(flat, flat.T, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("call", CALLS, ids=IDS)
def test_gradcheck_every_float_input(call, on_backend):
    f, values = call.function()
    leaves = [v.detach().requires_grad_() for v in values]
    # Triton's interpreter runs a kernel in about a millisecond, and the reference backend's gradients are torch's
    # own autograd through plain formulas: their gradchecks project the Jacobian onto random vectors (fast_mode)
    # instead of differencing every element. The C++ kernels' analytic gradients get the full check.
    fast = on_backend != "cpp"
    assert torch.autograd.gradcheck(f, leaves, atol=1e-6, rtol=1e-5, fast_mode=fast)
    if len(leaves) > 1:  # the kernels' own path: only the model output requires grad
        assert torch.autograd.gradcheck(lambda x: f(x, *values[1:]), (leaves[0],), atol=1e-6, rtol=1e-5,
                                        fast_mode=fast)


@pytest.mark.parametrize("call", CALLS, ids=IDS)
def test_in_place_hook_and_retained_graph(call, on_backend):
    f, values = call.function()
    x = values[0].detach().requires_grad_()
    h = x * 1
    h.register_hook(lambda g: g.mul_(2))
    loss = f(h, *values[1:]).sum()
    first = torch.autograd.grad(loss, x, retain_graph=True)[0].clone()
    second = torch.autograd.grad(loss, x, retain_graph=True)[0]
    third = torch.autograd.grad(loss * 3, x)[0]
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(third, first * 3, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------------------------
# Class-index families: non-finite weights of absent classes, and batches where every target is ignored.

def _class_index_calls():
    x = torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([1, 2, 3, 1, 2])  # class 0 never occurs

    def linear_ce(logits, t, **kw):
        # logits = hidden @ eye: the linear variant sees exactly these logits
        return lossops.linear_cross_entropy(logits, torch.eye(logits.shape[1], dtype=logits.dtype), t, **kw)

    return x, target, {"cross_entropy": lossops.cross_entropy, "linear_cross_entropy": linear_ce,
                       "softmax_focal_loss(gamma=0)": lambda z, t, weight=None, **kw: lossops.softmax_focal_loss(
                           z, t, alpha=weight, gamma=0.0, **kw)}


OPTION_SETS = [dict(), dict(label_smoothing=0.1), dict(lse_square_scale=0.01), dict(token_weight=True),
               dict(lse_square_scale=0.01, token_weight=True, label_smoothing=0.1)]


def _options(name, options, rows):
    if name.startswith("softmax_focal") and set(options) - {"reduction"}:
        return None
    out = dict(options)
    if out.pop("token_weight", False):
        out["token_weight"] = torch.rand(rows, dtype=torch.float64) + 0.1
    return out


@pytest.mark.parametrize("nonfinite", [float("inf"), float("nan")])
@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy", "softmax_focal_loss(gamma=0)"])
def test_nonfinite_weight_of_an_absent_class(name, nonfinite, on_backend):
    x, target, ops = _class_index_calls()
    weight = torch.tensor([nonfinite, 1.0, 2.0, 0.5], dtype=torch.float64)
    z = x.clone().requires_grad_()
    loss = ops[name](z, target, weight=weight)
    loss.backward()
    zt = x.clone().requires_grad_()
    expected = F.cross_entropy(zt, target, weight=weight)
    expected.backward()
    assert torch.isfinite(z.grad).all(), z.grad
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(z.grad, zt.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy", "softmax_focal_loss(gamma=0)"])
def test_all_ignored_mean_is_nan_with_zero_gradient(name, weighted, options, on_backend):
    x, _, ops = _class_index_calls()
    kwargs = _options(name, options, x.shape[0])
    if kwargs is None:
        pytest.skip("softmax focal loss has none of these options")
    target = torch.full((x.shape[0],), -100)
    z = x.clone().requires_grad_()
    weight = torch.rand(x.shape[1], dtype=torch.float64) + 0.5 if weighted else None
    loss = ops[name](z, target, weight=weight, **kwargs)
    loss.backward()
    assert torch.isnan(loss), loss
    assert torch.equal(z.grad, torch.zeros_like(z.grad)), z.grad
    zt = x.clone().requires_grad_()  # torch agrees where it has the call
    F.cross_entropy(zt, target, weight=weight).backward()
    assert torch.equal(zt.grad, z.grad)


# ------------------------------------------------------------------------------------------------------------
# Layouts whose elements share memory.

def test_expanded_logits_out_of_place_match_torch(on_backend):
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 0])
    loss = lossops.cross_entropy((b * 1).expand(5, 4), target)
    (grad,) = torch.autograd.grad(loss, b)
    expected = torch.autograd.grad(F.cross_entropy((b * 1).expand(5, 4), target), b)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("view", ["expand", "overlapping"])
def test_inplace_backward_refuses_memory_that_elements_share(view, on_backend):
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    x = (b * 1).expand(5, 4) if view == "expand" else (b * 1).repeat(3).as_strided((5, 4), (2, 1))
    with pytest.raises(RuntimeError, match="inplace_backward=True needs logits whose elements"):
        lossops.cross_entropy(x, torch.tensor([0, 1, 2, 3, 0]), inplace_backward=True)


def test_inplace_backward_serves_sliced_and_transposed_views(on_backend):
    base = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    for view in (lambda t: (t * 1)[:, :5], lambda t: (t.T * 1).T[:, 2:]):
        grad = torch.autograd.grad(lossops.cross_entropy(view(base), target, inplace_backward=True), base)[0]
        expected = torch.autograd.grad(F.cross_entropy(view(base), target), base)[0]
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)


def test_inplace_backward_refuses_a_leaf_on_every_backend(on_backend):
    with pytest.raises(RuntimeError, match="would overwrite a leaf"):
        lossops.cross_entropy(torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2]), inplace_backward=True)
