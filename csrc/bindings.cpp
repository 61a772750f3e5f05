// The host module lossops._C (compiled once, baseline ISA): Python bindings, the gradient buffers, and the
// loading of the kernel library built for the CPU's instruction set (kernel_abi.h explains the split).
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <dlfcn.h>

#include <c10/util/StringUtil.h>

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

// Calls a registered kernel with keyword arguments: exactly the names it registered, each once.
std::vector<at::Tensor> call_kernel(const std::string& name, const py::kwargs& kwargs) {
  const KernelEntry* entry = loaded_kernels().find(name);
  TORCH_CHECK(entry != nullptr, "lossops: the kernel library has no kernel ", name);
  std::vector<c10::IValue> values;
  values.reserve(entry->parameters.size());
  for (const std::string& parameter : entry->parameters) {
    TORCH_CHECK(kwargs.contains(parameter.c_str()), "lossops: kernel ", name, " called without its argument ",
                parameter);
    values.push_back(to_ivalue(name, parameter, kwargs[parameter.c_str()]));
  }
  TORCH_CHECK(kwargs.size() == entry->parameters.size(), "lossops: kernel ", name, " takes ",
              entry->parameters.size(), " arguments (", c10::Join(", ", entry->parameters), "), got ", kwargs.size(),
              ": ", std::string(py::str(kwargs.attr("keys")())));
  py::gil_scoped_release no_gil;
  return entry->function(KernelArgs(entry->name.c_str(), entry->parameters, std::move(values)));
}

std::vector<std::string> kernel_names() {
  std::vector<std::string> names;
  for (const KernelEntry& e : *loaded_kernels().kernels) names.push_back(e.name);
  return names;
}

std::vector<std::string> kernel_parameters(const std::string& name) {
  const KernelEntry* entry = loaded_kernels().find(name);
  TORCH_CHECK(entry != nullptr, "lossops: the kernel library has no kernel ", name);
  return entry->parameters;
}

}  // namespace

c10::IValue to_ivalue(const std::string& kernel, const std::string& name, py::handle value) {
  if (value.is_none()) return {};
  if (THPVariable_Check(value.ptr())) return THPVariable_Unpack(value.ptr());
  if (py::isinstance<py::bool_>(value)) return value.cast<bool>();
  if (py::isinstance<py::int_>(value)) return value.cast<int64_t>();
  if (py::isinstance<py::float_>(value)) return value.cast<double>();
  if (py::isinstance<py::list>(value) || py::isinstance<py::tuple>(value)) {
    const py::sequence items = py::reinterpret_borrow<py::sequence>(value);
    bool all_int = true;
    for (py::handle item : items) all_int &= py::isinstance<py::int_>(item) && !py::isinstance<py::bool_>(item);
    if (all_int) return items.cast<std::vector<int64_t>>();
    return items.cast<std::vector<double>>();
  }
  TORCH_CHECK(false, "lossops: kernel ", kernel, ": argument ", name, " has unsupported type ",
              std::string(py::str(value.get_type().attr("__name__"))));
}

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
  m.def("release_gradient_cache", &lossops::release_gradient_cache, "Free the kept gradient buffers; returns their bytes");
  m.def("gradient_cache_bytes", &lossops::gradient_cache_bytes, "Bytes of the kept gradient buffers (0 if none)");
  m.def("gradient_cache_enabled", &lossops::gradient_cache_enabled, "Whether freed gradient buffers are kept");
  m.def("graph_kept", &torch::autograd::get_current_graph_task_keep_graph,
        "Inside a backward: whether the running backward keeps the graph (retain_graph=True)");
  m.def("call_kernel", &lossops::call_kernel,
        "Run the kernel `name` of the loaded library with its registered keyword arguments", py::arg("name"));
  m.def("kernel_names", &lossops::kernel_names, "The kernels the loaded library registered");
  m.def("kernel_parameters", &lossops::kernel_parameters, "A kernel's registered argument names, in order",
        py::arg("name"));
  m.def("declare_eager_route", &lossops::declare_eager_route,
        "Record a family's eager route (lossops/_eager.py EagerRoute); returns its number", py::arg("kernel"),
        py::arg("layout"), py::arg("denominator"), py::arg("parameters"), py::arg("scalars"), py::arg("node_name"));
  m.def("eager_route_callable", &lossops::eager_route_callable,
        "A declared eager route's callable: route(reduction, *tensors, *scalars) -> the loss with its autograd node "
        "for plain CPU tensors, or None where the route does not serve the call", py::arg("route"),
        py::arg("in_place"));
  m.def("set_backend_sources", &lossops::set_backend_sources,
        "Where lossops._backend keeps the backend choice, read by every eager-route call", py::arg("override_context"),
        py::arg("backend_globals"), py::arg("os_globals"), py::arg("environ"), py::arg("environ_bytes"));
}
