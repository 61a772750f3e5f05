#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace lossops {

struct CrossEntropyOptions {
  int64_t ignore_index = -100;
  double label_smoothing = 0.0;
  double lse_square_scale = 0.0;
  double softcap = 0.0;        // <= 0: off
  double focal_gamma = -1.0;   // >= 0: softmax focal loss instead of cross-entropy (weight = per-class alpha)
};

// input: (outer, C, inner) with any strides; target: int64 (outer*inner) class indices, or probabilities of
// the input's shape. Writes the gradient, scaled by grad_scale, into `grad` when given (it may alias input).
// Returns {per-row loss, per-row logsumexp, sum of the per-row losses} in the input's opmath dtype.
std::vector<at::Tensor> cross_entropy_forward(const at::Tensor& input, const at::Tensor& target,
                                              const std::optional<at::Tensor>& weight,
                                              const std::optional<at::Tensor>& grad,
                                              const CrossEntropyOptions& options, double grad_scale);

}  // namespace lossops
