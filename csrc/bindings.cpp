// The host module lossops._C (compiled once, baseline ISA): Python bindings, the gradient buffers, and the
// loading of the kernel library built for the CPU's instruction set (kernel_abi.h explains the split).
#include <torch/csrc/utils/pybind.h>

#include <dlfcn.h>

#include <atomic>
#include <string>

#include "allocation.h"
#include "eager_path.h"
#include "kernel_abi.h"

namespace lossops {
namespace {

std::atomic<const KernelTable*> g_kernels{nullptr};

const HostServices kHost{&host_gradient_pages_resident};

// Loads a per-ISA kernel library (a path lossops._cpp chose) and serves every later call from it. Loading
// another one later (tests force each ISA in turn) switches the table; libraries are never unloaded.
std::string load_kernels(const std::string& path) {
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(handle != nullptr, "lossops: cannot load the kernel library ", path, ": ", dlerror());
  auto entry = reinterpret_cast<KernelTableEntry>(dlsym(handle, LOSSOPS_KERNEL_TABLE_SYMBOL));
  TORCH_CHECK(entry != nullptr, "lossops: ", path, " has no ", LOSSOPS_KERNEL_TABLE_SYMBOL,
              " (a kernel library from another lossops version?); rebuild with pip install --no-build-isolation .");
  const KernelTable* table = entry(&kHost);
  g_kernels.store(table);
  return table->capability;
}

std::string capability() { return loaded_kernels().capability; }

std::vector<at::Tensor> cross_entropy(const at::Tensor& input, const at::Tensor& target,
                                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& grad,
                                      int64_t ignore_index, double label_smoothing, double lse_square_scale,
                                      double softcap, double focal_gamma, const at::Tensor& grad_scale) {
  return loaded_kernels().cross_entropy(input, target, weight, grad,
                                 {ignore_index, label_smoothing, lse_square_scale, softcap, focal_gamma},
                                 grad_scale.item<double>());
}

// Every elementwise family takes the same arguments (see ElementwiseArgs in kernel_abi.h).
template <ElementwiseKernel KernelTable::*Family>
std::vector<at::Tensor> elementwise(const at::Tensor& input, const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight, std::vector<int64_t> weight_layout,
                                    const std::optional<at::Tensor>& aux, std::vector<int64_t> aux_layout,
                                    std::vector<double> params, int64_t ignore_index,
                                    const std::optional<at::Tensor>& grad_input,
                                    const std::optional<at::Tensor>& grad_target, const at::Tensor& grad_scale,
                                    bool per_element) {
  return (loaded_kernels().*Family)({input, target, weight, std::move(weight_layout), aux, std::move(aux_layout),
                              std::move(params), grad_input, grad_target, grad_scale.item<double>(), per_element,
                              ignore_index});
}

}  // namespace

const KernelTable& loaded_kernels() {
  const KernelTable* table = g_kernels.load();
  TORCH_CHECK(table != nullptr, "lossops: no kernel library loaded (lossops._cpp.module() loads one)");
  return *table;
}

}  // namespace lossops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("load_kernels", &lossops::load_kernels, "Load a per-ISA kernel library; returns its CPU_CAPABILITY",
        py::arg("path"));
  m.def("capability", &lossops::capability, "CPU_CAPABILITY of the kernel library serving calls");
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
  m.def("eager_cross_entropy", &lossops::eager_cross_entropy,
        "Class-index cross-entropy for plain CPU tensors in one call (loss with its autograd node), or None "
        "where this path does not apply; a focal_gamma makes it softmax focal loss", py::arg("input"),
        py::arg("target"), py::arg("weight"), py::arg("ignore_index"), py::arg("reduction"),
        py::arg("label_smoothing"), py::arg("focal_gamma") = py::none(), py::arg("uniform_alpha") = py::none());
  m.def("eager_elementwise", &lossops::eager_elementwise,
        "An unweighted elementwise family for plain CPU tensors in one call, or None where this path does not apply",
        py::arg("family"), py::arg("input"), py::arg("target"), py::arg("params"), py::arg("reduction"),
        py::arg("target_grad"));
#define LOSSOPS_ELEMENTWISE(NAME, FAMILY, DOC)                                                                      \
  m.def(NAME, &lossops::elementwise<&lossops::KernelTable::FAMILY>, DOC, py::arg("input"), py::arg("target"),     \
        py::arg("weight"), py::arg("weight_layout"), py::arg("aux"), py::arg("aux_layout"), py::arg("params"),    \
        py::arg("ignore_index"), py::arg("grad_input"), py::arg("grad_target"), py::arg("grad_scale"),            \
        py::arg("per_element"))
  LOSSOPS_ELEMENTWISE("sigmoid_focal", sigmoid_focal, "Fused sigmoid focal loss forward (+ gradient)");
  LOSSOPS_ELEMENTWISE("bce_with_logits", bce_with_logits, "Fused BCE-with-logits forward (+ gradients)");
  LOSSOPS_ELEMENTWISE("regression", regression, "Fused L1 / MSE / smooth-L1 / Huber forward (+ gradients)");
#undef LOSSOPS_ELEMENTWISE
}
