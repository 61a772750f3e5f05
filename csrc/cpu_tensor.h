// Output allocation for the kernels.
#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>

namespace lossops {

// Fresh CPU outputs without at::empty / at::scalar_tensor: their operator headers weigh heavily on every kernel
// translation unit's compile time, and the kernels never need more than an allocation.
inline at::Tensor new_cpu_tensor(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::Tensor(at::detail::empty_cpu(sizes, dtype));
}

// A 0-d tensor holding `value` in `dtype` (float or double: the kernels' accumulation types).
inline at::Tensor cpu_scalar(double value, at::ScalarType dtype) {
  at::Tensor out = new_cpu_tensor({}, dtype);
  if (dtype == at::kDouble) {
    *out.mutable_data_ptr<double>() = value;
  } else {
    TORCH_CHECK(dtype == at::kFloat, "lossops: cpu_scalar supports float and double, got ", dtype);
    *out.mutable_data_ptr<float>() = static_cast<float>(value);
  }
  return out;
}

// The gradient buffer a kernel writes when its caller passed one (undefined otherwise): contiguous, with the
// input's shape and dtype, checked once here for every family.
inline at::Tensor gradient_buffer(const std::optional<at::Tensor>& grad, const at::Tensor& input, const char* loss) {
  at::Tensor g = grad.has_value() ? *grad : at::Tensor();
  TORCH_CHECK(!g.defined() || (g.sizes() == input.sizes() && g.scalar_type() == input.scalar_type() &&
                               g.is_contiguous()),
              "lossops: ", loss, " gradient buffer must be contiguous with the input's shape and dtype");
  return g;
}

}  // namespace lossops
