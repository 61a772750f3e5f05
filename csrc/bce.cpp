// BCE with logits, torch's definition: L = w * ((1 - t) x + lw * softplus(-x)), lw = 1 + (pos_weight - 1) t.
// dL/dx = w * (lw * sigmoid(x) - pos_weight * t) = w * ((1 - t) sigmoid(x) - pos_weight * t * sigmoid(-x));  dL/dt = w * (-x + (pos_weight - 1) * softplus(-x)).
#include "elementwise.h"

namespace lossops {
namespace {

template <typename acc_t>
struct BceWithLogits {
  using Vec = at::vec::Vectorized<acc_t>;
  explicit BceWithLogits(const std::vector<double>&) {}

  // pos_weight arrives as the auxiliary operand (1 when absent).
  void operator()(const Vec& x, const Vec& t, const Vec& pos_weight, Vec& loss, Vec& gx, Vec& gt) const {
    const Vec zero(acc_t(0)), one(acc_t(1));
    const Logistic<acc_t> s(x);
    const Vec pw_minus_one = pos_weight - one;
    // Exactly 1 without pos_weight, so an infinite target gives torch's +-inf rather than 0 * inf = NaN.
    const Vec lw = Vec::blendv(one + pw_minus_one * t, one, pw_minus_one == zero);
    const Vec relu_neg = at::vec::maximum(x.neg(), zero);
    // (1 - t) x + lw * max(-x, 0) is exactly max(x, 0) - t x when pos_weight = 1: no cancellation. Where
    // max(-x, 0) is 0 its term is 0 even for an infinite pos_weight (torch's lw * softplus(-x) is finite there).
    loss = (one - t) * x + Vec::blendv(lw * relu_neg, zero, relu_neg == zero) + lw * s.log1p_exp;
    // = lw * p - pos_weight * t, written so that a saturated logit keeps the tiny 1 - p instead of rounding it to 0
    gx = (one - t) * s.p - pos_weight * t * s.one_minus_p;
    gt = pw_minus_one * s.softplus_neg - x;
  }
};

}  // namespace

// params {}; aux = pos_weight.
std::vector<at::Tensor> bce_with_logits_forward(const ElementwiseArgs& args) {
  return elementwise_forward<BceWithLogits>(args);
}

LOSSOPS_REGISTER_ELEMENTWISE("bce_with_logits", bce_with_logits_forward);

}  // namespace lossops
