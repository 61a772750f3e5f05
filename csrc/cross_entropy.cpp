// Cross-entropy over the class dimension, and softmax focal loss as a per-row variant of it: the row driver and
// the kernel entry point, which picks between it and the lane kernel (cross_entropy_lanes.h).
//
// One forward pass per row computes the loss and, while the row is still in cache, the gradient
// (softmax - target distribution, with smoothing, weights, z-loss and softcap folded in), already scaled
// by the reduction's 1/denominator. Backward is then only a multiplication by grad_output. The row math is in
// softmax_rows.h.
//
// inplace_backward=True cannot write the gradient in forward (the logits stay readable until backward), so the
// kernel runs twice, joined by a row state: forward, given an empty `row_state` and no gradient buffer, saves each
// row's statistics there (max, log-sum, the gradient's two coefficients and the refs of its cached exponentials);
// backward, given that state and the gradient buffer, reads each row from memory once (the gradient pass finds it
// in cache), makes the same exponentials again and writes the gradient without a statistics pass. Its bits are
// those of the one-pass gradient. Rows the lane kernel serves save nothing: an empty state means backward runs the
// whole kernel.
#include <algorithm>
#include <limits>
#include <optional>
#include <vector>

#include "common.h"
#include "cross_entropy_lanes.h"
#include "kernel_abi.h"
#include "softmax_rows.h"

namespace lossops {
namespace {

// What every row of one call shares: the tensors' data and layouts, and the options in the opmath type.
template <typename scalar_t>
struct CrossEntropyRows {
  using acc_t = opmath_t<scalar_t>;
  CrossEntropyOptions o;
  int64_t C, rows;
  RowLayout in, gl, tl;
  bool prob_target;
  // Probability targets come in the input's dtype, or in the accumulation dtype (e.g. fp32 targets for
  // bf16 logits under autocast) so that they are not rounded to bf16.
  bool prob_in_acc;
  const scalar_t* x_ptr;
  scalar_t* g_ptr;
  const int64_t* index_ptr;
  const scalar_t* prob_ptr;
  const acc_t* prob_acc_ptr;
  const acc_t* w_ptr;
  acc_t* loss_ptr;
  acc_t* lse_ptr;
  // row_state: saved by a forward without a gradient (save_state), read by the backward that writes it (resume).
  acc_t* state_ptr;
  bool save_state, resume;
  int64_t state_width;
  acc_t cap;
  bool capped;
  acc_t eps, smooth, scale, weight_sum;
  bool need_smooth_dot;
  // With a gradient to write, rows that fit in L2 keep their exponentials from the first pass, so the
  // second pass needs one multiply per element instead of a reload and an exp.
  bool cache_exp;
  // The statistics summed in the cached exponentials' order: with cache_exp, and when saving the state a resumed
  // gradient makes those exponentials again from (then block by block in a one-block scratch).
  bool cached_order;
  int64_t blocks;
  bool stream;

  CrossEntropyRows(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                   const CrossEntropyOptions& options, at::Tensor* grad, double grad_scale, at::Tensor& row_loss,
                   at::Tensor& row_lse, at::Tensor* row_state)
      : o(options) {
    C = input.size(1);
    rows = input.size(0) * input.size(2);
    in = RowLayout::of(input);
    gl = grad ? RowLayout::of(*grad) : in;
    prob_target = target.is_floating_point();
    tl = prob_target ? RowLayout::of(target) : in;

    x_ptr = input.const_data_ptr<scalar_t>();
    g_ptr = grad ? grad->mutable_data_ptr<scalar_t>() : nullptr;
    index_ptr = prob_target ? nullptr : target.const_data_ptr<int64_t>();
    prob_in_acc = prob_target && target.scalar_type() != input.scalar_type();
    prob_ptr = prob_target && !prob_in_acc ? target.const_data_ptr<scalar_t>() : nullptr;
    prob_acc_ptr = prob_in_acc ? target.const_data_ptr<acc_t>() : nullptr;
    w_ptr = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    resume = grad != nullptr && row_state != nullptr;
    save_state = grad == nullptr && row_state != nullptr;
    loss_ptr = resume ? nullptr : row_loss.mutable_data_ptr<acc_t>();
    lse_ptr = resume ? nullptr : row_lse.mutable_data_ptr<acc_t>();

    cap = static_cast<acc_t>(o.softcap);
    capped = o.softcap > 0;
    eps = static_cast<acc_t>(o.label_smoothing);
    smooth = o.focal_gamma >= 0 ? acc_t(0) : eps / static_cast<acc_t>(C);
    scale = static_cast<acc_t>(grad_scale);
    weight_sum = static_cast<acc_t>(C);
    if (w_ptr) weight_sum = vec_sum(w_ptr, C);
    need_smooth_dot = !prob_target && eps > 0;

    cache_exp = g_ptr != nullptr && C <= kExpCacheElements;
    cached_order = (g_ptr != nullptr || save_state) && C <= kExpCacheElements;
    blocks = (C + kBlock - 1) / kBlock;
    stream = stream_row_gradient(g_ptr, gl.stride_class, x_ptr);
    state_width = row_state_width(C);
    state_ptr = nullptr;
    if (row_state != nullptr) {
      TORCH_CHECK(row_state->is_cpu() && row_state->is_contiguous() &&
                      row_state->scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                  "lossops: cross_entropy: row_state must be a contiguous CPU tensor of the accumulation dtype");
      if (save_state) row_state->resize_({rows * state_width});
      TORCH_CHECK(row_state->numel() == rows * state_width,
                  "lossops: cross_entropy: row_state does not hold this call's rows");
      state_ptr = row_state->mutable_data_ptr<acc_t>();
    }
  }

  // max, log-sum, the softmax and one-hot coefficients, then each block's exponential ref where they are cached.
  static int64_t row_state_width(int64_t C) {
    return 4 + (C <= kExpCacheElements ? (C + kBlock - 1) / kBlock : 0);
  }
};

// One thread's buffers, reused for each of its rows: a block of logits, targets and gradient, and a row's
// cached exponentials with the max of each block they are relative to (when saving a row state without a
// gradient, one block's exponentials: see cached_order).
template <typename acc_t>
struct RowScratch {
  std::vector<acc_t> xbuf, tbuf, gbuf, exp_cache, block_ref;

  template <typename scalar_t>
  explicit RowScratch(const CrossEntropyRows<scalar_t>& p)
      : xbuf(kBlock), tbuf(kBlock), gbuf(kBlock), exp_cache(p.cache_exp ? p.C : p.cached_order ? kBlock : 0),
        block_ref(p.cache_exp ? p.blocks : 0) {}
};

// Classes [b0, b0 + n) of row r's target distribution q_c = w_c * (t_c * (1 - eps) + eps / C) for probability
// targets (in s.tbuf); nullptr for class indices.
template <typename scalar_t>
inline const opmath_t<scalar_t>* target_distribution(const CrossEntropyRows<scalar_t>& p,
                                                     RowScratch<opmath_t<scalar_t>>& s, int64_t r, int64_t b0,
                                                     int64_t n) {
  using acc_t = opmath_t<scalar_t>;
  if (!p.prob_target) return nullptr;
  const int64_t offset = p.tl.row_offset(r) + b0 * p.tl.stride_class;
  if (p.prob_in_acc) read_block(p.prob_acc_ptr + offset, p.tl.stride_class, n, s.tbuf.data(), true);
  else read_block(p.prob_ptr + offset, p.tl.stride_class, n, s.tbuf.data(), true);
  const Vec<acc_t> keep(acc_t(1) - p.eps), add(p.eps / static_cast<acc_t>(p.C));
  at::vec::map([&](Vec<acc_t> t) { return t * keep + add; }, s.tbuf.data(), s.tbuf.data(), n);
  if (p.w_ptr) {
    at::vec::map2([](Vec<acc_t> t, Vec<acc_t> w) { return t * w; }, s.tbuf.data(), s.tbuf.data(), p.w_ptr + b0, n);
  }
  return s.tbuf.data();
}

// Row r's loss and logsumexp, and its gradient when one is written; `end` is the end of the thread's rows (the
// next row's first block is prefetched). Always inlined: it is the body of the thread's row loop, and as a call
// the compiler would see neither the call's invariants nor the thread's buffers as the loop's own.
template <typename scalar_t>
__attribute__((always_inline)) inline void cross_entropy_row(const CrossEntropyRows<scalar_t>& p,
                                                             RowScratch<opmath_t<scalar_t>>& s, int64_t r,
                                                             int64_t end) {
  using acc_t = opmath_t<scalar_t>;
  const CrossEntropyOptions& o = p.o;
  const int64_t C = p.C;
  const scalar_t* x = p.x_ptr + p.in.row_offset(r);
  int64_t y = -1;
  if (!p.prob_target) {
    y = p.index_ptr[r];
    if (y == o.ignore_index) {
      p.loss_ptr[r] = 0;
      p.lse_ptr[r] = 0;
      if (p.g_ptr) {
        scalar_t* g = p.g_ptr + p.gl.row_offset(r);
        for (int64_t c = 0; c < C; ++c) g[c * p.gl.stride_class] = scalar_t(0);
      }
      return;
    }
  }
  const RowLogits<scalar_t> logits{x, p.in.stride_class, p.capped, p.cap, s.xbuf.data()};
  auto load_x = [&](int64_t b0, int64_t n) { return logits.block(b0, n); };
  auto load_q = [&](int64_t b0, int64_t n) { return target_distribution(p, s, r, b0, n); };
  // With a gradient to write, the hardware prefetcher alone leaves the statistics pass waiting on memory:
  // ask for the next block (or the next row's first) into L2 while this one is computed. Without a gradient
  // the same hint made the read-only pass slower, so it is given only with one.
  auto load_x_prefetching = [&](int64_t b0, int64_t n) {
    if (p.g_ptr && p.in.stride_class == 1) {
      if (b0 + kBlock < C) prefetch(x + b0 + kBlock, std::min(kBlock, C - b0 - kBlock));
      else if (r + 1 < end) prefetch(p.x_ptr + p.in.row_offset(r + 1), std::min(kBlock, C));
    }
    return load_x(b0, n);
  };

  acc_t smooth_dot = 0, q_sum = 0, q_dot = 0;
  acc_t* state = p.save_state ? p.state_ptr + r * p.state_width : nullptr;
  acc_t* block_ref = state ? state + 4 : s.block_ref.data();
  const BlockStats<acc_t> stats = row_statistics(
      C, load_x_prefetching, p.cached_order ? s.exp_cache.data() : nullptr, p.cache_exp, block_ref,
      [&](int64_t b0, int64_t n, const acc_t* xb) {
        if (p.need_smooth_dot) smooth_dot += weighted_sum(xb, p.w_ptr, b0, n);
        if (p.prob_target) {
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
  if (p.prob_target) {
    const acc_t z = static_cast<acc_t>(o.lse_square_scale);
    res = {q_sum * lse - q_dot + z * lse * lse, q_sum + acc_t(2) * z * lse, 0};
  } else {
    x_target = logits.at(y);
    const acc_t w_target = p.w_ptr ? p.w_ptr[y] : acc_t(1);
    logp_target = (x_target - stats.max) - log_sum;
    res = row_coefficients<acc_t>(o, lse, logp_target, w_target, smooth_dot, p.weight_sum, C);
  }
  p.loss_ptr[r] = res.loss;
  p.lse_ptr[r] = lse;
  if (state) {
    state[0] = stats.max;
    state[1] = log_sum;
    state[2] = res.softmax_coef;
    state[3] = res.onehot_coef;
  }
  if (!p.g_ptr) return;

  const RowGradient<acc_t> row_grad{stats.max, log_sum, res.softmax_coef, res.onehot_coef, p.smooth, p.smooth > 0,
                                    p.scale, p.w_ptr, p.capped, p.cap, y, logp_target, x_target};
  write_row_gradient<scalar_t>(row_grad, p.g_ptr + p.gl.row_offset(r), p.gl.stride_class, p.stream, C, load_x, load_q,
                               p.cache_exp ? s.exp_cache.data() : nullptr, s.block_ref.data(), s.gbuf.data());
}

// Row r's gradient from the state its forward saved: the row's cached exponentials made again from their refs
// (one read of the row), then the one-pass gradient's own writer. Ignored rows get zeros, as there.
template <typename scalar_t>
__attribute__((always_inline)) inline void cross_entropy_row_from_state(const CrossEntropyRows<scalar_t>& p,
                                                                        RowScratch<opmath_t<scalar_t>>& s, int64_t r) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = p.C;
  scalar_t* g = p.g_ptr + p.gl.row_offset(r);
  const int64_t y = p.prob_target ? -1 : p.index_ptr[r];
  if (!p.prob_target && y == p.o.ignore_index) {
    for (int64_t c = 0; c < C; ++c) g[c * p.gl.stride_class] = scalar_t(0);
    return;
  }
  const acc_t* state = p.state_ptr + r * p.state_width;
  const RowLogits<scalar_t> logits{p.x_ptr + p.in.row_offset(r), p.in.stride_class, p.capped, p.cap, s.xbuf.data()};
  auto load_x = [&](int64_t b0, int64_t n) { return logits.block(b0, n); };
  auto load_q = [&](int64_t b0, int64_t n) { return target_distribution(p, s, r, b0, n); };
  const acc_t* block_ref = state + 4;
  if (p.cache_exp) {
    for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
      const int64_t n = std::min(kBlock, C - b0);
      block_exponentials_or_zero(load_x(b0, n), n, block_ref[b0 / kBlock], s.exp_cache.data() + b0);
    }
  }
  const acc_t max = state[0], log_sum = state[1];
  acc_t x_target = 0, logp_target = 0;
  if (!p.prob_target) {
    x_target = logits.at(y);
    logp_target = (x_target - max) - log_sum;
  }
  const RowGradient<acc_t> row_grad{max, log_sum, state[2], state[3], p.smooth, p.smooth > 0, p.scale, p.w_ptr,
                                    p.capped, p.cap, y, logp_target, x_target};
  write_row_gradient<scalar_t>(row_grad, g, p.gl.stride_class, p.stream, C, load_x, load_q,
                               p.cache_exp ? s.exp_cache.data() : nullptr, block_ref, s.gbuf.data());
}

template <typename scalar_t>
void cross_entropy_rows(const at::Tensor& input, const at::Tensor& target, const at::Tensor& weight,
                        const CrossEntropyOptions& o, at::Tensor* grad, double grad_scale, at::Tensor& row_loss,
                        at::Tensor& row_lse, at::Tensor* row_state) {
  const CrossEntropyRows<scalar_t> p(input, target, weight, o, grad, grad_scale, row_loss, row_lse, row_state);
  at::parallel_for(0, p.rows, row_grain(p.C), [&](int64_t begin, int64_t end) {
    RowScratch<opmath_t<scalar_t>> s(p);
    if (p.resume) {
      for (int64_t r = begin; r < end; ++r) cross_entropy_row_from_state(p, s, r);
    } else {
      for (int64_t r = begin; r < end; ++r) cross_entropy_row(p, s, r, end);
    }
    if (p.stream) finish_streaming();
  });
}

}  // namespace

// input: (outer, C, inner) with any strides; target: int64 (outer*inner) class indices, or probabilities of the
// input's shape. Writes the gradient, scaled by grad_scale, into `grad` when given (it may alias input).
// Returns {per-row loss, per-row logsumexp, sum of the per-row losses} in the input's opmath dtype.
// row_state (see the top of this file): without `grad`, an empty tensor of the opmath dtype that the call fills,
// or leaves empty where it saves nothing; with `grad`, what such a call filled: then only the gradient is written
// and the three results are empty (a NaN sum). An empty state with `grad` is the plain call.
std::vector<at::Tensor> cross_entropy_forward(const at::Tensor& input, const at::Tensor& target,
                                              const std::optional<at::Tensor>& weight,
                                              const std::optional<at::Tensor>& grad,
                                              const CrossEntropyOptions& options, double grad_scale,
                                              std::optional<at::Tensor> row_state) {
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
  at::Tensor g = grad.has_value() ? *grad : at::Tensor();
  if (g.defined()) TORCH_CHECK(g.sizes() == input.sizes() && g.scalar_type() == input.scalar_type(), "lossops: bad gradient buffer");
  if (row_state && row_state->numel() == 0 && g.defined()) row_state.reset();
  const bool lanes = rows > 0 && C > 0 && ce_lanes::lanes_kernel_serves(input, target);
  if (row_state && g.defined()) {  // resumed: the gradient alone
    TORCH_CHECK(!lanes, "lossops: cross_entropy: a row state for rows the lane kernel serves");
    const at::Tensor empty = new_cpu_tensor({0}, acc_type);
    at::Tensor unused;
    LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy_resume", [&] {
      cross_entropy_rows<scalar_t>(input, target, w, options, &g, grad_scale, unused, unused, &*row_state);
    });
    return {empty, empty, cpu_scalar(std::numeric_limits<double>::quiet_NaN(), acc_type)};
  }
  if (lanes || rows == 0 || C == 0) row_state.reset();  // nothing saved: backward runs the whole kernel
  at::Tensor row_loss = new_cpu_tensor({rows}, acc_type);
  at::Tensor row_lse = new_cpu_tensor({rows}, acc_type);
  if (rows > 0 && C > 0) {
    LOSSOPS_DISPATCH_FLOATING(input.scalar_type(), "lossops_cross_entropy", [&] {
      if (lanes) {
        ce_lanes::cross_entropy_lanes<scalar_t>(input, target.const_data_ptr<int64_t>(), w, options,
                                                g.defined() ? &g : nullptr, grad_scale, row_loss, row_lse);
      } else {
        cross_entropy_rows<scalar_t>(input, target, w, options, g.defined() ? &g : nullptr, grad_scale, row_loss,
                                     row_lse, row_state ? &*row_state : nullptr);
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
                               a.scale("grad_scale"), a.optional_tensor("row_state"));
}
}  // namespace

LOSSOPS_REGISTER_KERNEL("cross_entropy", cross_entropy_kernel, "input", "target", "weight",
                        "grad", "ignore_index", "label_smoothing", "lse_square_scale", "softcap", "focal_gamma",
                        "grad_scale", "row_state");

}  // namespace lossops
