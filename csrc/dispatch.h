// The accumulation type of each input dtype, and the dtype dispatch every kernel uses.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

namespace lossops {

template <typename scalar_t>
using opmath_t = at::opmath_type<scalar_t>;

// Dispatch over the floating dtypes every loss accepts.
#define LOSSOPS_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

}  // namespace lossops
