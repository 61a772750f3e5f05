"""The kept gradient buffer (csrc/allocation.cpp, lossops.set_gradient_cache): a training loop's next step
reuses the gradient buffer the previous one freed, never sees its old contents, never holds more memory
within a step than without the cache, and the cache can be switched off and emptied."""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
from _cases import run_python

MIB = 1 << 20
ROWS, COLS = 256, 16384  # 16 MiB in fp32: above the 8 MiB threshold for kept buffers

# (lossops op, torch op, target maker): every family whose C++ path allocates its gradient.
OPS = {
    "cross_entropy": (lossops.cross_entropy, F.cross_entropy,
                      lambda x, g: torch.randint(0, x.shape[1], x.shape[:1], generator=g)),
    "mse_loss": (lossops.mse_loss, F.mse_loss, lambda x, g: torch.randn(x.shape, generator=g)),
    "binary_cross_entropy_with_logits": (lossops.binary_cross_entropy_with_logits,
                                         F.binary_cross_entropy_with_logits,
                                         lambda x, g: torch.rand(x.shape, generator=g)),
}


@pytest.fixture
def cache():
    """The cache on and empty, whatever the test leaves behind."""
    lossops.set_gradient_cache(True)
    lossops.empty_cache()
    with lossops.backend("cpp"):
        yield
    lossops.set_gradient_cache(True)
    lossops.empty_cache()


def step(op, seed, shape=(ROWS, COLS)):
    """One loss + gradient, as a training step takes it; returns the inputs and the gradient tensor."""
    ours, _, make_target = OPS[op]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).requires_grad_()
    target = make_target(x, g)
    (grad,) = torch.autograd.grad(ours(x, target), x)
    return x, target, grad


@pytest.mark.parametrize("op", OPS)
def test_next_step_reuses_the_freed_buffer_and_rewrites_all_of_it(cache, op):
    _, _, first = step(op, 0)
    address = first.data_ptr()
    first.fill_(float("nan"))  # whatever a caller left in it must not leak into the next gradient
    del first
    assert lossops.gradient_cache_bytes() >= ROWS * COLS * 4
    x, target, second = step(op, 1)
    assert second.data_ptr() == address
    assert lossops.gradient_cache_bytes() == 0  # handed out, not shared
    (expected,) = torch.autograd.grad(OPS[op][1](x, target), x)
    assert_close(second, expected)


@pytest.mark.parametrize("dtype, shape", [(torch.float32, (256, 16411)), (torch.bfloat16, (512, 16411))],
                         ids=["fp32-ragged-rows", "bf16-ragged-rows"])
def test_reused_buffer_rows_that_start_off_a_cache_line(cache, dtype, shape):
    """A reused buffer's gradient is written with non-temporal stores on whole cache lines and ordinary stores at
    the ragged row ends (16411 classes: no row after the first starts on a 64-byte boundary)."""
    for seed in range(3):  # the second and third calls get the reused buffer
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
        target = torch.randint(0, shape[1], shape[:1], generator=g)
        target[::7] = -100
        (grad,) = torch.autograd.grad(lossops.cross_entropy(x, target, label_smoothing=0.1), x)
        x32 = x.detach().float().requires_grad_()
        (expected,) = torch.autograd.grad(F.cross_entropy(x32, target, label_smoothing=0.1), x32)
        tol = {} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-7)
        assert_close(grad.float(), expected, **tol)
        del grad


def test_a_request_of_another_size_frees_the_kept_buffer_first(cache):
    """Within a step the cache never adds memory: a different-size gradient does not coexist with it."""
    step("cross_entropy", 0)
    kept = lossops.gradient_cache_bytes()
    assert kept >= ROWS * COLS * 4
    _, _, other = step("cross_entropy", 1, shape=(ROWS, 2 * COLS))
    assert lossops.gradient_cache_bytes() == 0
    del other
    assert lossops.gradient_cache_bytes() >= 2 * kept


def test_small_gradients_are_not_kept(cache):
    step("cross_entropy", 0, shape=(64, 1000))
    assert lossops.gradient_cache_bytes() == 0


def test_switching_off_frees_and_stops_keeping(cache):
    step("cross_entropy", 0)
    assert lossops.gradient_cache_bytes() > 0
    lossops.set_gradient_cache(False)
    assert not lossops.gradient_cache_enabled()
    assert lossops.gradient_cache_bytes() == 0
    step("cross_entropy", 1)
    assert lossops.gradient_cache_bytes() == 0


def test_empty_cache_frees_and_reports_the_bytes(cache):
    step("cross_entropy", 0)
    kept = lossops.gradient_cache_bytes()
    assert kept >= 16 * MIB
    assert lossops.empty_cache() == kept
    assert lossops.gradient_cache_bytes() == 0


def test_inplace_backward_allocates_nothing_to_keep(cache):
    x = (torch.randn(ROWS, COLS) * 1).requires_grad_()
    logits = x * 1
    lossops.cross_entropy(logits, torch.randint(0, COLS, (ROWS,)), inplace_backward=True).backward()
    assert lossops.gradient_cache_bytes() == 0


def test_environment_variable_turns_the_default_off():
    code = ("import torch, lossops\n"
            "x = torch.randn(256, 16384, requires_grad=True)\n"
            "with lossops.backend('cpp'):\n"
            "    torch.autograd.grad(lossops.cross_entropy(x, torch.zeros(256, dtype=torch.long)), x)\n"
            "print(lossops.gradient_cache_enabled(), lossops.gradient_cache_bytes())\n")
    result = run_python(code, {"LOSSOPS_GRADIENT_CACHE": "0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "0"]


def test_mid_sized_gradients_are_kept_on_ordinary_pages(cache):
    """From 1 MiB (below the huge-page threshold) the buffer is kept too: the next step reuses it."""
    x = torch.randn(8, 21, 64, 64, dtype=torch.bfloat16, requires_grad=True)  # 1.3 MiB gradient
    target = torch.randint(0, 21, (8, 64, 64))
    (first,) = torch.autograd.grad(lossops.cross_entropy(x, target), x)
    address = first.data_ptr()
    del first
    assert 1 * MIB <= lossops.gradient_cache_bytes() < 2 * MIB
    (second,) = torch.autograd.grad(lossops.cross_entropy(x, target), x)
    assert second.data_ptr() == address


def test_a_loss_with_three_gradients_gets_all_three_back(cache):
    """The triplet losses write three gradients of one shape: the next step reuses all three buffers, whose old
    contents never leak, and a fourth buffer of that size given back pushes out the oldest (at most three kept)."""
    def triplet_step(seed):
        g = torch.Generator().manual_seed(seed)
        inputs = [torch.randn(ROWS, COLS, generator=g).requires_grad_() for _ in range(3)]
        return inputs, torch.autograd.grad(lossops.triplet_margin_loss(*inputs), inputs)

    _, first = triplet_step(0)
    addresses = {grad.data_ptr() for grad in first}
    for grad in first:
        grad.fill_(float("nan"))
    del first, grad
    assert lossops.gradient_cache_bytes() >= 3 * ROWS * COLS * 4
    inputs, second = triplet_step(1)
    assert {grad.data_ptr() for grad in second} == addresses
    assert lossops.gradient_cache_bytes() == 0
    copies = [x.detach().clone().requires_grad_() for x in inputs]
    assert_close(second, torch.autograd.grad(F.triplet_margin_loss(*copies), copies))
    _, _, fourth = step("mse_loss", 2)  # a fourth buffer of that size while the three are held
    del second, fourth
    assert lossops.gradient_cache_bytes() == 3 * ROWS * COLS * 4  # the oldest of the four was freed
    assert lossops.empty_cache() == 3 * ROWS * COLS * 4
    assert lossops.gradient_cache_bytes() == 0
