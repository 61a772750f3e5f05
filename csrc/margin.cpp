// Margin losses on a target sign y, as torch defines them:
//   soft margin:      L = log(1 + exp(-y x)), written softplus(-y x) = max(-y x, 0) + log1p(exp(-|y x|)) so that it
//                     stays finite (torch's log1p(exp(.)) overflows to inf, and its gradient to NaN, past exp's range);
//                     dL/dx = -y sigmoid(-y x). torch defines no target gradient.
//   hinge embedding:  L = [y != 1] max(margin - x, 0) + [y != -1] x: x where y = 1, max(0, margin - x) where y = -1,
//                     their sum for any other value, as torch's two where()s give; the clamp's gradient passes at
//                     margin - x = 0 and a NaN input's loss stays NaN (torch's clamp_min). No target gradient.
//   margin ranking:   x = input1, t = input2, the sign y in the auxiliary operand: L = max(margin - y (x - t), 0),
//                     dL/dx = -y [margin - y (x - t) >= 0], dL/dt = y [...] (the clamp's gradient passes at 0, as
//                     torch's clamp_min). y's gradient takes the reference path.
#include "elementwise.h"

namespace lossops {
namespace {

enum MarginKind { kSoftMargin = 0, kHingeEmbedding = 1, kMarginRanking = 2 };

template <typename acc_t>
struct Margin {
  using Vec = at::vec::Vectorized<acc_t>;
  int kind;
  acc_t margin;
  explicit Margin(const std::vector<double>& p) : kind(static_cast<int>(p.at(0))), margin(static_cast<acc_t>(p.at(1))) {
    TORCH_CHECK(kind == kSoftMargin || kind == kHingeEmbedding || kind == kMarginRanking,
                "lossops: unknown margin loss kind ", kind);
  }

  void operator()(const Vec& x, const Vec& y, const Vec& a, Vec& loss, Vec& gx, Vec& gt) const {
    const Vec zero(acc_t(0)), one(acc_t(1));
    if (kind == kMarginRanking) {
      // margin - a (x - t), as torch's -a (x - t) + margin: the same rounding
      const Vec z = Vec(margin) - a * (x - y);
      // the sign times the clamp's 0/1 mask, as torch's backward multiplies them: a NaN or infinite sign gives NaN
      const Vec passes = Vec::blendv(zero, one, z >= zero);
      loss = Vec::blendv(z, zero, z < zero);
      gx = a.neg() * passes;
      gt = a * passes;
      return;
    }
    gt = zero;
    if (kind == kSoftMargin) {
      const Vec z = (y * x).neg();
      const Logistic<acc_t> s(z);
      loss = at::vec::maximum(z, zero) + s.log1p_exp;
      gx = (y * s.p).neg();
      return;
    }
    const Vec gap = Vec(margin) - x;
    const Vec not_positive = y != one, not_negative = y != one.neg();
    // gap < 0 ? 0 : gap keeps a NaN gap (maximum would too, but this reads as torch's clamp_min)
    const Vec clamped = Vec::blendv(gap, zero, gap < zero);
    loss = Vec::blendv(zero, clamped, not_positive) + Vec::blendv(zero, x, not_negative);
    gx = Vec::blendv(zero, Vec::blendv(zero, one.neg(), gap >= zero), not_positive) + Vec::blendv(zero, one, not_negative);
  }
};

}  // namespace

// params {kind (0 soft margin, 1 hinge embedding, 2 margin ranking), margin (hinge embedding's, margin ranking's)}.
std::vector<at::Tensor> margin_forward(const ElementwiseArgs& args) { return elementwise_forward<Margin>(args); }

LOSSOPS_REGISTER_ELEMENTWISE("margin", margin_forward, "kind", "margin");

}  // namespace lossops
