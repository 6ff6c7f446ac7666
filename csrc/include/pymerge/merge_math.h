// Per-element math of the fused merge ops, shared by the CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda). Torch-free and header-only so every .cu compiles with plain nvcc; all arithmetic in fp32.
// The pure-torch references in pymerge/ops.py follow these formulas step by step (same operation order).
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define PYMERGE_HD __host__ __device__ __forceinline__
#else
// static: internal linkage, so the copies compiled for AVX2 / AVX-512 (csrc/cpu/merge_kernels_*.cpp) can never
// stand in for the base build's at link time.
#define PYMERGE_HD static inline
#endif

namespace pymerge {

constexpr int kMaxModels = 16;

// ---- fallback modes of fisher_merge ------------------------------------------------------------
enum class Fallback : int { Target = 0, Average = 1 };

// θ* = num / den where den = Σ λ_i F_i > eps, else the fallback value. Written as selects around a division
// that cannot trap (den replaced by 1 where unused), so compilers vectorise it.
PYMERGE_HD float fisher_finish(float num, float den, float eps, float fallback_value) {
  const bool use = den > eps;
  const float q = num / (use ? den : 1.f);
  return use ? q : fallback_value;
}

// DF-Merge eq. 8 per element: θ_pre + M num / den where den = Σ F_i > eps, else θ_pre + Σ λ_i τ_i.
PYMERGE_HD float dfmerge_finish(float pre, float num, float den, float plain, float m, float eps) {
  const bool use = den > eps;
  const float q = m * num / (use ? den : 1.f);
  return pre + (use ? q : plain);
}

// ---- TIES --------------------------------------------------------------------------------------
// Trim: keep τ where |τ| >= threshold (the k-th largest magnitude; NaN magnitudes count as +inf).
PYMERGE_HD float ties_trim(float t, float threshold) {
  float a = t < 0.f ? -t : t;
  return ((a >= threshold) | (a != a)) ? t : 0.f;  // bitwise | and & here: no branches, so loops vectorise
}

// Whether a trimmed value t takes part in the disjoint mean: non-zero with the elected sign s = sign(total).
PYMERGE_HD bool ties_agrees(float total, float t) {
  return ((total > 0.f) & (t > 0.f)) | ((total < 0.f) & (t < 0.f));
}

// The disjoint mean from the sum and count of the agreeing values; 0 where none agrees (also where s = 0).
PYMERGE_HD float ties_mean(float acc, float cnt) {
  const bool any = cnt > 0.f;
  const float q = acc / (any ? cnt : 1.f);
  return any ? q : 0.f;
}

// Disjoint mean of the trimmed values over the models that agree with the elected sign s = sign(Σ trimmed).
// trimmed[i] for i < m (the CPU kernel does the same in blocks, model by model).
PYMERGE_HD float ties_disjoint_mean(const float* trimmed, int m) {
  float total = 0.f;
  for (int i = 0; i < m; ++i) total += trimmed[i];
  float acc = 0.f, cnt = 0.f;
  for (int i = 0; i < m; ++i) {
    const bool agree = ties_agrees(total, trimmed[i]);
    acc += agree ? trimmed[i] : 0.f;
    cnt += agree ? 1.f : 0.f;
  }
  return ties_mean(acc, cnt);
}

// ---- DARE: counter-based RNG -------------------------------------------------------------------
// splitmix64's finaliser: a bijective 64-bit mixer. The drop decision of element e (flat row-major index) is
// r_e = mix64(mix64(seed) + (e + 1) * golden) >> 40, a 24-bit uniform integer; drop iff r_e < ceil(p * 2^24).
// It depends only on (seed, e): the same mask on CPU and CUDA, for any thread count or memory layout.
constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

PYMERGE_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

PYMERGE_HD uint32_t dare_bits(uint64_t key, int64_t index) {
  return static_cast<uint32_t>(mix64(key + static_cast<uint64_t>(index + 1) * kGolden) >> 40);
}

// key = mix64(seed): computed once per call.
PYMERGE_HD uint64_t dare_key(int64_t seed) { return mix64(static_cast<uint64_t>(seed)); }

// ceil(p * 2^24) for p in [0, 1): p * 2^24 is exact in double, so r < threshold <=> r / 2^24 < p.
PYMERGE_HD uint32_t dare_threshold(double p) {
  const double x = p * 16777216.0;
  uint32_t t = static_cast<uint32_t>(x);
  return static_cast<double>(t) < x ? t + 1u : t;
}

PYMERGE_HD float dare_apply(float x, uint64_t key, int64_t index, uint32_t threshold, float scale) {
  return dare_bits(key, index) < threshold ? 0.f : x * scale;
}

}  // namespace pymerge
