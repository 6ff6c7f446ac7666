// sq_grad_accumulate: fisher [d,k] += sum_n w_n (Z_n^T G_n)^2 without materialising all N per-example
// gradients. T = 1 is one GEMM, (Z∘Z)^T diag(w) (G∘G); T > 1 runs bmm over chunks of examples into one
// reused fp32 buffer (bounded by PYMERGE_SQ_GRAD_BUDGET_MB, default 8 on CPU, 32 on CUDA) and squares it in a
// fused loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>

#include "pymerge/sq_grad.h"
#include "pymerge/sq_grad_driver.h"

namespace pymerge {

namespace {

// Read per call (getenv is cheap next to a bmm) so tests and benchmarks can change it. On CPU the buffer is
// written by the bmm and read right back by the square-accumulate: 8 MiB stays in cache where 32 MiB did not
// (MiniLM DF-Merge Fisher, 2-core VM: ~20% less CPU time, bench/README "DF-Merge loop, speed helper").
int64_t budget_bytes(bool cpu) {
  const int64_t fallback = cpu ? 8 : 32;
  const char* env = std::getenv("PYMERGE_SQ_GRAD_BUDGET_MB");
  const int64_t mb = env ? std::atoll(env) : fallback;
  return (mb > 0 ? mb : fallback) << 20;
}

void check_args(const at::Tensor& fisher, const at::Tensor& z, const at::Tensor& g,
                const std::optional<at::Tensor>& weights) {
  TORCH_CHECK(fisher.dim() == 2 && fisher.scalar_type() == at::kFloat && fisher.is_contiguous(),
              "sq_grad_accumulate: fisher must be a contiguous float32 [d, k] tensor, got ", fisher.scalar_type(),
              " of shape ", fisher.sizes());
  TORCH_CHECK(z.dim() == 3 && g.dim() == 3, "sq_grad_accumulate: inputs and grad_outputs must be [N, T, d] / [N, T, k]");
  TORCH_CHECK(z.size(0) == g.size(0) && z.size(1) == g.size(1),
              "sq_grad_accumulate: inputs ", z.sizes(), " and grad_outputs ", g.sizes(), " disagree on N or T");
  TORCH_CHECK(z.size(2) == fisher.size(0) && g.size(2) == fisher.size(1), "sq_grad_accumulate: fisher ",
              fisher.sizes(), " does not match inputs ", z.sizes(), " and grad_outputs ", g.sizes());
  TORCH_CHECK(z.device() == fisher.device() && g.device() == fisher.device(),
              "sq_grad_accumulate: all tensors must be on one device");
  if (weights.has_value()) {
    TORCH_CHECK(weights->dim() == 1 && weights->size(0) == z.size(0), "sq_grad_accumulate: weights must be [N]");
    TORCH_CHECK(weights->device() == fisher.device(), "sq_grad_accumulate: weights on another device");
  }
}

// CPU square-weight-accumulate: each thread owns a slice of fisher and walks it in tiles small enough to stay
// in L1 while every example's gradient streams through them, so the inner loop is contiguous and vectorises.
void accumulate_cpu(at::Tensor& fisher, const at::Tensor& grads, const at::Tensor& weights, int64_t count) {
  constexpr int64_t kTile = 2048;
  const int64_t dk = fisher.numel();
  float* f = fisher.data_ptr<float>();
  const float* gp = grads.data_ptr<float>();
  const float* wp = weights.defined() ? weights.data_ptr<float>() : nullptr;
  at::parallel_for(0, dk, 4 * kTile, [&](int64_t lo, int64_t hi) {
    for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
      const int64_t t1 = std::min(hi, t0 + kTile);
      for (int64_t n = 0; n < count; ++n) {
        const float w = wp ? wp[n] : 1.f;
        const float* row = gp + n * dk;
#pragma omp simd
        for (int64_t e = t0; e < t1; ++e) f[e] += sq_grad_term(w, row[e]);
      }
    }
  });
}

// The per-example gradient buffer, kept between calls on CPU: a fresh multi-MB allocation per layer costs
// page faults comparable to the bmm itself. (CUDA's caching allocator already reuses memory.)
at::Tensor chunk_buffer(const at::Tensor& fisher, int64_t chunk) {
  const int64_t need = chunk * fisher.numel();
  if (!fisher.is_cpu()) return at::empty({need}, fisher.options());
  thread_local at::Tensor cached;
  if (!cached.defined() || cached.numel() < need) cached = at::empty({need}, fisher.options());
  return cached;
}

}  // namespace

void sq_grad_accumulate_driver(at::Tensor& fisher, const at::Tensor& inputs, const at::Tensor& grad_outputs,
                               const std::optional<at::Tensor>& weights, SqAccumulateFn accumulate) {
  at::Tensor z = inputs.dim() == 2 ? inputs.unsqueeze(1) : inputs;
  at::Tensor g = grad_outputs.dim() == 2 ? grad_outputs.unsqueeze(1) : grad_outputs;
  check_args(fisher, z, g, weights);
  const int64_t n = z.size(0), t = z.size(1);
  if (n == 0 || fisher.numel() == 0) return;
  at::Tensor w = weights.has_value() ? weights->to(at::kFloat).contiguous() : at::Tensor();
  if (t == 1) {
    // (Z∘Z)^T diag(w) (G∘G): the per-example outer product squared is the outer product of squares.
    at::Tensor z2 = z.select(1, 0).to(at::kFloat).square();
    at::Tensor g2 = g.select(1, 0).to(at::kFloat).square();
    if (w.defined()) g2.mul_(w.unsqueeze(1));
    fisher.addmm_(z2.t(), g2);
    return;
  }
  const int64_t dk = fisher.numel();
  const int64_t chunk = sq_grad_chunk(n, dk, budget_bytes(fisher.is_cpu()));
  at::Tensor buffer = chunk_buffer(fisher, chunk).narrow(0, 0, chunk * dk).view({chunk, fisher.size(0), fisher.size(1)});
  for (int64_t lo = 0; lo < n; lo += chunk) {
    const int64_t c = std::min(chunk, n - lo);
    at::Tensor zc = z.narrow(0, lo, c).to(at::kFloat);
    at::Tensor gc = g.narrow(0, lo, c).to(at::kFloat);
    at::Tensor out = buffer.narrow(0, 0, c);
    at::bmm_out(out, zc.transpose(1, 2), gc);  // per-example gradients Z_n^T G_n, [c, d, k]
    at::Tensor wc = w.defined() ? w.narrow(0, lo, c).contiguous() : at::Tensor();
    accumulate(fisher, out, wc, c);
  }
}

namespace {

void sq_grad_accumulate_cpu(at::Tensor fisher, const at::Tensor& inputs, const at::Tensor& grad_outputs,
                            const std::optional<at::Tensor>& weights) {
  sq_grad_accumulate_driver(fisher, inputs, grad_outputs, weights, &accumulate_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymerge, CPU, m) {
  m.impl("sq_grad_accumulate", &sq_grad_accumulate_cpu);
}

}  // namespace pymerge
