// Gradient buffers: on transparent huge pages, and the last step's ones kept for the next training step.
//
// A fresh N x V gradient costs more in page faults than in arithmetic (4 KiB pages: ~130k faults for a
// 4096 x 32000 fp32 buffer). Asking for 2 MiB pages (madvise(MADV_HUGEPAGE), honoured when THP is in
// "madvise" or "always" mode) makes the faults ~500x fewer, but the kernel still zeroes every fresh page
// (for a large gradient, about as long as the loss itself). A training loop asks for the same gradients every
// step, so the large buffers freed last are kept and handed out again for requests of the same size: their
// pages are already resident. The kept buffers all have one size (a loss with two or three gradients of one
// shape, as the triplet losses and gaussian_nll have, gets all of them back), at most kSlots of them: a buffer
// of another size given back frees them first, and a request of another size frees them before allocating, so
// no step ever holds more memory than it would without the cache; between steps the last step's gradients of
// one size stay allocated. LOSSOPS_GRADIENT_CACHE=0 (read at import) or set_gradient_cache(false) turns it off,
// release_gradient_cache() frees the kept buffers.
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

// A loss's gradients of one shape: the triplet losses write three.
constexpr int kSlots = 3;

struct KeptBuffers {
  std::mutex mutex;
  void* ptrs[kSlots] = {};
  int count = 0;
  size_t bytes = 0;  // each kept buffer's size
  bool enabled = true;
  // The buffers last handed out again: their pages are resident (see host_gradient_pages_resident).
  std::atomic<const void*> reused[kSlots] = {};
  std::atomic<int> next_reused{0};

  KeptBuffers() {
    const char* env = std::getenv("LOSSOPS_GRADIENT_CACHE");
    enabled = env == nullptr || std::strcmp(env, "0") != 0;
  }

  // Empties the slots (the caller holds the mutex) into out[0..kSlots); returns how many there were.
  int take_all_locked(void** out) {
    const int n = count;
    for (int i = 0; i < n; ++i) out[i] = ptrs[i];
    count = 0;
    bytes = 0;
    return n;
  }
};

KeptBuffers& kept() {
  static KeptBuffers* slots = new KeptBuffers();  // never destroyed: tensors may be freed during interpreter exit
  return *slots;
}

// Memory handed back to the OS: a later allocation at the same address has fresh pages again.
void forget_and_free(void* ptr) {
  if (ptr == nullptr) return;
  for (auto& reused : kept().reused) {
    const void* expected = ptr;
    reused.compare_exchange_strong(expected, nullptr);
  }
  std::free(ptr);
}

void* take_or_allocate(size_t bytes) {
  KeptBuffers& k = kept();
  void* stale[kSlots];
  int n_stale;
  {
    std::lock_guard<std::mutex> lock(k.mutex);
    if (k.count > 0 && k.bytes == bytes) {
      void* held = k.ptrs[--k.count];
      if (k.count == 0) k.bytes = 0;
      k.reused[k.next_reused.fetch_add(1) % kSlots].store(held);
      return held;
    }
    n_stale = k.take_all_locked(stale);  // another size: freed before allocating, so peak memory is uncached's
  }
  for (int i = 0; i < n_stale; ++i) forget_and_free(stale[i]);
  const bool huge = bytes >= kMinHugeBytes;
  void* ptr = std::aligned_alloc(huge ? kHugePage : kPage, bytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (ptr != nullptr && huge) madvise(ptr, bytes, MADV_HUGEPAGE);  // advisory: a refusal only costs speed
#endif
  return ptr;
}

void give_back(void* ptr, size_t bytes) {
  KeptBuffers& k = kept();
  void* evicted[kSlots + 1];
  int n_evicted = 0;
  {
    std::lock_guard<std::mutex> lock(k.mutex);
    if (!k.enabled) {
      evicted[n_evicted++] = ptr;
    } else {
      if (k.count > 0 && k.bytes != bytes) n_evicted = k.take_all_locked(evicted);
      if (k.count == kSlots) {  // the oldest goes
        evicted[n_evicted++] = k.ptrs[0];
        for (int i = 1; i < kSlots; ++i) k.ptrs[i - 1] = k.ptrs[i];
        --k.count;
      }
      k.ptrs[k.count++] = ptr;
      k.bytes = bytes;
    }
  }
  for (int i = 0; i < n_evicted; ++i) forget_and_free(evicted[i]);
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

bool host_gradient_pages_resident(const void* ptr) {
  if (ptr == nullptr) return false;
  for (const auto& reused : kept().reused) {
    if (reused.load() == ptr) return true;
  }
  return false;
}

void set_gradient_cache(bool enabled) {
  KeptBuffers& k = kept();
  {
    std::lock_guard<std::mutex> lock(k.mutex);
    k.enabled = enabled;
  }
  if (!enabled) release_gradient_cache();
}

size_t release_gradient_cache() {
  KeptBuffers& k = kept();
  void* held[kSlots];
  int n;
  size_t bytes;
  {
    std::lock_guard<std::mutex> lock(k.mutex);
    bytes = k.bytes * static_cast<size_t>(k.count);
    n = k.take_all_locked(held);
  }
  for (int i = 0; i < n; ++i) forget_and_free(held[i]);
  return bytes;
}

size_t gradient_cache_bytes() {
  KeptBuffers& k = kept();
  std::lock_guard<std::mutex> lock(k.mutex);
  return k.bytes * static_cast<size_t>(k.count);
}

bool gradient_cache_enabled() {
  KeptBuffers& k = kept();
  std::lock_guard<std::mutex> lock(k.mutex);
  return k.enabled;
}

}  // namespace lossops
