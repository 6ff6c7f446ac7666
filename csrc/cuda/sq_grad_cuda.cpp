// CUDA glue of sq_grad_accumulate: the shared driver (T = 1 GEMM, chunked bmm via ATen) with the
// square-weight-accumulate step done by the torch-free kernel in sq_grad_kernels.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <cuda_runtime.h>

#include "pymerge/sq_grad_driver.h"

namespace pymerge {

cudaError_t launch_sq_grad_accumulate(float* fisher, const float* grads, const float* weights, int64_t count,
                                      int64_t dk, cudaStream_t stream);

namespace {

void accumulate_cuda(at::Tensor& fisher, const at::Tensor& grads, const at::Tensor& weights, int64_t count) {
  const cudaError_t err = launch_sq_grad_accumulate(
      fisher.data_ptr<float>(), grads.data_ptr<float>(), weights.defined() ? weights.data_ptr<float>() : nullptr,
      count, fisher.numel(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "sq_grad_accumulate: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void sq_grad_accumulate_cuda(at::Tensor fisher, const at::Tensor& inputs, const at::Tensor& grad_outputs,
                             const std::optional<at::Tensor>& weights) {
  const c10::cuda::CUDAGuard guard(fisher.device());
  sq_grad_accumulate_driver(fisher, inputs, grad_outputs, weights, &accumulate_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymerge, CUDA, m) {
  m.impl("sq_grad_accumulate", &sq_grad_accumulate_cuda);
}

}  // namespace pymerge
