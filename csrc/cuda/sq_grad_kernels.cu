// Torch-free CUDA kernel of sq_grad_accumulate's square-weight-accumulate step (compiles with plain nvcc).
#include <cuda_runtime.h>

#include <cstdint>

#include "pymerge/sq_grad.h"

namespace pymerge {

namespace {

// One thread per Fisher element; consecutive threads read consecutive elements of each example's gradient.
__global__ void sq_grad_accumulate_kernel(float* fisher, const float* grads, const float* weights, int64_t count,
                                          int64_t dk) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < dk;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    fisher[e] += sq_grad_element(grads, weights, count, dk, e);
  }
}

}  // namespace

// fisher[e] += sum_{n < count} weights[n] * grads[n * dk + e]^2 (weights may be null), on `stream`.
cudaError_t launch_sq_grad_accumulate(float* fisher, const float* grads, const float* weights, int64_t count,
                                      int64_t dk, cudaStream_t stream) {
  if (dk == 0 || count == 0) return cudaSuccess;
  const int threads = 256;
  int64_t blocks = (dk + threads - 1) / threads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  sq_grad_accumulate_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(fisher, grads, weights, count, dk);
  return cudaGetLastError();
}

}  // namespace pymerge
