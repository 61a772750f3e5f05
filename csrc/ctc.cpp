// CTC loss: the alpha-beta recursion over the extended labels l' = (blank, l1, blank, ..., lS, blank) in log
// space, one sequence per thread, with the gradient formed row by row while beta runs backward in time.
//
// Conventions are torch's (aten/src/ATen/native/LossCTC.cpp): the skip s-2 -> s is allowed for odd s when
// l'(s) != l'(s-2) (a target equal to blank included, as torch does), beta_t includes the emission at t, and
// the gradient is exp(lp) - posterior (the gradient with respect to the logits of a log_softmax).
//
// Two departures from a literal transcription, neither changing the result in exact arithmetic:
// - Rows are renormalised: each stored alpha (beta) row is relative to the previous row's maximum, the offsets
//   summed in double. Raw log-alphas grow to |nll| (thousands at T = 500), where a float's ulp is ~1e-4 and the
//   posterior exp(alpha + beta + nll - lp) would inherit that error; stored values stay near |log_probs|.
// - Only the states that can lie on a complete path are computed: s <= 2t + 1 (reachable from the start) and
//   s >= L - 2(T - t) (can still reach the end); everything outside is -inf in the exact recursion too.
#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "common.h"
#include "kernel_abi.h"

namespace lossops {
namespace {
// A named namespace inside the anonymous one: the per-ISA unity build puts every family file in one
// translation unit, where two files' helpers of the same name would collide.
namespace ctc_detail {

template <typename acc_t>
using CVec = at::vec::Vectorized<acc_t>;

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// Stored rows have two -inf pads on each side, so that the shifted loads at s - 2 and s + 2 need no branch.
constexpr int64_t kPad = 2;

// log(x) for x in [1, 3], the range of a sum of three exponentials whose largest is e^0 = 1 (fast_exp(0) is exactly
// 1). x = 2^k y with y in [0.75, 1.5], log y = 2 atanh(u), u = (y - 1) / (y + 1) in [-1/7, 1/5]: five terms of the
// odd series leave a relative error below 1e-8, and y - 1 is exact, so the result is within about an ulp of the
// alpha it is added to. Sleef's general logf is a library call, with the vector registers spilled around it, in
// the recursion's innermost loop.
inline CVec<float> log_1_to_3(const CVec<float>& x) {
  using V = CVec<float>;
  const V halve = x > V(1.5f);
  const V y = V::blendv(x, x * V(0.5f), halve);
  const V k = V::blendv(V(0.0f), V(0.693147180559945309f), halve);
  const V u = (y - V(1.0f)) / (y + V(1.0f));
  const V z = u * u;
  V poly(1.0f / 9.0f);
  poly = at::vec::fmadd(poly, z, V(1.0f / 7.0f));
  poly = at::vec::fmadd(poly, z, V(1.0f / 5.0f));
  poly = at::vec::fmadd(poly, z, V(1.0f / 3.0f));
  const V two_u = u + u;
  return at::vec::fmadd(two_u * z, poly, two_u) + k;
}

// log(e^a + e^b + e^c); -inf when all three are (torch's "lamax = 0" guard against -inf - -inf).
template <typename acc_t>
inline CVec<acc_t> log_add3(const CVec<acc_t>& a, const CVec<acc_t>& b, const CVec<acc_t>& c) {
  using V = CVec<acc_t>;
  const V ninf(kNegInf<acc_t>);
  const V m = at::vec::clamp_min(at::vec::clamp_min(a, b), c);
  const V none = m == ninf;
  const V safe_m = V::blendv(m, V(acc_t(0)), none);
  const V sum = fast_exp(a - safe_m) + fast_exp(b - safe_m) + fast_exp(c - safe_m);
  if constexpr (std::is_same_v<acc_t, float>) {
    return V::blendv(safe_m + log_1_to_3(sum), ninf, none);
  } else {
    // double keeps Sleef's 1-ulp log: a float64 gradcheck compares against torch's std::log.
    return safe_m + sum.log();
  }
}

template <int kWrite, typename T>
inline void prefetch_row(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < n * int64_t(sizeof(T)); off += 64) __builtin_prefetch(bytes + off, kWrite, 3);
}

// Lane reductions through memory, in lane order (at::vec::vec_reduce_all takes the vector by value, which the
// baseline build's GCC flags with a -Wpsabi note).
template <typename acc_t>
inline acc_t vec_sum(const CVec<acc_t>& v) {
  alignas(64) acc_t lanes[CVec<acc_t>::size()];
  v.store(lanes);
  acc_t total = lanes[0];
  for (int64_t j = 1; j < CVec<acc_t>::size(); ++j) total += lanes[j];
  return total;
}

template <typename acc_t>
inline acc_t vec_max(const CVec<acc_t>& v) {
  alignas(64) acc_t lanes[CVec<acc_t>::size()];
  v.store(lanes);
  acc_t m = lanes[0];
  for (int64_t j = 1; j < CVec<acc_t>::size(); ++j) m = std::max(m, lanes[j]);
  return m;
}

// The offset subtracted from the next row: the row's maximum, or 0 for a row with no finite state (or a NaN),
// which must not turn -inf into NaN.
template <typename acc_t>
inline acc_t row_shift(acc_t row_max) {
  return row_max > kNegInf<acc_t> && row_max < std::numeric_limits<acc_t>::infinity() ? row_max : acc_t(0);
}

template <typename scalar_t>
struct Problem {
  using acc_t = opmath_t<scalar_t>;
  const scalar_t* log_probs;
  int64_t stride_t, stride_n, stride_c;
  int64_t T, N, C;
  const int64_t* targets;
  const int64_t* target_offsets;
  const int64_t* input_lengths;
  const int64_t* target_lengths;
  int64_t blank;
  bool zero_infinity;
  scalar_t* grad;  // nullptr: forward only
  const acc_t* grad_scale;
  int64_t grad_scale_stride;
  acc_t* nll;
};

template <typename acc_t>
struct Workspace {
  std::vector<acc_t> values;
  std::vector<int64_t> labels;
  std::vector<double> offsets;
};

template <typename acc_t>
Workspace<acc_t>& thread_workspace() {
  static thread_local Workspace<acc_t> ws;
  return ws;
}

// Above this many values a thread's workspace is freed after the call instead of kept for the next one.
constexpr size_t kKeepWorkspaceValues = size_t(1) << 22;

template <typename scalar_t>
void fill_rows(const Problem<scalar_t>& p, int64_t n, int64_t t_begin, int64_t t_end, scalar_t value) {
  for (int64_t t = t_begin; t < t_end; ++t) {
    scalar_t* row = p.grad + (t * p.N + n) * p.C;
    std::fill(row, row + p.C, value);
  }
}

// torch's result for a sequence that admits no alignment, or has an empty input: written here, and true, so that
// no recursion runs on it.
template <typename scalar_t>
bool settle_without_alignment(const Problem<scalar_t>& p, int64_t n, int64_t T, int64_t S, const int64_t* tg) {
  using acc_t = opmath_t<scalar_t>;
  // A path emits every label and a blank between two equal ones: fewer frames than that admit no alignment.
  int64_t repeats = 0;
  for (int64_t k = 1; k < S; ++k) repeats += tg[k] == tg[k - 1];
  if (T != 0 && T >= S + repeats) return false;
  const bool want_grad = p.grad != nullptr;
  // torch: log-likelihood 0 for an empty input and target (so nll is -0.0), else -inf.
  const bool possible = T == 0 && S == 0;
  if (possible || p.zero_infinity) {
    p.nll[n] = possible ? -acc_t(0) : acc_t(0);
    if (want_grad) fill_rows<scalar_t>(p, n, 0, T, scalar_t(0));
  } else {
    p.nll[n] = std::numeric_limits<acc_t>::infinity();
    // torch's gradient is exp(lp) - exp(-inf + inf - lp) there: NaN on every frame of the input.
    if (want_grad) fill_rows<scalar_t>(p, n, 0, T, std::numeric_limits<scalar_t>::quiet_NaN());
  }
  return true;
}

// Consecutive frames of a sequence are N * C elements apart (and backward walks down in time), beyond what the
// hardware prefetcher follows: asking for frames kAhead steps early removes the stalls on the emission loads
// and on the rows read for the gradient.
constexpr int64_t kAhead = 4;

// One sequence's lattice: its extended labels, the states that can lie on a complete path at each frame
// (lo_of(t) to hi_of(t)), the workspace rows the two recursions share, and the recursions' phases. The phases
// are always inlined into ctc_sequence: their loops then compile as one function's, with the lattice's pointers
// and sizes in registers rather than read through `this`.
#define LOSSOPS_CTC_PHASE __attribute__((always_inline)) inline
template <typename scalar_t>
struct Lattice {
  using acc_t = opmath_t<scalar_t>;
  using V = CVec<acc_t>;
  static constexpr int64_t W = V::size();
  static constexpr acc_t ninf = kNegInf<acc_t>;

  const Problem<scalar_t>& p;
  int64_t n, T, S, L, Lp, C;
  const int64_t* tg;
  bool want_grad;
  const scalar_t* lp_n;
  bool whole_rows;  // emissions prefetched as whole rows, else only at the target's classes
  acc_t *alpha, *beta0, *beta1, *row_buffer, *class_grad;
  acc_t* skip;        // 0 where the skip into s (from s - 2) is allowed, -inf elsewhere
  acc_t* emit;        // lp[t, l'(s)]
  acc_t* post;        // posterior of state s at t
  acc_t* class_post;  // posterior summed per class; all zero between frames
  int64_t *ext, *ext_offset;
  double* alpha_offset;

  LOSSOPS_CTC_PHASE Lattice(const Problem<scalar_t>& problem, int64_t seq, Workspace<acc_t>& ws)
      : p(problem), n(seq) {
    T = p.input_lengths[n];
    S = p.target_lengths[n];
    L = 2 * S + 1;
    C = p.C;
    tg = p.targets + p.target_offsets[n];
    want_grad = p.grad != nullptr;
    Lp = L + 2 * kPad;
    const int64_t alpha_rows = want_grad ? T : 2;
    const size_t need = size_t(alpha_rows * Lp + 5 * Lp + (want_grad ? 3 * C : 0));
    if (ws.values.size() < need) ws.values.resize(need);
    if (ws.labels.size() < size_t(2 * L)) ws.labels.resize(2 * L);
    if (want_grad && ws.offsets.size() < size_t(T)) ws.offsets.resize(T);

    alpha = ws.values.data();
    beta0 = alpha + alpha_rows * Lp + kPad;
    beta1 = beta0 + Lp;
    skip = beta1 + Lp;
    emit = skip + Lp;
    post = emit + Lp;
    row_buffer = post + Lp - kPad;
    class_grad = row_buffer + C;
    class_post = class_grad + C;
    ext = ws.labels.data();
    ext_offset = ext + L;
    alpha_offset = ws.offsets.data();

    for (int64_t s = 0; s < L; ++s) ext[s] = (s & 1) ? tg[s >> 1] : p.blank;
    for (int64_t s = 0; s < L; ++s) ext_offset[s] = ext[s] * p.stride_c;
    for (int64_t s = -kPad; s < L + kPad; ++s) skip[s] = ninf;
    for (int64_t s = 3; s < L; s += 2) {
      if (ext[s] != ext[s - 2]) skip[s] = acc_t(0);
    }
    lp_n = p.log_probs + n * p.stride_n;
    whole_rows = p.stride_c == 1 && C * int64_t(sizeof(scalar_t)) <= 512;
  }

  acc_t* alpha_row(int64_t t) const { return alpha + (want_grad ? t : (t & 1)) * Lp + kPad; }
  int64_t lo_of(int64_t t) const { return std::max<int64_t>(0, L - 2 * (T - t)); }
  int64_t hi_of(int64_t t) const { return std::min<int64_t>(L - 1, 2 * t + 1); }

  // Short rows are fetched whole, long ones only at the target's classes.
  void prefetch_emissions(int64_t t) const {
    const scalar_t* row = lp_n + t * p.stride_t;
    if (whole_rows) {
      prefetch_row<0>(row, C);
    } else {
      __builtin_prefetch(row + p.blank * p.stride_c, 0, 3);
      for (int64_t k = 0; k < S; ++k) __builtin_prefetch(row + tg[k] * p.stride_c, 0, 3);
    }
  }
  // Backward reads frame t's log-probabilities and writes its gradient row.
  void prefetch_frame(int64_t t) const {
    if (p.stride_c == 1) prefetch_row<0>(lp_n + t * p.stride_t, C);
    prefetch_row<1>(p.grad + (t * p.N + n) * C, C);
  }

  // Forward: stored row t is alpha_t - K_t, K_t = sum of the shifts of rows 0..t-1. Returns K_{T-1}.
  LOSSOPS_CTC_PHASE double alpha_recursion() const {
    for (int64_t t = 0; t < std::min(kAhead, T); ++t) prefetch_emissions(t);
    double K = 0.0;
    acc_t prev_max;
    {
      acc_t* row = alpha_row(0);
      const int64_t lo = lo_of(0), hi = hi_of(0);
      row[-2] = row[-1] = ninf;
      prev_max = ninf;
      for (int64_t s = lo; s <= hi; ++s) {
        row[s] = static_cast<acc_t>(lp_n[ext_offset[s]]);
        prev_max = std::max(prev_max, row[s]);
      }
      row[hi + 1] = row[hi + 2] = ninf;
      if (want_grad) alpha_offset[0] = 0.0;
    }
    for (int64_t t = 1; t < T; ++t) {
      if (t + kAhead < T) prefetch_emissions(t + kAhead);
      const acc_t* prev = alpha_row(t - 1);
      acc_t* cur = alpha_row(t);
      const int64_t lo = lo_of(t), hi = hi_of(t);
      const scalar_t* lp_t = lp_n + t * p.stride_t;
      for (int64_t s = lo; s <= hi; ++s) emit[s] = static_cast<acc_t>(lp_t[ext_offset[s]]);
      const acc_t shift = row_shift(prev_max);
      K += shift;
      if (want_grad) alpha_offset[t] = K;
      const V vshift(shift), vninf(ninf);
      V vmax(ninf);
      for (int64_t s = lo; s <= hi; s += W) {
        const int64_t cnt = std::min<int64_t>(W, hi + 1 - s);
        const V a1 = V::loadu(prev + s, cnt);
        const V a2 = V::loadu(prev + s - 1, cnt);
        const V a3 = V::loadu(prev + s - 2, cnt) + V::loadu(skip + s, cnt);
        const V v = log_add3(a1, a2, a3) + (V::loadu(emit + s, cnt) - vshift);
        v.store(cur + s, cnt);
        vmax = at::vec::clamp_min(vmax, cnt == W ? v : V::set(vninf, v, cnt));
      }
      cur[-2] = cur[-1] = ninf;
      cur[hi + 1] = cur[hi + 2] = ninf;
      prev_max = vec_max(vmax);
    }
    return K;
  }

  // The log-likelihood from the last alpha row (stored relative to K): a path ends in the last label or the
  // final blank.
  LOSSOPS_CTC_PHASE double log_likelihood(double K) const {
    const acc_t* last = alpha_row(T - 1);
    if (S == 0) return static_cast<double>(last[0]) + K;
    const acc_t l1 = last[L - 1], l2 = last[L - 2];
    acc_t m = std::max(l1, l2);
    if (m == ninf) m = 0;
    return static_cast<double>(std::log(std::exp(l1 - m) + std::exp(l2 - m)) + m) + K;
  }

  // Backward: stored row t is beta_t - J_t; the posterior of s at t is exp(alpha_t + beta_t + nll - lp[t, l'(s)]).
  // Each frame's gradient row is written as soon as its beta row is known, while the frame is in cache.
  LOSSOPS_CTC_PHASE void beta_and_gradient(double nll) const {
    const acc_t scale = p.grad_scale[n * p.grad_scale_stride];
    beta0[L] = beta0[L + 1] = beta1[L] = beta1[L + 1] = ninf;
    std::fill(class_post, class_post + C, acc_t(0));
    V even_lanes, odd_lanes;
    {
      acc_t parity[W];
      for (int64_t j = 0; j < W; ++j) parity[j] = acc_t(j & 1);
      odd_lanes = V::loadu(parity) == V(acc_t(1));
      even_lanes = V::loadu(parity) == V(acc_t(0));
    }
    double J = 0.0;
    acc_t next_max = ninf;
    for (int64_t t = T - 1; t >= std::max<int64_t>(0, T - kAhead); --t) prefetch_frame(t);
    for (int64_t t = T - 1; t >= 0; --t) {
      if (t >= kAhead) prefetch_frame(t - kAhead);
      acc_t* cur = (t & 1) ? beta1 : beta0;
      const acc_t* next = (t & 1) ? beta0 : beta1;
      const acc_t* row = read_block<scalar_t>(lp_n + t * p.stride_t, p.stride_c, C, row_buffer);
      next_max = beta_row(t, row, cur, next, next_max, J);
      const V blank_lanes = (lo_of(t) & 1) ? odd_lanes : even_lanes;
      frame_posteriors(t, cur, static_cast<acc_t>(alpha_offset[t] + J + nll), blank_lanes);
      frame_gradient(t, row, scale);
    }
  }

  // Row t of beta into cur (relative to J_t, which it adds this row's shift to) from row t + 1 in next, whose
  // maximum is next_max; gathers frame t's emissions (from its log-probabilities in row) into emit on the way.
  // Returns row t's maximum.
  LOSSOPS_CTC_PHASE acc_t beta_row(int64_t t, const acc_t* row, acc_t* cur, const acc_t* next, acc_t next_max,
                                   double& J) const {
    const int64_t lo = lo_of(t), hi = hi_of(t);
    for (int64_t s = lo; s <= hi; ++s) emit[s] = row[ext[s]];
    const V vninf(ninf);
    V vmax(ninf);
    if (t == T - 1) {
      for (int64_t s = lo; s <= hi; ++s) cur[s] = s >= L - 2 ? emit[s] : ninf;
      for (int64_t s = lo; s <= hi; ++s) next_max = std::max(next_max, cur[s]);
      vmax = V(next_max);
    } else {
      const acc_t shift = row_shift(next_max);
      J += shift;
      const V vshift(shift);
      for (int64_t s = lo; s <= hi; s += W) {
        const int64_t cnt = std::min<int64_t>(W, hi + 1 - s);
        const V b1 = V::loadu(next + s, cnt);
        const V b2 = V::loadu(next + s + 1, cnt);
        const V b3 = V::loadu(next + s + 2, cnt) + V::loadu(skip + s + 2, cnt);
        const V v = log_add3(b1, b2, b3) + (V::loadu(emit + s, cnt) - vshift);
        v.store(cur + s, cnt);
        vmax = at::vec::clamp_min(vmax, cnt == W ? v : V::set(vninf, v, cnt));
      }
    }
    cur[lo - 1] = cur[lo - 2] = ninf;
    return vec_max(vmax);
  }

  // The posteriors of frame t's states (beta_t in cur, `offset` = K_t + J_t + nll) into post, and summed per
  // class into class_post. blank_lanes: the lanes of a vector starting at lo_of(t) that hold blank states.
  LOSSOPS_CTC_PHASE void frame_posteriors(int64_t t, const acc_t* cur, acc_t offset, const V& blank_lanes) const {
    const int64_t lo = lo_of(t), hi = hi_of(t);
    const V zero(acc_t(0)), vninf(ninf), voffset(offset);
    // The blank states (even s) are summed in vector lanes: scattered one by one, every other s would be added
    // into the same class_post[blank], a chain of store-to-load dependencies.
    const acc_t* a = alpha_row(t);
    V blank_sum(acc_t(0));
    for (int64_t s = lo; s <= hi; s += W) {
      const int64_t cnt = std::min<int64_t>(W, hi + 1 - s);
      const V e = V::loadu(emit + s, cnt);
      const V arg = V::loadu(a + s, cnt) + V::loadu(cur + s, cnt) - e + voffset;
      // A label whose log-probability is -inf at t: alpha and beta both carry that -inf and arg is -inf + inf,
      // NaN. The posterior alpha * beta / y vanishes with y, so its limit is 0 and the gradient there
      // exp(-inf) - 0 = 0 (torch returns NaN, which log_softmax's backward spreads over the whole frame).
      V post_s = V::blendv(fast_exp(arg), zero, e == vninf);
      post_s.store(post + s, cnt);
      if (cnt < W) post_s = V::set(zero, post_s, cnt);
      blank_sum = blank_sum + V::blendv(zero, post_s, blank_lanes);
    }
    for (int64_t s = lo | 1; s <= hi; s += 2) class_post[ext[s]] += post[s];
    class_post[p.blank] += vec_sum(blank_sum);
  }

  // Frame t's gradient row, scale * (exp(lp) - the posterior summed per class), from its log-probabilities in
  // row; leaves class_post all zero for the next frame.
  LOSSOPS_CTC_PHASE void frame_gradient(int64_t t, const acc_t* row, acc_t scale) const {
    scalar_t* out = p.grad + (t * p.N + n) * C;
    acc_t* g = class_grad;
    if constexpr (std::is_same_v<scalar_t, acc_t>) g = out;
    int64_t c = 0;
    for (; c + W <= C; c += W) fast_exp(V::loadu(row + c)).store(g + c);
    if (c < C) fast_exp(V::loadu(row + c, C - c)).store(g + c, C - c);
    // Classes of the target: subtract their posterior once (a class's sum is cleared at its first occurrence).
    for (int64_t s = lo_of(t) | 1; s <= hi_of(t); s += 2) {
      const int64_t k = ext[s];
      g[k] -= class_post[k];
      class_post[k] = acc_t(0);
    }
    g[p.blank] -= class_post[p.blank];
    class_post[p.blank] = acc_t(0);
    const V vscale(scale);
    for (c = 0; c + W <= C; c += W) (V::loadu(g + c) * vscale).store(g + c);
    for (; c < C; ++c) g[c] *= scale;
    if constexpr (!std::is_same_v<scalar_t, acc_t>) write_block<scalar_t>(g, out, 1, C);
  }
};
#undef LOSSOPS_CTC_PHASE

// Sequence n's nll and, when a gradient is asked for, its gradient rows (zero for frames past its input length).
template <typename scalar_t>
void ctc_sequence(const Problem<scalar_t>& p, int64_t n, Workspace<opmath_t<scalar_t>>& ws) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t T = p.input_lengths[n];
  const bool want_grad = p.grad != nullptr;
  if (want_grad) fill_rows<scalar_t>(p, n, T, p.T, scalar_t(0));
  if (settle_without_alignment(p, n, T, p.target_lengths[n], p.targets + p.target_offsets[n])) return;

  const Lattice<scalar_t> lattice(p, n, ws);
  const double nll = -lattice.log_likelihood(lattice.alpha_recursion());
  // Tested in the accumulation type: a float nll that overflows is infinite for zero_infinity, as in torch.
  if (static_cast<acc_t>(nll) == std::numeric_limits<acc_t>::infinity()) {
    p.nll[n] = p.zero_infinity ? acc_t(0) : std::numeric_limits<acc_t>::infinity();
    if (want_grad) {
      fill_rows<scalar_t>(p, n, 0, T, p.zero_infinity ? scalar_t(0) : std::numeric_limits<scalar_t>::quiet_NaN());
    }
    return;
  }
  p.nll[n] = static_cast<acc_t>(nll);
  if (want_grad) lattice.beta_and_gradient(nll);
}

template <typename scalar_t>
void ctc_batch(const Problem<scalar_t>& problem) {
  using acc_t = opmath_t<scalar_t>;
  // Grain 1: one sequence is one task, computed start to end by one thread, so the results do not depend on the
  // thread count.
  at::parallel_for(0, problem.N, 1, [&](int64_t begin, int64_t end) {
    Workspace<acc_t>& ws = thread_workspace<acc_t>();
    for (int64_t n = begin; n < end; ++n) ctc_sequence<scalar_t>(problem, n, ws);
    if (ws.values.capacity() > kKeepWorkspaceValues) ws.values = std::vector<acc_t>();
  });
}

void check_index_tensor(const at::Tensor& t, const char* name, int64_t N) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.is_contiguous(),
              "lossops: ctc_loss: ", name, " must be a contiguous int64 CPU tensor, got ", t.scalar_type(), " on ",
              t.device());
  if (N >= 0) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) == N, "lossops: ctc_loss: ", name, " must have shape (", N, "), got ",
                t.sizes());
  }
}

}  // namespace ctc_detail
}  // namespace

// CTC loss (torch.nn.functional.ctc_loss semantics, reduction="none"), forward and, when `grad` is given, the
// gradient in the same call.
//
// log_probs: (T, N, C), any strides; float, double, bfloat16 or half.
// targets: int64, contiguous, flat; sequence n's labels are targets[target_offsets[n] + k], k < target_lengths[n]
//   (a padded (N, S) tensor flattened with offsets n * S, or the concatenated 1-D form with offsets = exclusive
//   cumsum of target_lengths).
// target_offsets, input_lengths, target_lengths: int64, contiguous, (N,).
// grad: when given, a contiguous (T, N, C) tensor of log_probs' dtype, not aliasing log_probs. Every element is
//   written: grad_scale[n] times torch's CTC gradient (exp(log_probs) - posterior, the gradient with respect to
//   the logits of a log_softmax), zero for t >= input_lengths[n].
// grad_scale: (N,) in the opmath dtype (float; double for double inputs); read only when grad is given.
// zero_infinity: sequences with no possible alignment get nll 0 and a zero gradient.
// Returns {nll (N,) in the opmath dtype}.
std::vector<at::Tensor> ctc_loss_forward(const at::Tensor& log_probs, const at::Tensor& targets,
                                         const at::Tensor& target_offsets, const at::Tensor& input_lengths,
                                         const at::Tensor& target_lengths, int64_t blank, bool zero_infinity,
                                         const std::optional<at::Tensor>& grad, const at::Tensor& grad_scale) {
  using namespace ctc_detail;
  TORCH_CHECK(log_probs.device().is_cpu() && log_probs.dim() == 3,
              "lossops: ctc_loss: log_probs must be a (T, N, C) CPU tensor, got ", log_probs.sizes(), " on ",
              log_probs.device());
  const int64_t T = log_probs.size(0), N = log_probs.size(1), C = log_probs.size(2);
  TORCH_CHECK(C > 0, "lossops: ctc_loss: log_probs needs at least one class");
  TORCH_CHECK(blank >= 0 && blank < C, "lossops: ctc_loss: blank ", blank, " is out of bounds for ", C, " classes");
  check_index_tensor(targets, "targets", -1);
  check_index_tensor(target_offsets, "target_offsets", N);
  check_index_tensor(input_lengths, "input_lengths", N);
  check_index_tensor(target_lengths, "target_lengths", N);
  const bool is_double = log_probs.scalar_type() == at::kDouble;
  const at::ScalarType acc_type = is_double ? at::kDouble : at::kFloat;

  // Everything the kernel indexes with is checked here, before any thread starts: the Python side validates
  // too, but a kernel reached another way must still not read outside its tensors.
  const int64_t* il = input_lengths.const_data_ptr<int64_t>();
  const int64_t* tl = target_lengths.const_data_ptr<int64_t>();
  const int64_t* to = target_offsets.const_data_ptr<int64_t>();
  const int64_t* tg = targets.const_data_ptr<int64_t>();
  const int64_t num_targets = targets.numel();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(il[n] >= 0 && il[n] <= T, "lossops: ctc_loss: input_lengths[", n, "] = ", il[n],
                " is out of bounds for log_probs with ", T, " frames");
    TORCH_CHECK(tl[n] >= 0 && to[n] >= 0 && tl[n] <= num_targets && to[n] <= num_targets - tl[n],
                "lossops: ctc_loss: sequence ", n, "'s targets (offset ", to[n], ", length ", tl[n],
                ") lie outside the targets tensor of ", num_targets, " elements");
    for (int64_t k = 0; k < tl[n]; ++k) {
      const int64_t v = tg[to[n] + k];
      TORCH_CHECK_INDEX(v >= 0 && v < C, "lossops: targets value ", v, " at sequence ", n, " position ", k,
                        " is out of bounds for ", C, " classes");
    }
  }
  if (grad.has_value()) {
    const at::Tensor& g = *grad;
    TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == log_probs.scalar_type() && g.is_contiguous() &&
                    g.sizes() == log_probs.sizes(),
                "lossops: ctc_loss: grad must be a contiguous CPU tensor of log_probs' shape ", log_probs.sizes(),
                " and dtype ", log_probs.scalar_type(), ", got ", g.sizes(), " ", g.scalar_type());
    TORCH_CHECK(grad_scale.device().is_cpu() && grad_scale.scalar_type() == acc_type && grad_scale.dim() == 1 &&
                    grad_scale.size(0) == N,
                "lossops: ctc_loss: grad_scale must be a (", N, ") ", acc_type, " CPU tensor, got ",
                grad_scale.sizes(), " ", grad_scale.scalar_type());
  }

  at::Tensor nll = new_cpu_tensor({N}, acc_type);
  LOSSOPS_DISPATCH_FLOATING(log_probs.scalar_type(), "lossops_ctc_loss", [&] {
    using acc_t = opmath_t<scalar_t>;
    Problem<scalar_t> problem{};
    problem.log_probs = log_probs.const_data_ptr<scalar_t>();
    problem.stride_t = log_probs.stride(0);
    problem.stride_n = log_probs.stride(1);
    problem.stride_c = log_probs.stride(2);
    problem.T = T;
    problem.N = N;
    problem.C = C;
    problem.targets = tg;
    problem.target_offsets = to;
    problem.input_lengths = il;
    problem.target_lengths = tl;
    problem.blank = blank;
    problem.zero_infinity = zero_infinity;
    problem.grad = grad.has_value() ? grad->mutable_data_ptr<scalar_t>() : nullptr;
    problem.grad_scale = grad.has_value() ? grad_scale.const_data_ptr<acc_t>() : nullptr;
    problem.grad_scale_stride = grad.has_value() ? grad_scale.stride(0) : 0;
    problem.nll = nll.mutable_data_ptr<acc_t>();
    ctc_batch<scalar_t>(problem);
  });
  return {nll};
}

namespace {
namespace ctc_detail {
std::vector<at::Tensor> ctc_loss_kernel(const KernelArgs& a) {
  return ctc_loss_forward(a.tensor("log_probs"), a.tensor("targets"), a.tensor("target_offsets"),
                          a.tensor("input_lengths"), a.tensor("target_lengths"), a.integer("blank"),
                          a.flag("zero_infinity"), a.optional_tensor("grad"), a.tensor("grad_scale"));
}
}  // namespace ctc_detail
}  // namespace

LOSSOPS_REGISTER_KERNEL("ctc_loss", ctc_detail::ctc_loss_kernel, "log_probs", "targets",
                        "target_offsets", "input_lengths", "target_lengths", "blank", "zero_infinity", "grad",
                        "grad_scale");

}  // namespace lossops
