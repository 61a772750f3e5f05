// Sums whose bits do not depend on the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "tuning.h"

namespace lossops {

// Sum of n contiguous values in four interleaved vector accumulators (a single one is a chain of dependent
// adds, bound by the add's latency rather than its throughput). Fixed order: the same bits for the same n
// whatever the thread count.
template <typename acc_t>
inline acc_t block_sum(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec s0(acc_t(0)), s1(acc_t(0)), s2(acc_t(0)), s3(acc_t(0));
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    s0 = s0 + Vec::loadu(x + i);
    s1 = s1 + Vec::loadu(x + i + W);
    s2 = s2 + Vec::loadu(x + i + 2 * W);
    s3 = s3 + Vec::loadu(x + i + 3 * W);
  }
  for (; i + W <= n; i += W) s0 = s0 + Vec::loadu(x + i);
  acc_t total = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, (s0 + s1) + (s2 + s3));
  for (; i < n; ++i) total += x[i];
  return total;
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

// Eight interleaved partial sums combined in one fixed order (pairs, then pairs of pairs): the same bits wherever
// the same partial sums are combined.
inline double sum_of_lanes(const double (&s)[8]) {
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// Sum of value(i) for i in [begin, end), in double, in eight interleaved accumulators (value i in lane
// (i - begin) % 8) combined in a fixed order: one accumulator is a chain of dependent adds, bound by the add's
// latency.
template <typename Value>
inline double sum_in_lanes(int64_t begin, int64_t end, const Value& value) {
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) s[k] += static_cast<double>(value(i + k));
  }
  for (int k = 0; i < end; ++i, ++k) s[k] += static_cast<double>(value(i));
  return sum_of_lanes(s);
}

// sum_in_lanes(begin, begin + N, value) for N <= 8 known at compile time (a value a lane): the same sum without
// its loops, for runs of many tiny blocks.
template <int N, typename Value>
inline double sum_in_lanes_of(int64_t begin, const Value& value) {
  static_assert(N >= 1 && N <= 8);
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma GCC unroll 8
  for (int k = 0; k < N; ++k) s[k] += static_cast<double>(value(begin + k));
  return sum_of_lanes(s);
}

// sum_in_lanes(begin, end, value), through sum_in_lanes_of where the range holds at most 8 values.
template <typename Value>
inline double sum_in_lanes_small(int64_t begin, int64_t end, const Value& value) {
  switch (end - begin) {
    case 1: return sum_in_lanes_of<1>(begin, value);
    case 2: return sum_in_lanes_of<2>(begin, value);
    case 3: return sum_in_lanes_of<3>(begin, value);
    case 4: return sum_in_lanes_of<4>(begin, value);
    case 5: return sum_in_lanes_of<5>(begin, value);
    case 6: return sum_in_lanes_of<6>(begin, value);
    case 7: return sum_in_lanes_of<7>(begin, value);
    case 8: return sum_in_lanes_of<8>(begin, value);
    default: return sum_in_lanes(begin, end, value);
  }
}

// Sum of n values in double, as sum_in_lanes forms it.
template <typename T>
inline double sum_in_double(const T* x, int64_t n) {
  return sum_in_lanes(0, n, [x](int64_t i) { return x[i]; });
}

// Sum and dot product of n contiguous values with at::vec's reductions (one accumulator): the sums of the
// cross-entropy kernels, whose bits block_sum's four accumulators would change.
template <typename acc_t>
inline acc_t vec_dot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::map2_reduce_all<acc_t>([](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; }, a, b, n);
}

template <typename acc_t>
inline acc_t vec_sum(const acc_t* a, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, a, n);
}

}  // namespace lossops
