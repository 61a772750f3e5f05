"""return_token_stats=True on cross_entropy and linear_cross_entropy: the per-token outputs of
lossops/losses/token_stats.py on every backend, against a float64 formulation from torch's own log_softmax."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import lossops
from _cases import assert_float64_gradients_match
from lossops.losses.token_stats import LossWithTokenStats

D64 = torch.float64
FLOAT_FIELDS = ("target_logprob", "entropy", "logsumexp", "z_loss")


def truth(logits, target, ignore_index=-100, softcap=None, temperature=1.0, lse_square_scale=0.0):
    """The documented outputs, class dimension 1, computed in float64 from torch's log_softmax."""
    z = logits.to(D64)
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    z = z / temperature
    keep = target != ignore_index
    index = torch.where(keep, target, 0).unsqueeze(1)
    log_p = z.log_softmax(1)
    lse = z.logsumexp(1)
    entropy = torch.special.entr(log_p.exp()).sum(1)  # 0 log 0 = 0 for a -inf logit
    zero = torch.zeros((), dtype=D64)
    return dict(target_logprob=torch.where(keep, log_p.gather(1, index).squeeze(1), zero),
                entropy=torch.where(keep, entropy, zero),
                correct=(z.argmax(1) == target) & keep,
                logsumexp=torch.where(keep, lse, zero),
                z_loss=torch.where(keep, lse_square_scale * lse * lse, zero))


def batch(shape=(9, 7), seed=0, dtype=D64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, dtype=D64, generator=g) * scale).to(dtype)
    t = torch.randint(0, shape[1], shape[:1] + shape[2:], generator=g)
    t.view(-1)[[1, 4]] = -100
    return x, t


OPTION_SETS = [dict(), dict(softcap=2.5), dict(temperature=0.6, lse_square_scale=0.01),
               dict(softcap=4.0, temperature=1.7, lse_square_scale=0.1, ignore_index=3)]


def _assert_stats(result, expected, **tolerance):
    assert isinstance(result, LossWithTokenStats)
    for name in FLOAT_FIELDS:
        torch.testing.assert_close(getattr(result, name).to(D64), expected[name], **tolerance)
    assert result.correct.dtype == torch.bool
    assert torch.equal(result.correct, expected["correct"])


@pytest.mark.parametrize("shape", [(9, 7), (3, 5, 4, 2), (6, 5000)], ids=["rows", "class-dim-1", "multi-block"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
def test_cross_entropy_stats(backend, shape, options):
    x, t = batch(shape)
    if "ignore_index" in options:
        t.view(-1)[[1, 4]] = options["ignore_index"]
    result = lossops.cross_entropy(x, t, return_token_stats=True, label_smoothing=0.1, **options)
    _assert_stats(result, truth(x, t, **options))
    # the loss is exactly the plain call's
    torch.testing.assert_close(result.loss, lossops.cross_entropy(x, t, label_smoothing=0.1, **options), rtol=0, atol=0)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
def test_linear_cross_entropy_stats(backend, options):
    g = torch.Generator().manual_seed(1)
    h, w, b = (torch.randn(s, dtype=D64, generator=g) for s in ((11, 6), (13, 6), (13,)))
    t = torch.randint(0, 13, (11,), generator=g)
    t[[1, 4]] = options.get("ignore_index", -100)
    result = lossops.linear_cross_entropy(h, w, t, linear_bias=b, return_token_stats=True, chunk_size=4, **options)
    _assert_stats(result, truth(F.linear(h, w, b), t, **options))
    torch.testing.assert_close(result.loss, lossops.linear_cross_entropy(h, w, t, linear_bias=b, chunk_size=4,
                                                                         **options))


def test_linear_cross_entropy_stats_with_token_options(backend):
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(10, 5, dtype=D64, generator=g), torch.randn(8, 5, dtype=D64, generator=g)
    t = torch.randint(0, 8, (2, 5), generator=g)
    t[0, 1] = -100
    tw, cw = torch.rand(2, 5, dtype=D64, generator=g) + 0.5, torch.rand(8, dtype=D64, generator=g) + 0.5
    kwargs = dict(weight=cw, token_weight=tw, lse_square_scale=0.05, chunk_size=3)
    result = lossops.linear_cross_entropy(h.reshape(2, 5, 5), w, t, return_token_stats=True, **kwargs)
    torch.testing.assert_close(result.loss, lossops.linear_cross_entropy(h.reshape(2, 5, 5), w, t, **kwargs))
    expected = truth(F.linear(h, w), t.reshape(-1), lse_square_scale=0.05)
    for name in FLOAT_FIELDS:
        assert getattr(result, name).shape == (2, 5)
        torch.testing.assert_close(getattr(result, name).reshape(-1), expected[name])


def _differentiable(result):
    return (result.loss, *(getattr(result, n) for n in FLOAT_FIELDS))


def _gradcheck_batch(options, shape=(5, 6, 2)):
    x, t = batch(shape)
    t.view(-1)[[1, 4]] = options.get("ignore_index", -100)
    return x.requires_grad_(), t


def _cross_entropy_outputs(t, reduction, options):
    return lambda x: _differentiable(lossops.cross_entropy(x, t, reduction=reduction, return_token_stats=True,
                                                           **options))


# Not on triton here: numerical differentiation runs an interpreted launch per input element. Its float64 gradients
# on these cases must equal the gradchecked C++ ones (test_triton_gradients_*), and it is gradchecked on its own on
# a smaller batch (test_gradcheck_*_triton).
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", OPTION_SETS[1:], ids=lambda o: "-".join(o))
@pytest.mark.parametrize("backend", ["cpp", "reference"], indirect=True)
def test_gradcheck_cross_entropy(backend, reduction, options):
    x, t = _gradcheck_batch(options)
    assert gradcheck(_cross_entropy_outputs(t, reduction, options), (x,))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", OPTION_SETS[1:], ids=lambda o: "-".join(o))
def test_triton_gradients_are_the_gradchecked_cpp_ones_cross_entropy(reduction, options):
    x, t = _gradcheck_batch(options)
    assert_float64_gradients_match(_cross_entropy_outputs(t, reduction, options), [x], "triton")


def test_gradcheck_cross_entropy_triton():
    options = OPTION_SETS[-1]
    x, t = _gradcheck_batch(options, shape=(3, 4, 2))
    with lossops.backend("triton"):
        assert gradcheck(_cross_entropy_outputs(t, "none", options), (x,))


def _linear_gradcheck_inputs(tokens=7, features=4, vocab=9):
    g = torch.Generator().manual_seed(3)
    h, w, b = (torch.randn(s, dtype=D64, generator=g).requires_grad_()
               for s in ((tokens, features), (vocab, features), (vocab,)))
    t = torch.randint(0, vocab, (tokens,), generator=g)
    t[2] = -100
    return (h, w, b), t


def _linear_cross_entropy_outputs(t, reduction, chunk_size=3):
    def f(h, w, b):
        return _differentiable(lossops.linear_cross_entropy(h, w, t, linear_bias=b, reduction=reduction,
                                                            chunk_size=chunk_size, softcap=3.0, temperature=1.3,
                                                            lse_square_scale=0.1, return_token_stats=True))
    return f


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", ["cpp", "reference"], indirect=True)
def test_gradcheck_linear_cross_entropy(backend, reduction):
    inputs, t = _linear_gradcheck_inputs()
    assert gradcheck(_linear_cross_entropy_outputs(t, reduction), inputs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triton_gradients_are_the_gradchecked_cpp_ones_linear_cross_entropy(reduction):
    inputs, t = _linear_gradcheck_inputs()
    assert_float64_gradients_match(_linear_cross_entropy_outputs(t, reduction), list(inputs), "triton")


def test_gradcheck_linear_cross_entropy_triton():
    inputs, t = _linear_gradcheck_inputs(tokens=3, features=2, vocab=4)
    with lossops.backend("triton"):  # two chunks of rows
        assert gradcheck(_linear_cross_entropy_outputs(t, "none", chunk_size=2), inputs)


@pytest.mark.parametrize("output", ["entropy", "target_logprob", "logsumexp", "loss_and_entropy"])
def test_one_output_trains_alone(backend, output):
    """An entropy bonus alone (no loss term): the gradient is that of torch's entropy, fp32, many classes."""
    x, t = batch((6, 3000), dtype=torch.float32)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    result = lossops.cross_entropy(ours, t, return_token_stats=True)
    expected = truth(ref, t)
    if output == "loss_and_entropy":
        (result.loss - 0.01 * result.entropy.sum()).backward()
        (F.cross_entropy(ref.double(), t) - 0.01 * expected["entropy"].sum()).backward()
    else:
        getattr(result, output).sum().backward()
        expected[output].sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad.float(), rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_entropy_gradient_matches_unfused(backend):
    h, w = torch.randn(40, 16), torch.randn(300, 16)
    t = torch.randint(0, 300, (40,))
    t[:5] = -100
    hs, ws = h.clone().requires_grad_(), w.clone().requires_grad_()
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    result = lossops.linear_cross_entropy(hs, ws, t, return_token_stats=True, chunk_size=16)
    (result.loss + 0.1 * result.entropy.mean()).backward()
    expected = truth(F.linear(hr, wr), t)
    (F.cross_entropy(F.linear(hr, wr), t) + 0.1 * expected["entropy"].mean()).backward()
    torch.testing.assert_close(hs.grad, hr.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ws.grad, wr.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_no_worse_than_torch(kernel_backend, dtype):
    x, t = batch((64, 1000), dtype=dtype, scale=4.0)
    result = lossops.cross_entropy(x, t, return_token_stats=True)
    exact = truth(x, t)
    log_p = x.log_softmax(1)  # torch in the input's dtype
    keep = t != -100
    torch_stats = dict(target_logprob=log_p.gather(1, t.clamp(0)[:, None])[:, 0],
                       entropy=-(log_p.exp() * log_p).sum(1), logsumexp=x.logsumexp(1))
    for name, theirs in torch_stats.items():
        ours = (getattr(result, name).double() - exact[name])[keep].abs().max()
        torch_error = (theirs.double() - exact[name])[keep].abs().max()
        assert getattr(result, name).dtype == torch.float32
        assert ours <= torch_error + 1e-5, (name, ours, torch_error)


def test_ignored_tokens_and_empty_batches(backend):
    x, t = batch((6, 5))
    t[:] = -100
    x.requires_grad_()
    result = lossops.cross_entropy(x, t, return_token_stats=True, lse_square_scale=0.1)
    for name in FLOAT_FIELDS:
        assert torch.equal(getattr(result, name), torch.zeros(6, dtype=D64))
    assert not result.correct.any()
    (result.entropy.sum() + result.target_logprob.sum()).backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    empty = lossops.cross_entropy(torch.randn(0, 5), torch.zeros(0, dtype=torch.long), return_token_stats=True,
                                  reduction="none")
    assert all(v.shape == (0,) for v in empty)


def test_minus_inf_logits(backend):
    """A masked vocabulary entry (-inf) contributes 0 log 0 = 0 to the entropy and no NaN to any gradient."""
    x, t = batch((6, 6))
    x[:, 2] = float("-inf")
    t[t == 2] = 0
    x.requires_grad_()
    result = lossops.cross_entropy(x, t, return_token_stats=True)
    _assert_stats(result, truth(x.detach(), t))
    (result.entropy.sum() + result.target_logprob.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, 2] == 0).all()


def test_module(backend):
    x, t = batch()
    module = lossops.nn.CrossEntropyLoss(return_token_stats=True, softcap=3.0)
    _assert_stats(module(x, t), truth(x, t, softcap=3.0))


def test_bad_inputs():
    x, t = batch()
    with pytest.raises(TypeError, match="return_token_stats must be a bool, got 1"):
        lossops.cross_entropy(x, t, return_token_stats=1)
    with pytest.raises(ValueError, match="return_token_stats=True needs class-index targets"):
        lossops.cross_entropy(x, x.softmax(1), return_token_stats=True)
    with pytest.raises(IndexError, match="Target 7 is out of bounds"):
        lossops.cross_entropy(x, torch.full((9,), 7), return_token_stats=True)
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="needs a \\(vocab, features\\) linear_weight"):
        lossops.linear_cross_entropy(h, torch.randn(5, 2, 3), torch.zeros(4, 2, dtype=torch.long),
                                     return_token_stats=True)
    with pytest.raises(ValueError, match="return_token_stats=True needs class-index targets"):
        lossops.linear_cross_entropy(h, w, torch.rand(4, 5), return_token_stats=True)
    with pytest.raises(TypeError, match="return_token_stats must be a bool"):
        lossops.linear_cross_entropy(h, w, torch.zeros(4, dtype=torch.long), return_token_stats="yes")


@pytest.mark.parametrize("kind", ["cross_entropy", "linear_cross_entropy"])
def test_compile_fullgraph(kernel_backend, kind):
    torch._dynamo.reset()
    h, w = torch.randn(8, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    t = torch.randint(0, 6, (8,))
    t[0] = -100

    def f(h, w):
        if kind == "cross_entropy":
            r = lossops.cross_entropy(h @ w.t(), t, return_token_stats=True, lse_square_scale=0.1)
        else:
            r = lossops.linear_cross_entropy(h, w, t, return_token_stats=True, lse_square_scale=0.1, chunk_size=3)
        return r.loss + 0.1 * r.entropy.sum(), r.correct

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    (loss, correct), (expected, expected_correct) = compiled(h, w), f(h, w)
    torch.testing.assert_close(loss, expected)
    assert torch.equal(correct, expected_correct)
    grads = torch.autograd.grad(loss, (h, w))
    torch.testing.assert_close(grads, torch.autograd.grad(expected, (h, w)))


def test_opcheck(kernel_backend):
    x, t = batch((5, 6, 3), dtype=torch.float32)
    logits3 = x.flatten(2).requires_grad_()
    torch.library.opcheck(torch.ops.lossops.token_stats.default, (logits3, t.reshape(-1), -100, 2.0, kernel_backend))
    h, w = torch.randn(7, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    target = torch.randint(0, 6, (7,))
    args = (h, w, None, target, None, -100, "mean", 0.0, 0.1, None, 3, True, True, False, kernel_backend)
    torch.library.opcheck(torch.ops.lossops.linear_cross_entropy_with_token_stats.default, args)


def test_inplace_backward_with_an_entropy_bonus(backend):
    """The statistics' backward reads the logits before the loss's in-place backward overwrites them."""
    h, w = torch.randn(6, 8), torch.randn(8, 5)
    t = torch.randint(0, 5, (6,))
    grads = []
    for inplace in (True, False):
        ws = w.clone().requires_grad_()
        r = lossops.cross_entropy(h @ ws, t, return_token_stats=True, inplace_backward=inplace)
        (r.loss - 0.1 * r.entropy.mean() + r.target_logprob.sum()).backward()
        grads.append(ws.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_linear_module(backend):
    module = lossops.nn.LinearCrossEntropyLoss(6, 9, bias=True, dtype=D64, temperature=1.5, return_token_stats=True,
                                               chunk_size=4)
    h = torch.randn(10, 6, dtype=D64)
    t = torch.randint(0, 9, (10,))
    result = module(h, t)
    _assert_stats(result, truth(module.linear(h).detach(), t, temperature=1.5))
    torch.testing.assert_close(result.loss, F.cross_entropy(module.linear(h) / 1.5, t))
