// Block sizes and work-split constants the kernels share, with the measurements behind them.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lossops {

// Loads work in blocks small enough to stay in L1 while they are reused within a pass.
constexpr int64_t kBlock = 2048;
// Rows up to this many classes (Llama 3's 128256 included) keep their exponentials between passes: 512 KiB
// per thread, in L2 beside the row or else in L3, still faster than a second exp per element (measured at
// V = 128000: -10% in place and out of place against a 64k limit).
constexpr int64_t kExpCacheElements = 1 << 17;
// Work units for at::parallel_for: large enough that a thread streams long runs of memory.
constexpr int64_t kRowGrainElements = 1 << 16;
// Elementwise reductions sum fixed-size chunks, then the chunk sums in order: the result does not
// depend on the number of threads (bitwise reproducible). Chunks are also the unit of work split between
// threads: 8192 elements keep an 80k-element loss (a detection head's 1000 x 80) balanced on two threads,
// where 32768 split it 2:1 (forward 60 -> 44 us on 2 threads, measured).
constexpr int64_t kReduceChunk = 1 << 13;

// Scans over class-index targets (the range check, the mean's count of kept rows) split between threads in runs
// of this many: done on one thread they were a tenth of a 65536 x 10 call's time on two, the other thread waiting.
constexpr int64_t kIndexScanGrain = 1 << 14;

inline int64_t row_grain(int64_t row_length) {
  return std::max<int64_t>(1, kRowGrainElements / std::max<int64_t>(1, row_length));
}

}  // namespace lossops
