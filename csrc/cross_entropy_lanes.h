// The cross-entropy lane kernel: class-index rows too short for a vector loop along the class dimension, and
// class-dim-1 layouts, computed one row per SIMD lane. cross_entropy.cpp includes it and chooses it
// (lanes_kernel_serves); same results as its row kernel (cross_entropy_rows).
#pragma once

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "kernel_abi.h"

namespace lossops {
namespace {
// Named: the per-ISA unity build puts every family file in one translation unit (see ctc.cpp).
namespace ce_lanes {

template <typename acc_t>
using Vec = at::vec::Vectorized<acc_t>;

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
    V p, p_m1;
    exp_and_expm1(logp, p, p_m1);
    const V q = V(acc_t(0)) - p_m1;
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
  return {loss, kept + V(eps > 0 ? smooth * weight_sum : acc_t(0)) + V(acc_t(2) * z) * lse, kept};
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
// the prefetcher whatever the vector width (16 rows on AVX2 left class-dim-1 layouts waiting on memory).
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
  bool stream;  // gradient written with non-temporal stores (see LaneGroups)
};

// Where a group of G rows lies: its outer index and first lane, how many of its lanes hold rows (n), and its
// first row.
struct LaneGroupAt {
  int64_t o_index, lane0, n, r0;
};

// The four phases of a group of rows: its logits as class planes (load), max and sum of exponentials across the
// classes (statistics), each row's results and gradient coefficients (results), the gradient (write_gradient).
// A LaneGroups holds what every group of a call shares and nothing else, so that the compiler keeps it in
// registers; the thread's buffers are a Buffers of their own. The phases are always inlined into
// cross_entropy_lane_groups, so that the K vectors of accumulators they hand each other stay in registers too,
// as in one function.
#define LOSSOPS_LANE_PHASE __attribute__((always_inline)) inline
template <typename scalar_t, bool kGrad, bool kSmooth, bool kCapped>
struct LaneGroups {
  using acc_t = opmath_t<scalar_t>;
  using V = Vec<acc_t>;
  static constexpr int64_t W = V::size();
  static constexpr int64_t K = kLaneVectors<acc_t>;
  static constexpr int64_t G = W * K;
  static constexpr bool kNarrow = !std::is_same_v<scalar_t, acc_t>;

  const LaneProblem<scalar_t>& p;
  const int64_t C;
  // (N, C) rows: lanes are rows, classes contiguous within each.
  const bool rows_transposed, rows_transposed_out;
  // Into a reused (resident) gradient buffer, full cache lines are written with non-temporal stores, which
  // skip reading each line before overwriting it: contiguous (N, C) rows as one run per group, class planes as
  // one run per class. Transposed straight into the rows, each 64-byte store straddles two lines.
  const bool stream_rows, stream_planes;

  explicit LaneGroups(const LaneProblem<scalar_t>& problem)
      : p(problem), C(problem.C), rows_transposed(p.in.stride_class == 1 && p.in.stride_lane != 1),
        rows_transposed_out(kGrad && p.gl.stride_class == 1 && p.gl.stride_lane != 1),
        stream_rows(p.stream && rows_transposed_out && p.gl.stride_lane == C),
        stream_planes(p.stream && p.gl.stride_lane == 1) {}

  // One thread's tiles and per-lane scratch, reused for each of its groups.
  struct Buffers {
    std::vector<acc_t> x_tile, e_tile;
    std::vector<const acc_t*> x_class;
    std::vector<acc_t> row_buf;
    alignas(64) acc_t x_target[G], w_target[G], valid[G], patch[G];
    int64_t target_class[G];

    explicit Buffers(const LaneGroups& groups)
        : x_tile(groups.C * G), e_tile(kGrad ? groups.C * G : 0), x_class(groups.C),
          row_buf((kNarrow && (groups.rows_transposed || groups.rows_transposed_out)) || groups.stream_rows
                      ? groups.C * G
                      : 0) {}
  };

  // Points x_class[c] at class c's G lanes of the group.
  LOSSOPS_LANE_PHASE LaneGroupAt load(int64_t group, Buffers& b) const {
    const int64_t o_index = group / p.groups_per_outer, lane0 = (group % p.groups_per_outer) * G;
    const int64_t n = std::min(G, p.in.lanes - lane0);
    const scalar_t* x0 = p.x + o_index * p.in.stride_outer + lane0 * p.in.stride_lane;
    // fp32 lanes that are contiguous are read where they lie; anything else is widened into the tile,
    // (N, C) rows by a register-block transpose.
    const bool read_in_place = !kNarrow && !kCapped && n == G && p.in.stride_lane == 1;
    if (rows_transposed) {
      if constexpr (kNarrow) {
        for (int64_t l = 0; l < n; ++l) read_block(x0 + l * p.in.stride_lane, 1, C, b.row_buf.data() + l * C, true);
        transpose(b.row_buf.data(), C, b.x_tile.data(), G, n, C);
      } else {
        transpose(x0, p.in.stride_lane, b.x_tile.data(), G, n, C);
      }
      if (n < G) {
        for (int64_t c = 0; c < C; ++c) std::fill(b.x_tile.data() + c * G + n, b.x_tile.data() + (c + 1) * G, acc_t(0));
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
        b.x_class[c] = reinterpret_cast<const acc_t*>(src);
        continue;
      }
      acc_t* tile = b.x_tile.data() + c * G;
      if (!rows_transposed) {
        read_block(src, p.in.stride_lane, n, tile, true);
        std::fill(tile + n, tile + G, acc_t(0));
      }
      if constexpr (kCapped) apply_softcap(tile, G, p.cap);
      b.x_class[c] = tile;
    }
    return {o_index, lane0, n, o_index * p.in.lanes + lane0};
  }

  // The K vectors of lanes side by side, each with its accumulators in registers across the classes, so that
  // their exponentials go through fast_exp_batch together. The max need not propagate NaN: exp(NaN - max) makes
  // the lane's sum NaN anyway. With a gradient the exponentials are kept in e_tile.
  LOSSOPS_LANE_PHASE void statistics(Buffers& b, V* vmax, V* vsum, V* vdot) const {
    const V zero(acc_t(0));
    for (int64_t k = 0; k < K; ++k) {
      vmax[k] = V(-std::numeric_limits<acc_t>::infinity());
      vsum[k] = zero;
      vdot[k] = zero;
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t k = 0; k < K; ++k) {
        const V v = V::loadu(b.x_class[c] + k * W);
        vmax[k] = at::vec::clamp_min(v, vmax[k]);
        if constexpr (kSmooth) vdot[k] = at::vec::fmadd(v, V(p.weight ? p.weight[c] : acc_t(1)), vdot[k]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      V e[K];
      for (int64_t k = 0; k < K; ++k) e[k] = V::loadu(b.x_class[c] + k * W) - vmax[k];
      fast_exp_batch<K>(e);
      for (int64_t k = 0; k < K; ++k) {
        if constexpr (kGrad) e[k].store(b.e_tile.data() + c * G + k * W);
        vsum[k] = vsum[k] + e[k];
      }
    }
  }

  // Each row's loss and logsumexp; with a gradient, each vector's coefficient of the kept exponentials (coef), its
  // smoothing term (shift) and the rows' target entries (patch).
  LOSSOPS_LANE_PHASE void results(const LaneGroupAt& at, Buffers& b, const V* vmax, const V* vsum, const V* vdot,
                                  V* coef, V* shift) const {
    const CrossEntropyOptions& o = p.options;
    const V zero(acc_t(0)), one(acc_t(1));
    const V inv_cap(kCapped ? acc_t(1) / p.cap : acc_t(0));
    const int64_t n = at.n, r0 = at.r0;
    for (int64_t l = 0; l < G; ++l) {
      const int64_t y = l < n ? p.target[r0 + l] : o.ignore_index;
      const bool counted = l < n && y != o.ignore_index;
      b.target_class[l] = counted ? y : -1;
      b.x_target[l] = counted ? b.x_class[y][l] : acc_t(0);
      b.w_target[l] = counted ? (p.weight ? p.weight[y] : acc_t(1)) : acc_t(0);
      b.valid[l] = counted ? acc_t(1) : acc_t(0);
    }
    for (int64_t k = 0; k < K; ++k) {
      const V mask = V::loadu(b.valid + k * W) == one;
      const V log_sum = vsum[k].log();
      const V lse = vmax[k] + log_sum;
      // (x - max) - log_sum, not x - lse: see cross_entropy_row.
      const V xt = V::loadu(b.x_target + k * W);
      const V logp = (xt - vmax[k]) - log_sum;
      const V wt = V::loadu(b.w_target + k * W);
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
        V p_target, p_target_m1;
        exp_and_expm1(logp, p_target, p_target_m1);
        V gy = (res.softmax_coef - res.onehot_coef) * p_target + res.onehot_coef * p_target_m1 - V(p.smooth) * wt;
        if constexpr (kCapped) { const V t = xt * inv_cap; gy = gy * (one - t * t); }
        (gy * vscale).store(b.patch + k * W);
      }
    }
  }

  // The group's gradient from the kept exponentials: in place where its class planes are contiguous fp32, else
  // through e_tile and written out (transposed back for (N, C) rows, streamed where it pays).
  LOSSOPS_LANE_PHASE void write_gradient(const LaneGroupAt& at, Buffers& b, const V* coef, const V* shift) const {
    const V one(acc_t(1));
    const V inv_cap(kCapped ? acc_t(1) / p.cap : acc_t(0));
    const int64_t n = at.n;
    scalar_t* g0 = p.g + at.o_index * p.gl.stride_outer + at.lane0 * p.gl.stride_lane;
    const bool write_in_place = !kNarrow && !stream_planes && n == G && p.gl.stride_lane == 1;
    for (int64_t c = 0; c < C; ++c) {
      acc_t* ec = b.e_tile.data() + c * G;
      acc_t* out = write_in_place ? reinterpret_cast<acc_t*>(g0 + c * p.gl.stride_class) : ec;
      const V wc(p.weight ? p.weight[c] : acc_t(1));
      for (int64_t k = 0; k < K; ++k) {
        V gv = V::loadu(ec + k * W) * coef[k];
        if constexpr (kSmooth) gv = gv - shift[k] * wc;
        if constexpr (kCapped) { const V t = V::loadu(b.x_class[c] + k * W) * inv_cap; gv = gv * (one - t * t); }
        gv.store(out + k * W);
      }
    }
    // The zero coefficients give ignored rows exactly 0 only where their exponentials are finite: those rows,
    // and the target entries, are set here.
    for (int64_t l = 0; l < n; ++l) {
      const int64_t y = b.target_class[l];
      if (write_in_place) {
        acc_t* col = reinterpret_cast<acc_t*>(g0) + l;
        if (y >= 0) col[y * p.gl.stride_class] = b.patch[l];
        else for (int64_t c = 0; c < C; ++c) col[c * p.gl.stride_class] = acc_t(0);
      } else {
        if (y >= 0) b.e_tile[y * G + l] = b.patch[l];
        else for (int64_t c = 0; c < C; ++c) b.e_tile[c * G + l] = acc_t(0);
      }
    }
    if (rows_transposed_out && (stream_rows || kNarrow)) {
      // Back to row-major in the staging buffer, then streamed as one run or narrowed row by row.
      transpose(b.e_tile.data(), G, b.row_buf.data(), C, C, n);
      if (stream_rows) stream_block<scalar_t>(b.row_buf.data(), g0, n * C);
      else for (int64_t l = 0; l < n; ++l) write_block<scalar_t>(b.row_buf.data() + l * C, g0 + l * p.gl.stride_lane, 1, C);
    } else if (rows_transposed_out) {
      if constexpr (!kNarrow) transpose(b.e_tile.data(), G, reinterpret_cast<acc_t*>(g0), p.gl.stride_lane, C, n);
    } else if (stream_planes) {
      for (int64_t c = 0; c < C; ++c) stream_block<scalar_t>(b.e_tile.data() + c * G, g0 + c * p.gl.stride_class, n);
    } else if (!write_in_place) {
      for (int64_t c = 0; c < C; ++c) write_block<scalar_t>(b.e_tile.data() + c * G, g0 + c * p.gl.stride_class, p.gl.stride_lane, n);
    }
  }
};
#undef LOSSOPS_LANE_PHASE

// The options that change the per-element loops are template flags, so those loops carry no branches (a
// generic version spent its time on them in the forward pass alone).
template <typename scalar_t, bool kGrad, bool kSmooth, bool kCapped>
void cross_entropy_lane_groups(const LaneProblem<scalar_t>& p, int64_t begin, int64_t end) {
  using Groups = LaneGroups<scalar_t, kGrad, kSmooth, kCapped>;
  using V = typename Groups::V;
  constexpr int64_t K = Groups::K;
  const Groups groups(p);
  typename Groups::Buffers buffers(groups);
  for (int64_t group = begin; group < end; ++group) {
    const LaneGroupAt at = groups.load(group, buffers);
    V vmax[K], vsum[K], vdot[K], coef[K], shift[K];
    groups.statistics(buffers, vmax, vsum, vdot);
    groups.results(at, buffers, vmax, vsum, vdot, coef, shift);
    if constexpr (kGrad) groups.write_gradient(at, buffers, coef, shift);
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
  p.weight_sum = p.weight ? vec_sum(p.weight, p.C) : static_cast<acc_t>(p.C);
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
// which a row is long enough for the row kernel's vector loop (the crossover was measured; the timings are in
// docs/tuning.md). Class-dim-1 (inner > 1): the lane kernel whenever its class-major tile (C x 32 values per
// thread, twice with a gradient) stays in L2.
constexpr int64_t kLaneRowClasses = 160;
constexpr int64_t kLaneTileClasses = 2048;

inline bool lanes_kernel_serves(const at::Tensor& input, const at::Tensor& target) {
  if (target.is_floating_point()) return false;
  return input.size(2) > 1 ? input.size(1) <= kLaneTileClasses : input.size(1) <= kLaneRowClasses;
}

}  // namespace ce_lanes
}  // namespace
}  // namespace lossops
