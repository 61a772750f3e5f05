"""lossops.cross_entropy against torch.nn.functional.cross_entropy, on every backend.

The oracle is torch: F.cross_entropy for everything torch has, and for the extras (z-loss, softcap) the
same torch expression the docstring defines, built from F.cross_entropy and torch.logsumexp.
"""
import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import (ISA_ORDER, backend_cases, forced_isa, forward_backward, grid, isa_available, leaf_copies,
                    lowp_error_no_worse, pairwise)

IGNORE = 1  # a real class id: ignoring must not depend on the sentinel being out of range


def torch_loss(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               lse_square_scale=0.0, softcap=None):
    """What lossops.cross_entropy promises, written with torch ops only."""
    logits = input if softcap is None else softcap * torch.tanh(input / softcap)
    index_mean = reduction == "mean" and not target.is_floating_point()
    loss = F.cross_entropy(logits, target, weight, ignore_index=ignore_index,
                           reduction="sum" if index_mean else reduction, label_smoothing=label_smoothing)
    if index_mean:  # a mean over nothing is NaN with a zero gradient (torch's gradient is NaN when weights sum to 0)
        keep = target != ignore_index
        classes = input.shape[1] if input.dim() > 1 else input.shape[0]
        kept_weight = keep.to(loss.dtype) if weight is None else \
            torch.where(keep, weight.to(loss.dtype)[torch.where(keep, target, 0).clamp(0, max(classes - 1, 0))], 0)
        loss = _mean_of(loss, kept_weight.sum())
    if lse_square_scale == 0:
        return loss
    lse = logits.logsumexp(1 if input.dim() > 1 else 0)
    if target.is_floating_point():
        kept, denominator = torch.ones_like(lse), lse.numel()
    else:  # the z-loss is not class-weighted: its mean is over the kept rows
        kept = (target != ignore_index).to(lse.dtype)
        denominator = kept.sum()
    z = lse_square_scale * lse.square() * kept
    return loss + (z if reduction == "none" else z.sum() if reduction == "sum" else _mean_of(z.sum(), denominator))


def _mean_of(total, denominator):
    denominator = torch.as_tensor(denominator, dtype=total.dtype)
    empty = denominator == 0
    return torch.where(empty, float("nan"), total / torch.where(empty, 1, denominator))


def make_inputs(case, dtype=torch.float64):
    """(input, target, kwargs) for a case dict of grid()/pairwise()."""
    shape = case["shape"]
    num_classes = shape[1] if len(shape) > 1 else shape[0]
    x = (3 * torch.randn(shape, dtype=torch.float64)).to(dtype).requires_grad_()
    kwargs = {k: case[k] for k in ("reduction", "label_smoothing", "lse_square_scale", "softcap") if k in case}
    if case.get("weight"):
        kwargs["weight"] = (0.5 + torch.rand(num_classes, dtype=torch.float64)).to(dtype)
    if case["target"] == "prob":
        return x, torch.randn(shape, dtype=torch.float64).softmax(1 if len(shape) > 1 else 0).to(dtype), kwargs
    target = torch.randint(0, num_classes, shape[:1] + shape[2:] if len(shape) > 1 else ())
    if case.get("ignore"):
        kwargs["ignore_index"] = IGNORE
        flat = target.view(-1)
        flat[0] = IGNORE if flat.numel() > 1 else 0  # a 1-row batch keeps its row: mean over none is nan
        flat[-1] = 0
    return x, target, kwargs


def compare(x, target, kwargs, grad_output=None):
    """Loss and input gradient from lossops (selected backend) and from torch, on identical leaves."""
    ours = forward_backward(lambda x: lossops.cross_entropy(x, target, **kwargs), [x], grad_output)
    theirs = forward_backward(lambda x: torch_loss(x, target, **kwargs), leaf_copies([x]), grad_output)
    return ours, theirs


def assert_same(ours, theirs, **tol):
    (loss, (grad,)), (expected_loss, (expected_grad,)) = ours, theirs
    assert_close(loss, expected_loss, equal_nan=True, **tol)
    assert_close(grad, expected_grad, equal_nan=True, **tol)


OPTIONS = dict(target=("index", "prob"), shape=((5,), (3, 4), (2, 3, 2, 2)), weight=(False, True),
               ignore=(False, True), reduction=("none", "mean", "sum"), label_smoothing=(0.0, 0.3),
               lse_square_scale=(0.0, 0.1), softcap=(None, 3.0))


def _valid(case):
    return not (case["target"] == "prob" and case["ignore"])  # torch: no ignore_index for probabilities


# The full grid runs on cpp; Triton (interpreted, far slower) and the reference (F.cross_entropy plus the
# extras, i.e. nearly the oracle itself) get the subset in which every pair of option values still meets.
GRADCHECK_CASES = backend_cases({"cpp": grid(OPTIONS, _valid), "reference": pairwise(OPTIONS, _valid),
                                 "triton": pairwise(OPTIONS, _valid)})


@pytest.mark.parametrize("backend, case", GRADCHECK_CASES, indirect=["backend"])
def test_float64_matches_torch_and_gradcheck(backend, case):
    x, target, kwargs = make_inputs(case)
    assert_same(*compare(x, target, kwargs))
    assert torch.autograd.gradcheck(lambda x: lossops.cross_entropy(x, target, **kwargs), (x,),
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 5, 2)])
def test_z_loss_is_not_class_weighted(backend, shape, reduction, label_smoothing):
    """The z-loss term, loss(s) - loss(0), is s * lse^2 on each kept row, averaged over the kept rows for
    'mean': multiplying the class weights by 10 changes neither its value nor its gradient."""
    x = (3 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, shape[1], shape[:1] + shape[2:])
    target.view(-1)[::3] = IGNORE
    weight = 0.5 + torch.rand(shape[1], dtype=torch.float64)
    scale = 0.1

    def z_term(w):
        options = dict(weight=w, ignore_index=IGNORE, reduction=reduction, label_smoothing=label_smoothing)
        with_z = forward_backward(lambda x: lossops.cross_entropy(x, target, lse_square_scale=scale, **options), [x])
        without = forward_backward(lambda x: lossops.cross_entropy(x, target, **options), [x])
        return with_z[0] - without[0], with_z[1][0] - without[1][0]

    kept = (target != IGNORE).to(x.dtype)

    def z_loss(x):
        z = scale * x.logsumexp(1).square() * kept
        return z if reduction == "none" else z.sum() if reduction == "sum" else z.sum() / kept.sum()

    expected_value, (expected_grad,) = forward_backward(z_loss, [x])
    for w in (weight, 10 * weight):
        value, grad = z_term(w)
        assert_close(value, expected_value, rtol=1e-10, atol=1e-12)
        assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    kwargs = dict(weight=10 * weight, ignore_index=IGNORE, reduction=reduction, label_smoothing=label_smoothing,
                  lse_square_scale=scale)
    assert_same(*compare(x, target, kwargs))
    assert torch.autograd.gradcheck(lambda x: lossops.cross_entropy(x, target, **kwargs), (x,),
                                    fast_mode=backend == "triton")


PRECISION_OPTIONS = dict(dtype=(torch.float32, torch.bfloat16, torch.float16),
                         # C=507: odd, no vector width divides it; C=2049: one past the kernels' 2048 block.
                         shape=((16, 37), (3, 507), (3, 2049), (2, 2049, 3), (2, 5, 3, 4)),
                         target=("index", "prob"), weight=(False, True), ignore=(False, True),
                         reduction=("none", "mean", "sum"), label_smoothing=(0.0, 0.1))
PRECISION_CASES = pairwise(PRECISION_OPTIONS, _valid)


@pytest.mark.parametrize("case", PRECISION_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_reduced_precision_matches_torch(backend, case):
    dtype = case["dtype"]
    x, target, kwargs = make_inputs(case, dtype)
    ours, theirs = compare(x, target, kwargs)
    (loss, (grad,)), (torch_value, (torch_grad,)) = ours, theirs
    assert loss.dtype == dtype and grad.dtype == dtype
    if dtype == torch.float32:
        assert_close(loss, torch_value, rtol=1e-5, atol=1e-5)
        assert_close(grad, torch_grad, rtol=1e-4, atol=1e-6)
    # Judged against the float64 truth for the same rounded inputs: no worse than torch in this dtype.
    x64, target64 = leaf_copies([x, target], torch.float64)
    kwargs64 = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    truth_loss, (truth_grad,) = forward_backward(lambda x: torch_loss(x, target64, **kwargs64), [x64])
    lowp_error_no_worse(loss, torch_value, truth_loss, "loss")
    lowp_error_no_worse(grad, torch_grad, truth_grad, "gradient")


KERNEL_BUILDS = [f"cpp-{isa}" for isa in ISA_ORDER if isa_available(isa)] + ["triton"]


@pytest.mark.parametrize("build", KERNEL_BUILDS)
# Several row-kernel blocks and a ragged tail; the row-group kernel's range; the lane kernel's.
@pytest.mark.parametrize("classes", [2 * 2048 + 37, 1000, 100, 40])
def test_float32_softmax_accurate_across_the_exp_range(build, classes):
    """Every probability, down to float32's smallest and through exact zeros for -inf logits, stays within a
    few ulp of the float64 truth (relative error may grow with |logit - lse| only as far as rounding that
    argument allows): the kernels' fast exponentials must not buy speed with accuracy."""
    torch.manual_seed(0)
    rows = 37  # more than one group of rows, the last one ragged
    x = -120 * torch.rand(rows, classes, dtype=torch.float64)
    x[:, 5] = 0.0
    x[:, 7::97] = -float("inf")
    x = x[:, torch.randperm(classes)].to(torch.float32)
    target = torch.randint(0, classes, (rows,))
    target = torch.where(torch.isinf(x.gather(1, target[:, None])).squeeze(1), (x == 0).float().argmax(1), target)
    leaf = x.clone().requires_grad_()
    backend, _, isa = build.partition("-")
    with lossops.backend(backend), forced_isa(isa) if isa else contextlib.nullcontext():
        lossops.cross_entropy(leaf, target, reduction="sum").backward()
    x64 = x.double()
    probability = x64.softmax(1)
    truth = probability - F.one_hot(target, classes).double()
    lse = x64.logsumexp(1, keepdim=True)
    eps = torch.finfo(torch.float32).eps
    # At the target, p - 1 inherits the rounding of the sum of exponentials (relative to p, not to p - 1).
    scale = torch.maximum(truth.abs(), probability)
    bound = eps * (8 + 2 * (x64 - lse).abs().nan_to_num(posinf=0.0)) * scale + 2 ** -148
    error = (leaf.grad.double() - truth).abs()
    assert (error <= bound).all(), f"worst excess {(error - bound).max().item():.3g}"
    assert (leaf.grad[torch.isinf(x)] == 0).all()
    assert (leaf.grad[truth.abs() > 1e-37] != 0).all()  # no flush to zero in float32's normal range


@pytest.mark.parametrize("classes", [2 ** 17, 2 ** 17 + 1])
def test_rows_either_side_of_the_kept_exponentials_limit(classes):
    """The C++ kernel keeps a row's exponentials between its passes up to 2^17 classes and recomputes them beyond:
    both paths, with smoothing and weights, stay within ~1e-6 of the float64 truth in float32 (torch's own float32
    result is ~2e-5 off here, so the truth is the oracle, not torch's float32)."""
    g = torch.Generator().manual_seed(classes)
    x = (4 * torch.randn(3, classes, generator=g)).requires_grad_()
    target = torch.tensor([0, classes - 1, 12345])
    weight = 0.5 + torch.rand(classes, generator=g)
    with lossops.backend("cpp"):
        loss, (grad,) = forward_backward(
            lambda x: lossops.cross_entropy(x, target, weight=weight, label_smoothing=0.1), [x])
    x64, weight64 = leaf_copies([x, weight], torch.float64)
    truth_loss, (truth_grad,) = forward_backward(
        lambda x: F.cross_entropy(x, target, weight=weight64, label_smoothing=0.1), [x64])
    assert_close(loss.double(), truth_loss, rtol=2e-6, atol=0)
    assert_close(grad.double(), truth_grad, rtol=5e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_anywhere_in_a_long_row_makes_the_row_nan(kernel_backend, dtype):
    """Rows long enough for the kernels' vector lanes and several blocks: a NaN in a lane, in a later block,
    in the ragged tail, or among -inf logits (a block whose max is -inf) makes that row's loss and gradient
    NaN as in torch, and leaves the other rows alone."""
    classes = 2 * 2048 + 37
    x = torch.randn(7, classes)
    x[0, 17] = float("nan")                  # a vector lane of the first block
    x[1, 2048 + 5] = float("nan")            # the second block
    x[2, classes - 1] = float("nan")         # the scalar tail
    x[3] = float("-inf")
    x[3, 100] = float("nan")                 # an all -inf block with a NaN in it
    x[4, :2048] = float("-inf")
    x[4, 3000] = float("nan")                # first block all -inf, NaN later among finite values
    x[5, :2048] = float("-inf")
    x[5, 10] = float("nan")                  # a NaN hidden in an all -inf block, finite logits after it
    x[6, 2048:] = float("-inf")              # no NaN: finite loss
    target = torch.tensor([1, 2, 3, 4, 3000, 3000, 8])
    x = x.to(dtype).requires_grad_()
    ours = forward_backward(lambda x: lossops.cross_entropy(x, target, reduction="none"), [x])
    theirs = forward_backward(lambda x: F.cross_entropy(x.float(), target, reduction="none"), leaf_copies([x]))
    (loss, (grad,)), (expected_loss, (expected_grad,)) = ours, theirs
    assert loss.isnan().tolist() == [True] * 6 + [False]
    assert grad[:6].isnan().all() and not grad[6:].isnan().any()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    assert_close(loss.float(), expected_loss.float(), equal_nan=True, **tol)
    assert_close(grad.float(), expected_grad.float(), equal_nan=True, **tol)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("shape", [(4, 5), (2, 5, 3)])
def test_all_targets_ignored(backend, reduction, shape):
    """torch: mean over zero targets is 0/0 = nan, while the gradient is 0 (not nan)."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    target = torch.full(shape[:1] + shape[2:], -100)
    ours, theirs = compare(x, target, dict(reduction=reduction))
    assert_same(ours, theirs)
    assert ours[0].isnan().all() if reduction == "mean" else (ours[0] == 0).all()
    assert (ours[1][0] == 0).all()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (2, 5, 0)])
def test_empty_batch(backend, reduction, target_kind, shape):
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    target = torch.zeros(shape[:1] + shape[2:], dtype=torch.long) if target_kind == "index" else torch.zeros(shape)
    ours, theirs = compare(x, target.to(x.dtype) if target_kind == "prob" else target, dict(reduction=reduction))
    assert_same(ours, theirs)
    assert ours[1][0].shape == shape


# Layouts the kernels must read through strides (or copy correctly), with the class dim where torch has it.
LAYOUTS = {
    "class_slice_of_wider": lambda randn: randn(6, 11)[:, :7],
    "transposed_storage": lambda randn: randn(7, 6).t().contiguous().t(),
    "every_other_row": lambda randn: randn(12, 7)[::2],
    "class_stride_2": lambda randn: randn(6, 14)[:, ::2],
    "expanded_row": lambda randn: randn(1, 7).expand(6, 7),
    "channels_last_4d": lambda randn: randn(2, 3, 2, 7).permute(0, 3, 1, 2),
    "spatial_slice_3d": lambda randn: randn(2, 7, 8)[:, :, 1:7],
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_non_contiguous_input(backend, layout, reduction):
    x = LAYOUTS[layout](functools.partial(torch.randn, dtype=torch.float64)).requires_grad_()
    assert not x.is_contiguous()
    target = torch.randint(0, 7, x.shape[:1] + x.shape[2:])
    assert_same(*compare(x, target, dict(reduction=reduction, label_smoothing=0.1)))


def test_non_contiguous_probability_target(backend):
    x = torch.randn(7, 6, dtype=torch.float64).t().requires_grad_()
    target = torch.randn(6, 7, 3, dtype=torch.float64).softmax(1)[:, :, 1]
    assert_same(*compare(x, target, dict(label_smoothing=0.2)))


@pytest.mark.parametrize("bad", [5, 100, -3, -2])
@pytest.mark.parametrize("shape", [(4, 5), (5,), (2, 5, 3)])
def test_target_out_of_range_names_the_value(backend, bad, shape):
    x = torch.randn(shape, requires_grad=True)
    target = torch.zeros(shape[:1] + shape[2:] if len(shape) > 1 else (), dtype=torch.long)
    target.view(-1)[-1] = bad
    with pytest.raises(IndexError, match=rf"(?<![\d-]){bad}(?!\d)"):
        lossops.cross_entropy(x, target, ignore_index=-100)


def test_out_of_range_target_leaves_logits_intact_with_inplace_backward(kernel_backend):
    """The gradient would overwrite the logits: validation has to come before any write."""
    logits = torch.randn(4, 5, requires_grad=True) * 1
    before = logits.detach().clone()
    with pytest.raises(IndexError, match="7"):
        lossops.cross_entropy(logits, torch.tensor([0, 1, 7, 2]), inplace_backward=True)
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("grad_output", ["default", "requires_grad"])
def test_double_backward_raises(kernel_backend, grad_output):
    """A gradient penalty through the loss must fail loudly, not silently drop its own gradient."""
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = lossops.cross_entropy(x, torch.tensor([0, 1, 2]), reduction="none")
    upstream = torch.ones(3, dtype=torch.float64, requires_grad=grad_output == "requires_grad")
    with pytest.raises(RuntimeError, match="double backward"):
        (g,) = torch.autograd.grad(loss, x, upstream, create_graph=True)
        (loss.sum() + g.square().sum()).backward()


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_retain_graph_second_backward(backend, reduction):
    """GradScaler-style scalar upstream grads != 1, twice through one graph: each result is exact."""
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 5, -100, 3, 3])
    kwargs = dict(reduction=reduction, label_smoothing=0.1)
    expected = torch.autograd.grad(torch_loss(x, target, **kwargs).sum(), x)[0]
    loss = lossops.cross_entropy(x, target, **kwargs)
    for scale in (3.0, -0.5, 1.0, 2.0):
        upstream = torch.full(loss.shape, scale, dtype=loss.dtype)
        (grad,) = torch.autograd.grad(loss, x, upstream, retain_graph=True)
        assert_close(grad, scale * expected)


def _logits_from(h, w, kind):
    """Non-leaf logits produced by a matmul (which saves h and w, not its output)."""
    out = h @ w
    if kind == "plain":
        return out
    if kind == "reshaped_view":
        return out.view(2, 3, -1).view(6, -1)
    if kind == "class_slice_view":
        return out[:, :5]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["plain", "reshaped_view", "class_slice_view"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_inplace_backward_gradients(backend, kind, reduction):
    h = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, -100, 2, 2, 1])
    num_classes = 5 if kind == "class_slice_view" else 7
    kwargs = dict(reduction=reduction, label_smoothing=0.1, weight=torch.rand(num_classes, dtype=torch.float64) + 0.5)
    _, ours = forward_backward(lambda h, w: lossops.cross_entropy(_logits_from(h, w, kind), target,
                                                                   inplace_backward=True, **kwargs), [h, w])
    _, theirs = forward_backward(lambda h, w: torch_loss(_logits_from(h, w, kind), target, **kwargs),
                                 leaf_copies([h, w]))
    assert_close(ours, theirs)


def test_inplace_backward_refuses_leaf(kernel_backend):
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        lossops.cross_entropy(x, torch.tensor([0, 1, 2]), inplace_backward=True)


@pytest.mark.parametrize("other_use", ["sin", "square"])
def test_inplace_backward_detects_logits_saved_elsewhere(kernel_backend, other_use):
    """Another node that saved the logits would see the gradient instead: it must raise, not compute."""
    h = torch.randn(3, 5, requires_grad=True)
    logits = h @ torch.randn(5, 4)
    other = getattr(logits, other_use)().sum()
    loss = lossops.cross_entropy(logits, torch.tensor([0, 1, 2]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_backward_with_output_saving_consumer(backend):
    """exp saves its output, not the logits: overwriting the logits is harmless and gradients stay exact."""
    h = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64)
    target = torch.tensor([0, 1, 2])
    _, ours = forward_backward(lambda h: lossops.cross_entropy(h @ w, target, inplace_backward=True)
                               + (h @ w).exp().sum(), [h])
    _, theirs = forward_backward(lambda h: F.cross_entropy(h @ w, target) + (h @ w).exp().sum(), leaf_copies([h]))
    assert_close(ours, theirs)


def _fresh_logits(seed=0, rows=6, classes=7):
    """Non-leaf float64 logits from a matmul, and the leaf the gradient flows to."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, classes, dtype=torch.float64, generator=g)
    return h, w


def test_inplace_backward_logits_intact_until_backward(kernel_backend):
    """The accuracy line every training loop has, computed after the loss: it must see the logits."""
    h, w = _fresh_logits()
    target = torch.tensor([0, 4, 6, 2, 2, 1])
    logits = h @ w
    expected_logits = logits.detach().clone()
    loss = lossops.cross_entropy(logits, target, inplace_backward=True)
    accuracy = (logits.argmax(1) == target).float().mean()
    assert torch.equal(logits.detach(), expected_logits)
    assert accuracy == (expected_logits.argmax(1) == target).float().mean()
    loss.backward()
    h_ref = h.detach().clone().requires_grad_()
    F.cross_entropy(h_ref @ w, target).backward()
    assert_close(h.grad, h_ref.grad)


def test_inplace_backward_logits_hold_the_gradient_afterwards(kernel_backend):
    """What docs/semantics.md promises the logits hold after backward: d(loss)/d(logits), grad_output applied."""
    h, w = _fresh_logits()
    target = torch.tensor([0, 4, -100, 2, 2, 1])
    logits = h @ w
    x_ref = logits.detach().clone().requires_grad_()
    (3.0 * F.cross_entropy(x_ref, target, label_smoothing=0.1)).backward()
    (3.0 * lossops.cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=True)).backward()
    assert_close(logits.detach(), x_ref.grad)


@pytest.mark.parametrize("order", ["loss_first", "term_first"])
def test_inplace_backward_with_another_term_reading_the_logits(kernel_backend, order):
    """loss + (logits ** 2).sum(): correct gradients or a clear error, never a wrong number."""
    h, w = _fresh_logits()
    target = torch.tensor([0, 4, 6, 2, 2, 1])

    def total(h, inplace):
        logits = h @ w
        ce = (lossops.cross_entropy(logits, target, inplace_backward=True) if inplace
              else F.cross_entropy(logits, target))
        if order == "loss_first":
            return ce + (logits ** 2).sum()
        square = (logits ** 2).sum()
        return square + (lossops.cross_entropy(logits, target, inplace_backward=True) if inplace else ce)

    h_ref = h.detach().clone().requires_grad_()
    total(h_ref, inplace=False).backward()
    try:
        total(h, inplace=True).backward()
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)
        return
    assert_close(h.grad, h_ref.grad)


@pytest.mark.parametrize("kind", ["plain", "reshaped_view", "class_slice_view"])
def test_inplace_backward_autograd_grad_with_respect_to_the_logits(kernel_backend, kind):
    h, w = _fresh_logits()
    target = torch.tensor([0, 4, -100, 2, 2, 1])
    logits = _logits_from(h, w, kind)
    x_ref = logits.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(F.cross_entropy(x_ref, target, reduction="sum"), x_ref)
    (grad,) = torch.autograd.grad(lossops.cross_entropy(logits, target, reduction="sum", inplace_backward=True),
                                  logits)
    assert_close(grad, expected)


def test_inplace_backward_second_backward_raises(kernel_backend):
    """retain_graph=True: the first backward is exact, the second cannot recompute and says so."""
    h, w = _fresh_logits()
    target = torch.tensor([0, 4, 6, 2, 2, 1])
    loss = lossops.cross_entropy(h @ w, target, inplace_backward=True)
    loss.backward(retain_graph=True)
    h_ref = h.detach().clone().requires_grad_()
    F.cross_entropy(h_ref @ w, target).backward()
    assert_close(h.grad, h_ref.grad)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_probability_target_gradient(backend):
    """torch differentiates with respect to probability targets too."""
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(4, 5, dtype=torch.float64).softmax(1).requires_grad_()
    kwargs = dict(label_smoothing=0.2, weight=torch.rand(5, dtype=torch.float64))
    _, ours = forward_backward(lambda x, t: lossops.cross_entropy(x, t, **kwargs), [x, target])
    _, theirs = forward_backward(lambda x, t: F.cross_entropy(x, t, **kwargs), leaf_copies([x, target]))
    assert_close(ours, theirs)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_module_matches_torch_module(backend, reduction):
    kwargs = dict(weight=torch.rand(6) + 0.5, ignore_index=2, reduction=reduction, label_smoothing=0.05)
    ours, theirs = lossops.nn.CrossEntropyLoss(**kwargs).double(), torch.nn.CrossEntropyLoss(**kwargs).double()
    assert ours.weight.dtype == torch.float64  # a buffer, converted with the module like torch's
    x = torch.randn(5, 6, 2, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([[0, 2], [5, 1], [2, 2], [3, 4], [1, 0]])
    assert_close(forward_backward(ours, [x, target]), forward_backward(theirs, [*leaf_copies([x]), target]))


@functools.lru_cache(maxsize=None)
def _opinfo_samples(dtype):
    """PyTorch's own sample inputs, generated once per dtype (the tests only read them)."""
    from torch.testing._internal.common_methods_invocations import op_db

    (opinfo,) = [op for op in op_db if op.name == "nn.functional.cross_entropy"]
    return list(opinfo.sample_inputs("cpu", dtype, requires_grad=True))


@pytest.mark.parametrize("dtype, index", [pytest.param(dtype, i, id=f"{str(dtype)[6:]}-{i}")
                                          for dtype in (torch.float32, torch.float64)
                                          for i in range(len(_opinfo_samples(dtype)))])
def test_opinfo_samples(backend, dtype, index):
    sample = _opinfo_samples(dtype)[index]
    inputs = [sample.input, *sample.args]
    ours = forward_backward(lambda *a: lossops.cross_entropy(*a, **sample.kwargs), inputs)
    theirs = forward_backward(lambda *a: F.cross_entropy(*a, **sample.kwargs), leaf_copies(inputs))
    assert_close(ours, theirs, equal_nan=True)
