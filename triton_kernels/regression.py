"""L1 / MSE / smooth-L1 / Huber for the Triton backend; same contract and conventions as csrc/regression.cpp.

params = (kind, beta or delta), kind 0 L1, 1 MSE, 2 smooth-L1, 3 Huber. Smooth-L1 and Huber share
|d| < b ? k d^2 : m (|d| - b / 2); beta = 0 never takes the quadratic branch (L1, no division by beta).
"""
import triton
import triton.language as tl

from .elementwise import family_calls as elementwise_calls, kernel_function


@triton.jit
def _regression(x, t, a, kind, b):
    d = x - t
    ad = tl.abs(d)
    # smooth-L1 with beta = 0 is torch's l1_loss, conventions included
    is_l1 = (kind == 0) | ((kind == 2) & (b == 0))
    is_huber = kind == 3
    b = tl.where(is_l1, 0.0, b)
    k = tl.where(is_huber, 0.5, tl.where(b > 0, 0.5 / tl.where(b > 0, b, 1.0), 0.0))
    m = tl.where(is_huber, b, 1.0)
    # sign(d), sign(0) = 0; a NaN difference gives NaN (smooth-L1, Huber) or 0 (L1, smooth-L1 beta=0), as torch's
    # gradients do
    sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, tl.where(is_l1, 0.0, d)))
    quadratic = ad < b
    loss = tl.where(quadratic, k * d * d, m * (ad - 0.5 * b))
    g = tl.where(quadratic, 2.0 * k * d, m * sign)
    loss = tl.where(kind == 1, d * d, loss)
    g = tl.where(kind == 1, 2.0 * d, g)
    return loss, g, -g


regression = kernel_function(_regression, ("kind", "beta"))

def aot_calls():
    return elementwise_calls(regression, grad_target=True)
