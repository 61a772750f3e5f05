// Memory traffic hints: prefetch ahead of a pass, non-temporal stores for a gradient written once.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "bf16_convert.h"
#include "dispatch.h"
#include "layout.h"

namespace lossops {

// Asks for n elements from p to be brought into L2 ahead of their use (one hint per 64-byte line).
template <typename T>
inline void prefetch(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * int64_t(sizeof(T)); off += 64) __builtin_prefetch(bytes + off, 0, 2);
}

// write_block for a destination nobody reads soon (a gradient far larger than the caches, written once):
// non-temporal stores skip reading each destination line before overwriting it, a third of an out-of-place
// pass's memory traffic. The 64-byte-aligned middle is streamed, the ragged ends stored normally; call
// finish_streaming() before the data is handed to another thread. fp32 and bf16 on the AVX-512 and AVX2
// builds (bf16 on AVX-512 only where the CPU converts natively); other builds and dtypes store normally.
template <typename scalar_t>
inline void stream_block(const opmath_t<scalar_t>* src, scalar_t* dst, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr bool is_float = std::is_same_v<scalar_t, float>;
#if defined(CPU_CAPABILITY_AVX512) && !defined(__GNUC__)
  constexpr bool is_bf16 = false;  // the native conversion (store_bf16_native) needs GCC/Clang's target attribute
#else
  constexpr bool is_bf16 = std::is_same_v<scalar_t, c10::BFloat16>;
#endif
  if constexpr (is_float || is_bf16) {
    constexpr int64_t kPerLine = 64 / sizeof(scalar_t);
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
    const bool can_stream = is_float || cpu_has_avx512_bf16();
#else
    const bool can_stream = true;
#endif
    if (can_stream) {
      const int64_t head = std::min<int64_t>(n, ((64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64) / sizeof(scalar_t));
      write_block<scalar_t>(src, dst, 1, head);
      int64_t i = head;
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (is_float) {
        for (; i + kPerLine <= n; i += kPerLine) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
      } else {
#if defined(__GNUC__)
        i += store_bf16_native<true>(src + i, dst + i, (n - i) / kPerLine * kPerLine);
#endif
      }
#else
      for (; i + kPerLine <= n; i += kPerLine) {
        if constexpr (is_float) {
          _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
          _mm256_stream_ps(dst + i + 8, _mm256_loadu_ps(src + i + 8));
        } else {
          using Vec = at::vec::Vectorized<float>;
          for (int64_t half = 0; half < kPerLine; half += 16) {
            const __m256i packed = at::vec::convert_float_bfloat16(Vec::loadu(src + i + half), Vec::loadu(src + i + half + 8));
            _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + half), packed);
          }
        }
      }
#endif
      write_block<scalar_t>(src + i, dst + i, 1, n - i);
      return;
    }
  }
#endif
  write_block<scalar_t>(src, dst, 1, n);
}

// stream_block for n elements already in the destination's dtype (any trivially copyable T): the whole 64-byte
// lines with non-temporal stores on the AVX-512 and AVX2 builds, the elements before and after them copied normally.
template <typename T>
inline void stream_copy(const T* src, T* dst, int64_t n) {
  int64_t i = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t kPerLine = 64 / sizeof(T);
  static_assert(64 % sizeof(T) == 0);
  // dst is aligned to its element, as a tensor's data is: dst + head starts a line
  const int64_t head = ((64 - reinterpret_cast<uintptr_t>(dst) % 64) % 64) / sizeof(T);
  if (head + kPerLine <= n) {
    std::memcpy(static_cast<void*>(dst), src, static_cast<size_t>(head) * sizeof(T));
    for (i = head; i + kPerLine <= n; i += kPerLine) {
      const __m256i* from = reinterpret_cast<const __m256i*>(src + i);
      __m256i* to = reinterpret_cast<__m256i*>(dst + i);
      _mm256_stream_si256(to, _mm256_loadu_si256(from));
      _mm256_stream_si256(to + 1, _mm256_loadu_si256(from + 1));
    }
  }
#endif
  std::memcpy(static_cast<void*>(dst + i), src + i, static_cast<size_t>(n - i) * sizeof(T));
}

inline void finish_streaming() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Whether ptr starts a gradient buffer reused from the previous step, i.e. whose pages are resident (the
// host's allocation.cpp knows; kernel_table.cpp asks it).
bool gradient_pages_resident(const void* ptr);

}  // namespace lossops
