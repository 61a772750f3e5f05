"""Sigmoid and softmax focal loss, on every backend.

The oracle is our own float64 transcription of the published formulas, written here independently of
lossops: torchvision.ops.sigmoid_focal_loss (torchvision does not import beside this CPU torch) and
Lin et al.'s multi-class focal loss -alpha_y (1 - p_y)^gamma log p_y, differentiated by autograd
where that is finite. Saturated logits, where it is not, are checked against hand-derived limits.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import backend_cases, forward_backward, grid, leaf_copies, pairwise
from _elementwise_cases import check_lowp


def torchvision_sigmoid_focal(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision/ops/focal_loss.py, transcribed."""
    p = torch.sigmoid(inputs)
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
        loss = alpha_t * loss
    return loss if reduction == "none" else loss.mean() if reduction == "mean" else loss.sum()


def paper_softmax_focal(input, target, alpha, gamma, ignore_index, reduction):
    """-alpha_y (1 - p_y)^gamma log p_y; mean over non-ignored targets, weighted by a per-class alpha tensor."""
    logp = torch.log_softmax(input, 1 if input.dim() > 1 else 0)
    keep = target != ignore_index
    safe = torch.where(keep, target, 0)
    logp_y = logp.gather(1, safe.unsqueeze(1)).squeeze(1) if input.dim() > 1 else logp[safe]
    a = torch.ones_like(logp_y) if alpha is None else alpha[safe] if isinstance(alpha, torch.Tensor) \
        else torch.full_like(logp_y, alpha)
    loss = torch.where(keep, -a * (1 - logp_y.exp()) ** gamma * logp_y, 0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / ((a * keep).sum() if isinstance(alpha, torch.Tensor) else keep.sum())


def _sigmoid_cases():
    options = dict(alpha=(0.25, -1.0, 1.5), gamma=(0.0, 0.5, 2.0), targets=("hard", "soft"),
                   reduction=("none", "mean", "sum"), weight=(None, "row", "full"))
    return backend_cases({"cpp": grid(options), "reference": pairwise(options), "triton": pairwise(options)})


@pytest.mark.parametrize("backend, case", _sigmoid_cases(), indirect=["backend"])
def test_sigmoid_focal_float64_matches_torchvision_and_gradcheck(backend, case):
    x = (3 * torch.randn(4, 5, dtype=torch.float64)).requires_grad_()
    t = torch.randint(0, 2, (4, 5)).double() if case["targets"] == "hard" else torch.rand(4, 5, dtype=torch.float64)
    weight = {None: None, "row": torch.rand(5, dtype=torch.float64),
              "full": torch.rand(4, 5, dtype=torch.float64)}[case["weight"]]
    args = dict(alpha=case["alpha"], gamma=case["gamma"], reduction=case["reduction"])
    ours = forward_backward(lambda x: lossops.sigmoid_focal_loss(x, t, **args, weight=weight), [x])

    def expected(x):
        loss = torchvision_sigmoid_focal(x, t, case["alpha"], case["gamma"])
        loss = loss if weight is None else loss * weight
        return {"none": loss, "sum": loss.sum(), "mean": loss.sum() / loss.numel()}[case["reduction"]]

    assert_close(ours, forward_backward(expected, leaf_copies([x])))
    assert torch.autograd.gradcheck(lambda x: lossops.sigmoid_focal_loss(x, t, **args, weight=weight), (x,),
                                    fast_mode=True)


def test_sigmoid_focal_gamma_zero_is_bce_times_alpha_t(backend):
    x, t = torch.randn(6, 7, dtype=torch.float64, requires_grad=True), torch.rand(6, 7, dtype=torch.float64)
    ours = forward_backward(lambda x: lossops.sigmoid_focal_loss(x, t, 0.3, 0.0, "sum"), [x])
    theirs = forward_backward(lambda x: F.binary_cross_entropy_with_logits(x, t, weight=0.3 * t + 0.7 * (1 - t),
                                                                            reduction="sum"), leaf_copies([x]))
    assert_close(ours, theirs)


@pytest.mark.parametrize("gamma", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_focal_saturated_gradients_are_finite(backend, gamma, dtype):
    # torchvision's formula gives NaN here: (1 - p_t) ** (gamma - 1) at 1 - p_t = 0.
    x = torch.tensor([100.0, -100.0, 100.0, -100.0], dtype=dtype, requires_grad=True)
    t = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=dtype)
    alpha = 0.25
    loss, (grad,) = forward_backward(lambda x: lossops.sigmoid_focal_loss(x, t, alpha, gamma, "none"), [x],
                                     torch.ones(4, dtype=dtype))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # Right side of the logit: loss and gradient ~ exp(-100 (1 + gamma)) ~ 0. Wrong side: q = 1, ce = 100 and
    # dL/dx = alpha_t * (gamma * r * ce + p - t) with r = p (1 - p) -> 0, i.e. +-alpha_t.
    assert_close(loss, torch.tensor([0.0, 0.0, 75.0, 25.0], dtype=dtype))
    assert_close(grad, torch.tensor([0.0, 0.0, 0.75, -0.25], dtype=dtype))
    assert (grad[:2].abs() < 1e-30).all()


def test_sigmoid_focal_reduced_precision(backend):
    n = 256 if backend == "triton" else 4099
    x, t = 3 * torch.randn(n, dtype=torch.float64), torch.rand(n, dtype=torch.float64)
    def ours(x):
        return lossops.sigmoid_focal_loss(x, t.to(x.dtype), 0.25, 2.0, "sum")

    def truth(x):
        return torchvision_sigmoid_focal(x, t.to(x.dtype), 0.25, 2.0, "sum")

    x32 = x.float().requires_grad_()
    assert_close(forward_backward(ours, [x32]), forward_backward(truth, leaf_copies([x32])), rtol=1e-5, atol=1e-4)
    check_lowp(ours, truth, [x.requires_grad_()], torch.bfloat16, "sigmoid focal")


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_index_equals_one_hot_on_kept_rows(backend, reduction):
    C = 5
    x = torch.randn(6, C, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, C, 3, -1, 4, C])  # C: background; -1: ignored
    weight = torch.rand(C, dtype=torch.float64)
    ours = forward_backward(lambda x: lossops.sigmoid_focal_loss_index(x, index, 0.25, 1.5, reduction, ignore_index=-1,
                                                                       weight=weight), [x])
    kept = index != -1
    onehot = F.one_hot(index[kept], C + 1)[:, :C].double()

    def expected(x):
        loss = torchvision_sigmoid_focal(x[kept], onehot, 0.25, 1.5) * weight
        if reduction == "none":
            return torch.zeros(6, C, dtype=torch.float64).index_put((kept.nonzero().squeeze(1),), loss)
        return loss.sum() if reduction == "sum" else loss.sum() / loss.numel()

    assert_close(ours, forward_backward(expected, leaf_copies([x])))
    assert torch.autograd.gradcheck(lambda x: lossops.sigmoid_focal_loss_index(x, index, 0.25, 1.5, reduction,
                                                                               ignore_index=-1), (x,), fast_mode=True)


@pytest.mark.parametrize("bad", [6, -2])
def test_sigmoid_focal_index_out_of_range_names_the_value(backend, bad):
    with pytest.raises(IndexError, match=str(bad)):
        lossops.sigmoid_focal_loss_index(torch.randn(3, 5), torch.tensor([0, bad, 5]), ignore_index=-1)


def _softmax_cases():
    options = dict(alpha=(None, 0.25, "tensor"), gamma=(0.0, 0.5, 2.0), shape=((5,), (4, 5), (3, 5, 2)),
                   ignore=(False, True), reduction=("none", "mean", "sum"))
    return backend_cases({"cpp": grid(options), "reference": pairwise(options), "triton": pairwise(options)})


@pytest.mark.parametrize("backend, case", _softmax_cases(), indirect=["backend"])
def test_softmax_focal_float64_matches_paper_and_gradcheck(backend, case):
    shape = case["shape"]
    x = (3 * torch.randn(shape, dtype=torch.float64)).requires_grad_()
    target = torch.randint(0, 5, shape[:1] + shape[2:] if len(shape) > 1 else ())
    if case["ignore"] and target.dim():
        target.view(-1)[0] = -100
    alpha = torch.rand(5, dtype=torch.float64) + 0.1 if case["alpha"] == "tensor" else case["alpha"]
    args = (alpha, case["gamma"], -100, case["reduction"])
    ours = forward_backward(lambda x: lossops.softmax_focal_loss(x, target, *args), [x])
    # the oracle works on (rows, C): move the class dimension last
    def flat(x):
        return x.movedim(1, -1).reshape(-1, 5) if x.dim() > 2 else x

    theirs = forward_backward(lambda x: paper_softmax_focal(flat(x), target.reshape(-1) if x.dim() > 2 else target,
                                                            *args), leaf_copies([x]))
    if case["reduction"] == "none" and len(shape) == 3:
        theirs = (theirs[0].reshape(3, 2), theirs[1])
    assert_close(ours, theirs)
    assert torch.autograd.gradcheck(lambda x: lossops.softmax_focal_loss(x, target, *args), (x,), fast_mode=True)


def test_softmax_focal_gamma_zero_is_cross_entropy(backend):
    x, target = torch.randn(6, 4, dtype=torch.float64, requires_grad=True), torch.tensor([0, 3, 1, -100, 2, 2])
    alpha = torch.rand(4, dtype=torch.float64) + 0.1
    ours = forward_backward(lambda x: lossops.softmax_focal_loss(x, target, alpha, 0.0), [x])
    assert_close(ours, forward_backward(lambda x: F.cross_entropy(x, target, alpha), leaf_copies([x])))


@pytest.mark.parametrize("gamma", [0.2, 0.7])
def test_softmax_focal_saturated_gradients_are_finite(backend, gamma):
    x = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, 0.0]], requires_grad=True)
    loss, (grad,) = forward_backward(
        lambda x: lossops.softmax_focal_loss(x, torch.tensor([0, 0]), None, gamma, reduction="sum"),
        [x], torch.tensor(1.0))
    assert torch.isfinite(grad).all()
    # row 0 is certain and right (loss, gradient 0); row 1 certain and wrong: q = 1, the loss is CE's, 200
    assert_close(loss, torch.tensor(200.0))
    assert_close(grad, torch.tensor([[0.0, 0.0, 0.0], [-1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("call, error, match", [
    (lambda x: lossops.sigmoid_focal_loss(x, torch.rand(3, 4), gamma=-1.0), ValueError, "gamma.*-1.0"),
    (lambda x: lossops.sigmoid_focal_loss(x, torch.rand(3, 4), alpha=float("inf")), ValueError, "alpha.*inf"),
    (lambda x: lossops.sigmoid_focal_loss(x, torch.rand(4)), ValueError, "Target size"),
    (lambda x: lossops.sigmoid_focal_loss(x, torch.rand(3, 4), reduction="avg"), ValueError, "avg"),
    (lambda x: lossops.sigmoid_focal_loss_index(x, torch.rand(3)), TypeError, "target_index.*float"),
    (lambda x: lossops.sigmoid_focal_loss_index(x, torch.zeros(2, dtype=torch.long)), ValueError, r"shape \(3,\)"),
    (lambda x: lossops.softmax_focal_loss(x, torch.tensor([0, 1, 2]), gamma=float("nan")), ValueError, "gamma"),
    (lambda x: lossops.softmax_focal_loss(x, torch.tensor([0, 1, 2]), alpha=-0.5), ValueError, "alpha.*-0.5"),
    (lambda x: lossops.softmax_focal_loss(x, torch.tensor([0, 9, 2])), IndexError, "9"),
])
def test_bad_arguments(backend, call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(3, 4))


def test_modules(backend):
    x, soft, index = torch.randn(4, 3), torch.rand(4, 3), torch.tensor([0, 3, 2, -100])
    assert_close(lossops.nn.FocalLoss(0.5, 1.0)(x, soft), torchvision_sigmoid_focal(x, soft, 0.5, 1.0, "mean"))
    assert_close(lossops.nn.FocalLoss(0.5, 1.0, "sum")(x, index),
                 lossops.sigmoid_focal_loss_index(x, index, 0.5, 1.0, "sum"))
    alpha = torch.rand(3)
    module = lossops.nn.SoftmaxFocalLoss(alpha, 1.0, ignore_index=-100).double()
    assert module.alpha.dtype == torch.float64  # a buffer: converted with the module
    assert_close(module(x.double(), index.clamp(max=2)),
                 paper_softmax_focal(x.double(), index.clamp(max=2), alpha.double(), 1.0, -100, "mean"))
