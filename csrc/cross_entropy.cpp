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
#include <limits>

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
    if (exp_out) {
      // One loop: exponentials stored and summed while in registers.
      Vec<acc_t> acc(acc_t(0));
      int64_t i = 0;
      for (; i + Vec<acc_t>::size() <= n; i += Vec<acc_t>::size()) {
        const Vec<acc_t> e = fast_exp(Vec<acc_t>::loadu(x + i) - m);
        e.store(exp_out + i);
        acc = acc + e;
      }
      acc_t total = at::vec::vec_reduce_all<acc_t>([](Vec<acc_t>& a, Vec<acc_t>& b) { return a + b; }, acc);
      for (; i < n; ++i) total += (exp_out[i] = std::exp(x[i] - max));
      sum_exp += total;
    } else {
      sum_exp += at::vec::map_reduce_all<acc_t>([m](Vec<acc_t> v) { return fast_exp(v - m); },
                                                [](Vec<acc_t> a, Vec<acc_t> b) { return a + b; }, x, n);
    }
    return max;
  }
  acc_t log_sum() const { return nan_seen ? std::numeric_limits<acc_t>::quiet_NaN() : std::log(sum_exp); }
  acc_t lse() const { return max + log_sum(); }
};

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  return at::vec::map2_reduce_all<acc_t>([](Vec<acc_t> x, Vec<acc_t> y) { return x * y; },
                                         [](Vec<acc_t> x, Vec<acc_t> y) { return x + y; }, a, b, n);
}

template <typename acc_t>
inline acc_t sum(const acc_t* a, int64_t n) {
  return at::vec::reduce_all<acc_t>([](Vec<acc_t>& x, Vec<acc_t>& y) { return x + y; }, a, n);
}

template <typename acc_t>
inline acc_t softcap_derivative(acc_t capped, acc_t cap) {
  const acc_t t = capped / cap;
  return acc_t(1) - t * t;
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
  const acc_t a = (acc_t(1) - eps) * w_target + smooth * weight_sum + acc_t(2) * z * lse;
  return {loss, a, (acc_t(1) - eps) * w_target};
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
  if (w_ptr) weight_sum = sum(w_ptr, C);
  const bool need_smooth_dot = !prob_target && eps > 0;
  const Vec<acc_t> ones(acc_t(1));

  // With a gradient to write, rows that fit in L2 keep their exponentials from the first pass, so the
  // second pass needs one multiply per element instead of a reload and an exp.
  const bool cache_exp = g_ptr != nullptr && C <= kExpCacheElements;
  const int64_t blocks = (C + kBlock - 1) / kBlock;

  // Out of place into a reused (resident) buffer, the gradient is written with non-temporal stores
  // (stream_block: measured -10% for bf16, -5% fp32 at 4096 x 32000). Not in place (the lines were just read
  // and sit in cache) and not into fresh pages: both measured slower streamed.
  const bool stream = g_ptr && gl.stride_class == 1 && static_cast<const void*>(g_ptr) != static_cast<const void*>(x_ptr) &&
                      gradient_pages_resident(g_ptr);

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
      auto load_x = [&](int64_t b0, int64_t n) {
        const acc_t* xb = read_block(x + b0 * in.stride_class, in.stride_class, n, xbuf.data(), capped);
        if (capped) apply_softcap(xbuf.data(), n, cap);
        return xb;
      };
      // Target distribution q_c = w_c * (t_c * (1 - eps) + eps / C) for probability targets.
      auto load_q = [&](int64_t b0, int64_t n) {
        const int64_t offset = tl.row_offset(r) + b0 * tl.stride_class;
        if (prob_in_acc) read_block(prob_acc_ptr + offset, tl.stride_class, n, tbuf.data(), true);
        else read_block(prob_ptr + offset, tl.stride_class, n, tbuf.data(), true);
        const Vec<acc_t> keep(acc_t(1) - eps), add(eps / static_cast<acc_t>(C));
        at::vec::map([&](Vec<acc_t> t) { return t * keep + add; }, tbuf.data(), tbuf.data(), n);
        if (w_ptr) at::vec::map2([](Vec<acc_t> t, Vec<acc_t> w) { return t * w; }, tbuf.data(), tbuf.data(), w_ptr + b0, n);
        return tbuf.data();
      };

      BlockStats<acc_t> stats;
      acc_t smooth_dot = 0, q_sum = 0, q_dot = 0;
      for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
        const int64_t n = std::min(kBlock, C - b0);
        // With a gradient to write, the hardware prefetcher alone leaves this pass waiting on memory: ask for
        // the next block (or the next row's first) into L2 while this one is computed. Measured here: -15%
        // in place (fp32), -20% (bf16); without a gradient the same hint made the read-only pass slower.
        if (g_ptr && in.stride_class == 1) {
          if (b0 + kBlock < C) prefetch(x + b0 + kBlock, std::min(kBlock, C - b0 - kBlock));
          else if (r + 1 < end) prefetch(x_ptr + in.row_offset(r + 1), std::min(kBlock, C));
        }
        const acc_t* xb = load_x(b0, n);
        const acc_t ref = stats.add(xb, n, cache_exp ? exp_cache.data() + b0 : nullptr);
        if (cache_exp) block_ref[b0 / kBlock] = ref;
        if (need_smooth_dot) smooth_dot += w_ptr ? dot(xb, w_ptr + b0, n) : sum(xb, n);
        if (prob_target) {
          const acc_t* qb = load_q(b0, n);
          q_sum += sum(qb, n);
          q_dot += dot(qb, xb, n);
        }
      }
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
        x_target = static_cast<acc_t>(x[y * in.stride_class]);
        if (capped) x_target = cap * std::tanh(x_target / cap);
        const acc_t w_target = w_ptr ? w_ptr[y] : acc_t(1);
        logp_target = (x_target - stats.max) - log_sum;
        res = row_coefficients<acc_t>(o, lse, logp_target, w_target, smooth_dot, weight_sum, C);
      }
      loss_ptr[r] = res.loss;
      lse_ptr[r] = lse;
      if (!g_ptr) continue;

      scalar_t* g = g_ptr + gl.row_offset(r);
      const Vec<acc_t> vmax(stats.max), vlog_sum(log_sum), va(res.softmax_coef * scale), vs(smooth * scale),
          vscale(scale), vinv_cap(capped ? acc_t(1) / cap : acc_t(0));
      for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
        const int64_t n = std::min(kBlock, C - b0);
        const acc_t* xb = (!cache_exp || capped) ? load_x(b0, n) : nullptr;
        const bool direct = !stream && std::is_same_v<scalar_t, acc_t> && gl.stride_class == 1;
        acc_t* gb = direct ? reinterpret_cast<acc_t*>(g + b0) : gbuf.data();
        const acc_t* qb = prob_target ? load_q(b0, n) : nullptr;
        const acc_t* eb = cache_exp ? exp_cache.data() + b0 : nullptr;
        // p = e * exp(ref - max - log_sum): the cached exponentials were taken against the block's running max.
        const acc_t to_prob = cache_exp ? std::exp((block_ref[b0 / kBlock] - stats.max) - log_sum) : acc_t(0);
        const Vec<acc_t> vto_prob(to_prob);
        auto prob = [&](int64_t i) {
          return eb ? Vec<acc_t>::loadu(eb + i) * vto_prob : fast_exp((Vec<acc_t>::loadu(xb + i) - vmax) - vlog_sum);
        };
        int64_t i = 0;
        if (eb && !prob_target && !capped) {
          // The common case (class indices, exponentials cached) as its own loop: one multiply, or one fused
          // multiply-add with smoothing, per element and no per-element branches on the options.
          const acc_t coef = res.softmax_coef * scale * to_prob;
          if (smooth == 0) {
            at::vec::map([coef](Vec<acc_t> e) { return e * Vec<acc_t>(coef); }, gb, eb, n);
          } else if (!w_ptr) {
            const acc_t shift = smooth * scale;
            at::vec::map([coef, shift](Vec<acc_t> e) { return e * Vec<acc_t>(coef) - Vec<acc_t>(shift); }, gb, eb, n);
          } else {
            const acc_t shift = smooth * scale;
            at::vec::map2([coef, shift](Vec<acc_t> e, Vec<acc_t> w) { return e * Vec<acc_t>(coef) - Vec<acc_t>(shift) * w; },
                          gb, eb, w_ptr + b0, n);
          }
          i = n;
        }
        for (; i + Vec<acc_t>::size() <= n; i += Vec<acc_t>::size()) {
          Vec<acc_t> gv = va * prob(i);
          if (prob_target) gv = gv - vscale * Vec<acc_t>::loadu(qb + i);
          else if (smooth > 0) gv = gv - vs * (w_ptr ? Vec<acc_t>::loadu(w_ptr + b0 + i) : ones);
          if (capped) { const Vec<acc_t> t = Vec<acc_t>::loadu(xb + i) * vinv_cap; gv = gv * (ones - t * t); }
          gv.store(gb + i);
        }
        for (; i < n; ++i) {
          const acc_t p = eb ? eb[i] * to_prob : std::exp((xb[i] - stats.max) - log_sum);
          acc_t gi = res.softmax_coef * scale * p;
          if (prob_target) gi -= scale * qb[i];
          else if (smooth > 0) gi -= smooth * scale * (w_ptr ? w_ptr[b0 + i] : acc_t(1));
          if (capped) gi *= softcap_derivative(xb[i], cap);
          gb[i] = gi;
        }
        if (!prob_target && y >= b0 && y < b0 + n) {
          const acc_t w_y = w_ptr ? w_ptr[y] : acc_t(1);
          // A p - c with p -> 1 would cancel: (A - c) p + c (p - 1), with p - 1 = expm1(log p) exact.
          acc_t gy = (res.softmax_coef - res.onehot_coef) * std::exp(logp_target) +
                     res.onehot_coef * std::expm1(logp_target) - smooth * w_y;
          if (capped) gy *= softcap_derivative(x_target, cap);
          gb[y - b0] = gy * scale;
        }
        if (stream) stream_block<scalar_t>(gb, g + b0, n);
        else if (!direct) write_block<scalar_t>(gb, g + b0 * gl.stride_class, gl.stride_class, n);
      }
    }
    if (stream) finish_streaming();
  });
}


// The per-row results of row_coefficients for a vector of rows, one per SIMD lane (same formulas).
template <typename acc_t>
struct LaneResult {
  Vec<acc_t> loss, softmax_coef, onehot_coef;
};

template <typename acc_t>
inline LaneResult<acc_t> lane_coefficients(const CrossEntropyOptions& o, const Vec<acc_t>& lse, const Vec<acc_t>& logp,
                                           const Vec<acc_t>& w_target, const Vec<acc_t>& smooth_dot, acc_t weight_sum,
                                           int64_t C) {
  using V = Vec<acc_t>;
  const V one(acc_t(1));
  if (o.focal_gamma >= 0) {
    const V gamma(static_cast<acc_t>(o.focal_gamma));
    const V p = logp.exp();
    const V q = V(acc_t(0)) - logp.expm1();
    const V qg = q.pow(gamma);
    const V r = V::blendv(one, (V(acc_t(0)) - logp) / q, q > V(acc_t(0)));
    const V a = w_target * qg * (one + gamma * p * r);
    return {V(acc_t(0)) - w_target * qg * logp, a, a};
  }
  const acc_t eps = static_cast<acc_t>(o.label_smoothing);
  const acc_t z = static_cast<acc_t>(o.lse_square_scale);
  const acc_t smooth = eps / static_cast<acc_t>(C);
  const V kept = V(acc_t(1) - eps) * w_target;
  V loss = V(acc_t(0)) - kept * logp;
  if (eps > 0) loss = loss + V(smooth) * (V(weight_sum) * lse - smooth_dot);
  loss = loss + V(z) * lse * lse;
  return {loss, kept + V(smooth * weight_sum) + V(acc_t(2) * z) * lse, kept};
}

// Where the rows of a (outer, C, inner) view lie when consecutive rows fill the SIMD lanes: along `inner`
// for class-dim-1 layouts (each class plane is contiguous there), along `outer` for (N, C) rows, which a
// (1, C, N) view with the outer stride as lane stride describes. Row r is (r / lanes, r % lanes) either way.
struct LaneLayout {
  int64_t outer, lanes, stride_outer, stride_class, stride_lane;
  static LaneLayout of(const at::Tensor& t3d) {
    if (t3d.size(2) == 1) return {1, t3d.size(0), 0, t3d.stride(1), t3d.stride(0)};
    return {t3d.size(0), t3d.size(2), t3d.stride(0), t3d.stride(1), t3d.stride(2)};
  }
};

// Class-index cross-entropy (and softmax focal) with one row per SIMD lane: rows too short for a vector
// loop along the class dimension (CIFAR's 10 classes, detection heads) and class-dim-1 layouts, which the
// row kernel can only read with a stride. A group of kLaneRows rows is read class by class
// (in place where a class's lanes are contiguous fp32, else widened into a class-major tile), then max, exp
// and sum run across classes with every lane a different row; the target class, the only per-row
// irregularity, is patched in per lane.
// 32 rows: two cache lines of each fp32 class plane per group, so each plane is read in runs long enough for
// the prefetcher whatever the vector width (AVX2 with 16 rows measured ~2x slower on class-dim-1 layouts).
constexpr int64_t kLaneRows = 32;
template <typename acc_t>
constexpr int64_t kLaneVectors = std::max<int64_t>(1, kLaneRows / Vec<acc_t>::size());

template <typename scalar_t>
struct LaneProblem {
  using acc_t = opmath_t<scalar_t>;
  int64_t C;
  LaneLayout in, gl;
  const scalar_t* x;
  scalar_t* g;
  const int64_t* target;
  const acc_t* weight;
  acc_t* loss;
  acc_t* lse;
  CrossEntropyOptions options;
  acc_t cap, smooth, scale, weight_sum;
  int64_t groups_per_outer;
  bool stream;  // gradient written with non-temporal stores (see cross_entropy_lane_groups)
};

// The options that change the per-element loops are template flags, so those loops carry no branches (a
// generic version measured 2.4 cycles per element for the forward pass alone).
template <typename scalar_t, bool kGrad, bool kSmooth, bool kCapped>
void cross_entropy_lane_groups(const LaneProblem<scalar_t>& p, int64_t begin, int64_t end) {
  using acc_t = opmath_t<scalar_t>;
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  constexpr int64_t G = W * kLaneVectors<acc_t>;
  constexpr bool kNarrow = !std::is_same_v<scalar_t, acc_t>;
  const int64_t C = p.C;
  const CrossEntropyOptions& o = p.options;
  const V zero(acc_t(0)), one(acc_t(1));
  const V inv_cap(kCapped ? acc_t(1) / p.cap : acc_t(0));
  std::vector<acc_t> x_tile(C * G), e_tile(kGrad ? C * G : 0);
  std::vector<const acc_t*> x_class(C);
  // (N, C) rows: lanes are rows, classes contiguous within each.
  const bool rows_transposed = p.in.stride_class == 1 && p.in.stride_lane != 1;
  const bool rows_transposed_out = kGrad && p.gl.stride_class == 1 && p.gl.stride_lane != 1;
  // Into a reused (resident) gradient buffer, full cache lines are written with non-temporal stores, which
  // skip reading each line before overwriting it: contiguous (N, C) rows as one run per group, class planes as
  // one run per class. Transposed straight into the rows, each 64-byte store straddles two lines.
  const bool stream_rows = p.stream && rows_transposed_out && p.gl.stride_lane == C;
  const bool stream_planes = p.stream && p.gl.stride_lane == 1;
  std::vector<acc_t> row_buf((kNarrow && (rows_transposed || rows_transposed_out)) || stream_rows ? C * G : 0);
  alignas(64) acc_t x_target[G], w_target[G], valid[G], patch[G];
  int64_t target_class[G];

  for (int64_t group = begin; group < end; ++group) {
    const int64_t o_index = group / p.groups_per_outer, lane0 = (group % p.groups_per_outer) * G;
    const int64_t n = std::min(G, p.in.lanes - lane0);
    const int64_t r0 = o_index * p.in.lanes + lane0;
    const scalar_t* x0 = p.x + o_index * p.in.stride_outer + lane0 * p.in.stride_lane;
    // fp32 lanes that are contiguous are read where they lie; anything else is widened into the tile,
    // (N, C) rows by a register-block transpose.
    const bool read_in_place = !kNarrow && !kCapped && n == G && p.in.stride_lane == 1;
    if (rows_transposed) {
      if constexpr (kNarrow) {
        for (int64_t l = 0; l < n; ++l) read_block(x0 + l * p.in.stride_lane, 1, C, row_buf.data() + l * C, true);
        transpose(row_buf.data(), C, x_tile.data(), G, n, C);
      } else {
        transpose(x0, p.in.stride_lane, x_tile.data(), G, n, C);
      }
      if (n < G) {
        for (int64_t c = 0; c < C; ++c) std::fill(x_tile.data() + c * G + n, x_tile.data() + (c + 1) * G, acc_t(0));
      }
    }

    // The next group's lanes of every class plane, asked for now: a class-dim-1 group reads one short run
    // from each of C planes, more streams than the hardware prefetcher follows.
    const bool prefetch_next = p.in.stride_lane == 1 && lane0 + 2 * G <= p.in.lanes;
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* src = x0 + c * p.in.stride_class;
      if (prefetch_next) prefetch(src + G, G);
      else if (rows_transposed && c < G && lane0 + G + c < p.in.lanes) prefetch(x0 + (G + c) * p.in.stride_lane, C);
      if (read_in_place) {
        x_class[c] = reinterpret_cast<const acc_t*>(src);
        continue;
      }
      acc_t* tile = x_tile.data() + c * G;
      if (!rows_transposed) {
        read_block(src, p.in.stride_lane, n, tile, true);
        std::fill(tile + n, tile + G, acc_t(0));
      }
      if constexpr (kCapped) apply_softcap(tile, G, p.cap);
      x_class[c] = tile;
    }
    // One vector of lanes at a time, so that each accumulator stays in a register across the classes. The
    // max need not propagate NaN: exp(NaN - max) makes the lane's sum NaN anyway.
    constexpr int64_t K = kLaneVectors<acc_t>;
    V vmax[K], vsum[K], vdot[K];
    for (int64_t k = 0; k < K; ++k) {
      V m(-std::numeric_limits<acc_t>::infinity()), d = zero;
      for (int64_t c = 0; c < C; ++c) {
        const V v = V::loadu(x_class[c] + k * W);
        m = at::vec::clamp_min(v, m);
        if constexpr (kSmooth) d = at::vec::fmadd(v, V(p.weight ? p.weight[c] : acc_t(1)), d);
      }
      V total = zero;
      for (int64_t c = 0; c < C; ++c) {
        const V e = fast_exp(V::loadu(x_class[c] + k * W) - m);
        if constexpr (kGrad) e.store(e_tile.data() + c * G + k * W);
        total = total + e;
      }
      vmax[k] = m;
      vsum[k] = total;
      vdot[k] = d;
    }
    for (int64_t l = 0; l < G; ++l) {
      const int64_t y = l < n ? p.target[r0 + l] : o.ignore_index;
      const bool counted = l < n && y != o.ignore_index;
      target_class[l] = counted ? y : -1;
      x_target[l] = counted ? x_class[y][l] : acc_t(0);
      w_target[l] = counted ? (p.weight ? p.weight[y] : acc_t(1)) : acc_t(0);
      valid[l] = counted ? acc_t(1) : acc_t(0);
    }
    V coef[K], shift[K];
    for (int64_t k = 0; k < K; ++k) {
      const V mask = V::loadu(valid + k * W) == one;
      const V log_sum = vsum[k].log();
      const V lse = vmax[k] + log_sum;
      // (x - max) - log_sum, not x - lse: see cross_entropy_rows.
      const V xt = V::loadu(x_target + k * W);
      const V logp = (xt - vmax[k]) - log_sum;
      const V wt = V::loadu(w_target + k * W);
      const LaneResult<acc_t> res = lane_coefficients<acc_t>(o, lse, logp, wt, vdot[k], p.weight_sum, C);
      const int64_t lanes_here = std::max<int64_t>(0, std::min(W, n - k * W));
      if (lanes_here > 0) {
        V::blendv(zero, res.loss, mask).store(p.loss + r0 + k * W, lanes_here);
        V::blendv(zero, lse, mask).store(p.lse + r0 + k * W, lanes_here);
      }
      if constexpr (kGrad) {
        const V vscale(p.scale);
        coef[k] = V::blendv(zero, res.softmax_coef * vscale / vsum[k], mask);
        shift[k] = V::blendv(zero, V(p.smooth * p.scale), mask);
        // A p - c with p -> 1 would cancel: (A - c) p + c (p - 1), with p - 1 = expm1(log p) exact.
        V gy = (res.softmax_coef - res.onehot_coef) * logp.exp() + res.onehot_coef * logp.expm1() - V(p.smooth) * wt;
        if constexpr (kCapped) { const V t = xt * inv_cap; gy = gy * (one - t * t); }
        (gy * vscale).store(patch + k * W);
      }
    }
    if constexpr (kGrad) {
      scalar_t* g0 = p.g + o_index * p.gl.stride_outer + lane0 * p.gl.stride_lane;
      const bool write_in_place = !kNarrow && !stream_planes && n == G && p.gl.stride_lane == 1;
      for (int64_t c = 0; c < C; ++c) {
        acc_t* ec = e_tile.data() + c * G;
        acc_t* out = write_in_place ? reinterpret_cast<acc_t*>(g0 + c * p.gl.stride_class) : ec;
        const V wc(p.weight ? p.weight[c] : acc_t(1));
        for (int64_t k = 0; k < K; ++k) {
          V gv = V::loadu(ec + k * W) * coef[k];
          if constexpr (kSmooth) gv = gv - shift[k] * wc;
          if constexpr (kCapped) { const V t = V::loadu(x_class[c] + k * W) * inv_cap; gv = gv * (one - t * t); }
          gv.store(out + k * W);
        }
      }
      // The zero coefficients give ignored rows exactly 0 only where their exponentials are finite: those rows,
      // and the target entries, are set here.
      for (int64_t l = 0; l < n; ++l) {
        const int64_t y = target_class[l];
        if (write_in_place) {
          acc_t* col = reinterpret_cast<acc_t*>(g0) + l;
          if (y >= 0) col[y * p.gl.stride_class] = patch[l];
          else for (int64_t c = 0; c < C; ++c) col[c * p.gl.stride_class] = acc_t(0);
        } else {
          if (y >= 0) e_tile[y * G + l] = patch[l];
          else for (int64_t c = 0; c < C; ++c) e_tile[c * G + l] = acc_t(0);
        }
      }
      if (rows_transposed_out && (stream_rows || kNarrow)) {
        // Back to row-major in the staging buffer, then streamed as one run or narrowed row by row.
        transpose(e_tile.data(), G, row_buf.data(), C, C, n);
        if (stream_rows) stream_block<scalar_t>(row_buf.data(), g0, n * C);
        else for (int64_t l = 0; l < n; ++l) write_block<scalar_t>(row_buf.data() + l * C, g0 + l * p.gl.stride_lane, 1, C);
      } else if (rows_transposed_out) {
        if constexpr (!kNarrow) transpose(e_tile.data(), G, reinterpret_cast<acc_t*>(g0), p.gl.stride_lane, C, n);
      } else if (stream_planes) {
        for (int64_t c = 0; c < C; ++c) stream_block<scalar_t>(e_tile.data() + c * G, g0 + c * p.gl.stride_class, n);
      } else if (!write_in_place) {
        for (int64_t c = 0; c < C; ++c) write_block<scalar_t>(e_tile.data() + c * G, g0 + c * p.gl.stride_class, p.gl.stride_lane, n);
      }
    }
  }
  if (p.stream) finish_streaming();
}

template <typename scalar_t>
void cross_entropy_lanes(const at::Tensor& input, const int64_t* index_ptr, const at::Tensor& weight,
                         const CrossEntropyOptions& o, at::Tensor* grad, double grad_scale, at::Tensor& row_loss,
                         at::Tensor& row_lse) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int64_t G = Vec<acc_t>::size() * kLaneVectors<acc_t>;
  LaneProblem<scalar_t> p;
  p.C = input.size(1);
  p.in = LaneLayout::of(input);
  p.gl = grad ? LaneLayout::of(*grad) : p.in;
  p.x = input.const_data_ptr<scalar_t>();
  p.g = grad ? grad->mutable_data_ptr<scalar_t>() : nullptr;
  p.target = index_ptr;
  p.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
  p.loss = row_loss.mutable_data_ptr<acc_t>();
  p.lse = row_lse.mutable_data_ptr<acc_t>();
  p.options = o;
  p.cap = static_cast<acc_t>(o.softcap);
  p.smooth = o.focal_gamma >= 0 ? acc_t(0) : static_cast<acc_t>(o.label_smoothing) / static_cast<acc_t>(p.C);
  p.scale = static_cast<acc_t>(grad_scale);
  p.weight_sum = p.weight ? sum(p.weight, p.C) : static_cast<acc_t>(p.C);
  p.groups_per_outer = (p.in.lanes + G - 1) / G;
  p.stream = p.g != nullptr && static_cast<const void*>(p.g) != static_cast<const void*>(p.x) &&
             gradient_pages_resident(p.g);
  const int64_t grain = std::max<int64_t>(1, kRowGrainElements / (p.C * G));
  auto run = [&](auto grad_flag, auto smooth_flag, auto capped_flag) {
    at::parallel_for(0, p.in.outer * p.groups_per_outer, grain, [&](int64_t begin, int64_t end) {
      cross_entropy_lane_groups<scalar_t, decltype(grad_flag)::value, decltype(smooth_flag)::value,
                                decltype(capped_flag)::value>(p, begin, end);
    });
  };
  auto with_capped = [&](auto grad_flag, auto smooth_flag) {
    if (o.softcap > 0) run(grad_flag, smooth_flag, std::true_type{});
    else run(grad_flag, smooth_flag, std::false_type{});
  };
  auto with_smooth = [&](auto grad_flag) {
    if (p.smooth > 0) with_capped(grad_flag, std::true_type{});
    else with_capped(grad_flag, std::false_type{});
  };
  if (p.g) with_smooth(std::true_type{});
  else with_smooth(std::false_type{});
}

// Which kernel serves a class-index call. (N, C) rows: the lane kernel up to kLaneRowClasses classes, beyond
// which a row is long enough for the row kernel's vector loop (65536 rows, 1 thread, fwd+bwd, AVX-512, fp32 /
// bf16 ms: lanes 1.5/1.9, 3.1/3.3, 4.9/5.8, 5.9/6.5, 7.2/7.9, 12.0/12.7 at C = 32, 64, 100, 128, 160, 256; rows
// 5.2/5.5, 5.6/6.0, 8.5/11.0, 7.2/7.4, 7.3/9.8, 10.2/10.9). Class-dim-1 (inner > 1): the lane kernel
// whenever its class-major tile (C x 32 values per thread, twice with a gradient) stays in L2.
constexpr int64_t kLaneRowClasses = 160;
constexpr int64_t kLaneTileClasses = 2048;

inline bool lanes_kernel_serves(const at::Tensor& input, const at::Tensor& target) {
  if (target.is_floating_point()) return false;
  return input.size(2) > 1 ? input.size(1) <= kLaneTileClasses : input.size(1) <= kLaneRowClasses;
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
    // A branch-free scan (it vectorises), then a second look only to name the first bad target.
    const int64_t* t = target.const_data_ptr<int64_t>();
    const int64_t ignore = options.ignore_index;
    bool any_bad = false;
    for (int64_t r = 0; r < rows; ++r) any_bad |= (t[r] != ignore) & (static_cast<uint64_t>(t[r]) >= static_cast<uint64_t>(C));
    for (int64_t r = 0; any_bad && r < rows; ++r) {
      TORCH_CHECK_INDEX(t[r] == ignore || (t[r] >= 0 && t[r] < C), "Target ", t[r],
                        " is out of bounds (number of classes is ", C, ", ignore_index is ", ignore, ").");
    }
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
      if (lanes_kernel_serves(input, target)) {
        cross_entropy_lanes<scalar_t>(input, target.const_data_ptr<int64_t>(), w, options, g.defined() ? &g : nullptr,
                                      grad_scale, row_loss, row_lse);
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
    total = deterministic_sum(rows, [l](int64_t b, int64_t e) {
      double s = 0.0;
      for (int64_t i = b; i < e; ++i) s += static_cast<double>(l[i]);
      return s;
    });
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
}  // namespace

LOSSOPS_REGISTER_KERNEL("cross_entropy", cross_entropy_kernel, &cross_entropy_forward, "input", "target", "weight",
                        "grad", "ignore_index", "label_smoothing", "lse_square_scale", "softcap", "focal_gamma",
                        "grad_scale");

}  // namespace lossops
