// Knowledge distillation over pairs of softmax rows: the student's and the teacher's logits, classes last, one row
// per token. With z = logits / T, log p = (z - max) - log sum exp(z - max) for each model:
//   forward KL  D = sum p_t (log p_t - log p_s),   dD/dz_s = p_s - p_t;
//   reverse KL  D = sum p_s (log p_s - log p_t),   dD/dz_s = p_s (log p_s - log p_t - D);
//   TVD         D = 1/2 sum |p_t - p_s|,           dD/dz_s = p_s (g - sum p_s g), g = sign(p_s - p_t) / 2;
//   JSD_beta    D = beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s,
//               dD/dz_s = (1 - beta) p_s (log p_s - log m - KL(p_s || m)).
// A term whose probability is 0 is 0 (0 log 0 = 0) whatever the other model's log-probability, and every
// log-probability is formed from the logits (never the log of an underflowed probability), so a probability that
// underflows to 0 where its log is finite leaves no NaN. The row loss is
//   soft_weight * D + hard_weight * cross_entropy(student logits (no temperature), target),
// and its gradient with respect to the student logits (dz_s/ds = 1/T) is written, times grad_scale, in the same
// call: statistics pass, then the loss terms (forward KL writes its gradient there too), then the gradient of
// the divergences that need the row's sum first. Both rows of a token stay in cache across the passes.
#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "common.h"
#include "kernel_abi.h"
#include "softmax_rows.h"

namespace lossops {
namespace {

enum Divergence : int64_t { kForwardKL = 0, kReverseKL = 1, kTVD = 2, kJSD = 3 };

// Per-element terms of a divergence on one vector of log-probabilities: the loss term and the term of the row sum
// its gradient needs (accumulate), and the gradient with respect to z_s given that sum and the row's divergence.
template <typename acc_t, int64_t kind>
struct DivergenceTerms {
  using V = Vec<acc_t>;
  acc_t beta;

  static V where_positive(const V& p, const V& value) { return V::blendv(value, V(acc_t(0)), p == V(acc_t(0))); }

  V log_mixture(const V& pt, const V& ps) const {
    return (V(beta) * pt + V(acc_t(1) - beta) * ps).log();
  }

  void accumulate(const V& ls, const V& lt, const V& ps, const V& pt, V& loss, V& row_sum) const {
    if constexpr (kind == kForwardKL) {
      loss = where_positive(pt, pt * (lt - ls));
    } else if constexpr (kind == kReverseKL) {
      loss = where_positive(ps, ps * (ls - lt));
    } else if constexpr (kind == kTVD) {
      const V d = ps - pt;
      loss = V(acc_t(0.5)) * d.abs();
      row_sum = ps * half_sign(d);
    } else {
      const V lm = log_mixture(pt, ps);
      row_sum = where_positive(ps, ps * (ls - lm));
      loss = V(beta) * where_positive(pt, pt * (lt - lm)) + V(acc_t(1) - beta) * row_sum;
    }
  }

  V gradient(const V& ls, const V& lt, const V& ps, const V& pt, acc_t row_sum, acc_t divergence) const {
    if constexpr (kind == kForwardKL) {
      return ps - pt;
    } else if constexpr (kind == kReverseKL) {
      return where_positive(ps, ps * ((ls - lt) - V(divergence)));
    } else if constexpr (kind == kTVD) {
      return ps * (half_sign(ps - pt) - V(row_sum));
    } else {
      return V(acc_t(1) - beta) * where_positive(ps, ps * ((ls - log_mixture(pt, ps)) - V(row_sum)));
    }
  }

  static V half_sign(const V& d) {
    const V zero(acc_t(0));
    return V::blendv(V::blendv(zero, V(acc_t(0.5)), d > zero), V(acc_t(-0.5)), d < zero);
  }
};

// What every row pair of one call shares.
template <typename scalar_t>
struct DistillationRows {
  using acc_t = opmath_t<scalar_t>;
  int64_t V, rows, student_stride, teacher_stride, grad_stride;
  const scalar_t* student;
  // The teacher's logits in the student's dtype, or in the accumulation dtype (a float32 teacher for a bf16
  // student, as autocast leaves them), read without rounding.
  const scalar_t* teacher;
  const acc_t* teacher_acc;
  const int64_t* target;  // nullptr: every token kept
  scalar_t* grad;         // nullptr: no gradient
  acc_t* loss;
  int64_t ignore_index;
  acc_t inv_temperature, beta, hard_weight, soft_weight, scale;
  bool scaled;       // temperature != 1: the softened rows are the logits times inv_temperature
  bool hard;         // hard_weight > 0 (needs a target)
  bool hard_apart;   // the cross-entropy's softmax differs from the student's softened one (temperature != 1)
};

// One thread's block buffers (a block is at most a row: small rows need no kBlock-sized buffers).
template <typename acc_t>
struct PairScratch {
  std::vector<acc_t> student, teacher, raw, grad;
  explicit PairScratch(int64_t n) : student(n), teacher(n), raw(n), grad(n) {}
};

// A block of one model's logits in the opmath type: raw (read where it lies when it already is contiguous opmath
// data) and softened (times inv_temperature, in `scaled_buf`, when the temperature is not 1).
template <typename src_t, typename acc_t>
inline const acc_t* softened_block(const src_t* src, int64_t n, bool scaled, acc_t inv_temperature, acc_t* raw_buf,
                                   acc_t* scaled_buf, const acc_t** raw_out = nullptr) {
  static_assert(std::is_same_v<opmath_t<src_t>, acc_t>);
  const acc_t* raw = read_block(src, 1, n, raw_buf);
  if (raw_out) *raw_out = raw;
  if (!scaled) return raw;
  at::vec::map([inv_temperature](Vec<acc_t> v) { return v * Vec<acc_t>(inv_temperature); }, scaled_buf, raw, n);
  return scaled_buf;
}

template <typename scalar_t, int64_t kind>
void distillation_row(const DistillationRows<scalar_t>& p, PairScratch<opmath_t<scalar_t>>& s, int64_t r) {
  using acc_t = opmath_t<scalar_t>;
  using Vc = Vec<acc_t>;
  constexpr int64_t W = Vc::size();
  const int64_t C = p.V;
  const scalar_t* xs = p.student + r * p.student_stride;
  const int64_t teacher_offset = r * p.teacher_stride;
  scalar_t* g = p.grad ? p.grad + r * p.grad_stride : nullptr;
  const int64_t y = p.target ? p.target[r] : -1;
  if (p.target && y == p.ignore_index) {
    p.loss[r] = 0;
    if (g) std::fill(g, g + C, scalar_t(0));
    return;
  }

  auto teacher_block = [&](int64_t b0, int64_t n) {
    return p.teacher_acc ? softened_block(p.teacher_acc + teacher_offset + b0, n, p.scaled, p.inv_temperature,
                                          s.teacher.data(), s.teacher.data())
                         : softened_block(p.teacher + teacher_offset + b0, n, p.scaled, p.inv_temperature,
                                          s.teacher.data(), s.teacher.data());
  };

  // Pass 1: both rows' max and sum of exponentials (and the raw student row's, for the cross-entropy at T != 1).
  BlockStats<acc_t> student_stats, teacher_stats, raw_stats;
  for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
    const int64_t n = std::min(kBlock, C - b0);
    const acc_t* raw = nullptr;
    student_stats.add(softened_block(xs + b0, n, p.scaled, p.inv_temperature, s.raw.data(), s.student.data(), &raw), n);
    if (p.hard_apart) raw_stats.add(raw, n);
    teacher_stats.add(teacher_block(b0, n), n);
  }
  const acc_t ms = student_stats.max, lss = student_stats.log_sum();
  const acc_t mt = teacher_stats.max, lst = teacher_stats.log_sum();
  const acc_t mh = p.hard_apart ? raw_stats.max : ms, lsh = p.hard_apart ? raw_stats.log_sum() : lss;
  acc_t cross_entropy = 0;
  // Without a temperature the softened row is the raw one: its statistics serve the cross-entropy. Read before any
  // gradient is written: the gradient may overwrite the student's logits (the fused linear loss's chunks).
  if (p.hard) cross_entropy = -((static_cast<acc_t>(xs[y]) - mh) - lsh);

  const DivergenceTerms<acc_t, kind> terms{p.beta};
  const Vc vms(ms), vlss(lss), vmt(mt), vlst(lst), vmh(mh), vlsh(lsh);
  const acc_t soft_coef = p.scale * p.soft_weight * p.inv_temperature, hard_coef = p.scale * p.hard_weight;
  // One vector of the gradient, from its log-probabilities and probabilities, into s.grad at block offset i.
  auto gradient_vector = [&](int64_t i, int64_t count, const Vc& ls, const Vc& lt, const Vc& ps, const Vc& pt,
                             const acc_t* raw, acc_t row_sum, acc_t divergence) {
    Vc gv = Vc(soft_coef) * terms.gradient(ls, lt, ps, pt, row_sum, divergence);
    if (p.hard) {
      const Vc ph = p.hard_apart ? fast_exp((Vc::loadu(raw + i, count) - vmh) - vlsh) : ps;
      gv = gv + Vc(hard_coef) * ph;
    }
    gv.store(s.grad.data() + i, count);
  };
  // The block's gradient in s.grad, with the target's one-hot term, rounded into g.
  auto store_gradient = [&](int64_t b0, int64_t n) {
    if (p.hard && y >= b0 && y < b0 + n) s.grad[y - b0] -= hard_coef;
    write_block<scalar_t>(s.grad.data(), g + b0, 1, n);
  };

  // Pass 2: the divergence and the row sum its gradient needs. Forward KL's gradient needs no row sum: it is formed
  // here from the same exponentials.
  const bool gradient_here = g && kind == kForwardKL;
  Vc loss_acc(acc_t(0)), sum_acc(acc_t(0));
  for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
    const int64_t n = std::min(kBlock, C - b0);
    const acc_t* raw = nullptr;
    const acc_t* zs = softened_block(xs + b0, n, p.scaled, p.inv_temperature, s.raw.data(), s.student.data(), &raw);
    const acc_t* zt = teacher_block(b0, n);
    for (int64_t i = 0; i < n; i += W) {
      const int64_t count = std::min<int64_t>(W, n - i);
      const Vc ls = (Vc::loadu(zs + i, count) - vms) - vlss, lt = (Vc::loadu(zt + i, count) - vmt) - vlst;
      const Vc ps = fast_exp(ls), pt = fast_exp(lt);
      Vc loss(acc_t(0)), row_sum(acc_t(0));
      terms.accumulate(ls, lt, ps, pt, loss, row_sum);
      // The padded lanes of the last vector hold values of the zeros the counted load filled in: not added.
      loss_acc = Vc::set(loss_acc, loss_acc + loss, count);
      sum_acc = Vc::set(sum_acc, sum_acc + row_sum, count);
      if (gradient_here) gradient_vector(i, count, ls, lt, ps, pt, raw, 0, 0);
    }
    if (gradient_here) store_gradient(b0, n);
  }
  auto add = [](Vc& a, Vc& b) { return a + b; };
  const acc_t divergence = at::vec::vec_reduce_all<acc_t>(add, loss_acc);
  const acc_t row_sum = at::vec::vec_reduce_all<acc_t>(add, sum_acc);
  p.loss[r] = p.soft_weight * divergence + (p.hard ? p.hard_weight * cross_entropy : acc_t(0));
  if (!g || kind == kForwardKL) return;

  // Pass 3: the gradient, from the row sum.
  for (int64_t b0 = 0; b0 < C; b0 += kBlock) {
    const int64_t n = std::min(kBlock, C - b0);
    const acc_t* raw = nullptr;
    const acc_t* zs = softened_block(xs + b0, n, p.scaled, p.inv_temperature, s.raw.data(), s.student.data(), &raw);
    const acc_t* zt = teacher_block(b0, n);
    for (int64_t i = 0; i < n; i += W) {
      const int64_t count = std::min<int64_t>(W, n - i);
      const Vc ls = (Vc::loadu(zs + i, count) - vms) - vlss, lt = (Vc::loadu(zt + i, count) - vmt) - vlst;
      gradient_vector(i, count, ls, lt, fast_exp(ls), fast_exp(lt), raw, row_sum, divergence);
    }
    store_gradient(b0, n);
  }
}

template <typename scalar_t, int64_t kind>
void distillation_rows(const DistillationRows<scalar_t>& p) {
  at::parallel_for(0, p.rows, row_grain(2 * p.V), [&](int64_t begin, int64_t end) {
    PairScratch<opmath_t<scalar_t>> s(std::min(kBlock, p.V));
    for (int64_t r = begin; r < end; ++r) distillation_row<scalar_t, kind>(p, s, r);
  });
}

// A (rows, V) matrix whose classes are contiguous, any row stride.
void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t V, at::ScalarType dtype,
                at::ScalarType other_dtype) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == V && (V <= 1 || t.stride(1) == 1) &&
                  (t.scalar_type() == dtype || t.scalar_type() == other_dtype),
              "lossops: distillation kernel: ", name, " must be a (", rows, ", ", V, ") ", dtype,
              " matrix with contiguous classes, got ", t.sizes(), " ", t.scalar_type());
}

std::vector<at::Tensor> distillation_kernel(const KernelArgs& a) {
  const at::Tensor student = a.tensor("student");
  const at::Tensor teacher = a.tensor("teacher");
  TORCH_CHECK(student.dim() == 2, "lossops: distillation kernel expects (rows, classes) logits, got ", student.sizes());
  const int64_t rows = student.size(0), V = student.size(1);
  const auto acc_type = at::toOpMathType(student.scalar_type());
  check_rows(teacher, "teacher", rows, V, student.scalar_type(), acc_type);
  const std::optional<at::Tensor> target = a.optional_tensor("target");
  const std::optional<at::Tensor> grad = a.optional_tensor("grad");
  if (grad) check_rows(*grad, "grad", rows, V, student.scalar_type(), student.scalar_type());
  const int64_t kind = a.integer("divergence");
  TORCH_CHECK(kind >= kForwardKL && kind <= kJSD, "lossops: distillation kernel: unknown divergence ", kind);
  const int64_t ignore_index = a.integer("ignore_index");
  const double hard_weight = a.real("hard_weight");
  const double temperature = a.real("temperature");
  TORCH_CHECK(temperature > 0, "lossops: distillation kernel: temperature must be > 0, got ", temperature);
  if (target) {
    TORCH_CHECK(target->scalar_type() == at::kLong && target->is_contiguous() && target->numel() == rows,
                "lossops: distillation kernel: target must be a contiguous int64 tensor of ", rows, " elements");
    // Every index is checked before any row is read (the cross-entropy term reads the student's logit there).
    check_class_indices(target->const_data_ptr<int64_t>(), rows, V, ignore_index);
  }
  TORCH_CHECK(hard_weight == 0 || target, "lossops: distillation kernel: hard_weight needs a target");
  at::Tensor row_loss = new_cpu_tensor({rows}, acc_type);
  const double grad_scale = a.scale("grad_scale");
  if (rows > 0 && V > 0) {
    LOSSOPS_DISPATCH_FLOATING(student.scalar_type(), "lossops_distillation", [&] {
      using acc_t = opmath_t<scalar_t>;
      DistillationRows<scalar_t> p;
      p.V = V;
      p.rows = rows;
      p.student_stride = student.stride(0);
      p.teacher_stride = teacher.stride(0);
      p.grad_stride = grad ? grad->stride(0) : 0;
      p.student = student.const_data_ptr<scalar_t>();
      const bool teacher_in_acc = teacher.scalar_type() != student.scalar_type();
      p.teacher = teacher_in_acc ? nullptr : teacher.const_data_ptr<scalar_t>();
      p.teacher_acc = teacher_in_acc ? teacher.const_data_ptr<acc_t>() : nullptr;
      p.target = target ? target->const_data_ptr<int64_t>() : nullptr;
      p.grad = grad ? grad->mutable_data_ptr<scalar_t>() : nullptr;
      p.loss = row_loss.mutable_data_ptr<acc_t>();
      p.ignore_index = ignore_index;
      p.inv_temperature = static_cast<acc_t>(1.0 / temperature);
      p.beta = static_cast<acc_t>(a.real("beta"));
      p.hard_weight = static_cast<acc_t>(hard_weight);
      p.soft_weight = static_cast<acc_t>(a.real("soft_weight"));
      p.scale = static_cast<acc_t>(grad_scale);
      p.scaled = temperature != 1.0;
      p.hard = hard_weight != 0;
      p.hard_apart = p.hard && p.scaled;
      switch (kind) {
        case kForwardKL: distillation_rows<scalar_t, kForwardKL>(p); break;
        case kReverseKL: distillation_rows<scalar_t, kReverseKL>(p); break;
        case kTVD: distillation_rows<scalar_t, kTVD>(p); break;
        default: distillation_rows<scalar_t, kJSD>(p); break;
      }
    });
  } else {
    row_loss.zero_();
    if (grad) grad->zero_();
  }
  // Fixed-order double sum: identical bits for any thread count.
  double total = 0.0;
  LOSSOPS_DISPATCH_FLOATING(student.scalar_type(), "lossops_distillation_sum", [&] {
    const opmath_t<scalar_t>* l = row_loss.const_data_ptr<opmath_t<scalar_t>>();
    total = deterministic_sum(rows, [l](int64_t b, int64_t e) { return sum_in_double(l + b, e - b); });
  });
  return {row_loss, cpu_scalar(total, acc_type)};
}

}  // namespace

LOSSOPS_REGISTER_KERNEL("distillation", distillation_kernel, "student", "teacher", "target", "grad", "divergence",
                        "beta", "temperature", "ignore_index", "hard_weight", "soft_weight", "grad_scale");

}  // namespace lossops
