// Vectorised math for the loss formulas: softcap, a faster exp, log1p on [0, 1].
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <cstdint>

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

}  // namespace lossops
