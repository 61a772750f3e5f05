"""KL divergence for the Triton backend; same contract and conventions as csrc/divergence.cpp."""
import triton
import triton.language as tl

from .elementwise import family_calls as elementwise_calls, kernel_function


@triton.jit
def _kl_div(x, t, a, log_target, p1):
    # log-probability target: e^t (t - x); an absent class (e^t = 0) contributes 0 whatever x is
    e = tl.exp(t)
    d = t - x
    log_loss = tl.where(e == 0.0, 0.0, e * d)
    log_gt = tl.where(e == 0.0, 0.0, e * d + e)
    # probability target: t log t - t x; t = 0 contributes 0; the target gradient's t / t is NaN there, as torch's
    log_t = tl.log(t)
    loss = tl.where(t == 0.0, 0.0, t * log_t - t * x)
    gt = log_t + t / t - x
    use_log = log_target != 0.0
    return tl.where(use_log, log_loss, loss), tl.where(use_log, -e, -t), tl.where(use_log, log_gt, gt)


kl_div = kernel_function(_kl_div, ("log_target",))


def aot_calls():
    return elementwise_calls(kl_div, grad_target=True)
