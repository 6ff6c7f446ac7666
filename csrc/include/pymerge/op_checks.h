// Argument checks of the merge ops at the torch.ops level, shared by the CPU and CUDA glue (C++ / LibTorch
// users call the ops without the Python wrappers, whose checks are friendlier and come first).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "pymerge/merge_math.h"

namespace pymerge {

inline bool is_merge_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A non-empty list of at most kMaxModels tensors with the shape, dtype and device of ref (ref itself when null).
inline void check_list(const char* op, const char* name, at::TensorList ts, const at::Tensor* ref = nullptr,
                       bool allow_fp32 = false) {
  TORCH_CHECK(!ts.empty(), op, ": ", name, " must be a non-empty list of tensors");
  TORCH_CHECK(static_cast<int64_t>(ts.size()) <= kMaxModels, op, ": ", name, ": at most ", kMaxModels,
              " models are supported, got ", ts.size());
  const at::Tensor& r = ref ? *ref : ts[0];
  TORCH_CHECK(is_merge_dtype(ts[0].scalar_type()), op, ": ", name, "[0]: dtype ", ts[0].scalar_type(),
              " is not supported (expected float32, float16 or bfloat16)");
  for (size_t i = 0; i < ts.size(); ++i) {
    TORCH_CHECK(ts[i].sizes() == r.sizes(), op, ": ", name, "[", i, "]: shape ", ts[i].sizes(),
                " does not match ", r.sizes());
    TORCH_CHECK(ts[i].device() == r.device(), op, ": ", name, "[", i, "]: device ", ts[i].device(),
                " does not match ", r.device());
    const bool dtype_ok = ts[i].scalar_type() == ts[0].scalar_type() &&
                          (ts[0].scalar_type() == r.scalar_type() || (allow_fp32 && ts[0].scalar_type() == at::kFloat));
    TORCH_CHECK(dtype_ok, op, ": ", name, "[", i, "]: dtype ", ts[i].scalar_type(), " does not match ",
                r.scalar_type());
  }
}

inline void check_count(const char* op, const char* name, size_t got, size_t want) {
  TORCH_CHECK(got == want, op, ": ", name, ": expected ", want, " values (one per model), got ", got);
}

// Per-tensor contiguous views: Tensor::contiguous() returns the tensor itself when it already is contiguous,
// so only non-contiguous inputs are copied (once, in full; the kernels then stream flat arrays).
inline std::vector<at::Tensor> contiguous_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

inline Fallback parse_fallback(const char* op, c10::string_view fallback) {
  if (fallback == "target") return Fallback::Target;
  if (fallback == "average") return Fallback::Average;
  TORCH_CHECK(false, op, ": fallback must be 'target' or 'average', got '", std::string(fallback), "'");
  return Fallback::Target;
}

// k = max(1, ceil(density * n)): how many magnitudes TIES keeps per tensor (as ties_keep_count in ops.py).
inline int64_t ties_keep_count(int64_t n, double density) {
  const double x = density * static_cast<double>(n);
  int64_t k = static_cast<int64_t>(x);
  if (static_cast<double>(k) < x) ++k;
  return k < 1 ? 1 : k;
}

// The caller's output of a *_out op: contiguous, with the shape, dtype and device of ref.
inline void check_out(const char* op, const at::Tensor& out, const at::Tensor& ref) {
  TORCH_CHECK(out.sizes() == ref.sizes(), op, ": out: shape ", out.sizes(), " does not match ", ref.sizes());
  TORCH_CHECK(out.scalar_type() == ref.scalar_type(), op, ": out: dtype ", out.scalar_type(), " does not match ",
              ref.scalar_type());
  TORCH_CHECK(out.device() == ref.device(), op, ": out: device ", out.device(), " does not match ", ref.device());
  TORCH_CHECK(out.is_contiguous(), op, ": out must be contiguous");
}

// The weights of weighted_sum / fisher_merge: as given (one per model), or 1/M each when None (schema
// `float[]? weights`, the Python wrappers' default).
inline std::vector<double> resolve_weights(const char* op, c10::optional<at::ArrayRef<double>> weights, size_t m) {
  if (!weights.has_value()) return std::vector<double>(m, m ? 1.0 / static_cast<double>(m) : 0.0);
  check_count(op, "weights", weights->size(), m);
  return std::vector<double>(weights->begin(), weights->end());
}

// ---- each op's argument checks, one place for the CPU and CUDA implementations ---------------------
inline void check_weighted_sum_args(at::TensorList tensors, at::ArrayRef<double> weights,
                                    const c10::optional<at::Tensor>& base) {
  constexpr const char* op = "weighted_sum";
  check_list(op, "tensors", tensors);
  check_count(op, "weights", weights.size(), tensors.size());
  if (base.has_value()) check_list(op, "base", at::TensorList(*base), &tensors[0]);
}

inline void check_fisher_merge_args(at::TensorList params, at::TensorList fishers, at::ArrayRef<double> weights,
                                    double eps) {
  constexpr const char* op = "fisher_merge";
  check_list(op, "params", params);
  check_list(op, "fishers", fishers, &params[0], /*allow_fp32=*/true);
  check_count(op, "fishers", fishers.size(), params.size());
  check_count(op, "weights", weights.size(), params.size());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

inline void check_dfmerge_combine_args(const at::Tensor& pretrained, at::TensorList task_vectors,
                                       at::TensorList fishers, at::ArrayRef<double> lambdas, double eps) {
  constexpr const char* op = "dfmerge_combine";
  check_list(op, "pretrained", at::TensorList(pretrained));
  check_list(op, "task_vectors", task_vectors, &pretrained);
  check_list(op, "fishers", fishers, &pretrained, /*allow_fp32=*/true);
  check_count(op, "fishers", fishers.size(), task_vectors.size());
  check_count(op, "lambdas", lambdas.size(), task_vectors.size());
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
}

inline void check_ties_merge_args(const at::Tensor& pretrained, at::TensorList task_vectors, double density) {
  constexpr const char* op = "ties_merge";
  check_list(op, "pretrained", at::TensorList(pretrained));
  check_list(op, "task_vectors", task_vectors, &pretrained);
  TORCH_CHECK(density > 0 && density <= 1, op, ": density must be in (0, 1], got ", density);
}

inline void check_dare_args(const at::Tensor& task_vector, double p) {
  constexpr const char* op = "dare";
  check_list(op, "task_vector", at::TensorList(task_vector));
  TORCH_CHECK(p >= 0 && p < 1, op, ": p must be in [0, 1), got ", p);
}

}  // namespace pymerge
