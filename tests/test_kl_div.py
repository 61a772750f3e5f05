"""kl_div against torch's F.kl_div: values and both gradients on every backend, every reduction and target form,
torch's warning and errors, gradcheck, low precision against a float64 truth, and where lossops differs (an
absent class's term is 0 whatever the input)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import lossops
from _cases import without_eager_routes

REDUCTIONS = ["none", "sum", "batchmean", "mean"]


def _inputs(dtype=torch.float64, shape=(7, 11), seed=0, log_target=False, absent=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64).log_softmax(-1)
    t = torch.rand(*shape, generator=gen, dtype=torch.float64).softmax(-1)
    if absent:
        t.view(-1)[::5] = 0  # absent classes: torch's 0 log 0 = 0
    if log_target:
        t = t.log()
    return x.to(dtype).requires_grad_(), t.to(dtype).requires_grad_()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def _grads(loss, x, t):
    g = torch.rand_like(loss) if loss.dim() else torch.tensor(1.7, dtype=loss.dtype)
    return torch.autograd.grad(loss, (x, t), g, allow_unused=True), g


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("shape", [(7, 11), (3, 4, 5), (5,), (2, 300)])
def test_matches_torch(backend, reduction, log_target, shape):
    x, t = _inputs(shape=shape, log_target=log_target, absent=not log_target)
    loss = _quiet(lossops.kl_div, x, t, reduction=reduction, log_target=log_target)
    ref = _quiet(F.kl_div, x, t, reduction=reduction, log_target=log_target)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.manual_seed(3)
    (gx, gt), g = _grads(loss, x, t)
    ref_gx, ref_gt = torch.autograd.grad(ref, (x, t), g)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gt, ref_gt, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_mean_warns_as_torch_and_batchmean_divides_by_the_batch(backend):
    x, t = _inputs()
    with pytest.warns(UserWarning, match="'batchmean' divides only by the batch size"):
        lossops.kl_div(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's warning is for "mean" only
        batch = lossops.kl_div(x, t, reduction="batchmean")
    torch.testing.assert_close(batch, lossops.kl_div(x, t, reduction="sum") / x.shape[0])
    scalar = lossops.kl_div(x[0, 0], t[0, 0], reduction="batchmean")  # 0-d: the sum, as torch
    torch.testing.assert_close(scalar, F.kl_div(x[0, 0], t[0, 0], reduction="batchmean"))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("log_target", [False, True])
def test_gradcheck(backend, reduction, log_target):
    x, t = _inputs(shape=(4, 5), log_target=log_target, absent=False)
    fn = lambda a, b: _quiet(lossops.kl_div, a, b, reduction=reduction, log_target=log_target)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, t), fast_mode=backend == "triton")


def test_broadcasting_and_promotion_as_torch(backend):
    x, _ = _inputs(shape=(3, 4))
    t = torch.rand(4, dtype=torch.float32).softmax(0)
    loss = lossops.kl_div(x.detach().float().bfloat16(), t, reduction="sum")
    ref = F.kl_div(x.detach().float().bfloat16(), t, reduction="sum")
    assert loss.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    loss = lossops.kl_div(x, t.double(), reduction="none")
    assert loss.shape == (3, 4)
    torch.testing.assert_close(loss, F.kl_div(x, t.double(), reduction="none"))


def test_absent_classes_give_the_limit_where_torch_gives_nan(backend):
    """torch: 0 * log 0 products are NaN when the input is -inf (probabilities) or the target -inf (log target);
    the divergence's term there is 0, and so is the input's gradient."""
    x = torch.tensor([[-math.inf, -0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.0, 0.4, 0.6]], dtype=torch.float64)
    loss = lossops.kl_div(x, t, reduction="sum")
    assert torch.isnan(F.kl_div(x, t, reduction="sum"))
    torch.testing.assert_close(loss, F.kl_div(x[:, 1:], t[:, 1:], reduction="sum"))
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.equal(gx, torch.tensor([[0.0, -0.4, -0.6]], dtype=torch.float64))
    log_t = torch.tensor([[-math.inf, -0.5, -1.0]], dtype=torch.float64, requires_grad=True)
    x2 = torch.tensor([[-0.2, -0.5, -1.5]], dtype=torch.float64, requires_grad=True)
    loss = lossops.kl_div(x2, log_t, reduction="sum", log_target=True)
    assert torch.isnan(F.kl_div(x2, log_t, reduction="sum", log_target=True))
    assert torch.isfinite(loss)
    gx, gt = torch.autograd.grad(loss, (x2, log_t))
    assert gx[0, 0] == 0 and gt[0, 0] == 0 and torch.isfinite(gt).all()


def test_bfloat16_no_worse_than_torch(backend):
    x64, t64 = _inputs(shape=(64, 1000), absent=False)
    truth = F.kl_div(x64, t64, reduction="batchmean")
    xb, tb = x64.detach().bfloat16(), t64.detach().bfloat16()
    ours = (lossops.kl_div(xb, tb, reduction="batchmean").double() - truth).abs()
    theirs = (F.kl_div(xb, tb, reduction="batchmean").double() - truth).abs()
    assert ours <= theirs * 1.01 + 1e-3


@pytest.mark.parametrize("call, error", [
    (lambda x, t: lossops.kl_div(x, t, reduction="avg"), ValueError),
    (lambda x, t: lossops.kl_div(x, t[:, :3]), RuntimeError),
    (lambda x, t: lossops.kl_div(x, t.long()), RuntimeError),
    (lambda x, t: lossops.kl_div(x, t, log_target=1), TypeError),
])
def test_bad_arguments(call, error):
    x, t = _inputs()
    with pytest.raises(error):
        _quiet(call, x, t)


def test_module_and_eager_path():
    x, t = _inputs(dtype=torch.float32)
    module = lossops.nn.KLDivLoss(reduction="batchmean", log_target=False)
    assert "batchmean" in repr(module)
    loss = module(x, t)
    assert loss.grad_fn.name() == "LossopsElementwiseBackward"  # the C++ eager route, batch denominator
    torch.testing.assert_close(loss, F.kl_div(x, t, reduction="batchmean"))
    with pytest.MonkeyPatch.context() as m:
        without_eager_routes(m)
        custom = lossops.kl_div(x, t, reduction="batchmean")
    assert custom.grad_fn.name() != "LossopsElementwiseBackward"
    torch.testing.assert_close(loss, custom, rtol=0, atol=0)
    legacy = lossops.nn.KLDivLoss(size_average=False)
    torch.testing.assert_close(legacy(x, t), F.kl_div(x, t, reduction="sum"))


def test_module_db_samples(backend):
    from torch.testing._internal.common_modules import module_db
    (info,) = [m for m in module_db if m.module_cls is torch.nn.KLDivLoss]
    samples = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True, training=True)
    assert samples
    for sample in samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        ours, theirs = lossops.nn.KLDivLoss(*args, **kwargs), torch.nn.KLDivLoss(*args, **kwargs)
        inputs = sample.forward_input.args
        torch.testing.assert_close(_quiet(ours, *inputs), _quiet(theirs, *inputs), equal_nan=True)
