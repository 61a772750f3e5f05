// Shared building blocks for every lossops CPU kernel.
//
// This header is compiled once per instruction set (see setup.py): CPU_CAPABILITY selects at::vec's
// intrinsics, so every kernel written against Vectorized<> here gets an AVX-512, an AVX2 and a baseline
// build without being written three times. Each concern has a header of its own; this one includes them all.
#pragma once

// Included in this order on purpose: GCC's inlining follows the order functions are defined in, and the
// kernels were tuned with this one.
#include "tuning.h"        // kBlock, kExpCacheElements, kRowGrainElements, kReduceChunk, row_grain
#include "dispatch.h"      // opmath_t, LOSSOPS_DISPATCH_FLOATING
#include "cpu_tensor.h"    // new_cpu_tensor, cpu_scalar
#include "layout.h"        // RowLayout, read_block / write_block, transpose (bf16_convert.h: native bf16 stores)
#include "streaming.h"     // prefetch, stream_block / finish_streaming, gradient_pages_resident
#include "vec_math.h"      // apply_softcap, fast_exp, log1p_unit
#include "reduction.h"     // block_sum, deterministic_sum, vec_sum, vec_dot
