// Gaussian negative log-likelihood, torch's definition (F.gaussian_nll_loss), with v = max(var, eps) (torch clamps a
// copy of var under no_grad: var's gradient is taken at the clamped value, as if unclamped; a NaN var stays NaN) and
// d = x - t:
//   L = (log v + d^2 / v) / 2, plus log(2 pi) / 2 when full
//   dL/dx = d / v,  dL/dt = -d / v,  dL/dvar = (1 / v - d^2 / v^2) / 2
// The operand after the input is the one differentiated with it: var, the target then in the auxiliary operand
// (mode bit 2 clear), or the target, var then in the auxiliary operand, compact where it broadcasts (bit 2 set).
#include "elementwise.h"

#include <c10/util/MathConstants.h>

#include <cmath>

namespace lossops {
namespace {

template <typename acc_t>
struct GaussianNll {
  using Vec = at::vec::Vectorized<acc_t>;
  bool full, var_in_aux;
  acc_t eps;
  explicit GaussianNll(const std::vector<double>& p)
      : full(static_cast<int>(p.at(0)) & 1), var_in_aux(static_cast<int>(p.at(0)) & 2), eps(static_cast<acc_t>(p.at(1))) {}

  void operator()(const Vec& x, const Vec& second, const Vec& a, Vec& loss, Vec& gx, Vec& gt) const {
    const Vec half(acc_t(0.5)), one(acc_t(1));
    const Vec var = var_in_aux ? a : second, target = var_in_aux ? second : a;
    const Vec v = Vec::blendv(var, Vec(eps), var < Vec(eps));
    const Vec d = x - target, d_over_v = d / v;
    loss = half * (v.log() + d * d / v);
    if (full) loss = loss + Vec(acc_t(0.5 * std::log(2 * c10::pi<double>)));
    gx = d_over_v;
    gt = var_in_aux ? d_over_v.neg() : half * (one - d_over_v * d) / v;
  }
};

}  // namespace

// params {mode (1: full, 2: var in the auxiliary operand; or-ed), eps}.
std::vector<at::Tensor> gaussian_nll_forward(const ElementwiseArgs& args) { return elementwise_forward<GaussianNll>(args); }

LOSSOPS_REGISTER_ELEMENTWISE("gaussian_nll", gaussian_nll_forward, "mode", "eps");

}  // namespace lossops
