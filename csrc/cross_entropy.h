#pragma once
#include "kernel_abi.h"

namespace lossops {

// See CrossEntropyKernel (kernel_abi.h).
std::vector<at::Tensor> cross_entropy_forward(const at::Tensor& input, const at::Tensor& target,
                                              const std::optional<at::Tensor>& weight,
                                              const std::optional<at::Tensor>& grad,
                                              const CrossEntropyOptions& options, double grad_scale);

}  // namespace lossops
