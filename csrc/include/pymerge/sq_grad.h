// Torch-free core of sq_grad_accumulate, shared by the CPU loop and the CUDA kernel so the formula exists once.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PYMERGE_HD __host__ __device__ __forceinline__
#else
#define PYMERGE_HD inline
#endif

namespace pymerge {

// Chunk of examples whose per-example gradients [chunk, d, k] fit the memory budget (at least one).
PYMERGE_HD int64_t sq_grad_chunk(int64_t n, int64_t dk, int64_t budget_bytes) {
  const int64_t per = dk * static_cast<int64_t>(sizeof(float));
  int64_t c = per > 0 ? budget_bytes / per : n;
  if (c < 1) c = 1;
  return c < n ? c : n;
}

// One example's contribution to one Fisher element: w * g^2 (fp32 whatever the input dtype).
PYMERGE_HD float sq_grad_term(float w, float g) { return w * g * g; }

// fisher[e] += sum_n w_n * grads[n * dk + e]^2 for one element e of the [d, k] layout.
// `weights` may be null (all ones); grads holds `count` per-example gradients of dk elements each.
PYMERGE_HD float sq_grad_element(const float* grads, const float* weights, int64_t count, int64_t dk, int64_t e) {
  float acc = 0.f;
  for (int64_t n = 0; n < count; ++n) {
    const float g = grads[n * dk + e];
    acc += sq_grad_term(weights ? weights[n] : 1.f, g);
  }
  return acc;
}

}  // namespace pymerge
