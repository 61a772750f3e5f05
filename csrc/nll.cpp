// Negative log-likelihood over class rows, as torch's nll_loss defines it: the input holds log-probabilities,
// row r with class-index target y (not ignore_index) has loss -w[y] x[r, y], and its gradient is -w[y] at the
// target's class and 0 at every other one (an ignored row: loss 0, gradient 0). Only the target's element of a row
// is read; the gradient is written whole (zeros, then the one value a row), so its cost is the gradient's size.
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

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
// Each row reads one element, a cache line and often a page of its own: in the gradient pass the element this many
// rows on is asked for before a row's own is used, so the misses overlap instead of being waited for one at a time.
constexpr int64_t kNllPrefetchRows = 16;
// Rows shorter than this share lines or pages with their neighbours, which the hardware prefetcher streams in.
constexpr int64_t kNllPrefetchRowBytes = 256;
// Rows at least this far apart are a miss each (a line, and soon a page, of their own): a pass reading one element
// of each of kNllMissTaskRows of them is worth a thread's start, where nearby rows need kIndexScanGrain, and their
// reads are gathered in runs (closer rows are streamed in by the hardware prefetcher and summed as they are read).
constexpr int64_t kNllMissRowBytes = 1024;
constexpr int64_t kNllMissTaskRows = 512;
// Rows kNllMissRowBytes or more apart read without a gradient are gathered this many at a time (on the stack, in
// L1) before their sums.
constexpr int64_t kNllGatherRows = 1024;

// The class-dim-1 gradient of one outer index, (C, inner), written in one pass of whole lines: class c's row is
// value_c where the target is c, 0 elsewhere (no zeros first and values over them, which reads each line twice when
// the targets touch most lines, as segmentation maps do). A block of targets is first narrowed to integers of the
// gradient's width (-1 for a target outside [0, C), which no class matches); then each class's row of the block is
// one compare and select of whole vectors in the gradient's own dtype, its value rounded once (the same bits as
// rounding each element), instead of int64 compares and a conversion per element on every one of the C rows.
template <typename scalar_t>
void nll_class_planes(const int64_t* target, const opmath_t<scalar_t>* w, opmath_t<scalar_t> scale, int64_t C,
                      int64_t inner, int64_t ignore_index, bool stream, scalar_t* g) {
  using acc_t = opmath_t<scalar_t>;
  using Index = std::conditional_t<sizeof(scalar_t) == 2, int16_t,
                                   std::conditional_t<sizeof(scalar_t) == 4, int32_t, int64_t>>;
  using Bits = std::make_unsigned_t<Index>;
  static_assert(sizeof(Bits) == sizeof(scalar_t));
  if (C > std::numeric_limits<Index>::max()) {  // classes beyond the narrow index: int64 compares and conversions
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
    return;
  }
  alignas(64) Index index[kBlock];
  alignas(64) Bits row[kBlock];
  for (int64_t i = 0; i < inner; i += kBlock) {
    const int64_t n = std::min(kBlock, inner - i);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t y = target[i + j];
      index[j] = static_cast<uint64_t>(y) < static_cast<uint64_t>(C) ? static_cast<Index>(y) : Index(-1);
    }
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t value = static_cast<scalar_t>(
          c == ignore_index ? acc_t(0) : -(w != nullptr ? w[c] : acc_t(1)) * scale);
      Bits bits;
      std::memcpy(&bits, &value, sizeof bits);
      const Index class_index = static_cast<Index>(c);
      for (int64_t j = 0; j < n; ++j) row[j] = index[j] == class_index ? bits : Bits(0);
      scalar_t* dst = g + c * inner + i;
      if (stream) {
        stream_copy(row, reinterpret_cast<Bits*>(dst), n);
      } else {
        std::memcpy(static_cast<void*>(dst), row, static_cast<size_t>(n) * sizeof(scalar_t));
      }
    }
  }
}

// Row o's element at its target's class where rows have one element: class 0 for a target outside [0, C) (an
// ignored one included), so that the read needs no branch and stays in the row.
template <typename scalar_t>
inline scalar_t nll_target_element(const scalar_t* x, int64_t stride_outer, int64_t stride_class,
                                   const int64_t* target, int64_t C, int64_t o) {
  const int64_t y = target[o];
  const int64_t c = static_cast<uint64_t>(y) < static_cast<uint64_t>(C) ? y : 0;
  return x[o * stride_outer + c * stride_class];
}

// The loss of a row with target y whose target element (nll_target_element) is `element`, without a branch: 0 for
// an ignored row, 0 and `bad` set for a target out of range.
template <bool kWeighted, typename scalar_t, typename acc_t>
inline acc_t nll_row_loss(int64_t y, scalar_t element, const acc_t* w, int64_t C, int64_t ignore_index, bool& bad) {
  const bool kept = y != ignore_index;
  const bool in_range = static_cast<uint64_t>(y) < static_cast<uint64_t>(C);
  bad |= kept & !in_range;
  const acc_t weight = kWeighted ? w[in_range ? y : 0] : acc_t(1);
  const acc_t v = -weight * static_cast<acc_t>(element);
  return kept & in_range ? v : acc_t(0);
}

// The losses of blocks [k0, k1) of `block` rows of one element each (no gradient): each block's sum in
// sum_in_lanes' interleaved lanes into block_sums[k], the values and lanes of the gradient pass's sums (the same
// bits), each row's loss stored in loss[] when given. Few instructions a row and no early exit, so that many rows'
// reads (a miss each where rows are long) are in flight at once. Rows far apart (`gather`) have their target
// elements read first, a run of them in a loop of a few instructions a row, then their losses formed and summed
// from L1; nearby rows are summed as they are read. Blocks of up to 8 rows are summed without sum_in_lanes' loops.
template <typename scalar_t, bool kWeighted>
void nll_loss_only_blocks(const scalar_t* x, int64_t stride_outer, int64_t stride_class, const int64_t* target,
                          const opmath_t<scalar_t>* w, int64_t C, int64_t ignore_index, int64_t outer, int64_t block,
                          int64_t k0, int64_t k1, bool gather, opmath_t<scalar_t>* loss, double* block_sums,
                          bool& bad) {
  using acc_t = opmath_t<scalar_t>;
  bool any_bad = false;
  auto row_loss = [&](int64_t o, scalar_t element) {
    const acc_t value = nll_row_loss<kWeighted>(target[o], element, w, C, ignore_index, any_bad);
    if (loss != nullptr) loss[o] = value;
    return value;
  };
  if (!gather) {
    auto value = [&](int64_t o) {
      return row_loss(o, nll_target_element(x, stride_outer, stride_class, target, C, o));
    };
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b0 = k * block, b1 = std::min(outer, b0 + block);
      block_sums[k] = sum_in_lanes_small(b0, b1, value);
    }
  } else {
    scalar_t elements[kNllGatherRows];
    const int64_t blocks_a_run = kNllGatherRows / block;
    for (int64_t run = k0; run < k1; run += blocks_a_run) {
      const int64_t run_end = std::min(k1, run + blocks_a_run);
      const int64_t r0 = run * block, r1 = std::min(outer, run_end * block);
      for (int64_t o = r0; o < r1; ++o) {
        elements[o - r0] = nll_target_element(x, stride_outer, stride_class, target, C, o);
      }
      for (int64_t k = run; k < run_end; ++k) {
        const int64_t b0 = k * block, b1 = std::min(outer, b0 + block);
        block_sums[k] = sum_in_lanes_small(b0, b1, [&](int64_t o) { return row_loss(o, elements[o - r0]); });
      }
    }
  }
  bad |= any_bad;
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
  const bool far_rows = stride_outer * static_cast<int64_t>(sizeof(scalar_t)) >= kNllPrefetchRowBytes;
  // Such a pass reads one element a row, so a thread gets a run of rows worth its start (the blocks, and with them
  // the sum's bits, stay the gradient pass's).
  const bool missing_rows = stride_outer * static_cast<int64_t>(sizeof(scalar_t)) >= kNllMissRowBytes;
  const int64_t grain =
      loss_only ? std::max<int64_t>(1, (missing_rows ? kNllMissTaskRows : kIndexScanGrain) / block) : 1;
  const bool gather = missing_rows && block <= kNllGatherRows;
  at::parallel_for(0, blocks, grain, [&](int64_t first_block, int64_t end_block) {
    if (loss_only) {
      bool bad = false;
      if (w != nullptr) {
        nll_loss_only_blocks<scalar_t, true>(x, stride_outer, stride_class, target, w, C, ignore_index, outer, block,
                                             first_block, end_block, gather, loss, block_sums.data(), bad);
      } else {
        nll_loss_only_blocks<scalar_t, false>(x, stride_outer, stride_class, target, w, C, ignore_index, outer, block,
                                              first_block, end_block, gather, loss, block_sums.data(), bad);
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
        auto lane_row = [&](int64_t o) {
          const int64_t ahead = far_rows && o + kNllPrefetchRows < outer ? o + kNllPrefetchRows : -1;
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
