// CUDA kernels of the fused merge ops: torch-free, over raw device pointers, so this file compiles with plain
// nvcc (`make cuda-check`). One thread per element in a grid-stride loop; every input element is read once
// (coalesced) and the output written once; fp32 accumulation; the per-element formulas come from
// pymerge/merge_math.h, shared with the CPU kernels. The torch glue is csrc/cuda/merge_ops_cuda.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "pymerge/cuda_launchers.h"
#include "pymerge/merge_math.h"

namespace pymerge {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Read-only loads through the non-coherent cache: the inputs never alias the output.
template <typename T>
__device__ __forceinline__ float load(const void* p, int64_t e) {
  return to_f(__ldg(static_cast<const T*>(p) + e));
}

unsigned grid_for(int64_t n) {
  // Enough blocks to fill any current GPU several times over; the grid-stride loop covers the rest.
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

#define PYMERGE_GRID_STRIDE(e, n) \
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < (n); \
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename P>
__global__ void __launch_bounds__(kThreads) weighted_sum_kernel(WeightedSumArgs a) {
  PYMERGE_GRID_STRIDE(e, a.n) {
    float acc = a.base ? load<P>(a.base, e) : 0.f;
    for (int i = 0; i < a.m; ++i) acc += a.weights[i] * load<P>(a.tensors[i], e);
    static_cast<P*>(a.out)[e] = from_f<P>(acc);
  }
}

template <typename P, typename F>
__global__ void __launch_bounds__(kThreads) fisher_merge_kernel(FisherMergeArgs a) {
  PYMERGE_GRID_STRIDE(e, a.n) {
    float num = 0.f, den = 0.f, wp = 0.f;
    for (int i = 0; i < a.m; ++i) {
      const float x = load<P>(a.params[i], e);
      const float wf = a.weights[i] * load<F>(a.fishers[i], e);
      num += wf * x;
      den += wf;
      wp += a.weights[i] * x;
    }
    const float fb = a.fallback == Fallback::Target ? load<P>(a.params[0], e) : wp / a.weight_sum;
    static_cast<P*>(a.out)[e] = from_f<P>(fisher_finish(num, den, a.eps, fb));
  }
}

template <typename P, typename F>
__global__ void __launch_bounds__(kThreads) dfmerge_kernel(DfmergeArgs a) {
  PYMERGE_GRID_STRIDE(e, a.n) {
    float num = 0.f, den = 0.f, plain = 0.f;
    for (int i = 0; i < a.m; ++i) {
      const float lt = a.lambdas[i] * load<P>(a.task_vectors[i], e);
      const float f = load<F>(a.fishers[i], e);
      num += f * lt;
      den += f;
      plain += lt;
    }
    const float pre = load<P>(a.pretrained, e);
    static_cast<P*>(a.out)[e] = from_f<P>(dfmerge_finish(pre, num, den, plain, static_cast<float>(a.m), a.eps));
  }
}

template <typename P>
__global__ void __launch_bounds__(kThreads) ties_kernel(TiesArgs a) {
  __shared__ float thr[kMaxModels];
  if (threadIdx.x < a.m) thr[threadIdx.x] = a.thresholds[threadIdx.x];
  __syncthreads();
  PYMERGE_GRID_STRIDE(e, a.n) {
    float trimmed[kMaxModels];
    const float pre = load<P>(a.pretrained, e);
#pragma unroll
    for (int i = 0; i < kMaxModels; ++i) {
      float t = i < a.m ? load<P>(a.task_vectors[i], e) : 0.f;
      if (a.models) t = to_f(from_f<P>(t - pre));  // as torch rounds θ_i - θ_pre in the storage type
      trimmed[i] = i < a.m ? ties_trim(t, thr[i]) : 0.f;
    }
    static_cast<P*>(a.out)[e] = from_f<P>(pre + a.lam * ties_disjoint_mean(trimmed, a.m));
  }
}

template <typename P>
__global__ void __launch_bounds__(kThreads) dare_kernel(DareArgs a) {
  PYMERGE_GRID_STRIDE(e, a.n) {
    static_cast<P*>(a.out)[e] = from_f<P>(dare_apply(load<P>(a.task_vector, e), a.key, e, a.threshold, a.scale));
  }
}

// Calls fn(P{}, F{}) with the storage types for (params dtype, Fisher dtype); F is P or float.
template <typename Fn>
cudaError_t dispatch_pf(DType p, DType f, Fn&& fn) {
  const bool f32 = f == DType::F32;
  switch (p) {
    case DType::F32: fn(float{}, float{}); break;
    case DType::F16: if (f32) fn(__half{}, float{}); else fn(__half{}, __half{}); break;
    case DType::BF16: if (f32) fn(__nv_bfloat16{}, float{}); else fn(__nv_bfloat16{}, __nv_bfloat16{}); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_weighted_sum(const WeightedSumArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  return dispatch_pf(a.dtype, a.dtype, [&](auto p, auto) {
    weighted_sum_kernel<decltype(p)><<<grid_for(a.n), kThreads, 0, stream>>>(a);
  });
}

cudaError_t launch_fisher_merge(const FisherMergeArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  return dispatch_pf(a.dtype, a.fisher_dtype, [&](auto p, auto f) {
    fisher_merge_kernel<decltype(p), decltype(f)><<<grid_for(a.n), kThreads, 0, stream>>>(a);
  });
}

cudaError_t launch_dfmerge_combine(const DfmergeArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  return dispatch_pf(a.dtype, a.fisher_dtype, [&](auto p, auto f) {
    dfmerge_kernel<decltype(p), decltype(f)><<<grid_for(a.n), kThreads, 0, stream>>>(a);
  });
}

cudaError_t launch_ties_merge(const TiesArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  return dispatch_pf(a.dtype, a.dtype, [&](auto p, auto) {
    ties_kernel<decltype(p)><<<grid_for(a.n), kThreads, 0, stream>>>(a);
  });
}

cudaError_t launch_dare(const DareArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  return dispatch_pf(a.dtype, a.dtype, [&](auto p, auto) {
    dare_kernel<decltype(p)><<<grid_for(a.n), kThreads, 0, stream>>>(a);
  });
}

}  // namespace cuda
}  // namespace pymerge
