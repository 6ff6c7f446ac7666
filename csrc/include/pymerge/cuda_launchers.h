// Torch-free interface between the CUDA kernels (csrc/cuda/merge_kernels.cu, compiled by plain nvcc) and
// their torch glue (csrc/cuda/merge_ops_cuda.cpp). Arguments travel by value in small structs holding up to
// kMaxModels raw device pointers; every launcher runs on the given stream and returns the launch status.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "pymerge/merge_math.h"

namespace pymerge {
namespace cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct WeightedSumArgs {
  const void* tensors[kMaxModels];
  float weights[kMaxModels];
  const void* base;  // nullptr: no base
  void* out;
  int64_t n;
  int m;
  DType dtype;
};

struct FisherMergeArgs {
  const void* params[kMaxModels];
  const void* fishers[kMaxModels];
  float weights[kMaxModels];
  void* out;
  int64_t n;
  int m;
  float eps;
  float weight_sum;  // Σ λ_i, for the "average" fallback
  Fallback fallback;
  DType dtype;          // params and output
  DType fisher_dtype;   // dtype, or F32
};

struct DfmergeArgs {
  const void* pretrained;
  const void* task_vectors[kMaxModels];
  const void* fishers[kMaxModels];
  float lambdas[kMaxModels];
  void* out;
  int64_t n;
  int m;
  float eps;
  DType dtype;
  DType fisher_dtype;
};

struct TiesArgs {
  const void* pretrained;
  const void* task_vectors[kMaxModels];
  const float* thresholds;  // device array of m k-th largest magnitudes
  void* out;
  int64_t n;
  int m;
  float lam;
  DType dtype;
  bool models;  // task_vectors hold fine-tuned tensors: tau_i = t_i - pretrained, rounded to the storage type
};

struct DareArgs {
  const void* task_vector;
  void* out;
  int64_t n;
  uint64_t key;        // dare_key(seed)
  uint32_t threshold;  // dare_threshold(p)
  float scale;         // 1 / (1 - p) in fp32
  DType dtype;
};

cudaError_t launch_weighted_sum(const WeightedSumArgs& args, cudaStream_t stream);
cudaError_t launch_fisher_merge(const FisherMergeArgs& args, cudaStream_t stream);
cudaError_t launch_dfmerge_combine(const DfmergeArgs& args, cudaStream_t stream);
cudaError_t launch_ties_merge(const TiesArgs& args, cudaStream_t stream);
cudaError_t launch_dare(const DareArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace pymerge
