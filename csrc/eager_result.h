// What an eager call returns (part of the host module, for eager_path.cpp): the loss reduced and cast as the
// custom op's Python reduces and casts it, and the autograd node that hands out the gradients written in forward.
#pragma once

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>

#include <memory>
#include <string>
#include <vector>

namespace lossops::eager_result {

enum class Reduction { kNone, kMean, kSum };

// A value computed in the accumulation type, rounded there (as the custom op's 0-d tensor arithmetic rounds),
// then cast to the loss's dtype (round to nearest even, as Tensor.to does), written into `reuse` where it is a 0-d
// tensor of that dtype that nothing else holds (the kernel's own total: one allocation less on a tiny call), else
// into a fresh 0-d tensor.
at::Tensor scalar_loss(double value, at::ScalarType acc, at::ScalarType out, const at::Tensor& reuse = {}) {
  const double rounded = acc == at::kDouble ? value : static_cast<double>(static_cast<float>(value));
  const bool reusable = reuse.defined() && reuse.use_count() == 1 && reuse.dim() == 0 && reuse.scalar_type() == out &&
                        reuse.is_cpu() && reuse.has_storage() && reuse.storage().use_count() == 1 &&
                        !reuse.is_neg() && !reuse.is_conj() && !reuse.requires_grad();
  at::Tensor t = reusable ? reuse : at::Tensor(at::detail::empty_cpu({}, out));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out, "lossops_scalar_loss", [&] {
    *t.mutable_data_ptr<scalar_t>() = static_cast<scalar_t>(acc == at::kDouble ? rounded : static_cast<float>(rounded));
  });
  return t;
}

// The mean's denominator as the custom op's 0-d tensor holds it (rounded to the accumulation type), and the
// gradient's scale (its reciprocal for "mean", computed in that type, 0 for a denominator of 0; 1 otherwise): a
// mean over nothing (every target ignored, or every kept weight 0) has a zero gradient, as lossops._reduce has it.
struct Denominator {
  double value, gradient_scale;
};

Denominator denominator_of(double exact, at::ScalarType acc, Reduction reduction) {
  const bool fp64 = acc == at::kDouble;
  const double value = fp64 ? exact : static_cast<float>(exact);
  double scale = 1.0;
  if (reduction == Reduction::kMean)
    scale = value == 0 ? 0.0 : fp64 ? 1.0 / value : static_cast<double>(1.0f / static_cast<float>(value));
  return {value, scale};
}

// The loss from the kernel's per-item losses or their sum, reduced and cast as lossops._reduce.reduce and the
// public function do it.
at::Tensor reduced_loss(const at::Tensor& per_item, const at::Tensor& total, at::IntArrayRef item_sizes,
                        Denominator denominator, at::ScalarType acc, at::ScalarType out, Reduction reduction) {
  if (reduction == Reduction::kNone) {
    at::Tensor loss = per_item.sizes() == item_sizes ? per_item : per_item.view(item_sizes);
    return acc == out ? loss : loss.to(out);
  }
  const bool fp64 = acc == at::kDouble;
  double value = fp64 ? *total.const_data_ptr<double>() : *total.const_data_ptr<float>();
  if (reduction == Reduction::kMean)
    value = fp64 ? value / denominator.value
                 : static_cast<double>(static_cast<float>(value) / static_cast<float>(denominator.value));
  return scalar_loss(value, acc, out, total);
}

// grad_output's one value, read from its memory where it is a plain CPU tensor (Tensor.item() is a dispatched op,
// a visible share of a tiny loss's backward).
inline double upstream_value(const at::Tensor& grad_output) {
  if (grad_output.is_cpu() && grad_output.layout() == at::kStrided && grad_output.numel() == 1 &&
      grad_output.has_storage() && !grad_output.is_neg() && !grad_output._is_zerotensor() &&
      !grad_output.key_set().has(c10::DispatchKey::Python)) {
    switch (grad_output.scalar_type()) {
      case at::kFloat: return *grad_output.const_data_ptr<float>();
      case at::kDouble: return *grad_output.const_data_ptr<double>();
      case at::kBFloat16: return static_cast<double>(*grad_output.const_data_ptr<at::BFloat16>());
      case at::kHalf: return static_cast<double>(*grad_output.const_data_ptr<at::Half>());
      default: break;
    }
  }
  return grad_output.item<double>();
}

// One gradient written in forward, multiplied by grad_output in backward as lossops._reduce.apply_grad_output
// does for the custom op. A backward that frees the graph scales the buffer in place (no second input-sized
// buffer, e.g. for GradScaler's scale) and hands it out: the node lets go of it at once, so nothing else reads
// it. A backward that keeps the graph (retain_graph=True) hands out a new tensor and leaves the buffer as it
// was, so a hook that modifies its gradient in place cannot change what a later backward computes.
struct WrittenGradient {
  at::Tensor buffer;                  // in the call tensor's shape, scaled for the reduction; undefined: not needed
  std::vector<int64_t> kernel_shape;  // the kernel's view of it, against which grad_output's items broadcast

  at::Tensor times(const at::Tensor& grad_output, at::IntArrayRef item_shape) {
    if (!buffer.defined()) return {};
    if (!item_shape.empty())
      return buffer.view(kernel_shape).mul(grad_output.reshape(item_shape)).view(buffer.sizes());
    const double g = upstream_value(grad_output);
    if (torch::autograd::get_current_graph_task_keep_graph()) return buffer.mul(g);
    if (g != 1) buffer.mul_(g);
    return buffer;
  }
};

// An autograd node held the way this torch's graph edges hold one: std::shared_ptr up to torch 2.12,
// c10::intrusive_ptr from 2.13 on (Edge::function's type says which).
template <typename Pointer>
struct NodeMaker;
template <typename Base>
struct NodeMaker<std::shared_ptr<Base>> {
  template <typename T>
  static std::shared_ptr<T> make() { return std::make_shared<T>(); }
};
template <typename Base>
struct NodeMaker<c10::intrusive_ptr<Base>> {
  template <typename T>
  static c10::intrusive_ptr<T> make() { return c10::make_intrusive<T>(); }
};
template <typename T>
auto make_node() {
  return NodeMaker<decltype(torch::autograd::Edge::function)>::template make<T>();
}

// A node whose saved values went with an earlier backward that did not retain the graph: torch's own message.
inline void check_not_released(bool released) {
  TORCH_CHECK(!released, "Trying to backward through the graph a second time (or directly access saved tensors "
              "after they have already been freed). Saved intermediate values of the graph are freed when you call "
              ".backward() or autograd.grad(). Specify retain_graph=True if you need to backward through the graph "
              "a second time or if you need to access saved tensors after calling backward.");
}

struct FusedLossBackward : torch::autograd::Node {
  std::vector<WrittenGradient> gradients;  // one per next edge
  std::vector<int64_t> item_shape;         // reduction="none": how grad_output broadcasts against the gradients
  bool released = false;
  std::string node_name;

  std::string name() const override { return node_name; }

  void release_variables() override {
    for (WrittenGradient& g : gradients) g.buffer.reset();
    released = true;
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    check_not_released(released);
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "lossops: double backward (create_graph=True through a lossops loss) is not supported");
    torch::autograd::variable_list out(gradients.size());
    const at::Tensor& grad_output = grads[0];
    if (!grad_output.defined()) return out;  // the loss did not reach the result
    for (size_t i = 0; i < gradients.size(); ++i) {
      if (should_compute_output(i)) out[i] = gradients[i].times(grad_output, item_shape);
    }
    return out;
  }
};

}  // namespace lossops::eager_result
