// Gradient buffers (allocation.cpp): part of the host module, one set of kept buffers per process.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace lossops {

// An uninitialised contiguous CPU tensor for a gradient, on huge pages when large, reusing the buffer the
// previous step freed when it has the same size.
at::Tensor empty_gradient(at::IntArrayRef sizes, at::ScalarType dtype);
// Whether ptr starts a gradient buffer reused from the previous step, i.e. whose pages are resident.
bool host_gradient_pages_resident(const void* ptr);
void set_gradient_cache(bool enabled);
size_t release_gradient_cache();
size_t gradient_cache_bytes();
bool gradient_cache_enabled();

}  // namespace lossops
