// CPU kernels of the fused merge ops. Each reads every input element once and writes the output once.
//
// The element-wise ops (weighted_sum, fisher_merge, dfmerge_combine) walk the tensors in blocks of kBlock
// elements with fp32 accumulators on the stack: models in the outer loop, elements in the inner loop, so the
// inner loops are plain streams that the compiler vectorises (#pragma omp simd), and the block stays in L1
// while the M inputs stream past. at::parallel_for splits the tensor into large chunks of blocks.
// No FP traps are ever enabled here; without this, GCC will not turn the fallback selects into vector blends.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "pymerge/merge_math.h"
#include "pymerge/op_checks.h"

namespace pymerge {
namespace {

constexpr int64_t kBlock = 4096;      // 16 KiB per fp32 stream per block: long runs for the prefetchers
constexpr int64_t kGrain = 1 << 16;   // elements per parallel task

// fp32 views of the storage types and back, written branch-free (selects only) so the block loops vectorise;
// c10's own conversions branch on NaN / subnormals, which stops the vectoriser. Both round to nearest even.
inline uint32_t f_bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float bits_f(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }

inline float to_f(float x) { return x; }
inline float to_f(c10::BFloat16 x) { return bits_f(static_cast<uint32_t>(x.x) << 16); }
inline float to_f(c10::Half x) {
  // After F. Giesen's half_to_float: rebias the exponent; Inf / NaN and subnormals are fixed up by selects.
  const uint32_t h = x.x;
  const uint32_t shifted = (h & 0x7fffu) << 13;
  const uint32_t exp = shifted & 0x0f800000u;
  const uint32_t normal = shifted + 0x38000000u;                                        // (127 - 15) << 23
  const uint32_t infnan = normal + 0x38000000u;                                         // exponent all ones
  const uint32_t sub = f_bits(bits_f(normal + 0x00800000u) - bits_f(0x38800000u));     // renormalise
  const uint32_t mag = exp == 0x0f800000u ? infnan : (exp == 0 ? sub : normal);
  return bits_f(mag | ((h & 0x8000u) << 16));
}

template <typename T> inline T from_f(float x);
template <> inline float from_f<float>(float x) { return x; }
template <> inline c10::BFloat16 from_f<c10::BFloat16>(float x) {
  const uint32_t u = f_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(x != x ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}
template <> inline c10::Half from_f<c10::Half>(float x) {
  // After F. Giesen's float_to_half_fast3_rtne, with its branches turned into selects.
  const uint32_t u = f_bits(x);
  const uint32_t sign = (u & 0x80000000u) >> 16;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;                              // NaN / overflow -> Inf
  const float denorm_magic = bits_f(((127 - 15) + (23 - 10) + 1) << 23);
  const uint32_t sub = f_bits(bits_f(a) + denorm_magic) - f_bits(denorm_magic);         // subnormal or zero
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;                    // rebias + round
  const uint32_t h = a >= 0x47800000u ? big : (a < 0x38800000u ? sub : normal);
  return c10::Half(static_cast<uint16_t>(h | sign), c10::Half::from_bits());
}

// Calls f.template operator()<P, F>() for the params dtype P and the Fisher dtype F (P itself or float).
template <typename Fn>
void dispatch_pf(at::ScalarType p, at::ScalarType f, const char* op, Fn&& fn) {
  const bool f32 = f == at::kFloat;
  switch (p) {
    case at::kFloat: fn.template operator()<float, float>(); break;
    case at::kHalf:
      if (f32) fn.template operator()<c10::Half, float>(); else fn.template operator()<c10::Half, c10::Half>();
      break;
    case at::kBFloat16:
      if (f32) fn.template operator()<c10::BFloat16, float>();
      else fn.template operator()<c10::BFloat16, c10::BFloat16>();
      break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", p);
  }
}

template <typename Fn>
void dispatch_p(at::ScalarType p, const char* op, Fn&& fn) {
  dispatch_pf(p, p, op, std::forward<Fn>(fn));
}

template <typename T>
std::vector<const T*> data_ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<const T*> out;
  for (const auto& t : ts) out.push_back(t.data_ptr<T>());
  return out;
}

at::Tensor new_output(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

// Runs body(begin, len) over [0, n) in blocks of at most kBlock elements, chunks of blocks in parallel.
template <typename Body>
void for_blocks(int64_t n, Body&& body) {
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; b += kBlock) body(b, std::min(kBlock, hi - b));
  });
}

void check_cpu(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got ", t.device());
}

// ---- weighted_sum: base + Σ w_i t_i ---------------------------------------------------------------
// `into`: the caller's output (the *_out ops), else a new tensor.
at::Tensor weighted_sum_impl(at::TensorList tensors, at::ArrayRef<double> weights, const c10::optional<at::Tensor>& base,
                             const at::Tensor* into) {
  constexpr const char* op = "weighted_sum";
  check_weighted_sum_args(tensors, weights, base);
  check_cpu(op, tensors[0]);
  const auto ins = contiguous_all(tensors);
  const at::Tensor b = base.has_value() ? base->contiguous() : at::Tensor();
  if (into) check_out(op, *into, ins[0]);
  at::Tensor out = into ? *into : new_output(ins[0]);
  const int m = static_cast<int>(ins.size());
  const std::vector<float> w(weights.begin(), weights.end());
  dispatch_p(out.scalar_type(), op, [&]<typename P, typename>() {
    const auto ptrs = data_ptrs<P>(ins);
    const P* bp = b.defined() ? b.data_ptr<P>() : nullptr;
    P* op_ = out.data_ptr<P>();
    for_blocks(out.numel(), [&](int64_t b0, int64_t len) {
      alignas(64) float acc[kBlock];
      if (bp) {
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) acc[e] = to_f(bp[b0 + e]);
      } else {
        std::fill(acc, acc + len, 0.f);
      }
      for (int i = 0; i < m; ++i) {
        const P* x = ptrs[i] + b0;
        const float wi = w[i];
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) acc[e] += wi * to_f(x[e]);
      }
#pragma omp simd
      for (int64_t e = 0; e < len; ++e) op_[b0 + e] = from_f<P>(acc[e]);
    });
  });
  return out;
}

// ---- fisher_merge: Σ λ_i F_i θ_i / Σ λ_i F_i with a zero-Fisher fallback ----------------------------
at::Tensor fisher_merge_impl(at::TensorList params, at::TensorList fishers, at::ArrayRef<double> weights, double eps,
                             c10::string_view fallback, const at::Tensor* into) {
  constexpr const char* op = "fisher_merge";
  check_fisher_merge_args(params, fishers, weights, eps);
  check_cpu(op, params[0]);
  const Fallback fb = parse_fallback(op, fallback);
  const auto ps = contiguous_all(params);
  const auto fs = contiguous_all(fishers);
  if (into) check_out(op, *into, ps[0]);
  at::Tensor out = into ? *into : new_output(ps[0]);
  const int m = static_cast<int>(ps.size());
  const std::vector<float> w(weights.begin(), weights.end());
  double wsum_d = 0;
  for (double x : weights) wsum_d += x;
  const float wsum = static_cast<float>(wsum_d);
  const float feps = static_cast<float>(eps);
  dispatch_pf(ps[0].scalar_type(), fs[0].scalar_type(), op, [&]<typename P, typename F>() {
    const auto pp = data_ptrs<P>(ps);
    const auto fp = data_ptrs<F>(fs);
    P* o = out.data_ptr<P>();
    for_blocks(out.numel(), [&](int64_t b0, int64_t len) {
      alignas(64) float num[kBlock], den[kBlock], wp[kBlock];
      std::fill(num, num + len, 0.f);
      std::fill(den, den + len, 0.f);
      for (int i = 0; i < m; ++i) {
        const P* x = pp[i] + b0;
        const F* f = fp[i] + b0;
        const float wi = w[i];
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) {
          const float wf = wi * to_f(f[e]);
          num[e] += wf * to_f(x[e]);
          den[e] += wf;
        }
      }
      if (fb == Fallback::Target) {
        const P* x0 = pp[0] + b0;  // re-read from cache: the block was just streamed
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) o[b0 + e] = from_f<P>(fisher_finish(num[e], den[e], feps, to_f(x0[e])));
      } else {
        std::fill(wp, wp + len, 0.f);
        for (int i = 0; i < m; ++i) {
          const P* x = pp[i] + b0;
          const float wi = w[i];
#pragma omp simd
          for (int64_t e = 0; e < len; ++e) wp[e] += wi * to_f(x[e]);
        }
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) o[b0 + e] = from_f<P>(fisher_finish(num[e], den[e], feps, wp[e] / wsum));
      }
    });
  });
  return out;
}

// ---- dfmerge_combine: θ_pre + M Σ F_i λ_i τ_i / Σ F_i, else θ_pre + Σ λ_i τ_i ------------------------
at::Tensor dfmerge_combine_impl(const at::Tensor& pretrained, at::TensorList task_vectors, at::TensorList fishers,
                                at::ArrayRef<double> lambdas, double eps, const at::Tensor* into) {
  constexpr const char* op = "dfmerge_combine";
  check_dfmerge_combine_args(pretrained, task_vectors, fishers, lambdas, eps);
  check_cpu(op, pretrained);
  const at::Tensor pre = pretrained.contiguous();
  const auto ts = contiguous_all(task_vectors);
  const auto fs = contiguous_all(fishers);
  if (into) check_out(op, *into, pre);
  at::Tensor out = into ? *into : new_output(pre);
  const int m = static_cast<int>(ts.size());
  const float mf = static_cast<float>(m);
  const std::vector<float> lam(lambdas.begin(), lambdas.end());
  const float feps = static_cast<float>(eps);
  dispatch_pf(pre.scalar_type(), fs[0].scalar_type(), op, [&]<typename P, typename F>() {
    const auto tp = data_ptrs<P>(ts);
    const auto fp = data_ptrs<F>(fs);
    const P* prep = pre.data_ptr<P>();
    P* o = out.data_ptr<P>();
    for_blocks(out.numel(), [&](int64_t b0, int64_t len) {
      alignas(64) float num[kBlock], den[kBlock], plain[kBlock];
      std::fill(num, num + len, 0.f);
      std::fill(den, den + len, 0.f);
      std::fill(plain, plain + len, 0.f);
      for (int i = 0; i < m; ++i) {
        const P* t = tp[i] + b0;
        const F* f = fp[i] + b0;
        const float li = lam[i];
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) {
          const float lt = li * to_f(t[e]);
          const float ff = to_f(f[e]);
          num[e] += ff * lt;
          den[e] += ff;
          plain[e] += lt;
        }
      }
#pragma omp simd
      for (int64_t e = 0; e < len; ++e)
        o[b0 + e] = from_f<P>(dfmerge_finish(to_f(prep[b0 + e]), num[e], den[e], plain[e], mf, feps));
    });
  });
  return out;
}

// ---- ties_merge: trim (selection), elect sign, disjoint mean ---------------------------------------
// Magnitude as an ordered key: the bits of |x| (non-negative floats order like their bit patterns); NaN -> +inf.
template <typename P>
inline uint32_t magnitude_key(P x) {
  const uint32_t u = f_bits(to_f(x)) & 0x7fffffffu;
  return u > 0x7f800000u ? 0x7f800000u : u;
}

// The k-th largest |t| by a two-pass radix select (O(n) selection, not a sort, and no copy of the tensor):
// histogram the keys' high 16 bits, find the bin holding the k-th largest, then histogram the low 16 bits of
// the keys in that bin. Chunks of the tensor count into their own histograms in parallel.
template <typename P>
float kth_largest_magnitude(const P* t, int64_t n, int64_t k) {
  constexpr int64_t kBins = int64_t{1} << 16;
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain));
  chunks = std::max<int64_t>(chunks, (n >> 31) + 1);  // uint32 counts per chunk
  std::vector<uint32_t> hist(static_cast<size_t>(chunks * kBins));
  auto count = [&](bool low_pass, uint32_t high) {
    std::fill(hist.begin(), hist.end(), 0u);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        uint32_t* h = hist.data() + c * kBins;
        const int64_t lo = n / chunks * c + std::min(c, n % chunks);
        const int64_t hi = lo + n / chunks + (c < n % chunks ? 1 : 0);
        if (!low_pass) {
          for (int64_t e = lo; e < hi; ++e) ++h[magnitude_key(t[e]) >> 16];
        } else {
          for (int64_t e = lo; e < hi; ++e) {
            const uint32_t key = magnitude_key(t[e]);
            if ((key >> 16) == high) ++h[key & 0xffffu];
          }
        }
      }
    });
  };
  // Walks the bins from the top; returns the bin holding the k-th largest and leaves k as its rank inside it.
  auto find = [&](int64_t& kk) -> uint32_t {
    for (int64_t b = kBins - 1; b >= 0; --b) {
      int64_t cnt = 0;
      for (int64_t c = 0; c < chunks; ++c) cnt += hist[c * kBins + b];
      if (cnt >= kk) return static_cast<uint32_t>(b);
      kk -= cnt;
    }
    return 0;
  };
  int64_t kk = k;
  count(false, 0);
  const uint32_t high = find(kk);
  count(true, high);
  const uint32_t low = find(kk);
  return bits_f((high << 16) | low);
}

at::Tensor ties_merge_cpu(const at::Tensor& pretrained, at::TensorList task_vectors, double density, double lam) {
  constexpr const char* op = "ties_merge";
  check_ties_merge_args(pretrained, task_vectors, density);
  check_cpu(op, pretrained);
  const at::Tensor pre = pretrained.contiguous();
  const auto ts = contiguous_all(task_vectors);
  at::Tensor out = new_output(pre);
  const int64_t n = out.numel();
  if (n == 0) return out;
  const int m = static_cast<int>(ts.size());
  const int64_t k = ties_keep_count(n, density);
  const float flam = static_cast<float>(lam);
  dispatch_p(pre.scalar_type(), op, [&]<typename P, typename>() {
    const auto tp = data_ptrs<P>(ts);
    float thr[kMaxModels];
    for (int i = 0; i < m; ++i) thr[i] = kth_largest_magnitude(tp[i], n, k);
    const P* prep = pre.data_ptr<P>();
    P* o = out.data_ptr<P>();
    // Elect and disjoint-merge in blocks, model by model (vectorised), as ties_disjoint_mean does per element.
    for_blocks(n, [&](int64_t b0, int64_t len) {
      alignas(64) float total[kBlock], acc[kBlock], cnt[kBlock];
      std::fill(total, total + len, 0.f);
      for (int i = 0; i < m; ++i) {
        const P* t = tp[i] + b0;
        const float th = thr[i];
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) total[e] += ties_trim(to_f(t[e]), th);
      }
      std::fill(acc, acc + len, 0.f);
      std::fill(cnt, cnt + len, 0.f);
      for (int i = 0; i < m; ++i) {
        const P* t = tp[i] + b0;
        const float th = thr[i];
#pragma omp simd
        for (int64_t e = 0; e < len; ++e) {
          const float v = ties_trim(to_f(t[e]), th);
          const bool agree = ties_agrees(total[e], v);
          acc[e] += agree ? v : 0.f;
          cnt[e] += agree ? 1.f : 0.f;
        }
      }
#pragma omp simd
      for (int64_t e = 0; e < len; ++e) o[b0 + e] = from_f<P>(to_f(prep[b0 + e]) + flam * ties_mean(acc[e], cnt[e]));
    });
  });
  return out;
}

// ---- dare: drop with probability p (counter-based hash of (seed, index)), rescale by 1/(1-p) ----------
at::Tensor dare_cpu(const at::Tensor& task_vector, double p, int64_t seed) {
  constexpr const char* op = "dare";
  check_dare_args(task_vector, p);
  check_cpu(op, task_vector);
  const at::Tensor t = task_vector.contiguous();
  at::Tensor out = new_output(t);
  const uint64_t key = dare_key(seed);
  const uint32_t threshold = dare_threshold(p);
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  dispatch_p(t.scalar_type(), op, [&]<typename P, typename>() {
    const P* x = t.data_ptr<P>();
    P* o = out.data_ptr<P>();
    at::parallel_for(0, out.numel(), kGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t e = lo; e < hi; ++e) o[e] = from_f<P>(dare_apply(to_f(x[e]), key, e, threshold, scale));
    });
  });
  return out;
}


// The functional ops return a new tensor; the *_out ops write into the caller's (reused) output, which spares
// the first-touch page faults of a fresh allocation on every call (they dominate large CPU merges).
at::Tensor weighted_sum_cpu(at::TensorList tensors, at::ArrayRef<double> weights, const c10::optional<at::Tensor>& base) {
  return weighted_sum_impl(tensors, weights, base, nullptr);
}
void weighted_sum_out_cpu(at::TensorList tensors, at::ArrayRef<double> weights, const c10::optional<at::Tensor>& base,
                          at::Tensor& out) {
  weighted_sum_impl(tensors, weights, base, &out);
}
at::Tensor fisher_merge_cpu(at::TensorList params, at::TensorList fishers, at::ArrayRef<double> weights, double eps,
                            c10::string_view fallback) {
  return fisher_merge_impl(params, fishers, weights, eps, fallback, nullptr);
}
void fisher_merge_out_cpu(at::TensorList params, at::TensorList fishers, at::ArrayRef<double> weights, double eps,
                          c10::string_view fallback, at::Tensor& out) {
  fisher_merge_impl(params, fishers, weights, eps, fallback, &out);
}
at::Tensor dfmerge_combine_cpu(const at::Tensor& pretrained, at::TensorList task_vectors, at::TensorList fishers,
                               at::ArrayRef<double> lambdas, double eps) {
  return dfmerge_combine_impl(pretrained, task_vectors, fishers, lambdas, eps, nullptr);
}
void dfmerge_combine_out_cpu(const at::Tensor& pretrained, at::TensorList task_vectors, at::TensorList fishers,
                             at::ArrayRef<double> lambdas, double eps, at::Tensor& out) {
  dfmerge_combine_impl(pretrained, task_vectors, fishers, lambdas, eps, &out);
}

}  // namespace

TORCH_LIBRARY_IMPL(pymerge, CPU, m) {
  m.impl("weighted_sum_out", &weighted_sum_out_cpu);
  m.impl("fisher_merge_out", &fisher_merge_out_cpu);
  m.impl("dfmerge_combine_out", &dfmerge_combine_out_cpu);
  m.impl("weighted_sum", &weighted_sum_cpu);
  m.impl("fisher_merge", &fisher_merge_cpu);
  m.impl("dfmerge_combine", &dfmerge_combine_cpu);
  m.impl("ties_merge", &ties_merge_cpu);
  m.impl("dare", &dare_cpu);
}

}  // namespace pymerge
