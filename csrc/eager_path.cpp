// The eager call path for plain CPU tensors (part of the host module): one call from Python runs the kernel,
// the reduction, the output cast and creates the autograd node, all in C++.
//
// Nothing here is particular to a loss family. A family's declaration (lossops/_eager.py EagerRoute) names one of
// the shared layouts below (which call tensors, their kernel views, the loss's and the gradients' item shapes),
// one of the shared mean denominators, the scalar arguments with the ranges this path serves, and where each of
// its kernel's named parameters comes from; the kernel is called by those names, as the custom op calls it.
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
#include <torch/csrc/autograd/forward_grad.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/utils/pybind.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/TensorUtils.h>
#include <c10/util/SmallVector.h>
#include <c10/util/strides.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <ATen/ops/dot.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "allocation.h"
#include "eager_path.h"
#include "eager_result.h"
#include "kernel_abi.h"
#include "tuning.h"

namespace lossops {
namespace {

using namespace eager_result;

std::optional<Reduction> parse_reduction(PyObject* name) {
  if (!PyUnicode_CheckExact(name)) return std::nullopt;
  if (PyUnicode_CompareWithASCIIString(name, "mean") == 0) return Reduction::kMean;
  if (PyUnicode_CompareWithASCIIString(name, "sum") == 0) return Reduction::kSum;
  if (PyUnicode_CompareWithASCIIString(name, "none") == 0) return Reduction::kNone;
  return std::nullopt;
}

bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// What lossops/_eager.py leaves to this side: a torch function or dispatch mode, a functorch transform or CPU
// autocast makes the call take the custom op, where PyTorch sees it. Thread-local reads here, where the same
// checks from Python cost half a microsecond.
// Forward-mode AD takes the custom op too: torch allows one dual level at a time, numbered 0.
bool modes_active() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_;
  return at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
         included.has(c10::DispatchKey::FuncTorchDynamicLayerBackMode) || at::autocast::is_autocast_enabled(at::kCPU) ||
         torch::autograd::ForwardADLevel::try_get_by_idx(0) != nullptr;
}

// The backend choice lossops._backend.get_backend() makes, read where it lives (the innermost backend() context,
// set_backend's process-wide choice, LOSSOPS_BACKEND in os.environ's own dict): whether it lets the cpp backend
// serve a CPU call ("auto" or "cpp"). Set once by lossops._eager; before that, and wherever the environment is not
// the dict it was then, this path declines and the Python path decides.
struct BackendSources {
  PyObject* override_context = nullptr;  // the ContextVar of backend() contexts (default None)
  PyObject* backend_globals = nullptr;   // lossops._backend's namespace: "_global" holds set_backend's name
  PyObject* os_globals = nullptr;        // the os module's namespace: "environ" must still be `environ`
  PyObject* environ = nullptr;
  PyObject* environ_bytes = nullptr;     // os.environ's dict of bytes
  PyObject* global_key = nullptr;        // interned "_global", "environ" and b"LOSSOPS_BACKEND"
  PyObject* environ_key = nullptr;
  PyObject* variable_key = nullptr;
};

BackendSources& backend_sources() {
  static BackendSources* sources = new BackendSources();  // never destroyed: read until interpreter exit
  return *sources;
}

bool names_cpp_backend(PyObject* name) {
  if (PyUnicode_CheckExact(name))
    return PyUnicode_CompareWithASCIIString(name, "auto") == 0 || PyUnicode_CompareWithASCIIString(name, "cpp") == 0;
  if (PyBytes_CheckExact(name)) {
    const std::string_view bytes(PyBytes_AS_STRING(name), static_cast<size_t>(PyBytes_GET_SIZE(name)));
    return bytes == "auto" || bytes == "cpp";
  }
  return false;
}

// Python's truthiness of a backend name (an empty string falls through to the next source, as `or` does).
bool names_something(PyObject* name) {
  return name != nullptr && name != Py_None &&
         !((PyUnicode_CheckExact(name) && PyUnicode_GET_LENGTH(name) == 0) ||
           (PyBytes_CheckExact(name) && PyBytes_GET_SIZE(name) == 0));
}

bool cpp_backend_requested() {
  const BackendSources& s = backend_sources();
  if (s.override_context == nullptr) return false;
  PyObject* value = nullptr;
  if (PyContextVar_Get(s.override_context, nullptr, &value) < 0) {
    PyErr_Clear();
    return false;
  }
  const py::object override_name = py::reinterpret_steal<py::object>(value);
  if (names_something(value)) return names_cpp_backend(value);
  PyObject* global = PyDict_GetItemWithError(s.backend_globals, s.global_key);
  if (names_something(global)) return names_cpp_backend(global);
  if (PyErr_Occurred() || PyDict_GetItemWithError(s.os_globals, s.environ_key) != s.environ) {
    PyErr_Clear();
    return false;
  }
  if (s.environ_bytes == nullptr) return false;
  PyObject* requested = PyDict_GetItemWithError(s.environ_bytes, s.variable_key);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return !names_something(requested) || names_cpp_backend(requested);
}

// t's elements under other sizes and strides, sharing its storage, made without the dispatcher (no view
// tracking, no autograd metadata): for the kernels' (outer, C, inner) and flat views, which never leave this
// file. A call takes a few microseconds, so even the dispatched view ops would be a visible share of it.
at::Tensor internal_view(const at::Tensor& t, at::IntArrayRef sizes, at::IntArrayRef strides) {
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(t.storage()), t.key_set(), t.dtype());
  impl->set_sizes_and_strides(sizes, strides, t.storage_offset());
  return at::Tensor(std::move(impl));
}

// A contiguous tensor's elements under other sizes of the same count, contiguous too.
at::Tensor contiguous_view(const at::Tensor& t, at::IntArrayRef sizes) {
  if (t.sizes() == sizes) return t;
  return internal_view(t, sizes, c10::contiguous_strides(sizes));
}

// ---- Routes: what a family's declaration says, as this file reads it ----

enum class Layout { kClassRows, kSameShape, kSameShapeAux, kRowPairs, kRowTriples, kSequences, kTokenRows,
                    kLabelLists };
enum class DenominatorRule { kElements, kBatch, kKeptRows, kKeptWeight, kTargetLengths };
enum class Source { kTensor, kOperandLayout, kGradient, kGradScale, kRowState, kPerItem, kScalar, kFilledWeight,
                    kConstant };
enum class ScalarKind { kInt, kReal, kFlag };

// The call tensors each layout takes, in order, and the kernel operands it makes of them ("roles"; the layout may
// add operands of its own after the call's).
//   class_rows: input (N, C, d1...) or (C,), int64 class-index target (input's shape without C), optional
//     per-class weight (C,). Operands: input as (outer, C, inner), target as (outer * inner,), weight in the
//     accumulation dtype. Loss items: the target's shape; grad_output broadcasts as (outer, 1, inner).
//   same_shape: input and target of one shape and floating dtype. Operands: both contiguous. Items: elements.
//   same_shape_aux: input, target and aux of one shape and floating dtype. Operands: all three contiguous; an aux
//     layout parameter (kOperandLayout) is [1, numel].
//   row_pairs: input1 and input2 (N, D) of one floating dtype, a real target (N,). Operands: the inputs contiguous,
//     the target contiguous in the accumulation dtype. Items: rows; grad_output broadcasts as (N, 1).
//   row_triples: three (N, D) row tensors of one floating dtype. Operands: all three contiguous. Items: rows;
//     grad_output broadcasts as (N, 1).
//   sequences: (T, N, C) log-probabilities, int64 targets (N, S) or concatenated, int64 input and target
//     lengths (N,). Operands: those four and each sequence's target offset. Items: sequences.
//   token_rows: two logits tensors of one shape (..., C), classes last (the second in the first's dtype or its
//     accumulation dtype), optional int64 class-index target (the logits' shape without C). Operands: both as
//     (tokens, C) with contiguous classes, the target as (tokens,). Items: tokens; grad_output broadcasts as
//     (tokens, 1).
//   label_lists: input (N, C) and an int64 target of that shape holding each row's list of class indices (a
//     multi-label target). Operands: the input as it is, the target contiguous. Items: rows; grad_output
//     broadcasts as (N, 1).
size_t call_tensor_count(Layout layout) {
  switch (layout) {
    case Layout::kClassRows: return 3;
    case Layout::kSameShape: return 2;
    case Layout::kSameShapeAux: return 3;
    case Layout::kRowPairs: return 3;
    case Layout::kRowTriples: return 3;
    case Layout::kSequences: return 4;
    case Layout::kTokenRows: return 3;
    case Layout::kLabelLists: return 2;
  }
  return 0;
}

constexpr size_t kMaxCallTensors = 4;
using CallTensors = std::array<const at::Tensor*, kMaxCallTensors>;
using Gradients = std::array<at::Tensor, kMaxCallTensors>;

struct ParameterSource {
  Source source;
  size_t index;        // the operand (kTensor, kOperandLayout), the call tensor (kGradient) or the call scalar
  c10::IValue constant;
};

struct ScalarRule {
  ScalarKind kind;
  double low, high;    // served range (reals: finite too; ints: low <= value <= high)
  bool below_classes;  // an int in [0, C): the class_rows / sequences class count
};

struct EagerRoute {
  std::string kernel, node_name;
  Layout layout;
  DenominatorRule denominator;
  std::vector<std::string> names;  // the kernel's parameters, in the order of `parameters`
  std::vector<ParameterSource> parameters;
  std::vector<ScalarRule> scalars;
  std::vector<size_t> differentiable;  // call tensors with a gradient parameter, in call order
  std::optional<size_t> ignore_index;  // the parameter holding ignore_index (kept_rows / kept_weight)
  // The kernel in the library last loaded (tests switch libraries); calls hold the GIL, so no race.
  mutable const KernelTable* table = nullptr;
  mutable const KernelEntry* entry = nullptr;

  const KernelEntry& kernel_entry() const {
    const KernelTable& loaded = loaded_kernels();
    if (&loaded != table) {
      const KernelEntry* found = loaded.find(kernel);
      TORCH_CHECK(found != nullptr && found->parameters.size() == names.size(), "lossops: the kernel library's ",
                  kernel, " does not take the parameters its eager route declares");
      entry = found;
      table = &loaded;
    }
    return *entry;
  }
};

// Appended to under the GIL at import, read by calls; a deque never moves its elements.
std::deque<EagerRoute>& routes() {
  static std::deque<EagerRoute> declared;
  return declared;
}

template <typename Enum>
Enum named(const std::string& what, const std::string& name,
           std::initializer_list<std::pair<const char*, Enum>> choices) {
  for (const auto& [choice, value] : choices) {
    if (name == choice) return value;
  }
  TORCH_CHECK(false, "lossops: unknown eager-route ", what, " '", name, "'");
}

// ---- One call ----

// The call tensors under a layout's rules, and what the rest of the call needs of them.
struct Prepared {
  c10::SmallVector<at::Tensor, 5> operands;  // the layout's roles (undefined: an absent optional tensor)
  at::DimVector loss_shape;                  // reduction="none"
  at::DimVector item_shape;                  // grad_output's broadcast against the gradient buffers
  int64_t classes = 0;
  // kept_rows: the flat class-index targets whose ignore_index rows the mean leaves out (undefined: every one of
  // `items` rows is kept)
  at::Tensor kept_targets;
  int64_t items = 0;
};

// The (outer, C, inner) view the kernel reads; dims 2.. merge into one only where their strides allow, else (as
// flatten would) a contiguous copy.
at::Tensor class_rows_view(const at::Tensor& input, int64_t C) {
  const int64_t outer = input.dim() == 1 ? 1 : input.size(0);
  const int64_t inner = input.dim() <= 2 ? 1 : input.numel() / (outer * C);
  const int64_t class_stride = input.dim() == 1 ? input.stride(0) : input.stride(1);
  if (input.dim() <= 2)
    return internal_view(input, {outer, C, 1}, {input.dim() == 1 ? C * class_stride : input.stride(0), class_stride, 1});
  if (auto merged = at::detail::computeStride(input.sizes(), input.strides(), at::DimVector{outer, C, inner}))
    return internal_view(input, {outer, C, inner}, *merged);
  const at::Tensor dense = input.contiguous();
  return internal_view(dense, {outer, C, inner}, {C * inner, inner, 1});
}

bool prepare_class_rows(const CallTensors& call, Prepared& p) {
  const at::Tensor& input = *call[0];
  const at::Tensor& target = *call[1];
  if (!kernel_dtype(input.scalar_type()) || input.dim() < 1 || input.numel() == 0 ||
      target.scalar_type() != at::kLong || !target.device().is_cpu())
    return false;
  const int64_t C = input.dim() == 1 ? input.size(0) : input.size(1);
  const at::Tensor* weight = call[2];
  if (weight != nullptr && (weight->scalar_type() != input.scalar_type() || weight->dim() != 1 ||
                            weight->numel() != C || !weight->device().is_cpu()))
    return false;
  // torch's target shape: the input's without the class dimension.
  const int64_t class_dim = input.dim() == 1 ? 0 : 1;
  if (target.dim() != input.dim() - 1) return false;
  for (int64_t d = 0; d < target.dim(); ++d) {
    if (target.size(d) != input.size(d < class_dim ? d : d + 1)) return false;
  }
  const at::Tensor logits = class_rows_view(input, C);
  const at::Tensor rows = target.dim() == 1 && target.is_contiguous() ? target
                          : target.is_contiguous()                   ? internal_view(target, {target.numel()}, {1})
                                                                     : target.contiguous().reshape({-1});
  const auto acc = at::toOpMathType(input.scalar_type());
  p.operands = {logits, rows, weight != nullptr ? weight->to(acc).contiguous() : at::Tensor()};
  p.loss_shape = at::DimVector(target.sizes());
  p.item_shape = {logits.size(0), 1, logits.size(2)};
  p.classes = C;
  p.kept_targets = rows;
  p.items = rows.numel();
  return true;
}

// The (tokens, C) view of classes-last logits, classes contiguous; where the leading dimensions do not merge, or
// the classes are strided, a contiguous copy (as reshape and contiguous() would make).
at::Tensor token_rows_view(const at::Tensor& logits, int64_t tokens, int64_t C) {
  if (auto merged = at::detail::computeStride(logits.sizes(), logits.strides(), at::DimVector{tokens, C})) {
    if (C <= 1 || (*merged)[1] == 1) return internal_view(logits, {tokens, C}, *merged);
  }
  const at::Tensor dense = logits.contiguous();
  return internal_view(dense, {tokens, C}, {C, 1});
}

bool prepare_token_rows(const CallTensors& call, Prepared& p) {
  const at::Tensor& student = *call[0];
  const at::Tensor& teacher = *call[1];
  const at::ScalarType dtype = student.scalar_type();
  if (!kernel_dtype(dtype) || student.dim() < 1 || student.numel() == 0 || teacher.sizes() != student.sizes() ||
      (teacher.scalar_type() != dtype && teacher.scalar_type() != at::toOpMathType(dtype)))
    return false;
  const at::Tensor* target = call[2];
  const at::IntArrayRef tokens_shape = student.sizes().slice(0, student.dim() - 1);
  if (target != nullptr && (target->scalar_type() != at::kLong || target->sizes() != tokens_shape)) return false;
  const int64_t C = student.size(-1), tokens = student.numel() / C;
  at::Tensor flat_target;
  if (target != nullptr)
    flat_target = target->is_contiguous() ? internal_view(*target, {tokens}, {1}) : target->contiguous().reshape({-1});
  p.operands = {token_rows_view(student, tokens, C), token_rows_view(teacher, tokens, C), flat_target};
  p.loss_shape = at::DimVector(tokens_shape);
  p.item_shape = {tokens, 1};
  p.classes = C;
  p.kept_targets = flat_target;
  p.items = tokens;
  return true;
}

bool prepare_same_shape(const CallTensors& call, Prepared& p) {
  const at::Tensor& input = *call[0];
  const at::Tensor& target = *call[1];
  if (!kernel_dtype(input.scalar_type()) || target.scalar_type() != input.scalar_type() ||
      input.sizes() != target.sizes() || input.numel() == 0)
    return false;
  p.operands = {input.contiguous(), target.contiguous()};
  p.loss_shape = at::DimVector(input.sizes());
  p.item_shape = p.loss_shape;
  return true;
}

bool prepare_same_shape_aux(const CallTensors& call, Prepared& p) {
  const at::Tensor* aux = call[2];
  if (aux == nullptr || aux->scalar_type() != call[0]->scalar_type() || aux->sizes() != call[0]->sizes() ||
      !prepare_same_shape(call, p))
    return false;
  p.operands.push_back(aux->contiguous());
  return true;
}

bool prepare_row_pairs(const CallTensors& call, Prepared& p) {
  const at::Tensor& x1 = *call[0];
  const at::Tensor& x2 = *call[1];
  const at::Tensor* target = call[2];
  if (!kernel_dtype(x1.scalar_type()) || x2.scalar_type() != x1.scalar_type() || x1.dim() != 2 ||
      x1.sizes() != x2.sizes() || x1.size(0) == 0 || target == nullptr || target->dim() != 1 ||
      target->size(0) != x1.size(0) || target->scalar_type() == at::kBool ||
      !(at::isFloatingType(target->scalar_type()) || at::isIntegralType(target->scalar_type(), false)))
    return false;
  const auto acc = at::toOpMathType(x1.scalar_type());
  p.operands = {x1.contiguous(), x2.contiguous(),
                target->scalar_type() == acc ? target->contiguous() : target->to(acc).contiguous()};
  p.loss_shape = {x1.size(0)};
  p.item_shape = {x1.size(0), 1};
  return true;
}

bool prepare_row_triples(const CallTensors& call, Prepared& p) {
  const at::Tensor* rows[] = {call[0], call[1], call[2]};
  const at::Tensor& first = *rows[0];
  if (rows[2] == nullptr || !kernel_dtype(first.scalar_type()) || first.dim() != 2 || first.size(0) == 0) return false;
  for (const at::Tensor* t : rows) {
    if (t->scalar_type() != first.scalar_type() || t->sizes() != first.sizes()) return false;
  }
  p.operands = {first.contiguous(), rows[1]->contiguous(), rows[2]->contiguous()};
  p.loss_shape = {first.size(0)};
  p.item_shape = {first.size(0), 1};
  return true;
}

// CTC's lengths are read here (as torch's CPU ctc_loss reads them); anything out of range takes the full path.
bool prepare_sequences(const CallTensors& call, Prepared& p) {
  const at::Tensor& log_probs = *call[0];
  const at::Tensor& targets = *call[1];
  if (call[2] == nullptr || call[3] == nullptr || !kernel_dtype(log_probs.scalar_type()) || log_probs.dim() != 3 || log_probs.numel() == 0 ||
      targets.scalar_type() != at::kLong || !targets.device().is_cpu() || !targets.is_contiguous() ||
      (targets.dim() != 1 && targets.dim() != 2))
    return false;
  const int64_t T = log_probs.size(0), N = log_probs.size(1);
  const bool padded = targets.dim() == 2;
  if (padded && targets.size(0) != N) return false;
  for (size_t i : {2, 3}) {
    const at::Tensor& t = *call[i];
    if (t.scalar_type() != at::kLong || !t.device().is_cpu() || t.dim() != 1 || t.size(0) != N ||
        !t.is_contiguous() || t.requires_grad())
      return false;
  }
  const int64_t* il = call[2]->const_data_ptr<int64_t>();
  const int64_t* tl = call[3]->const_data_ptr<int64_t>();
  const int64_t width = padded ? targets.size(1) : 0;
  int64_t total = 0;
  for (int64_t n = 0; n < N; ++n) {
    if (il[n] < 0 || il[n] > T || tl[n] < 0 || (padded && tl[n] > width)) return false;
    total += tl[n];
  }
  if (!padded && total > targets.numel()) return false;
  at::Tensor offsets = at::empty({N}, at::TensorOptions().dtype(at::kLong));
  int64_t* off = offsets.mutable_data_ptr<int64_t>();
  for (int64_t n = 0, start = 0; n < N; ++n) {
    off[n] = padded ? n * width : start;
    start += tl[n];
  }
  p.operands = {log_probs, targets, *call[2], *call[3], offsets};
  p.loss_shape = {N};
  p.item_shape = {1, N, 1};
  p.classes = log_probs.size(2);
  return true;
}

bool prepare_label_lists(const CallTensors& call, Prepared& p) {
  const at::Tensor& input = *call[0];
  const at::Tensor& target = *call[1];
  if (!kernel_dtype(input.scalar_type()) || input.dim() != 2 || input.numel() == 0 ||
      target.scalar_type() != at::kLong || target.sizes() != input.sizes())
    return false;
  p.operands = {input, target.contiguous()};
  p.loss_shape = {input.size(0)};
  p.item_shape = {input.size(0), 1};
  p.classes = input.size(1);
  return true;
}

bool prepare(Layout layout, const CallTensors& call, Prepared& p) {
  switch (layout) {
    case Layout::kClassRows: return prepare_class_rows(call, p);
    case Layout::kSameShape: return prepare_same_shape(call, p);
    case Layout::kSameShapeAux: return prepare_same_shape_aux(call, p);
    case Layout::kRowPairs: return prepare_row_pairs(call, p);
    case Layout::kRowTriples: return prepare_row_triples(call, p);
    case Layout::kSequences: return prepare_sequences(call, p);
    case Layout::kTokenRows: return prepare_token_rows(call, p);
    case Layout::kLabelLists: return prepare_label_lists(call, p);
  }
  return false;
}

// A call scalar as the route's rule takes it; nullopt where this path does not serve the value (the full path's
// checks then raise, or serve it).
std::optional<c10::IValue> scalar_argument(py::handle value, const ScalarRule& rule, int64_t classes) {
  PyObject* o = value.ptr();
  if (rule.kind == ScalarKind::kFlag) {
    if (!PyBool_Check(o)) return std::nullopt;
    return c10::IValue(o == Py_True);
  }
  if (PyBool_Check(o)) return std::nullopt;
  if (rule.kind == ScalarKind::kInt) {
    if (!PyLong_Check(o)) return std::nullopt;
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
      PyErr_Clear();
      return std::nullopt;
    }
    if (rule.below_classes ? !(v >= 0 && v < classes) : !(v >= rule.low && v <= rule.high)) return std::nullopt;
    return c10::IValue(static_cast<int64_t>(v));
  }
  if (!PyFloat_Check(o) && !PyLong_Check(o)) return std::nullopt;
  const double v = PyFloat_Check(o) ? PyFloat_AS_DOUBLE(o) : PyLong_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return std::nullopt;
  }
  if (!std::isfinite(v) || !(v >= rule.low && v <= rule.high)) return std::nullopt;
  return c10::IValue(v);
}

// The mean's denominator for class_rows and token_rows: the count of kept rows (every row without targets), or
// the float64 sum of their weights in index order (out-of-range targets are the kernel's to reject), as
// lossops._reduce.class_index_denominator forms it.
double kept_rows_denominator(const Prepared& p, const at::Tensor& weight, int64_t ignore_index) {
  const at::Tensor& rows = p.kept_targets;
  if (!rows.defined()) return static_cast<double>(p.items);
  const int64_t C = p.classes;
  const int64_t* t = rows.const_data_ptr<int64_t>();
  const int64_t n = rows.numel();
  if (weight.defined()) {
    const at::Tensor w64 = weight.to(at::kDouble).contiguous();
    const double* w = w64.const_data_ptr<double>();
    double sum = 0;
    for (int64_t r = 0; r < n; ++r) {
      if (t[r] != ignore_index) sum += w[std::clamp<int64_t>(t[r], 0, C - 1)];
    }
    return sum;
  }
  // An integer count vectorises (a double sum is one dependent add per row) and its order does not matter.
  // Four counts: this module is built for any x86-64 (no 64-bit vector compare), where one count is a chain.
  auto count_kept = [&](int64_t begin, int64_t end) {
    int64_t c[4] = {0, 0, 0, 0};
    int64_t r = begin;
    for (; r + 4 <= end; r += 4) {
      for (int k = 0; k < 4; ++k) c[k] += t[r + k] != ignore_index;
    }
    for (; r < end; ++r) c[0] += t[r] != ignore_index;
    return (c[0] + c[1]) + (c[2] + c[3]);
  };
  if (n <= kIndexScanGrain) return static_cast<double>(count_kept(0, n));  // one grain: no parallel region
  const int64_t kept = at::parallel_reduce(
      int64_t(0), n, kIndexScanGrain, int64_t(0),
      [&](int64_t begin, int64_t end, int64_t count) { return count + count_kept(begin, end); },
      std::plus<int64_t>());
  return static_cast<double>(kept);
}

// CTC's mean divides each sequence's loss by its target length (at least 1), then by the batch, in the
// accumulation type, as lossops/losses/ctc.py's (clamp_min(1) * N).reciprocal() does; 1 for the other reductions.
at::Tensor sequence_scale(const at::Tensor& target_lengths, at::ScalarType acc, Reduction reduction) {
  const int64_t N = target_lengths.numel();
  const int64_t* tl = target_lengths.const_data_ptr<int64_t>();
  at::Tensor scale = at::empty({N}, at::TensorOptions().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "lossops_sequence_scale", [&] {
    scalar_t* s = scale.mutable_data_ptr<scalar_t>();
    for (int64_t n = 0; n < N; ++n)
      s[n] = reduction == Reduction::kMean
                 ? scalar_t(1) / (static_cast<scalar_t>(std::max<int64_t>(tl[n], 1)) * static_cast<scalar_t>(N))
                 : scalar_t(1);
  });
  return scale;
}

}  // namespace

int64_t declare_eager_route(const std::string& kernel, const std::string& layout, const std::string& denominator,
                            const py::list& parameters, const py::list& scalars, const std::string& node_name) {
  EagerRoute route;
  route.kernel = kernel;
  route.node_name = node_name;
  route.layout = named<Layout>("layout", layout, {{"class_rows", Layout::kClassRows},
                                                  {"same_shape", Layout::kSameShape},
                                                  {"same_shape_aux", Layout::kSameShapeAux},
                                                  {"row_pairs", Layout::kRowPairs},
                                                  {"row_triples", Layout::kRowTriples},
                                                  {"sequences", Layout::kSequences},
                                                  {"token_rows", Layout::kTokenRows},
                                                  {"label_lists", Layout::kLabelLists}});
  route.denominator = named<DenominatorRule>("denominator", denominator,
                                             {{"elements", DenominatorRule::kElements},
                                              {"batch", DenominatorRule::kBatch},
                                              {"kept_rows", DenominatorRule::kKeptRows},
                                              {"kept_weight", DenominatorRule::kKeptWeight},
                                              {"target_lengths", DenominatorRule::kTargetLengths}});
  for (py::handle rule : scalars) {
    const auto t = rule.cast<py::tuple>();
    route.scalars.push_back({named<ScalarKind>("scalar kind", t[0].cast<std::string>(),
                                               {{"int", ScalarKind::kInt}, {"real", ScalarKind::kReal},
                                                {"flag", ScalarKind::kFlag}}),
                             t[1].cast<double>(), t[2].cast<double>(), t[3].cast<bool>()});
  }
  for (py::handle parameter : parameters) {
    const auto t = parameter.cast<py::tuple>();
    const std::string name = t[0].cast<std::string>();
    const Source source = named<Source>("parameter source", t[1].cast<std::string>(),
                                        {{"tensor", Source::kTensor}, {"operand_layout", Source::kOperandLayout},
                                         {"gradient", Source::kGradient},
                                         {"grad_scale", Source::kGradScale}, {"row_state", Source::kRowState},
                                         {"per_item", Source::kPerItem},
                                         {"scalar", Source::kScalar}, {"filled_weight", Source::kFilledWeight},
                                         {"constant", Source::kConstant}});
    const size_t index = t[2].cast<size_t>();
    TORCH_CHECK(source != Source::kGradient || index < call_tensor_count(route.layout),
                "lossops: eager route for ", kernel, ": gradient ", name, " of call tensor ", index);
    TORCH_CHECK((source != Source::kScalar && source != Source::kFilledWeight) || index < route.scalars.size(),
                "lossops: eager route for ", kernel, ": ", name, " reads scalar ", index);
    TORCH_CHECK(source != Source::kFilledWeight || route.layout == Layout::kClassRows,
                "lossops: eager route for ", kernel, ": a filled weight needs the class_rows layout");
    if (source == Source::kGradient) route.differentiable.push_back(index);
    if (name == "ignore_index") route.ignore_index = route.parameters.size();
    route.names.push_back(name);
    route.parameters.push_back({source, index, source == Source::kConstant ? to_ivalue(kernel, name, t[3]) : c10::IValue()});
  }
  std::sort(route.differentiable.begin(), route.differentiable.end());
  const bool kept = route.denominator == DenominatorRule::kKeptRows || route.denominator == DenominatorRule::kKeptWeight;
  const bool kept_layout = route.layout == Layout::kClassRows ||
                           (route.layout == Layout::kTokenRows && route.denominator == DenominatorRule::kKeptRows);
  TORCH_CHECK(!kept || (kept_layout && route.ignore_index.has_value()), "lossops: eager route for ", kernel,
              ": a kept-rows denominator needs class_rows (or token_rows, unweighted) and ignore_index");
  TORCH_CHECK((route.denominator == DenominatorRule::kTargetLengths) == (route.layout == Layout::kSequences),
              "lossops: eager route for ", kernel, ": the target_lengths denominator goes with the sequences layout");
  routes().push_back(std::move(route));
  return static_cast<int64_t>(routes().size()) - 1;
}

namespace {

// One call of a route, as read from its Python arguments.
struct EagerCall {
  Reduction reduction;
  CallTensors tensors{};  // nullptr: an absent optional tensor (or none: past the layout's count)
  std::array<bool, kMaxCallTensors> needs_grad{};
  Prepared prepared;
  c10::SmallVector<c10::IValue, 4> scalars;
};

// false where the route does not serve the call.
bool read_call(const EagerRoute& route, PyObject* const* arguments, EagerCall& call) {
  const size_t n_call = call_tensor_count(route.layout);
  for (size_t i = 0; i < n_call; ++i) {
    PyObject* o = arguments[i];
    if (o == Py_None) continue;
    if (!THPVariable_CheckExact(o)) return false;
    const at::Tensor& t = THPVariable_Unpack(o);
    if (!t.device().is_cpu()) return false;
    call.tensors[i] = &t;
  }
  if (call.tensors[0] == nullptr || call.tensors[1] == nullptr) return false;
  const bool grad_mode = at::GradMode::is_enabled();
  for (size_t i = 0; i < n_call; ++i) {
    if (call.tensors[i] == nullptr || !grad_mode || !call.tensors[i]->requires_grad()) continue;
    if (!std::binary_search(route.differentiable.begin(), route.differentiable.end(), i)) return false;
    call.needs_grad[i] = true;
  }
  if (!prepare(route.layout, call.tensors, call.prepared)) return false;
  call.scalars.reserve(route.scalars.size());
  for (size_t i = 0; i < route.scalars.size(); ++i) {
    auto value = scalar_argument(arguments[n_call + i], route.scalars[i], call.prepared.classes);
    if (!value) return false;
    call.scalars.push_back(std::move(*value));
  }
  return true;
}

// The kernel's arguments in the route's parameter order, with the gradient buffers it writes (by call tensor); the
// grad_scale slot is left empty for the denominator (its index in *grad_scale_at). in_place: no buffer for the
// first call tensor's gradient, whose slot (its index in *in_place_at) stays empty for backward. false where a
// filled weight meets a weight tensor.
bool kernel_values(const EagerRoute& route, const EagerCall& call, std::vector<c10::IValue>& values,
                   Gradients& gradients, std::optional<size_t>& grad_scale_at, bool in_place,
                   std::optional<size_t>& in_place_at) {
  const Prepared& p = call.prepared;
  const at::Tensor& first = *call.tensors[0];
  values.reserve(route.parameters.size());
  for (const ParameterSource& s : route.parameters) {
    switch (s.source) {
      case Source::kTensor:
        values.emplace_back(p.operands[s.index].defined() ? c10::IValue(p.operands[s.index]) : c10::IValue());
        break;
      case Source::kOperandLayout:
        values.emplace_back(std::vector<int64_t>{1, p.operands[s.index].numel()});
        break;
      case Source::kGradient:
        if (in_place && s.index == 0) {
          in_place_at = values.size();
          values.emplace_back();
          break;
        }
        if (!call.needs_grad[s.index]) {
          values.emplace_back();
          break;
        }
        // In the call tensor's shape, so that backward hands it out as it is; the kernel writes its own view.
        gradients[s.index] = empty_gradient(call.tensors[s.index]->sizes(), p.operands[s.index].scalar_type());
        values.emplace_back(contiguous_view(gradients[s.index], p.operands[s.index].sizes()));
        break;
      case Source::kGradScale:
        grad_scale_at = values.size();
        values.emplace_back();
        break;
      case Source::kRowState:
        // In place: an empty state for forward to fill and backward (which keeps these values) to resume from.
        values.emplace_back(in_place ? c10::IValue(at::empty({0}, first.options().dtype(at::toOpMathType(first.scalar_type()))))
                                     : c10::IValue());
        break;
      case Source::kPerItem: values.emplace_back(call.reduction == Reduction::kNone); break;
      case Source::kScalar: values.push_back(call.scalars[s.index]); break;
      case Source::kFilledWeight:
        // One weight for every class, rounded to the input's dtype as the Python path's full() does.
        if (p.operands[2].defined()) return false;
        values.emplace_back(at::full({p.classes}, call.scalars[s.index].toDouble(), first.scalar_type())
                                .to(at::toOpMathType(first.scalar_type())));
        break;
      case Source::kConstant: values.push_back(s.constant); break;
    }
  }
  return true;
}

// The loss from the kernel's results: per item, their sum, or the mean over the route's denominator (`mean`), or
// for per-sequence scales (`scale`) their dot product with the per-item losses; cast to the input's dtype.
at::Tensor route_loss(const std::vector<at::Tensor>& result, const EagerCall& call,
                      const std::optional<Denominator>& mean, const at::Tensor& scale) {
  const at::ScalarType out = call.tensors[0]->scalar_type();
  if (mean)
    return reduced_loss(result[0], result.back(), call.prepared.loss_shape, *mean, at::toOpMathType(out), out,
                        call.reduction);
  const at::Tensor& per_item = result[0];
  at::Tensor loss = call.reduction == Reduction::kNone  ? per_item
                    : call.reduction == Reduction::kSum ? per_item.sum()
                                                        : at::dot(per_item, scale);
  return loss.scalar_type() == out ? loss : loss.to(out);
}

py::object with_gradients(at::Tensor loss, const EagerRoute& route, EagerCall& call,
                          Gradients& gradients) {
  auto node = make_node<FusedLossBackward>();
  std::vector<at::Tensor> edges;
  for (size_t i : route.differentiable) {
    std::vector<int64_t> kernel_shape;
    if (call.reduction == Reduction::kNone && gradients[i].defined())
      kernel_shape = call.prepared.operands[i].sizes().vec();
    node->gradients.push_back({std::move(gradients[i]), std::move(kernel_shape)});
    edges.push_back(call.tensors[i] != nullptr ? *call.tensors[i] : at::Tensor());
  }
  if (call.reduction == Reduction::kNone) node->item_shape.assign(call.prepared.item_shape.begin(), call.prepared.item_shape.end());
  node->node_name = route.node_name;
  node->set_next_edges(torch::autograd::collect_next_edges(edges));
  torch::autograd::set_history(loss, node);
  return py::cast(loss);
}

// inplace_backward=True: forward only read the logits (the kernel without a gradient buffer, filling the row state
// of a route whose kernel takes one); this node runs the kernel once more in backward with the logits' own storage
// as the gradient buffer, grad_output folded into its scale, and the same values, so a saved row state spares it
// the statistics pass. The kernel reads each row before it writes it, so backward costs one read and one write of
// the logits, and keeps the out-of-place gradient's bits. Until backward the logits are untouched; a change to them before it fails the
// version check (a retained graph's second backward too), and a node that saved them fails its own afterwards.
struct InPlaceLossBackward : torch::autograd::Node {
  const EagerRoute* route = nullptr;
  std::vector<c10::IValue> values;  // the kernel's arguments; the gradient and grad_scale slots are set in backward
  size_t gradient_at = 0, grad_scale_at = 0;
  at::Tensor input, logits;         // the call's logits, and the kernel's view of their storage
  uint32_t version = 0;
  // The call's other tensors (target, weight) and their versions: backward reads them again (views of them among
  // `values`), and its row state holds what forward made of them, so a change to them in between must fail.
  std::vector<std::pair<at::Tensor, uint32_t>> read_again;
  double gradient_scale = 1.0;      // the reduction's (1 / denominator for a mean)
  at::ScalarType acc = at::kFloat;
  std::vector<int64_t> item_shape;  // reduction="none": how grad_output broadcasts against the logits' rows
  bool consumed = false, released = false;
  std::string node_name;

  std::string name() const override { return node_name; }

  void release_variables() override {
    values.clear();
    input.reset();
    logits.reset();
    read_again.clear();
    released = true;
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    check_not_released(released);
    TORCH_CHECK(!consumed, "lossops: inplace_backward=True wrote the first backward's gradient over the logits, so a "
                "second backward through this loss (retain_graph=True) has nothing to recompute from; use "
                "inplace_backward=False");
    torch::autograd::variable_list out(1);
    const at::Tensor& grad_output = grads[0];
    if (!grad_output.defined()) return out;
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "lossops: double backward (create_graph=True through a lossops loss) is not supported");
    TORCH_CHECK(input._version() == version, "one of the variables needed for gradient computation has been "
                "modified by an inplace operation: [", input.toString(), " ", input.sizes(), "] is at version ",
                input._version(), "; expected version ", version, " instead (lossops: inplace_backward=True reads "
                "the logits in backward)");
    for (const auto& [tensor, saved_version] : read_again) {
      TORCH_CHECK(tensor._version() == saved_version, "one of the variables needed for gradient computation has "
                  "been modified by an inplace operation: [", tensor.toString(), " ", tensor.sizes(), "] is at "
                  "version ", tensor._version(), "; expected version ", saved_version, " instead");
    }
    consumed = true;
    double scale = gradient_scale;
    if (item_shape.empty()) {  // one upstream value, in the scale's type as the Python path multiplies them
      const double g = upstream_value(grad_output);
      scale = acc == at::kDouble ? scale * g : static_cast<double>(static_cast<float>(scale) * static_cast<float>(g));
    }
    values[gradient_at] = logits;
    values[grad_scale_at] = scale;
    const KernelEntry& entry = route->kernel_entry();
    entry.function(KernelArgs(entry.name.c_str(), route->names, std::move(values)));
    values.clear();
    if (!item_shape.empty()) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      logits.mul_(grad_output.reshape(item_shape));
    }
    // Nodes that saved the logits and run after this one now fail their version check.
    input.unsafeGetTensorImpl()->bump_version();
    out[0] = input.detach();
    return out;
  }
};

// The in-place route serves a non-leaf, non-overlapping first call tensor whose kernel view is its own storage,
// alone in needing a gradient; anything else takes the Python path, which refuses or serves it.
bool serves_in_place(const EagerCall& call) {
  const at::Tensor& input = *call.tensors[0];
  for (size_t i = 1; i < kMaxCallTensors; ++i) {
    if (call.needs_grad[i]) return false;
  }
  const at::Tensor& view = call.prepared.operands[0];
  return !input.is_leaf() && at::has_internal_overlap(input) == at::MemOverlap::No &&
         view.storage().is_alias_of(input.storage());
}

py::object with_in_place_gradient(at::Tensor loss, const EagerRoute& route, EagerCall& call,
                                  std::vector<c10::IValue>&& values, size_t gradient_at, size_t grad_scale_at,
                                  double gradient_scale) {
  auto node = make_node<InPlaceLossBackward>();
  const at::Tensor& input = *call.tensors[0];
  node->route = &route;
  node->values = std::move(values);
  node->gradient_at = gradient_at;
  node->grad_scale_at = grad_scale_at;
  node->input = input;
  node->logits = call.prepared.operands[0];
  node->version = input._version();
  for (size_t i = 1; i < kMaxCallTensors; ++i) {
    if (call.tensors[i] != nullptr) node->read_again.emplace_back(*call.tensors[i], call.tensors[i]->_version());
  }
  node->gradient_scale = gradient_scale;
  node->acc = at::toOpMathType(input.scalar_type());
  if (call.reduction == Reduction::kNone) node->item_shape.assign(call.prepared.item_shape.begin(), call.prepared.item_shape.end());
  node->node_name = route.node_name;
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  torch::autograd::set_history(loss, node);
  return py::cast(loss);
}

// arguments: the reduction's name, the call tensors, the call scalars.
py::object route_call(int64_t route_number, PyObject* const* arguments, size_t count, bool in_place) {
  TORCH_CHECK(route_number >= 0 && static_cast<size_t>(route_number) < routes().size(),
              "lossops: no eager route ", route_number);
  const EagerRoute& route = routes()[route_number];
  const size_t n_call = call_tensor_count(route.layout);
  TORCH_CHECK(count == 1 + n_call + route.scalars.size(), "lossops: eager route for ", route.kernel,
              " takes the reduction, ", n_call, " tensors and ", route.scalars.size(), " scalars, got ", count,
              " arguments");
  const auto reduction = parse_reduction(arguments[0]);
  if (!reduction || modes_active() || !cpp_backend_requested()) return py::none();
  ++arguments;
  EagerCall call;
  call.reduction = *reduction;
  // Below autograd: the views and casts here are of fresh results and must not be tracked as views, since the
  // loss gets its own node.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  if (!read_call(route, arguments, call)) return py::none();
  in_place = in_place && call.needs_grad[0];  // nothing to write without a gradient: the plain route
  if (in_place && !serves_in_place(call)) return py::none();
  std::vector<c10::IValue> values;
  Gradients gradients;
  std::optional<size_t> grad_scale_at, in_place_at;
  if (!kernel_values(route, call, values, gradients, grad_scale_at, in_place, in_place_at)) return py::none();
  if (in_place && !(in_place_at && grad_scale_at)) return py::none();

  const Prepared& p = call.prepared;
  const auto acc = at::toOpMathType(call.tensors[0]->scalar_type());
  std::optional<Denominator> mean;
  at::Tensor scale;
  switch (route.denominator) {
    case DenominatorRule::kElements:
      mean = denominator_of(static_cast<double>(call.tensors[0]->numel()), acc, call.reduction);
      break;
    case DenominatorRule::kBatch:
      if (call.tensors[0]->dim() == 0) return py::none();
      mean = denominator_of(static_cast<double>(call.tensors[0]->size(0)), acc, call.reduction);
      break;
    case DenominatorRule::kKeptRows:
    case DenominatorRule::kKeptWeight: {
      const at::Tensor& weight = route.denominator == DenominatorRule::kKeptWeight ? p.operands[2] : at::Tensor();
      mean = denominator_of(kept_rows_denominator(p, weight, values[*route.ignore_index].toInt()), acc,
                            call.reduction);
      break;
    }
    case DenominatorRule::kTargetLengths: scale = sequence_scale(p.operands[3], acc, call.reduction); break;
  }
  if (grad_scale_at) values[*grad_scale_at] = mean ? c10::IValue(mean->gradient_scale) : c10::IValue(scale);

  const KernelEntry& entry = route.kernel_entry();
  if (in_place) {
    if (!mean) return py::none();
    // The kernel takes its arguments by value: backward's copy keeps them (tensors are shared, not copied).
    std::vector<c10::IValue> kept = values;
    const std::vector<at::Tensor> result = entry.function(KernelArgs(entry.name.c_str(), route.names, std::move(values)));
    return with_in_place_gradient(route_loss(result, call, mean, scale), route, call, std::move(kept), *in_place_at,
                                  *grad_scale_at, mean->gradient_scale);
  }
  const std::vector<at::Tensor> result = entry.function(KernelArgs(entry.name.c_str(), route.names, std::move(values)));
  at::Tensor loss = route_loss(result, call, mean, scale);
  if (std::none_of(call.needs_grad.begin(), call.needs_grad.end(), [](bool b) { return b; })) return py::cast(loss);
  return with_gradients(std::move(loss), route, call, gradients);
}

}  // namespace

namespace {

// A route's callable: a builtin function whose `self` is 2 * route number + in_place, called with Python's
// vectorcall convention (no argument tuple, no pybind11 conversions: a tiny call's budget is a microsecond).
PyObject* call_route(PyObject* self, PyObject* const* arguments, Py_ssize_t count) {
  HANDLE_TH_ERRORS
  const long code = PyLong_AsLong(self);
  return route_call(code / 2, arguments, static_cast<size_t>(count), code % 2 == 1).release().ptr();
  END_HANDLE_TH_ERRORS
}

PyMethodDef call_route_definition = {
    "eager_route_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(call_route)), METH_FASTCALL,
    "route_call(reduction, *tensors, *scalars): the loss with its autograd node, or None where the route does not "
    "serve the call (lossops/_eager.py)"};

}  // namespace

py::object eager_route_callable(int64_t route_number, bool in_place) {
  TORCH_CHECK(route_number >= 0 && static_cast<size_t>(route_number) < routes().size(),
              "lossops: no eager route ", route_number);
  const py::int_ code(2 * route_number + (in_place ? 1 : 0));
  PyObject* function = PyCFunction_NewEx(&call_route_definition, code.ptr(), nullptr);
  if (function == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(function);
}

void set_backend_sources(py::object override_context, py::dict backend_globals, py::dict os_globals,
                         py::object environ, py::object environ_bytes) {
  BackendSources& s = backend_sources();
  if (!environ_bytes.is_none() && !PyDict_CheckExact(environ_bytes.ptr()))
    throw py::type_error("lossops: environ_bytes must be a dict or None");
  for (PyObject* o : {s.override_context, s.backend_globals, s.os_globals, s.environ, s.environ_bytes})
    Py_XDECREF(o);
  s.override_context = override_context.release().ptr();
  s.backend_globals = backend_globals.release().ptr();
  s.os_globals = os_globals.release().ptr();
  s.environ = environ.release().ptr();
  s.environ_bytes = environ_bytes.is_none() ? nullptr : environ_bytes.release().ptr();
  if (s.global_key == nullptr) {
    s.global_key = PyUnicode_InternFromString("_global");
    s.environ_key = PyUnicode_InternFromString("environ");
    s.variable_key = PyBytes_FromString("LOSSOPS_BACKEND");
  }
}

}  // namespace lossops
