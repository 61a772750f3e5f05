// Triplet margin loss over rows, torch's definition (triplet_margin_loss in aten's Loss.cpp, pairwise_distance in
// Distance.cpp, norm_backward in FunctionsManual.cpp): rows a, p, n of length D,
//   dist(x, y) = || x - y + eps ||_p   (eps is added to every element of the difference, as torch adds it)
//   dP = dist(a, p), dN = dist(a, n), and with swap dN = minimum(dN, dist(p, n))
//   L = max(margin + dP - dN, 0)
// Gradients, with torch's subgradients: the clamp passes at 0 (h = [margin + dP - dN >= 0]); minimum splits a tie
// in half (and a NaN sends the whole gradient both ways); the norm's gradient at an element u of a difference is
//   p = 1: sgn(u);  p = 2: u / d (0 where d = 0);  other p: sgn(u) |u|^(p-1) d^(1-p) (0 where u = 0 or d = 0).
// Then grad_a = cP f(uP) - cN f(uN), grad_p = -cP f(uP) - cS f(uS), grad_n = cN f(uN) + cS f(uS), each c being
// h times the pair's factor and its share of the minimum. One pass over each row triple: the sums, then (when asked
// for) the three gradients from the rows still in cache.
#include "common.h"
#include "kernel_abi.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace lossops {
namespace {

enum class NormKind { kOne, kTwo, kPower };

// The p-norm's pieces for one kind: an element's term of the sum, the sum's root, an element's gradient shape and
// the row's factor of it (see the header).
template <NormKind kind, typename acc_t>
struct Norm {
  using Vec = at::vec::Vectorized<acc_t>;
  acc_t p;

  // torch's sign: 0 at 0 and at NaN (p = 1's gradient there is 0, other p's NaN through |u|^(p-1))
  static Vec sign(Vec u) {
    const Vec zero(acc_t(0)), one(acc_t(1));
    return ((u > zero) & one) - ((u < zero) & one);
  }
  static acc_t sign(acc_t u) { return acc_t((u > 0) - (u < 0)); }

  Vec term(Vec u) const {
    if constexpr (kind == NormKind::kOne) return u.abs();
    else if constexpr (kind == NormKind::kTwo) return u * u;
    else return u.abs().pow(Vec(p));
  }
  acc_t term(acc_t u) const {
    if constexpr (kind == NormKind::kOne) return std::abs(u);
    else if constexpr (kind == NormKind::kTwo) return u * u;
    else return std::pow(std::abs(u), p);
  }
  Vec shape(Vec u) const {
    if constexpr (kind == NormKind::kOne) return sign(u);
    else if constexpr (kind == NormKind::kTwo) return u;
    else return Vec::blendv(sign(u) * u.abs().pow(Vec(p - acc_t(1))), Vec(acc_t(0)), u == Vec(acc_t(0)));
  }
  acc_t shape(acc_t u) const {
    if constexpr (kind == NormKind::kOne) return sign(u);
    else if constexpr (kind == NormKind::kTwo) return u;
    else return u == acc_t(0) ? acc_t(0) : sign(u) * std::pow(std::abs(u), p - acc_t(1));
  }
  acc_t root(acc_t sum) const {
    if constexpr (kind == NormKind::kOne) return sum;
    else if constexpr (kind == NormKind::kTwo) return std::sqrt(sum);
    else return std::pow(sum, acc_t(1) / p);
  }
  acc_t factor(acc_t d) const {
    if constexpr (kind == NormKind::kOne) return acc_t(1);
    else if constexpr (kind == NormKind::kTwo) return d == acc_t(0) ? acc_t(0) : acc_t(1) / d;
    else return d == acc_t(0) ? acc_t(0) : std::pow(d, acc_t(1) - p);
  }
};

// A vector of acc_t from Vectorized<acc_t>::size() elements of src, widened in registers where src is bf16 / fp16.
template <typename acc_t, typename T>
inline at::vec::Vectorized<acc_t> load_widened(const T* src) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return at::vec::Vectorized<acc_t>::loadu(src);
  } else {
    at::vec::Vectorized<float> out;
    at::vec::load_to_float<T>(src, out);
    return out;
  }
}

template <typename acc_t>
struct TripletOptions {
  acc_t margin, p, eps, scale;
  bool swap;
};

// Losses into loss[0..N); gradients (scaled by scale) into ga / gp / gn where given. Rows are independent, each
// summed in one fixed order: the same bits for any thread count. positive and negative (and their gradients) are
// in the anchor's dtype or, under autocast with a low-precision anchor, in the accumulation dtype (other_t).
// Short rows are taken a chunk of consecutive rows at a time (about kBlock elements), so that bf16 / fp16 rows are
// widened and their gradients narrowed in long vector runs rather than a vector and a scalar tail per row.
template <NormKind kind, typename scalar_t, typename other_t>
void triplet_rows(const scalar_t* a, const other_t* p, const other_t* n, int64_t N, int64_t D,
                  TripletOptions<opmath_t<scalar_t>> o, scalar_t* ga, other_t* gp, other_t* gn,
                  opmath_t<scalar_t>* loss) {
  using acc_t = opmath_t<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Norm<kind, acc_t> norm{o.p};
  const bool gradients = ga != nullptr || gp != nullptr || gn != nullptr;
  const int64_t chunk = std::max<int64_t>(1, kBlock / std::max<int64_t>(D, 1));
  // Threads take whole chunks, so a row's place in its chunk (vector run or scalar tail of the conversions) and
  // with it every bit is the same for any thread count.
  const int64_t chunks = (N + chunk - 1) / chunk;
  at::parallel_for(0, chunks, std::max<int64_t>(1, row_grain(3 * D) / chunk), [&](int64_t first, int64_t last) {
    const int64_t span = std::min(chunk, N) * D;
    std::vector<acc_t> buffers(4 * span);
    acc_t *ba = buffers.data(), *bp = ba + span, *bn = bp + span, *gbuf = bn + span;
    std::vector<acc_t> coefficients(3 * chunk);  // each row's cp, cn, cs (see the header)
    const Vec veps(o.eps);
    for (int64_t r0 = first * chunk; r0 < std::min(N, last * chunk); r0 += chunk) {
      const int64_t rows = std::min(chunk, N - r0), count = rows * D;
      // The gradient pass reads the rows again: widened once into the buffers. Without it, each element is widened
      // in registers as it is summed (the same values in the same order: the same bits).
      const acc_t *xs = nullptr, *ys = nullptr, *zs = nullptr;
      if (gradients) {
        xs = read_block(a + r0 * D, 1, count, ba);
        ys = read_block(p + r0 * D, 1, count, bp);
        zs = read_block(n + r0 * D, 1, count, bn);
      }
      auto row_sums = [&](const auto* x, const auto* y, const auto* z, acc_t& sp, acc_t& sn, acc_t& ss) {
        Vec vp(acc_t(0)), vn(acc_t(0)), vs(acc_t(0));
        int64_t i = 0;
        for (; i + W <= D; i += W) {
          const Vec xa = load_widened<acc_t>(x + i), xp = load_widened<acc_t>(y + i), xn = load_widened<acc_t>(z + i);
          vp = vp + norm.term(xa - xp + veps);
          vn = vn + norm.term(xa - xn + veps);
          if (o.swap) vs = vs + norm.term(xp - xn + veps);
        }
        auto add = [](Vec& u, Vec& v) { return u + v; };
        sp = at::vec::vec_reduce_all<acc_t>(add, vp);
        sn = at::vec::vec_reduce_all<acc_t>(add, vn);
        ss = at::vec::vec_reduce_all<acc_t>(add, vs);
        for (; i < D; ++i) {
          const acc_t xa = static_cast<acc_t>(x[i]), xp = static_cast<acc_t>(y[i]), xn = static_cast<acc_t>(z[i]);
          sp += norm.term(xa - xp + o.eps);
          sn += norm.term(xa - xn + o.eps);
          if (o.swap) ss += norm.term(xp - xn + o.eps);
        }
      };
      for (int64_t k = 0; k < rows; ++k) {
        acc_t sp, sn, ss;
        if (gradients) row_sums(xs + k * D, ys + k * D, zs + k * D, sp, sn, ss);
        else row_sums(a + (r0 + k) * D, p + (r0 + k) * D, n + (r0 + k) * D, sp, sn, ss);
        const acc_t dp = norm.root(sp), dn = norm.root(sn);
        acc_t negative = dn, wn = acc_t(1), ws = acc_t(0), ds = acc_t(0);
        if (o.swap) {
          ds = norm.root(ss);
          // torch's minimum: NaN if either is; its gradient halves a tie and goes both ways past a NaN
          negative = std::isnan(dn) || std::isnan(ds) ? std::numeric_limits<acc_t>::quiet_NaN() : std::min(dn, ds);
          wn = dn == ds ? acc_t(0.5) : dn > ds ? acc_t(0) : acc_t(1);
          ws = dn == ds ? acc_t(0.5) : dn < ds ? acc_t(0) : acc_t(1);
        }
        const acc_t gap = o.margin + dp - negative;
        loss[r0 + k] = gap < acc_t(0) ? acc_t(0) : gap;  // a NaN gap stays NaN, as torch's clamp_min
        const acc_t h = gap >= acc_t(0) ? o.scale : acc_t(0);
        coefficients[3 * k] = h * norm.factor(dp);
        coefficients[3 * k + 1] = h * wn * norm.factor(dn);
        coefficients[3 * k + 2] = o.swap ? h * ws * norm.factor(ds) : acc_t(0);
      }
      if (!gradients) continue;
      // One gradient at a time over the chunk, from the rows in cache, each row with its coefficients:
      // term(cp, cn, cs, a, p, n) for vectors and scalars alike.
      auto write = [&](auto* g, auto term) {
        if (g == nullptr) return;
        for (int64_t k = 0; k < rows; ++k) {
          const acc_t *x = xs + k * D, *y = ys + k * D, *z = zs + k * D, *c = coefficients.data() + 3 * k;
          acc_t* out = gbuf + k * D;
          const Vec vcp(c[0]), vcn(c[1]), vcs(c[2]);
          int64_t j = 0;
          for (; j + W <= D; j += W)
            term(vcp, vcn, vcs, Vec::loadu(x + j), Vec::loadu(y + j), Vec::loadu(z + j), veps).store(out + j);
          for (; j < D; ++j) out[j] = term(c[0], c[1], c[2], x[j], y[j], z[j], o.eps);
        }
        write_block<std::remove_pointer_t<decltype(g)>>(gbuf, g + r0 * D, 1, count);
      };
      write(ga, [&](auto cp, auto cn, auto, auto xa, auto xp, auto xn, auto eps) {
        return cp * norm.shape(xa - xp + eps) - cn * norm.shape(xa - xn + eps);
      });
      write(gp, [&](auto cp, auto, auto cs, auto xa, auto xp, auto xn, auto eps) {
        const auto part = decltype(cp)(0) - cp * norm.shape(xa - xp + eps);
        return o.swap ? part - cs * norm.shape(xp - xn + eps) : part;
      });
      write(gn, [&](auto, auto cn, auto cs, auto xa, auto xp, auto xn, auto eps) {
        const auto part = cn * norm.shape(xa - xn + eps);
        return o.swap ? part + cs * norm.shape(xp - xn + eps) : part;
      });
    }
  });
}

// anchor, positive, negative: contiguous (N, D); positive and negative of one dtype, the anchor's or its accumulation
// dtype; p finite and > 0; grad_anchor / grad_positive / grad_negative: contiguous (N, D) in their input's dtype,
// written when given. Returns {per-row loss (empty unless per_element), the losses' sum} in the accumulation dtype.
std::vector<at::Tensor> triplet_margin_kernel(const KernelArgs& args) {
  const at::Tensor a = args.tensor("anchor"), p = args.tensor("positive"), n = args.tensor("negative");
  const std::optional<at::Tensor> ga = args.optional_tensor("grad_anchor"), gp = args.optional_tensor("grad_positive"),
                                  gn = args.optional_tensor("grad_negative");
  const auto acc_type = at::toOpMathType(a.scalar_type());
  const bool others_in_acc = p.scalar_type() != a.scalar_type();
  TORCH_CHECK(a.dim() == 2 && a.sizes() == p.sizes() && a.sizes() == n.sizes() && p.scalar_type() == n.scalar_type() &&
                  (!others_in_acc || p.scalar_type() == acc_type) && a.is_contiguous() && p.is_contiguous() &&
                  n.is_contiguous(),
              "lossops: triplet_margin_loss kernel expects contiguous (N, D) rows of one shape, positive and negative "
              "in the anchor's dtype or its accumulation dtype, got ", a.sizes(), " ", a.scalar_type(), ", ",
              p.sizes(), " ", p.scalar_type(), " and ", n.sizes(), " ", n.scalar_type());
  for (const auto& [g, x] : {std::pair{&ga, &a}, std::pair{&gp, &p}, std::pair{&gn, &n}}) {
    TORCH_CHECK(!g->has_value() || ((*g)->sizes() == x->sizes() && (*g)->scalar_type() == x->scalar_type() &&
                                    (*g)->is_contiguous()),
                "lossops: gradient buffers must be contiguous with their input's shape and dtype");
  }
  const double norm_p = args.real("p");
  TORCH_CHECK(norm_p > 0 && std::isfinite(norm_p), "lossops: triplet_margin_loss kernel takes a finite p > 0, got ",
              norm_p);
  const int64_t N = a.size(0), D = a.size(1);
  at::Tensor row_loss = new_cpu_tensor({N}, acc_type);
  double total = 0.0;
  if (N > 0) {
    LOSSOPS_DISPATCH_FLOATING(a.scalar_type(), "lossops_triplet_margin", [&] {
      using acc_t = opmath_t<scalar_t>;
      acc_t* loss = row_loss.mutable_data_ptr<acc_t>();
      const TripletOptions<acc_t> options{static_cast<acc_t>(args.real("margin")), static_cast<acc_t>(norm_p),
                                          static_cast<acc_t>(args.real("eps")),
                                          static_cast<acc_t>(args.scale("grad_scale")), args.flag("swap")};
      auto run = [&](auto other, auto kind) {
        using other_t = decltype(other);
        triplet_rows<decltype(kind)::value, scalar_t, other_t>(
            a.const_data_ptr<scalar_t>(), p.const_data_ptr<other_t>(), n.const_data_ptr<other_t>(), N, D, options,
            ga.has_value() ? ga->mutable_data_ptr<scalar_t>() : nullptr,
            gp.has_value() ? gp->mutable_data_ptr<other_t>() : nullptr,
            gn.has_value() ? gn->mutable_data_ptr<other_t>() : nullptr, loss);
      };
      auto with_kind = [&](auto other) {
        if (norm_p == 1.0) run(other, std::integral_constant<NormKind, NormKind::kOne>{});
        else if (norm_p == 2.0) run(other, std::integral_constant<NormKind, NormKind::kTwo>{});
        else run(other, std::integral_constant<NormKind, NormKind::kPower>{});
      };
      if (others_in_acc) with_kind(acc_t(0));
      else with_kind(scalar_t(0));
      total = sum_in_double(loss, N);
    });
  }
  return {args.flag("per_element") ? row_loss : new_cpu_tensor({0}, acc_type), cpu_scalar(total, acc_type)};
}

}  // namespace

LOSSOPS_REGISTER_KERNEL("triplet_margin_loss", triplet_margin_kernel, "anchor", "positive", "negative", "margin", "p",
                        "eps", "swap", "grad_anchor", "grad_positive", "grad_negative", "grad_scale", "per_element");

}  // namespace lossops
