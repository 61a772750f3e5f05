// Vocabulary-parallel cross-entropy: a rank holds the logits of classes [class_offset, class_offset + C_local)
// of V, as a 2-D (N, C_local) tensor with any strides. cross_entropy_shard_stats gives the per-row statistics
// the Python side all-reduces into the global logsumexp and loss; cross_entropy_shard_grad then writes this
// rank's slice of the gradient from the global logsumexp and per-row coefficients. Both run the row kernel's
// math (softmax_rows.h) on the shard.
#include <algorithm>
#include <optional>
#include <vector>

#include "common.h"
#include "kernel_abi.h"
#include "softmax_rows.h"

namespace lossops {
namespace {

// What both shard kernels rely on; returns the weight's data (nullptr without one).
template <typename acc_t>
const acc_t* shard_weight(const char* kernel, const at::Tensor& input, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(input.dim() == 2, "lossops: ", kernel, ": input must be 2-D (N, C_local), got ", input.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == input.size(0) &&
                  target.is_contiguous(),
              "lossops: ", kernel, ": target must be a contiguous int64 tensor of shape (", input.size(0), "), got ",
              target.scalar_type(), " ", target.sizes());
  if (!weight.has_value()) return nullptr;
  TORCH_CHECK(weight->scalar_type() == c10::CppTypeToScalarType<acc_t>::value && weight->dim() == 1 &&
                  weight->size(0) == input.size(1) && weight->is_contiguous(),
              "lossops: ", kernel, ": weight must be a contiguous ", c10::CppTypeToScalarType<acc_t>::value,
              " tensor of shape (", input.size(1), "), got ", weight->scalar_type(), " ", weight->sizes());
  return weight->const_data_ptr<acc_t>();
}

// The local index of a global class, -1 when another rank holds it.
inline int64_t shard_class(int64_t t, int64_t class_offset, int64_t C) {
  return t >= class_offset && t < class_offset + C ? t - class_offset : -1;
}

template <typename scalar_t>
RowLogits<scalar_t> shard_row(const at::Tensor& input, int64_t r, double softcap, opmath_t<scalar_t>* buf) {
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  // No offset from a data pointer that may be null (C_local = 0); such a row is never read.
  if (input.size(1) > 0) x += r * input.stride(0);
  return {x, input.stride(1), softcap > 0, static_cast<opmath_t<scalar_t>>(softcap), buf};
}

// Per row [max, sum of exp(x - max), target logit (0 unless this rank holds the target), sum_j w_j x_j] of the
// capped logits; ignored rows all 0, unread.
template <typename scalar_t>
void shard_stats_rows(const at::Tensor& input, const int64_t* target, const opmath_t<scalar_t>* w, int64_t class_offset,
                      int64_t ignore_index, double softcap, opmath_t<scalar_t>* out) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = input.size(1);
  at::parallel_for(0, input.size(0), row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      acc_t* s = out + 4 * r;
      if (target[r] == ignore_index) {
        std::fill(s, s + 4, acc_t(0));
        continue;
      }
      const RowLogits<scalar_t> logits = shard_row<scalar_t>(input, r, softcap, xbuf.data());
      acc_t w_dot = 0;
      const BlockStats<acc_t> stats = row_statistics<acc_t>(
          C, [&](int64_t b0, int64_t n) { return logits.block(b0, n); }, nullptr, false, nullptr,
          [&](int64_t b0, int64_t n, const acc_t* xb) { w_dot += weighted_sum(xb, w, b0, n); });
      const int64_t y = shard_class(target[r], class_offset, C);
      s[0] = stats.max;
      s[1] = stats.sum_exp_or_nan();
      s[2] = y >= 0 ? logits.at(y) : acc_t(0);
      s[3] = w_dot;
    }
  });
}

// grad_j = softcap'(x_j) (A exp(x_j - lse) - B [j == target] - D w_j) per row, from the capped logits; rows with
// A = B = D = 0 are zeros, unread.
template <typename scalar_t>
void shard_grad_rows(const at::Tensor& input, const int64_t* target, const opmath_t<scalar_t>* w, scalar_t* g_ptr,
                     const opmath_t<scalar_t>* lse, const opmath_t<scalar_t>* coefficients, int64_t class_offset,
                     double softcap) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = input.size(1);
  const bool stream = stream_row_gradient<scalar_t>(g_ptr, 1, input.const_data_ptr<scalar_t>());
  at::parallel_for(0, input.size(0), row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kBlock), gbuf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t a = coefficients[3 * r], b = coefficients[3 * r + 1], d = coefficients[3 * r + 2];
      scalar_t* g = g_ptr + r * C;
      if (a == 0 && b == 0 && d == 0) {
        std::fill(g, g + C, scalar_t(0));
        continue;
      }
      const RowLogits<scalar_t> logits = shard_row<scalar_t>(input, r, softcap, xbuf.data());
      const int64_t y = shard_class(target[r], class_offset, C);
      const acc_t x_target = y >= 0 ? logits.at(y) : acc_t(0);
      // p_j = exp((x_j - lse) - 0): RowGradient's form with the global logsumexp as the max.
      const RowGradient<acc_t> row_grad{lse[r], 0, a, b, d, true, 1, w, logits.capped, logits.cap, y,
                                        x_target - lse[r], x_target};
      write_row_gradient<scalar_t>(
          row_grad, g, 1, stream, C, [&](int64_t b0, int64_t n) { return logits.block(b0, n); },
          [](int64_t, int64_t) { return static_cast<const acc_t*>(nullptr); }, nullptr, nullptr, gbuf.data());
    }
    if (stream) finish_streaming();
  });
}

// input (N, C_local), any strides, float / double / bfloat16 / half; target int64 (N,) of global class indices;
// weight: this rank's (C_local,) slice of the class weights in the opmath dtype (float; double for double), or
// None; softcap: None, or > 0 to replace the logits by softcap * tanh(logits / softcap) first.
// Returns {stats}: (N, 4) contiguous, opmath dtype, per row [m, s, x_t, dot] with m the max of the capped logits,
// s = sum_j exp(x_j - m), x_t the target's logit when class_offset <= target < class_offset + C_local (else 0),
// dot = sum_j w_j x_j (w = 1 without weight). Rows with target == ignore_index: all 0. C_local = 0 or a row of
// -inf: m = -inf, s = 0 (dot is then 0, or -inf for a row of -inf). A NaN logit makes s NaN.
std::vector<at::Tensor> cross_entropy_shard_stats(const at::Tensor& input, const at::Tensor& target,
                                                  const std::optional<at::Tensor>& weight, int64_t class_offset,
                                                  int64_t ignore_index, std::optional<double> softcap) {
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "lossops: cross_entropy_shard_stats: softcap must be > 0");
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor stats = new_cpu_tensor({input.dim() == 2 ? input.size(0) : 0, 4}, acc_type);
  LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy_shard_stats", [&] {
    using acc_t = opmath_t<scalar_t>;
    const acc_t* w = shard_weight<acc_t>("cross_entropy_shard_stats", input, target, weight);
    shard_stats_rows<scalar_t>(input, target.const_data_ptr<int64_t>(), w, class_offset, ignore_index,
                               softcap.value_or(0.0), stats.mutable_data_ptr<acc_t>());
  });
  return {stats};
}

// input, target, weight, class_offset, softcap: as for cross_entropy_shard_stats.
// grad: contiguous (N, C_local) of input's dtype, not aliasing input; every element is written.
// lse: (N,) opmath, the global logsumexp of the capped logits; coefficients: (N, 3) opmath, contiguous, per row
// [A, B, D]: grad_j = softcap'(x_j) * (A * exp(x_j - lse) - B * [j == target - class_offset] - D * w_j), with x
// the capped logits and softcap'(x) = 1 - tanh^2(x / softcap) (1 without softcap). Rows with A = B = D = 0 get
// zeros. Returns {} (the result is grad).
std::vector<at::Tensor> cross_entropy_shard_grad(const at::Tensor& input, const at::Tensor& target,
                                                 const std::optional<at::Tensor>& weight, const at::Tensor& grad,
                                                 const at::Tensor& lse, const at::Tensor& coefficients,
                                                 int64_t class_offset, std::optional<double> softcap) {
  const char* kernel = "cross_entropy_shard_grad";
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "lossops: ", kernel, ": softcap must be > 0");
  TORCH_CHECK(grad.sizes() == input.sizes() && grad.scalar_type() == input.scalar_type() && grad.is_contiguous(),
              "lossops: ", kernel, ": grad must be a contiguous ", input.scalar_type(), " tensor of shape ",
              input.sizes(), ", got ", grad.scalar_type(), " ", grad.sizes());
  TORCH_CHECK(!grad.is_alias_of(input), "lossops: ", kernel, ": grad must not alias input");
  const int64_t N = input.dim() == 2 ? input.size(0) : 0;
  const auto acc_type = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc_type && lse.dim() == 1 && lse.size(0) == N && lse.is_contiguous(),
              "lossops: ", kernel, ": lse must be a contiguous ", acc_type, " tensor of shape (", N, "), got ",
              lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(coefficients.scalar_type() == acc_type && coefficients.dim() == 2 && coefficients.size(0) == N &&
                  coefficients.size(1) == 3 && coefficients.is_contiguous(),
              "lossops: ", kernel, ": coefficients must be a contiguous ", acc_type, " tensor of shape (", N,
              ", 3), got ", coefficients.scalar_type(), " ", coefficients.sizes());
  LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy_shard_grad", [&] {
    using acc_t = opmath_t<scalar_t>;
    const acc_t* w = shard_weight<acc_t>(kernel, input, target, weight);
    shard_grad_rows<scalar_t>(input, target.const_data_ptr<int64_t>(), w, grad.mutable_data_ptr<scalar_t>(),
                              lse.const_data_ptr<acc_t>(), coefficients.const_data_ptr<acc_t>(), class_offset,
                              softcap.value_or(0.0));
  });
  return {};
}

std::vector<at::Tensor> cross_entropy_shard_stats_kernel(const KernelArgs& a) {
  return cross_entropy_shard_stats(a.tensor("input"), a.tensor("target"), a.optional_tensor("weight"),
                                   a.integer("class_offset"), a.integer("ignore_index"), a.optional_real("softcap"));
}

std::vector<at::Tensor> cross_entropy_shard_grad_kernel(const KernelArgs& a) {
  return cross_entropy_shard_grad(a.tensor("input"), a.tensor("target"), a.optional_tensor("weight"), a.tensor("grad"),
                                  a.tensor("lse"), a.tensor("coefficients"), a.integer("class_offset"),
                                  a.optional_real("softcap"));
}

}  // namespace

LOSSOPS_REGISTER_KERNEL("cross_entropy_shard_stats", cross_entropy_shard_stats_kernel, "input", "target",
                        "weight", "class_offset", "ignore_index", "softcap");
LOSSOPS_REGISTER_KERNEL("cross_entropy_shard_grad", cross_entropy_shard_grad_kernel, "input", "target",
                        "weight", "grad", "lse", "coefficients", "class_offset", "softcap");

}  // namespace lossops
