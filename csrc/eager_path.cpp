// The eager call path for plain CPU tensors (part of the host module): one call from Python runs the kernel,
// the reduction, the output cast and creates the autograd node, all in C++.
//
// On small inputs the Python custom-op route (torch.library's autograd wrapper, redispatch, the mean's
// denominator and the casts as separate tensor ops) costs many times the kernel, more than eager PyTorch's whole
// call (docs/eager-path.md has the figures). The custom op stays the route for everything this path does not take
// (torch.compile, tensor subclasses, dispatch modes, autocast, other backends; lossops/_eager.py decides).
// This path is tried before the Python checks and returns None for anything it does not recognise (bad
// arguments included), so the Python path raises every error and each message keeps one source. The values
// are the custom op's bit for bit: same kernel, same denominators in the same order, same casts.
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/TensorUtils.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "allocation.h"
#include "eager_path.h"
#include "kernel_abi.h"
#include "tuning.h"

namespace lossops {
namespace {

enum class Reduction { kNone, kMean, kSum };

std::optional<Reduction> parse_reduction(const std::string& name) {
  if (name == "mean") return Reduction::kMean;
  if (name == "sum") return Reduction::kSum;
  if (name == "none") return Reduction::kNone;
  return std::nullopt;
}

bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// What lossops/_eager.py leaves to this side: a torch function or dispatch mode, a functorch transform or CPU
// autocast makes the call take the custom op, where PyTorch sees it. Thread-local reads here, where the same
// checks from Python cost half a microsecond.
bool modes_active() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode) || at::autocast::is_autocast_enabled(at::kCPU);
}

// t's elements under other sizes and strides, sharing its storage, made without the dispatcher (no view
// tracking, no autograd metadata): for the kernels' (outer, C, inner) and flat views, which never leave this
// file. A call takes a few microseconds, so even the dispatched view ops would be a visible share of it.
at::Tensor internal_view(const at::Tensor& t, at::IntArrayRef sizes, at::IntArrayRef strides) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(t.storage()), t.key_set(), t.dtype());
  impl->set_sizes_and_strides(sizes, strides, t.storage_offset());
  return at::Tensor(std::move(impl));
}

// A value computed in the accumulation type, rounded there (as the custom op's 0-d tensor arithmetic rounds),
// then cast to the loss's dtype (round to nearest even, as Tensor.to does), written into a fresh 0-d tensor.
at::Tensor scalar_loss(double value, at::ScalarType acc, at::ScalarType out) {
  const double rounded = acc == at::kDouble ? value : static_cast<double>(static_cast<float>(value));
  at::Tensor t = at::detail::empty_cpu({}, out);
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
    at::Tensor loss = per_item.view(item_sizes);
    return acc == out ? loss : loss.to(out);
  }
  const bool fp64 = acc == at::kDouble;
  double value = fp64 ? *total.const_data_ptr<double>() : *total.const_data_ptr<float>();
  if (reduction == Reduction::kMean)
    value = fp64 ? value / denominator.value
                 : static_cast<double>(static_cast<float>(value) / static_cast<float>(denominator.value));
  return scalar_loss(value, acc, out);
}

// One gradient written in forward, multiplied by grad_output in backward as lossops._reduce.apply_grad_output
// does for the custom op. A backward that frees the graph scales the buffer in place (no second input-sized
// buffer, e.g. for GradScaler's scale) and hands it out: the node lets go of it at once, so nothing else reads
// it. A backward that keeps the graph (retain_graph=True) hands out a new tensor and leaves the buffer as it
// was, so a hook that modifies its gradient in place cannot change what a later backward computes.
struct WrittenGradient {
  at::Tensor buffer;  // scaled for the reduction; undefined when not needed

  at::Tensor times(const at::Tensor& grad_output, at::IntArrayRef item_shape, at::IntArrayRef shape) {
    if (!buffer.defined()) return {};
    if (!item_shape.empty()) return buffer.mul(grad_output.reshape(item_shape)).view(shape);
    const double g = grad_output.item<double>();
    if (torch::autograd::get_current_graph_task_keep_graph()) return buffer.mul(g).view(shape);
    if (g != 1) buffer.mul_(g);
    return buffer.view(shape);
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

struct FusedLossBackward : torch::autograd::Node {
  WrittenGradient input_gradient, target_gradient;
  std::vector<int64_t> item_shape;   // reduction="none": how grad_output broadcasts against the gradients
  std::vector<int64_t> input_shape;  // the gradients' shape as the input had it
  bool released = false;
  std::string node_name;

  std::string name() const override { return node_name; }

  void release_variables() override {
    input_gradient.buffer.reset();
    target_gradient.buffer.reset();
    released = true;
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    TORCH_CHECK(!released, "Trying to backward through the graph a second time (or directly access saved tensors "
                "after they have already been freed). Saved intermediate values of the graph are freed when you call "
                ".backward() or autograd.grad(). Specify retain_graph=True if you need to backward through the graph "
                "a second time or if you need to access saved tensors after calling backward.");
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "lossops: double backward (create_graph=True through a lossops loss) is not supported");
    torch::autograd::variable_list out(2);
    const at::Tensor& grad_output = grads[0];
    if (!grad_output.defined()) return out;  // the loss did not reach the result
    if (should_compute_output(0)) out[0] = input_gradient.times(grad_output, item_shape, input_shape);
    if (should_compute_output(1)) out[1] = target_gradient.times(grad_output, item_shape, input_shape);
    return out;
  }
};

py::object attach_gradient(at::Tensor loss, const at::Tensor& input, const at::Tensor& target, at::Tensor grad_input,
                           at::Tensor grad_target, std::vector<int64_t> item_shape, const char* name) {
  auto node = make_node<FusedLossBackward>();
  node->input_gradient.buffer = std::move(grad_input);
  node->target_gradient.buffer = std::move(grad_target);
  node->item_shape = std::move(item_shape);
  node->input_shape = input.sizes().vec();
  node->node_name = name;
  node->set_next_edges(torch::autograd::collect_next_edges(input, target));
  torch::autograd::set_history(loss, node);
  return py::cast(loss);
}

}  // namespace

// Class-index cross-entropy with torch's options (weight, ignore_index, reduction, label_smoothing), and
// softmax focal loss (focal_gamma given; weight = per-class alpha, or uniform_alpha for a float alpha, whose
// mean divides by the count of kept rows, not by their alphas). Anything this path does not serve, invalid
// arguments included, returns None (the Python path then raises).
py::object eager_cross_entropy(const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, int64_t ignore_index,
                               const std::string& reduction_name, double label_smoothing,
                               std::optional<double> focal_gamma, std::optional<double> uniform_alpha) {
  const auto reduction = parse_reduction(reduction_name);
  const bool focal = focal_gamma.has_value();
  if (focal && (!(*focal_gamma >= 0) || !std::isfinite(*focal_gamma) || label_smoothing != 0 ||
                (uniform_alpha && (weight.has_value() || !(*uniform_alpha >= 0) || !std::isfinite(*uniform_alpha)))))
    return py::none();
  if ((!focal && uniform_alpha) || modes_active()) return py::none();
  if (!reduction || !(label_smoothing >= 0 && label_smoothing <= 1) || !input.device().is_cpu() ||
      !kernel_dtype(input.scalar_type()) || input.dim() < 1 || input.numel() == 0 ||
      target.scalar_type() != at::kLong || !target.device().is_cpu())
    return py::none();
  const int64_t C = input.dim() == 1 ? input.size(0) : input.size(1);
  if (weight.has_value() && (weight->scalar_type() != input.scalar_type() || weight->dim() != 1 ||
                             weight->numel() != C || weight->requires_grad() || !weight->device().is_cpu()))
    return py::none();
  // torch's target shape: the input's without the class dimension.
  std::vector<int64_t> expected = input.sizes().vec();
  expected.erase(expected.begin() + (input.dim() == 1 ? 0 : 1));
  if (target.sizes() != at::IntArrayRef(expected)) return py::none();
  // The (outer, C, inner) view the kernel reads; dims 2.. merge into one only where their strides allow, else
  // (as flatten would) a contiguous copy.
  const int64_t outer = input.dim() == 1 ? 1 : input.size(0);
  const int64_t inner = input.dim() <= 2 ? 1 : input.numel() / (outer * C);
  const int64_t class_stride = input.dim() == 1 ? input.stride(0) : input.stride(1);
  at::Tensor logits3;
  if (input.dim() <= 2) {
    logits3 = internal_view(input, {outer, C, 1}, {input.dim() == 1 ? C * class_stride : input.stride(0), class_stride, 1});
  } else if (auto merged = at::detail::computeStride(input.sizes(), input.strides(), at::DimVector{outer, C, inner})) {
    logits3 = internal_view(input, {outer, C, inner}, *merged);
  } else {
    const at::Tensor dense = input.contiguous();
    logits3 = internal_view(dense, {outer, C, inner}, {C * inner, inner, 1});
  }
  const at::Tensor target_rows = target.is_contiguous()
                                     ? internal_view(target, {target.numel()}, {1})
                                     : target.contiguous().reshape({-1});
  const auto acc = at::toOpMathType(input.scalar_type());
  const bool needs_grad = at::GradMode::is_enabled() && input.requires_grad();
  // Below autograd: the views and casts here are of fresh results and must not be tracked as views, since
  // the loss gets its own node.
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  // The mean's denominator as lossops._reduce.class_index_denominator forms it: the count of kept rows, or
  // the float64 sum of their weights in index order (out-of-range targets are the kernel's to reject).
  std::optional<at::Tensor> weight_acc;
  double denominator = 0;
  const int64_t* t = target_rows.const_data_ptr<int64_t>();
  const int64_t rows = target_rows.numel();
  if (weight.has_value()) {
    weight_acc = weight->to(acc).contiguous();
    const at::Tensor w64 = weight->to(at::kDouble).contiguous();
    const double* w = w64.const_data_ptr<double>();
    for (int64_t r = 0; r < rows; ++r) {
      if (t[r] != ignore_index) denominator += w[std::clamp<int64_t>(t[r], 0, C - 1)];
    }
  } else {
    // An integer count vectorises (a double sum is one dependent add per row) and its order does not matter.
    const int64_t kept = at::parallel_reduce(
        int64_t(0), rows, kIndexScanGrain, int64_t(0),
        [&](int64_t begin, int64_t end, int64_t count) {
          for (int64_t r = begin; r < end; ++r) count += t[r] != ignore_index;
          return count;
        },
        std::plus<int64_t>());
    denominator = static_cast<double>(kept);
    // A float alpha weighs every row alike, rounded to the input's dtype as the Python path's full() does.
    if (uniform_alpha) weight_acc = at::full({C}, *uniform_alpha, input.scalar_type()).to(acc);
  }
  const Denominator mean = denominator_of(denominator, acc, *reduction);

  std::optional<at::Tensor> grad;
  if (needs_grad) grad = empty_gradient(logits3.sizes(), logits3.scalar_type());
  CrossEntropyOptions options;
  options.ignore_index = ignore_index;
  options.label_smoothing = label_smoothing;
  if (focal) options.focal_gamma = *focal_gamma;
  const CrossEntropyKernel cross_entropy = loaded_kernels().typed<CrossEntropyKernel>("cross_entropy");
  TORCH_CHECK(cross_entropy != nullptr, "lossops: the kernel library has no typed cross_entropy kernel");
  std::vector<at::Tensor> result = cross_entropy(logits3, target_rows, weight_acc, grad, options, mean.gradient_scale);
  at::Tensor loss = reduced_loss(result[0], result[2], target.sizes(), mean, acc, input.scalar_type(), *reduction);
  if (!needs_grad) return py::cast(loss);
  std::vector<int64_t> item_shape;
  if (*reduction == Reduction::kNone) item_shape = {logits3.size(0), 1, logits3.size(2)};
  return attach_gradient(loss, input, target, *grad, at::Tensor(), std::move(item_shape),
                         focal ? "LossopsSoftmaxFocalLossBackward" : "LossopsCrossEntropyBackward");
}

// An elementwise family on input and target of one shape and dtype, without weights: the mean divides by
// the number of elements. target_grad: whether this family's kernel computes the target's gradient.
py::object eager_elementwise(const std::string& family, const at::Tensor& input, const at::Tensor& target,
                             std::vector<double> params, const std::string& reduction_name, bool target_grad) {
  const auto reduction = parse_reduction(reduction_name);
  ElementwiseKernel kernel = loaded_kernels().typed<ElementwiseKernel>(family);
  if (!reduction || kernel == nullptr || modes_active() || !input.device().is_cpu() || !target.device().is_cpu() ||
      !kernel_dtype(input.scalar_type()) || target.scalar_type() != input.scalar_type() ||
      input.sizes() != target.sizes() || input.numel() == 0)
    return py::none();
  const bool grad_mode = at::GradMode::is_enabled();
  const bool needs_input = grad_mode && input.requires_grad();
  const bool needs_target = grad_mode && target.requires_grad();
  if (needs_target && !target_grad) return py::none();
  const auto acc = at::toOpMathType(input.scalar_type());
  // Below autograd: the views and casts here are of fresh results and must not be tracked as views, since
  // the loss gets its own node.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const Denominator mean = denominator_of(static_cast<double>(input.numel()), acc, *reduction);
  const at::Tensor x = input.contiguous(), y = target.contiguous();
  ElementwiseArgs args;
  args.input = x;
  args.target = y;
  args.weight_layout = {1, 1};
  args.aux_layout = {1, 1};
  args.params = std::move(params);
  if (needs_input) args.grad_input = empty_gradient(x.sizes(), x.scalar_type());
  if (needs_target) args.grad_target = empty_gradient(x.sizes(), x.scalar_type());
  args.grad_scale = mean.gradient_scale;
  args.per_element = *reduction == Reduction::kNone;
  std::vector<at::Tensor> result = kernel(args);
  at::Tensor loss = reduced_loss(result[0], result[1], input.sizes(), mean, acc, input.scalar_type(), *reduction);
  if (!needs_input && !needs_target) return py::cast(loss);
  std::vector<int64_t> item_shape;
  if (*reduction == Reduction::kNone) item_shape = input.sizes().vec();
  return attach_gradient(loss, input, target, needs_input ? *args.grad_input : at::Tensor(),
                         needs_target ? *args.grad_target : at::Tensor(), std::move(item_shape),
                         "LossopsElementwiseBackward");
}

// CTC loss on (T, N, C) log-probabilities with int64 CPU targets (padded (N, S) or concatenated) and int64
// CPU length tensors, every value in range; anything else, invalid values included, returns None (the Python
// path raises). The same kernel call, scale and reduction as lossops/losses/ctc.py's _run.
py::object eager_ctc_loss(const at::Tensor& log_probs, const at::Tensor& targets, const at::Tensor& input_lengths,
                          const at::Tensor& target_lengths, int64_t blank, const std::string& reduction_name,
                          bool zero_infinity) {
  const auto reduction = parse_reduction(reduction_name);
  if (!reduction || modes_active() || !log_probs.device().is_cpu() || !kernel_dtype(log_probs.scalar_type()) || log_probs.dim() != 3 ||
      log_probs.numel() == 0 || targets.scalar_type() != at::kLong || !targets.device().is_cpu() ||
      !targets.is_contiguous() || (targets.dim() != 1 && targets.dim() != 2))
    return py::none();
  const int64_t T = log_probs.size(0), N = log_probs.size(1), C = log_probs.size(2);
  const bool padded = targets.dim() == 2;
  if (blank < 0 || blank >= C || (padded && targets.size(0) != N)) return py::none();
  for (const at::Tensor* t : {&input_lengths, &target_lengths}) {
    if (t->scalar_type() != at::kLong || !t->device().is_cpu() || t->dim() != 1 || t->size(0) != N ||
        !t->is_contiguous() || t->requires_grad())
      return py::none();
  }
  const int64_t* il = input_lengths.const_data_ptr<int64_t>();
  const int64_t* tl = target_lengths.const_data_ptr<int64_t>();
  const int64_t width = padded ? targets.size(1) : 0;
  int64_t total = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (il[n] < 0 || il[n] > T || tl[n] < 0 || (padded && tl[n] > width)) return py::none();
    total += tl[n];
  }
  if (!padded && total > targets.numel()) return py::none();
  const auto acc = at::toOpMathType(log_probs.scalar_type());
  const bool needs_grad = at::GradMode::is_enabled() && log_probs.requires_grad();
  at::AutoDispatchBelowADInplaceOrView below_autograd;

  at::Tensor offsets = at::empty({N}, at::TensorOptions().dtype(at::kLong));
  int64_t* off = offsets.mutable_data_ptr<int64_t>();
  for (int64_t n = 0, start = 0; n < N; ++n) {
    off[n] = padded ? n * width : start;
    start += tl[n];
  }
  // The mean divides each sequence's loss by its target length (at least 1), then by the batch, in the
  // accumulation type as the Python path's (clamp_min(1) * N).reciprocal() does.
  at::Tensor scale = at::empty({N}, at::TensorOptions().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "lossops_ctc_scale", [&] {
    scalar_t* s = scale.mutable_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)
      s[n] = *reduction == Reduction::kMean ? scalar_t(1) / (static_cast<scalar_t>(std::max<int64_t>(tl[n], 1)) *
                                                           static_cast<scalar_t>(N))
                                            : scalar_t(1);
  });
  std::optional<at::Tensor> grad;
  if (needs_grad) grad = empty_gradient(log_probs.sizes(), log_probs.scalar_type());
  const CtcKernel ctc = loaded_kernels().typed<CtcKernel>("ctc_loss");
  TORCH_CHECK(ctc != nullptr, "lossops: the kernel library has no typed ctc_loss kernel");
  const at::Tensor nll = ctc(log_probs, targets, offsets, input_lengths, target_lengths, blank, zero_infinity, grad,
                             scale)[0];
  at::Tensor loss = *reduction == Reduction::kNone  ? nll
                    : *reduction == Reduction::kSum ? nll.sum()
                                                    : at::dot(nll, scale);
  if (loss.scalar_type() != log_probs.scalar_type()) loss = loss.to(log_probs.scalar_type());
  if (!needs_grad) return py::cast(loss);
  std::vector<int64_t> item_shape;
  if (*reduction == Reduction::kNone) item_shape = {1, N, 1};
  return attach_gradient(loss, log_probs, targets, *grad, at::Tensor(), std::move(item_shape),
                         "LossopsCtcLossBackward");
}

}  // namespace lossops
