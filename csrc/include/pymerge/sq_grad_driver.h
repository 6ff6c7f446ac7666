// Device-independent driver of sq_grad_accumulate (torch glue; not for .cu files). The CPU and CUDA
// backends share shape handling, the T = 1 GEMM and the chunked bmm; they differ only in the fused
// square-weight-accumulate step over a chunk of per-example gradients.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace pymerge {

// fisher[e] += sum_{n < count} w_n * grads[n, e]^2 with grads a contiguous fp32 [count, d, k] buffer and
// weights a contiguous fp32 [count] tensor or undefined (all ones).
using SqAccumulateFn = void (*)(at::Tensor& fisher, const at::Tensor& grads, const at::Tensor& weights, int64_t count);

void sq_grad_accumulate_driver(at::Tensor& fisher, const at::Tensor& inputs, const at::Tensor& grad_outputs,
                               const std::optional<at::Tensor>& weights, SqAccumulateFn accumulate);

}  // namespace pymerge
