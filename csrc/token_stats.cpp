// Per-token statistics of the (capped) softmax rows of a (outer, C, inner) view, for logging and RL losses
// beside the loss: read-only, one pass. The entropy is H = log s - u / s with s = sum_j e^(x_j - m) and
// u = sum_j e^(x_j - m) (x_j - m) kept relative to the running max m (u is rescaled with s when m moves), so
// no per-element log-probability is formed and H >= 0 holds to rounding.
#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "common.h"
#include "kernel_abi.h"
#include "softmax_rows.h"

namespace lossops {
namespace {

// One row's running max m, s and u (above), and the first index holding the max, block by block.
template <typename acc_t>
struct EntropyStats {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum_exp = 0;
  acc_t sum_exp_shift = 0;  // u
  int64_t argmax = 0;

  // x - m where x is -inf gives e^(x - m) = 0 and (x - m) * 0 = NaN: the shift is clamped to a value whose exp
  // is already 0 (in float64 too) and whose products with the gradient's coefficients stay finite.
  static constexpr acc_t kLowestShift = acc_t(-1e4);
  static acc_t shift(acc_t x, acc_t m) { return std::max(x - m, kLowestShift); }
  static Vec<acc_t> shift(const Vec<acc_t>& x, const Vec<acc_t>& m) {
    return at::vec::clamp_min(x - m, Vec<acc_t>(kLowestShift));
  }

  void add(const acc_t* xb, int64_t b0, int64_t n) {
    const acc_t bmax = block_max(xb, n);
    if (bmax == -std::numeric_limits<acc_t>::infinity()) return;  // contributes nothing
    using V = Vec<acc_t>;
    const V vm(bmax);
    V vs(acc_t(0)), vu(acc_t(0));
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) {
      const V d = shift(V::loadu(xb + i), vm);
      const V e = fast_exp(d);
      vs = vs + e;
      vu = at::vec::fmadd(e, d, vu);
    }
    acc_t s = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, vs);
    acc_t u = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, vu);
    for (; i < n; ++i) {
      const acc_t d = shift(xb[i], bmax);
      const acc_t e = std::exp(d);
      s += e;
      u += e * d;
    }
    if (!(bmax <= max)) {  // a larger block max (or a NaN): the first index holding it
      const int64_t first = std::isnan(bmax) ? std::find_if(xb, xb + n, [](acc_t v) { return std::isnan(v); }) - xb
                                             : std::find(xb, xb + n, bmax) - xb;
      const bool found = first < n;
      if (max == -std::numeric_limits<acc_t>::infinity()) {
        sum_exp = s;
        sum_exp_shift = u;
      } else {
        const acc_t k = max - bmax, r = std::exp(k);  // k < 0: the old sums move onto the new max
        sum_exp_shift = r * (sum_exp_shift + k * sum_exp) + u;
        sum_exp = r * sum_exp + s;
      }
      max = bmax;
      if (found) argmax = b0 + first;
    } else {
      const acc_t k = bmax - max, r = std::exp(k);
      sum_exp_shift += r * (u + k * s);
      sum_exp += r * s;
    }
  }
};

template <typename scalar_t>
void token_stats_rows(const at::Tensor& input, const int64_t* target, int64_t ignore_index, double softcap,
                      opmath_t<scalar_t>* out, int64_t* argmax) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = input.size(1);
  const int64_t rows = input.size(0) * input.size(2);
  const RowLayout in = RowLayout::of(input);
  const scalar_t* x_ptr = input.const_data_ptr<scalar_t>();
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      acc_t* s = out + 3 * r;
      const int64_t y = target[r];
      if (y == ignore_index) {
        std::fill(s, s + 3, acc_t(0));
        argmax[r] = -1;
        continue;
      }
      const RowLogits<scalar_t> logits{x_ptr + in.row_offset(r), in.stride_class, softcap > 0,
                                       static_cast<acc_t>(softcap), xbuf.data()};
      EntropyStats<acc_t> stats;
      for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
        const int64_t n = std::min(kBlock, C - b0);
        stats.add(logits.block(b0, n), b0, n);
      }
      const acc_t log_sum = std::log(stats.sum_exp);
      s[0] = stats.max + log_sum;
      s[1] = (logits.at(y) - stats.max) - log_sum;
      s[2] = log_sum - stats.sum_exp_shift / stats.sum_exp;
      argmax[r] = stats.argmax;
    }
  });
}

// grad_j = softcap'(x_j) (p_j (a + b (x_j - lse)) + c [j == y]) per row, p_j = exp(x_j - lse), x the capped
// logits: the gradient of g_lse lse + g_lp log p_y + g_H H with a = g_lse - g_lp - g_H H, b = -g_H, c = g_lp.
// At the target p_y a + c cancels as p_y -> 1: it is formed as p_y (a + c + b (x_y - lse)) - c expm1(x_y - lse).
template <typename scalar_t>
void token_stats_grad_rows(const at::Tensor& input, const int64_t* target, int64_t ignore_index, double softcap,
                           const opmath_t<scalar_t>* lse, const opmath_t<scalar_t>* coefficients, at::Tensor& grad) {
  using acc_t = opmath_t<scalar_t>;
  using V = Vec<acc_t>;
  const int64_t C = input.size(1);
  const int64_t rows = input.size(0) * input.size(2);
  const RowLayout in = RowLayout::of(input), gl = RowLayout::of(grad);
  const scalar_t* x_ptr = input.const_data_ptr<scalar_t>();
  scalar_t* g_ptr = grad.mutable_data_ptr<scalar_t>();
  const bool capped = softcap > 0;
  const acc_t cap = static_cast<acc_t>(softcap);
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kBlock), gbuf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t a = coefficients[3 * r], b = coefficients[3 * r + 1], c = coefficients[3 * r + 2];
      const int64_t y = target[r];
      scalar_t* g = g_ptr + gl.row_offset(r);
      if (y == ignore_index || (a == 0 && b == 0 && c == 0)) {
        for (int64_t j = 0; j < C; ++j) g[j * gl.stride_class] = scalar_t(0);
        continue;
      }
      const RowLogits<scalar_t> logits{x_ptr + in.row_offset(r), in.stride_class, capped, cap, xbuf.data()};
      const acc_t L = lse[r];
      const acc_t x_y = logits.at(y), d_y = EntropyStats<acc_t>::shift(x_y, L);
      acc_t g_y = std::exp(d_y) * (a + c + b * d_y) - c * std::expm1(d_y);
      if (capped) g_y *= softcap_derivative(x_y, cap);
      const V va(a), vb(b), vL(L), ones(acc_t(1)), vinv_cap(capped ? acc_t(1) / cap : acc_t(0));
      for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
        const int64_t n = std::min(kBlock, C - b0);
        const acc_t* xb = logits.block(b0, n);
        int64_t i = 0;
        for (; i + V::size() <= n; i += V::size()) {
          const V x = V::loadu(xb + i);
          const V d = EntropyStats<acc_t>::shift(x, vL);
          V gv = fast_exp(d) * at::vec::fmadd(vb, d, va);
          if (capped) { const V t = x * vinv_cap; gv = gv * (ones - t * t); }
          gv.store(gbuf.data() + i);
        }
        for (; i < n; ++i) {
          const acc_t d = EntropyStats<acc_t>::shift(xb[i], L);
          acc_t gi = std::exp(d) * (a + b * d);
          if (capped) gi *= softcap_derivative(xb[i], cap);
          gbuf[i] = gi;
        }
        if (y >= b0 && y < b0 + n) gbuf[y - b0] = g_y;
        write_block<scalar_t>(gbuf.data(), g + b0 * gl.stride_class, gl.stride_class, n);
      }
    }
  });
}

void check_token_stats_target(const char* kernel, const at::Tensor& input, const at::Tensor& target,
                              int64_t ignore_index) {
  TORCH_CHECK(input.dim() == 3, "lossops: ", kernel, ": input must be a (outer, C, inner) view, got ", input.sizes());
  const int64_t rows = input.size(0) * input.size(2), C = input.size(1);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == rows,
              "lossops: ", kernel, ": target must be a contiguous int64 tensor of ", rows, " elements");
  check_class_indices(target.const_data_ptr<int64_t>(), rows, C, ignore_index);
}

// input (outer, C, inner), any strides, float / double / bfloat16 / half; target int64 (outer * inner,);
// softcap None or > 0. Returns {stats, argmax}: stats (rows, 3) contiguous opmath, per row [logsumexp, target
// log-probability, entropy] of the capped logits; argmax (rows,) int64, the first index of the largest capped
// logit. Rows with target == ignore_index: stats 0, argmax -1, their logits unread.
std::vector<at::Tensor> cross_entropy_token_stats(const at::Tensor& input, const at::Tensor& target,
                                                  int64_t ignore_index, std::optional<double> softcap) {
  const char* kernel = "cross_entropy_token_stats";
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "lossops: ", kernel, ": softcap must be > 0");
  check_token_stats_target(kernel, input, target, ignore_index);
  const int64_t rows = input.size(0) * input.size(2);
  at::Tensor stats = new_cpu_tensor({rows, 3}, at::toOpMathType(input.scalar_type()));
  at::Tensor argmax = new_cpu_tensor({rows}, at::kLong);
  if (rows == 0) return {stats, argmax};
  LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy_token_stats", [&] {
    token_stats_rows<scalar_t>(input, target.const_data_ptr<int64_t>(), ignore_index, softcap.value_or(0.0),
                               stats.mutable_data_ptr<opmath_t<scalar_t>>(), argmax.mutable_data_ptr<int64_t>());
  });
  return {stats, argmax};
}

// input, target, softcap: as for cross_entropy_token_stats. grad: input's shape and dtype, any strides, not
// aliasing input; every element is written. lse: (rows,) opmath, contiguous (cross_entropy_token_stats' first
// column); coefficients (rows, 3) opmath, contiguous, per row [a, b, c] (see token_stats_grad_rows). Rows with
// target == ignore_index or a = b = c = 0 get zeros. Returns {} (the result is grad).
std::vector<at::Tensor> cross_entropy_token_stats_grad(const at::Tensor& input, const at::Tensor& target,
                                                       const at::Tensor& grad, const at::Tensor& lse,
                                                       const at::Tensor& coefficients, int64_t ignore_index,
                                                       std::optional<double> softcap) {
  const char* kernel = "cross_entropy_token_stats_grad";
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "lossops: ", kernel, ": softcap must be > 0");
  check_token_stats_target(kernel, input, target, ignore_index);
  TORCH_CHECK(grad.sizes() == input.sizes() && grad.scalar_type() == input.scalar_type(), "lossops: ", kernel,
              ": grad must be a ", input.scalar_type(), " tensor of shape ", input.sizes(), ", got ",
              grad.scalar_type(), " ", grad.sizes());
  TORCH_CHECK(!grad.is_alias_of(input), "lossops: ", kernel, ": grad must not alias input");
  const int64_t rows = input.size(0) * input.size(2);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc_type && lse.numel() == rows && lse.is_contiguous(), "lossops: ", kernel,
              ": lse must be a contiguous ", acc_type, " tensor of ", rows, " elements");
  TORCH_CHECK(coefficients.scalar_type() == acc_type && coefficients.dim() == 2 && coefficients.size(0) == rows &&
                  coefficients.size(1) == 3 && coefficients.is_contiguous(),
              "lossops: ", kernel, ": coefficients must be a contiguous ", acc_type, " tensor of shape (", rows,
              ", 3), got ", coefficients.scalar_type(), " ", coefficients.sizes());
  if (rows == 0 || input.size(1) == 0) return {};
  at::Tensor g = grad;
  LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy_token_stats_grad", [&] {
    using acc_t = opmath_t<scalar_t>;
    token_stats_grad_rows<scalar_t>(input, target.const_data_ptr<int64_t>(), ignore_index, softcap.value_or(0.0),
                                    lse.const_data_ptr<acc_t>(), coefficients.const_data_ptr<acc_t>(), g);
  });
  return {};
}

std::vector<at::Tensor> cross_entropy_token_stats_kernel(const KernelArgs& a) {
  return cross_entropy_token_stats(a.tensor("input"), a.tensor("target"), a.integer("ignore_index"),
                                   a.optional_real("softcap"));
}

std::vector<at::Tensor> cross_entropy_token_stats_grad_kernel(const KernelArgs& a) {
  return cross_entropy_token_stats_grad(a.tensor("input"), a.tensor("target"), a.tensor("grad"), a.tensor("lse"),
                                        a.tensor("coefficients"), a.integer("ignore_index"), a.optional_real("softcap"));
}

}  // namespace

LOSSOPS_REGISTER_KERNEL("cross_entropy_token_stats", cross_entropy_token_stats_kernel, "input", "target",
                        "ignore_index", "softcap");
LOSSOPS_REGISTER_KERNEL("cross_entropy_token_stats_grad", cross_entropy_token_stats_grad_kernel, "input",
                        "target", "grad", "lse", "coefficients", "ignore_index", "softcap");

}  // namespace lossops
