"""The bytes each Triton kernel moves, counted under the interpreter: every load and store of an active lane is added
to the tensor its address falls in. The counts are the bytes model of docs/triton-kernels.md ("Bytes moved"):
what a kernel reads and writes of its N x C operands, in units of one pass over them."""
import contextlib

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

from lossops.triton_kernels import cross_entropy as ce
from lossops.triton_kernels import token_stats, vocab_parallel
from lossops.triton_kernels import regression
from lossops.triton_kernels.common import launch_config


@contextlib.contextmanager
def traffic(**tensors):
    """Bytes read from and written to each named tensor by the kernels launched inside the block."""
    spans = {name: (t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()) for name, t in tensors.items()}
    counts = {name: {"read": 0, "written": 0} for name in tensors}

    def count(kind, addresses, mask, itemsize):
        active = np.asarray(addresses)[np.broadcast_to(np.asarray(mask), np.shape(addresses))]
        for name, (begin, end) in spans.items():
            counts[name][kind] += int(((active >= begin) & (active < end)).sum()) * itemsize

    load, store = interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store

    def counted_load(self, ptrs, mask, other, cache_policy, is_volatile):
        result = load(self, ptrs, mask, other, cache_policy, is_volatile)
        count("read", ptrs.data, mask.data, result.data.dtype.itemsize)
        return result

    def counted_store(self, ptrs, value, mask, cache_policy):
        count("written", ptrs.data, mask.data, value.data.dtype.itemsize)
        return store(self, ptrs, value, mask, cache_policy)

    interpreter.InterpreterBuilder.create_masked_load = counted_load
    interpreter.InterpreterBuilder.create_masked_store = counted_store
    try:
        yield counts
    finally:
        interpreter.InterpreterBuilder.create_masked_load = load
        interpreter.InterpreterBuilder.create_masked_store = store


ROWS, CLASSES = 6, 2 * launch_config(10 ** 6)["BLOCK"] + 100  # several blocks per row, the last partly masked
# A class count whose rows a program takes several at a time (launch_config's ROWS), here more than there are: the
# rows past the last move nothing.
SMALL_CLASSES = 10
ROW_KERNEL_CLASSES = pytest.mark.parametrize("classes", [CLASSES, SMALL_CLASSES],
                                             ids=["several-blocks", "several-rows"])


def test_the_class_counts_take_the_paths_they_name():
    assert launch_config(CLASSES, rows=True)["ROWS"] == 1 and CLASSES > 2 * launch_config(CLASSES)["BLOCK"]
    assert launch_config(SMALL_CLASSES, rows=True)["ROWS"] > ROWS


def _logits(dtype=torch.bfloat16, classes=CLASSES):
    return torch.randn(ROWS, classes, 1).to(dtype)


def _ce_arguments(logits, target, grad):
    return dict(input=logits, target=target, weight=None, grad=grad, ignore_index=-100, label_smoothing=0.0,
                lse_square_scale=0.0, softcap=None, focal_gamma=None, grad_scale=torch.ones(()))


@ROW_KERNEL_CLASSES
@pytest.mark.parametrize("ignored", [0, 2])
def test_cross_entropy_forward_with_gradient(ignored, classes):
    """Two reads of each kept row (online logsumexp, then the gradient) plus its target's logit, one gradient write
    per row; an ignored row is not read and gets zeros."""
    logits = _logits(classes=classes)
    target = torch.randint(0, classes, (ROWS,))
    target[:ignored] = -100
    grad = torch.empty_like(logits)
    with traffic(logits=logits, grad=grad) as moved:
        ce.cross_entropy(**_ce_arguments(logits, target, grad))
    row = classes * logits.element_size()
    kept = ROWS - ignored
    assert moved["logits"] == {"read": kept * (2 * row + logits.element_size()), "written": 0}
    assert moved["grad"] == {"read": 0, "written": ROWS * row}


@ROW_KERNEL_CLASSES
def test_cross_entropy_forward_only_reads_once(classes):
    logits = _logits(classes=classes)
    target = torch.randint(0, classes, (ROWS,))
    with traffic(logits=logits) as moved:
        ce.cross_entropy(**_ce_arguments(logits, target, None))
    assert moved["logits"] == {"read": ROWS * (classes + 1) * logits.element_size(), "written": 0}


@ROW_KERNEL_CLASSES
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_family_route_reads_twice_and_writes_once(reduction, classes):
    """The family's route on this backend: forward reads each kept row once, backward reads it once more and writes
    the gradient once with grad_output applied, so forward+backward moves the logits three times (plus one target
    logit per kept row in each direction); an ignored row is read by neither and gets zeros."""
    logits = _logits(classes=classes)
    target = torch.randint(0, classes, (ROWS,))
    target[:2] = -100
    options = dict(ignore_index=-100, label_smoothing=0.0, lse_square_scale=0.0, softcap=None, focal_gamma=None,
                   reduction=reduction)
    grad = torch.empty_like(logits)
    grad_loss = torch.randn(ROWS) if reduction == "none" else torch.tensor(2.0)
    with traffic(logits=logits, grad=grad) as moved:
        _, state = ce.cross_entropy_forward(input=logits, target=target, weight=None, weighted_mean=True, **options)
        forward = {name: dict(counts) for name, counts in moved.items()}
        ce.cross_entropy_backward(input=logits, target=target, weight=None, grad=grad, state=state,
                                  grad_loss=grad_loss, **options)
    row = classes * logits.element_size()
    kept = ROWS - 2
    assert forward["logits"] == {"read": kept * (row + logits.element_size()), "written": 0}
    assert forward["grad"] == {"read": 0, "written": 0}
    assert moved["logits"] == {"read": 2 * kept * (row + logits.element_size()), "written": 0}
    assert moved["grad"] == {"read": 0, "written": ROWS * row}


def test_token_statistics_and_shard_kernels_read_once():
    logits = _logits()
    target = torch.randint(0, CLASSES, (ROWS,))
    row = CLASSES * logits.element_size()
    with traffic(logits=logits) as moved:
        token_stats.cross_entropy_token_stats(input=logits, target=target, ignore_index=-100, softcap=None)
    assert moved["logits"] == {"read": ROWS * (row + logits.element_size()), "written": 0}

    shard = logits[:, :, 0]
    grad = torch.empty_like(shard)
    coefficients = torch.ones(ROWS, 3)
    with traffic(logits=shard, grad=grad) as moved:
        vocab_parallel.cross_entropy_shard_grad(input=shard, target=target, weight=None, grad=grad,
                                                lse=torch.zeros(ROWS), coefficients=coefficients, class_offset=0,
                                                softcap=None)
    assert moved["logits"] == {"read": ROWS * row, "written": 0}
    assert moved["grad"] == {"read": 0, "written": ROWS * row}


@pytest.mark.parametrize("grad_output, passes", [(1.0, 0), (0.5, 1)])
def test_gradient_scaling_skips_its_pass_when_grad_output_is_one(grad_output, passes):
    """The backward scaling of a gradient written in forward: nothing moved for grad_output 1, else one read and
    one write of the gradient."""
    from lossops.triton_kernels import common
    grad = torch.randn(5, 3000)
    expected = grad * grad_output
    with traffic(grad=grad) as moved:
        common.scale_gradient(grad=grad, grad_output=torch.tensor(grad_output))
    size = grad.numel() * grad.element_size()
    assert moved["grad"] == {"read": passes * size, "written": passes * size}
    torch.testing.assert_close(grad, expected)


def test_elementwise_reads_each_operand_once_and_writes_each_gradient_once():
    x = torch.randn(5, 1000)
    t = torch.randn(5, 1000)
    gx, gt = torch.empty_like(x), torch.empty_like(x)
    with traffic(input=x, target=t, grad_input=gx, grad_target=gt) as moved:
        regression.regression(input=x, target=t, weight=None, weight_layout=[1, 1], aux=None, aux_layout=[1, 1],
                              ignore_index=-100, grad_input=gx, grad_target=gt, grad_scale=torch.ones(()),
                              per_element=False, kind=2, beta=1.0)
    size = x.numel() * x.element_size()
    assert moved == {"input": {"read": size, "written": 0}, "target": {"read": size, "written": 0},
                     "grad_input": {"read": 0, "written": size}, "grad_target": {"read": 0, "written": size}}
