// Vectorised math for the loss formulas: softcap, a faster exp, log1p on [0, 1], the logs of a probability.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace lossops {

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

// fast_exp of K vectors in place, one step of the formula across all K before the next: each exp is one chain of
// ~20 dependent operations, and issued one after the other only about three fit in the out-of-order window, so
// the softmax pass would wait on latency rather than throughput. Bit for bit fast_exp's results.
template <int K, typename acc_t>
inline void fast_exp_batch(at::vec::Vectorized<acc_t>* v) {
  for (int k = 0; k < K; ++k) v[k] = fast_exp(v[k]);
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

// p * 2^n for integral n in [-159, 128]. AVX-512: vscalefps, under/overflow handled in one instruction. AVX2:
// h = floor(n / 2) and n - h both lie in [-80, 64], normal exponents of a float, so p is multiplied by 2^h and
// 2^(n - h).
__attribute__((always_inline)) inline at::vec::Vectorized<float> times_pow2(const at::vec::Vectorized<float>& p, const at::vec::Vectorized<float>& n) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_scalef_ps(p, n);
#else
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 two_h = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
  const __m256 two_rest = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, two_h), two_rest);
#endif
}
}  // namespace exp_detail

// x = n ln2 + r, e^r = poly(r), times 2^n. n = round(x log2 e) by adding 1.5 * 2^23, which leaves the rounded value
// in the low bits (one fused multiply-add instead of a multiply and a rounding). clamp_min/clamp_max are plain
// vmaxps/vminps with the argument second, which they return when it is NaN: a NaN argument stays NaN.
//
// AVX2: when no lane of the K vectors has |x| > 87 (the softmax's x - max but for rows that span 87 nats), every
// 2^n is a normal float, built from the rounding sum's bits in two integer operations and applied in one
// multiply; otherwise all K take times_pow2's two steps. Both give the same bits for such a lane (the same n,
// scalings by powers of two that are exact but for the last), so a value never depends on its neighbours.
// Counted: the clamps and the two-step scaling are 7 of the exponential's 20 operations.
template <int K>
__attribute__((always_inline)) inline void fast_exp_batch_float(at::vec::Vectorized<float>* v) {
  using Vec = at::vec::Vectorized<float>;
  using namespace exp_detail;
  const Vec magic(12582912.0f);
  Vec n[K], r[K], p[K];
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  __m256 far = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int k = 0; k < K; ++k) far = _mm256_or_ps(far, _mm256_cmp_ps(_mm256_and_ps(v[k], abs_mask), _mm256_set1_ps(87.0f), _CMP_GT_OQ));
  const bool normal_scale = _mm256_movemask_ps(far) == 0;
  if (!normal_scale)
#endif
  {
    for (int k = 0; k < K; ++k) v[k] = at::vec::clamp_max(at::vec::clamp_min(v[k], Vec(kLowest)), Vec(kHighest));
  }
  Vec rounded[K];
  for (int k = 0; k < K; ++k) rounded[k] = at::vec::fmadd(v[k], Vec(kLog2e), magic);
  for (int k = 0; k < K; ++k) n[k] = rounded[k] - magic;
  for (int k = 0; k < K; ++k) r[k] = at::vec::fmadd(n[k], Vec(-kLn2Hi), v[k]);
  for (int k = 0; k < K; ++k) r[k] = at::vec::fmadd(n[k], Vec(-kLn2Lo), r[k]);
  for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(Vec(kPoly[5]), r[k], Vec(kPoly[4]));
  for (int j = 3; j >= 0; --j) {
    for (int k = 0; k < K; ++k) p[k] = at::vec::fmadd(p[k], r[k], Vec(kPoly[j]));
  }
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  if (normal_scale) {
    // The sum's low bits hold n (two's complement): shifted into the exponent field and biased, they are 2^n.
    const __m256i bias = _mm256_set1_epi32(127 << 23);
    for (int k = 0; k < K; ++k) {
      const __m256i bits = _mm256_add_epi32(_mm256_slli_epi32(_mm256_castps_si256(rounded[k]), 23), bias);
      v[k] = _mm256_mul_ps(p[k], _mm256_castsi256_ps(bits));
    }
    return;
  }
#endif
  for (int k = 0; k < K; ++k) v[k] = times_pow2(p[k], n[k]);
}

template <>
__attribute__((always_inline)) inline at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& x) {
  at::vec::Vectorized<float> v = x;
  fast_exp_batch_float<1>(&v);
  return v;
}
template <>
__attribute__((always_inline)) inline void fast_exp_batch<2, float>(at::vec::Vectorized<float>* v) { fast_exp_batch_float<2>(v); }
template <>
__attribute__((always_inline)) inline void fast_exp_batch<4, float>(at::vec::Vectorized<float>* v) { fast_exp_batch_float<4>(v); }
#endif

// e^x and e^x - 1 for a log-probability x <= 0 (NaN stays NaN). The gradient at the target class needs both, and
// at few classes per row Sleef's exp and expm1, two full evaluations, weigh on the lane kernel.
template <typename acc_t>
inline void exp_and_expm1(const at::vec::Vectorized<acc_t>& x, at::vec::Vectorized<acc_t>& e,
                          at::vec::Vectorized<acc_t>& em1) {
  e = x.exp();
  em1 = x.expm1();
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// One range reduction for both, x = n ln2 + r: e^x = 2^n (1 + r q(r)) and e^x - 1 = 2^n r q(r) + (2^n - 1), with
// q(r) = (e^r - 1) / r from its Taylor series (to r^6 / 7!: under 1e-8 on |r| <= ln2/2). Not fast_exp's
// polynomial, whose constant term is set to 1 and whose fit is for e^r's relative error: it loses e^r - 1's
// relative precision near r = 0. No cancellation: at n = 0 the result is r q(r), for n <= -1 the two terms have
// the same sign. About 1 ulp each.
template <>
inline void exp_and_expm1(const at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& e,
                          at::vec::Vectorized<float>& em1) {
  using Vec = at::vec::Vectorized<float>;
  using namespace exp_detail;
  const Vec v = at::vec::clamp_max(at::vec::clamp_min(x, Vec(kLowest)), Vec(kHighest));
  const Vec n = (v * Vec(kLog2e)).round();
  Vec r = at::vec::fmadd(n, Vec(-kLn2Hi), v);
  r = at::vec::fmadd(n, Vec(-kLn2Lo), r);
  constexpr float kTaylor[7] = {1.0f, 1.0f / 2, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720, 1.0f / 5040};
  Vec q(kTaylor[6]);
  for (int j = 5; j >= 0; --j) q = at::vec::fmadd(q, r, Vec(kTaylor[j]));
  const Vec rq = r * q;
  e = times_pow2(rq + Vec(1.0f), n);
  const Vec pow2 = times_pow2(Vec(1.0f), n);
  em1 = at::vec::fmadd(pow2, rq, pow2 - Vec(1.0f));
}
#endif

// log1p(e) for e in [0, 1] (the softplus and sigmoid losses' log1p(exp(-|x|))): log1p(e) = 2 atanh(s) with
// s = e / (2 + e) in [0, 1/3], an odd series whose terms fall by at least 9x each; seven of them reach float's
// rounding (about 1 ulp measured over [0, 1], tiny e included: log1p(e) ~ 2s keeps e's relative precision).
// About 11 operations, far cheaper than Sleef's general log1p, which dominated the BCE kernel. double keeps Sleef.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> log1p_unit(const at::vec::Vectorized<acc_t>& e) {
  return e.log1p();
}

// 2 atanh(s) = 2s (1 + z/3 + z^2/5 + ...), z = s^2, the series to z^Powers, in Horner's form.
template <int Powers>
__attribute__((always_inline)) inline at::vec::Vectorized<float> two_atanh(const at::vec::Vectorized<float>& s) {
  using Vec = at::vec::Vectorized<float>;
  const Vec z = s * s;
  Vec poly(1.0f / (2 * Powers + 1));
  for (int j = Powers - 1; j >= 1; --j) poly = at::vec::fmadd(poly, z, Vec(1.0f / (2 * j + 1)));
  const Vec two_s = s + s;
  return at::vec::fmadd(two_s * z, poly, two_s);
}

template <>
inline at::vec::Vectorized<float> log1p_unit(const at::vec::Vectorized<float>& e) {
  using Vec = at::vec::Vectorized<float>;
  return two_atanh<6>(e / (e + Vec(2.0f)));
}


// log(p) and log(1 - p) (torch's log1p(-p)) of a probability p in [0, 1] (binary cross-entropy's two logs): -inf at
// p = 0 and p = 1 respectively. Only for values in [0, 1]: a NaN is not propagated, so callers check the range
// first. The AVX builds' float version is below; elsewhere ATen's log and log1p (Sleef in double on the AVX builds).
template <typename acc_t>
inline void log_and_log1m(const at::vec::Vectorized<acc_t>& p, at::vec::Vectorized<acc_t>& log_p,
                          at::vec::Vectorized<acc_t>& log_1m_p) {
  log_p = p.log();
  log_1m_p = p.neg().log1p();
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
namespace log_detail {
// x = m 2^k with m in [sqrt(1/2), sqrt(2)) for a positive normal float x (the bits of m in place of x's, k as a
// float): adding 1 - sqrt(1/2)'s bit distance moves the exponent's boundary from 1 to sqrt(1/2).
__attribute__((always_inline)) inline void split_exponent(const at::vec::Vectorized<float>& x,
                                                          at::vec::Vectorized<float>& m,
                                                          at::vec::Vectorized<float>& k) {
  constexpr int kShift = 0x3f800000 - 0x3f3504f3;
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i bits = _mm512_add_epi32(_mm512_castps_si512(x), _mm512_set1_epi32(kShift));
  k = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srai_epi32(bits, 23), _mm512_set1_epi32(127)));
  m = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_and_si512(bits, _mm512_set1_epi32(0x007fffff)),
                                           _mm512_set1_epi32(0x3f3504f3)));
#else
  const __m256i bits = _mm256_add_epi32(_mm256_castps_si256(x), _mm256_set1_epi32(kShift));
  k = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srai_epi32(bits, 23), _mm256_set1_epi32(127)));
  m = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)),
                                           _mm256_set1_epi32(0x3f3504f3)));
#endif
}

// log(x) for x in [0, 1]: k ln2 + log1p(f), f = m - 1 (exact), log1p(f) = 2 atanh(s), s = f / (2 + f) in
// [-0.172, 0.172], whose odd series falls by 34x a term: to z^5 it reaches float's rounding. Subnormal x is scaled by 2^23
// first; 0 gives -inf. About 2 ulp.
__attribute__((always_inline)) inline at::vec::Vectorized<float> log_unit(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  const Vec tiny = x < Vec(1.17549435e-38f);
  const Vec scaled = Vec::blendv(x, x * Vec(8388608.0f), tiny);
  Vec m, k;
  split_exponent(scaled, m, k);
  k = k - (tiny & Vec(23.0f));
  const Vec f = m - Vec(1.0f);
  const Vec log1p_f = two_atanh<5>(f / (f + Vec(2.0f)));
  const Vec result = at::vec::fmadd(k, Vec(exp_detail::kLn2Hi), at::vec::fmadd(k, Vec(exp_detail::kLn2Lo), log1p_f));
  return Vec::blendv(result, Vec(-std::numeric_limits<float>::infinity()), x == Vec(0.0f));
}
}  // namespace log_detail

// log(1 - p) = log(q) + e / q, q = 1 - p rounded and e = (1 - q) - p its rounding error (exact: |1| >= p): the
// first-order term restores log1p's precision for small p (p below 2^-25: q = 1 and the result is -p).
template <>
inline void log_and_log1m(const at::vec::Vectorized<float>& p, at::vec::Vectorized<float>& log_p,
                          at::vec::Vectorized<float>& log_1m_p) {
  using Vec = at::vec::Vectorized<float>;
  const Vec one(1.0f);
  const Vec q = one - p;
  const Vec rounding = (one - q) - p;
  log_p = log_detail::log_unit(p);
  log_1m_p = log_detail::log_unit(q) + rounding / at::vec::maximum(q, Vec(1.17549435e-38f));
}
#endif

}  // namespace lossops
