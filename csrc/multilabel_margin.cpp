// Multi-label margin loss over rows, torch's definition (aten's LossMultiLabelMargin.cpp): row r of C scores has a
// target row listing its classes, ended by the first -1 (what follows is not read as classes); with T the list and
// S its set of classes,
//   L = 1 / C * sum_{y in T} sum_{i not in S} [z > 0] z,   z = 1 - x_y + x_i
//   dL/dx_i = 1 / C * #{y in T : z > 0} for i not in S,  dL/dx_y -= 1 / C * #{i not in S : z > 0} for each y in T
// (a class listed twice counts twice, as in torch; a NaN z adds nothing). Every target value must lie in [-1, C),
// after the first -1 too, as torch checks. Each row is read into a buffer once; its non-target scores (targets set to
// -inf, which no z passes) are then swept once per listed class.
#include "common.h"
#include "kernel_abi.h"

#include <limits>
#include <vector>

namespace lossops {
namespace {

// Every value in [-1, C): torch's RuntimeError, naming the value here.
void check_label_lists(const int64_t* t, int64_t n, int64_t C) {
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) bad |= (t[i] < -1) | (t[i] >= C);
  for (int64_t i = 0; bad && i < n; ++i) {
    TORCH_CHECK(t[i] >= -1 && t[i] < C, "multilabel_margin_loss: argument #2 'target' is out of range: it holds ",
                t[i], " at row ", i / C, ", position ", i % C, "; values must lie in [-1, ", C, ")");
  }
}

// input: (N, C) with any strides; target: contiguous (N, C) int64, checked; grad: contiguous (N, C) or null; loss:
// the per-row losses' destination, or null. Returns the losses' sum, formed in fixed blocks of rows added in order.
template <typename scalar_t>
double multilabel_margin_rows(const at::Tensor& input, const int64_t* target, scalar_t* g, opmath_t<scalar_t> scale,
                              opmath_t<scalar_t>* loss) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const int64_t N = input.size(0), C = input.size(1);
  const int64_t stride_row = input.stride(0), stride_class = input.stride(1);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const int64_t padded = (C + W - 1) / W * W;
  const int64_t block = row_grain(C);
  const int64_t blocks = (N + block - 1) / block;
  std::vector<double> block_sums(blocks, 0.0);
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t end_block) {
    // the row (targets and padding at -inf) and each class's count of passing terms, padded to whole vectors
    std::vector<acc_t> buffers(2 * padded);
    acc_t *others = buffers.data(), *counts = others + padded;
    std::vector<acc_t> target_counts(C);  // each listed class's count of passing terms
    const Vec zero(acc_t(0)), one(acc_t(1));
    for (int64_t k = first_block; k < end_block; ++k) {
      double block_sum = 0.0;
      for (int64_t r = k * block, r_end = std::min(N, r + block); r < r_end; ++r) {
        const int64_t* t = target + r * C;
        const scalar_t* row = x + r * stride_row;
        for (int64_t i = 0; i < C; ++i) others[i] = static_cast<acc_t>(row[i * stride_class]);
        int64_t listed = 0;
        while (listed < C && t[listed] >= 0) ++listed;
        std::fill(others + C, others + padded, -std::numeric_limits<acc_t>::infinity());
        // the listed classes' scores (read from the row: `others` loses them below)
        auto listed_score = [&](int64_t j) { return static_cast<acc_t>(row[t[j] * stride_class]); };
        for (int64_t j = 0; j < listed; ++j) others[t[j]] = -std::numeric_limits<acc_t>::infinity();
        if (g != nullptr) std::fill(counts, counts + padded, acc_t(0));
        Vec sum(acc_t(0));
        acc_t short_sum = acc_t(0);
        for (int64_t j = 0; j < listed; ++j) {
          if (C < W) {  // a row shorter than a vector: scalar steps, no padding swept
            const acc_t shift = acc_t(1) - listed_score(j);
            if (g == nullptr) {
              for (int64_t i = 0; i < C; ++i) {
                const acc_t z = shift + others[i];
                short_sum += z > acc_t(0) ? z : acc_t(0);
              }
              continue;
            }
            acc_t passed = acc_t(0);
            for (int64_t i = 0; i < C; ++i) {
              const acc_t z = shift + others[i];
              const bool pass = z > acc_t(0);
              short_sum += pass ? z : acc_t(0);
              counts[i] += pass ? acc_t(1) : acc_t(0);
              passed += pass ? acc_t(1) : acc_t(0);
            }
            target_counts[j] = passed;
            continue;
          }
          const Vec shift(acc_t(1) - listed_score(j));
          Vec passed(acc_t(0));
          for (int64_t i = 0; i < padded; i += W) {
            const Vec z = shift + Vec::loadu(others + i);
            const Vec pass = z > zero;
            sum = sum + Vec::blendv(zero, z, pass);
            if (g != nullptr) {
              const Vec hit = Vec::blendv(zero, one, pass);
              (Vec::loadu(counts + i) + hit).store(counts + i);
              passed = passed + hit;
            }
          }
          if (g != nullptr) target_counts[j] = at::vec::vec_reduce_all<acc_t>([](Vec& u, Vec& v) { return u + v; },
                                                                              passed);
        }
        const acc_t value =
            (at::vec::vec_reduce_all<acc_t>([](Vec& u, Vec& v) { return u + v; }, sum) + short_sum) /
            static_cast<acc_t>(C);
        if (g != nullptr) {
          const acc_t step = scale / static_cast<acc_t>(C);
          // counts hold 0 at listed classes (their scores are -inf there): the listed classes' terms go on top
          for (int64_t j = 0; j < listed; ++j) counts[t[j]] -= target_counts[j];
          for (int64_t i = 0; i < C; ++i) counts[i] *= step;
          write_block<scalar_t>(counts, g + r * C, 1, C);
        }
        if (loss != nullptr) loss[r] = value;
        block_sum += value;
      }
      block_sums[k] = block_sum;
    }
  });
  double total = 0.0;
  for (double block_sum : block_sums) total += block_sum;
  return total;
}

// Returns {per-row loss (empty unless per_element), sum of the per-row losses} in the input's accumulation dtype;
// writes the gradient, scaled by grad_scale, into `grad` when given.
std::vector<at::Tensor> multilabel_margin_loss_kernel(const KernelArgs& a) {
  const at::Tensor input = a.tensor("input");
  const at::Tensor target = a.tensor("target");
  const std::optional<at::Tensor> grad = a.optional_tensor("grad");
  const double grad_scale = a.scale("grad_scale");
  TORCH_CHECK(input.dim() == 2, "lossops: multilabel_margin_loss kernel expects a (N, C) view, got ", input.sizes());
  const int64_t N = input.size(0), C = input.size(1);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.sizes() == input.sizes(),
              "lossops: multilabel_margin_loss target must be a contiguous int64 tensor of the input's shape");
  check_label_lists(target.const_data_ptr<int64_t>(), N * C, C);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor g = gradient_buffer(grad, input, "multilabel_margin_loss");
  const bool per_element = a.flag("per_element");
  at::Tensor row_loss = new_cpu_tensor({per_element ? N : 0}, acc_type);
  double total = 0.0;
  if (N > 0 && C > 0) {
    LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_multilabel_margin_loss", [&] {
      using acc_t = opmath_t<scalar_t>;
      total = multilabel_margin_rows<scalar_t>(input, target.const_data_ptr<int64_t>(),
                                               g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr,
                                               static_cast<acc_t>(grad_scale),
                                               per_element ? row_loss.mutable_data_ptr<acc_t>() : nullptr);
    });
  }
  return {row_loss, cpu_scalar(total, acc_type)};
}

}  // namespace

LOSSOPS_REGISTER_KERNEL("multilabel_margin_loss", multilabel_margin_loss_kernel, "input", "target", "grad",
                        "grad_scale", "per_element");

}  // namespace lossops
