// The CPU kernels of the merge ops as a table of plain function pointers, one table per instruction set.
// csrc/cpu/merge_kernels.h is compiled three times (merge_kernels_{base,avx2,avx512}.cpp, each for its target);
// merge_ops.cpp picks the best table the running CPU supports and calls it on chunks of the tensors. Torch-free:
// the kernels see raw pointers, so no ATen / c10 inline function is ever compiled for a wider instruction set
// than the base build (the linker could otherwise keep that copy for every caller).
#pragma once

#include <cstdint>

namespace pymerge {
namespace cpu {

// Storage dtypes of the kernels: index of the tables below.
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum FisherDType : int { kSame = 0, kF32Fisher = 1 };  // Fisher dtype: the params' own, or float32

struct WeightedSumArgs {
  const void* const* in; int m; const float* w; const void* base; void* out;
};
struct FisherArgs {
  const void* const* p; const void* const* f; int m; const float* w; float wsum; float eps; bool average; void* out;
};
struct DfmergeArgs {
  const void* pre; const void* const* t; const void* const* f; int m; const float* lam; float mf; float eps; void* out;
};
// TIES: t holds task vectors τ_i, or fine-tuned models θ_i when models is set (τ_i = θ_i - pre, formed on the
// fly and rounded to the storage type as torch's subtraction rounds). With check set, a non-finite pre sets
// *pre_nonfinite (the models' and task vectors' values are checked by the selection passes).
struct TiesArgs {
  const void* pre; const void* const* t; int m; const float* thr; float lam; void* out;
  bool models; bool check; int* pre_nonfinite;
};
struct DareArgs {
  const void* x; uint64_t key; uint32_t threshold; float scale; void* out;
  bool native_bf16;  // the CPU has AVX512_BF16 (and PYMERGE_CPU_ISA allows it): the AVX-512 kernel may use vcvtneps2bf16
};
// One pass of the TIES selection over [lo, hi): counts keys > khi, stores the keys in [klo, khi] into cand (at
// most cap of them; cand has room for cap + 64) and counts them all in in_band (more than cap: overflow);
// nonfinite > 0 when a value was NaN / Inf (key of +inf). The TIES functions take pre: nullptr when t is a task vector, the
// pretrained tensor when t is a fine-tuned model (keys of τ = t - pre, rounded to the storage type).
struct BandResult { int64_t above; int64_t in_band; int64_t stored; int64_t nonfinite; };

using ChunkFn = void (*)(const void* args, int64_t lo, int64_t hi);
using BandFn = BandResult (*)(const void* t, const void* pre, int64_t lo, int64_t hi, uint32_t klo, uint32_t khi,
                              uint32_t* cand, int64_t cap);
// Radix histogram of the magnitude keys: pass 0 counts key >> 16, pass 1 counts key & 0xffff where key >> 16 == high.
using HistFn = void (*)(const void* t, const void* pre, int64_t lo, int64_t hi, int pass, uint32_t high,
                        uint32_t* hist);
// keys of t[start + j * stride] for j < count
using KeysFn = void (*)(const void* t, const void* pre, int64_t start, int64_t stride, int64_t count, uint32_t* keys);

struct KernelTable {
  const char* isa;
  ChunkFn weighted_sum[3];
  ChunkFn fisher_merge[3][2];  // [params dtype][Fisher dtype]; [kF32][kF32Fisher] unused
  ChunkFn dfmerge_combine[3][2];
  ChunkFn ties_merge[3];
  ChunkFn dare[3];
  BandFn ties_band[3];
  HistFn ties_hist[3];
  KeysFn ties_keys[3];
};

// Each returns nullptr where its instruction set was not compiled in (another compiler or architecture).
const KernelTable* kernels_base();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

}  // namespace cpu
}  // namespace pymerge
