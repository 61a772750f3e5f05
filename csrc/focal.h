#pragma once
// Sigmoid focal loss (torchvision.ops.sigmoid_focal_loss): params {alpha (< 0: off), gamma}; dense or class-index targets.
#include "kernel_abi.h"

namespace lossops {

std::vector<at::Tensor> sigmoid_focal_forward(const ElementwiseArgs& args);

}  // namespace lossops
