// Multi-class margin loss over class rows, torch's definition (aten's LossMultiMargin.cpp): row r with class-index
// target y and C classes,
//   z_i = margin - x_y + x_i,  L = w[y] / C * sum_{i != y} [z_i > 0] z_i^p   (p = 1 or 2)
//   dL/dx_i = w[y] / C * [z_i > 0] * (p == 1 ? 1 : 2 z_i) for i != y,  dL/dx_y = -sum_{i != y} dL/dx_i
// A NaN z_i adds nothing and has gradient 0 (torch's `z > 0` test). One pass over each row: the target's element,
// then the row's terms and (when asked for) its gradient from the same block of the row.
#include "common.h"
#include "kernel_abi.h"

#include <vector>

namespace lossops {
namespace {

// Running sums of a row's terms and of their gradients: whole vectors, then the classes short of one (small class
// counts are mostly these), each added in one fixed order.
template <typename acc_t>
struct MarginSums {
  at::vec::Vectorized<acc_t> sum{acc_t(0)}, slope_sum{acc_t(0)};
  acc_t tail_sum = acc_t(0), tail_slope_sum = acc_t(0);

  acc_t total() const {
    auto add = [](at::vec::Vectorized<acc_t>& u, at::vec::Vectorized<acc_t>& v) { return u + v; };
    return at::vec::vec_reduce_all<acc_t>(add, sum) + tail_sum;
  }
  acc_t slope_total() const {
    auto add = [](at::vec::Vectorized<acc_t>& u, at::vec::Vectorized<acc_t>& v) { return u + v; };
    return at::vec::vec_reduce_all<acc_t>(add, slope_sum) + tail_slope_sum;
  }
};

// Adds the terms of classes [begin, end) of one block (a: the block in the accumulation dtype) and their
// gradients to `sums`, writing each class's gradient into gbuf when given. shift = margin - x_y.
template <typename acc_t, int P>
void margin_terms(const acc_t* a, int64_t begin, int64_t end, acc_t shift, acc_t slope, acc_t* gbuf,
                  MarginSums<acc_t>& sums) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vshift(shift), vslope(slope), zero(acc_t(0));
  int64_t i = begin;
  for (; i + W <= end; i += W) {
    const Vec z = vshift + Vec::loadu(a + i);
    const Vec h = Vec::blendv(zero, z, z > zero);
    sums.sum = sums.sum + (P == 1 ? h : h * h);
    if (gbuf != nullptr) {
      const Vec g = P == 1 ? Vec::blendv(zero, vslope, z > zero) : vslope * h;
      g.store(gbuf + i);
      sums.slope_sum = sums.slope_sum + g;
    }
  }
  for (; i < end; ++i) {
    const acc_t z = shift + a[i];
    const bool passes = z > acc_t(0);  // false for a NaN z, as torch's test
    sums.tail_sum += passes ? (P == 1 ? z : z * z) : acc_t(0);
    if (gbuf != nullptr) {
      const acc_t g = passes ? (P == 1 ? slope : slope * z) : acc_t(0);
      gbuf[i] = g;
      sums.tail_slope_sum += g;
    }
  }
}

// Row r's start: its scores, target, target weight, the shift margin - x_y its terms add to each score, and the
// slope of each term's gradient (w[y] / C * scale, times 2 z for p = 2).
template <typename scalar_t>
struct MarginRow {
  using acc_t = opmath_t<scalar_t>;
  const scalar_t* row;
  int64_t y;
  acc_t w_y, shift, slope;

  MarginRow(const scalar_t* x, int64_t stride_row, int64_t stride_class, const int64_t* target, const acc_t* w,
            acc_t margin, acc_t per_class, int64_t r)
      : row(x + r * stride_row), y(target[r]), w_y(w != nullptr ? w[y] : acc_t(1)),
        shift(margin - static_cast<acc_t>(row[y * stride_class])), slope(w_y * per_class) {}
};

// Rows [r0, r1) shorter than two vectors, scalar (split at its target, such a row leaves at most one whole vector
// on either side, and mostly none): their losses' sum in row order, each row's loss stored in loss[] when given,
// with kGrad its gradient written into g. Every value comes in by value: a float store through loss or g could
// otherwise alias a float read through a reference and make the compiler read it again on every row. Not
// vectorised: over a few classes, the vectoriser's checks and scalar epilogue cost more than the loop.
template <typename scalar_t, int P, bool kGrad>
__attribute__((optimize("no-tree-vectorize"))) double margin_short_rows(
    const scalar_t* x, int64_t stride_row, int64_t stride_class, int64_t C, const int64_t* target,
    const opmath_t<scalar_t>* w, opmath_t<scalar_t> margin, opmath_t<scalar_t> per_class, scalar_t* g,
    opmath_t<scalar_t>* loss, int64_t r0, int64_t r1) {
  using acc_t = opmath_t<scalar_t>;
  const acc_t classes = static_cast<acc_t>(C);
  double block_sum = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const auto [row, y, w_y, shift, slope] = MarginRow<scalar_t>(x, stride_row, stride_class, target, w, margin,
                                                                 per_class, r);
    acc_t sum = acc_t(0), slope_sum = acc_t(0);
    for (int64_t c = 0; c < C; ++c) {
      const acc_t z = shift + static_cast<acc_t>(row[c * stride_class]);
      const bool passes = c != y && z > acc_t(0);  // false for a NaN z, as torch's test
      sum += passes ? (P == 1 ? z : z * z) : acc_t(0);
      if constexpr (kGrad) {
        const acc_t gradient = passes ? (P == 1 ? slope : slope * z) : acc_t(0);
        g[r * C + c] = static_cast<scalar_t>(gradient);
        slope_sum += gradient;
      }
    }
    if constexpr (kGrad) g[r * C + y] = static_cast<scalar_t>(-slope_sum);
    const acc_t value = w_y * sum / classes;
    if (loss != nullptr) loss[r] = value;
    block_sum += value;
  }
  return block_sum;
}

// input: (N, C, 1) with any strides; target: N int64 indices in [0, C) (checked before); weight: (C,) in the
// accumulation dtype or null; grad: contiguous (N, C, 1) or null; loss: the per-row losses' destination, or null.
// Returns the losses' sum, formed in fixed blocks of rows added in order: the same bits for any thread count.
template <typename scalar_t, int P>
double multi_margin_rows(const at::Tensor& input, const int64_t* target, const opmath_t<scalar_t>* w, scalar_t* g,
                         opmath_t<scalar_t> margin, opmath_t<scalar_t> scale, opmath_t<scalar_t>* loss) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t N = input.size(0), C = input.size(1);
  const int64_t stride_row = input.stride(0), stride_class = input.stride(1);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const int64_t block = row_grain(C);
  const int64_t blocks = (N + block - 1) / block;
  std::vector<double> block_sums(blocks, 0.0);
  // Each class's gradient: w[y] / C * scale, times 2 z for p = 2.
  const acc_t per_class = scale / static_cast<acc_t>(C) * (P == 1 ? acc_t(1) : acc_t(2));
  // Rows shorter than two vectors take scalar steps (margin_short_rows): no buffer, block split or vector sums.
  const bool short_rows = C < 2 * at::vec::Vectorized<acc_t>::size();
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t end_block) {
    std::vector<acc_t> buffers(short_rows ? 0 : 2 * std::min(C, kBlock));
    acc_t *xbuf = buffers.data(), *gbuf = xbuf + std::min(C, kBlock);
    for (int64_t k = first_block; k < end_block; ++k) {
      const int64_t r0 = k * block, r1 = std::min(N, r0 + block);
      if (short_rows) {
        block_sums[k] = g != nullptr ? margin_short_rows<scalar_t, P, true>(x, stride_row, stride_class, C, target, w,
                                                                            margin, per_class, g, loss, r0, r1)
                                     : margin_short_rows<scalar_t, P, false>(x, stride_row, stride_class, C, target, w,
                                                                             margin, per_class, g, loss, r0, r1);
        continue;
      }
      double block_sum = 0.0;
      for (int64_t r = r0; r < r1; ++r) {
        const auto [row, y, w_y, shift, slope] = MarginRow<scalar_t>(x, stride_row, stride_class, target, w, margin,
                                                                     per_class, r);
        scalar_t* g_row = g != nullptr ? g + r * C : nullptr;
        MarginSums<acc_t> sums;
        for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
          const int64_t n = std::min(kBlock, C - c0);
          const acc_t* a = read_block(row + c0 * stride_class, stride_class, n, xbuf);
          acc_t* gb = g_row != nullptr ? gbuf : nullptr;
          const int64_t skip = y - c0;  // the target's class in this block, if it is there: no term of its own
          if (skip >= 0 && skip < n) {
            margin_terms<acc_t, P>(a, 0, skip, shift, slope, gb, sums);
            margin_terms<acc_t, P>(a, skip + 1, n, shift, slope, gb, sums);
            if (gb != nullptr) gb[skip] = acc_t(0);
          } else {
            margin_terms<acc_t, P>(a, 0, n, shift, slope, gb, sums);
          }
          if (g_row != nullptr) write_block<scalar_t>(gbuf, g_row + c0, 1, n);
        }
        const acc_t value = w_y * sums.total() / static_cast<acc_t>(C);
        if (g_row != nullptr) g_row[y] = static_cast<scalar_t>(-sums.slope_total());
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

// Class-index targets must lie in [0, C): torch's CPU kernel refuses any other value (a RuntimeError, "target out
// of range"); the message here also names the value.
void check_margin_targets(const int64_t* t, int64_t rows, int64_t C) {
  bool bad = false;
  for (int64_t r = 0; r < rows; ++r) bad |= (t[r] < 0) | (t[r] >= C);
  for (int64_t r = 0; bad && r < rows; ++r) {
    TORCH_CHECK(t[r] >= 0 && t[r] < C, "multi_margin_loss: target out of range: argument 'target' holds ", t[r],
                " at position ", r, ", and the input has ", C, " classes");
  }
}

// Returns {per-row loss (empty unless per_element), sum of the per-row losses} in the input's accumulation dtype;
// writes the gradient, scaled by grad_scale, into `grad` when given.
std::vector<at::Tensor> multi_margin_loss_kernel(const KernelArgs& a) {
  const at::Tensor input = a.tensor("input");
  const at::Tensor target = a.tensor("target");
  const std::optional<at::Tensor> weight = a.optional_tensor("weight");
  const std::optional<at::Tensor> grad = a.optional_tensor("grad");
  const int64_t p = a.integer("p");
  const double margin = a.real("margin");
  const double grad_scale = a.scale("grad_scale");
  TORCH_CHECK(input.dim() == 3 && input.size(2) == 1, "lossops: multi_margin_loss kernel expects a (N, C, 1) view, "
              "got ", input.sizes());
  TORCH_CHECK(p == 1 || p == 2, "lossops: multi_margin_loss kernel: p must be 1 or 2, got ", p);
  const int64_t N = input.size(0), C = input.size(1);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == N,
              "lossops: multi_margin_loss target must be a contiguous int64 tensor of ", N, " elements");
  check_margin_targets(target.const_data_ptr<int64_t>(), N, C);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const at::Tensor w = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  TORCH_CHECK(!w.defined() || w.numel() == C, "lossops: multi_margin_loss weight must have ", C, " elements, got ",
              w.numel());
  at::Tensor g = gradient_buffer(grad, input, "multi_margin_loss");
  const bool per_element = a.flag("per_element");
  at::Tensor row_loss = new_cpu_tensor({per_element ? N : 0}, acc_type);
  double total = 0.0;
  if (N > 0 && C > 0) {
    LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_multi_margin_loss", [&] {
      using acc_t = opmath_t<scalar_t>;
      const acc_t* wp = w.defined() ? w.const_data_ptr<acc_t>() : nullptr;
      scalar_t* gp = g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr;
      acc_t* lp = per_element ? row_loss.mutable_data_ptr<acc_t>() : nullptr;
      const auto run = p == 1 ? multi_margin_rows<scalar_t, 1> : multi_margin_rows<scalar_t, 2>;
      total = run(input, target.const_data_ptr<int64_t>(), wp, gp, static_cast<acc_t>(margin),
                  static_cast<acc_t>(grad_scale), lp);
    });
  }
  return {row_loss, cpu_scalar(total, acc_type)};
}

}  // namespace

LOSSOPS_REGISTER_KERNEL("multi_margin_loss", multi_margin_loss_kernel, "input", "target", "weight", "grad", "p",
                        "margin", "grad_scale", "per_element");

}  // namespace lossops
