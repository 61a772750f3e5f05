// Cross-entropy over the class dimension, and softmax focal loss as a per-row variant of it.
//
// One forward pass per row computes the loss and, while the row is still in cache, the gradient
// (softmax - target distribution, with smoothing, weights, z-loss and softcap folded in), already scaled
// by the reduction's 1/denominator. Backward is then only a multiplication by grad_output.
//
// Every row's gradient has the form  grad_c = scale * (A * p_c - q_c) * softcap'(c)  where p = softmax,
// q is the (weighted, smoothed) target distribution and A = sum(q) + 2 * z_loss * lse; softmax focal
// changes only A and q_y (see row_coefficients).
#include <algorithm>
#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cross_entropy_lanes.h"
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
      // One loop: exponentials stored and summed while in registers.
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
      for (; i < n; ++i) total += (exp_out[i] = std::exp(x[i] - max));
      sum_exp += total;
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
// (load(b0, n) gives each block). When exp_cache is given the exponentials are kept there, block b's relative
// to block_ref[b]. on_block(b0, n, xb) sees every block while it is in cache, for the sums the caller needs.
template <typename acc_t, typename LoadBlock, typename OnBlock>
inline BlockStats<acc_t> row_statistics(int64_t C, const LoadBlock& load, acc_t* exp_cache, acc_t* block_ref,
                                        const OnBlock& on_block) {
  BlockStats<acc_t> stats;
  for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
    const int64_t n = std::min(kBlock, C - b0);
    const acc_t* xb = load(b0, n);
    const acc_t ref = stats.add(xb, n, exp_cache ? exp_cache + b0 : nullptr);
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

template <typename scalar_t>
void cross_entropy_rows(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                        const CrossEntropyOptions& o, at::Tensor* grad, double grad_scale, at::Tensor& row_loss,
                        at::Tensor& row_lse) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = input.size(1);
  const int64_t rows = input.size(0) * input.size(2);
  const RowLayout in = RowLayout::of(input);
  const RowLayout gl = grad ? RowLayout::of(*grad) : in;
  const bool prob_target = target.is_floating_point();
  const RowLayout tl = prob_target ? RowLayout::of(target) : in;

  const scalar_t* x_ptr = input.const_data_ptr<scalar_t>();
  scalar_t* g_ptr = grad ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t* index_ptr = prob_target ? nullptr : target.const_data_ptr<int64_t>();
  // Probability targets come in the input's dtype, or in the accumulation dtype (e.g. fp32 targets for
  // bf16 logits under autocast) so that they are not rounded to bf16.
  const bool prob_in_acc = prob_target && target.scalar_type() != input.scalar_type();
  const scalar_t* prob_ptr = prob_target && !prob_in_acc ? target.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* prob_acc_ptr = prob_in_acc ? target.const_data_ptr<acc_t>() : nullptr;
  const acc_t* w_ptr = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  acc_t* loss_ptr = row_loss.mutable_data_ptr<acc_t>();
  acc_t* lse_ptr = row_lse.mutable_data_ptr<acc_t>();

  const acc_t cap = static_cast<acc_t>(o.softcap);
  const bool capped = o.softcap > 0;
  const acc_t eps = static_cast<acc_t>(o.label_smoothing);
  const acc_t smooth = o.focal_gamma >= 0 ? acc_t(0) : eps / static_cast<acc_t>(C);
  const acc_t scale = static_cast<acc_t>(grad_scale);
  acc_t weight_sum = static_cast<acc_t>(C);
  if (w_ptr) weight_sum = vec_sum(w_ptr, C);
  const bool need_smooth_dot = !prob_target && eps > 0;

  // With a gradient to write, rows that fit in L2 keep their exponentials from the first pass, so the
  // second pass needs one multiply per element instead of a reload and an exp.
  const bool cache_exp = g_ptr != nullptr && C <= kExpCacheElements;
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  const bool stream = stream_row_gradient(g_ptr, gl.stride_class, x_ptr);

  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kBlock), tbuf(kBlock), gbuf(kBlock);
    std::vector<acc_t> exp_cache(cache_exp ? C : 0), block_ref(cache_exp ? blocks : 0);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* x = x_ptr + in.row_offset(r);
      int64_t y = -1;
      if (!prob_target) {
        y = index_ptr[r];
        if (y == o.ignore_index) {
          loss_ptr[r] = 0;
          lse_ptr[r] = 0;
          if (g_ptr) {
            scalar_t* g = g_ptr + gl.row_offset(r);
            for (int64_t c = 0; c < C; ++c) g[c * gl.stride_class] = scalar_t(0);
          }
          continue;
        }
      }
      const RowLogits<scalar_t> logits{x, in.stride_class, capped, cap, xbuf.data()};
      auto load_x = [&](int64_t b0, int64_t n) { return logits.block(b0, n); };
      // Target distribution q_c = w_c * (t_c * (1 - eps) + eps / C) for probability targets.
      auto load_q = [&](int64_t b0, int64_t n) -> const acc_t* {
        if (!prob_target) return nullptr;
        const int64_t offset = tl.row_offset(r) + b0 * tl.stride_class;
        if (prob_in_acc) read_block(prob_acc_ptr + offset, tl.stride_class, n, tbuf.data(), true);
        else read_block(prob_ptr + offset, tl.stride_class, n, tbuf.data(), true);
        const Vec<acc_t> keep(acc_t(1) - eps), add(eps / static_cast<acc_t>(C));
        at::vec::map([&](Vec<acc_t> t) { return t * keep + add; }, tbuf.data(), tbuf.data(), n);
        if (w_ptr) at::vec::map2([](Vec<acc_t> t, Vec<acc_t> w) { return t * w; }, tbuf.data(), tbuf.data(), w_ptr + b0, n);
        return tbuf.data();
      };
      // With a gradient to write, the hardware prefetcher alone leaves the statistics pass waiting on memory:
      // ask for the next block (or the next row's first) into L2 while this one is computed. Without a gradient
      // the same hint made the read-only pass slower, so it is given only with one.
      auto load_x_prefetching = [&](int64_t b0, int64_t n) {
        if (g_ptr && in.stride_class == 1) {
          if (b0 + kBlock < C) prefetch(x + b0 + kBlock, std::min(kBlock, C - b0 - kBlock));
          else if (r + 1 < end) prefetch(x_ptr + in.row_offset(r + 1), std::min(kBlock, C));
        }
        return load_x(b0, n);
      };

      acc_t smooth_dot = 0, q_sum = 0, q_dot = 0;
      const BlockStats<acc_t> stats = row_statistics(
          C, load_x_prefetching, cache_exp ? exp_cache.data() : nullptr, block_ref.data(),
          [&](int64_t b0, int64_t n, const acc_t* xb) {
            if (need_smooth_dot) smooth_dot += weighted_sum(xb, w_ptr, b0, n);
            if (prob_target) {
              const acc_t* qb = load_q(b0, n);
              q_sum += vec_sum(qb, n);
              q_dot += vec_dot(qb, xb, n);
            }
          });
      // x - lse loses the low bits of x - max when |max| is large (lse rounds to max's ulp): every
      // log-probability is formed as (x - max) - log_sum instead, as torch's log_softmax does.
      const acc_t log_sum = stats.log_sum();
      const acc_t lse = stats.max + log_sum;
      RowResult<acc_t> res;
      acc_t x_target = 0, logp_target = 0;
      if (prob_target) {
        const acc_t z = static_cast<acc_t>(o.lse_square_scale);
        res = {q_sum * lse - q_dot + z * lse * lse, q_sum + acc_t(2) * z * lse, 0};
      } else {
        x_target = logits.at(y);
        const acc_t w_target = w_ptr ? w_ptr[y] : acc_t(1);
        logp_target = (x_target - stats.max) - log_sum;
        res = row_coefficients<acc_t>(o, lse, logp_target, w_target, smooth_dot, weight_sum, C);
      }
      loss_ptr[r] = res.loss;
      lse_ptr[r] = lse;
      if (!g_ptr) continue;

      const RowGradient<acc_t> row_grad{stats.max, log_sum, res.softmax_coef, res.onehot_coef, smooth, smooth > 0,
                                        scale, w_ptr, capped, cap, y, logp_target, x_target};
      write_row_gradient<scalar_t>(row_grad, g_ptr + gl.row_offset(r), gl.stride_class, stream, C, load_x, load_q,
                                   cache_exp ? exp_cache.data() : nullptr, block_ref.data(), gbuf.data());
    }
    if (stream) finish_streaming();
  });
}

// Vocabulary-parallel cross-entropy: a rank holds the logits of classes [class_offset, class_offset + C_local)
// of V, as a 2-D (N, C_local) tensor with any strides. cross_entropy_shard_stats gives the per-row statistics
// the Python side all-reduces into the global logsumexp and loss; cross_entropy_shard_grad then writes this
// rank's slice of the gradient from the global logsumexp and per-row coefficients.

// What both shard kernels rely on; returns the weight's data (nullptr without one).
template <typename acc_t>
const acc_t* shard_weight(const char* kernel, const at::Tensor& input, const at::Tensor& target,
                          const std::optional<at::Tensor>& weight) {
  TORCH_CHECK(input.dim() == 2, "lossops: ", kernel, ": input must be 2-D (N, C_local), got ", input.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 1 && target.size(0) == input.size(0) &&
                  target.is_contiguous(),
              "lossops: ", kernel, ": target must be a contiguous int64 tensor of shape (", input.size(0), "), got ",
              target.scalar_type(), " ", target.sizes());
  if (!weight.has_value()) return nullptr;
  TORCH_CHECK(weight->scalar_type() == c10::CppTypeToScalarType<acc_t>::value && weight->dim() == 1 &&
                  weight->size(0) == input.size(1) && weight->is_contiguous(),
              "lossops: ", kernel, ": weight must be a contiguous ", c10::CppTypeToScalarType<acc_t>::value,
              " tensor of shape (", input.size(1), "), got ", weight->scalar_type(), " ", weight->sizes());
  return weight->const_data_ptr<acc_t>();
}

// The local index of a global class, -1 when another rank holds it.
inline int64_t shard_class(int64_t t, int64_t class_offset, int64_t C) {
  return t >= class_offset && t < class_offset + C ? t - class_offset : -1;
}

template <typename scalar_t>
RowLogits<scalar_t> shard_row(const at::Tensor& input, int64_t r, double softcap, opmath_t<scalar_t>* buf) {
  const scalar_t* x = input.const_data_ptr<scalar_t>();
  // No offset from a data pointer that may be null (C_local = 0); such a row is never read.
  if (input.size(1) > 0) x += r * input.stride(0);
  return {x, input.stride(1), softcap > 0, static_cast<opmath_t<scalar_t>>(softcap), buf};
}

// Per row [max, sum of exp(x - max), target logit (0 unless this rank holds the target), sum_j w_j x_j] of the
// capped logits; ignored rows all 0, unread.
template <typename scalar_t>
void shard_stats_rows(const at::Tensor& input, const int64_t* target, const opmath_t<scalar_t>* w, int64_t class_offset,
                      int64_t ignore_index, double softcap, opmath_t<scalar_t>* out) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = input.size(1);
  at::parallel_for(0, input.size(0), row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      acc_t* s = out + 4 * r;
      if (target[r] == ignore_index) {
        std::fill(s, s + 4, acc_t(0));
        continue;
      }
      const RowLogits<scalar_t> logits = shard_row<scalar_t>(input, r, softcap, xbuf.data());
      acc_t w_dot = 0;
      const BlockStats<acc_t> stats = row_statistics<acc_t>(
          C, [&](int64_t b0, int64_t n) { return logits.block(b0, n); }, nullptr, nullptr,
          [&](int64_t b0, int64_t n, const acc_t* xb) { w_dot += weighted_sum(xb, w, b0, n); });
      const int64_t y = shard_class(target[r], class_offset, C);
      s[0] = stats.max;
      s[1] = stats.sum_exp_or_nan();
      s[2] = y >= 0 ? logits.at(y) : acc_t(0);
      s[3] = w_dot;
    }
  });
}

// grad_j = softcap'(x_j) (A exp(x_j - lse) - B [j == target] - D w_j) per row, from the capped logits; rows with
// A = B = D = 0 are zeros, unread.
template <typename scalar_t>
void shard_grad_rows(const at::Tensor& input, const int64_t* target, const opmath_t<scalar_t>* w, scalar_t* g_ptr,
                     const opmath_t<scalar_t>* lse, const opmath_t<scalar_t>* coefficients, int64_t class_offset,
                     double softcap) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = input.size(1);
  const bool stream = stream_row_gradient<scalar_t>(g_ptr, 1, input.const_data_ptr<scalar_t>());
  at::parallel_for(0, input.size(0), row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kBlock), gbuf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t a = coefficients[3 * r], b = coefficients[3 * r + 1], d = coefficients[3 * r + 2];
      scalar_t* g = g_ptr + r * C;
      if (a == 0 && b == 0 && d == 0) {
        std::fill(g, g + C, scalar_t(0));
        continue;
      }
      const RowLogits<scalar_t> logits = shard_row<scalar_t>(input, r, softcap, xbuf.data());
      const int64_t y = shard_class(target[r], class_offset, C);
      const acc_t x_target = y >= 0 ? logits.at(y) : acc_t(0);
      // p_j = exp((x_j - lse) - 0): RowGradient's form with the global logsumexp as the max.
      const RowGradient<acc_t> row_grad{lse[r], 0, a, b, d, true, 1, w, logits.capped, logits.cap, y,
                                        x_target - lse[r], x_target};
      write_row_gradient<scalar_t>(
          row_grad, g, 1, stream, C, [&](int64_t b0, int64_t n) { return logits.block(b0, n); },
          [](int64_t, int64_t) { return static_cast<const acc_t*>(nullptr); }, nullptr, nullptr, gbuf.data());
    }
    if (stream) finish_streaming();
  });
}

// input (N, C_local), any strides, float / double / bfloat16 / half; target int64 (N,) of global class indices;
// weight: this rank's (C_local,) slice of the class weights in the opmath dtype (float; double for double), or
// None; softcap: None, or > 0 to replace the logits by softcap * tanh(logits / softcap) first.
// Returns {stats}: (N, 4) contiguous, opmath dtype, per row [m, s, x_t, dot] with m the max of the capped logits,
// s = sum_j exp(x_j - m), x_t the target's logit when class_offset <= target < class_offset + C_local (else 0),
// dot = sum_j w_j x_j (w = 1 without weight). Rows with target == ignore_index: all 0. C_local = 0 or a row of
// -inf: m = -inf, s = 0 (dot is then 0, or -inf for a row of -inf). A NaN logit makes s NaN.
std::vector<at::Tensor> cross_entropy_shard_stats(const at::Tensor& input, const at::Tensor& target,
                                                  const std::optional<at::Tensor>& weight, int64_t class_offset,
                                                  int64_t ignore_index, std::optional<double> softcap) {
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "lossops: cross_entropy_shard_stats: softcap must be > 0");
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor stats = new_cpu_tensor({input.dim() == 2 ? input.size(0) : 0, 4}, acc_type);
  LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy_shard_stats", [&] {
    using acc_t = opmath_t<scalar_t>;
    const acc_t* w = shard_weight<acc_t>("cross_entropy_shard_stats", input, target, weight);
    shard_stats_rows<scalar_t>(input, target.const_data_ptr<int64_t>(), w, class_offset, ignore_index,
                               softcap.value_or(0.0), stats.mutable_data_ptr<acc_t>());
  });
  return {stats};
}

// input, target, weight, class_offset, softcap: as for cross_entropy_shard_stats.
// grad: contiguous (N, C_local) of input's dtype, not aliasing input; every element is written.
// lse: (N,) opmath, the global logsumexp of the capped logits; coefficients: (N, 3) opmath, contiguous, per row
// [A, B, D]: grad_j = softcap'(x_j) * (A * exp(x_j - lse) - B * [j == target - class_offset] - D * w_j), with x
// the capped logits and softcap'(x) = 1 - tanh^2(x / softcap) (1 without softcap). Rows with A = B = D = 0 get
// zeros. Returns {} (the result is grad).
std::vector<at::Tensor> cross_entropy_shard_grad(const at::Tensor& input, const at::Tensor& target,
                                                 const std::optional<at::Tensor>& weight, const at::Tensor& grad,
                                                 const at::Tensor& lse, const at::Tensor& coefficients,
                                                 int64_t class_offset, std::optional<double> softcap) {
  const char* kernel = "cross_entropy_shard_grad";
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "lossops: ", kernel, ": softcap must be > 0");
  TORCH_CHECK(grad.sizes() == input.sizes() && grad.scalar_type() == input.scalar_type() && grad.is_contiguous(),
              "lossops: ", kernel, ": grad must be a contiguous ", input.scalar_type(), " tensor of shape ",
              input.sizes(), ", got ", grad.scalar_type(), " ", grad.sizes());
  TORCH_CHECK(!grad.is_alias_of(input), "lossops: ", kernel, ": grad must not alias input");
  const int64_t N = input.dim() == 2 ? input.size(0) : 0;
  const auto acc_type = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc_type && lse.dim() == 1 && lse.size(0) == N && lse.is_contiguous(),
              "lossops: ", kernel, ": lse must be a contiguous ", acc_type, " tensor of shape (", N, "), got ",
              lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK(coefficients.scalar_type() == acc_type && coefficients.dim() == 2 && coefficients.size(0) == N &&
                  coefficients.size(1) == 3 && coefficients.is_contiguous(),
              "lossops: ", kernel, ": coefficients must be a contiguous ", acc_type, " tensor of shape (", N,
              ", 3), got ", coefficients.scalar_type(), " ", coefficients.sizes());
  LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy_shard_grad", [&] {
    using acc_t = opmath_t<scalar_t>;
    const acc_t* w = shard_weight<acc_t>(kernel, input, target, weight);
    shard_grad_rows<scalar_t>(input, target.const_data_ptr<int64_t>(), w, grad.mutable_data_ptr<scalar_t>(),
                              lse.const_data_ptr<acc_t>(), coefficients.const_data_ptr<acc_t>(), class_offset,
                              softcap.value_or(0.0));
  });
  return {};
}


// Per-token statistics of the (capped) softmax rows of a (outer, C, inner) view, for logging and RL losses
// beside the loss: read-only, one pass. The entropy is H = log s - u / s with s = sum_j e^(x_j - m) and
// u = sum_j e^(x_j - m) (x_j - m) kept relative to the running max m (u is rescaled with s when m moves), so
// no per-element log-probability is formed and H >= 0 holds to rounding.
template <typename acc_t>
struct EntropyStats {
  acc_t max = -std::numeric_limits<acc_t>::infinity();
  acc_t sum_exp = 0;
  acc_t sum_exp_shift = 0;  // u
  int64_t argmax = 0;

  // x - m where x is -inf gives e^(x - m) = 0 and (x - m) * 0 = NaN: the shift is clamped to a value whose exp
  // is already 0 (in float64 too) and whose products with the gradient's coefficients stay finite.
  static constexpr acc_t kLowestShift = acc_t(-1e4);
  static acc_t shift(acc_t x, acc_t m) { return std::max(x - m, kLowestShift); }
  static Vec<acc_t> shift(const Vec<acc_t>& x, const Vec<acc_t>& m) {
    return at::vec::clamp_min(x - m, Vec<acc_t>(kLowestShift));
  }

  void add(const acc_t* xb, int64_t b0, int64_t n) {
    const acc_t bmax = block_max(xb, n);
    if (bmax == -std::numeric_limits<acc_t>::infinity()) return;  // contributes nothing
    using V = Vec<acc_t>;
    const V vm(bmax);
    V vs(acc_t(0)), vu(acc_t(0));
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) {
      const V d = shift(V::loadu(xb + i), vm);
      const V e = fast_exp(d);
      vs = vs + e;
      vu = at::vec::fmadd(e, d, vu);
    }
    acc_t s = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, vs);
    acc_t u = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, vu);
    for (; i < n; ++i) {
      const acc_t d = shift(xb[i], bmax);
      const acc_t e = std::exp(d);
      s += e;
      u += e * d;
    }
    if (!(bmax <= max)) {  // a larger block max (or a NaN): the first index holding it
      const int64_t first = std::isnan(bmax) ? std::find_if(xb, xb + n, [](acc_t v) { return std::isnan(v); }) - xb
                                             : std::find(xb, xb + n, bmax) - xb;
      const bool found = first < n;
      if (max == -std::numeric_limits<acc_t>::infinity()) {
        sum_exp = s;
        sum_exp_shift = u;
      } else {
        const acc_t k = max - bmax, r = std::exp(k);  // k < 0: the old sums move onto the new max
        sum_exp_shift = r * (sum_exp_shift + k * sum_exp) + u;
        sum_exp = r * sum_exp + s;
      }
      max = bmax;
      if (found) argmax = b0 + first;
    } else {
      const acc_t k = bmax - max, r = std::exp(k);
      sum_exp_shift += r * (u + k * s);
      sum_exp += r * s;
    }
  }
};

template <typename scalar_t>
void token_stats_rows(const at::Tensor& input, const int64_t* target, int64_t ignore_index, double softcap,
                      opmath_t<scalar_t>* out, int64_t* argmax) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = input.size(1);
  const int64_t rows = input.size(0) * input.size(2);
  const RowLayout in = RowLayout::of(input);
  const scalar_t* x_ptr = input.const_data_ptr<scalar_t>();
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      acc_t* s = out + 3 * r;
      const int64_t y = target[r];
      if (y == ignore_index) {
        std::fill(s, s + 3, acc_t(0));
        argmax[r] = -1;
        continue;
      }
      const RowLogits<scalar_t> logits{x_ptr + in.row_offset(r), in.stride_class, softcap > 0,
                                       static_cast<acc_t>(softcap), xbuf.data()};
      EntropyStats<acc_t> stats;
      for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
        const int64_t n = std::min(kBlock, C - b0);
        stats.add(logits.block(b0, n), b0, n);
      }
      const acc_t log_sum = std::log(stats.sum_exp);
      s[0] = stats.max + log_sum;
      s[1] = (logits.at(y) - stats.max) - log_sum;
      s[2] = log_sum - stats.sum_exp_shift / stats.sum_exp;
      argmax[r] = stats.argmax;
    }
  });
}

// grad_j = softcap'(x_j) (p_j (a + b (x_j - lse)) + c [j == y]) per row, p_j = exp(x_j - lse), x the capped
// logits: the gradient of g_lse lse + g_lp log p_y + g_H H with a = g_lse - g_lp - g_H H, b = -g_H, c = g_lp.
// At the target p_y a + c cancels as p_y -> 1: it is formed as p_y (a + c + b (x_y - lse)) - c expm1(x_y - lse).
template <typename scalar_t>
void token_stats_grad_rows(const at::Tensor& input, const int64_t* target, int64_t ignore_index, double softcap,
                           const opmath_t<scalar_t>* lse, const opmath_t<scalar_t>* coefficients, at::Tensor& grad) {
  using acc_t = opmath_t<scalar_t>;
  using V = Vec<acc_t>;
  const int64_t C = input.size(1);
  const int64_t rows = input.size(0) * input.size(2);
  const RowLayout in = RowLayout::of(input), gl = RowLayout::of(grad);
  const scalar_t* x_ptr = input.const_data_ptr<scalar_t>();
  scalar_t* g_ptr = grad.mutable_data_ptr<scalar_t>();
  const bool capped = softcap > 0;
  const acc_t cap = static_cast<acc_t>(softcap);
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xbuf(kBlock), gbuf(kBlock);
    for (int64_t r = begin; r < end; ++r) {
      const acc_t a = coefficients[3 * r], b = coefficients[3 * r + 1], c = coefficients[3 * r + 2];
      const int64_t y = target[r];
      scalar_t* g = g_ptr + gl.row_offset(r);
      if (y == ignore_index || (a == 0 && b == 0 && c == 0)) {
        for (int64_t j = 0; j < C; ++j) g[j * gl.stride_class] = scalar_t(0);
        continue;
      }
      const RowLogits<scalar_t> logits{x_ptr + in.row_offset(r), in.stride_class, capped, cap, xbuf.data()};
      const acc_t L = lse[r];
      const acc_t x_y = logits.at(y), d_y = EntropyStats<acc_t>::shift(x_y, L);
      acc_t g_y = std::exp(d_y) * (a + c + b * d_y) - c * std::expm1(d_y);
      if (capped) g_y *= softcap_derivative(x_y, cap);
      const V va(a), vb(b), vL(L), ones(acc_t(1)), vinv_cap(capped ? acc_t(1) / cap : acc_t(0));
      for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
        const int64_t n = std::min(kBlock, C - b0);
        const acc_t* xb = logits.block(b0, n);
        int64_t i = 0;
        for (; i + V::size() <= n; i += V::size()) {
          const V x = V::loadu(xb + i);
          const V d = EntropyStats<acc_t>::shift(x, vL);
          V gv = fast_exp(d) * at::vec::fmadd(vb, d, va);
          if (capped) { const V t = x * vinv_cap; gv = gv * (ones - t * t); }
          gv.store(gbuf.data() + i);
        }
        for (; i < n; ++i) {
          const acc_t d = EntropyStats<acc_t>::shift(xb[i], L);
          acc_t gi = std::exp(d) * (a + b * d);
          if (capped) gi *= softcap_derivative(xb[i], cap);
          gbuf[i] = gi;
        }
        if (y >= b0 && y < b0 + n) gbuf[y - b0] = g_y;
        write_block<scalar_t>(gbuf.data(), g + b0 * gl.stride_class, gl.stride_class, n);
      }
    }
  });
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

void check_token_stats_target(const char* kernel, const at::Tensor& input, const at::Tensor& target,
                              int64_t ignore_index) {
  TORCH_CHECK(input.dim() == 3, "lossops: ", kernel, ": input must be a (outer, C, inner) view, got ", input.sizes());
  const int64_t rows = input.size(0) * input.size(2), C = input.size(1);
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == rows,
              "lossops: ", kernel, ": target must be a contiguous int64 tensor of ", rows, " elements");
  check_class_indices(target.const_data_ptr<int64_t>(), rows, C, ignore_index);
}

// input (outer, C, inner), any strides, float / double / bfloat16 / half; target int64 (outer * inner,);
// softcap None or > 0. Returns {stats, argmax}: stats (rows, 3) contiguous opmath, per row [logsumexp, target
// log-probability, entropy] of the capped logits; argmax (rows,) int64, the first index of the largest capped
// logit. Rows with target == ignore_index: stats 0, argmax -1, their logits unread.
std::vector<at::Tensor> cross_entropy_token_stats(const at::Tensor& input, const at::Tensor& target,
                                                  int64_t ignore_index, std::optional<double> softcap) {
  const char* kernel = "cross_entropy_token_stats";
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "lossops: ", kernel, ": softcap must be > 0");
  check_token_stats_target(kernel, input, target, ignore_index);
  const int64_t rows = input.size(0) * input.size(2);
  at::Tensor stats = new_cpu_tensor({rows, 3}, at::toOpMathType(input.scalar_type()));
  at::Tensor argmax = new_cpu_tensor({rows}, at::kLong);
  if (rows == 0) return {stats, argmax};
  LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy_token_stats", [&] {
    token_stats_rows<scalar_t>(input, target.const_data_ptr<int64_t>(), ignore_index, softcap.value_or(0.0),
                               stats.mutable_data_ptr<opmath_t<scalar_t>>(), argmax.mutable_data_ptr<int64_t>());
  });
  return {stats, argmax};
}

// input, target, softcap: as for cross_entropy_token_stats. grad: input's shape and dtype, any strides, not
// aliasing input; every element is written. lse: (rows,) opmath, contiguous (cross_entropy_token_stats' first
// column); coefficients (rows, 3) opmath, contiguous, per row [a, b, c] (see token_stats_grad_rows). Rows with
// target == ignore_index or a = b = c = 0 get zeros. Returns {} (the result is grad).
std::vector<at::Tensor> cross_entropy_token_stats_grad(const at::Tensor& input, const at::Tensor& target,
                                                       const at::Tensor& grad, const at::Tensor& lse,
                                                       const at::Tensor& coefficients, int64_t ignore_index,
                                                       std::optional<double> softcap) {
  const char* kernel = "cross_entropy_token_stats_grad";
  TORCH_CHECK(!softcap.has_value() || *softcap > 0, "lossops: ", kernel, ": softcap must be > 0");
  check_token_stats_target(kernel, input, target, ignore_index);
  TORCH_CHECK(grad.sizes() == input.sizes() && grad.scalar_type() == input.scalar_type(), "lossops: ", kernel,
              ": grad must be a ", input.scalar_type(), " tensor of shape ", input.sizes(), ", got ",
              grad.scalar_type(), " ", grad.sizes());
  TORCH_CHECK(!grad.is_alias_of(input), "lossops: ", kernel, ": grad must not alias input");
  const int64_t rows = input.size(0) * input.size(2);
  const auto acc_type = at::toOpMathType(input.scalar_type());
  TORCH_CHECK(lse.scalar_type() == acc_type && lse.numel() == rows && lse.is_contiguous(), "lossops: ", kernel,
              ": lse must be a contiguous ", acc_type, " tensor of ", rows, " elements");
  TORCH_CHECK(coefficients.scalar_type() == acc_type && coefficients.dim() == 2 && coefficients.size(0) == rows &&
                  coefficients.size(1) == 3 && coefficients.is_contiguous(),
              "lossops: ", kernel, ": coefficients must be a contiguous ", acc_type, " tensor of shape (", rows,
              ", 3), got ", coefficients.scalar_type(), " ", coefficients.sizes());
  if (rows == 0 || input.size(1) == 0) return {};
  at::Tensor g = grad;
  LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy_token_stats_grad", [&] {
    using acc_t = opmath_t<scalar_t>;
    token_stats_grad_rows<scalar_t>(input, target.const_data_ptr<int64_t>(), ignore_index, softcap.value_or(0.0),
                                    lse.const_data_ptr<acc_t>(), coefficients.const_data_ptr<acc_t>(), g);
  });
  return {};
}

}  // namespace

// See CrossEntropyKernel (kernel_abi.h).
std::vector<at::Tensor> cross_entropy_forward(const at::Tensor& input, const at::Tensor& target,
                                              const std::optional<at::Tensor>& weight,
                                              const std::optional<at::Tensor>& grad,
                                              const CrossEntropyOptions& options, double grad_scale) {
  TORCH_CHECK(input.dim() == 3, "lossops: cross_entropy kernel expects a (outer, C, inner) view, got ", input.sizes());
  const int64_t C = input.size(1);
  const int64_t rows = input.size(0) * input.size(2);
  if (!target.is_floating_point()) {
    TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous() && target.numel() == rows,
                "lossops: class-index target must be a contiguous int64 tensor of ", rows, " elements");
    // Validate before any gradient is written: with inplace_backward the gradient overwrites the logits.
    check_class_indices(target.const_data_ptr<int64_t>(), rows, C, options.ignore_index);
  } else {
    TORCH_CHECK(target.sizes() == input.sizes() && (target.scalar_type() == input.scalar_type() ||
                                                    target.scalar_type() == at::toOpMathType(input.scalar_type())),
                "lossops: probability target must match the input's shape and dtype");
  }
  const auto acc_type = at::toOpMathType(input.scalar_type());
  at::Tensor w = weight.has_value() ? weight->to(acc_type).contiguous() : at::Tensor();
  TORCH_CHECK(!w.defined() || w.numel() == C, "lossops: weight must have ", C, " elements, got ", w.numel());
  at::Tensor row_loss = new_cpu_tensor({rows}, acc_type);
  at::Tensor row_lse = new_cpu_tensor({rows}, acc_type);
  at::Tensor g = grad.has_value() ? *grad : at::Tensor();
  if (g.defined()) TORCH_CHECK(g.sizes() == input.sizes() && g.scalar_type() == input.scalar_type(), "lossops: bad gradient buffer");
  if (rows > 0 && C > 0) {
    LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy", [&] {
      if (ce_lanes::lanes_kernel_serves(input, target)) {
        ce_lanes::cross_entropy_lanes<scalar_t>(input, target.const_data_ptr<int64_t>(), w, options,
                                                g.defined() ? &g : nullptr, grad_scale, row_loss, row_lse);
      } else {
        cross_entropy_rows<scalar_t>(input, target, w, options, g.defined() ? &g : nullptr, grad_scale, row_loss, row_lse);
      }
    });
  } else if (rows > 0) {
    row_loss.zero_();
    row_lse.fill_(-std::numeric_limits<double>::infinity());
  }
  // Fixed-order double sum: identical bits for any thread count.
  double total = 0.0;
  LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy_sum", [&] {
    const opmath_t<scalar_t>* l = row_loss.const_data_ptr<opmath_t<scalar_t>>();
    total = deterministic_sum(rows, [l](int64_t b, int64_t e) { return sum_in_double(l + b, e - b); });
  });
  return {row_loss, row_lse, cpu_scalar(total, acc_type)};
}

namespace {
std::vector<at::Tensor> cross_entropy_kernel(const KernelArgs& a) {
  return cross_entropy_forward(a.tensor("input"), a.tensor("target"), a.optional_tensor("weight"),
                               a.optional_tensor("grad"),
                               {a.integer("ignore_index"), a.real("label_smoothing"), a.real("lse_square_scale"),
                                a.optional_real("softcap").value_or(0.0), a.optional_real("focal_gamma").value_or(-1.0)},
                               a.tensor("grad_scale").item<double>());
}

std::vector<at::Tensor> cross_entropy_shard_stats_kernel(const KernelArgs& a) {
  return cross_entropy_shard_stats(a.tensor("input"), a.tensor("target"), a.optional_tensor("weight"),
                                   a.integer("class_offset"), a.integer("ignore_index"), a.optional_real("softcap"));
}

std::vector<at::Tensor> cross_entropy_shard_grad_kernel(const KernelArgs& a) {
  return cross_entropy_shard_grad(a.tensor("input"), a.tensor("target"), a.optional_tensor("weight"), a.tensor("grad"),
                                  a.tensor("lse"), a.tensor("coefficients"), a.integer("class_offset"),
                                  a.optional_real("softcap"));
}

std::vector<at::Tensor> cross_entropy_token_stats_kernel(const KernelArgs& a) {
  return cross_entropy_token_stats(a.tensor("input"), a.tensor("target"), a.integer("ignore_index"),
                                   a.optional_real("softcap"));
}

std::vector<at::Tensor> cross_entropy_token_stats_grad_kernel(const KernelArgs& a) {
  return cross_entropy_token_stats_grad(a.tensor("input"), a.tensor("target"), a.tensor("grad"), a.tensor("lse"),
                                        a.tensor("coefficients"), a.integer("ignore_index"), a.optional_real("softcap"));
}
}  // namespace

LOSSOPS_REGISTER_KERNEL("cross_entropy", cross_entropy_kernel, &cross_entropy_forward, "input", "target", "weight",
                        "grad", "ignore_index", "label_smoothing", "lse_square_scale", "softcap", "focal_gamma",
                        "grad_scale");
LOSSOPS_REGISTER_KERNEL("cross_entropy_shard_stats", cross_entropy_shard_stats_kernel, nullptr, "input", "target",
                        "weight", "class_offset", "ignore_index", "softcap");
LOSSOPS_REGISTER_KERNEL("cross_entropy_shard_grad", cross_entropy_shard_grad_kernel, nullptr, "input", "target",
                        "weight", "grad", "lse", "coefficients", "class_offset", "softcap");
LOSSOPS_REGISTER_KERNEL("cross_entropy_token_stats", cross_entropy_token_stats_kernel, nullptr, "input", "target",
                        "ignore_index", "softcap");
LOSSOPS_REGISTER_KERNEL("cross_entropy_token_stats_grad", cross_entropy_token_stats_grad_kernel, nullptr, "input",
                        "target", "grad", "lse", "coefficients", "ignore_index", "softcap");

}  // namespace lossops
