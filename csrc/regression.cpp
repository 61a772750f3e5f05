// Regression losses on d = x - t: L1, MSE, smooth-L1 (beta) and Huber (delta), as torch defines them.
//
// Smooth-L1 and Huber share one form: |d| < b ? k d^2 : m (|d| - b / 2), with (k, m) = (1 / (2 beta), 1) and
// (1 / 2, delta). beta = 0 never takes the quadratic branch, so it is L1 with no division by beta, and the
// linear branch's derivative m * sign(d) keeps torch's conventions: sign(0) = 0 (L1's subgradient), and a NaN
// difference gives a NaN gradient for smooth-L1 / Huber but 0 for L1, as torch does.
#include "elementwise.h"

namespace lossops {
namespace {

enum Kind { kL1 = 0, kMse = 1, kSmoothL1 = 2, kHuber = 3 };

template <typename acc_t>
struct Regression {
  using Vec = at::vec::Vectorized<acc_t>;
  int kind;
  acc_t b, k, m;
  explicit Regression(const std::vector<double>& p) : kind(static_cast<int>(p.at(0))) {
    TORCH_CHECK(kind >= kL1 && kind <= kHuber, "lossops: unknown regression kind ", kind);
    b = static_cast<acc_t>(kind == kL1 ? 0.0 : p.at(1));
    k = kind == kHuber ? acc_t(0.5) : b > 0 ? acc_t(0.5) / b : acc_t(0);
    m = kind == kHuber ? b : acc_t(1);
  }

  void operator()(const Vec& x, const Vec& t, const Vec&, Vec& loss, Vec& gx, Vec& gt) const {
    const Vec d = x - t;
    if (kind == kMse) {
      loss = d * d;
      gx = d + d;
    } else {
      const Vec zero(acc_t(0)), ad = d.abs(), vm(m);
      // sign(d) with sign(0) = 0; NaN stays NaN except for L1, whose torch gradient is sgn(NaN) = 0.
      const Vec nan_sign = (kind == kL1 || (kind == kSmoothL1 && b == 0)) ? zero : d;  // beta = 0 is torch's l1_loss
      const Vec sign = Vec::blendv(Vec::blendv(nan_sign, Vec(acc_t(-1)), d < zero), Vec(acc_t(1)), d > zero);
      loss = vm * (ad - Vec(b * acc_t(0.5)));
      gx = vm * sign;
      if (b > 0) {
        const Vec quadratic = ad < Vec(b);
        loss = Vec::blendv(loss, Vec(k) * d * d, quadratic);
        gx = Vec::blendv(gx, Vec(k + k) * d, quadratic);
      }
    }
    gt = gx.neg();
  }
};

}  // namespace

// params {kind (0 L1, 1 MSE, 2 smooth-L1, 3 Huber), beta or delta}.
std::vector<at::Tensor> regression_forward(const ElementwiseArgs& args) { return elementwise_forward<Regression>(args); }

LOSSOPS_REGISTER_ELEMENTWISE("regression", regression_forward, "kind", "beta");

}  // namespace lossops
