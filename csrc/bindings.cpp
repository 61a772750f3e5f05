// Python bindings only: one function per kernel entry point. Each ISA build of this module exposes the
// same functions; lossops._cpp loads the best one the CPU supports.
#include <torch/extension.h>

#include "bce.h"
#include "common.h"
#include "cross_entropy.h"
#include "focal.h"
#include "regression.h"

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

// Every elementwise family takes the same arguments (see ElementwiseArgs in elementwise.h).
template <std::vector<at::Tensor> (*Forward)(const ElementwiseArgs&)>
std::vector<at::Tensor> elementwise(const at::Tensor& input, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight, std::vector<int64_t> weight_layout,
                                    const std::optional<at::Tensor>& aux, std::vector<int64_t> aux_layout,
                                    std::vector<double> params, int64_t ignore_index,
                                    const std::optional<at::Tensor>& grad_input,
                                    const std::optional<at::Tensor>& grad_target, const at::Tensor& grad_scale,
                                    bool per_element) {
  return Forward({input, target, weight, std::move(weight_layout), aux, std::move(aux_layout), std::move(params),
                  grad_input, grad_target, grad_scale.item<double>(), per_element, ignore_index});
}

}  // namespace
}  // namespace lossops

#define LOSSOPS_STR2(x) #x
#define LOSSOPS_STR(x) LOSSOPS_STR2(x)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("CPU_CAPABILITY") = LOSSOPS_STR(CPU_CAPABILITY);
  m.def("empty_gradient_like", [](const at::Tensor& like) { return lossops::empty_gradient(like.sizes(), like.scalar_type()); },
        "Uninitialised contiguous CPU tensor shaped like `like`, on transparent huge pages when large", py::arg("like"));
  m.def("set_gradient_cache", &lossops::set_gradient_cache, "Keep the last freed large gradient buffer for reuse",
        py::arg("enabled"));
  m.def("release_gradient_cache", &lossops::release_gradient_cache, "Free the kept gradient buffer; returns its bytes");
  m.def("gradient_cache_bytes", &lossops::gradient_cache_bytes, "Bytes of the kept gradient buffer (0 if none)");
  m.def("gradient_cache_enabled", &lossops::gradient_cache_enabled, "Whether freed gradient buffers are kept");
  m.def("cross_entropy", &lossops::cross_entropy, "Fused cross-entropy / softmax-focal forward (+ gradient)",
        py::arg("input"), py::arg("target"), py::arg("weight"), py::arg("grad"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("lse_square_scale"), py::arg("softcap"), py::arg("focal_gamma"),
        py::arg("grad_scale"));
#define LOSSOPS_ELEMENTWISE(NAME, FORWARD, DOC)                                                                   \
  m.def(NAME, &lossops::elementwise<&lossops::FORWARD>, DOC, py::arg("input"), py::arg("target"), py::arg("weight"), \
        py::arg("weight_layout"), py::arg("aux"), py::arg("aux_layout"), py::arg("params"), py::arg("ignore_index"), \
        py::arg("grad_input"), py::arg("grad_target"), py::arg("grad_scale"), py::arg("per_element"))
  LOSSOPS_ELEMENTWISE("sigmoid_focal", sigmoid_focal_forward, "Fused sigmoid focal loss forward (+ gradient)");
  LOSSOPS_ELEMENTWISE("bce_with_logits", bce_with_logits_forward, "Fused BCE-with-logits forward (+ gradients)");
  LOSSOPS_ELEMENTWISE("regression", regression_forward, "Fused L1 / MSE / smooth-L1 / Huber forward (+ gradients)");
#undef LOSSOPS_ELEMENTWISE
}
