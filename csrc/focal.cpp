// Sigmoid focal loss, L = alpha_t * q^gamma * ce with q = 1 - p_t = p(1 - t) + (1 - p)t and ce the BCE term.
//
// dL/dx = alpha_t * q^gamma * (gamma * (1 - 2t) * r * ce + p - t), r = p(1 - p) / q.
// The chain rule through q^gamma gives gamma * q^(gamma - 1) * p(1 - p)(1 - 2t); writing q^(gamma - 1) * p(1 - p)
// as q^gamma * r removes the negative power: r <= 2 for every t in [0, 1] and r -> 1 where q underflows to 0
// (hard targets at saturated logits), so the gradient is finite for every gamma >= 0, including 0 < gamma < 1.
#include "elementwise.h"

namespace lossops {
namespace {

template <typename acc_t>
struct SigmoidFocal {
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t alpha, gamma;
  explicit SigmoidFocal(const std::vector<double>& p)
      : alpha(static_cast<acc_t>(p.at(0))), gamma(static_cast<acc_t>(p.at(1))) {}

  void operator()(const Vec& x, const Vec& t, const Vec&, Vec& loss, Vec& gx, Vec&) const {
    const Vec zero(acc_t(0)), one(acc_t(1));
    const Logistic<acc_t> s(x);
    const Vec one_minus_t = one - t;
    // BCE as (1 - t) x + max(-x, 0) + log1p(exp(-|x|)): torch's own form (so infinite logits give torch's inf or
    // NaN), but with log1p(exp(-|x|)) added last instead of rounded into log-sigmoid, so it is not lost next to x.
    const Vec ce = one_minus_t * x + at::vec::maximum(x.neg(), zero) + s.log1p_exp;
    const Vec q = s.p * one_minus_t + s.one_minus_p * t;
    const Vec qg = gamma == acc_t(2) ? q * q : q.pow(Vec(gamma));
    const Vec r = Vec::blendv(one, s.p * s.one_minus_p / q, q > zero);
    Vec scale = qg;
    if (alpha >= 0) scale = scale * (Vec(alpha) * t + Vec(acc_t(1) - alpha) * one_minus_t);
    loss = scale * ce;
    // p - t as p(1 - t) - t(1 - p): exact for saturated logits
    gx = scale * (Vec(gamma) * (one - t - t) * r * ce + s.p * one_minus_t - t * s.one_minus_p);
  }
};

}  // namespace

// params {alpha (< 0: off), gamma}; dense or class-index targets.
std::vector<at::Tensor> sigmoid_focal_forward(const ElementwiseArgs& args) {
  TORCH_CHECK(!args.grad_target.has_value(), "lossops: the sigmoid focal kernel does not compute target gradients");
  return elementwise_forward<SigmoidFocal>(args);
}

LOSSOPS_REGISTER_ELEMENTWISE("sigmoid_focal", sigmoid_focal_forward, "alpha", "gamma");

}  // namespace lossops
