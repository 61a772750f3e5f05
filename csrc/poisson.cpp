// Poisson negative log-likelihood, torch's definition (torch.poisson_nll_loss):
//   log_input:  L = exp(x) - t x,             dL/dx = exp(x) - t,        dL/dt = -x
//   otherwise:  L = x - t log(x + eps),       dL/dx = 1 - t / (x + eps), dL/dt = -log(x + eps)
//   full adds Stirling's approximation of log(t!) where t > 1 (a NaN target too: torch masks only t <= 1):
//               t log t - t + log(2 pi t) / 2,  dL/dt += log t + 1 / (2 t).
#include "elementwise.h"
#include "vec_math.h"

#include <c10/util/MathConstants.h>

#include <cmath>
#include <type_traits>

namespace lossops {
namespace {

// exp(x) for log_input: the AVX builds' fast_exp in float (about 2 ulp), ATen's exp otherwise (Sleef's in double on
// the AVX builds).
template <typename acc_t>
inline at::vec::Vectorized<acc_t> poisson_exp(const at::vec::Vectorized<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc_t, float>) return fast_exp(x);
#endif
  return x.exp();
}

template <typename acc_t>
struct PoissonNll {
  using Vec = at::vec::Vectorized<acc_t>;
  bool log_input, full;
  acc_t eps;
  explicit PoissonNll(const std::vector<double>& p)
      : log_input(static_cast<int>(p.at(0)) & 1), full(static_cast<int>(p.at(0)) & 2), eps(static_cast<acc_t>(p.at(1))) {}

  void operator()(const Vec& x, const Vec& t, const Vec&, Vec& loss, Vec& gx, Vec& gt) const {
    const Vec one(acc_t(1));
    if (log_input) {
      const Vec e = poisson_exp(x);
      loss = e - t * x;
      gx = e - t;
      gt = x.neg();
    } else {
      const Vec d = x + Vec(eps), log_d = d.log();
      loss = x - t * log_d;
      gx = one - t / d;
      gt = log_d.neg();
    }
    if (full) {
      const Vec zero(acc_t(0)), half(acc_t(0.5)), log_t = t.log();
      // log(2 pi t) as log(2 pi) + log(t): one logarithm, the same as the Triton kernel's
      const Vec stirling = t * log_t - t + half * (Vec(acc_t(std::log(2 * c10::pi<double>))) + log_t);
      const Vec at_most_one = t <= one;
      loss = loss + Vec::blendv(stirling, zero, at_most_one);
      gt = gt + Vec::blendv(log_t + half / t, zero, at_most_one);
    }
  }
};

}  // namespace

// params {mode (1: log_input, 2: full; or-ed), eps}.
std::vector<at::Tensor> poisson_nll_forward(const ElementwiseArgs& args) { return elementwise_forward<PoissonNll>(args); }

LOSSOPS_REGISTER_ELEMENTWISE("poisson_nll", poisson_nll_forward, "mode", "eps");

}  // namespace lossops
