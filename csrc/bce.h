#pragma once
// BCE-with-logits (torch.nn.functional.binary_cross_entropy_with_logits): params {}; aux = pos_weight.
#include "kernel_abi.h"

namespace lossops {

std::vector<at::Tensor> bce_with_logits_forward(const ElementwiseArgs& args);

}  // namespace lossops
