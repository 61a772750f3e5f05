// One driver for every elementwise loss (sigmoid focal, BCE-with-logits, the regression family).
//
// A family supplies a functor that, on Vectorized<acc_t> lanes of input x, target t and an auxiliary
// per-element value a (pos_weight), returns the loss and its derivatives with respect to x and t. The
// driver streams the flat input in blocks, gathers broadcast operands, applies the per-element weight and
// writes the gradients already scaled by the reduction (1/denominator), so backward is one multiplication
// by grad_output. The sum is fused into the same pass: fixed chunks of kReduceChunk elements are summed in
// order and their sums combined in order, so the result is bitwise identical for any thread count.
#pragma once

#include "common.h"
#include "kernel_abi.h"

#include <algorithm>
#include <optional>
#include <vector>

namespace lossops {

// Returns {per-element loss (opmath dtype; empty unless per_element), sum of the losses (0-d, opmath)}.
template <template <typename> class Loss>
std::vector<at::Tensor> elementwise_forward(const ElementwiseArgs& args);

namespace detail {

// An operand broadcast against the flat output: element i reads data[(i / inner) % period].
template <typename acc_t>
struct Broadcast {
  const acc_t* data = nullptr;
  int64_t inner = 1, period = 1;

  Broadcast(const std::optional<at::Tensor>& t, const std::vector<int64_t>& layout) {
    if (!t.has_value()) return;
    TORCH_CHECK(layout.size() == 2 && layout[0] >= 1 && layout[1] >= 1 && t->numel() == layout[1] &&
                    t->is_contiguous() && t->scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "lossops: broadcast operand layout does not match its tensor");
    data = t->const_data_ptr<acc_t>();
    inner = layout[0];
    period = layout[1];
  }
  explicit operator bool() const { return data != nullptr; }

  // The n values starting at flat index start: a pointer into data when they are contiguous there.
  const acc_t* block(int64_t start, int64_t n, acc_t* buf) const {
    int64_t q = start / inner, r = start % inner, idx = q % period;
    if (inner == 1 && idx + n <= period) return data + idx;
    for (int64_t j = 0; j < n; ++j) {
      buf[j] = data[idx];
      if (++r == inner) {
        r = 0;
        if (++idx == period) idx = 0;
      }
    }
    return buf;
  }
};

// Class-index targets of an (rows, C) input: element (row, c) has target 1 where index[row] == c.
template <typename acc_t>
inline void one_hot_block(const int64_t* index, int64_t C, int64_t start, int64_t n, acc_t* buf) {
  int64_t row = start / C, col = start % C;
  for (int64_t j = 0; j < n; ++j) {
    buf[j] = index[row] == col ? acc_t(1) : acc_t(0);
    if (++col == C) {
      col = 0;
      ++row;
    }
  }
}

template <typename acc_t>
inline void zero_ignored_rows(const int64_t* index, int64_t C, int64_t ignore_index, int64_t start, int64_t n,
                              acc_t* loss, acc_t* gx) {
  int64_t row = start / C, col = start % C;
  for (int64_t j = 0; j < n; ++j) {
    if (index[row] == ignore_index) {
      loss[j] = 0;
      gx[j] = 0;
    }
    if (++col == C) {
      col = 0;
      ++row;
    }
  }
}

// Elements of scalar_t as vectors of the accumulation type: one vector per step for float and double, the two
// halves of one bf16/fp16 vector otherwise (converted in registers, never through a buffer).
template <typename scalar_t>
struct DenseVectors {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int kVecs = std::is_same_v<scalar_t, acc_t> ? 1 : 2;
  static constexpr int64_t kStep = kVecs * Vec::size();

  // A full step takes the plain loads and stores: the counted ones go through a stack buffer on AVX2.
  static void load(const scalar_t* p, int64_t count, Vec* out) {
    if constexpr (kVecs == 1) {
      out[0] = count == kStep ? Vec::loadu(p) : Vec::loadu(p, count);
    } else {
      using Narrow = at::vec::Vectorized<scalar_t>;
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(count == kStep ? Narrow::loadu(p) : Narrow::loadu(p, count));
      out[0] = lo;
      out[1] = hi;
    }
  }
  static void load_acc(const acc_t* p, int64_t count, Vec* out) {
    for (int k = 0; k < kVecs; ++k) {
      const int64_t c = std::clamp<int64_t>(count - k * Vec::size(), 0, Vec::size());
      out[k] = c == Vec::size() ? Vec::loadu(p + k * Vec::size()) : c > 0 ? Vec::loadu(p + k * Vec::size(), c) : Vec(acc_t(0));
    }
  }
  static void store(scalar_t* p, const Vec* v, int64_t count) {
    if constexpr (kVecs == 1) {
      if (count == kStep) v[0].store(p);
      else v[0].store(p, count);
    } else {
      const auto narrow = at::vec::convert_from_float<scalar_t>(v[0], v[1]);
      if (count == kStep) narrow.store(p);
      else narrow.store(p, count);
    }
  }
};

// The common case in one pass of registers: input and target of one shape (the target in the input's dtype or
// the accumulation dtype), no weight, float targets, and no auxiliary operand or one with every element of the
// input, in its dtype (dense_aux). Each chunk's sum is kept in 2 * kVecs vector accumulators and reduced in a fixed
// order: bitwise the same for any thread count.
template <typename scalar_t, template <typename> class Loss>
void run_dense(const ElementwiseArgs& a, const at::Tensor& loss_out, std::vector<double>& chunk_sums) {
  using D = DenseVectors<scalar_t>;
  using acc_t = typename D::acc_t;
  using Vec = typename D::Vec;
  constexpr int K = D::kVecs;
  constexpr int64_t W = Vec::size();
  const Loss<acc_t> loss_fn(a.params);
  const int64_t n = a.input.numel();
  const scalar_t* x_ptr = a.input.const_data_ptr<scalar_t>();
  const bool target_in_acc = a.target.scalar_type() != a.input.scalar_type();
  const scalar_t* t_ptr = target_in_acc ? nullptr : a.target.const_data_ptr<scalar_t>();
  const acc_t* t_acc_ptr = target_in_acc ? a.target.const_data_ptr<acc_t>() : nullptr;
  scalar_t* gx_ptr = a.grad_input.has_value() ? a.grad_input->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gt_ptr = a.grad_target.has_value() ? a.grad_target->mutable_data_ptr<scalar_t>() : nullptr;
  const scalar_t* aux_ptr = a.aux.has_value() ? a.aux->const_data_ptr<scalar_t>() : nullptr;
  acc_t* l_ptr = a.per_element ? loss_out.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t scale = static_cast<acc_t>(a.grad_scale);

  double* const sums_out = chunk_sums.data();
  at::parallel_for(0, static_cast<int64_t>(chunk_sums.size()), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    // Everything the steps read, as values of this frame: a vector store goes through a may-alias type, so a value
    // reached through a reference (the enclosing frame's, or this lambda's captures) would be reloaded from memory
    // after every store, and the vectors of a step spilled around it.
    const Loss<acc_t> loss_local = loss_fn;
    const scalar_t* const x_local = x_ptr;
    const scalar_t* const t_local = t_ptr;
    const acc_t* const t_acc_local = t_acc_ptr;
    scalar_t* const gx_local = gx_ptr;
    scalar_t* const gt_local = gt_ptr;
    const scalar_t* const aux_local = aux_ptr;
    acc_t* const l_local = l_ptr;
    const Vec scale_vec(scale);
    const int64_t n_local = n;
    auto chunk_loop = [=](auto with_gradient, auto with_aux) {
      // One step of kStep elements (count of them valid), its losses added into `sums`.
      auto step = [=](int64_t i, int64_t count, Vec* sums) __attribute__((always_inline)) {
        Vec x[K], t[K], av[K], l[K], gx[K], gt[K];
        D::load(x_local + i, count, x);
        if (t_acc_local) D::load_acc(t_acc_local + i, count, t);
        else D::load(t_local + i, count, t);
        if constexpr (decltype(with_aux)::value) {
          D::load(aux_local + i, count, av);
        } else {
          for (int k = 0; k < K; ++k) av[k] = Vec(acc_t(1));
        }
        for (int k = 0; k < K; ++k) {
          loss_local(x[k], t[k], av[k], l[k], gx[k], gt[k]);
          const int64_t lanes = std::clamp<int64_t>(count - k * W, 0, W);
          // lanes past the end hold zeros, whose loss need not be 0 (BCE): kept out of the sum
          sums[k] = sums[k] + (lanes == W ? l[k] : Vec::set(Vec(acc_t(0)), l[k], lanes));
          if (l_local && lanes == W) l[k].store(l_local + i + k * W);
          else if (l_local && lanes > 0) l[k].store(l_local + i + k * W, lanes);
          if constexpr (decltype(with_gradient)::value) {
            gx[k] = gx[k] * scale_vec;
            gt[k] = gt[k] * scale_vec;
          }
        }
        if constexpr (decltype(with_gradient)::value) {
          if (gx_local) D::store(gx_local + i, gx, count);
          if (gt_local) D::store(gt_local + i, gt, count);
        }
      };
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        // two independent sets of accumulators, alternating step by step, so additions overlap
        Vec even[K], odd[K];
        for (int k = 0; k < K; ++k) even[k] = odd[k] = Vec(acc_t(0));
        const int64_t stop = std::min(n_local, (chunk + 1) * kReduceChunk);
        int64_t i = chunk * kReduceChunk;
        for (; i + 2 * D::kStep <= stop; i += 2 * D::kStep) {
          step(i, D::kStep, even);
          step(i + D::kStep, D::kStep, odd);
        }
        for (; i < stop; i += D::kStep) step(i, std::min(D::kStep, stop - i), even);
        Vec total = even[0] + odd[0];
        for (int k = 1; k < K; ++k) total = total + (even[k] + odd[k]);
        sums_out[chunk] = static_cast<double>(
            at::vec::vec_reduce_all<acc_t>([](Vec& p, Vec& q) { return p + q; }, total));
      }
    };
    const bool gradient = gx_local || gt_local;
    if (aux_local && gradient) chunk_loop(std::true_type{}, std::true_type{});
    else if (aux_local) chunk_loop(std::false_type{}, std::true_type{});
    else if (gradient) chunk_loop(std::true_type{}, std::false_type{});
    else chunk_loop(std::false_type{}, std::false_type{});
  });
}

template <typename scalar_t, template <typename> class Loss>
void run(const ElementwiseArgs& a, const at::Tensor& loss_out, std::vector<double>& chunk_sums) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const Loss<acc_t> loss_fn(a.params);
  const int64_t n = a.input.numel();
  const bool index_target = !a.target.is_floating_point();
  const int64_t C = index_target ? a.input.size(-1) : 1;
  const scalar_t* x_ptr = a.input.const_data_ptr<scalar_t>();
  // A float target may be in the accumulation dtype (autocast: bf16 input, fp32 target, no copy of either).
  const bool target_in_acc = !index_target && a.target.scalar_type() != a.input.scalar_type();
  const scalar_t* t_ptr = index_target || target_in_acc ? nullptr : a.target.const_data_ptr<scalar_t>();
  const acc_t* t_acc_ptr = target_in_acc ? a.target.const_data_ptr<acc_t>() : nullptr;
  const int64_t* idx_ptr = index_target ? a.target.const_data_ptr<int64_t>() : nullptr;
  const Broadcast<acc_t> weight(a.weight, a.weight_layout), aux(a.aux, a.aux_layout);
  scalar_t* gx_ptr = a.grad_input.has_value() ? a.grad_input->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gt_ptr = a.grad_target.has_value() ? a.grad_target->mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* l_ptr = a.per_element ? loss_out.mutable_data_ptr<acc_t>() : nullptr;
  const acc_t scale = static_cast<acc_t>(a.grad_scale);

  at::parallel_for(0, static_cast<int64_t>(chunk_sums.size()), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    // Values of this frame, which the compiler keeps in registers: through a captured reference they would be
    // reloaded for every vector (a vector store goes through a may-alias type), and the pass would wait on them.
    const Loss<acc_t> loss_local = loss_fn;
    const bool write_gt = gt_ptr != nullptr;
    const Vec scale_vec(scale);
    std::vector<acc_t> buffers(7 * kBlock);
    acc_t *xbuf = buffers.data(), *tbuf = xbuf + kBlock, *wbuf = tbuf + kBlock, *abuf = wbuf + kBlock,
          *lbuf = abuf + kBlock, *gxbuf = lbuf + kBlock, *gtbuf = gxbuf + kBlock;
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      double chunk_sum = 0.0;
      const int64_t chunk_stop = std::min(n, (chunk + 1) * kReduceChunk);
      for (int64_t b0 = chunk * kReduceChunk; b0 < chunk_stop; b0 += kBlock) {
        const int64_t nb = std::min(kBlock, chunk_stop - b0);
        const acc_t* xb = read_block(x_ptr + b0, 1, nb, xbuf);
        const acc_t* tb = tbuf;
        if (index_target) one_hot_block(idx_ptr, C, b0, nb, tbuf);
        else if (target_in_acc) tb = t_acc_ptr + b0;
        else tb = read_block(t_ptr + b0, 1, nb, tbuf);
        const acc_t* wb = weight ? weight.block(b0, nb, wbuf) : nullptr;
        const acc_t* ab = aux ? aux.block(b0, nb, abuf) : nullptr;
        // Without a gradient to write, the functor's gradient arithmetic is dead code the compiler drops, so
        // a forward under no_grad pays for the loss alone.
        auto block = [=](auto with_gradient) {
          for (int64_t i = 0; i < nb; i += Vec::size()) {
            const int count = static_cast<int>(std::min<int64_t>(Vec::size(), nb - i));
            const Vec x = Vec::loadu(xb + i, count), t = Vec::loadu(tb + i, count);
            const Vec av = ab ? Vec::loadu(ab + i, count) : Vec(acc_t(1));
            Vec l, gx, gt;
            loss_local(x, t, av, l, gx, gt);
            Vec gscale = scale_vec;
            if (wb) {
              const Vec w = Vec::loadu(wb + i, count);
              l = l * w;
              gscale = gscale * w;
            }
            l.store(lbuf + i, count);
            if constexpr (decltype(with_gradient)::value) {
              (gx * gscale).store(gxbuf + i, count);
              if (write_gt) (gt * gscale).store(gtbuf + i, count);
            }
          }
        };
        if (gx_ptr || gt_ptr) block(std::true_type{});
        else block(std::false_type{});
        if (index_target) zero_ignored_rows(idx_ptr, C, a.ignore_index, b0, nb, lbuf, gxbuf);
        chunk_sum += static_cast<double>(block_sum(lbuf, nb));
        if (l_ptr) std::memcpy(l_ptr + b0, lbuf, nb * sizeof(acc_t));
        if (gx_ptr) write_block<scalar_t>(gxbuf, gx_ptr + b0, 1, nb);
        if (gt_ptr) write_block<scalar_t>(gtbuf, gt_ptr + b0, 1, nb);
      }
      chunk_sums[chunk] = chunk_sum;
    }
  });
}

}  // namespace detail

template <template <typename> class Loss>
std::vector<at::Tensor> elementwise_forward(const ElementwiseArgs& a) {
  const at::Tensor& x = a.input;
  TORCH_CHECK(x.is_contiguous(), "lossops: elementwise kernels expect a contiguous input");
  if (a.target.is_floating_point()) {
    TORCH_CHECK(a.target.sizes() == x.sizes() && a.target.is_contiguous() &&
                    (a.target.scalar_type() == x.scalar_type() ||
                     (a.target.scalar_type() == at::toOpMathType(x.scalar_type()) && !a.grad_target.has_value())),
                "lossops: target must be contiguous with the input's shape, and its dtype or (without a target "
                "gradient) the accumulation dtype");
  } else {
    TORCH_CHECK(a.target.scalar_type() == at::kLong && a.target.is_contiguous() && x.dim() == 2 &&
                    a.target.numel() == x.size(0),
                "lossops: class-index targets need a 2-D input and one int64 index per row");
    const int64_t C = x.size(1);
    const int64_t* t = a.target.const_data_ptr<int64_t>();
    for (int64_t r = 0; r < a.target.numel(); ++r) {
      TORCH_CHECK_INDEX(t[r] == a.ignore_index || (t[r] >= 0 && t[r] <= C), "Target ", t[r],
                        " is out of bounds (classes are 0..", C - 1, ", ", C, " means background, ignore_index is ",
                        a.ignore_index, ").");
    }
  }
  for (const auto* g : {&a.grad_input, &a.grad_target}) {
    TORCH_CHECK(!g->has_value() || ((*g)->sizes() == x.sizes() && (*g)->scalar_type() == x.scalar_type() &&
                                    (*g)->is_contiguous()),
                "lossops: gradient buffers must be contiguous with the input's shape and dtype");
  }
  const auto acc_type = at::toOpMathType(x.scalar_type());
  const int64_t n = x.numel();
  at::Tensor loss = new_cpu_tensor({a.per_element ? n : 0}, acc_type);
  std::vector<double> chunk_sums((n + kReduceChunk - 1) / kReduceChunk);
  if (n > 0) {
    // an auxiliary operand of the input's dtype has every element of the input (run's Broadcast reads the
    // accumulation dtype only)
    const bool dense_aux = a.aux.has_value() && a.aux->scalar_type() == x.scalar_type() && a.aux->numel() == n &&
                           a.aux->is_contiguous() && a.aux_layout == std::vector<int64_t>{1, n};
    TORCH_CHECK(!a.aux.has_value() || dense_aux || a.aux->scalar_type() == acc_type,
                "lossops: an auxiliary operand in the input's dtype must have every element of the input");
    const bool dense = a.target.is_floating_point() && !a.weight.has_value() && (!a.aux.has_value() || dense_aux);
    LOSSOPS_DISPATCH_FLOATING(x.scalar_type(), "lossops_elementwise", [&] {
      if (dense) detail::run_dense<scalar_t, Loss>(a, loss, chunk_sums);
      else detail::run<scalar_t, Loss>(a, loss, chunk_sums);
    });
  }
  double total = 0.0;
  for (double s : chunk_sums) total += s;
  return {loss, cpu_scalar(total, acc_type)};
}

// The named arguments every elementwise kernel takes; a family registers its own parameters after them
// (LOSSOPS_REGISTER_ELEMENTWISE) and its functor reads them from `params` in that order.
#define LOSSOPS_ELEMENTWISE_PARAMETERS                                                                          \
  "input", "target", "weight", "weight_layout", "aux", "aux_layout", "ignore_index", "grad_input", "grad_target", \
      "grad_scale", "per_element"
constexpr size_t kElementwiseParameters = 11;

inline ElementwiseArgs elementwise_args(const KernelArgs& a) {
  std::vector<double> params;
  for (size_t i = kElementwiseParameters; i < a.names().size(); ++i) params.push_back(a.real(a.names()[i].c_str()));
  return {a.tensor("input"),        a.tensor("target"),          a.optional_tensor("weight"),
          a.integers("weight_layout"), a.optional_tensor("aux"),  a.integers("aux_layout"),
          std::move(params),        a.optional_tensor("grad_input"), a.optional_tensor("grad_target"),
          a.scale("grad_scale"), a.flag("per_element"), a.integer("ignore_index")};
}

// LOSSOPS_REGISTER_ELEMENTWISE("name", forward, "param", ...): forward(const ElementwiseArgs&) as kernel "name".
#define LOSSOPS_REGISTER_ELEMENTWISE(NAME, FORWARD, ...)                                                 \
  LOSSOPS_REGISTER_KERNEL(                                                                              \
      NAME, [](const ::lossops::KernelArgs& a) { return FORWARD(::lossops::elementwise_args(a)); }, \
      LOSSOPS_ELEMENTWISE_PARAMETERS __VA_OPT__(, ) __VA_ARGS__)

// Pieces several families share, on vectors.
template <typename acc_t>
struct Logistic {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec p, one_minus_p;     // sigmoid(x), sigmoid(-x)
  Vec log1p_exp;          // log1p(exp(-|x|))
  Vec softplus_neg;       // softplus(-x) = max(-x, 0) + log1p(exp(-|x|)) = -log(sigmoid(x))

  explicit Logistic(const Vec& x) {
    const Vec zero(acc_t(0)), one(acc_t(1));
    // exp(-|x|) in (0, 1]: never overflows. fast_exp (about 2 ulp, subnormal results kept) instead of Sleef's
    // exp: with log1p_unit, it is the cheaper way to the sigmoid losses' transcendentals.
    const Vec e = fast_exp(x.abs().neg());
    const Vec big = one / (one + e), small = e * big;
    const Vec positive = x >= zero;
    p = Vec::blendv(small, big, positive);
    one_minus_p = Vec::blendv(big, small, positive);
    log1p_exp = log1p_unit(e);
    softplus_neg = at::vec::maximum(x.neg(), zero) + log1p_exp;
  }
};

}  // namespace lossops
