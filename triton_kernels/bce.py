"""BCE-with-logits for the Triton backend; same contract and formulas as csrc/bce.cpp (aux = pos_weight)."""
import triton
import triton.language as tl

from .elementwise import family_calls as elementwise_calls, kernel_function, logistic


@triton.jit
def _bce_with_logits(x, t, pos_weight, p0, p1):
    p, one_minus_p, log1p_exp = logistic(x)
    relu_neg = tl.maximum(-x, 0.0)
    # Exactly 1 without pos_weight, so an infinite target gives torch's +-inf rather than 0 * inf = NaN.
    lw = tl.where(pos_weight == 1.0, 1.0, 1.0 + (pos_weight - 1.0) * t)
    # (1 - t) x + lw * max(-x, 0) is exactly max(x, 0) - t x when pos_weight = 1: no cancellation. Where
    # max(-x, 0) is 0 its term is 0 even for an infinite pos_weight (torch's lw * softplus(-x) is finite there).
    loss = (1.0 - t) * x + tl.where(relu_neg == 0.0, 0.0, lw * relu_neg) + lw * log1p_exp
    # d/dx = lw * p - pos_weight * t, written so that a saturated logit keeps the tiny 1 - p
    gx = (1.0 - t) * p - pos_weight * t * one_minus_p
    return loss, gx, (pos_weight - 1.0) * (relu_neg + log1p_exp) - x


bce_with_logits = kernel_function(_bce_with_logits)

def aot_calls():
    return elementwise_calls(bce_with_logits, has_aux=True, grad_target=True)
