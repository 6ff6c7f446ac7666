// CPU kernels of the fused merge ops. Each reads every input element once and writes the output once.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <vector>

namespace pymerge {
namespace {

std::vector<at::Tensor> contiguous_all(const at::TensorList& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

at::Tensor weighted_sum_cpu(at::TensorList tensors, at::ArrayRef<double> weights,
                            const c10::optional<at::Tensor>& base) {
  TORCH_CHECK(!tensors.empty(), "weighted_sum: tensors must not be empty");
  TORCH_CHECK(weights.size() == tensors.size(), "weighted_sum: expected one weight per tensor");
  auto ins = contiguous_all(tensors);
  at::Tensor b = base.has_value() ? base->contiguous() : at::Tensor();
  auto out = at::empty_like(ins[0], at::MemoryFormat::Contiguous);
  const int64_t n = out.numel();
  const int64_t m = static_cast<int64_t>(ins.size());
  std::vector<float> w(weights.begin(), weights.end());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "weighted_sum_cpu", [&] {
    std::vector<const scalar_t*> ptrs(m);
    for (int64_t i = 0; i < m; ++i) ptrs[i] = ins[i].data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) {
        float acc = bp ? static_cast<float>(bp[e]) : 0.f;
        for (int64_t i = 0; i < m; ++i) acc += w[i] * static_cast<float>(ptrs[i][e]);
        op[e] = static_cast<scalar_t>(acc);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pymerge, CPU, m) {
  m.impl("weighted_sum", &weighted_sum_cpu);
}

}  // namespace pymerge
