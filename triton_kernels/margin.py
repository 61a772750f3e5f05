"""Soft margin and hinge embedding losses for the Triton backend; same contract and conventions as csrc/margin.cpp.

params = (kind, margin), kind 0 soft margin (softplus(-y x), finite where torch's log1p(exp(.)) overflows), 1 hinge
embedding ([y != 1] max(margin - x, 0) + [y != -1] x). Neither has a target gradient.
"""
import triton
import triton.language as tl

from .elementwise import family_calls as elementwise_calls, kernel_function, logistic


@triton.jit
def _margin(x, y, a, kind, margin):
    z = -(y * x)
    p, _, log1p_exp = logistic(z)
    soft_loss = tl.maximum(z, 0.0) + log1p_exp
    gap = margin - x
    not_positive = y != 1.0
    not_negative = y != -1.0
    # gap < 0 ? 0 : gap keeps a NaN gap, as torch's clamp_min (tl.maximum may drop it on a GPU)
    hinge_loss = tl.where(not_positive, tl.where(gap < 0, 0.0, gap), 0.0) + tl.where(not_negative, x, 0.0)
    hinge_gx = tl.where(not_positive & (gap >= 0), -1.0, 0.0) + tl.where(not_negative, 1.0, 0.0)
    soft = kind == 0
    return tl.where(soft, soft_loss, hinge_loss), tl.where(soft, -(y * p), hinge_gx), tl.zeros_like(x)


margin = kernel_function(_margin, ("kind", "margin"))


def aot_calls():
    return elementwise_calls(margin)
