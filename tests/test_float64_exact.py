"""Float64 results exact to rounding: every op and option, on every backend, against torch in float64.

The other suites compare float64 at assert_close's default rtol of 1e-7, which a constant rounded to float32
inside a float64 computation (torch.where(mask, 0.9, 0) is a float32 tensor; so is a float literal in a Triton
kernel) passes unnoticed. Here values and gradients must agree to rtol 1e-12: float64 kernels have no
approximation to hide behind. Logits stay moderate so that the oracles' own formulas (torchvision's 1 - p_t,
the focal paper's 1 - p_y) do not cancel and become the inexact side.
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import backend_cases, forward_backward, leaf_copies, pairwise, spawn
from test_cross_entropy import torch_loss
from test_distributed import _data, _scaled, _shard
from test_focal import paper_softmax_focal, torchvision_sigmoid_focal
from test_regression import expected as regression_expected

TOL = dict(rtol=1e-12, atol=1e-14)
N, C = 6, 7


def assert_exact(ours, theirs):
    (loss, grads), (expected, expected_grads) = ours, theirs
    assert loss.dtype == expected.dtype == torch.float64
    assert_close(loss, expected, equal_nan=True, **TOL)
    for name, g, e in zip("abcdefgh", grads, expected_grads):
        assert_close(g, e, equal_nan=True, **TOL, msg=lambda m: f"gradient {name}: {m}")


def logits(*shape):
    return (2 * torch.randn(shape, dtype=torch.float64)).requires_grad_()


def class_targets(shape, ignore):
    target = torch.randint(0, C, shape)
    if ignore:
        target.view(-1)[::3] = 2
    return target


# --- cross_entropy -------------------------------------------------------------------------------------------------

CE_OPTIONS = dict(target=("index", "prob"), shape=((N, C), (2, C, 3)), weight=(False, True), ignore=(False, True),
                  reduction=("none", "mean", "sum"), label_smoothing=(0.0, 0.1, 0.7),
                  lse_square_scale=(0.0, 0.03), softcap=(None, 2.5))


def _ce_valid(case):
    return not (case["target"] == "prob" and case["ignore"])


@pytest.mark.parametrize("backend, case", backend_cases({b: pairwise(CE_OPTIONS, _ce_valid)
                                                         for b in ("cpp", "triton", "reference")}),
                         indirect=["backend"])
def test_cross_entropy(backend, case):
    shape = case["shape"]
    x = logits(*shape)
    kwargs = dict(reduction=case["reduction"], label_smoothing=case["label_smoothing"],
                  lse_square_scale=case["lse_square_scale"], softcap=case["softcap"])
    if case["weight"]:
        kwargs["weight"] = 0.5 + torch.rand(C, dtype=torch.float64)
    if case["ignore"]:
        kwargs["ignore_index"] = 2
    if case["target"] == "prob":
        target = torch.randn(shape, dtype=torch.float64).softmax(1)
    else:
        target = class_targets(shape[:1] + shape[2:], case["ignore"])
    ours = forward_backward(lambda x: lossops.cross_entropy(x, target, **kwargs), [x])
    assert_exact(ours, forward_backward(lambda x: torch_loss(x, target, **kwargs), leaf_copies([x])))


# --- focal losses --------------------------------------------------------------------------------------------------

SOFTMAX_FOCAL_OPTIONS = dict(alpha=(None, 0.3, "tensor"), gamma=(0.0, 0.5, 2.0), ignore=(False, True),
                             reduction=("none", "mean", "sum"))


@pytest.mark.parametrize("backend, case", backend_cases({b: pairwise(SOFTMAX_FOCAL_OPTIONS)
                                                         for b in ("cpp", "triton", "reference")}),
                         indirect=["backend"])
def test_softmax_focal_loss(backend, case):
    x = logits(N, C)
    target = class_targets((N,), case["ignore"])
    alpha = 0.5 + torch.rand(C, dtype=torch.float64) if case["alpha"] == "tensor" else case["alpha"]
    ignore_index = 2 if case["ignore"] else -100
    args = (alpha, case["gamma"], ignore_index, case["reduction"])
    ours = forward_backward(lambda x: lossops.softmax_focal_loss(x, target, *args), [x])
    assert_exact(ours, forward_backward(lambda x: paper_softmax_focal(x, target, *args), leaf_copies([x])))


SIGMOID_FOCAL_OPTIONS = dict(alpha=(0.25, -1.0, 0.8), gamma=(0.0, 0.5, 2.0), targets=("hard", "soft"),
                             reduction=("none", "mean", "sum"))


@pytest.mark.parametrize("backend, case", backend_cases({b: pairwise(SIGMOID_FOCAL_OPTIONS)
                                                         for b in ("cpp", "triton", "reference")}),
                         indirect=["backend"])
def test_sigmoid_focal_loss(backend, case):
    x = logits(N, C)
    t = torch.randint(0, 2, (N, C)).double() if case["targets"] == "hard" else torch.rand(N, C, dtype=torch.float64)
    args = (case["alpha"], case["gamma"], case["reduction"])
    ours = forward_backward(lambda x: lossops.sigmoid_focal_loss(x, t, *args), [x])
    assert_exact(ours, forward_backward(lambda x: torchvision_sigmoid_focal(x, t, *args), leaf_copies([x])))


# --- elementwise losses with torch counterparts ------------------------------------------------------------------

BCE_OPTIONS = dict(weight=(None, "row", "full"), pos_weight=(None, "row", "full"), reduction=("none", "mean", "sum"),
                   target_grad=(False, True))


def _operand(kind):
    return {None: None, "row": 0.1 + 2 * torch.rand(C, dtype=torch.float64),
            "full": 0.1 + 2 * torch.rand(N, C, dtype=torch.float64)}[kind]


@pytest.mark.parametrize("backend, case", backend_cases({b: pairwise(BCE_OPTIONS)
                                                         for b in ("cpp", "triton", "reference")}),
                         indirect=["backend"])
def test_binary_cross_entropy_with_logits(backend, case):
    x = logits(N, C)
    t = torch.rand(N, C, dtype=torch.float64).requires_grad_(case["target_grad"])
    kwargs = dict(weight=_operand(case["weight"]), pos_weight=_operand(case["pos_weight"]),
                  reduction=case["reduction"])
    ours = forward_backward(lambda x, t: lossops.binary_cross_entropy_with_logits(x, t, **kwargs), [x, t])
    theirs = forward_backward(lambda x, t: F.binary_cross_entropy_with_logits(x, t, **kwargs), leaf_copies([x, t]))
    assert_exact(ours, theirs)


REGRESSION = {"l1_loss": (None,), "mse_loss": (None,), "smooth_l1_loss": (0.0, 0.3, 1.0, 2.5),
              "huber_loss": (0.3, 1.0, 2.5)}
REGRESSION_OPTIONS = dict(reduction=("none", "mean", "sum"), weight=(False, True), target_grad=(False, True))


@pytest.mark.parametrize("backend, op, param, case", [
    pytest.param(b, op, p, c, id=f"{b}-{op}-{p}-" + "-".join(map(str, c.values())))
    for b in ("cpp", "triton", "reference") for op, params in REGRESSION.items() for p in params
    for c in pairwise(REGRESSION_OPTIONS)], indirect=["backend"])
def test_regression(backend, op, param, case):
    x = logits(N, C)
    t = (2 * torch.randn(N, C, dtype=torch.float64)).requires_grad_(case["target_grad"])
    weight = 0.1 + torch.rand(N, C, dtype=torch.float64) if case["weight"] else None
    kwargs = dict(reduction=case["reduction"], weight=weight)
    options = {} if param is None else {"beta" if op == "smooth_l1_loss" else "delta": param}
    ours = forward_backward(lambda x, t: getattr(lossops, op)(x, t, **kwargs, **options), [x, t])
    theirs = forward_backward(lambda x, t: regression_expected(op, x, t, param, **kwargs), leaf_copies([x, t]))
    assert_exact(ours, theirs)


# --- linear and vocabulary-parallel cross-entropy ------------------------------------------------------------------

LINEAR_OPTIONS = dict(bias=(False, True), ignore=(False, True), reduction=("none", "mean", "sum"),
                      label_smoothing=(0.0, 0.1), lse_square_scale=(0.0, 0.03), softcap=(None, 2.5))


@pytest.mark.parametrize("backend, case", backend_cases({b: pairwise(LINEAR_OPTIONS)
                                                         for b in ("cpp", "triton", "reference")}),
                         indirect=["backend"])
def test_linear_cross_entropy(backend, case):
    hidden = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(C, 5, dtype=torch.float64) / 2).requires_grad_()
    bias = torch.randn(C, dtype=torch.float64, requires_grad=True) if case["bias"] else None
    target = class_targets((11,), case["ignore"])
    kwargs = dict(reduction=case["reduction"], label_smoothing=case["label_smoothing"],
                  lse_square_scale=case["lse_square_scale"], softcap=case["softcap"],
                  ignore_index=2 if case["ignore"] else -100)
    leaves = [t for t in (hidden, weight, bias) if t is not None]

    def ours_fn(h, w, *b):
        return lossops.linear_cross_entropy(h, w, target, linear_bias=b[0] if b else None, chunk_size=4, **kwargs)

    def torch_fn(h, w, *b):
        return torch_loss(F.linear(h, w, *b), target, **kwargs)

    assert_exact(forward_backward(ours_fn, leaves), forward_backward(torch_fn, leaf_copies(leaves)))


VOCAB_PARALLEL_OPTIONS = [dict(), dict(ignore_index=5), dict(label_smoothing=0.1), dict(label_smoothing=0.7),
                          dict(ignore_index=5, label_smoothing=0.3)]


def _vocab_parallel_worker(rank, world_size, init_file):
    from lossops.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        shard = _shard(world_size, rank)
        for seed, options in enumerate(VOCAB_PARALLEL_OPTIONS):
            for reduction in ("none", "mean", "sum"):
                logits_, target, grad_output, options = _data(options, seed)
                local = logits_[:, shard].clone().requires_grad_()
                full = logits_.clone().requires_grad_()
                loss = vocab_parallel_cross_entropy(local, target, reduction=reduction, **options)
                expected = F.cross_entropy(full, target, reduction=reduction, **options)
                assert_close(loss, expected, **TOL)
                _scaled(loss, grad_output, reduction).backward()
                _scaled(expected, grad_output, reduction).backward()
                assert_close(local.grad, full.grad[:, shard], **TOL)

                gen = torch.Generator().manual_seed(seed)
                hidden = torch.randn(target.numel(), 4, dtype=torch.float64, generator=gen)
                weight = torch.randn(logits_.shape[1], 4, dtype=torch.float64, generator=gen)
                ours = [hidden.clone().requires_grad_(), weight[shard].clone().requires_grad_()]
                ref = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
                loss = vocab_parallel_linear_cross_entropy(*ours, target, reduction=reduction, **options)
                expected = F.cross_entropy(F.linear(*ref), target, reduction=reduction, **options)
                assert_close(loss, expected, **TOL)
                _scaled(loss, grad_output, reduction).backward()
                _scaled(expected, grad_output, reduction).backward()
                assert_close(ours[0].grad, ref[0].grad, **TOL)
                assert_close(ours[1].grad, ref[1].grad[shard], **TOL)
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_cross_entropy_on_2_ranks(tmp_path):
    spawn(_vocab_parallel_worker, 2, 2, str(tmp_path / "store"))
