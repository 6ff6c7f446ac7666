// Torch glue of the CUDA merge ops: checks the tensors, packs raw pointers into the launcher structs of
// pymerge/cuda_launchers.h and launches csrc/cuda/merge_kernels.cu on the current CUDA stream.
// Built only in CUDA builds (csrc/SOURCES.txt [cuda]).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "pymerge/cuda_launchers.h"
#include "pymerge/merge_math.h"
#include "pymerge/op_checks.h"

namespace pymerge {
namespace {

cuda::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cuda::DType::F32;
    case at::kHalf: return cuda::DType::F16;
    case at::kBFloat16: return cuda::DType::BF16;
    default: TORCH_CHECK(false, "pymerge: unsupported dtype ", t.scalar_type());
  }
  return cuda::DType::F32;
}

void check_cuda(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got ", t.device());
}

at::Tensor new_output(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor weighted_sum_cuda(at::TensorList tensors, c10::optional<at::ArrayRef<double>> weights_or_none,
                             const c10::optional<at::Tensor>& base) {
  constexpr const char* op = "weighted_sum";
  const std::vector<double> weights = resolve_weights(op, weights_or_none, tensors.size());
  check_weighted_sum_args(tensors, weights, base);
  check_cuda(op, tensors[0]);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  const auto ins = contiguous_all(tensors);
  const at::Tensor b = base.has_value() ? base->contiguous() : at::Tensor();
  at::Tensor out = new_output(ins[0]);
  cuda::WeightedSumArgs a{};
  a.m = static_cast<int>(ins.size());
  for (int i = 0; i < a.m; ++i) {
    a.tensors[i] = ins[i].const_data_ptr();
    a.weights[i] = static_cast<float>(weights[i]);
  }
  a.base = b.defined() ? b.const_data_ptr() : nullptr;
  a.out = out.data_ptr();
  a.n = out.numel();
  a.dtype = dtype_of(out);
  check_launch(op, cuda::launch_weighted_sum(a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor fisher_merge_cuda(at::TensorList params, at::TensorList fishers, c10::optional<at::ArrayRef<double>> weights_or_none, double eps,
                             c10::string_view fallback) {
  constexpr const char* op = "fisher_merge";
  const std::vector<double> weights = resolve_weights(op, weights_or_none, params.size());
  check_fisher_merge_args(params, fishers, weights, eps);
  check_cuda(op, params[0]);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto ps = contiguous_all(params);
  const auto fs = contiguous_all(fishers);
  at::Tensor out = new_output(ps[0]);
  cuda::FisherMergeArgs a{};
  a.m = static_cast<int>(ps.size());
  double wsum = 0;
  for (int i = 0; i < a.m; ++i) {
    a.params[i] = ps[i].const_data_ptr();
    a.fishers[i] = fs[i].const_data_ptr();
    a.weights[i] = static_cast<float>(weights[i]);
    wsum += weights[i];
  }
  a.out = out.data_ptr();
  a.n = out.numel();
  a.eps = static_cast<float>(eps);
  a.weight_sum = static_cast<float>(wsum);
  a.fallback = parse_fallback(op, fallback);
  a.dtype = dtype_of(out);
  a.fisher_dtype = dtype_of(fs[0]);
  check_launch(op, cuda::launch_fisher_merge(a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor dfmerge_combine_cuda(const at::Tensor& pretrained, at::TensorList task_vectors, at::TensorList fishers,
                                at::ArrayRef<double> lambdas, double eps) {
  constexpr const char* op = "dfmerge_combine";
  check_dfmerge_combine_args(pretrained, task_vectors, fishers, lambdas, eps);
  check_cuda(op, pretrained);
  const c10::cuda::CUDAGuard guard(pretrained.device());
  const at::Tensor pre = pretrained.contiguous();
  const auto ts = contiguous_all(task_vectors);
  const auto fs = contiguous_all(fishers);
  at::Tensor out = new_output(pre);
  cuda::DfmergeArgs a{};
  a.m = static_cast<int>(ts.size());
  a.pretrained = pre.const_data_ptr();
  for (int i = 0; i < a.m; ++i) {
    a.task_vectors[i] = ts[i].const_data_ptr();
    a.fishers[i] = fs[i].const_data_ptr();
    a.lambdas[i] = static_cast<float>(lambdas[i]);
  }
  a.out = out.data_ptr();
  a.n = out.numel();
  a.eps = static_cast<float>(eps);
  a.dtype = dtype_of(out);
  a.fisher_dtype = dtype_of(fs[0]);
  check_launch(op, cuda::launch_dfmerge_combine(a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor ties_merge_cuda(const at::Tensor& pretrained, at::TensorList task_vectors, double density, double lam,
                           bool models, bool check_finite) {
  constexpr const char* op = "ties_merge";
  check_ties_merge_args(pretrained, task_vectors, density);
  check_cuda(op, pretrained);
  const c10::cuda::CUDAGuard guard(pretrained.device());
  const at::Tensor pre = pretrained.contiguous();
  const auto ts = contiguous_all(task_vectors);
  if (check_finite) {  // one reduction per input (the CPU op folds this into its passes); same message
    for (size_t i = 0; i < ts.size(); ++i)
      TORCH_CHECK_VALUE(at::isfinite(ts[i]).all().item<bool>(), "ties_merge: ", models ? "models" : "task_vectors",
                        "[", i, "] contains NaN or Inf");
    TORCH_CHECK_VALUE(at::isfinite(pre).all().item<bool>(), "ties_merge: pretrained contains NaN or Inf");
  }
  at::Tensor out = new_output(pre);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int64_t k = ties_keep_count(n, density);
  // Thresholds by torch's GPU selection (kthvalue: radix select, not a sort), one fp32 magnitude buffer at a
  // time; NaN magnitudes count as +inf, as on the CPU. They stay on the device: no host sync. In the model form
  // the magnitudes are those of t_i - pretrained in the storage type (the kernel rounds the same way).
  std::vector<at::Tensor> thr;
  for (const auto& t : ts) {
    at::Tensor mag = (models ? (t - pre) : t).reshape({-1}).abs().to(at::kFloat);
    mag = at::nan_to_num(mag, std::numeric_limits<double>::infinity());
    thr.push_back(std::get<0>(at::kthvalue(mag, n - k + 1)));
  }
  const at::Tensor thresholds = at::stack(thr).contiguous();
  cuda::TiesArgs a{};
  a.m = static_cast<int>(ts.size());
  a.pretrained = pre.const_data_ptr();
  for (int i = 0; i < a.m; ++i) a.task_vectors[i] = ts[i].const_data_ptr();
  a.thresholds = thresholds.const_data_ptr<float>();
  a.out = out.data_ptr();
  a.n = n;
  a.lam = static_cast<float>(lam);
  a.dtype = dtype_of(out);
  a.models = models;
  check_launch(op, cuda::launch_ties_merge(a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor dare_cuda(const at::Tensor& task_vector, double p, int64_t seed) {
  constexpr const char* op = "dare";
  check_dare_args(task_vector, p);
  check_cuda(op, task_vector);
  const c10::cuda::CUDAGuard guard(task_vector.device());
  const at::Tensor t = task_vector.contiguous();
  at::Tensor out = new_output(t);
  cuda::DareArgs a{};
  a.task_vector = t.const_data_ptr();
  a.out = out.data_ptr();
  a.n = out.numel();
  a.key = dare_key(seed);
  a.threshold = dare_threshold(p);
  a.scale = static_cast<float>(1.0 / (1.0 - p));
  a.dtype = dtype_of(out);
  check_launch(op, cuda::launch_dare(a, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pymerge, CUDA, m) {
  m.impl("weighted_sum", &weighted_sum_cuda);
  m.impl("fisher_merge", &fisher_merge_cuda);
  m.impl("dfmerge_combine", &dfmerge_combine_cuda);
  m.impl("ties_merge", &ties_merge_cuda);
  m.impl("dare", &dare_cuda);
}

}  // namespace pymerge
