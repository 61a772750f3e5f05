#pragma once
// Regression losses: params {kind (0 L1, 1 MSE, 2 smooth-L1, 3 Huber), beta or delta}.
#include "kernel_abi.h"

namespace lossops {

std::vector<at::Tensor> regression_forward(const ElementwiseArgs& args);

}  // namespace lossops
