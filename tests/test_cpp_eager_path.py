"""The C++ eager path (csrc/eager_path.cpp): taken for plain CPU tensors in eager mode, and identical to the
custom op in values, gradients and autograd behaviour. The rest of the suite runs through it as well (every
cpp-backend test of an eligible call); here it is compared with the custom op bit for bit."""
import contextlib

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import lossops
from lossops import _eager
from _cases import without_eager_routes

CE_NODE, ELEMENTWISE_NODE = "LossopsCrossEntropyBackward", "LossopsElementwiseBackward"
FOCAL_NODE = "LossopsSoftmaxFocalLossBackward"


def force_custom_op(m):
    """Neither the C++ eager path nor the op body without the custom op (LossopsEager)."""
    without_eager_routes(m)
    m.setattr(_eager, "_no_mode_active", lambda: False)


@contextlib.contextmanager
def custom_op_only(monkeypatch):
    with monkeypatch.context() as m:
        force_custom_op(m)
        yield


def run(fn, make_inputs, grad_output=None):
    tensors = make_inputs()
    loss = fn(*tensors)
    grads = ()
    differentiable = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    if differentiable:
        g = torch.ones_like(loss) if grad_output is None else grad_output
        grads = torch.autograd.grad(loss, differentiable, g)
    return loss, grads, loss.grad_fn


def assert_same_as_custom_op(monkeypatch, fn, make_inputs, node, grad_output=None, taken=True):
    loss, grads, grad_fn = run(fn, make_inputs, grad_output)
    assert grad_fn is None or (grad_fn.name() == node) == taken
    with custom_op_only(monkeypatch):
        ref_loss, ref_grads, ref_fn = run(fn, make_inputs, grad_output)
    assert ref_fn is None or ref_fn.name() != node
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0, equal_nan=True)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=0, atol=0, equal_nan=True)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SHAPES = [(32, 10), (10,), (4, 5, 3, 2), (7, 300)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"weighted": True}, {"ignore_index": 1}, {"label_smoothing": 0.2},
                                     {"weighted": True, "ignore_index": 2, "label_smoothing": 0.1}])
def test_cross_entropy_matches_custom_op(monkeypatch, dtype, shape, reduction, options):
    gen = torch.Generator().manual_seed(0)
    C = shape[1] if len(shape) > 1 else shape[0]
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    weight = torch.rand(C, generator=gen).to(dtype) if options.get("weighted") else None
    x0 = torch.randn(shape, generator=gen).to(dtype)
    target = torch.randint(0, C, target_shape, generator=gen)
    kwargs = dict(reduction=reduction, ignore_index=options.get("ignore_index", -100),
                  label_smoothing=options.get("label_smoothing", 0.0))
    grad_output = torch.rand(target_shape, generator=gen).to(dtype) if reduction == "none" else None

    def make_inputs():
        return x0.clone().requires_grad_(), target, weight

    assert_same_as_custom_op(monkeypatch, lambda x, t, w: lossops.cross_entropy(x, t, w, **kwargs), make_inputs,
                             CE_NODE, grad_output)
    with torch.no_grad():
        assert_same_as_custom_op(monkeypatch, lambda x, t, w: lossops.cross_entropy(x, t, w, **kwargs),
                                 lambda: (x0, target, weight), CE_NODE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha", [None, 0.3, "per_class"])
@pytest.mark.parametrize("options", [{"gamma": 2.0}, {"gamma": 0.0}, {"gamma": 0.5, "ignore_index": 1}])
def test_softmax_focal_matches_custom_op(monkeypatch, dtype, shape, reduction, alpha, options):
    gen = torch.Generator().manual_seed(1)
    C = shape[1] if len(shape) > 1 else shape[0]
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    alpha_value = torch.rand(C, generator=gen).to(dtype) if alpha == "per_class" else alpha
    x0 = torch.randn(shape, generator=gen).to(dtype)
    target = torch.randint(0, C, target_shape, generator=gen)
    kwargs = dict(reduction=reduction, gamma=options["gamma"], ignore_index=options.get("ignore_index", -100))
    grad_output = torch.rand(target_shape, generator=gen).to(dtype) if reduction == "none" else None

    def loss(x, t):
        return lossops.softmax_focal_loss(x, t, alpha=alpha_value, **kwargs)

    assert_same_as_custom_op(monkeypatch, loss, lambda: (x0.clone().requires_grad_(), target), FOCAL_NODE,
                             grad_output)
    with torch.no_grad():
        assert_same_as_custom_op(monkeypatch, loss, lambda: (x0, target), FOCAL_NODE)


@pytest.mark.parametrize("call", [
    lambda x, t: lossops.softmax_focal_loss(x, t, gamma=-1.0),
    lambda x, t: lossops.softmax_focal_loss(x, t, alpha=-0.5),
    lambda x, t: lossops.softmax_focal_loss(x, t, gamma=float("inf")),
    lambda x, t: lossops.softmax_focal_loss(x, t, reduction="avg"),
    lambda x, t: lossops.softmax_focal_loss(x, t.clamp(max=3) + 7),
], ids=["negative-gamma", "negative-alpha", "inf-gamma", "bad-reduction", "target-out-of-range"])
def test_softmax_focal_bad_arguments_raise_from_the_python_checks(call):
    x = torch.randn(6, 5, requires_grad=True)
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        call(x, torch.randint(0, 5, (6,)))


ELEMENTWISE = {
    "mse_loss": (lossops.mse_loss, True),
    "l1_loss": (lossops.l1_loss, True),
    "smooth_l1_loss": (lambda x, t, reduction: lossops.smooth_l1_loss(x, t, reduction=reduction, beta=0.5), True),
    "huber_loss": (lambda x, t, reduction: lossops.huber_loss(x, t, reduction=reduction, delta=0.7), True),
    "binary_cross_entropy_with_logits": (lossops.binary_cross_entropy_with_logits, True),
    "sigmoid_focal_loss": (lambda x, t, reduction: lossops.sigmoid_focal_loss(x, t, 0.3, 1.5, reduction), False),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_grad", [False, True])
def test_elementwise_matches_custom_op(monkeypatch, dtype, name, reduction, target_grad):
    fn, kernel_target_grad = ELEMENTWISE[name]
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 5, generator=gen).to(dtype)
    t0 = torch.rand(64, 5, generator=gen).to(dtype)
    grad_output = torch.rand(64, 5, generator=gen).to(dtype) if reduction == "none" else None

    def make_inputs():
        return x0.clone().requires_grad_(), t0.clone().requires_grad_(target_grad)

    # a target that needs a gradient the kernel does not compute goes to the reference, not this path
    assert_same_as_custom_op(monkeypatch, lambda x, t: fn(x, t, reduction=reduction), make_inputs, ELEMENTWISE_NODE,
                             grad_output, taken=kernel_target_grad or not target_grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"weighted": True, "ignore_index": 2, "label_smoothing": 0.1}])
def test_in_place_cross_entropy_matches_custom_op(monkeypatch, dtype, shape, reduction, options):
    """inplace_backward=True on the eager path: the custom op's loss and gradient bit for bit (grad_output != 1),
    the logits untouched until backward and holding the gradient after it."""
    gen = torch.Generator().manual_seed(1)
    C = shape[1] if len(shape) > 1 else shape[0]
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    weight = torch.rand(C, generator=gen).to(dtype) if options.get("weighted") else None
    x0 = (torch.randn(shape, generator=gen) * 3).to(dtype)
    target = torch.randint(0, C, target_shape, generator=gen)
    kwargs = dict(reduction=reduction, ignore_index=options.get("ignore_index", -100),
                  label_smoothing=options.get("label_smoothing", 0.0), inplace_backward=True)
    grad_output = (torch.rand(target_shape, generator=gen) if reduction == "none" else torch.tensor(0.75)).to(dtype)

    def step():
        base = x0.clone().requires_grad_()
        logits = base * 1  # a non-leaf the gradient may overwrite
        loss = lossops.cross_entropy(logits, target, weight, **kwargs)
        assert torch.equal(logits.detach(), x0)
        (grad,) = torch.autograd.grad(loss, base, grad_output)
        return loss.grad_fn.name(), loss, grad, logits.detach()

    name, loss, grad, after = step()
    assert name == CE_NODE
    with custom_op_only(monkeypatch):
        ref_name, ref_loss, ref_grad, ref_after = step()
    assert ref_name != CE_NODE
    for ours, ref in ((loss, ref_loss), (grad, ref_grad), (after, ref_after)):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(after, grad, rtol=0, atol=0, equal_nan=True)


def test_in_place_eager_path_errors_and_fallbacks():
    target = torch.tensor([0, 4, 1])
    logits = torch.randn(3, 5, requires_grad=True) * 1
    loss = lossops.cross_entropy(logits, target, inplace_backward=True)
    assert loss.grad_fn.name() == CE_NODE
    logits.detach().add_(1)  # the logits change before backward: the version check says so
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    loss = lossops.cross_entropy(torch.randn(3, 5, requires_grad=True) * 1, target, inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through this loss"):
        loss.backward()
    loss = lossops.cross_entropy(torch.randn(3, 5, requires_grad=True) * 1, target, inplace_backward=True)
    with pytest.raises(RuntimeError, match="double backward"):
        loss.backward(create_graph=True)
    with pytest.raises(RuntimeError, match="leaf"):  # refused by the Python checks, which the C++ path leaves it to
        lossops.cross_entropy(torch.randn(3, 5, requires_grad=True), target, inplace_backward=True)
    # A class slice is not dense: the Python route serves it.
    wide = torch.randn(3, 8, requires_grad=True) * 1
    assert lossops.cross_entropy(wide[:, :5], target, inplace_backward=True).grad_fn.name() != CE_NODE
    with torch.no_grad():  # nothing to write: the plain route
        assert lossops.cross_entropy(torch.randn(3, 5), target, inplace_backward=True).grad_fn is None


@pytest.mark.parametrize("changed", ["target", "weight"])
@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_in_place_backward_refuses_a_target_or_weight_changed_after_forward(monkeypatch, changed, path):
    """inplace_backward=True reads the target and weight again in backward, where forward's row state describes the
    ones it saw: changing either in between fails the version check, as torch's own saved tensors do, on both
    routes (a row ignored in forward saved no state to read)."""
    if path == "custom op":
        force_custom_op(monkeypatch)
    target = torch.tensor([0, -100, 3, 2])
    weight = torch.rand(2100) + 0.5
    logits = torch.randn(4, 2100, requires_grad=True) * 1
    loss = lossops.cross_entropy(logits, target, weight, inplace_backward=True)
    assert (loss.grad_fn.name() == CE_NODE) == (path == "eager")
    (target if changed == "target" else weight).mul_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_scaled_grad_output_and_retain_graph_match_custom_op(monkeypatch):
    x0 = torch.randn(16, 7)
    target = torch.randint(0, 7, (16,))

    def twice(x):
        loss = lossops.cross_entropy(x, target)
        first = torch.autograd.grad(loss, x, torch.tensor(1024.0), retain_graph=True)[0].clone()
        second = torch.autograd.grad(loss, x, torch.tensor(3.0), retain_graph=True)[0]
        third = torch.autograd.grad(loss, x, torch.tensor(1.0))[0]
        return loss.grad_fn.name(), first, second, third

    name, *grads = twice(x0.clone().requires_grad_())
    assert name == CE_NODE
    with custom_op_only(monkeypatch):
        ref_name, *ref = twice(x0.clone().requires_grad_())
    assert ref_name != CE_NODE
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[2] * 1024)


@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_gradient_handed_out_is_never_scaled_afterwards(monkeypatch, path):
    # loss.backward() hands its buffer to x.grad; a second backward with another scale must not rewrite it.
    if path == "custom op":
        force_custom_op(monkeypatch)
    x = torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    for fn in (lambda: lossops.cross_entropy(x, target), lambda: lossops.mse_loss(x, torch.zeros(8, 5))):
        x.grad = None
        loss = fn()
        loss.backward(retain_graph=True)
        first = x.grad.clone()
        loss.backward(torch.tensor(2.0))
        torch.testing.assert_close(x.grad, 3 * first)


def test_backward_errors():
    x = torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    loss = lossops.cross_entropy(x, target)
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()
    loss = lossops.cross_entropy(x, target)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_gradcheck_through_the_eager_path():
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 1, -100])
    weight = torch.rand(4, dtype=torch.float64)
    def ce(x):
        return lossops.cross_entropy(x, target, weight, label_smoothing=0.1)

    assert ce(x).grad_fn.name() == CE_NODE
    assert torch.autograd.gradcheck(ce, (x,))
    assert torch.autograd.gradcheck(lambda x: lossops.cross_entropy(x, target, reduction="none"), (x,))
    t = torch.rand(6, 4, dtype=torch.float64, requires_grad=True)
    assert lossops.mse_loss(x, t).grad_fn.name() == ELEMENTWISE_NODE
    assert torch.autograd.gradcheck(lambda x, t: lossops.binary_cross_entropy_with_logits(x, t), (x, t))
    assert torch.autograd.gradcheck(lambda x, t: lossops.smooth_l1_loss(x, t, reduction="none", beta=0.3), (x, t))


def test_all_ignored_mean_is_nan_like_torch():
    x = torch.randn(3, 4, requires_grad=True)
    target = torch.full((3,), -100)
    loss = lossops.cross_entropy(x, target)
    assert loss.grad_fn.name() == CE_NODE
    assert torch.isnan(loss) and torch.isnan(torch.nn.functional.cross_entropy(x, target))


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class RecordFunctions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def test_the_custom_op_serves_everything_else():
    x = torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    with RecordOps() as mode:  # dispatch modes (opcheck, FlopCounterMode, make_fx) see the op
        lossops.cross_entropy(x, target)
        lossops.mse_loss(x, torch.zeros(8, 5))
    assert any("lossops.cross_entropy" in op for op in mode.ops)
    assert any("lossops.mse_loss" in op for op in mode.ops)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lossops.cross_entropy(x, target).grad_fn.name() != CE_NODE
    # The C++ side makes these checks itself (function modes, functorch transforms): a function mode sees the
    # custom op, and vmap's batched tensors (plain torch.Tensor to Python) are never read as one tensor.
    with RecordFunctions() as function_mode:
        assert lossops.cross_entropy(x, target).grad_fn.name() != CE_NODE
    assert function_mode.calls
    per_row = torch.func.vmap(lambda row: lossops.mse_loss(row, torch.zeros(5)))(x.detach())
    torch.testing.assert_close(per_row, x.detach().pow(2).mean(1))
    with lossops.backend("reference"):
        assert lossops.cross_entropy(x, target).grad_fn.name() != CE_NODE
    # options this path does not take
    assert lossops.cross_entropy(x, target, lse_square_scale=1e-4).grad_fn.name() != CE_NODE
    assert lossops.cross_entropy(x, target, softcap=5.0).grad_fn.name() != CE_NODE
    assert lossops.cross_entropy(x, torch.rand(8, 5)).grad_fn.name() != CE_NODE
    assert lossops.mse_loss(x, torch.zeros(8, 5), weight=torch.rand(5)).grad_fn.name() != ELEMENTWISE_NODE
    assert lossops.cross_entropy(x, target.to(torch.uint8)).grad_fn.name() != CE_NODE

    compiled = torch.compile(lambda x: lossops.cross_entropy(x, target), backend="eager", fullgraph=True)
    assert compiled(x).grad_fn.name() != CE_NODE


def test_the_route_reads_every_backend_choice(monkeypatch):
    """The C++ route reads the backend where lossops._backend keeps it: a backend() context, set_backend, then
    LOSSOPS_BACKEND (also when set after import), in that order; forward-mode AD takes the custom op."""
    x = torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))

    def served():
        return lossops.cross_entropy(x, target).grad_fn.name() == CE_NODE

    monkeypatch.delenv("LOSSOPS_BACKEND", raising=False)
    monkeypatch.setattr(lossops._backend, "_global", None)
    assert served()
    for name, expected in (("reference", False), ("triton", False), ("cpp", True), ("auto", True), ("", True)):
        monkeypatch.setenv("LOSSOPS_BACKEND", name)
        assert served() is expected, name
        with lossops.backend("cpp"):
            assert served()
    monkeypatch.setenv("LOSSOPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="unknown backend 'nonsense'"):
        lossops.cross_entropy(x, target)
    monkeypatch.delenv("LOSSOPS_BACKEND")
    lossops.set_backend("reference")
    try:
        assert not served()
        with lossops.backend("auto"):
            assert served()
    finally:
        lossops.set_backend("auto")
    assert served()
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(x.detach(), torch.ones_like(x))
        loss = lossops.cross_entropy(dual, target)
        expected = torch.nn.functional.cross_entropy(dual, target)
        torch.testing.assert_close(fwAD.unpack_dual(loss).tangent, fwAD.unpack_dual(expected).tangent)
        assert lossops.cross_entropy(x.detach(), target).grad_fn is None


def test_disabled_routes_take_the_python_path():
    x = torch.randn(8, 5, requires_grad=True)
    target = torch.randint(0, 5, (8,))
    with _eager.disabled():
        with _eager.disabled():
            assert lossops.cross_entropy(x, target).grad_fn.name() != CE_NODE
        assert lossops.cross_entropy(x, target).grad_fn.name() != CE_NODE
    assert lossops.cross_entropy(x, target).grad_fn.name() == CE_NODE


def test_bad_targets_raise_on_the_eager_path():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(IndexError, match="out of bounds"):
        lossops.cross_entropy(x, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(IndexError, match="out of bounds"):
        lossops.cross_entropy(x, torch.tensor([0, 1, -5, 0]), torch.rand(3))


CTC_NODE = "LossopsCtcLossBackward"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", ["padded", "concatenated", "strided", "zero_infinity"])
def test_ctc_loss_matches_custom_op(monkeypatch, dtype, reduction, layout):
    T, N, C, S = 12, 4, 6, 4

    def make():
        gen = torch.Generator().manual_seed(1)
        lp = torch.randn(T, N, C, generator=gen, dtype=torch.float64).log_softmax(2).to(dtype)
        if layout == "strided":  # batch-first storage, read in place
            lp = lp.transpose(0, 1).contiguous().transpose(0, 1)
        targets = torch.randint(1, C, (N, S), generator=gen)
        il, tl = torch.tensor([T, T - 2, 3, T - 1]), torch.tensor([S, S - 1, 3, 0])  # sequence 2: impossible
        if layout == "concatenated":
            targets = torch.cat([targets[n, :tl[n]] for n in range(N)])
        return lp.requires_grad_(), targets, il, tl

    grad_output = torch.rand(N, generator=torch.Generator().manual_seed(2)).to(dtype) if reduction == "none" else None
    kwargs = dict(reduction=reduction, zero_infinity=layout == "zero_infinity")
    assert_same_as_custom_op(monkeypatch, lambda *a: lossops.ctc_loss(*a, **kwargs), make, CTC_NODE, grad_output)


def test_ctc_loss_falls_back_for_lists_and_bad_lengths(monkeypatch):
    lp = torch.randn(5, 2, 4).log_softmax(2).requires_grad_()
    targets = torch.tensor([[1, 2], [3, 3]])
    loss = lossops.ctc_loss(lp, targets, [5, 5], [2, 2])  # lists: the Python path
    assert loss.grad_fn.name() != CTC_NODE
    with pytest.raises(RuntimeError, match="input_lengths value 6 exceeds"):  # the Python path's message
        lossops.ctc_loss(lp, targets, torch.tensor([6, 5]), torch.tensor([2, 2]))
    with pytest.raises(IndexError, match="targets value 9"):
        lossops.ctc_loss(lp, torch.tensor([[1, 9], [3, 3]]), torch.tensor([5, 5]), torch.tensor([2, 2]))


DISTILLATION_NODE = "LossopsDistillationLossBackward"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(32, 10), (10,), (2, 3, 7), (5, 300)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [{}, {"divergence": "reverse_kl", "temperature": 2.0},
                                     {"divergence": "tvd", "hard_weight": 0.5, "soft_weight": 0.25},
                                     {"divergence": "jsd", "beta": 0.3, "ignore_index": 1},
                                     {"divergence": "jsd", "beta": 1.0, "hard_weight": 1.0, "temperature": 0.5}])
@pytest.mark.parametrize("target", ["none", "index", "all_ignored"])
def test_distillation_matches_custom_op(monkeypatch, dtype, shape, reduction, options, target):
    if target == "none" and options.get("hard_weight"):
        return
    gen = torch.Generator().manual_seed(2)
    student0 = torch.randn(shape, generator=gen).to(dtype)
    teacher = (torch.randn(shape, generator=gen) * 2).to(dtype)
    labels = None if target == "none" else torch.randint(0, shape[-1], shape[:-1], generator=gen)
    if target == "all_ignored":
        labels.fill_(options.get("ignore_index", -100))
    grad_output = torch.rand(shape[:-1], generator=gen).to(dtype) if reduction == "none" else None

    def loss(s, t, y):
        return lossops.distillation_loss(s, t, y, reduction=reduction, **options)

    assert_same_as_custom_op(monkeypatch, loss, lambda: (student0.clone().requires_grad_(), teacher, labels),
                             DISTILLATION_NODE, grad_output)
    with torch.no_grad():
        assert_same_as_custom_op(monkeypatch, loss, lambda: (student0, teacher, labels), DISTILLATION_NODE)


@pytest.mark.parametrize("layout", ["strided_classes", "strided_rows", "transposed_tokens", "float32_teacher",
                                    "strided_target"])
def test_distillation_layouts_match_custom_op(monkeypatch, layout):
    gen = torch.Generator().manual_seed(3)
    dtype = torch.bfloat16 if layout == "float32_teacher" else torch.float32
    student0 = torch.randn(6, 4, 18, generator=gen).to(dtype)
    teacher = torch.randn(6, 4, 9, generator=gen)
    teacher = teacher if layout == "float32_teacher" else teacher.to(dtype)
    labels = torch.randint(0, 9, (6, 8), generator=gen)
    views = {  # the logits and the target as the loss reads them, from a (6, 4, 18) student leaf
        "strided_classes": lambda s: (s[..., ::2], teacher, labels[:, :4]),
        "strided_rows": lambda s: (s[..., :9], teacher, labels[:, :4]),  # tokens merge into one strided dimension
        "transposed_tokens": lambda s: (s[..., :9].transpose(0, 1), teacher.transpose(0, 1), labels[:, :4].t()),
        "float32_teacher": lambda s: (s[..., 9:], teacher, labels[:, 4:]),
        "strided_target": lambda s: (s[..., :9], teacher, labels[:, ::2]),
    }
    grad_output = torch.rand(4, 6, generator=gen).to(dtype)
    grad_output = grad_output.t() if layout != "transposed_tokens" else grad_output

    def loss(s):
        return lossops.distillation_loss(*views[layout](s), reduction="none", divergence="jsd", hard_weight=0.5)

    assert_same_as_custom_op(monkeypatch, loss, lambda: (student0.clone().requires_grad_(),), DISTILLATION_NODE,
                             grad_output)


def test_distillation_calls_it_does_not_serve_take_the_full_path():
    s, t = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7)
    y = torch.tensor([0, 6, -100, 3, 3])
    # the teacher's gradient (the plain-PyTorch formula), class indices of another dtype, autocast
    teacher = t.clone().requires_grad_()
    loss = lossops.distillation_loss(s, teacher, y)
    assert loss.grad_fn.name() != DISTILLATION_NODE
    assert torch.autograd.grad(loss, teacher)[0].abs().sum() > 0
    assert lossops.distillation_loss(s, t, y.clamp(min=0).to(torch.int32)).grad_fn.name() != DISTILLATION_NODE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lossops.distillation_loss(s, t, y).grad_fn.name() != DISTILLATION_NODE
    assert lossops.distillation_loss(s, t, y).grad_fn.name() == DISTILLATION_NODE
    # bad arguments raise from the Python checks, with their messages
    for kwargs, match in ((dict(beta=1.5), "beta"), (dict(temperature=0.0), "temperature"),
                          (dict(divergence="kl"), "divergence"), (dict(divergence=["jsd"]), "divergence"),
                          (dict(hard_weight=-1.0), "hard_weight"),
                          (dict(soft_weight=float("inf")), "soft_weight"), (dict(reduction="avg"), "reduction")):
        with pytest.raises(ValueError, match=match):
            lossops.distillation_loss(s, t, y, **kwargs)
    with pytest.raises(ValueError, match="hard_weight"):
        lossops.distillation_loss(s, t, hard_weight=0.5)
    with pytest.raises(ValueError, match="teacher_logits"):
        lossops.distillation_loss(s, t[:, :-1], y)
    with pytest.raises(IndexError, match="out of bounds"):
        lossops.distillation_loss(s, t, y.clamp(min=0) + 5)


def test_every_route_gives_each_kernel_parameter_one_source():
    """A family's eager route covers its kernel's registered parameters exactly: the C++ path calls the kernel by
    those names, as the custom op does."""
    from lossops import _cpp
    from lossops._family import FAMILIES
    routed = [(f, r) for f in FAMILIES.values() for r in f.eager_routes]
    assert {f.name for f, _ in routed} >= {"cross_entropy", "softmax_focal_loss", "ctc_loss", "mse_loss", "l1_loss",
                                           "smooth_l1_loss", "huber_loss", "binary_cross_entropy_with_logits",
                                           "sigmoid_focal_loss"}
    module = _cpp.module()
    for family, route in routed:
        names = [source[0] for kernel, r, sources in _eager._ROUTES if r is route for source in sources]
        assert names == list(family.kernel.parameters)
        assert sorted(names) == sorted(module.kernel_parameters(family.kernel.name))


@pytest.mark.parametrize("change, message", [
    (dict(constants={}), "parameter lse_square_scale has 0 sources"),
    (dict(constants={"lse_square_scale": 0.0, "softcap": None, "focal_gamma": None, "label_smoothing": 0.0}),
     "parameter label_smoothing has 2 sources"),
    (dict(constants={"lse_square_scale": 0.0, "softcap": None, "focal_gamma": None, "beta": 1.0}),
     r"does not take: \['beta'\]"),
    (dict(denominator="rows"), "unknown eager-route denominator"),
])
def test_a_route_that_drifts_from_its_kernel_is_refused(change, message):
    from lossops.losses.cross_entropy import EAGER_ROUTE, KERNEL
    import dataclasses
    route = dataclasses.replace(EAGER_ROUTE, number=None, **change)
    before = len(_eager._ROUTES)
    with pytest.raises(ValueError, match=message):
        _eager.declare(route, KERNEL.name, KERNEL.parameters)
    assert len(_eager._ROUTES) == before


def test_the_cpp_side_refuses_inconsistent_routes():
    from lossops import _cpp
    module = _cpp.module()
    with pytest.raises(RuntimeError, match="unknown eager-route layout"):
        module.declare_eager_route("cross_entropy", "rows", "elements", [], [], "x")
    with pytest.raises(RuntimeError, match="kept-rows denominator needs class_rows"):
        module.declare_eager_route("mse", "same_shape", "kept_rows", [], [], "x")
    with pytest.raises(RuntimeError, match="takes the reduction, 3 tensors and 2 scalars"):
        from lossops.losses.cross_entropy import EAGER_ROUTE
        lossops.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))  # sends the routes
        module.eager_route_callable(EAGER_ROUTE.number, False)("mean", torch.randn(2, 3))


@pytest.mark.parametrize("call", [
    lambda x, t: lossops.cross_entropy(x, t, label_smoothing=1.5),
    lambda x, t: lossops.cross_entropy(x, t, ignore_index=2 ** 70),
    lambda x, t: lossops.softmax_focal_loss(x, t, gamma=float("inf")),
    lambda x, t: lossops.softmax_focal_loss(x, t, alpha=-0.5),
])
def test_scalars_outside_a_route_take_the_python_checks(call):
    x, t = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0])
    with pytest.raises((ValueError, RuntimeError, TypeError, OverflowError)):
        call(x, t)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_each_call_returns_a_loss_of_its_own(reduction, dtype):
    """The route writes a mean or sum into the kernel's own 0-d total where the dtypes allow: every call's loss is
    still a tensor of its own, which a later call or an in-place change of another leaves as it is."""
    x = torch.randn(6, 5, dtype=dtype)
    t = torch.randint(0, 5, (6,))
    with torch.no_grad():
        first = lossops.nll_loss(x, t, reduction=reduction)
        expected = first.clone()
        second = lossops.nll_loss(x, t, reduction=reduction)
        second.add_(1)
        third = lossops.cross_entropy(x, t, reduction=reduction)
    assert first.untyped_storage().data_ptr() != second.untyped_storage().data_ptr()
    assert first.untyped_storage().data_ptr() != third.untyped_storage().data_ptr()
    assert torch.equal(first, expected)
    assert torch.equal(second, expected + 1)
    assert first.dtype == dtype and first.shape == ((6,) if reduction == "none" else ())
