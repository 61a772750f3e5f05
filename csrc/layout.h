// Reading and writing (strided) rows through opmath buffers, and register-block transposes.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "bf16_convert.h"
#include "dispatch.h"

namespace lossops {

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
#if defined(CPU_CAPABILITY_AVX512) && defined(__GNUC__)
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (cpu_has_avx512_bf16()) {
          const int64_t done = store_bf16_native<false>(src, dst, n);
          at::vec::convert(src + done, dst + done, n - done);
          return;
        }
      }
#endif
      at::vec::convert(src, dst, n);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * stride] = static_cast<scalar_t>(src[i]);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// One 16x16 float block, kept in registers: 32-bit, 64-bit, then two 128-bit-lane interleaves (64 shuffles).
// Written out because ATen's transpose_mxn_16x16 is not inlined and passes its rows through the stack, which
// the lane kernel cannot afford at every group.
inline void transpose_16x16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_src);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4q + k] now holds, in each 128-bit lane L, elements k of rows 4q..4q+3 for column 4L + k.
  for (int q = 0; q < 4; q += 2) {
    for (int k = 0; k < 4; ++k) {
      t[4 * q + k] = _mm512_shuffle_f32x4(r[4 * q + k], r[4 * q + 4 + k], 0x88);
      t[4 * q + 4 + k] = _mm512_shuffle_f32x4(r[4 * q + k], r[4 * q + 4 + k], 0xdd);
    }
  }
  for (int k = 0; k < 4; ++k) {
    for (int h = 0; h < 2; ++h) {
      const __m512 a = t[4 * h + k], b = t[8 + 4 * h + k];
      // a, b hold columns 4h + k and 4h + 8 + k in alternate lanes (rows 0-7 in a, 8-15 in b).
      r[4 * h + k] = _mm512_shuffle_f32x4(a, b, 0x88);
      r[4 * h + 8 + k] = _mm512_shuffle_f32x4(a, b, 0xdd);
    }
  }
  for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + k * ld_dst, r[k]);
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// One block of up to 8x8 floats (m source rows of n values), kept in registers: 32-bit, 64-bit, then 128-bit-lane
// interleaves (24 shuffles). Partial blocks load through lane masks, so that a row count or a class
// count that is not a multiple of 8 (10 classes: 8 + 2) costs one more block, not an element-by-element loop
// (that loop and ATen's out-of-line transpose_mxn cost the 10-class lane kernel dearly).
__attribute__((always_inline)) inline void transpose_8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int m, int n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256 r[8], t[8];
  if (m == 8 && n == 8) {
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_src);
  } else {
    const __m256i cols = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane);
    for (int i = 0; i < 8; ++i) r[i] = i < m ? _mm256_maskload_ps(src + i * ld_src, cols) : _mm256_setzero_ps();
  }
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm256_permute2f128_ps(r[k], r[k + 4], 0x20);
    t[k + 4] = _mm256_permute2f128_ps(r[k], r[k + 4], 0x31);
  }
  if (m == 8 && n == 8) {
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(dst + j * ld_dst, t[j]);
  } else {
    // Not vmaskmovps: as a store it is microcoded on AMD's cores and slows the kernel down. Not a loop of scalar
    // stores either, which GCC turns into a memcpy call.
    for (int j = 0; j < n; ++j) {
      float* d = dst + j * ld_dst;
      __m128 part = _mm256_castps256_ps128(t[j]);
      int left = m;
      if (left >= 4) {
        _mm_storeu_ps(d, part);
        if (left == 8) {
          _mm_storeu_ps(d + 4, _mm256_extractf128_ps(t[j], 1));
          continue;
        }
        part = _mm256_extractf128_ps(t[j], 1);
        d += 4;
        left -= 4;
      }
      if (left >= 2) {
        _mm_storel_pi(reinterpret_cast<__m64*>(d), part);
        part = _mm_movehl_ps(part, part);
        d += 2;
        left -= 2;
      }
      if (left == 1) _mm_store_ss(d, part);
    }
  }
}
#endif

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < M, j < N: 16x16 (AVX-512) or 8x8 (AVX2) register blocks
// for float, element by element otherwise.
template <typename T>
inline void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t M, int64_t N) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const int64_t M16 = M / 16 * 16, N16 = N / 16 * 16;
    for (int64_t i = 0; i < M16; i += 16) {
      for (int64_t j = 0; j < N16; j += 16) transpose_16x16(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
    }
    if (N16 < N) {
      at::vec::transpose_mxn<float>(src + N16, ld_src, dst + N16 * ld_dst, ld_dst, static_cast<int>(M),
                                    static_cast<int>(N - N16));
    }
    if (M16 < M && N16 > 0) {
      at::vec::transpose_mxn<float>(src + M16 * ld_src, ld_src, dst + M16, ld_dst, static_cast<int>(M - M16),
                                    static_cast<int>(N16));
    }
    return;
  }
#endif
  int64_t i0 = 0;
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    for (; i0 < M; i0 += 8) {
      for (int64_t j = 0; j < N; j += 8) {
        transpose_8x8(src + i0 * ld_src + j, ld_src, dst + j * ld_dst + i0, ld_dst,
                      static_cast<int>(std::min<int64_t>(8, M - i0)), static_cast<int>(std::min<int64_t>(8, N - j)));
      }
    }
  }
#endif
  for (int64_t i = i0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
}

}  // namespace lossops
