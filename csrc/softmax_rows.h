// The softmax row math the row kernels share: the cross-entropy row driver (cross_entropy.cpp), the
// vocabulary-parallel shard kernels (vocab_parallel.cpp) and the token statistics (token_stats.cpp). One row's
// online max and sum of exponentials (block_max, BlockStats, row_statistics), what the row contributes to the
// loss (row_coefficients), its gradient (RowGradient, write_row_gradient), and the class-index range check that
// the row driver and the token statistics run before reading any row.
//
// Every row's gradient has the form  grad_c = scale * (A * p_c - q_c) * softcap'(c)  where p = softmax,
// q is the (weighted, smoothed) target distribution and A = sum(q) + 2 * z_loss * lse; softmax focal
// changes only A and q_y (see row_coefficients).
//
// In the anonymous namespace, as the kernel files are: the per-ISA unity build includes this header once into
// each instruction set's translation unit, and each kernel library keeps its own copy.
#pragma once

#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "kernel_abi.h"

namespace lossops {
namespace {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

// Four independent max chains: with one, each vector waits for the previous vmaxps and the max pass took a
// quarter of the kernel's time. clamp_min is a plain vmaxps; unlike at::vec::maximum it need not propagate
// NaN here, because exp(NaN - max) makes the row's sum NaN anyway (BlockStats::add covers an all -inf block).
template <typename acc_t>
inline acc_t block_max(const acc_t* x, int64_t n) {
  constexpr int64_t W = Vec<acc_t>::size();
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  Vec<acc_t> m0(lowest), m1(lowest), m2(lowest), m3(lowest);
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    m0 = at::vec::clamp_min(Vec<acc_t>::loadu(x + i), m0);
    m1 = at::vec::clamp_min(Vec<acc_t>::loadu(x + i + W), m1);
    m2 = at::vec::clamp_min(Vec<acc_t>::loadu(x + i + 2 * W), m2);
    m3 = at::vec::clamp_min(Vec<acc_t>::loadu(x + i + 3 * W), m3);
  }
  for (; i + W <= n; i += W) m0 = at::vec::clamp_min(Vec<acc_t>::loadu(x + i), m0);
  const Vec<acc_t> m = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  acc_t result = at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return at::vec::maximum(a, b); }, m);
  for (; i < n; ++i) result = std::isnan(x[i]) ? x[i] : std::max(result, x[i]);
  return result;
}

// exp(x[i] - ref) for a block of n logits into exp_out, and their sum. The one definition of a cached exponential:
// the statistics pass stores them, and a gradient resumed from saved statistics (block_exponentials_or_zero) makes
// the same bits again from the same ref.
template <typename acc_t>
inline acc_t block_exponentials(const acc_t* x, int64_t n, acc_t ref, acc_t* exp_out) {
  constexpr int64_t W = Vec<acc_t>::size();
  const Vec<acc_t> m(ref);
  Vec<acc_t> acc(acc_t(0));
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    Vec<acc_t> e[4];
    for (int k = 0; k < 4; ++k) e[k] = Vec<acc_t>::loadu(x + i + k * W) - m;
    fast_exp_batch<4>(e);
    for (int k = 0; k < 4; ++k) {
      e[k].store(exp_out + i + k * W);
      acc = acc + e[k];
    }
  }
  for (; i + W <= n; i += W) {
    const Vec<acc_t> e = fast_exp(Vec<acc_t>::loadu(x + i) - m);
    e.store(exp_out + i);
    acc = acc + e;
  }
  acc_t total = at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, acc);
  for (; i < n; ++i) total += (exp_out[i] = std::exp(x[i] - ref));
  return total;
}

// A block's cached exponentials against the ref BlockStats::add returned for it: zeros while the row's max was
// still -inf, as add() stores them.
template <typename acc_t>
inline void block_exponentials_or_zero(const acc_t* x, int64_t n, acc_t ref, acc_t* exp_out) {
  if (ref == -std::numeric_limits<acc_t>::infinity()) std::fill(exp_out, exp_out + n, acc_t(0));
  else block_exponentials(x, n, ref, exp_out);
}

template <typename acc_t>
struct BlockStats {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum_exp = 0;
  bool nan_seen = false;

  // Online softmax at block granularity: one max and one exp per element. When exp_out is given the
  // block's exponentials are kept there; the return value is the max they are relative to.
  acc_t add(const acc_t* x, int64_t n, acc_t* exp_out = nullptr) {
    const acc_t bmax = block_max(x, n);
    if (bmax > max || std::isnan(bmax)) {  // a NaN logit makes the whole row NaN, as in torch
      sum_exp = max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : sum_exp * std::exp(max - bmax);
      max = bmax;
    }
    if (max == -std::numeric_limits<acc_t>::infinity()) {  // all -inf so far: contributes exp(-inf) = 0
      if (exp_out) std::fill(exp_out, exp_out + n, acc_t(0));
      // ...unless the block holds a NaN that block_max did not report (the max of -inf and NaN lanes).
      nan_seen = nan_seen || std::any_of(x, x + n, [](acc_t v) { return std::isnan(v); });
      return max;
    }
    const Vec<acc_t> m(max);
    constexpr int64_t W = Vec<acc_t>::size();
    // Four vectors' exponentials at a time (fast_exp_batch), each path summing in the order it always has.
    if (exp_out) {
      sum_exp += block_exponentials(x, n, max, exp_out);
    } else if (n < W) {
      sum_exp += at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; },
                                                fast_exp(Vec<acc_t>::loadu(x, n) - m), n);
    } else {
      // at::vec::map_reduce_all's order: the first vector, then each next one added, the partial tail last.
      Vec<acc_t> acc = fast_exp(Vec<acc_t>::loadu(x) - m);
      int64_t i = W;
      const int64_t full = n - n % W;
      for (; i + 4 * W <= full; i += 4 * W) {
        Vec<acc_t> e[4];
        for (int k = 0; k < 4; ++k) e[k] = Vec<acc_t>::loadu(x + i + k * W) - m;
        fast_exp_batch<4>(e);
        for (int k = 0; k < 4; ++k) acc = acc + e[k];
      }
      for (; i < full; i += W) acc = acc + fast_exp(Vec<acc_t>::loadu(x + i) - m);
      if (i < n) acc = Vec<acc_t>::set(acc, acc + fast_exp(Vec<acc_t>::loadu(x + i, n - i) - m), n - i);
      sum_exp += at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, acc);
    }
    return max;
  }
  acc_t sum_exp_or_nan() const { return nan_seen ? std::numeric_limits<acc_t>::quiet_NaN() : sum_exp; }
  acc_t log_sum() const { return nan_seen ? std::numeric_limits<acc_t>::quiet_NaN() : std::log(sum_exp); }
  acc_t lse() const { return max + log_sum(); }
};

// sum_i x_i * w[b0 + i] (w = 1 when null): the smoothing term's dot product.
template <typename acc_t>
inline acc_t weighted_sum(const acc_t* x, const acc_t* w, int64_t b0, int64_t n) {
  return w ? vec_dot(x, w + b0, n) : vec_sum(x, n);
}

template <typename acc_t>
inline acc_t softcap_derivative(acc_t capped, acc_t cap) {
  const acc_t t = capped / cap;
  return acc_t(1) - t * t;
}

// One row's logits, any stride, in the opmath type and soft-capped when `capped`.
template <typename scalar_t>
struct RowLogits {
  using acc_t = opmath_t<scalar_t>;
  const scalar_t* x;
  int64_t stride;
  bool capped;
  acc_t cap;
  acc_t* buf;  // kBlock values

  // Classes [b0, b0 + n), n <= kBlock: read where they lie when they already are contiguous opmath values and
  // need no cap, else widened (and capped) into buf.
  const acc_t* block(int64_t b0, int64_t n) const {
    const acc_t* xb = read_block(x + b0 * stride, stride, n, buf, capped);
    if (capped) apply_softcap(buf, n, cap);
    return xb;
  }
  acc_t at(int64_t c) const {
    const acc_t v = static_cast<acc_t>(x[c * stride]);
    return capped ? cap * std::tanh(v / cap) : v;
  }
};

// The row statistics pass: the online max and sum of exponentials of a row's C logits, block by block
// (load(b0, n) gives each block). When exp_cache is given the exponentials are made there, block b's relative
// to block_ref[b], and summed in that path's order: kept for the whole row (whole_row), or each block's over the
// last's in a one-block scratch, for the same sums without a row of stores. on_block(b0, n, xb) sees every block
// while it is in cache, for the sums the caller needs.
template <typename acc_t, typename LoadBlock, typename OnBlock>
inline BlockStats<acc_t> row_statistics(int64_t C, const LoadBlock& load, acc_t* exp_cache, bool whole_row,
                                        acc_t* block_ref, const OnBlock& on_block) {
  BlockStats<acc_t> stats;
  for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
    const int64_t n = std::min(kBlock, C - b0);
    const acc_t* xb = load(b0, n);
    const acc_t ref = stats.add(xb, n, exp_cache ? exp_cache + (whole_row ? b0 : 0) : nullptr);
    if (exp_cache) block_ref[b0 / kBlock] = ref;
    on_block(b0, n, xb);
  }
  return stats;
}

// What a row contributes, from its statistics: loss, A (the coefficient of softmax in the gradient) and
// the one-hot coefficient (the part of q at the target class beyond the smoothing term).
template <typename acc_t>
struct RowResult {
  acc_t loss, softmax_coef, onehot_coef;
};

template <typename acc_t>
inline RowResult<acc_t> row_coefficients(const CrossEntropyOptions& o, acc_t lse, acc_t logp_target, acc_t w_target,
                                         acc_t smooth_dot, acc_t weight_sum, int64_t C) {
  if (o.focal_gamma >= 0) {
    // Softmax focal: L = -a q^g log p_y with q = 1 - p_y; dL/dz = A (p - onehot), A = a q^g (1 + g p_y r),
    // r = -log(p_y) / q (-> 1 as q -> 0). No negative power of q appears, so every gamma >= 0 is finite.
    const acc_t logp = logp_target;
    const acc_t p = std::exp(logp);
    const acc_t q = -std::expm1(logp);
    const acc_t qg = std::pow(q, static_cast<acc_t>(o.focal_gamma));
    const acc_t r = q > 0 ? -logp / q : acc_t(1);
    const acc_t a = w_target * qg * (acc_t(1) + static_cast<acc_t>(o.focal_gamma) * p * r);
    return {-w_target * qg * logp, a, a};
  }
  const acc_t eps = static_cast<acc_t>(o.label_smoothing);
  const acc_t z = static_cast<acc_t>(o.lse_square_scale);
  const acc_t smooth = eps / static_cast<acc_t>(C);
  acc_t loss = -(acc_t(1) - eps) * w_target * logp_target;
  if (eps > 0) loss += smooth * (weight_sum * lse - smooth_dot);
  loss += z * lse * lse;
  // Without smoothing the weights of other classes play no part: a non-finite weight of a class no row
  // targets must not reach the gradient through 0 * weight_sum.
  const acc_t a = (acc_t(1) - eps) * w_target + (eps > 0 ? smooth * weight_sum : acc_t(0)) + acc_t(2) * z * lse;
  return {loss, a, (acc_t(1) - eps) * w_target};
}

// One row's gradient, grad_c = scale * (A p_c - q_c) * softcap'(x_c) with p_c = exp((x_c - max) - log_sum),
// q_c = smooth * w_c for class indices (when `smoothing`) or the given target distribution, and at the target
// class y the one-hot coefficient c as well.
template <typename acc_t>
struct RowGradient {
  acc_t max, log_sum;
  acc_t softmax_coef, onehot_coef;  // A, c
  acc_t smooth;
  bool smoothing;
  acc_t scale;
  const acc_t* weight;  // nullptr: 1
  bool capped;
  acc_t cap;
  int64_t y;  // < 0: no target class in this row
  acc_t logp_target, x_target;

  // The common case (class indices, exponentials cached, no softcap) as its own loop: one multiply, or one
  // fused multiply-add with smoothing, per element and no per-element branches on the options. `to_prob`
  // turns the cached exponentials eb into probabilities.
  void cached_block(acc_t* gb, const acc_t* eb, acc_t to_prob, int64_t b0, int64_t n) const {
    const acc_t coef = softmax_coef * scale * to_prob;
    if (smooth == 0) {
      at::vec::map([coef](Vec<acc_t> e) { return e * Vec<acc_t>(coef); }, gb, eb, n);
    } else if (!weight) {
      const acc_t shift = smooth * scale;
      at::vec::map([coef, shift](Vec<acc_t> e) { return e * Vec<acc_t>(coef) - Vec<acc_t>(shift); }, gb, eb, n);
    } else {
      const acc_t shift = smooth * scale;
      at::vec::map2([coef, shift](Vec<acc_t> e, Vec<acc_t> w) { return e * Vec<acc_t>(coef) - Vec<acc_t>(shift) * w; },
                    gb, eb, weight + b0, n);
    }
  }

  // Every other case: p from the cached exponentials eb (times to_prob) when given, else from the (capped)
  // logits xb; q from qb (probability targets, already weighted and smoothed) when given.
  void general_block(acc_t* gb, const acc_t* xb, const acc_t* eb, acc_t to_prob, const acc_t* qb, int64_t b0,
                     int64_t n) const {
    const Vec<acc_t> ones(acc_t(1)), vmax(max), vlog_sum(log_sum), va(softmax_coef * scale), vs(smooth * scale),
        vscale(scale), vinv_cap(capped ? acc_t(1) / cap : acc_t(0)), vto_prob(to_prob);
    // The last, partial vector takes the same vector code through counted loads and stores: a scalar tail
    // would be auto-vectorised by the compiler behind a run-time overlap check of these buffers, and the
    // vectorised and scalar versions round differently, so a value would depend on where the buffers lie.
    for (int64_t i = 0; i < n; i += Vec<acc_t>::size()) {
      const int64_t count = std::min<int64_t>(Vec<acc_t>::size(), n - i);
      auto load = [count](const acc_t* ptr) {
        return count == Vec<acc_t>::size() ? Vec<acc_t>::loadu(ptr) : Vec<acc_t>::loadu(ptr, count);
      };
      const Vec<acc_t> prob = eb ? load(eb + i) * vto_prob : fast_exp((load(xb + i) - vmax) - vlog_sum);
      Vec<acc_t> gv = va * prob;
      if (qb) gv = gv - vscale * load(qb + i);
      else if (smoothing) gv = gv - vs * (weight ? load(weight + b0 + i) : ones);
      if (capped) { const Vec<acc_t> t = load(xb + i) * vinv_cap; gv = gv * (ones - t * t); }
      if (count == Vec<acc_t>::size()) gv.store(gb + i);
      else gv.store(gb + i, count);
    }
  }

  // The target class's entry, scaled.
  acc_t target() const {
    const acc_t w_y = weight ? weight[y] : acc_t(1);
    // A p - c with p -> 1 would cancel: (A - c) p + c (p - 1), with p - 1 = expm1(log p) exact.
    acc_t gy = (softmax_coef - onehot_coef) * std::exp(logp_target) + onehot_coef * std::expm1(logp_target) -
               (smoothing ? smooth * w_y : acc_t(0));
    if (capped) gy *= softcap_derivative(x_target, cap);
    return gy * scale;
  }
};

// Writes one row's gradient into g (any stride) block by block: p from exp_cache when given (block b's
// exponentials relative to block_ref[b], see row_statistics), else from load_x(b0, n); q from load_q(b0, n)
// (nullptr for class indices). Directly into g where it holds contiguous opmath values, else through gbuf;
// with `stream`, g is contiguous and written with non-temporal stores.
template <typename scalar_t, typename LoadX, typename LoadQ>
inline void write_row_gradient(const RowGradient<opmath_t<scalar_t>>& grad, scalar_t* g, int64_t stride, bool stream,
                               int64_t C, const LoadX& load_x, const LoadQ& load_q,
                               const opmath_t<scalar_t>* exp_cache, const opmath_t<scalar_t>* block_ref,
                               opmath_t<scalar_t>* gbuf) {
  using acc_t = opmath_t<scalar_t>;
  const bool direct = !stream && std::is_same_v<scalar_t, acc_t> && stride == 1;
  for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
    const int64_t n = std::min(kBlock, C - b0);
    const acc_t* xb = (!exp_cache || grad.capped) ? load_x(b0, n) : nullptr;
    acc_t* gb = direct ? reinterpret_cast<acc_t*>(g + b0) : gbuf;
    const acc_t* qb = load_q(b0, n);
    const acc_t* eb = exp_cache ? exp_cache + b0 : nullptr;
    // p = e * exp(ref - max - log_sum): the cached exponentials were taken against the block's running max.
    const acc_t to_prob = exp_cache ? std::exp((block_ref[b0 / kBlock] - grad.max) - grad.log_sum) : acc_t(0);
    if (eb && !qb && !grad.capped) grad.cached_block(gb, eb, to_prob, b0, n);
    else grad.general_block(gb, xb, eb, to_prob, qb, b0, n);
    if (grad.y >= b0 && grad.y < b0 + n) gb[grad.y - b0] = grad.target();
    if (stream) stream_block<scalar_t>(gb, g + b0, n);
    else if (!direct) write_block<scalar_t>(gb, g + b0 * stride, stride, n);
  }
}

// Out of place into a reused (resident) buffer, the gradient is written with non-temporal stores
// (stream_block: no read-for-ownership of lines written once). Not in place (the lines were just read and sit
// in cache) and not into fresh pages: both measured slower streamed.
template <typename scalar_t>
inline bool stream_row_gradient(const scalar_t* g, int64_t stride, const scalar_t* x) {
  return g && stride == 1 && static_cast<const void*>(g) != static_cast<const void*>(x) && gradient_pages_resident(g);
}

// IndexError naming the first target that is neither ignore_index nor in [0, C). A branch-free scan (it
// vectorises), then a second look only to name the first bad target.
void check_class_indices(const int64_t* t, int64_t rows, int64_t C, int64_t ignore) {
  std::atomic<bool> any_bad{false};
  at::parallel_for(0, rows, kIndexScanGrain, [&](int64_t begin, int64_t end) {
    bool bad = false;
    // Signed compares: AVX2 has no unsigned 64-bit one, and with the unsigned form this loop is not vectorised.
    for (int64_t r = begin; r < end; ++r) bad |= (t[r] != ignore) & ((t[r] < 0) | (t[r] >= C));
    if (bad) any_bad.store(true, std::memory_order_relaxed);
  });
  for (int64_t r = 0; any_bad.load() && r < rows; ++r) {
    TORCH_CHECK_INDEX(t[r] == ignore || (t[r] >= 0 && t[r] < C), "Target ", t[r],
                      " is out of bounds (number of classes is ", C, ", ignore_index is ", ignore, ").");
  }
}

}  // namespace
}  // namespace lossops
