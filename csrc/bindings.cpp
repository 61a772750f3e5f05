// Python bindings only: one function per kernel entry point. Each ISA build of this module exposes the
// same functions; lossops._cpp loads the best one the CPU supports.
#include <torch/extension.h>

#include "cross_entropy.h"

namespace lossops {
namespace {

std::vector<at::Tensor> cross_entropy(const at::Tensor& input, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& grad,
                                      int64_t ignore_index, double label_smoothing, double lse_square_scale,
                                      double softcap, double focal_gamma, const at::Tensor& grad_scale) {
  return cross_entropy_forward(input, target, weight, grad,
                               {ignore_index, label_smoothing, lse_square_scale, softcap, focal_gamma},
                               grad_scale.item<double>());
}

}  // namespace
}  // namespace lossops

#define LOSSOPS_STR2(x) #x
#define LOSSOPS_STR(x) LOSSOPS_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("CPU_CAPABILITY") = LOSSOPS_STR(CPU_CAPABILITY);
  m.def("cross_entropy", &lossops::cross_entropy, "Fused cross-entropy / softmax-focal forward (+ gradient)",
        py::arg("input"), py::arg("target"), py::arg("weight"), py::arg("grad"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("lse_square_scale"), py::arg("softcap"), py::arg("focal_gamma"),
        py::arg("grad_scale"));
}
