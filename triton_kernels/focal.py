"""Sigmoid focal loss for the Triton backend; same contract and formulas as csrc/focal.cpp.

dL/dx = alpha_t q^gamma (gamma (1 - 2t) r ce + p - t) with q = 1 - p_t and r = p(1 - p) / q: no negative
power of q, so the gradient is finite for every gamma >= 0 (r -> 1 where q underflows).
"""
import triton
import triton.language as tl

from .common import pow_nonneg
from .elementwise import family_calls as elementwise_calls, kernel_function, logistic


@triton.jit
def _sigmoid_focal(x, t, a, alpha, gamma):
    p, one_minus_p, log1p_exp = logistic(x)
    ce = (1.0 - t) * x + tl.maximum(-x, 0.0) + log1p_exp  # torch's BCE form, log1p term added last (exact)
    q = p * (1.0 - t) + one_minus_p * t
    r = tl.where(q > 0, p * one_minus_p / tl.where(q > 0, q, 1.0), 1.0)
    scale = pow_nonneg(q, gamma) * tl.where(alpha >= 0, alpha * t + (1.0 - alpha) * (1.0 - t), 1.0)
    gx = scale * (gamma * (1.0 - 2.0 * t) * r * ce + p * (1.0 - t) - t * one_minus_p)  # p - t, exact when saturated
    return scale * ce, gx, gx  # no target gradient: lossops.focal routes that to the reference


sigmoid_focal = kernel_function(_sigmoid_focal, ("alpha", "gamma"))

def aot_calls():
    return elementwise_calls(sigmoid_focal) + elementwise_calls(sigmoid_focal, index_target=True)
