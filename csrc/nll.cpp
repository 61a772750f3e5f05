// Negative log-likelihood over class rows, as torch's nll_loss defines it: the input holds log-probabilities,
// row r with class-index target y (not ignore_index) has loss -w[y] x[r, y], and its gradient is -w[y] at the
// target's class and 0 at every other one (an ignored row: loss 0, gradient 0). Only the target's element of a row
// is read; the gradient is written whole (zeros, then the one value a row), so its cost is the gradient's size.
#include <atomic>
#include <cstdint>
#include <cstring>

#include <c10/util/SmallVector.h>

#include "common.h"
#include "kernel_abi.h"
#include "softmax_rows.h"  // check_class_indices

namespace lossops {
namespace {

// Zeros for stream_block: a gradient far larger than the caches is zeroed with non-temporal stores, which skip
// reading each line before overwriting it.
template <typename acc_t>
const acc_t* nll_zero_source() {
  static const std::vector<acc_t> zeros(kBlock, acc_t(0));
  return zeros.data();
}

template <typename scalar_t>
void nll_zero_region(scalar_t* g, int64_t n, bool stream) {
  if (!stream) {
    std::memset(static_cast<void*>(g), 0, static_cast<size_t>(n) * sizeof(scalar_t));
    return;
  }
  const opmath_t<scalar_t>* zeros = nll_zero_source<opmath_t<scalar_t>>();
  for (int64_t i = 0; i < n; i += kBlock) stream_block<scalar_t>(zeros, g + i, std::min(kBlock, n - i));
}

// Rows of at least this many bytes have their gradient zeroed with non-temporal stores: the one value a row then
// written over the zeros reads back one line in 64 or fewer.
constexpr int64_t kNllStreamRowBytes = 4096;
// Each row reads one element, a cache line and often a page of its own: the element this many rows on is asked for
// before a row's own is used, so the misses overlap instead of being waited for one at a time.
constexpr int64_t kNllPrefetchRows = 16;
// Rows shorter than this share lines or pages with their neighbours, which the hardware prefetcher streams in.
constexpr int64_t kNllPrefetchRowBytes = 256;

// The class-dim-1 gradient of one outer index, (C, inner), written in one pass of whole lines: class c's row is
// value_c where the target is c, 0 elsewhere (no zeros first and values over them, which reads each line twice when
// the targets touch most lines, as segmentation maps do).
template <typename scalar_t>
void nll_class_planes(const int64_t* target, const opmath_t<scalar_t>* w, opmath_t<scalar_t> scale, int64_t C,
                      int64_t inner, int64_t ignore_index, bool stream, scalar_t* g) {
  using acc_t = opmath_t<scalar_t>;
  acc_t values[kBlock];
  for (int64_t c = 0; c < C; ++c) {
    const acc_t value = c == ignore_index ? acc_t(0) : -(w != nullptr ? w[c] : acc_t(1)) * scale;
    for (int64_t i = 0; i < inner; i += kBlock) {
      const int64_t n = std::min(kBlock, inner - i);
      for (int64_t j = 0; j < n; ++j) values[j] = target[i + j] == c ? value : acc_t(0);
      if (stream) {
        stream_block<scalar_t>(values, g + c * inner + i, n);
      } else {
        write_block<scalar_t>(values, g + c * inner + i, 1, n);
      }
    }
  }
}

// The losses of rows b0..b1 of one element each (no gradient): their sum in sum_in_lanes' interleaved lanes, each
// row's loss stored in loss[] when given. Few instructions a row and no early exit, so that many rows' reads (a
// miss each where rows are long) are in flight at once: an ignored row reads an element of its own row and keeps
// 0, a target out of range reads class 0, keeps 0 and sets `bad`.
template <typename scalar_t, bool kWeighted>
double nll_loss_only_rows(const scalar_t* x, int64_t stride_outer, int64_t stride_class, const int64_t* target,
                          const opmath_t<scalar_t>* w, int64_t C, int64_t ignore_index, int64_t b0, int64_t b1,
                          opmath_t<scalar_t>* loss, bool& bad) {
  using acc_t = opmath_t<scalar_t>;
  bool any_bad = false;
  auto value = [&](int64_t o) {
    const int64_t y = target[o];
    const bool kept = y != ignore_index;
    const bool in_range = static_cast<uint64_t>(y) < static_cast<uint64_t>(C);
    any_bad |= kept & !in_range;
    const int64_t c = in_range ? y : 0;
    const acc_t weight = kWeighted ? w[c] : acc_t(1);
    const acc_t v = -weight * static_cast<acc_t>(x[o * stride_outer + c * stride_class]);
    const acc_t kept_value = kept & in_range ? v : acc_t(0);
    if (loss != nullptr) loss[o] = kept_value;
    return kept_value;
  };
  if (b1 - b0 == 1) {  // a block's sum is its row's loss (the lanes' fixed sum of it and zeros)
    const double v = value(b0);
    bad |= any_bad;
    return v;
  }
  const double sum = sum_in_lanes(b0, b1, value);
  bad |= any_bad;
  return sum;
}

// input: (outer, C, inner) with any strides; target: int64, outer * inner; weight: (C,) in the accumulation dtype or
// undefined; grad: contiguous (outer, C, inner) or undefined; loss: the per-row losses' destination, or null. Returns
// the losses' sum, formed in fixed blocks of rows added in order: the same bits for any thread count. Each target is
// checked where it is read (a separate pass over them costs as much as this one's on short rows): a row whose
// target is outside [0, C) and not ignore_index reads nothing and sets *out_of_range, and what was written is then
// the caller's to discard.
template <typename scalar_t>
double nll_rows(const at::Tensor& input, const int64_t* target, const at::Tensor& weight, at::Tensor* grad,
                opmath_t<scalar_t> scale, int64_t ignore_index, opmath_t<scalar_t>* loss, bool* out_of_range) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t outer = input.size(0), C = input.size(1), inner = input.size(2);
  const int64_t stride_outer = input.stride(0), stride_class = input.stride(1), stride_inner = input.stride(2);
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  const acc_t* w = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  scalar_t* g = grad != nullptr ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t region = C * inner;  // one outer index's gradient elements
  const bool resident = g != nullptr && gradient_pages_resident(g);
  // Outer indices a block: its gradient is written while the block's rows are in cache.
  const int64_t block = row_grain(region);
  // One row's loss (stored where per-row losses are asked for: a store that waits on the row's read holds back the
  // reads after it) and, where g_row is given, its gradient's one nonzero value (over zeros written before).
  std::atomic<bool> any_out_of_range{false};
  auto row = [=, &any_out_of_range](int64_t r, int64_t x_offset, scalar_t* g_row, int64_t ahead, int64_t ahead_offset) {
    if (ahead >= 0 && target[ahead] != ignore_index) __builtin_prefetch(x + ahead_offset + target[ahead] * stride_class);
    const int64_t y = target[r];
    acc_t value = acc_t(0);
    if (y != ignore_index) {
      if (static_cast<uint64_t>(y) >= static_cast<uint64_t>(C)) [[unlikely]] {
        any_out_of_range.store(true, std::memory_order_relaxed);
        return value;
      }
      const acc_t w_y = w != nullptr ? w[y] : acc_t(1);
      value = -w_y * static_cast<acc_t>(x[x_offset + y * stride_class]);
      if (g_row != nullptr) g_row[y] = static_cast<scalar_t>(-w_y * scale);
    }
    if (loss != nullptr) loss[r] = value;
    return value;
  };
  const int64_t blocks = (outer + block - 1) / block;
  c10::SmallVector<double, 16> block_sums(blocks, 0.0);
  // Rows of one element without a gradient (a forward under no_grad, or one keeping per-row losses): only the
  // reads, the per-row stores and the sums, the same values in the same lanes as the loop below, so the same bits.
  const bool loss_only = inner == 1 && g == nullptr;
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t end_block) {
    if (loss_only) {
      bool bad = false;
      for (int64_t k = first_block; k < end_block; ++k) {
        const int64_t b0 = k * block, b1 = std::min(outer, b0 + block);
        block_sums[k] = w != nullptr
            ? nll_loss_only_rows<scalar_t, true>(x, stride_outer, stride_class, target, w, C, ignore_index, b0, b1,
                                                 loss, bad)
            : nll_loss_only_rows<scalar_t, false>(x, stride_outer, stride_class, target, w, C, ignore_index, b0, b1,
                                                  loss, bad);
      }
      if (bad) any_out_of_range.store(true, std::memory_order_relaxed);
      return;
    }
    for (int64_t k = first_block; k < end_block; ++k) {
      const int64_t b0 = k * block, b1 = std::min(outer, b0 + block);
      double sum = 0.0;
      if (inner == 1) {
        const bool stream = resident && C * static_cast<int64_t>(sizeof(scalar_t)) >= kNllStreamRowBytes;
        if (g != nullptr) {
          nll_zero_region(g + b0 * region, (b1 - b0) * region, stream);
          if (stream) finish_streaming();  // the zeros land before the target values written over them
        }
        // Rows in sum_in_lanes' interleaved sums combined in a fixed order: one sum is a chain of dependent adds, which
        // bounds a loop of short rows. Rows far apart in memory prefetch a later row's target element.
        const bool prefetch = stride_outer * static_cast<int64_t>(sizeof(scalar_t)) >= kNllPrefetchRowBytes;
        auto lane_row = [&](int64_t o) {
          const int64_t ahead = prefetch && o + kNllPrefetchRows < outer ? o + kNllPrefetchRows : -1;
          return row(o, o * stride_outer, g != nullptr ? g + o * region : nullptr, ahead, ahead * stride_outer);
        };
        block_sums[k] = sum_in_lanes(b0, b1, lane_row);
        continue;
      }
      for (int64_t o = b0; o < b1; ++o) {
        if (g != nullptr)
          nll_class_planes<scalar_t>(target + o * inner, w, scale, C, inner, ignore_index, resident, g + o * region);
        for (int64_t i = 0; i < inner; ++i) {
          const int64_t ahead = i + kNllPrefetchRows < inner ? o * inner + i + kNllPrefetchRows : -1;
          sum += row(o * inner + i, o * stride_outer + i * stride_inner, nullptr, ahead,
                     o * stride_outer + (i + kNllPrefetchRows) * stride_inner);
        }
      }
      block_sums[k] = sum;
    }
    if (resident) finish_streaming();
  });
  double total = 0.0;
  for (double block_sum : block_sums) total += block_sum;
  *out_of_range = any_out_of_range.load();
  return total;
}

// Returns {per-row loss (empty unless per_element), sum of the per-row losses} in the input's accumulation dtype;
// writes the gradient, scaled by grad_scale, into `grad` when given.
std::vector<at::Tensor> nll_loss_kernel(const KernelArgs& a) {
  const at::Tensor input = a.tensor("input");
  const at::Tensor target = a.tensor("target");
  const std::optional<at::Tensor> weight = a.optional_tensor("weight");
  const std::optional<at::Tensor> grad = a.optional_tensor("grad");
  const int64_t ignore_index = a.integer("ignore_index");
  const double grad_scale = a.scale("grad_scale");
  TORCH_CHECK(input.dim() == 3, "lossops: nll_loss kernel expects a (outer, C, inner) view, got ", input.sizes());
  const int64_t C = input.size(1);
  const int64_t rows = input.size(0) * input.size(2);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == rows,
              "lossops: nll_loss target must be a contiguous int64 tensor of ", rows, " elements");
  const auto acc_type = at::toOpMathType(input.scalar_type());
  const at::Tensor w = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  TORCH_CHECK(!w.defined() || w.numel() == C, "lossops: nll_loss weight must have ", C, " elements, got ", w.numel());
  at::Tensor g = gradient_buffer(grad, input, "nll_loss");
  const bool per_element = a.flag("per_element");
  at::Tensor row_loss = new_cpu_tensor({per_element ? rows : 0}, acc_type);
  double total = 0.0;
  bool out_of_range = false;
  if (rows > 0 && C > 0) {
    LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_nll_loss", [&] {
      using acc_t = opmath_t<scalar_t>;
      total = nll_rows<scalar_t>(input, target.const_data_ptr<int64_t>(), w, g.defined() ? &g : nullptr,
                                 static_cast<acc_t>(grad_scale), ignore_index,
                                 per_element ? row_loss.mutable_data_ptr<acc_t>() : nullptr, &out_of_range);
    });
  } else {
    out_of_range = rows > 0;  // no classes: only ignore_index targets are in range
  }
  // Raises naming the first target out of range (nothing is returned, so nothing written is seen).
  if (out_of_range) check_class_indices(target.const_data_ptr<int64_t>(), rows, C, ignore_index);
  if (rows > 0 && C == 0 && per_element) row_loss.zero_();
  return {row_loss, cpu_scalar(total, acc_type)};
}

}  // namespace

LOSSOPS_REGISTER_KERNEL("nll_loss", nll_loss_kernel, "input", "target", "weight", "grad", "ignore_index",
                        "grad_scale", "per_element");

}  // namespace lossops
