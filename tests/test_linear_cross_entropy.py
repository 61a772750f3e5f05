"""lossops.linear_cross_entropy against cross_entropy(hidden @ weight.T + bias) in value and in every gradient."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import lossops
from lossops.losses.cross_entropy import CrossEntropyOptions, reference_cross_entropy
from lossops.losses import linear_cross_entropy as linear_ce
from lossops.losses.linear_cross_entropy import LOGITS_BUDGET, chunk_rows
from _cases import NATIVE_WEIGHT_GRADIENT_BOUND, assert_no_worse_than_torch, linear_loss_peak_beyond_gradients

REDUCTIONS = ["mean", "sum", "none"]
# OpInfo-like option cases: each extra alone, then all together (with and without a bias).
CASES = {
    "plain": dict(),
    "no_bias": dict(bias=False),
    "ignore_index": dict(ignore_index=3),
    "label_smoothing": dict(label_smoothing=0.2),
    "z_loss": dict(lse_square_scale=1e-2),
    "softcap": dict(softcap=4.0),
    "all": dict(ignore_index=3, label_smoothing=0.1, lse_square_scale=1e-2, softcap=4.0),
}
N, D, V, CHUNK = 37, 16, 50, 8  # 5 chunks, the last one short

TORCH_HAS_LINEAR_CE = hasattr(F, "linear_cross_entropy")  # torch 2.13 and later
needs_torch_linear_ce = pytest.mark.skipif(not TORCH_HAS_LINEAR_CE, reason="torch has no F.linear_cross_entropy "
                                           "before 2.13: nothing to compare with")


def _triton_kernels_present():
    return importlib.util.find_spec("lossops.triton_kernels.cross_entropy") is not None


def make_inputs(case, n=N, d=D, v=V, dtype=torch.float64):
    case = dict(case)
    with_bias = case.pop("bias", True)
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d, dtype=dtype) / d ** 0.25).requires_grad_()
    bias = torch.randn(v, dtype=dtype, requires_grad=True) if with_bias else None
    target = torch.randint(0, v, (n,))
    target[::4] = case.get("ignore_index", -100)  # every fourth row ignored
    return hidden, weight, bias, target, case


def truth(hidden, weight, bias, target, reduction="mean", ignore_index=-100, label_smoothing=0.0,
          lse_square_scale=0.0, softcap=None):
    """The contract: plain PyTorch on the materialised logits (lossops' extras in their plain-torch form)."""
    options = CrossEntropyOptions(ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    return reference_cross_entropy(F.linear(hidden, weight, bias), target, None, options)


def leaves(hidden, weight, bias):
    return [t for t in (hidden, weight, bias) if t is not None]


def check_against_truth(hidden, weight, bias, target, reduction, options, rtol=1e-7, atol=1e-9, **kwargs):
    loss = lossops.linear_cross_entropy(hidden, weight, target, linear_bias=bias, reduction=reduction, **options,
                                        **kwargs)
    expected = truth(hidden, weight, bias, target, reduction, **options)
    torch.testing.assert_close(loss, expected, rtol=rtol, atol=atol)
    # A non-uniform upstream gradient: reduction='none' cannot be pre-scaled in forward.
    grad_output = torch.rand_like(expected) + 0.5
    got = torch.autograd.grad(loss, leaves(hidden, weight, bias), grad_output)
    want = torch.autograd.grad(expected, leaves(hidden, weight, bias), grad_output)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("backend_name", ["cpp", "reference"])
def test_matches_torch(backend_name, case, reduction):
    hidden, weight, bias, target, options = make_inputs(case)
    with lossops.backend(backend_name):
        check_against_truth(hidden, weight, bias, target, reduction, options, chunk_size=CHUNK)


def split_logits_products(monkeypatch, weight_bytes: int) -> list:
    """Makes a chunk's CPU logits product take weight_bytes of the weight's vocabulary rows a call; returns the list
    of the blocks (rows) each product used."""
    monkeypatch.setattr(linear_ce, "_LOGITS_WEIGHT_BYTES", weight_bytes)
    monkeypatch.setattr(linear_ce, "_MIN_LOGITS_BLOCK", 1)
    blocks, product = [], linear_ce._Chunks._product

    def recording(chunks, h, logits):
        blocks.append(chunks.logits_block)
        return product(chunks, h, logits)
    monkeypatch.setattr(linear_ce._Chunks, "_product", recording)
    return blocks


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("case", ["plain", "no_bias", "all"])
def test_logits_formed_in_vocabulary_blocks(monkeypatch, case, reduction):
    """A chunk's logits on CPU are formed a block of the weight's vocabulary rows at a time, each block written
    into the chunk's logits through a strided out=: blocks of 16 of V = 50 (the last short), with and without a
    bias, give torch's values and gradients."""
    blocks = split_logits_products(monkeypatch, 16 * D * 8)  # 16 rows of D float64 features
    hidden, weight, bias, target, options = make_inputs(CASES[case])
    with lossops.backend("cpp"):
        check_against_truth(hidden, weight, bias, target, reduction, options, chunk_size=CHUNK)
    assert blocks and set(blocks) == {16}


@pytest.mark.skipif(not _triton_kernels_present(), reason="lossops.triton_kernels.cross_entropy not built yet")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_torch_triton(reduction):
    hidden, weight, bias, target, options = make_inputs(CASES["all"], dtype=torch.float32)
    with lossops.backend("triton"):
        check_against_truth(hidden, weight, bias, target, reduction, options, rtol=1e-5, atol=1e-6,
                            chunk_size=CHUNK)


def gradcheck(case, reduction):
    hidden, weight, bias, target, options = make_inputs(case, n=6, d=3, v=5)
    target[0] = 4 if options.get("ignore_index") != 4 else 0  # at least one counted row

    def f(*tensors):
        h, w, *b = tensors
        return lossops.linear_cross_entropy(h, w, target, linear_bias=b[0] if b else None, reduction=reduction,
                                            chunk_size=4, **options)
    assert torch.autograd.gradcheck(f, leaves(hidden, weight, bias))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_gradcheck(case, reduction):
    with lossops.backend("cpp"):
        gradcheck(case, reduction)


@pytest.mark.skipif(not _triton_kernels_present(), reason="lossops.triton_kernels.cross_entropy not built yet")
def test_gradcheck_triton():
    with lossops.backend("triton"):  # one case: the interpreter is slow
        gradcheck(CASES["all"], "none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend_name", ["cpp", "triton", "reference"])
def test_z_loss_term_is_averaged_over_kept_rows(backend_name, reduction):
    """cross_entropy's rule: the z-loss term loss(s) - loss(0) is s * lse^2 on each kept row, not class-weighted,
    and 'mean' divides it by the number of kept rows (in value and in every gradient)."""
    hidden, weight, bias, target, options = make_inputs(dict(ignore_index=3, label_smoothing=0.1))
    scale = 0.05
    kept = (target != 3).to(hidden.dtype)

    def z_loss(h, w, b):
        z = scale * F.linear(h, w, b).logsumexp(-1).square() * kept
        return z if reduction == "none" else z.sum() if reduction == "sum" else z.sum() / kept.sum()

    def loss(s):
        return lossops.linear_cross_entropy(hidden, weight, target, linear_bias=bias, reduction=reduction,
                                            chunk_size=CHUNK, lse_square_scale=s, **options)

    with lossops.backend(backend_name):
        with_z, without = loss(scale), loss(0.0)
    expected = z_loss(hidden, weight, bias)
    torch.testing.assert_close(with_z - without, expected, rtol=1e-12, atol=1e-14)
    grad_output = torch.rand_like(expected) + 0.5
    got = [a - b for a, b in zip(torch.autograd.grad(with_z, (hidden, weight, bias), grad_output),
                                 torch.autograd.grad(without, (hidden, weight, bias), grad_output))]
    for g, e in zip(got, torch.autograd.grad(expected, (hidden, weight, bias), grad_output)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_bfloat16_accumulates_across_chunks_in_float32():
    # 64 chunks: a bfloat16 running sum of grad_W / grad_b would be far worse than torch's one matmul.
    hidden, weight, bias, target, _ = make_inputs({}, n=1024, d=32, v=64, dtype=torch.float64)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (hidden, weight, bias)]
    exact = torch.autograd.grad(truth(*leaves(hidden, weight, bias), target, "sum"), leaves(hidden, weight, bias))
    ours = torch.autograd.grad(lossops.linear_cross_entropy(low[0], low[1], target, linear_bias=low[2], reduction="sum",
                                                            chunk_size=16), low)
    torchs = torch.autograd.grad(truth(*low, target, "sum"), low)
    assert_no_worse_than_torch(("hidden", "weight", "bias"), exact, ours, torchs, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_low_precision_products_no_worse_than_torch(kernel_backend, product_route, dtype, reduction):
    """Both product routes: loss and gradients within torch's own error against a float64 truth (the weight's
    gradient summed over 5 chunks, the widened products' vocabulary blocks of a few rows)."""
    is_widened, products = product_route
    hidden, weight, bias, target, _ = make_inputs({}, n=N, d=D, v=V, dtype=torch.float64)
    low = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    grad_output = torch.rand(N, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.0)
    leaves64 = [t.detach().double().requires_grad_() for t in low]
    exact_loss = truth(*leaves64, target, reduction)
    exact = torch.autograd.grad(exact_loss, leaves64, grad_output)
    ours_loss = lossops.linear_cross_entropy(low[0], low[1], target, linear_bias=low[2], reduction=reduction,
                                             chunk_size=CHUNK)
    ours = torch.autograd.grad(ours_loss, low, grad_output.to(ours_loss.dtype))
    torch_loss = truth(*low, target, reduction)
    torchs = torch.autograd.grad(torch_loss, low, grad_output.to(torch_loss.dtype))
    assert (products["logits"] > 0) == (products["contract"] > 0) == is_widened
    assert_no_worse_than_torch(("loss", "hidden", "weight", "bias"), (exact_loss, *exact), (ours_loss, *ours),
                               (torch_loss, *torchs), dtype,
                               None if is_widened else {"weight": NATIVE_WEIGHT_GRADIENT_BOUND})


def test_product_routes_with_token_stats_and_without_tokens(product_route):
    """The token statistics' pass (a gradient from the statistics alone, reduction="none") on both product routes
    matches the float64 formula within bfloat16's error; an empty batch gives torch's empty results."""
    is_widened, products = product_route
    hidden, weight, bias, target, _ = make_inputs({}, n=N, d=D, v=V, dtype=torch.float64)
    low = [t.detach().to(torch.bfloat16).requires_grad_() for t in (hidden, weight, bias)]
    leaves64 = [t.detach().double().requires_grad_() for t in low]
    outputs = {}
    for leaves in (low, leaves64):
        result = lossops.linear_cross_entropy(leaves[0], leaves[1], target, linear_bias=leaves[2], reduction="none",
                                              return_token_stats=True, chunk_size=CHUNK)
        statistic = (result.entropy + result.logsumexp).sum()
        outputs[leaves[0].dtype] = (statistic, torch.autograd.grad(statistic, leaves))
    (ours, ours_grads), (exact, exact_grads) = outputs[torch.bfloat16], outputs[torch.float64]
    assert (products["logits"] > 0) == (products["contract"] > 0) == is_widened
    for o, e in zip((ours, *ours_grads), (exact, *exact_grads)):
        assert (o.double() - e).abs().max() <= 2 ** -6 * e.abs().max() + 1e-3, (o, e)
    empty = [t[:0] if t.dim() == 2 and t.shape[0] == N else t for t in low]
    loss = lossops.linear_cross_entropy(empty[0], empty[1], target[:0], linear_bias=empty[2])
    assert loss.isnan()
    assert torch.autograd.grad(loss, empty[0])[0].shape == (0, D)


def test_widened_products_only_for_low_precision_on_cpu():
    assert not linear_ce.widened_products(torch.float32, torch.device("cpu"))
    assert not linear_ce.widened_products(torch.float64, torch.device("cpu"))
    assert not linear_ce.widened_products(torch.bfloat16, torch.device("cuda"))
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert linear_ce.widened_products(torch.bfloat16, torch.device("cpu")) == (not native)


def test_widened_products_workspace_within_what_chunk_rows_counts():
    """The float32 weight and product blocks take at most one chunk of low-precision logits (the product block
    chunk_rows counts), the float32 hidden rows and their gradient 8 bytes a feature a row (widened_features)."""
    for rows, vocab, features in ((456, 32000, 512), (128, 128256, 4096), (5, 11, 8), (64, 128, 4096)):
        wide = linear_ce._WideProducts(rows, vocab, features, 2, torch.device("cpu"))
        assert 1 <= wide.block <= vocab
        assert wide.block == 1 or (wide.weight_block.numel() + wide.product_block.numel()) * 4 <= rows * vocab * 2
        assert (wide.hidden.numel() + wide.grad_hidden.numel()) * 4 == 8 * features * rows
    for tokens, vocab, features in ((2048, 32768, 256), (4096, 128256, 4096)):
        rows = chunk_rows(tokens, vocab, 2, LOGITS_BUDGET, widened_features=features)
        held = rows * vocab * 2 * 2 + 8 * features * rows + 64 * tokens
        assert held <= tokens * vocab * 4 // 8, (rows, held)


def test_never_allocates_full_logits():
    n, d, v = 1024, 8, 4096
    hidden, weight, bias, target, _ = make_inputs({}, n=n, d=d, v=v, dtype=torch.float32)
    logits_bytes = n * v * 4
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with lossops.backend("cpp"):
            lossops.linear_cross_entropy(hidden, weight, target, linear_bias=bias).backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= logits_bytes // 8, (largest, logits_bytes)


def default_chunk_size(rows, vocab, itemsize):
    return chunk_rows(rows, vocab, itemsize, LOGITS_BUDGET)


def test_default_chunk_size_bounds_chunk_logits():
    # the chunk (and a low-precision weight gradient's product block of its size) and 64 bytes a token: 1/8
    for rows, vocab, itemsize in ((4096, 32000, 4), (2048, 32768, 4), (2048, 32768, 2), (1000, 50257, 2)):
        chunk_bytes = default_chunk_size(rows, vocab, itemsize) * vocab * itemsize * (1 + (itemsize < 4))
        assert chunk_bytes + 64 * rows <= rows * vocab * 4 // 8
    assert default_chunk_size(4096, 32000, 4) == 456  # 9 even chunks
    assert default_chunk_size(5, 32000, 4) == 5  # small logits: one chunk
    assert default_chunk_size(64, 128, 4) == 64
    # Huge logits: capped near 256 MiB per chunk, but never below 128 rows.
    assert default_chunk_size(65536, 128256, 4) * 128256 * 4 <= 256 << 20
    assert default_chunk_size(65536, 10 ** 7, 4) == 128


def test_peak_memory_beyond_the_gradients_is_an_eighth_of_the_logits():
    """N=2048, D=256, V=32768, float32, as process RSS in a fresh interpreter: the op's chunk of logits and
    everything else it allocates beyond the hidden and weight gradients."""
    n, d, v = 2048, 256, 32768
    peak = linear_loss_peak_beyond_gradients("linear_cross_entropy", n, d, v)
    assert peak <= n * v * 4 // 8, peak


def test_all_ignored_mean_is_nan_with_zero_gradients_like_torch():
    hidden, weight, bias, target, _ = make_inputs({})
    target.fill_(-100)
    loss = lossops.linear_cross_entropy(hidden, weight, target, linear_bias=bias, chunk_size=CHUNK)
    expected = truth(hidden, weight, bias, target)
    assert loss.isnan() and expected.isnan()
    for g, w in zip(torch.autograd.grad(loss, (hidden, weight, bias)),
                    torch.autograd.grad(expected, (hidden, weight, bias))):
        torch.testing.assert_close(g, w)


def test_batch_dims_and_noncontiguous_hidden():
    base = torch.randn(16, 3, 5, dtype=torch.float64)  # hidden (3, 5, 16) as a transposed view
    hidden = base.permute(1, 2, 0).requires_grad_()
    weight = torch.randn(V, 16, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, V, (3, 5))
    loss = lossops.linear_cross_entropy(hidden, weight, target, reduction="none", chunk_size=4)
    assert loss.shape == (3, 5)
    torch.testing.assert_close(loss, F.cross_entropy((hidden @ weight.T).permute(0, 2, 1), target, reduction="none"))


def test_second_backward_with_scaled_grad_output():
    hidden, weight, bias, target, _ = make_inputs({})
    loss = lossops.linear_cross_entropy(hidden, weight, target, linear_bias=bias, chunk_size=CHUNK)
    expected = torch.autograd.grad(truth(hidden, weight, bias, target) * 3, (hidden, weight, bias))
    for _ in range(2):  # the first backward scales in place; the second must still be exact
        got = torch.autograd.grad(loss * 3, (hidden, weight, bias), retain_graph=True)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


def test_only_requested_gradients():
    hidden, weight, bias, target, _ = make_inputs({})
    frozen = weight.detach()
    loss = lossops.linear_cross_entropy(hidden, frozen, target, linear_bias=bias.detach(), chunk_size=CHUNK)
    (grad,) = torch.autograd.grad(loss, hidden)
    torch.testing.assert_close(grad, torch.autograd.grad(truth(hidden, frozen, bias.detach(), target), hidden)[0])


TORCH_SIGNATURE_CASES = [
    dict(), dict(weight=True), dict(weight=True, ignore_index=3, label_smoothing=0.1), dict(ignore_index=None),
    dict(linear_bias=True, label_smoothing=0.2), dict(options=True), dict(weight=True, linear_bias=True, options=True),
]


def _signature_params():
    # The keywords' mapping is the same Python for both backends: the C++ one takes every case and reduction, the
    # Triton one (a millisecond per interpreted launch) every case with per-token losses, the reduction whose
    # backward has the most to get wrong.
    return [pytest.param(backend, case, reduction, id=f"{backend}-{'-'.join(case) or 'plain'}-{reduction}")
            for case in TORCH_SIGNATURE_CASES for reduction in ("mean", "sum", "none")
            for backend in ("cpp", "triton") if backend == "cpp" or reduction == "none"]


@needs_torch_linear_ce
@pytest.mark.parametrize("kernel_backend, case, reduction", _signature_params(), indirect=["kernel_backend"])
def test_torch_signature_matches_torch(kernel_backend, case, reduction):
    """torch.nn.functional.linear_cross_entropy's keywords, value for value and gradient for gradient."""
    hidden, weight, bias, target, _ = make_inputs(dict(ignore_index=case.get("ignore_index", -100) or -100))
    kwargs = dict(reduction=reduction)
    if case.get("weight"):
        kwargs["weight"] = torch.rand(V, dtype=torch.float64) + 0.5
    if "ignore_index" in case:
        kwargs["ignore_index"] = case["ignore_index"]
    if case.get("label_smoothing"):
        kwargs["label_smoothing"] = case["label_smoothing"]
    if case.get("linear_bias"):
        kwargs["linear_bias"] = bias
    if case.get("options"):
        kwargs["options"] = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=CHUNK)
    grads = [hidden, weight] + ([bias] if case.get("linear_bias") else [])
    ours = lossops.linear_cross_entropy(input=hidden, linear_weight=weight, target=target, **kwargs)
    theirs = F.linear_cross_entropy(input=hidden, linear_weight=weight, target=target, **kwargs)
    torch.testing.assert_close(ours, theirs)
    upstream = torch.rand_like(theirs) + 0.5
    for a, b in zip(torch.autograd.grad(ours, grads, upstream), torch.autograd.grad(theirs, grads, upstream)):
        torch.testing.assert_close(a, b)


@needs_torch_linear_ce
def test_torch_signature_reference_forms():
    """What the fused path does not take goes to the reference path with torch's semantics: a (V, d1, D)
    weight, probability targets, a 1-D input."""
    hidden = torch.randn(6, D, dtype=torch.float64)
    k_weight = torch.randn(V, 3, D, dtype=torch.float64)
    k_target = torch.randint(0, V, (6, 3))
    torch.testing.assert_close(lossops.linear_cross_entropy(hidden, k_weight, k_target),
                               F.linear_cross_entropy(hidden, k_weight, k_target))
    weight = torch.randn(V, D, dtype=torch.float64)
    probabilities = torch.rand(6, V, dtype=torch.float64).softmax(1)
    torch.testing.assert_close(lossops.linear_cross_entropy(hidden, weight, probabilities, label_smoothing=0.1),
                               F.linear_cross_entropy(hidden, weight, probabilities, label_smoothing=0.1))
    one = torch.tensor(4)
    torch.testing.assert_close(lossops.linear_cross_entropy(hidden[0], weight, one),
                               F.linear_cross_entropy(hidden[0], weight, one))


@needs_torch_linear_ce
@pytest.mark.parametrize("options", [dict(bias=True, weight=True, ignore_index=2, label_smoothing=0.1),
                                     dict(reduction="none"), dict(reduction="sum", bias=True)])
def test_module_is_torchs(options):
    """lossops.nn.LinearCrossEntropyLoss takes torch's constructor and state_dict and gives torch's results."""
    options = dict(options)
    if options.pop("weight", False):
        options["weight"] = torch.rand(V, dtype=torch.float64) + 0.5
    theirs = torch.nn.LinearCrossEntropyLoss(D, V, dtype=torch.float64, **options)
    ours = lossops.nn.LinearCrossEntropyLoss(D, V, dtype=torch.float64, **options, chunk_size=CHUNK)
    ours.load_state_dict(theirs.state_dict())
    hidden, target = torch.randn(N, D, dtype=torch.float64), torch.randint(0, V, (N,))
    target[::5] = options.get("ignore_index", -100)
    got, want = ours(hidden, target), theirs(hidden, target)
    torch.testing.assert_close(got, want)
    upstream = torch.rand_like(want) + 0.5
    params = lambda m: [p for p in m.linear.parameters()]  # noqa: E731
    for a, b in zip(torch.autograd.grad(got, params(ours), upstream),
                    torch.autograd.grad(want, params(theirs), upstream)):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match=r"expected weight shape to be \(50,\)"):
        lossops.nn.LinearCrossEntropyLoss(D, V, weight=torch.ones(3))


def test_module_extras_match_functional():
    hidden, weight, bias, target, options = make_inputs(CASES["all"])
    module = lossops.nn.LinearCrossEntropyLoss(D, V, bias=True, dtype=torch.float64, reduction="sum",
                                               chunk_size=CHUNK, **options)
    with torch.no_grad():
        module.linear.weight.copy_(weight)
        module.linear.bias.copy_(bias)
    torch.testing.assert_close(module(hidden, target),
                               lossops.linear_cross_entropy(hidden, weight, target, linear_bias=bias, reduction="sum",
                                                            **options))


def test_autocast_bfloat16_like_torch():
    hidden, weight, bias, target, _ = make_inputs({}, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lossops.linear_cross_entropy(hidden, weight, target, linear_bias=bias, chunk_size=CHUNK)
        expected = F.cross_entropy(F.linear(hidden, weight, bias), target)
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=1e-2)
    got, want = torch.autograd.grad(loss, weight), torch.autograd.grad(expected, weight)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile(reduction):
    hidden, weight, bias, target, options = make_inputs(CASES["ignore_index"], dtype=torch.float32)

    def f(h, w, b):
        return lossops.linear_cross_entropy(h, w, target, linear_bias=b, reduction=reduction, chunk_size=CHUNK,
                                            **options)
    # Not fullgraph: lossops._backend's ContextVar lookup is a graph break under dynamo.
    compiled = torch.compile(f, backend="aot_eager")
    loss, expected = compiled(hidden, weight, bias), truth(hidden, weight, bias, target, reduction, **options)
    torch.testing.assert_close(loss, expected)
    grad_output = torch.rand_like(loss)
    for g, e in zip(torch.autograd.grad(loss, (hidden, weight, bias), grad_output),
                    torch.autograd.grad(expected, (hidden, weight, bias), grad_output)):
        torch.testing.assert_close(g, e)


def test_opcheck():
    hidden, weight, bias, target, _ = make_inputs({}, n=9, d=4, v=6, dtype=torch.float32)
    args = (hidden, weight, bias, target, None, -100, "mean", 0.1, 0.0, None, 4, True, True, True, "cpp")
    torch.library.opcheck(torch.ops.lossops.linear_cross_entropy.default, args)


@pytest.mark.parametrize("kwargs, exception, match", [
    (dict(linear_weight=torch.randn(V, D + 1)), RuntimeError, r"linear_weight must have shape \(vocab, 16\)"),
    (dict(linear_weight=torch.randn(V, D, dtype=torch.float64)), RuntimeError, "same dtype.*float32 and torch.float64"),
    (dict(linear_bias=torch.randn(V + 1)), RuntimeError, r"linear_bias must be .* shape \(50,\), got .* \(51,\)"),
    (dict(target=torch.zeros(N, dtype=torch.float32)), RuntimeError, "integer tensor.*float32"),
    (dict(target=torch.zeros(N + 1, dtype=torch.int64)), RuntimeError, r"target of shape \(37,\).*\(38,\)"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int.*got 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be .*got -1.0"),
    (dict(label_smoothing=1.5), RuntimeError, "label_smoothing must be in .*got 1.5"),
    (dict(reduction="avg"), ValueError, "avg is not a valid value for reduction"),
    (dict(target=torch.full((N,), V, dtype=torch.int64)), IndexError, "Target 50 is out of bounds"),
])
def test_bad_arguments_raise_naming_the_value(kwargs, exception, match):
    call = dict(input=torch.randn(N, D), linear_weight=torch.randn(V, D), target=torch.randint(0, V, (N,)))
    call.update(kwargs)
    with lossops.backend("cpp"), pytest.raises(exception, match=match):
        lossops.linear_cross_entropy(**call)
