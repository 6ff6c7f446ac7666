// Schemas of every pymerge op. Implementations register themselves per backend in csrc/cpu and
// csrc/cuda (TORCH_LIBRARY_IMPL); fake (meta) kernels live in pymerge/ops.py (register_fake).
#include <torch/library.h>

TORCH_LIBRARY(pymerge, m) {
  // Fisher-weighted average (Matena & Raffel eq. 4) with a zero-Fisher fallback. weights None: 1/M each.
  m.def("fisher_merge(Tensor[] params, Tensor[] fishers, float[]? weights, float eps, str fallback) -> Tensor");
  // DF-Merge eq. 8: pretrained + M * sum_i F_i lambda_i tau_i / sum_i F_i.
  m.def("dfmerge_combine(Tensor pretrained, Tensor[] task_vectors, Tensor[] fishers, float[] lambdas, float eps) -> Tensor");
  // base + sum_i w_i t_i (averaging, task arithmetic, general task arithmetic). weights None: 1/M each.
  m.def("weighted_sum(Tensor[] tensors, float[]? weights, Tensor? base) -> Tensor");
  // The same three writing into the caller's `out` (reused buffers: no fresh allocation per call). CPU kernels;
  // elsewhere pymerge.ops computes and copies.
  m.def("weighted_sum_out(Tensor[] tensors, float[]? weights, Tensor? base, Tensor(a!) out) -> ()");
  m.def("fisher_merge_out(Tensor[] params, Tensor[] fishers, float[]? weights, float eps, str fallback, Tensor(a!) out) -> ()");
  m.def("dfmerge_combine_out(Tensor pretrained, Tensor[] task_vectors, Tensor[] fishers, float[] lambdas, float eps, Tensor(a!) out) -> ()");
  // TIES: trim to top-density magnitudes, elect sign by mass, disjoint mean, scale by lam. models: the list holds
  // fine-tuned tensors and the op forms task_vectors[i] - pretrained on the fly; check_finite: an error naming the
  // first input with a NaN or Inf ("ties_merge: models[2] contains NaN or Inf"), found in the passes the op makes.
  m.def("ties_merge(Tensor pretrained, Tensor[] task_vectors, float density, float lam, bool models=False, "
        "bool check_finite=False) -> Tensor");
  // DARE: drop with probability p, rescale by 1/(1-p); counter-based RNG, same mask on every device.
  m.def("dare(Tensor task_vector, float p, int seed) -> Tensor");
  // fisher += sum_n w_n (Z_n^T G_n)^2 for Z [N,T,d], G [N,T,k], fisher [d,k] (fp32).
  m.def("sq_grad_accumulate(Tensor(a!) fisher, Tensor inputs, Tensor grad_outputs, Tensor? weights) -> ()");
}

#ifdef PYMERGE_PYTHON_MODULE
// An empty Python module so `import pymerge._C` loads this library and runs the registrations above.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
