// Block sizes and work-split constants the kernels share, and why each has its value (the measurements that
// chose them are in docs/tuning.md).
#pragma once

#include <algorithm>
#include <cstdint>

namespace lossops {

// Loads work in blocks small enough to stay in L1 while they are reused within a pass.
constexpr int64_t kBlock = 2048;
// Rows up to this many classes (Llama 3's 128256 included) keep their exponentials between passes: 512 KiB
// per thread, in L2 beside the row or else in L3, still faster than a second exp per element.
constexpr int64_t kExpCacheElements = 1 << 17;
// Work units for at::parallel_for: large enough that a thread streams long runs of memory.
constexpr int64_t kRowGrainElements = 1 << 16;
// Elementwise reductions sum fixed-size chunks, then the chunk sums in order: the result does not
// depend on the number of threads (bitwise reproducible). Chunks are also the unit of work split between
// threads: 8192 elements keep an 80k-element loss (a detection head's 1000 x 80) balanced on two threads,
// where 32768 would split it 2:1.
constexpr int64_t kReduceChunk = 1 << 13;

// Scans over class-index targets (the range check, the mean's count of kept rows) split between threads in runs
// of this many: on one thread, the other thread would wait through them, and at few classes per row they are a
// visible share of the call.
constexpr int64_t kIndexScanGrain = 1 << 14;

inline int64_t row_grain(int64_t row_length) {
  return std::max<int64_t>(1, kRowGrainElements / std::max<int64_t>(1, row_length));
}

}  // namespace lossops
