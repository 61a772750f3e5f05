"""temperature, token_weight and num_items_in_batch on cross_entropy and linear_cross_entropy, every backend,
against the rules of lossops/losses/token_options.py written out independently in float64 here."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import lossops
from _cases import assert_float64_gradients_match

D64 = torch.float64


def truth(logits, target, token_weight=None, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
          lse_square_scale=0.0, softcap=None, temperature=1.0, num_items=None):
    """The documented rules from torch's own per-token losses (class dimension 1)."""
    z = logits if softcap is None else softcap * torch.tanh(logits / softcap)
    z = z / temperature
    keep = (target != ignore_index).to(z.dtype)
    tw = torch.ones(target.shape, dtype=z.dtype) if token_weight is None else token_weight
    ce = F.cross_entropy(z, target, weight, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)  # already w_i * ce_i
    zl = lse_square_scale * torch.logsumexp(z, dim=1) ** 2 * keep
    per_token = tw * (ce + zl)
    if reduction == "none":
        return per_token
    if reduction == "sum" or num_items is not None:
        return per_token.sum() / (1 if num_items is None else num_items)
    w_i = torch.ones_like(keep) if weight is None else weight[torch.where(target == ignore_index, 0, target)]
    return (tw * ce).sum() / (tw * w_i * keep).sum() + (tw * zl).sum() / (tw * keep).sum()


def batch(seed=0, dims=()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 5, *dims, dtype=D64, generator=g) * 2
    t = torch.randint(0, 5, (7, *dims), generator=g)
    t.view(-1)[[2, 5]] = -100
    tw = torch.rand(t.shape, dtype=D64, generator=g) + 0.25
    w = torch.rand(5, dtype=D64, generator=g) + 0.5
    return x, t, tw, w


OPTION_SETS = [
    dict(),
    dict(weight=True),
    dict(label_smoothing=0.2, weight=True),
    dict(lse_square_scale=0.05, weight=True),
    dict(lse_square_scale=0.05, softcap=3.0, temperature=0.7),
    dict(temperature=2.5, label_smoothing=0.1),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
def test_cross_entropy_token_weight(backend, options, reduction):
    x, t, tw, w = batch(dims=(3,) if "weight" in options else ())
    kwargs = dict(options)
    weight = w if kwargs.pop("weight", False) else None
    got = lossops.cross_entropy(x, t, weight, reduction=reduction, token_weight=tw, **kwargs)
    expected = truth(x, t, tw, weight, reduction=reduction, **kwargs)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(o) or "plain")
def test_unit_token_weights_are_the_plain_call(kernel_backend, options):
    x, t, _, w = batch(seed=1)
    kwargs = dict(options)
    weight = w if kwargs.pop("weight", False) else None
    plain = lossops.cross_entropy(x, t, weight, **kwargs)
    torch.testing.assert_close(lossops.cross_entropy(x, t, weight, token_weight=torch.ones(7, dtype=D64), **kwargs),
                               plain)


def test_temperature_matches_torch_on_scaled_logits(backend):
    x, t, _, _ = batch(seed=2)
    for temperature in (0.5, 1.0, 3.0):
        torch.testing.assert_close(lossops.cross_entropy(x, t, temperature=temperature),
                                   F.cross_entropy(x / temperature, t))
    torch.testing.assert_close(lossops.cross_entropy(x, t, temperature=2.0, softcap=1.5),
                               F.cross_entropy(1.5 * torch.tanh(x / 1.5) / 2.0, t))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(backend, as_tensor):
    x, t, tw, w = batch(seed=3)
    n = torch.tensor(11) if as_tensor else 11
    torch.testing.assert_close(lossops.cross_entropy(x, t, num_items_in_batch=n),
                               F.cross_entropy(x, t, reduction="sum") / 11)
    torch.testing.assert_close(lossops.cross_entropy(x, t, w, num_items_in_batch=n, token_weight=tw,
                                                     lse_square_scale=0.1),
                               truth(x, t, tw, w, lse_square_scale=0.1, num_items=11))


def test_probability_targets_mean_over_token_weights(backend):
    x, _, tw, _ = batch(seed=4)
    p = torch.randn(7, 5, dtype=D64).softmax(1)
    expected = (tw * F.cross_entropy(x, p, reduction="none")).sum() / tw.sum()
    torch.testing.assert_close(lossops.cross_entropy(x, p, token_weight=tw), expected)


def test_class_dim_1_layout(kernel_backend):
    x, t, tw, w = batch(seed=5, dims=(2, 3))
    torch.testing.assert_close(lossops.cross_entropy(x, t, w, token_weight=tw, temperature=1.3),
                               truth(x, t, tw, w, temperature=1.3))


def test_bf16_token_weights_no_worse_than_torch():
    x, t, tw, _ = batch(seed=6)
    exact = truth(x, t, tw)
    ours = lossops.cross_entropy(x.bfloat16(), t, token_weight=tw.float()).double()
    theirs = (tw.float() * F.cross_entropy(x.bfloat16(), t, reduction="none").float()).sum() / \
        (tw.float() * (t != -100)).sum()
    assert (ours - exact).abs() <= (theirs.double() - exact).abs() + 2 ** -8 * exact.abs()


GRADCHECK_CASES = [dict(temperature=0.8, softcap=2.0, lse_square_scale=0.1, class_weight=True),
                   dict(label_smoothing=0.1, class_weight=True),
                   dict(num_items_in_batch=9, class_weight=True),
                   dict(reduction="none", temperature=2.0)]
GRADCHECK_IDS = ["temperature-softcap-z-loss", "smoothing", "num_items_in_batch", "none"]


def _gradcheck_call(kwargs, rows=7):
    """The loss as a function of the logits and the token weights, and those two inputs (float64 leaves)."""
    x, t, tw, w = batch(seed=7)
    x, t, tw = x[:rows].requires_grad_(True), t[:rows], tw[:rows].requires_grad_(True)
    kwargs = dict(kwargs)
    weight = w if kwargs.pop("class_weight", False) else None
    return (lambda a, b: lossops.cross_entropy(a, t, weight, token_weight=b, **kwargs)), [x, tw]


# Not on triton here: numerical differentiation runs an interpreted launch per input element. Its float64 gradients
# on these cases must equal the gradchecked C++ ones (test_triton_gradients_are_the_gradchecked_cpp_ones), and it is
# gradchecked on its own on fewer rows (test_gradcheck_triton).
@pytest.mark.parametrize("backend_name", ["cpp", "reference"])
@pytest.mark.parametrize("kwargs", GRADCHECK_CASES, ids=GRADCHECK_IDS)
def test_gradcheck(backend_name, kwargs):
    fn, inputs = _gradcheck_call(kwargs)
    with lossops.backend(backend_name):
        assert gradcheck(fn, inputs)


@pytest.mark.parametrize("kwargs", GRADCHECK_CASES, ids=GRADCHECK_IDS)
def test_triton_gradients_are_the_gradchecked_cpp_ones(kwargs):
    fn, inputs = _gradcheck_call(kwargs)
    assert_float64_gradients_match(fn, inputs, "triton")


def test_gradcheck_triton():
    fn, inputs = _gradcheck_call(GRADCHECK_CASES[0], rows=3)  # the third row's target is ignored
    with lossops.backend("triton"):
        assert gradcheck(fn, inputs)


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.6, softcap=4.0), dict(lse_square_scale=0.1)],
                         ids=["plain", "temperature-softcap", "z-loss"])
def test_linear_cross_entropy(backend, options):
    g = torch.Generator().manual_seed(8)
    h = torch.randn(9, 6, dtype=D64, generator=g)
    lw = torch.randn(11, 6, dtype=D64, generator=g)
    bias = torch.randn(11, dtype=D64, generator=g)
    t = torch.randint(0, 11, (9,), generator=g)
    t[3] = -100
    tw = torch.rand(9, dtype=D64, generator=g)
    w = torch.rand(11, dtype=D64, generator=g) + 0.5
    logits = F.linear(h, lw, bias)
    for reduction in ("mean", "sum", "none"):
        got = lossops.linear_cross_entropy(h, lw, t, linear_bias=bias, weight=w, reduction=reduction,
                                           token_weight=tw, chunk_size=4, **options)
        torch.testing.assert_close(got, truth(logits, t, tw, w, reduction=reduction, **options))
    got = lossops.linear_cross_entropy(h, lw, t, linear_bias=bias, num_items_in_batch=torch.tensor(5.0), **options)
    torch.testing.assert_close(got, truth(logits, t, reduction="sum", **options) / 5)


def _linear_gradcheck_call(tokens=5, features=4, vocab=7):
    """The loss as a function of the hidden states, head weight, bias and token weights, and those inputs."""
    g = torch.Generator().manual_seed(9)
    h = torch.randn(tokens, features, dtype=D64, generator=g, requires_grad=True)
    lw = torch.randn(vocab, features, dtype=D64, generator=g, requires_grad=True)
    bias = torch.randn(vocab, dtype=D64, generator=g, requires_grad=True)
    tw = torch.rand(tokens, dtype=D64, generator=g, requires_grad=True)
    t = torch.tensor([0, vocab - 1, -100, 3, 3][:tokens])

    def f(a, b, c, d):
        return lossops.linear_cross_entropy(a, b, t, linear_bias=c, token_weight=d, temperature=1.7, softcap=3.0,
                                            chunk_size=2)
    return f, [h, lw, bias, tw]


@pytest.mark.parametrize("backend_name", ["cpp"])
def test_linear_cross_entropy_gradcheck(backend_name):
    fn, inputs = _linear_gradcheck_call()
    with lossops.backend(backend_name):
        assert gradcheck(fn, inputs)


def test_triton_linear_cross_entropy_gradients_are_the_gradchecked_cpp_ones():
    fn, inputs = _linear_gradcheck_call()
    assert_float64_gradients_match(fn, inputs, "triton")


def test_linear_cross_entropy_gradcheck_triton():
    fn, inputs = _linear_gradcheck_call(tokens=3, features=2, vocab=4)  # two chunks, the third row ignored
    with lossops.backend("triton"):
        assert gradcheck(fn, inputs)


def test_module_takes_token_weight_per_call():
    x, t, tw, _ = batch(seed=10)
    module = lossops.nn.CrossEntropyLoss(temperature=2.0, label_smoothing=0.1)
    torch.testing.assert_close(module(x, t, token_weight=tw), truth(x, t, tw, temperature=2.0, label_smoothing=0.1))
    torch.testing.assert_close(module(x, t, num_items_in_batch=3), truth(x, t, temperature=2.0,
                                                                         label_smoothing=0.1, num_items=3))


@pytest.mark.parametrize("kwargs, exception, match", [
    (dict(temperature=0.0), ValueError, "temperature must be a positive finite number, got 0.0"),
    (dict(temperature=-2.0), ValueError, "temperature must be a positive finite number, got -2.0"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a positive finite number, got nan"),
    (dict(temperature="hot"), TypeError, "temperature must be a number"),
    (dict(token_weight=torch.ones(3)), ValueError, r"token_weight must have one weight per token, shape \(7,\)"),
    (dict(token_weight=torch.ones(7, dtype=torch.int64)), TypeError, "token_weight must be a floating-point"),
    (dict(token_weight=[1.0] * 7), TypeError, "token_weight"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be > 0, got 0"),
    (dict(num_items_in_batch=True), ValueError, "num_items_in_batch must be > 0, got True"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "num_items_in_batch must be a number or a one-element"),
    (dict(num_items_in_batch=4, reduction="sum"), ValueError, "needs reduction='mean', got reduction='sum'"),
    (dict(temperature=2.0, softcap=-1.0), ValueError, "softcap must be a positive finite number or None, got -1.0"),
])
@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_bad_arguments(op, kwargs, exception, match):
    x, t, _, _ = batch(seed=11)
    with pytest.raises(exception, match=match):
        if op == "cross_entropy":
            lossops.cross_entropy(x, t, **kwargs)
        else:
            lossops.linear_cross_entropy(x, torch.randn(5, 5, dtype=D64), t, **kwargs)


def test_bad_target_still_named():
    x, t, tw, _ = batch(seed=12)
    t[0] = 9
    with pytest.raises(IndexError, match="Target 9 is out of bounds"):
        lossops.cross_entropy(x, t, token_weight=tw)


def test_compiles_whole_graph_with_the_new_keywords():
    x, t, tw, w = batch(seed=13)
    x.requires_grad_(True)
    tw.requires_grad_(True)
    n = torch.tensor(6.0)

    def step(a, b, count):
        return (lossops.cross_entropy(a, t, w, token_weight=b, temperature=1.5, lse_square_scale=0.1)
                + lossops.cross_entropy(a, t, num_items_in_batch=count))

    eager = step(x, tw, n)
    eager_grads = torch.autograd.grad(eager, (x, tw))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, tw, n)
    torch.testing.assert_close(compiled, eager)
    for got, expected in zip(torch.autograd.grad(compiled, (x, tw)), eager_grads):
        torch.testing.assert_close(got, expected)


def test_linear_cross_entropy_module_takes_token_options():
    torch.manual_seed(14)
    module = lossops.nn.LinearCrossEntropyLoss(6, 11, bias=True).double()
    h = torch.randn(9, 6, dtype=D64)
    t = torch.randint(0, 11, (9,))
    tw = torch.rand(9, dtype=D64)
    logits = F.linear(h, module.linear.weight, module.linear.bias)
    torch.testing.assert_close(module(h, t, token_weight=tw, num_items_in_batch=4),
                               truth(logits, t, tw, num_items=4))
