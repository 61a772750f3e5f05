// Reading and writing (strided) rows through opmath buffers, and register-block transposes.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>

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
// Written out because ATen's transpose_mxn_16x16 is not inlined and passes its rows through the stack: it was a
// quarter of the lane kernel's time at 100 classes.
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
    for (; i0 + 8 <= M; i0 += 8) {
      int64_t j = 0;
      for (; j + 8 <= N; j += 8) at::vec::transpose_mxn<float, 8, 8>(src + i0 * ld_src + j, ld_src, dst + j * ld_dst + i0, ld_dst);
      for (; j < N; ++j) {
        for (int64_t i = i0; i < i0 + 8; ++i) dst[j * ld_dst + i] = src[i * ld_src + j];
      }
    }
  }
#endif
  for (int64_t i = i0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
}

}  // namespace lossops
