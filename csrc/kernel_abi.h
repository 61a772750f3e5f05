// What the host module (lossops._C: Python bindings, gradient buffers; compiled once) and the per-ISA kernel
// libraries (lossops/_kernels_<isa>.so: the loss kernels, compiled once per instruction set) share.
//
// The kernels are compiled with AVX2/AVX-512 flags into libraries of their own, so the linker can never merge
// an AVX-512 copy of an inline function into code a baseline CPU runs; the host loads the one library the CPU
// supports (lossops/_cpp.py picks it) and calls it through KernelTable. Only the light ATen headers appear
// here: this interface is parsed by every kernel translation unit of every ISA.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <cstdint>
#include <optional>
#include <string>
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
  std::optional<at::Tensor> aux;       // like weight (pos_weight for BCE); without a weight, it may instead have
                                       // every element of the input, in the input's dtype
  std::vector<int64_t> aux_layout;
  std::vector<double> params;          // family parameters (beta, gamma, ...)
  std::optional<at::Tensor> grad_input, grad_target;  // written when given (input's shape and dtype)
  double grad_scale = 1.0;
  bool per_element = false;            // also return the per-element loss (reduction="none")
  int64_t ignore_index = -100;         // class-index targets only: rows with this index contribute nothing
};

// Named kernel arguments: the Python side calls every kernel of both backends with keyword arguments, the
// host module checks them against the names the kernel registered (a missing, extra or misspelt name is an
// error, never a shifted position), and a kernel reads each by name with its type checked.
class KernelArgs {
 public:
  KernelArgs(const char* kernel, const std::vector<std::string>& names, std::vector<c10::IValue> values)
      : kernel_(kernel), names_(names), values_(std::move(values)) {}

  // The registered parameter names, in registration order.
  const std::vector<std::string>& names() const { return names_; }

  at::Tensor tensor(const char* name) const {
    const c10::IValue& v = get(name);
    TORCH_CHECK(v.isTensor(), "lossops: kernel ", kernel_, ": argument ", name, " must be a tensor, got ", v.tagKind());
    return v.toTensor();
  }
  std::optional<at::Tensor> optional_tensor(const char* name) const {
    const c10::IValue& v = get(name);
    if (v.isNone()) return std::nullopt;
    return tensor(name);
  }
  double real(const char* name) const {
    const c10::IValue& v = get(name);
    TORCH_CHECK(v.isDouble() || v.isInt(), "lossops: kernel ", kernel_, ": argument ", name, " must be a number, got ",
                v.tagKind());
    return v.isDouble() ? v.toDouble() : static_cast<double>(v.toInt());
  }
  std::optional<double> optional_real(const char* name) const {
    if (get(name).isNone()) return std::nullopt;
    return real(name);
  }
  int64_t integer(const char* name) const {
    const c10::IValue& v = get(name);
    TORCH_CHECK(v.isInt(), "lossops: kernel ", kernel_, ": argument ", name, " must be an int, got ", v.tagKind());
    return v.toInt();
  }
  bool flag(const char* name) const {
    const c10::IValue& v = get(name);
    TORCH_CHECK(v.isBool(), "lossops: kernel ", kernel_, ": argument ", name, " must be a bool, got ", v.tagKind());
    return v.toBool();
  }
  std::vector<int64_t> integers(const char* name) const {
    const c10::IValue& v = get(name);
    TORCH_CHECK(v.isIntList(), "lossops: kernel ", kernel_, ": argument ", name, " must be a list of ints");
    return v.toIntVector();
  }
  // A gradient scale: a number (the eager path) or a one-element float/double CPU tensor (the custom op's 0-d
  // denominator arithmetic), read without a dispatch.
  double scale(const char* name) const {
    const c10::IValue& v = get(name);
    if (!v.isTensor()) return real(name);
    const at::Tensor& t = v.toTensor();
    TORCH_CHECK(t.numel() == 1 && t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble),
                "lossops: kernel ", kernel_, ": argument ", name, " must be a number or a one-element float CPU tensor");
    return t.scalar_type() == at::kDouble ? *t.const_data_ptr<double>() : *t.const_data_ptr<float>();
  }
  std::vector<double> reals(const char* name) const {
    const c10::IValue& v = get(name);
    TORCH_CHECK(v.isDoubleList(), "lossops: kernel ", kernel_, ": argument ", name, " must be a list of floats");
    return v.toDoubleVector();
  }

 private:
  // Kernels read their arguments in about the order they registered them, so the search starts after the last
  // one found: one comparison a read instead of a scan (a small call reads a dozen).
  const c10::IValue& get(const char* name) const {
    const size_t n = names_.size();
    for (size_t k = 0; k < n; ++k) {
      const size_t i = (next_ + k) % n;
      if (names_[i] == name) {
        next_ = i + 1;
        return values_[i];
      }
    }
    TORCH_CHECK(false, "lossops: kernel ", kernel_, " reads an argument ", name, " it did not register");
  }
  const char* kernel_;
  const std::vector<std::string>& names_;
  std::vector<c10::IValue> values_;
  mutable size_t next_ = 0;
};

using KernelFunction = std::vector<at::Tensor> (*)(const KernelArgs& args);

// One kernel of a loss family, as a kernel library registers it (LOSSOPS_REGISTER_KERNEL, kernel_table.cpp).
struct KernelEntry {
  std::string name;
  std::vector<std::string> parameters;
  KernelFunction function;
};

struct KernelTable {
  const char* capability;  // "DEFAULT", "AVX2", "AVX512": the CPU_CAPABILITY the library was built for
  const std::vector<KernelEntry>* kernels;

  const KernelEntry* find(const std::string& name) const {
    for (const KernelEntry& e : *kernels) {
      if (e.name == name) return &e;
    }
    return nullptr;
  }
};

// What the kernels ask of the host (the kept gradient buffers live there, once per process).
struct HostServices {
  bool (*gradient_pages_resident)(const void* ptr);
};

// The one symbol a kernel library exports (kernel_table.cpp defines it); its suffix changes whenever KernelTable,
// KernelEntry or HostServices do, so a stale library is refused instead of called with the wrong layout.
#define LOSSOPS_KERNEL_TABLE_SYMBOL "lossops_kernel_table_v3"
using KernelTableEntry = const KernelTable* (*)(const HostServices* host);

// For kernel translation units: adds a kernel to the library's table when the library is loaded.
std::vector<KernelEntry>& kernel_registry();
struct KernelRegistration {
  KernelRegistration(const char* name, std::vector<std::string> parameters, KernelFunction function) {
    kernel_registry().push_back({name, std::move(parameters), function});
  }
};
#define LOSSOPS_REGISTER_KERNEL_CAT2(a, b) a##b
#define LOSSOPS_REGISTER_KERNEL_CAT(a, b) LOSSOPS_REGISTER_KERNEL_CAT2(a, b)
// LOSSOPS_REGISTER_KERNEL("name", function, "param", ...): the parameter names are the keywords the Python side
// passes (the same as the Triton kernel's), in any order.
#define LOSSOPS_REGISTER_KERNEL(NAME, FUNCTION, ...)                                                        \
  static const ::lossops::KernelRegistration LOSSOPS_REGISTER_KERNEL_CAT(lossops_kernel_, __COUNTER__)( \
      NAME, {__VA_ARGS__}, FUNCTION)

}  // namespace lossops
