// What the host module (lossops._C: Python bindings, gradient buffers; compiled once) and the per-ISA kernel
// libraries (lossops/_kernels_<isa>.so: the loss kernels, compiled once per instruction set) share.
//
// The kernels are compiled with AVX2/AVX-512 flags into libraries of their own, so the linker can never merge
// an AVX-512 copy of an inline function into code a baseline CPU runs; the host loads the one library the CPU
// supports (lossops/_cpp.py picks it) and calls it through KernelTable. Only the light ATen headers appear
// here: this interface is parsed by every kernel translation unit of every ISA.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
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

// Kernel arguments shared by every elementwise family (the Python side builds them in lossops/_elementwise.py).
struct ElementwiseArgs {
  at::Tensor input;                    // contiguous, any floating dtype
  at::Tensor target;                   // contiguous, input's shape and dtype; or int64 class indices (one per row)
  std::optional<at::Tensor> weight;    // compact, contiguous, opmath dtype; element i reads weight[(i / inner) % period]
  std::vector<int64_t> weight_layout;  // {inner, period}
  std::optional<at::Tensor> aux;       // like weight (pos_weight for BCE)
  std::vector<int64_t> aux_layout;
  std::vector<double> params;          // family parameters (beta, gamma, ...)
  std::optional<at::Tensor> grad_input, grad_target;  // written when given (input's shape and dtype)
  double grad_scale = 1.0;
  bool per_element = false;            // also return the per-element loss (reduction="none")
  int64_t ignore_index = -100;         // class-index targets only: rows with this index contribute nothing
};

// input: (outer, C, inner) with any strides; target: int64 (outer*inner) class indices, or probabilities of
// the input's shape. Writes the gradient, scaled by grad_scale, into `grad` when given (it may alias input).
// Returns {per-row loss, per-row logsumexp, sum of the per-row losses} in the input's opmath dtype.
using CrossEntropyKernel = std::vector<at::Tensor> (*)(const at::Tensor& input, const at::Tensor& target,
                                                       const std::optional<at::Tensor>& weight,
                                                       const std::optional<at::Tensor>& grad,
                                                       const CrossEntropyOptions& options, double grad_scale);
// Returns {per-element loss (opmath dtype; empty unless per_element), sum of the losses (0-d, opmath)}.
using ElementwiseKernel = std::vector<at::Tensor> (*)(const ElementwiseArgs& args);

struct KernelTable {
  const char* capability;  // "DEFAULT", "AVX2", "AVX512": the CPU_CAPABILITY the library was built for
  CrossEntropyKernel cross_entropy;
  ElementwiseKernel sigmoid_focal;
  ElementwiseKernel bce_with_logits;
  ElementwiseKernel regression;
};

// What the kernels ask of the host (the kept gradient buffer lives there, once per process).
struct HostServices {
  bool (*gradient_pages_resident)(const void* ptr);
};

// The one symbol a kernel library exports; its suffix changes whenever KernelTable or HostServices do, so a
// stale library is refused instead of called with the wrong layout.
#define LOSSOPS_KERNEL_TABLE_SYMBOL "lossops_kernel_table_v1"
using KernelTableEntry = const KernelTable* (*)(const HostServices* host);

}  // namespace lossops
