// Gradient buffers: on transparent huge pages, and the last one freed kept for the next training step.
//
// A fresh N x V gradient costs more in page faults than in arithmetic (4 KiB pages: ~130k faults for a
// 4096 x 32000 fp32 buffer). Asking for 2 MiB pages (madvise(MADV_HUGEPAGE), honoured when THP is in
// "madvise" or "always" mode) makes the faults ~500x fewer, but the kernel still zeroes every fresh page
// (for a large gradient, about as long as the loss itself). A training loop asks for the
// same gradient every step, so the most recently freed large buffer is kept and handed out again for a
// request of the same size: its pages are already resident. One slot, like a one-entry caching allocator:
// a request of another size frees the kept buffer first, so no step ever holds more memory than it would
// without the cache; between steps one gradient's memory stays allocated. LOSSOPS_GRADIENT_CACHE=0 (read
// at import) or set_gradient_cache(false) turns it off, release_gradient_cache() frees the kept buffer.
// Kernels ask host_gradient_pages_resident() before writing with non-temporal stores, which pay off only on
// pages that are already there (on fresh ones they measured slower than the page faults' own cache fills).
// Buffers under 1 MiB use the default allocator; from 1 MiB they are kept, on huge pages from 8 MiB.
#include "allocation.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/from_blob.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace lossops {

namespace {
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinHugeBytes = size_t(8) << 20;
// Buffers from 1 MiB on are kept too (on 4 KiB pages): a 5.5 MiB bf16 segmentation gradient otherwise takes ~390
// page faults per step from the default allocator, a large share of the loss's time.
constexpr size_t kMinKeptBytes = size_t(1) << 20;
constexpr size_t kPage = size_t(4) << 10;

struct KeptBuffer {
  std::mutex mutex;
  void* ptr = nullptr;
  size_t bytes = 0;
  bool enabled = true;
  // The buffer last handed out again: its pages are resident (see host_gradient_pages_resident).
  std::atomic<const void*> reused{nullptr};

  KeptBuffer() {
    const char* env = std::getenv("LOSSOPS_GRADIENT_CACHE");
    enabled = env == nullptr || std::strcmp(env, "0") != 0;
  }

  // Empties the slot (the caller holds the mutex) and returns what it held.
  std::pair<void*, size_t> take_locked() {
    const std::pair<void*, size_t> held{ptr, bytes};
    ptr = nullptr;
    bytes = 0;
    return held;
  }
};

KeptBuffer& kept() {
  static KeptBuffer* slot = new KeptBuffer();  // never destroyed: tensors may be freed during interpreter exit
  return *slot;
}

// Memory handed back to the OS: a later allocation at the same address has fresh pages again.
void forget_and_free(void* ptr) {
  if (ptr == nullptr) return;
  const void* expected = ptr;
  kept().reused.compare_exchange_strong(expected, nullptr);
  std::free(ptr);
}

void* take_or_allocate(size_t bytes) {
  KeptBuffer& k = kept();
  void* stale;
  {
    std::lock_guard<std::mutex> lock(k.mutex);
    const auto [held, held_bytes] = k.take_locked();
    if (held != nullptr && held_bytes == bytes) {
      k.reused.store(held);
      return held;
    }
    stale = held;  // another size: freed before allocating, so peak memory is what it would be uncached
  }
  forget_and_free(stale);
  const bool huge = bytes >= kMinHugeBytes;
  void* ptr = std::aligned_alloc(huge ? kHugePage : kPage, bytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (ptr != nullptr && huge) madvise(ptr, bytes, MADV_HUGEPAGE);  // advisory: a refusal only costs speed
#endif
  return ptr;
}

void give_back(void* ptr, size_t bytes) {
  KeptBuffer& k = kept();
  void* evicted = ptr;
  {
    std::lock_guard<std::mutex> lock(k.mutex);
    if (k.enabled) {
      evicted = k.ptr;
      k.ptr = ptr;
      k.bytes = bytes;
    }
  }
  forget_and_free(evicted);
}
}  // namespace

at::Tensor empty_gradient(at::IntArrayRef sizes, at::ScalarType dtype) {
  const auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * at::elementSize(dtype);
  if (bytes >= kMinKeptBytes) {
    const size_t unit = bytes >= kMinHugeBytes ? kHugePage : kPage;
    const size_t rounded = (bytes + unit - 1) / unit * unit;
    if (void* ptr = take_or_allocate(rounded)) {
      return at::from_blob(ptr, sizes, [rounded](void* p) { give_back(p, rounded); }, options);
    }
  }
  return at::detail::empty_cpu(sizes, dtype);  // not at::empty: no dispatch for a tiny call's buffer
}

bool host_gradient_pages_resident(const void* ptr) { return ptr != nullptr && kept().reused.load() == ptr; }

void set_gradient_cache(bool enabled) {
  KeptBuffer& k = kept();
  {
    std::lock_guard<std::mutex> lock(k.mutex);
    k.enabled = enabled;
  }
  if (!enabled) release_gradient_cache();
}

size_t release_gradient_cache() {
  KeptBuffer& k = kept();
  std::pair<void*, size_t> held;
  {
    std::lock_guard<std::mutex> lock(k.mutex);
    held = k.take_locked();
  }
  forget_and_free(held.first);
  return held.second;
}

size_t gradient_cache_bytes() {
  KeptBuffer& k = kept();
  std::lock_guard<std::mutex> lock(k.mutex);
  return k.bytes;
}

bool gradient_cache_enabled() {
  KeptBuffer& k = kept();
  std::lock_guard<std::mutex> lock(k.mutex);
  return k.enabled;
}

}  // namespace lossops
