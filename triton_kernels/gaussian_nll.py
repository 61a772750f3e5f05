"""Gaussian negative log-likelihood for the Triton backend; same contract and formulas as csrc/gaussian_nll.cpp.

params = (mode, eps): mode bit 1 is full, bit 2 says var is the auxiliary operand (the target then in the second
slot, differentiated with the input); otherwise var is the second operand and the target the auxiliary one.
"""
import math

import triton
import triton.language as tl

from .elementwise import family_calls as elementwise_calls, kernel_function

HALF_LOG_TWO_PI = tl.constexpr(0.5 * math.log(2 * math.pi))


@triton.jit
def _gaussian_nll(x, second, a, mode, eps):
    full = (mode == 1.0) | (mode == 3.0)
    var_in_aux = mode >= 2.0
    var = tl.where(var_in_aux, a, second)
    target = tl.where(var_in_aux, second, a)
    v = tl.where(var < eps, eps, var)  # a NaN var stays NaN, as torch's clamp
    d = x - target
    d_over_v = d / v
    loss = 0.5 * (tl.log(v) + d * d / v)
    loss = tl.where(full, loss + tl.full(x.shape, HALF_LOG_TWO_PI, x.dtype), loss)
    g_second = tl.where(var_in_aux, -d_over_v, 0.5 * (1.0 - d_over_v * d) / v)
    return loss, d_over_v, g_second


gaussian_nll = kernel_function(_gaussian_nll, ("mode", "eps"))


def aot_calls():
    return elementwise_calls(gaussian_nll, has_aux=True, grad_target=True)
