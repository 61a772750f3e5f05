// Shared building blocks for every lossops CPU kernel.
//
// This header is compiled once per instruction set (see setup.py): CPU_CAPABILITY selects at::vec's
// intrinsics, so every kernel written against Vectorized<> here gets an AVX-512, an AVX2 and a baseline
// build without being written three times.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace lossops {

// Loads work in blocks small enough to stay in L1 while they are reused within a pass.
constexpr int64_t kBlock = 2048;
// Rows up to this many classes keep their exponentials between passes (4 bytes each: fits L2).
constexpr int64_t kExpCacheElements = 1 << 16;
// Work units for at::parallel_for: large enough that a thread streams long runs of memory.
constexpr int64_t kRowGrainElements = 1 << 16;
// Elementwise reductions sum fixed-size chunks, then the chunk sums in order: the result does not
// depend on the number of threads (bitwise reproducible).
constexpr int64_t kReduceChunk = 1 << 15;

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Where row `r` of a (outer, C, inner) view starts, for any strides: class-dim-1 layouts (N,C,d1..dk)
// are read in place, without moving the class dimension last.
struct RowLayout {
  int64_t inner;
  int64_t stride_outer;
  int64_t stride_class;
  int64_t stride_inner;

  static RowLayout of(const at::Tensor& t3d) {
    return {t3d.size(2), t3d.stride(0), t3d.stride(1), t3d.stride(2)};
  }
  int64_t row_offset(int64_t row) const {
    return (row / inner) * stride_outer + (row % inner) * stride_inner;
  }
};

// Copies n (strided) elements into an opmath buffer. Returns a pointer usable for reading: the source
// itself when it already is contiguous opmath data, so fp32 rows are never copied.
template <typename scalar_t>
inline const opmath_t<scalar_t>* read_block(const scalar_t* src, int64_t stride, int64_t n,
                                            opmath_t<scalar_t>* buffer, bool force_copy = false) {
  using acc_t = opmath_t<scalar_t>;
  if (stride == 1) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (!force_copy) return src;
      std::memcpy(buffer, src, n * sizeof(acc_t));
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
      // at::vec::convert has no vectorised bf16/fp16 -> float specialisation; widen 2 vectors at a time.
      using Narrow = at::vec::Vectorized<scalar_t>;
      int64_t i = 0;
      for (; i + Narrow::size() <= n; i += Narrow::size()) {
        auto [lo, hi] = at::vec::convert_to_float<scalar_t>(Narrow::loadu(src + i));
        lo.store(buffer + i);
        hi.store(buffer + i + Narrow::size() / 2);
      }
      for (; i < n; ++i) buffer[i] = static_cast<acc_t>(src[i]);
    } else {
      at::vec::convert(src, buffer, n);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<acc_t>(src[i * stride]);
  }
  return buffer;
}

template <typename scalar_t>
inline void write_block(const opmath_t<scalar_t>* src, scalar_t* dst, int64_t stride, int64_t n) {
  if (stride == 1) {
    if constexpr (std::is_same_v<scalar_t, opmath_t<scalar_t>>) {
      std::memcpy(dst, src, n * sizeof(scalar_t));
    } else {
      at::vec::convert(src, dst, n);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<scalar_t>(src[i]);
  }
}

// x <- cap * tanh(x / cap), in place; also keeps what the chain rule needs later (recomputed, not stored).
template <typename acc_t>
inline void apply_softcap(acc_t* x, int64_t n, acc_t cap) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec inv(acc_t(1) / cap), c(cap);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (c * (Vec::loadu(x + i) * inv).tanh()).store(x + i);
  for (; i < n; ++i) x[i] = cap * std::tanh(x[i] / cap);
}

// Sum of n values of a per-index function, in fixed chunks combined in index order.
template <typename ChunkSum>
inline double deterministic_sum(int64_t n, const ChunkSum& chunk_sum) {
  const int64_t chunks = (n + kReduceChunk - 1) / kReduceChunk;
  if (chunks <= 1) return n > 0 ? chunk_sum(0, n) : 0.0;
  std::vector<double> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      partial[c] = chunk_sum(c * kReduceChunk, std::min(n, (c + 1) * kReduceChunk));
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

inline int64_t row_grain(int64_t row_length) {
  return std::max<int64_t>(1, kRowGrainElements / std::max<int64_t>(1, row_length));
}

// An uninitialised contiguous CPU tensor for a gradient, on huge pages when large (allocation.cpp).
at::Tensor empty_gradient(at::IntArrayRef sizes, at::ScalarType dtype);

// Dispatch over the floating dtypes every loss accepts.
#define LOSSOPS_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace lossops
