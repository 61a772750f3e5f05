// Shared building blocks for every lossops CPU kernel.
//
// This header is compiled once per instruction set (see setup.py): CPU_CAPABILITY selects at::vec's
// intrinsics, so every kernel written against Vectorized<> here gets an AVX-512, an AVX2 and a baseline
// build without being written three times.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

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

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Fresh CPU outputs without at::empty / at::scalar_tensor: their operator headers were half of every kernel
// translation unit's compile time (about 5 s of 10), and the kernels never need more than an allocation.
inline at::Tensor new_cpu_tensor(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_cpu(sizes, dtype));
}

// A 0-d tensor holding `value` in `dtype` (float or double: the kernels' accumulation types).
inline at::Tensor cpu_scalar(double value, at::ScalarType dtype) {
  at::Tensor out = new_cpu_tensor({}, dtype);
  if (dtype == at::kDouble) {
    *out.mutable_data_ptr<double>() = value;
  } else {
    TORCH_CHECK(dtype == at::kFloat, "lossops: cpu_scalar supports float and double, got ", dtype);
    *out.mutable_data_ptr<float>() = static_cast<float>(value);
  }
  return out;
}

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

inline void finish_streaming() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// x <- cap * tanh(x / cap), in place; also keeps what the chain rule needs later (recomputed, not stored).
template <typename acc_t>
inline void apply_softcap(acc_t* x, int64_t n, acc_t cap) {
  using Vec = at::vec::Vectorized<acc_t>;
  const Vec inv(acc_t(1) / cap), c(cap);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) (c * (Vec::loadu(x + i) * inv).tanh()).store(x + i);
  for (; i < n; ++i) x[i] = cap * std::tanh(x[i] / cap);
}

// exp for the softmax passes, where it is most of the arithmetic: x = n ln2 + r (Cody-Waite, ln 2 split in
// two so n * ln2_hi is exact), e^r from a degree-5 polynomial fitted for relative error on [-ln2/2, ln2/2],
// times 2^n. About 2 ulp, and float32's subnormal results are kept (ATen's exp_u20 is ~20 ulp and flushes
// them to zero). AVX-512's vscalefps forms p * 2^n with under/overflow handled in one instruction, so that
// build needs 12 operations where exp_u20 takes 19; AVX2 multiplies by 2^(n/2) twice so that every
// exponent it builds is a normal float. Other builds use exp_u20 (which is std::exp there).
template <typename acc_t>
inline at::vec::Vectorized<acc_t> fast_exp(const at::vec::Vectorized<acc_t>& x) {
  return x.exp_u20();
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
namespace exp_detail {
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693145751953125f, kLn2Lo = 1.428606765330187045e-6f;
// The constant term is exactly 1 (the fit's own is 1 + 2^-23): e^0 = 1 exactly, so a row whose target holds all
// the probability has loss 0, as in torch, instead of a floor of 2^-23. Worst case it costs half an ulp elsewhere.
constexpr float kPoly[6] = {1.0f, 0.9999997019767761f, 0.49998894333839417f,
                            0.16667574644088745f, 0.04191538318991661f, 0.008297650143504143f};
// Below -110 exp is 0 in float, above 89 it is inf: clamping keeps n small.
constexpr float kLowest = -110.0f, kHighest = 89.0f;

// The part both instruction sets share: x = n ln2 + r; returns e^r and sets n. clamp_min/clamp_max are plain
// vmaxps/vminps with the argument second, which they return when it is NaN: a NaN argument stays NaN.
inline at::vec::Vectorized<float> exp_of_remainder(const at::vec::Vectorized<float>& v, at::vec::Vectorized<float>& n) {
  using Vec = at::vec::Vectorized<float>;
  const Vec x = at::vec::clamp_max(at::vec::clamp_min(v, Vec(kLowest)), Vec(kHighest));
  n = (x * Vec(kLog2e)).round();
  Vec r = at::vec::fmadd(n, Vec(-kLn2Hi), x);
  r = at::vec::fmadd(n, Vec(-kLn2Lo), r);
  Vec p(kPoly[5]);
  for (int k = 4; k >= 0; --k) p = at::vec::fmadd(p, r, Vec(kPoly[k]));
  return p;
}
}  // namespace exp_detail
#endif

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& v) {
  at::vec::Vectorized<float> n;
  const at::vec::Vectorized<float> p = exp_detail::exp_of_remainder(v, n);
  return _mm512_scalef_ps(p, n);
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& v) {
  at::vec::Vectorized<float> n;
  const at::vec::Vectorized<float> p = exp_detail::exp_of_remainder(v, n);
  // n in [-159, 128]: h = floor(n / 2) and n - h both lie in [-80, 64], normal exponents of a float.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 two_h = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
  const __m256 two_rest = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, two_h), two_rest);
}
#endif

// log1p(e) for e in [0, 1] (the softplus and sigmoid losses' log1p(exp(-|x|))): log1p(e) = 2 atanh(s) with
// s = e / (2 + e) in [0, 1/3], an odd series whose terms fall by at least 9x each; seven of them reach float's
// rounding (about 1 ulp measured over [0, 1], tiny e included: log1p(e) ~ 2s keeps e's relative precision).
// About 11 operations where Sleef's general log1p took a third of the BCE kernel's time. double keeps Sleef.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> log1p_unit(const at::vec::Vectorized<acc_t>& e) {
  return e.log1p();
}

template <>
inline at::vec::Vectorized<float> log1p_unit(const at::vec::Vectorized<float>& e) {
  using Vec = at::vec::Vectorized<float>;
  const Vec s = e / (e + Vec(2.0f));
  const Vec z = s * s;
  Vec poly(1.0f / 13.0f);
  poly = at::vec::fmadd(poly, z, Vec(1.0f / 11.0f));
  poly = at::vec::fmadd(poly, z, Vec(1.0f / 9.0f));
  poly = at::vec::fmadd(poly, z, Vec(1.0f / 7.0f));
  poly = at::vec::fmadd(poly, z, Vec(1.0f / 5.0f));
  poly = at::vec::fmadd(poly, z, Vec(1.0f / 3.0f));
  const Vec two_s = s + s;
  return at::vec::fmadd(two_s * z, poly, two_s);
}

// Sum of n contiguous values in four interleaved vector accumulators (a single one is a chain of dependent
// adds: 4 cycles per vector, a fifth of a regression loss's forward at 80k elements). Fixed order: the same
// bits for the same n whatever the thread count.
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

inline int64_t row_grain(int64_t row_length) {
  return std::max<int64_t>(1, kRowGrainElements / std::max<int64_t>(1, row_length));
}

// Whether ptr starts a gradient buffer reused from the previous step, i.e. whose pages are resident (the
// host's allocation.cpp knows; kernel_table.cpp asks it).
bool gradient_pages_resident(const void* ptr);

// Dispatch over the floating dtypes every loss accepts.
#define LOSSOPS_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace lossops
