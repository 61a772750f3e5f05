"""linear_distillation_loss against distillation_loss's torch formula on F.linear logits: values and the student's
input, weight and bias gradients on every backend, chunking (uneven last chunk, one chunk, chunks of one token),
reduction="none" with per-token upstream gradients, gradcheck, bad arguments, and its peak memory."""
import pytest
import torch
import torch.nn.functional as F

import lossops
from lossops.losses.linear_cross_entropy import chunk_rows
from lossops.losses import linear_distillation
from lossops.losses.linear_distillation import LOGITS_BUDGET
from _cases import NATIVE_WEIGHT_GRADIENT_BOUND, assert_no_worse_than_torch, linear_loss_peak_beyond_gradients
from test_distillation import torch_formula
from test_linear_cross_entropy import split_logits_products

DIVERGENCES = ["forward_kl", "reverse_kl", "tvd", "jsd"]


def _inputs(tokens=(2, 7), ds=5, dt=9, vocab=37, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    student = [rand(*tokens, ds).requires_grad_(), rand(vocab, ds, scale=0.5).requires_grad_(),
               rand(vocab).requires_grad_()]
    teacher = [rand(*tokens, dt), rand(vocab, dt, scale=0.5), rand(vocab)]
    target = torch.randint(0, vocab, tokens, generator=gen)
    target.view(-1)[::4] = -100
    return student, teacher, target


def _call(student, teacher, target, **kwargs):
    return lossops.linear_distillation_loss(student[0], student[1], teacher[0], teacher[1], target,
                                            student_bias=student[2], teacher_bias=teacher[2], **kwargs)


def _truth(student, teacher, target, **kwargs):
    kwargs.pop("chunk_size", None)
    return torch_formula(F.linear(*student), F.linear(*teacher), target, **kwargs)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("options", [dict(chunk_size=3), dict(chunk_size=1, temperature=2.0, hard_weight=0.5),
                                     dict(chunk_size=100, reduction="sum"),
                                     dict(chunk_size=4, reduction="none", hard_weight=1.0, beta=0.3)], ids=str)
def test_matches_the_unfused_formula(backend, divergence, options):
    student, teacher, target = _inputs()
    loss = _call(student, teacher, target, divergence=divergence, **options)
    ref = _truth(student, teacher, target, divergence=divergence, **options)
    assert loss.shape == ref.shape
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    g = torch.rand(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(3)) + 0.5
    for ours, theirs in zip(torch.autograd.grad(loss, student, g), torch.autograd.grad(ref, student, g)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_logits_formed_in_vocabulary_blocks(monkeypatch, divergence):
    """Both models' chunks of logits formed a block of vocabulary rows at a time on CPU (blocks of 14 and 8 of 37,
    the last short): the formula's values and the student's gradients."""
    blocks = split_logits_products(monkeypatch, 576)  # 8 rows of the teacher's weight
    student, teacher, target = _inputs()
    options = dict(divergence=divergence, chunk_size=4, reduction="none", hard_weight=0.5)
    with lossops.backend("cpp"):
        loss = _call(student, teacher, target, **options)
    ref = _truth(student, teacher, target, **options)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    g = torch.rand(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(3)) + 0.5
    for ours, theirs in zip(torch.autograd.grad(loss, student, g), torch.autograd.grad(ref, student, g)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)
    assert set(blocks) == {576 // (5 * 8), 8}  # the student's 5 features a row, the teacher's 9


def test_without_bias_or_target_and_default_chunks(backend):
    student, teacher, _ = _inputs(tokens=(300,))
    loss = lossops.linear_distillation_loss(student[0], student[1], teacher[0], teacher[1], divergence="jsd")
    ref = torch_formula(F.linear(student[0], student[1]), F.linear(teacher[0], teacher[1]), divergence="jsd")
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(torch.autograd.grad(loss, student[:2]), torch.autograd.grad(ref, student[:2])):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("options", [dict(), dict(reduction="none", hard_weight=1.0, divergence="tvd"),
                                     dict(reduction="sum", divergence="jsd", beta=0.3, temperature=2.0)], ids=str)
def test_one_chunk_takes_linear_and_the_distillation_op(backend, options):
    """When the default chunks hold every token, the loss is F.linear's logits through distillation_loss: the same
    values and gradients as the chunked op and the formula, and the distillation op's node on plain CPU calls."""
    student, teacher, target = _inputs()
    tokens = target.numel()
    assert chunk_rows(tokens, 37, 8, LOGITS_BUDGET, logits_buffers=2) >= tokens
    loss = _call(student, teacher, target, **options)
    chunked = _call(student, teacher, target, chunk_size=3, **options)
    ref = _truth(student, teacher, target, **options)
    for other in (chunked, ref):
        torch.testing.assert_close(loss, other, rtol=1e-10, atol=1e-12)
    g = torch.rand(loss.shape, dtype=loss.dtype, generator=torch.Generator().manual_seed(3)) + 0.5
    for ours, theirs in zip(torch.autograd.grad(loss, student, g), torch.autograd.grad(ref, student, g)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)
    if backend == "cpp":
        assert loss.grad_fn.name() == lossops.distillation_loss(F.linear(*student), F.linear(*teacher), target,
                                                                **options).grad_fn.name()
    with torch.no_grad():
        torch.testing.assert_close(_call(student, teacher, target, **options), ref.detach(), rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_one_chunk_with_widened_products(product_route, dtype, monkeypatch):
    """One chunk on a CPU whose products are widened: float32 logits rounded to the dtype (widened_linear), as close
    to the float64 truth as torch's own; a weight whose float32 copy would exceed the byte budget takes the chunked
    op instead (its widened logits products counted)."""
    is_widened, products = product_route
    widened_linear_calls = []
    widened_linear = linear_distillation.widened_linear
    monkeypatch.setattr(linear_distillation, "widened_linear",
                        lambda *args: widened_linear_calls.append(1) or widened_linear(*args))
    student, teacher, target = _inputs(tokens=(40,), ds=12, dt=20, vocab=48)
    low = [t.detach().to(dtype).requires_grad_() for t in student]
    low_teacher = [t.to(dtype) for t in teacher]
    leaves64 = [t.detach().double().requires_grad_() for t in low]
    exact_loss = _truth(leaves64, [t.double() for t in low_teacher], target, reduction="sum")
    exact = torch.autograd.grad(exact_loss, leaves64)
    ours_loss = _call(low, low_teacher, target, reduction="sum")
    ours = torch.autograd.grad(ours_loss, low)
    torch_loss = _truth(low, low_teacher, target, reduction="sum")
    torchs = torch.autograd.grad(torch_loss, low)
    assert products["logits"] == 0  # one chunk: no chunked op
    assert (len(widened_linear_calls) == 2) == is_widened  # both models' logits
    assert_no_worse_than_torch(("loss", "input", "weight", "bias"), (exact_loss, *exact), (ours_loss, *ours),
                               (torch_loss, *torchs), dtype)
    # 2 tokens of a 4096-word vocabulary: one chunk of logits, but 4 MiB of float32 weights
    wide_student, wide_teacher, wide_target = _inputs(tokens=(2,), ds=128, dt=128, vocab=4096, dtype=dtype)
    with torch.no_grad():
        _call(wide_student, wide_teacher, wide_target)
        assert (products["logits"] > 0) == is_widened
        # and no tokens: torch's empty per-token result
        assert _call([t[:0] if t.dim() == 2 and t.shape[0] == 2 else t for t in wide_student],
                     [t[:0] if t.dim() == 2 and t.shape[0] == 2 else t for t in wide_teacher], wide_target[:0],
                     reduction="none").shape == (0,)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck(backend, divergence):
    student, teacher, target = _inputs(tokens=(5,), ds=3, dt=4, vocab=6)

    def fn(h, w, b):
        return lossops.linear_distillation_loss(h, w, teacher[0], teacher[1], target, student_bias=b,
                                                teacher_bias=teacher[2], divergence=divergence, temperature=1.5,
                                                hard_weight=0.4, chunk_size=2)

    assert torch.autograd.gradcheck(fn, tuple(student), fast_mode=backend == "triton")


def test_bfloat16_weight_gradient_no_worse_than_torch():
    student, teacher, target = _inputs(tokens=(256,), ds=16, dt=16, vocab=64)
    exact = torch.autograd.grad(_truth(student, teacher, target, reduction="sum"), student)
    low = [t.detach().bfloat16().requires_grad_() for t in student]
    low_teacher = [t.bfloat16() for t in teacher]
    ours = torch.autograd.grad(_call(low, low_teacher, target, reduction="sum", chunk_size=16), low)
    torchs = torch.autograd.grad(_truth(low, low_teacher, target, reduction="sum"), low)
    assert_no_worse_than_torch(("input", "weight", "bias"), exact, ours, torchs, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_products_no_worse_than_torch(kernel_backend, product_route, dtype):
    """Both product routes (the teacher, with its own features, sharing the student's workspace): loss and the
    student's gradients within torch's own error against a float64 truth."""
    is_widened, products = product_route
    student, teacher, target = _inputs(tokens=(40,), ds=12, dt=20, vocab=48)
    low = [t.detach().to(dtype).requires_grad_() for t in student]
    low_teacher = [t.to(dtype) for t in teacher]
    leaves64 = [t.detach().double().requires_grad_() for t in low]
    options = dict(divergence="jsd", hard_weight=0.3, reduction="sum")
    exact_loss = _truth(leaves64, [t.double() for t in low_teacher], target, **options)
    exact = torch.autograd.grad(exact_loss, leaves64)
    ours_loss = _call(low, low_teacher, target, chunk_size=16, **options)
    ours = torch.autograd.grad(ours_loss, low)
    torch_loss = _truth(low, low_teacher, target, **options)
    torchs = torch.autograd.grad(torch_loss, low)
    assert (products["logits"] > 0) == (products["contract"] > 0) == is_widened
    assert_no_worse_than_torch(("loss", "input", "weight", "bias"), (exact_loss, *exact), (ours_loss, *ours),
                               (torch_loss, *torchs), dtype,
                               None if is_widened else {"weight": NATIVE_WEIGHT_GRADIENT_BOUND})


def test_a_teacher_that_requires_grad_gets_its_gradients(backend):
    student, teacher, target = _inputs()
    teacher = [t.requires_grad_() for t in teacher]
    loss = _call(student, teacher, target, chunk_size=4, divergence="jsd", hard_weight=0.5)
    ref = _truth(student, teacher, target, divergence="jsd", hard_weight=0.5)
    leaves = [*student, *teacher]
    for ours, theirs in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-11)


def test_module_matches_the_function():
    student, teacher, target = _inputs()
    module = lossops.nn.LinearDistillationLoss(divergence="reverse_kl", chunk_size=5)
    torch.testing.assert_close(module(student[0], student[1], teacher[0], teacher[1], target),
                               lossops.linear_distillation_loss(student[0], student[1], teacher[0], teacher[1], target,
                                                                divergence="reverse_kl", chunk_size=5))


@pytest.mark.parametrize("change, error, match", [
    (dict(teacher_input=lambda t: t[:1]), ValueError, "teacher_input"),
    (dict(teacher_weight=lambda t: t[:-1]), ValueError, "teacher_weight"),
    (dict(student_weight=lambda t: t[:, :-1]), ValueError, "student_weight"),
    (dict(target=lambda t: t[:, :-1]), ValueError, "target"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(divergence="js"), ValueError, "divergence"),
    (dict(target=None, hard_weight=1.0), ValueError, "hard_weight"),
])
def test_bad_arguments(change, error, match):
    student, teacher, target = _inputs()
    arguments = dict(student_input=student[0], student_weight=student[1], teacher_input=teacher[0],
                     teacher_weight=teacher[1], target=target)
    for name, value in change.items():
        arguments[name] = value(arguments[name]) if callable(value) else value
    with pytest.raises(error, match=match):
        lossops.linear_distillation_loss(**arguments)


def test_default_chunks_fit_a_quarter_of_the_logits():
    for tokens, vocab, itemsize in ((2048, 32768, 4), (2048, 32000, 2), (4096, 128256, 4)):
        rows = chunk_rows(tokens, vocab, itemsize, LOGITS_BUDGET, logits_buffers=2)
        # both models' chunks, and the product block of a low-precision weight gradient
        chunk_bytes = rows * vocab * itemsize * (2 + (itemsize < 4))
        assert chunk_bytes + 64 * tokens <= tokens * vocab * 4 // 4
    assert chunk_rows(5, 8000, 4, LOGITS_BUDGET, logits_buffers=2) == 5  # small logits: one chunk


def test_peak_memory_beyond_the_student_gradients_is_a_quarter_of_the_logits():
    """N=2048, D=256, V=32768, float32, as process RSS in a fresh interpreter: the chunks' logits, the teacher's
    included, and everything else the op allocates beyond the student's two gradients."""
    n, d, v = 2048, 256, 32768
    peak = linear_loss_peak_beyond_gradients("linear_distillation_loss", n, d, v)
    assert peak <= n * v * 4 // 4, peak
