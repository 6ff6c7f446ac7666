// The merge kernels compiled for AVX2 (picked at run time when the CPU has it: see merge_ops.cpp).
// GCC on x86-64 only; elsewhere this table is absent and the base kernels run.
#include "kernel_table.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC optimize("no-trapping-math")
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#include <immintrin.h>
#define PYMERGE_AVX2 1
#define PYMERGE_ISA_NAME "avx2"
#include "merge_kernels.h"

namespace pymerge {
namespace cpu {
const KernelTable* kernels_avx2() { return &kTable; }
}  // namespace cpu
}  // namespace pymerge
#else
namespace pymerge {
namespace cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace pymerge
#endif
