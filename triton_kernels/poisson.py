"""Poisson negative log-likelihood for the Triton backend; same contract and formulas as csrc/poisson.cpp.

params = (mode, eps): mode bit 1 is log_input, bit 2 full (Stirling's term where t > 1).
"""
import math

import triton
import triton.language as tl

from .elementwise import family_calls as elementwise_calls, kernel_function

LOG_TWO_PI = tl.constexpr(math.log(2 * math.pi))


@triton.jit
def _poisson_nll(x, t, a, mode, eps):
    log_input = (mode == 1.0) | (mode == 3.0)
    full = mode >= 2.0
    e = tl.exp(tl.where(log_input, x, 0.0))
    d = x + eps
    log_d = tl.log(tl.where(log_input, 1.0, d))
    loss = tl.where(log_input, e - t * x, x - t * log_d)
    gx = tl.where(log_input, e - t, 1.0 - t / d)
    gt = tl.where(log_input, -x, -log_d)
    # the Stirling term where t > 1, NaN included (torch masks only t <= 1); log(2 pi t) as log(2 pi) + log(t), one
    # logarithm fewer (a float64 variant spilled with both), log(2 pi) in the accumulation dtype
    counted = tl.where(full, (t > 1.0) | (t != t), False)
    log_t = tl.log(tl.where(counted, t, 1.0))
    stirling = t * log_t - t + 0.5 * (tl.full(x.shape, LOG_TWO_PI, x.dtype) + log_t)
    loss = tl.where(counted, loss + stirling, loss)
    gt = tl.where(counted, gt + log_t + 0.5 / t, gt)
    return loss, gx, gt


poisson_nll = kernel_function(_poisson_nll, ("mode", "eps"))


def aot_calls():
    return elementwise_calls(poisson_nll, grad_target=True)
