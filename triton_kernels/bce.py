"""BCE-with-logits (aux = pos_weight) and BCE on probabilities for the Triton backend; same contract and formulas
as csrc/bce.cpp."""
import triton
import triton.language as tl

from .common import log1p
from .elementwise import family_calls as elementwise_calls, kernel_function, logistic

# torch's EPSILON for the input gradient's denominator: the float 1e-12, in every dtype
FLOAT_EPSILON = tl.constexpr(9.999999960041972e-13)


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


@triton.jit
def _binary_cross_entropy(x, t, a, p0, p1):
    # torch's definition and conventions, as csrc/bce.cpp: each log clamped at -100, x (1 - x) at 1e-12 (a float64
    # constant in float64: a float literal would be float32's nearest value), the target's gradient unclamped.
    log_p = tl.log(x)
    log_q = log1p(-x)
    loss = (t - 1.0) * tl.maximum(log_q, -100.0) - t * tl.maximum(log_p, -100.0)
    gx = (x - t) / tl.maximum((1.0 - x) * x, tl.full(x.shape, FLOAT_EPSILON, x.dtype))
    return loss, gx, log_q - log_p


# input and target are checked to be probabilities in the same pass, as csrc/bce.cpp checks them
binary_cross_entropy = kernel_function(_binary_cross_entropy, probabilities=True)


def aot_calls():
    return (elementwise_calls(bce_with_logits, has_aux=True, grad_target=True)
            + elementwise_calls(binary_cross_entropy, grad_target=True))
