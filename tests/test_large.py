"""A logits tensor of more than 2^31 elements through the C++ kernel: every offset must be int64.

SLOW AND LARGE: ~4.3 GB of bf16 logits (the gradient is written over them, so no second N x V buffer,
and the torch comparisons use only the rows that are checked), 20-60 s on two cores. It runs in CI by
default on purpose: int32 offset arithmetic is a silent-corruption bug that no small test can reach.
"""
import math

import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lossops
import lossops._cpp

V = 50_257  # odd, no multiple of any block or vector width
ROWS = 2 ** 31 // V + 4
# The row that straddles element 2^31, and the last rows: their offsets overflow int32.
CHECKED = [2 ** 31 // V, ROWS - 3, ROWS - 2, ROWS - 1]


def test_more_than_2_31_elements_cpp():
    assert ROWS * V > 2 ** 31
    gen = torch.Generator().manual_seed(0)
    # Zero rows elsewhere: their loss is log(V) and their gradient 1/V - onehot, also checked below.
    logits = torch.zeros(ROWS, V, dtype=torch.bfloat16)
    checked = torch.tensor(CHECKED)
    logits[checked] = (3 * torch.randn(len(CHECKED), V, generator=gen)).to(torch.bfloat16)
    target = torch.randint(0, V, (ROWS,), generator=gen)
    rows = logits[checked].float().requires_grad_()  # the same bf16 values, exactly, for torch in fp32
    expected = F.cross_entropy(rows, target[checked], reduction="none")
    expected.sum().backward()
    log_v = math.log(V)

    with lossops.backend("cpp"), torch.no_grad():  # the public path, forward only
        per_row = lossops.cross_entropy(logits, target, reduction="none")
    assert_close(per_row[checked].float(), expected.detach().to(torch.bfloat16).float(), rtol=0.01, atol=0)
    assert_close(per_row[:2].float(), torch.full((2,), log_v).to(torch.bfloat16).float(), rtol=0, atol=0)

    # The gradient straight from the kernel, written over the logits (grad may alias input there):
    # autograd's inplace_backward needs a non-leaf that is not a view, which would take a copy.
    logits3 = logits.view(ROWS, V, 1)
    row_loss, _, total = lossops._cpp.module().call_kernel(
        "cross_entropy", input=logits3, target=target, weight=None, grad=logits3, ignore_index=-100,
        label_smoothing=0.0, lse_square_scale=0.0, softcap=None, focal_gamma=None,
        grad_scale=torch.tensor(1.0, dtype=torch.float64), row_state=None)
    assert_close(row_loss[checked], expected.detach(), rtol=1e-5, atol=1e-5)
    assert_close(total.item(), (ROWS - len(CHECKED)) * log_v + expected.sum().item(), rtol=1e-6, atol=0)
    grad = logits
    # One bf16 rounding of each side's fp32 value: they may land one bf16 ulp (2^-8) apart.
    assert_close(grad[checked].float(), rows.grad.to(torch.bfloat16).float(), rtol=2 ** -7, atol=1e-9)
    zero_row = torch.full((V,), 1.0 / V)
    zero_row[target[0]] -= 1
    assert_close(grad[0].float(), zero_row.to(torch.bfloat16).float(), rtol=2 ** -7, atol=0)
