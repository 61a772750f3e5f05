#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace lossops {

// CTC loss (torch.nn.functional.ctc_loss semantics, reduction="none"), forward and, when `grad` is given, the
// gradient in the same call.
//
// log_probs: (T, N, C), any strides; float, double, bfloat16 or half.
// targets: int64, contiguous, flat; sequence n's labels are targets[target_offsets[n] + k], k < target_lengths[n]
//   (a padded (N, S) tensor flattened with offsets n * S, or the concatenated 1-D form with offsets = exclusive
//   cumsum of target_lengths).
// target_offsets, input_lengths, target_lengths: int64, contiguous, (N,).
// grad: when given, a contiguous (T, N, C) tensor of log_probs' dtype, not aliasing log_probs. Every element is
//   written: grad_scale[n] times torch's CTC gradient (exp(log_probs) - posterior, the gradient with respect to
//   the logits of a log_softmax), zero for t >= input_lengths[n].
// grad_scale: (N,) in the opmath dtype (float; double for double inputs); read only when grad is given.
// zero_infinity: sequences with no possible alignment get nll 0 and a zero gradient.
// Returns {nll (N,) in the opmath dtype}.
std::vector<at::Tensor> ctc_loss_forward(const at::Tensor& log_probs, const at::Tensor& targets,
                                         const at::Tensor& target_offsets, const at::Tensor& input_lengths,
                                         const at::Tensor& target_lengths, int64_t blank, bool zero_infinity,
                                         const std::optional<at::Tensor>& grad, const at::Tensor& grad_scale);

}  // namespace lossops
