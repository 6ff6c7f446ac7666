// The merge kernels for the base instruction set of the build (SSE2 on x86-64; any other architecture).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")  // lets GCC turn the fallback selects into vector blends
#endif
#include "kernel_table.h"
#define PYMERGE_ISA_NAME "base"
#include "merge_kernels.h"

namespace pymerge {
namespace cpu {
const KernelTable* kernels_base() { return &kTable; }
}  // namespace cpu
}  // namespace pymerge
