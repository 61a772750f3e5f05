"""Soft margin, hinge embedding and margin ranking losses for the Triton backend; same contract and conventions as
csrc/margin.cpp.

params = (kind, margin), kind 0 soft margin (softplus(-y x), finite where torch's log1p(exp(.)) overflows), 1 hinge
embedding ([y != 1] max(margin - x, 0) + [y != -1] x), neither with a target gradient; 2 margin ranking
(max(margin - a (x - t), 0) with x = input1, t = input2 and the sign a in the auxiliary operand).
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
    # margin ranking: margin - a (x - t), as torch's -a (x - t) + margin; the clamp's gradient passes at 0
    ranked = margin - a * (x - y)
    ranking_loss = tl.where(ranked < 0, 0.0, ranked)
    # the sign times the clamp's 0/1 mask, as torch's backward: a NaN or infinite sign gives NaN
    passes = tl.where(ranked >= 0, 1.0, 0.0)
    ranking_gx = -a * passes
    soft = kind == 0
    ranking = kind == 2.0
    loss = tl.where(ranking, ranking_loss, tl.where(soft, soft_loss, hinge_loss))
    gx = tl.where(ranking, ranking_gx, tl.where(soft, -(y * p), hinge_gx))
    return loss, gx, tl.where(ranking, a * passes, 0.0)


margin = kernel_function(_margin, ("kind", "margin"))


def aot_calls():
    return elementwise_calls(margin, has_aux=True, grad_target=True)
