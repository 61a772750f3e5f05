// The entry point of a per-ISA kernel library: the host module finds this one exported symbol (kernel_abi.h).
#include "bce.h"
#include "common.h"
#include "cross_entropy.h"
#include "focal.h"
#include "regression.h"

#define LOSSOPS_STR2(x) #x
#define LOSSOPS_STR(x) LOSSOPS_STR2(x)

namespace lossops {
namespace {
const HostServices* g_host = nullptr;
}  // namespace

bool gradient_pages_resident(const void* ptr) { return g_host != nullptr && g_host->gradient_pages_resident(ptr); }

}  // namespace lossops

extern "C" __attribute__((visibility("default"))) const lossops::KernelTable* lossops_kernel_table_v1(
    const lossops::HostServices* host) {
  static const lossops::KernelTable table{LOSSOPS_STR(CPU_CAPABILITY), &lossops::cross_entropy_forward,
                                          &lossops::sigmoid_focal_forward, &lossops::bce_with_logits_forward,
                                          &lossops::regression_forward};
  lossops::g_host = host;
  return &table;
}
