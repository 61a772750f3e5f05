// The entry point of a per-ISA kernel library: the host module finds this one exported symbol (kernel_abi.h),
// and through it the kernels every family file registered with LOSSOPS_REGISTER_KERNEL.
#include "kernel_abi.h"
#include "streaming.h"  // gradient_pages_resident

#define LOSSOPS_STR2(x) #x
#define LOSSOPS_STR(x) LOSSOPS_STR2(x)

namespace lossops {
namespace {
const HostServices* g_host = nullptr;
}  // namespace

// A function-local static: registrations run during the library's static initialisation, in any order.
std::vector<KernelEntry>& kernel_registry() {
  static std::vector<KernelEntry> registry;
  return registry;
}

bool gradient_pages_resident(const void* ptr) { return g_host != nullptr && g_host->gradient_pages_resident(ptr); }

}  // namespace lossops

extern "C" __attribute__((visibility("default"))) const lossops::KernelTable* lossops_kernel_table_v3(
    const lossops::HostServices* host) {
  static const lossops::KernelTable table{LOSSOPS_STR(CPU_CAPABILITY), &lossops::kernel_registry()};
  lossops::g_host = host;
  return &table;
}
