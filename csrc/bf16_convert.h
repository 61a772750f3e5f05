// Native float -> bfloat16 conversion for the AVX-512 build (write_block and stream_block use it).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

namespace lossops {

#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
// float -> bfloat16 with one vcvtne2ps2bf16 per 32 values where the CPU has AVX512_BF16 (Zen 4, Cooper
// Lake, Sapphire Rapids and later), instead of ATen's ~10-operation integer emulation; same round to nearest
// even and NaN stays NaN. Unlike the emulation it flushes subnormal values (< 1.2e-38) to zero.
// Not part of ATen's AVX512 capability, so it is compiled for that target alone and chosen at run time.
//
// Converts and stores the leading multiple of 32 of n values; returns how many. Streaming (non-temporal
// stores, see stream_block) needs dst 64-byte aligned.
template <bool kStream>
__attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl"))) inline int64_t store_bf16_native(
    const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512i packed = reinterpret_cast<__m512i>(
        _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i)));
    if constexpr (kStream) _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), packed);
    else _mm512_storeu_si512(reinterpret_cast<void*>(dst + i), packed);
  }
  return i;
}

inline bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512bf16");
  return has;
}
#endif

}  // namespace lossops
