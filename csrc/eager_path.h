// The eager call path for plain CPU tensors (eager_path.cpp) and what it needs from the rest of the host module.
#pragma once

#include <torch/csrc/utils/pybind.h>

#include <string>

#include "kernel_abi.h"

namespace lossops {

// The table of the kernel library lossops._cpp loaded (bindings.cpp); raises when none is loaded.
const KernelTable& loaded_kernels();

// A Python value as a kernel argument: None, a tensor, a bool, an int, a float or a list of ints or floats
// (bindings.cpp). `kernel` and `name` only name the argument in the error.
c10::IValue to_ivalue(const std::string& kernel, const std::string& name, py::handle value);

// Records a family's eager route (lossops/_eager.py `EagerRoute` says what each part means) and returns its
// number, the first argument of eager_loss.
int64_t declare_eager_route(const std::string& kernel, const std::string& layout, const std::string& denominator,
                            const py::list& parameters, const py::list& scalars, const std::string& node_name);

// A declared route's callable, route(reduction, *tensors, *scalars): the loss with its autograd node, or None where
// the route does not serve the call. in_place: inplace_backward=True (backward writes the first call tensor's
// gradient over its storage).
py::object eager_route_callable(int64_t route, bool in_place);

// Where lossops._backend keeps the backend choice (eager_path.cpp reads it on every call).
void set_backend_sources(py::object override_context, py::dict backend_globals, py::dict os_globals,
                         py::object environ, py::object environ_bytes);

}  // namespace lossops
