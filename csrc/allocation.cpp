// Gradient buffers backed by transparent huge pages.
//
// A fresh N x V gradient costs more in page faults than in arithmetic (4 KiB pages: ~130k faults for a
// 4096 x 32000 fp32 buffer). Asking for 2 MiB pages (madvise(MADV_HUGEPAGE), honoured when THP is in
// "madvise" or "always" mode) makes the first touch ~500x cheaper. Small buffers use the default allocator.
#include "common.h"

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lossops {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinHugeBytes = size_t(8) << 20;

void free_buffer(void* ptr) { std::free(ptr); }
}  // namespace

at::Tensor empty_gradient(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * at::elementSize(dtype);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes >= kMinHugeBytes) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = std::aligned_alloc(kHugePage, rounded);
    if (ptr != nullptr) {
      madvise(ptr, rounded, MADV_HUGEPAGE);  // advisory: a refusal only costs speed
      return at::from_blob(ptr, sizes, free_buffer, options);
    }
  }
#endif
  return at::empty(sizes, options);
}

}  // namespace lossops
