// The eager call path for plain CPU tensors (eager_path.cpp) and what it needs from the rest of the host module.
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <vector>

#include "kernel_abi.h"

namespace lossops {

// The table of the kernel library lossops._cpp loaded (bindings.cpp); raises when none is loaded.
const KernelTable& loaded_kernels();

pybind11::object eager_cross_entropy(const at::Tensor& input, const at::Tensor& target,
                                     const std::optional<at::Tensor>& weight, int64_t ignore_index,
                                     const std::string& reduction, double label_smoothing,
                                     std::optional<double> focal_gamma, std::optional<double> uniform_alpha);
pybind11::object eager_ctc_loss(const at::Tensor& log_probs, const at::Tensor& targets, const at::Tensor& input_lengths,
                                const at::Tensor& target_lengths, int64_t blank, const std::string& reduction,
                                bool zero_infinity);
pybind11::object eager_elementwise(const std::string& family, const at::Tensor& input, const at::Tensor& target,
                                   std::vector<double> params, const std::string& reduction, bool target_grad);

}  // namespace lossops
