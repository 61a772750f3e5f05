// KL divergence on log-probabilities x and a target distribution t, torch's F.kl_div term by term, in torch's
// order of operations (so non-finite inputs give torch's values too):
//   probabilities (log_target = 0): L = t log t - t x, dL/dx = -t, dL/dt = log t + t / t - x;
//   log-probabilities (log_target = 1): L = e^t (t - x), dL/dx = -e^t, dL/dt = e^t (t - x) + e^t.
// An absent class (t = 0, or e^t = 0) contributes 0 whatever x is, the limit of the term: torch's 0 * log 0
// products give NaN there when x is infinite (log_target = 0: x = -inf; log_target = 1: t = -inf). torch's target
// gradient at t = 0 (log_target = 0) is NaN, that of t log t having no finite value there; kept.
#include "elementwise.h"

namespace lossops {
namespace {

template <typename acc_t>
struct KlDiv {
  using Vec = at::vec::Vectorized<acc_t>;
  bool log_target;
  explicit KlDiv(const std::vector<double>& p) : log_target(p.at(0) != 0) {}

  void operator()(const Vec& x, const Vec& t, const Vec&, Vec& loss, Vec& gx, Vec& gt) const {
    const Vec zero(acc_t(0));
    if (log_target) {
      const Vec e = t.exp();
      const Vec absent = e == zero;
      const Vec d = t - x;
      loss = Vec::blendv(e * d, zero, absent);
      gx = e.neg();
      gt = Vec::blendv(e * d + e, zero, absent);
    } else {
      const Vec absent = t == zero;
      const Vec log_t = t.log();
      loss = Vec::blendv(t * log_t - t * x, zero, absent);
      gx = t.neg();
      gt = log_t + t / t - x;  // NaN at t = 0 (0 / 0), as torch's
    }
  }
};

}  // namespace

// params {log_target (0 or 1)}.
std::vector<at::Tensor> kl_div_forward(const ElementwiseArgs& args) { return elementwise_forward<KlDiv>(args); }

LOSSOPS_REGISTER_ELEMENTWISE("kl_div", kl_div_forward, "log_target");

}  // namespace lossops
