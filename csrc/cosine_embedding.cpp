// Cosine embedding loss over rows, torch's definition (cosine_embedding_loss in aten's Loss.cpp): rows x1, x2 of
// length D with target y,
//   m1 = |x1|^2 + 1e-12, m2 = |x2|^2 + 1e-12 (torch's EPSILON, added to each squared norm), cos = (x1 . x2) / sqrt(m1 m2)
//   L = 1 - cos where y = 1, max(cos - margin, 0) where y = -1, 0 for any other y (torch's where()s)
//   dL/dcos = -1 where y = 1, [cos - margin >= 0] where y = -1 (the clamp's gradient passes at 0), 0 otherwise
//   dcos/dx1 = (x2 - (x1 . x2) / m1 x1) / sqrt(m1 m2),  dcos/dx2 = (x1 - (x1 . x2) / m2 x2) / sqrt(m1 m2)
// One pass over each row pair: its three sums, then (when asked for) both gradients from the row still in cache.
#include "common.h"
#include "kernel_abi.h"

#include <cmath>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace lossops {
namespace {

constexpr double kCosineEpsilon = 1e-12;

// 2 * Vec::size() elements of a row as two vectors of the accumulation type, widened in registers.
template <typename acc_t, typename T>
__attribute__((always_inline)) inline void load_two(const T* p, at::vec::Vectorized<acc_t>* out) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    out[0] = Vec::loadu(p);
    out[1] = Vec::loadu(p + Vec::size());
  } else {
    static_assert(at::vec::Vectorized<T>::size() == 2 * Vec::size());
    std::tie(out[0], out[1]) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(p));
  }
}

// Losses into loss[0..N); gradients (scaled by scale) into g1 / g2 where given. Rows are independent, each
// summed in one fixed order: the same bits for any thread count. x2 (and g2) are in x1's dtype or, under autocast
// with a low-precision x1, in the accumulation dtype (second_t).
template <typename scalar_t, typename second_t>
void cosine_rows(const scalar_t* x1, const second_t* x2, const opmath_t<scalar_t>* y, int64_t N, int64_t D,
                 opmath_t<scalar_t> margin, opmath_t<scalar_t> scale, scalar_t* g1, second_t* g2,
                 opmath_t<scalar_t>* loss) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const bool gradients = g1 != nullptr || g2 != nullptr;
  at::parallel_for(0, N, row_grain(D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buffers(gradients ? 3 * D : 0);
    acc_t* b1 = gradients ? buffers.data() : nullptr;
    acc_t* b2 = gradients ? b1 + D : nullptr;
    acc_t* gbuf = gradients ? b2 + D : nullptr;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* row1 = x1 + r * D;
      const second_t* row2 = x2 + r * D;
      // The sums read the rows as they are stored (low precision widened in registers), in two independent
      // accumulator chains each, so that neither conversion through a buffer nor one chain's latency sets the pace.
      Vec vd[2] = {Vec(acc_t(0)), Vec(acc_t(0))}, va[2] = {vd[0], vd[0]}, vb[2] = {vd[0], vd[0]};
      int64_t i = 0;
      for (; i + 2 * W <= D; i += 2 * W) {
        Vec p[2], q[2];
        load_two<acc_t>(row1 + i, p);
        load_two<acc_t>(row2 + i, q);
        for (int k = 0; k < 2; ++k) {
          vd[k] = at::vec::fmadd(p[k], q[k], vd[k]);
          va[k] = at::vec::fmadd(p[k], p[k], va[k]);
          vb[k] = at::vec::fmadd(q[k], q[k], vb[k]);
        }
      }
      auto add = [](Vec& u, Vec& v) { return u + v; };
      acc_t dot = at::vec::vec_reduce_all<acc_t>(add, vd[0] + vd[1]),
            n1 = at::vec::vec_reduce_all<acc_t>(add, va[0] + va[1]),
            n2 = at::vec::vec_reduce_all<acc_t>(add, vb[0] + vb[1]);
      for (; i < D; ++i) {
        const acc_t u = static_cast<acc_t>(row1[i]), v = static_cast<acc_t>(row2[i]);
        dot += u * v;
        n1 += u * u;
        n2 += v * v;
      }
      const acc_t m1 = n1 + acc_t(kCosineEpsilon), m2 = n2 + acc_t(kCosineEpsilon);
      const acc_t denom = std::sqrt(m1 * m2), cos = dot / denom;
      const acc_t target = y[r];
      acc_t value = acc_t(0), slope = acc_t(0);
      if (target == acc_t(1)) {
        value = acc_t(1) - cos;
        slope = acc_t(-1);
      } else if (target == acc_t(-1)) {
        const acc_t gap = cos - margin;
        value = gap < acc_t(0) ? acc_t(0) : gap;  // a NaN gap stays NaN, as torch's clamp_min
        slope = gap >= acc_t(0) ? acc_t(1) : acc_t(0);
      }
      loss[r] = value;
      const acc_t c = slope * scale / denom;
      // g1 = c (x2 - dot / m1 x1), g2 = c (x1 - dot / m2 x2)
      auto gradient = [&](const acc_t* own, const acc_t* other, acc_t m) {
        const acc_t k = c * dot / m;
        const Vec cv(c), kv(k);
        int64_t j = 0;
        for (; j + W <= D; j += W) (cv * Vec::loadu(other + j) - kv * Vec::loadu(own + j)).store(gbuf + j);
        for (; j < D; ++j) gbuf[j] = c * other[j] - k * own[j];
      };
      if (!gradients) continue;
      const acc_t* a = read_block(row1, 1, D, b1);
      const acc_t* b = read_block(row2, 1, D, b2);
      if (g1 != nullptr) {
        gradient(a, b, m1);
        write_block<scalar_t>(gbuf, g1 + r * D, 1, D);
      }
      if (g2 != nullptr) {
        gradient(b, a, m2);
        write_block<second_t>(gbuf, g2 + r * D, 1, D);
      }
    }
  });
}

// input1, input2: contiguous (N, D), input2 in input1's floating dtype or in its accumulation dtype; target:
// contiguous (N,) in the accumulation dtype; grad_input1 / grad_input2: contiguous (N, D) in their input's dtype,
// written when given. Returns {per-row loss
// (empty unless per_element), the losses' sum} in the accumulation dtype.
std::vector<at::Tensor> cosine_embedding_kernel(const KernelArgs& a) {
  const at::Tensor x1 = a.tensor("input1"), x2 = a.tensor("input2"), target = a.tensor("target");
  const std::optional<at::Tensor> g1 = a.optional_tensor("grad_input1"), g2 = a.optional_tensor("grad_input2");
  const auto acc_type = at::toOpMathType(x1.scalar_type());
  const bool second_in_acc = x2.scalar_type() != x1.scalar_type();
  TORCH_CHECK(x1.dim() == 2 && x1.sizes() == x2.sizes() && (!second_in_acc || x2.scalar_type() == acc_type) &&
                  x1.is_contiguous() && x2.is_contiguous(),
              "lossops: cosine_embedding_loss kernel expects contiguous (N, D) inputs of one shape, input2 in "
              "input1's dtype or its accumulation dtype, got ", x1.sizes(), " ", x1.scalar_type(), " and ",
              x2.sizes(), " ", x2.scalar_type());
  const int64_t N = x1.size(0), D = x1.size(1);
  TORCH_CHECK(target.dim() == 1 && target.numel() == N && target.is_contiguous() && target.scalar_type() == acc_type,
              "lossops: cosine_embedding_loss target must be a contiguous (N,) tensor in the accumulation dtype");
  for (const auto& [g, x] : {std::pair{&g1, &x1}, std::pair{&g2, &x2}}) {
    TORCH_CHECK(!g->has_value() || ((*g)->sizes() == x->sizes() && (*g)->scalar_type() == x->scalar_type() &&
                                    (*g)->is_contiguous()),
                "lossops: gradient buffers must be contiguous with their input's shape and dtype");
  }
  at::Tensor row_loss = new_cpu_tensor({N}, acc_type);
  double total = 0.0;
  if (N > 0) {
    LOSSOPS_DISPATCH_FLOATING(x1.scalar_type(), "lossops_cosine_embedding", [&] {
      using acc_t = opmath_t<scalar_t>;
      acc_t* loss = row_loss.mutable_data_ptr<acc_t>();
      auto run = [&](auto second) {
        using second_t = decltype(second);
        cosine_rows<scalar_t, second_t>(x1.const_data_ptr<scalar_t>(), x2.const_data_ptr<second_t>(),
                                        target.const_data_ptr<acc_t>(), N, D, static_cast<acc_t>(a.real("margin")),
                                        static_cast<acc_t>(a.scale("grad_scale")),
                                        g1.has_value() ? g1->mutable_data_ptr<scalar_t>() : nullptr,
                                        g2.has_value() ? g2->mutable_data_ptr<second_t>() : nullptr, loss);
      };
      if (second_in_acc) run(acc_t(0));
      else run(scalar_t(0));
      total = sum_in_double(loss, N);
    });
  }
  return {a.flag("per_element") ? row_loss : new_cpu_tensor({0}, acc_type), cpu_scalar(total, acc_type)};
}

}  // namespace

LOSSOPS_REGISTER_KERNEL("cosine_embedding_loss", cosine_embedding_kernel, "input1", "input2", "target", "margin",
                        "grad_input1", "grad_input2", "grad_scale", "per_element");

}  // namespace lossops
