// Binary cross-entropy on probabilities, torch's definition: L = w * ((t - 1) max(log(1 - x), -100) - t max(log x, -100));
// dL/dx = w * (x - t) / max(x (1 - x), 1e-12) and dL/dt = w * (log(1 - x) - log x), as torch's backward formulas
// (unclamped: infinite at x = 0 and 1, as torch's). Values outside [0, 1] raise torch's error, naming the value.
//
// BCE with logits, torch's definition: L = w * ((1 - t) x + lw * softplus(-x)), lw = 1 + (pos_weight - 1) t.
// dL/dx = w * (lw * sigmoid(x) - pos_weight * t) = w * ((1 - t) sigmoid(x) - pos_weight * t * sigmoid(-x));  dL/dt = w * (-x + (pos_weight - 1) * softplus(-x)).
#include "elementwise.h"
#include "vec_math.h"

#include <algorithm>
#include <atomic>
#include <utility>

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

template <typename acc_t>
struct BinaryCrossEntropy {
  using Vec = at::vec::Vectorized<acc_t>;
  explicit BinaryCrossEntropy(const std::vector<double>&) {}

  void operator()(const Vec& x, const Vec& t, const Vec&, Vec& loss, Vec& gx, Vec& gt) const {
    const Vec one(acc_t(1)), floor(acc_t(-100));
    Vec log_p, log_q;
    log_and_log1m(x, log_p, log_q);
    loss = (t - one) * at::vec::maximum(log_q, floor) - t * at::vec::maximum(log_p, floor);
    // torch's EPSILON is the float 1e-12 (9.99999996e-13), in every dtype
    gx = (x - t) / at::vec::maximum((one - x) * x, Vec(static_cast<acc_t>(1e-12f)));
    gt = log_q - log_p;
  }
};

// The first value outside [0, 1] (NaN included) raises; a pass that only compares, before the logs, in vectors of
// the accumulation type (a lane's mask stays all ones while every value it saw was in range).
template <typename scalar_t>
void check_probabilities(const at::Tensor& values, const char* name) {
  using Vectors = detail::DenseVectors<scalar_t>;
  using Vec = typename Vectors::Vec;
  const scalar_t* p = values.const_data_ptr<scalar_t>();
  const int64_t n = values.numel();
  std::atomic<bool> valid{true};
  at::parallel_for(0, n, kReduceChunk, [&](int64_t begin, int64_t end) {
    const Vec zero(0), one(1);
    Vec in_range = zero == zero;
    Vec v[Vectors::kVecs];
    for (int64_t i = begin; i < end; i += Vectors::kStep) {
      Vectors::load(p + i, std::min<int64_t>(Vectors::kStep, end - i), v);  // lanes past the end load 0
      for (int k = 0; k < Vectors::kVecs; ++k) in_range = in_range & (v[k] >= zero) & (v[k] <= one);
    }
    if (in_range.zero_mask() != 0) valid = false;
  });
  if (valid) return;
  for (int64_t i = 0; i < n; ++i) {
    const auto v = static_cast<opmath_t<scalar_t>>(p[i]);
    TORCH_CHECK(v >= 0 && v <= 1, "all elements of ", name, " should be between 0 and 1 (lossops: got ", v,
                " at flat index ", i, ")");
  }
}

}  // namespace

// params {}; no aux operand.
std::vector<at::Tensor> binary_cross_entropy_forward(const ElementwiseArgs& args) {
  for (const auto& [values, name] : {std::pair{&args.input, "input"}, std::pair{&args.target, "target"}}) {
    TORCH_CHECK(values->is_contiguous(), "lossops: binary_cross_entropy expects a contiguous ", name);
    LOSSOPS_DISPATCH_FLOATING(values->scalar_type(), "lossops_bce_check", [&] {
      check_probabilities<scalar_t>(*values, name);
    });
  }
  return elementwise_forward<BinaryCrossEntropy>(args);
}

LOSSOPS_REGISTER_ELEMENTWISE("binary_cross_entropy", binary_cross_entropy_forward);

// params {}; aux = pos_weight.
std::vector<at::Tensor> bce_with_logits_forward(const ElementwiseArgs& args) {
  return elementwise_forward<BceWithLogits>(args);
}

LOSSOPS_REGISTER_ELEMENTWISE("bce_with_logits", bce_with_logits_forward);

}  // namespace lossops
