"""lossops.ctc_loss against torch.nn.functional.ctc_loss, on every backend.

torch is the oracle for values and gradients (its gradient convention included: exp(log_probs) - posterior),
float64 gradcheck runs through log_softmax (the raw derivative with respect to log_probs is not what torch
returns, and torch's own CTC fails that check), and the cases where lossops differs on purpose (a target value
outside [0, C), which torch's CPU kernel reads past the row for; bf16/fp16, which torch's CPU kernel refuses)
are tested as such.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import assert_float64_gradients_match, forward_backward, leaf_copies

CASES = [
    dict(blank=0, reduction="mean", zero_infinity=False, layout="padded"),
    dict(blank=5, reduction="sum", zero_infinity=False, layout="concatenated"),
    dict(blank=2, reduction="none", zero_infinity=True, layout="padded"),
    dict(blank=0, reduction="none", zero_infinity=False, layout="concatenated"),
    dict(blank=0, reduction="mean", zero_infinity=True, layout="lists"),
]


def _problem(T=10, N=4, C=6, S=4, blank=0, layout="padded", seed=0, dtype=torch.float64, impossible=True):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, N, C, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, C - 1, (N, S), generator=gen)
    targets = targets + (targets >= blank).long()  # never the blank
    targets[0, 1] = targets[0, 0]  # a repeated label
    input_lengths = torch.tensor([T, T - 1, T - 3, T][:N])
    target_lengths = torch.tensor([S, S - 1, 0, 2][:N])
    if impossible:  # sequence 3: four labels, two repeated, in two time steps
        input_lengths[3], target_lengths[3] = 2, 3
    if layout == "concatenated":
        targets = torch.cat([targets[n, :target_lengths[n]] for n in range(N)])
    if layout == "lists":
        input_lengths, target_lengths = input_lengths.tolist(), target_lengths.tolist()
    return logits.to(dtype), targets, input_lengths, target_lengths


def _call(fn, options):
    kwargs = {k: v for k, v in options.items() if k != "layout"}
    return lambda logits, targets, il, tl: fn(logits.log_softmax(-1), targets, il, tl, **kwargs)


@pytest.mark.parametrize("options", CASES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_float64_matches_torch(backend, options):
    logits, targets, il, tl = _problem(blank=options["blank"], layout=options["layout"])
    x = logits.requires_grad_()
    ours = forward_backward(lambda x: _call(lossops.ctc_loss, options)(x, targets, il, tl), [x])
    theirs = forward_backward(lambda x: _call(F.ctc_loss, options)(x, targets, il, tl), leaf_copies([x]))
    assert_close(ours, theirs, equal_nan=True, rtol=1e-10, atol=1e-12)


def _gradcheck_problem(options):
    options = dict(options, blank=min(options["blank"], 4))
    logits, targets, il, tl = _problem(T=6, N=3, C=5, S=3, blank=options["blank"], layout=options["layout"],
                                       impossible=False)
    if options["layout"] == "concatenated":
        targets = targets[:int(torch.as_tensor(tl).sum())]
    fn = _call(lossops.ctc_loss, options)
    return (lambda x: fn(x, targets, il, tl)), logits.requires_grad_()


# Not on triton here: numerical differentiation runs an interpreted launch per input element. Its float64 gradients
# on these cases must equal the gradchecked C++ ones (test_triton_gradients_are_the_gradchecked_cpp_ones), and it is
# gradchecked on its own on a smaller problem (test_gradcheck_through_log_softmax_triton).
@pytest.mark.parametrize("options", CASES[:3], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("kernel_backend", ["cpp"], indirect=True)
def test_gradcheck_through_log_softmax(kernel_backend, options):
    fn, logits = _gradcheck_problem(options)
    assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("options", CASES[:3], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_triton_gradients_are_the_gradchecked_cpp_ones(options):
    fn, logits = _gradcheck_problem(options)
    assert_float64_gradients_match(fn, [logits], "triton")


def test_gradcheck_through_log_softmax_triton():
    options = CASES[2]  # reduction='none': a gradient row per sequence, each of its own length
    logits, targets, il, tl = _problem(T=4, N=2, C=3, S=2, blank=options["blank"], layout=options["layout"],
                                       impossible=False)
    fn = _call(lossops.ctc_loss, options)
    with lossops.backend("triton"):
        assert torch.autograd.gradcheck(lambda x: fn(x, targets, il, tl), (logits.requires_grad_(),))


def test_raw_log_probs_gradient_is_torchs_convention():
    """Not the derivative with respect to log_probs: exp(log_probs) - posterior, as torch returns."""
    logits, targets, il, tl = _problem(impossible=False)
    lp = logits.log_softmax(-1)
    ours = forward_backward(lambda x: lossops.ctc_loss(x, targets, il, tl, reduction="sum"),
                            [lp.clone().requires_grad_()])
    theirs = forward_backward(lambda x: F.ctc_loss(x, targets, il, tl, reduction="sum"), [lp.clone().requires_grad_()])
    assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert not torch.autograd.gradcheck(lambda x: lossops.ctc_loss(x, targets, il, tl, reduction="sum"),
                                        (lp.clone().requires_grad_(),), raise_exception=False)


def test_unbatched_matches_torch(backend):
    logits, targets, il, tl = _problem(N=1, impossible=False)
    x = logits[:, 0].requires_grad_()
    for reduction in ("none", "mean", "sum"):
        ours = forward_backward(lambda x: lossops.ctc_loss(x.log_softmax(-1), targets[0], il[0], tl[0],
                                                           reduction=reduction), [x])
        theirs = forward_backward(lambda x: F.ctc_loss(x.log_softmax(-1), targets[0], il[0], tl[0],
                                                       reduction=reduction), leaf_copies([x]))
        assert_close(ours, theirs)


def test_impossible_and_empty_sequences(backend):
    logits, targets, _, _ = _problem(N=4, impossible=False)
    lp = logits.log_softmax(-1)
    il, tl = torch.tensor([0, 0, 3, 10]), torch.tensor([0, 2, 4, 0])  # empty ok, empty impossible, too short, blanks
    for zero_infinity in (False, True):
        x = lp.clone().requires_grad_()
        loss = lossops.ctc_loss(x, targets, il, tl, reduction="none", zero_infinity=zero_infinity)
        expected = F.ctc_loss(lp, targets, il, tl, reduction="none", zero_infinity=zero_infinity)
        assert_close(loss, expected)
        loss.sum().backward()
        xt = lp.clone().requires_grad_()
        F.ctc_loss(xt, targets, il, tl, reduction="sum", zero_infinity=zero_infinity).backward()
        assert_close(x.grad, xt.grad, equal_nan=True)
        if zero_infinity:
            assert torch.isfinite(x.grad).all() and (x.grad[:, 1:3] == 0).all()


def test_float32_matches_torch_and_noncontiguous_log_probs(backend):
    logits, targets, il, tl = _problem(T=30, N=4, C=40, S=8, dtype=torch.float32, impossible=False)
    batch_first = logits.transpose(0, 1).contiguous().requires_grad_()  # (N, T, C) stored: a strided (T, N, C) view
    ours = forward_backward(lambda x: lossops.ctc_loss(x.transpose(0, 1).log_softmax(-1), targets, il, tl),
                            [batch_first])
    theirs = forward_backward(lambda x: F.ctc_loss(x.transpose(0, 1).log_softmax(-1), targets, il, tl),
                              leaf_copies([batch_first]))
    assert_close(ours, theirs, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_error_no_worse_than_float32(kernel_backend, dtype):
    """torch's CPU kernel has no bf16/fp16: ours reads them and accumulates in float32, so against the float64
    truth of the same (rounded) inputs its error is that of a float32 computation, rounded to the dtype."""
    logits, targets, il, tl = _problem(T=40, N=4, C=30, S=10, impossible=False)
    lp = logits.log_softmax(-1).to(dtype)
    ours = forward_backward(lambda x: lossops.ctc_loss(x, targets, il, tl, reduction="none"),
                            [lp.clone().requires_grad_()])
    truth = forward_backward(lambda x: F.ctc_loss(x, targets, il, tl, reduction="none"), [lp.double().requires_grad_()])
    f32 = forward_backward(lambda x: F.ctc_loss(x, targets, il, tl, reduction="none"), [lp.float().requires_grad_()])
    assert ours[0].dtype == dtype and ours[1][0].dtype == dtype
    eps = torch.finfo(dtype).eps
    for got, ref, true in ((ours[0], f32[0], truth[0]), (ours[1][0], f32[1][0], truth[1][0])):
        ours_err = (got.double() - true).abs().max()
        f32_rounded_err = (ref.to(dtype).double() - true).abs().max()
        assert ours_err <= f32_rounded_err + eps * true.abs().max()


def _shortest_and_longest_target(inputs):
    """An OpInfo sample's call on two of its sequences, that of the shortest target and that of the longest: same
    time steps, classes and padded target width."""
    log_probs, targets, input_lengths, target_lengths = inputs
    assert targets.dim() == 2, "padded targets, which this selection indexes by sequence"
    lengths = torch.as_tensor(target_lengths)
    keep = [int(lengths.argmin()), int(lengths.argmax())]

    def pick(values):
        return values[keep] if isinstance(values, torch.Tensor) else [values[i] for i in keep]
    return [log_probs.detach()[:, keep].requires_grad_(), targets[keep], pick(input_lengths), pick(target_lengths)]


def test_opinfo_samples(backend):
    from torch.testing._internal.common_methods_invocations import op_db
    (opinfo,) = [op for op in op_db if op.name == "nn.functional.ctc_loss"]
    samples = list(opinfo.sample_inputs("cpu", torch.float64, requires_grad=True))
    assert samples
    calls = [([sample.input, *sample.args], sample.kwargs) for sample in samples]
    if backend == "triton":
        # The interpreter runs the kernel's one program per sequence in turn: every third sample (each reduction,
        # zero_infinity and both kinds of lengths stay), on two of its sequences (cpp and reference run them all).
        calls = [(_shortest_and_longest_target(inputs), kwargs) for inputs, kwargs in calls[::3]]
    for inputs, kwargs in calls:
        ours = forward_backward(lambda *a: lossops.ctc_loss(*a, **kwargs), inputs)
        theirs = forward_backward(lambda *a: F.ctc_loss(*a, **kwargs), leaf_copies(inputs))
        assert_close(ours, theirs)


BAD = [
    (dict(input_lengths=[11, 9, 7, 2]), RuntimeError, "input_lengths value 11"),
    (dict(input_lengths=[10, -1, 7, 2]), RuntimeError, "input_lengths must be non-negative"),
    (dict(target_lengths=[5, 3, 0, 3]), RuntimeError, "target_lengths value 5"),
    (dict(target_lengths=[4, -1, 0, 3]), RuntimeError, "target_lengths must be non-negative"),
    (dict(input_lengths=[10, 9, 7]), RuntimeError, "one entry per sequence"),
    (dict(input_lengths=torch.tensor([10.0, 9, 7, 2])), RuntimeError, "must be integral"),
    (dict(blank=6), RuntimeError, "blank must be in the label range"),
    (dict(blank=-1), RuntimeError, "blank must be in the label range"),
    (dict(targets=torch.full((4, 4), 99)), IndexError, "targets value 99"),
    (dict(targets=torch.full((3, 4), 1)), RuntimeError, "targets must be padded"),
    (dict(targets=torch.ones(4, 4, dtype=torch.bool)), RuntimeError, "class indices"),
    (dict(reduction="bogus"), ValueError, "bogus"),
    (dict(log_probs=torch.zeros(10, 4, 6, dtype=torch.int64)), TypeError, "log_probs must be a floating-point"),
]


@pytest.mark.parametrize("change, error, message", BAD, ids=[m for _, _, m in BAD])
def test_bad_arguments_name_the_argument(backend, change, error, message):
    logits, targets, il, tl = _problem(impossible=False)
    arguments = dict(log_probs=logits.log_softmax(-1), targets=targets, input_lengths=il, target_lengths=tl)
    arguments.update(change)
    with pytest.raises(error, match=message):
        lossops.ctc_loss(**arguments)


def test_out_of_range_target_raises_where_torch_reads_past_the_row():
    logits, targets, il, tl = _problem(impossible=False)
    targets[1, 0] = 6  # == C: torch 2.13's CPU kernel returns a number read from outside the class row
    for backend in ("cpp", "triton"):
        with lossops.backend(backend), pytest.raises(IndexError, match="targets value 6"):
            lossops.ctc_loss(logits.log_softmax(-1), targets, il, tl)


def test_bitwise_deterministic_for_any_thread_count():
    logits, targets, il, tl = _problem(T=60, N=8, C=20, S=10, dtype=torch.float32, impossible=False)
    il, tl = torch.full((8,), 60), torch.full((8,), 10)
    targets = torch.randint(1, 20, (8, 10))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with lossops.backend("cpp"):
                results.append(forward_backward(lambda x: lossops.ctc_loss(x, targets, il, tl),
                                                [logits.log_softmax(-1).requires_grad_()]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1][0], results[1][1][0])


def test_module_matches_torch_module(backend):
    logits, targets, il, tl = _problem(impossible=True)
    for kwargs in (dict(), dict(blank=1, reduction="sum", zero_infinity=True)):
        lp = logits.log_softmax(-1)
        if kwargs.get("blank") == 1:
            targets = torch.where(targets == 1, 2, targets)
        ours = forward_backward(lambda x: lossops.nn.CTCLoss(**kwargs)(x, targets, il, tl),
                                [lp.clone().requires_grad_()])
        theirs = forward_backward(lambda x: torch.nn.CTCLoss(**kwargs)(x, targets, il, tl),
                                  [lp.clone().requires_grad_()])
        assert_close(ours, theirs, equal_nan=True)


def test_padding_beyond_the_target_lengths_is_never_read(backend):
    logits, targets, il, tl = _problem(impossible=False)
    padded = targets.clone()
    for n, length in enumerate(tl.tolist()):
        padded[n, length:] = -1  # a common padding value, out of range for every class
    lp = logits.log_softmax(-1)
    assert_close(lossops.ctc_loss(lp, padded, il, tl), F.ctc_loss(lp, targets, il, tl))


@pytest.mark.parametrize("lengths", [[2 ** 62, 2 ** 62], [2 ** 63 - 1, 5]])
def test_concatenated_target_lengths_past_int64_are_refused_clearly(backend, lengths):
    # their int64 sum wraps around to a small or negative number
    log_probs = torch.randn(10, 2, 5).log_softmax(-1)
    for target_lengths in (torch.tensor(lengths), lengths):
        with pytest.raises(RuntimeError, match="target_lengths|targets tensor of 4"):
            lossops.ctc_loss(log_probs, torch.tensor([1, 2, 3, 1]), torch.tensor([10, 10]), target_lengths)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_minus_infinity_label_gives_the_limit_gradient(backend, dtype):
    """A label (or the blank) whose log-probability is -inf at some frames: torch's gradient there is
    exp(-inf) - exp(-inf + inf) = NaN, which log_softmax's backward spreads over the frame. lossops returns the
    limit, checked against the same problem with -1e4 in place of -inf (e^-1e4 is 0 in float64 as well)."""
    logits, targets, input_lengths, target_lengths = _problem(T=12, N=3, C=6, S=3, impossible=False)
    log_probs = logits.log_softmax(2)
    cut = log_probs.clone()
    cut[2, 0, targets[0, 0]] = float("-inf")  # a target label at a frame its alignments can use
    cut[5, 1, 0] = float("-inf")              # the blank
    cut[0, 2, :] = float("-inf")              # a whole frame of a sequence whose target is empty: impossible
    cut[0, 2, 0] = 0.0                        # ...except the blank, so it stays possible
    limit = torch.where(cut == float("-inf"), torch.full_like(cut, -1e4), cut)
    upstream = torch.linspace(0.5, 1.5, 3, dtype=dtype)

    def run(lp):
        lp = lp.to(dtype).requires_grad_(True)
        loss = lossops.ctc_loss(lp, targets, input_lengths, target_lengths, reduction="none")
        (grad,) = torch.autograd.grad(loss, lp, upstream)
        return loss.detach(), grad

    loss, grad = run(cut)
    expected_loss, expected_grad = run(limit)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    tolerance = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert_close(loss, expected_loss, **tolerance)
    assert_close(grad, expected_grad, **tolerance)
    assert (grad[cut.to(dtype) == float("-inf")] == 0).all()
