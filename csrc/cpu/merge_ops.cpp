// CPU glue of the fused merge ops: argument checks, outputs, parallel chunks, and the choice of kernels.
// The kernels themselves (csrc/cpu/merge_kernels.h) are compiled for the base instruction set, AVX2 and
// AVX-512; the best one the running CPU supports is used (PYMERGE_CPU_ISA=base|avx2|avx512|avx512bf16 caps the
// choice, which the tests use to check every compiled variant against the references). Each reads every input element
// once and writes the output once; TIES adds one selection pass per task vector.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "kernel_table.h"
#include "pymerge/merge_math.h"
#include "pymerge/op_checks.h"

namespace pymerge {
namespace {

constexpr int64_t kGrain = 1 << 16;  // elements per parallel task

bool cpu_has(const char* isa) {
#if defined(__GNUC__) && defined(__x86_64__)
  if (std::strcmp(isa, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi2");
  if (std::strcmp(isa, "avx512") == 0)
    return cpu_has("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (std::strcmp(isa, "avx512bf16") == 0) return cpu_has("avx512") && __builtin_cpu_supports("avx512bf16");
#endif
  return false;
}

// The kernels to run: the widest compiled-in instruction set the CPU has, at most PYMERGE_CPU_ISA (read on
// every call, so tests can switch; a getenv is nothing next to a merge).
// avx512bf16 is the AVX-512 table plus AVX512_BF16's conversion where a kernel has a use for it (dare).
std::string isa_cap() {
  const char* cap = std::getenv("PYMERGE_CPU_ISA");
  const std::string c = cap ? cap : "";
  TORCH_CHECK(c.empty() || c == "base" || c == "avx2" || c == "avx512" || c == "avx512bf16",
              "PYMERGE_CPU_ISA must be base, avx2, avx512 or avx512bf16, got '", c, "'");
  return c;
}

const cpu::KernelTable& kernels() {
  static const cpu::KernelTable* avx512 = cpu_has("avx512") ? cpu::kernels_avx512() : nullptr;
  static const cpu::KernelTable* avx2 = cpu_has("avx2") ? cpu::kernels_avx2() : nullptr;
  const std::string c = isa_cap();
  if (avx512 && (c.empty() || c == "avx512" || c == "avx512bf16")) return *avx512;
  if (avx2 && c != "base") return *avx2;
  return *cpu::kernels_base();
}

bool native_bf16() {
  static const bool has = cpu_has("avx512bf16") && cpu::kernels_avx512() != nullptr;
  const std::string c = isa_cap();
  return has && (c.empty() || c == "avx512bf16");
}

int dtype_index(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cpu::kF32;
    case at::kHalf: return cpu::kF16;
    case at::kBFloat16: return cpu::kBF16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
  return 0;
}

std::vector<const void*> data_ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<const void*> out;
  for (const auto& t : ts) out.push_back(t.data_ptr());
  return out;
}

at::Tensor new_output(const at::Tensor& like) {
  return at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
}

// fn(args, lo, hi) over [0, n) in parallel chunks.
void run_chunks(cpu::ChunkFn fn, const void* args, int64_t n) {
  if (n == 0) return;
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) { fn(args, lo, hi); });
}

void check_cpu(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got ", t.device());
}

// ---- weighted_sum: base + Σ w_i t_i ---------------------------------------------------------------
// `into`: the caller's output (the *_out ops), else a new tensor.
at::Tensor weighted_sum_impl(at::TensorList tensors, c10::optional<at::ArrayRef<double>> weights_or_none,
                             const c10::optional<at::Tensor>& base, const at::Tensor* into) {
  constexpr const char* op = "weighted_sum";
  const std::vector<double> weights = resolve_weights(op, weights_or_none, tensors.size());
  check_weighted_sum_args(tensors, weights, base);
  check_cpu(op, tensors[0]);
  const auto ins = contiguous_all(tensors);
  const at::Tensor b = base.has_value() ? base->contiguous() : at::Tensor();
  if (into) check_out(op, *into, ins[0]);
  at::Tensor out = into ? *into : new_output(ins[0]);
  const std::vector<float> w(weights.begin(), weights.end());
  const auto ptrs = data_ptrs(ins);
  const cpu::WeightedSumArgs args{ptrs.data(), static_cast<int>(ins.size()), w.data(),
                                  b.defined() ? b.data_ptr() : nullptr, out.data_ptr()};
  run_chunks(kernels().weighted_sum[dtype_index(out.scalar_type(), op)], &args, out.numel());
  return out;
}

// ---- fisher_merge: Σ λ_i F_i θ_i / Σ λ_i F_i with a zero-Fisher fallback ----------------------------
at::Tensor fisher_merge_impl(at::TensorList params, at::TensorList fishers, c10::optional<at::ArrayRef<double>> weights_or_none,
                             double eps, c10::string_view fallback, const at::Tensor* into) {
  constexpr const char* op = "fisher_merge";
  const std::vector<double> weights = resolve_weights(op, weights_or_none, params.size());
  check_fisher_merge_args(params, fishers, weights, eps);
  check_cpu(op, params[0]);
  const Fallback fb = parse_fallback(op, fallback);
  const auto ps = contiguous_all(params);
  const auto fs = contiguous_all(fishers);
  if (into) check_out(op, *into, ps[0]);
  at::Tensor out = into ? *into : new_output(ps[0]);
  const std::vector<float> w(weights.begin(), weights.end());
  double wsum = 0;
  for (double x : weights) wsum += x;
  const auto pp = data_ptrs(ps);
  const auto fp = data_ptrs(fs);
  const cpu::FisherArgs args{pp.data(), fp.data(), static_cast<int>(ps.size()), w.data(), static_cast<float>(wsum),
                             static_cast<float>(eps), fb == Fallback::Average, out.data_ptr()};
  const int pd = dtype_index(ps[0].scalar_type(), op);
  const int fd = fs[0].scalar_type() == ps[0].scalar_type() ? cpu::kSame : cpu::kF32Fisher;
  run_chunks(kernels().fisher_merge[pd][fd], &args, out.numel());
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
  const std::vector<float> lam(lambdas.begin(), lambdas.end());
  const auto tp = data_ptrs(ts);
  const auto fp = data_ptrs(fs);
  const int m = static_cast<int>(ts.size());
  const cpu::DfmergeArgs args{pre.data_ptr(), tp.data(), fp.data(), m, lam.data(), static_cast<float>(m),
                              static_cast<float>(eps), out.data_ptr()};
  const int pd = dtype_index(pre.scalar_type(), op);
  const int fd = fs[0].scalar_type() == pre.scalar_type() ? cpu::kSame : cpu::kF32Fisher;
  run_chunks(kernels().dfmerge_combine[pd][fd], &args, out.numel());
  return out;
}

// ---- ties_merge: trim (selection), elect sign, disjoint mean ---------------------------------------
inline float bits_f(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }

// The k-th largest magnitude key by an exact two-pass radix select over 16-bit digits (the fallback of the
// sampled selection below): histogram the keys' high 16 bits, find the bin holding the k-th largest, then
// histogram the low 16 bits of the keys in that bin. Chunks count into their own histograms in parallel.
uint32_t kth_key_radix(const cpu::KernelTable& kt, int dt, const void* t, int64_t n, int64_t k) {
  constexpr int64_t kBins = int64_t{1} << 16;
  int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain));
  chunks = std::max<int64_t>(chunks, (n >> 31) + 1);  // uint32 counts per chunk
  std::vector<uint32_t> hist(static_cast<size_t>(chunks * kBins));
  auto count = [&](int pass, uint32_t high) {
    std::fill(hist.begin(), hist.end(), 0u);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t lo = n / chunks * c + std::min(c, n % chunks);
        const int64_t hi = lo + n / chunks + (c < n % chunks ? 1 : 0);
        kt.ties_hist[dt](t, lo, hi, pass, high, hist.data() + c * kBins);
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
  count(0, 0);
  const uint32_t high = find(kk);
  if (dt == cpu::kBF16) return high << 16;  // bf16 keys have no low bits: every key in the bin is this one
  count(1, high);
  const uint32_t low = find(kk);
  return (high << 16) | low;
}

// The k-th largest (1-based) of keys, in place.
uint32_t kth_largest_of(std::vector<uint32_t>& keys, int64_t k) {
  std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<uint32_t>());
  return keys[k - 1];
}

// The k-th largest magnitude key of t by sampling: a strided sample of kSample keys brackets the k-th largest
// in a narrow band [klo, khi] (±~5 standard deviations of the sample quantile); one vectorised pass counts the
// keys above the band and keeps those inside it (about 2% of the tensor), and a selection among those gives the
// exact answer. If the band missed (it cannot for all but adversarial layouts), the exact radix select runs.
// Cost: one read of t plus a sample, instead of two full histogram passes with scattered increments.
uint32_t kth_key(const cpu::KernelTable& kt, int dt, const void* t, int64_t n, int64_t k) {
  constexpr int64_t kSample = 1 << 15;
  if (n <= 4 * kSample) {
    std::vector<uint32_t> keys(static_cast<size_t>(n));
    kt.ties_keys[dt](t, 0, 1, n, keys.data());
    return kth_largest_of(keys, k);
  }
  const int64_t stride = n / kSample;
  std::vector<uint32_t> sample(static_cast<size_t>(kSample));
  kt.ties_keys[dt](t, stride / 2, stride, kSample, sample.data());
  const double r = static_cast<double>(k) * kSample / static_cast<double>(n);  // expected rank in the sample
  const double half = 5.0 * std::sqrt(r * (1.0 - r / kSample) + 1.0) + 8.0;
  const int64_t r_hi = static_cast<int64_t>(std::floor(r - half)), r_lo = static_cast<int64_t>(std::ceil(r + half));
  const uint32_t khi = r_hi < 1 ? std::numeric_limits<uint32_t>::max() : kth_largest_of(sample, r_hi);
  const uint32_t klo = r_lo > kSample ? 0u : kth_largest_of(sample, r_lo);
  // Parallel chunks, each with its own candidate buffer (capacity: 4x the expected band, at least 4096).
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(4 * at::get_num_threads(), n / kGrain));
  const double band_frac = static_cast<double>(r_lo - r_hi) / kSample;
  const int64_t cap = static_cast<int64_t>(4.0 * band_frac * static_cast<double>(n) / chunks) + 4096;
  std::vector<uint32_t> cand(static_cast<size_t>(chunks * (cap + 64)));
  std::vector<cpu::BandResult> res(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = n / chunks * c + std::min(c, n % chunks);
      const int64_t hi = lo + n / chunks + (c < n % chunks ? 1 : 0);
      res[c] = kt.ties_band[dt](t, lo, hi, klo, khi, cand.data() + c * (cap + 64), cap);
    }
  });
  int64_t above = 0, in_band = 0, stored = 0;
  for (const auto& x : res) { above += x.above; in_band += x.in_band; stored += x.stored; }
  const bool bracketed = above < k && above + in_band >= k;
  if (bracketed && klo == khi) return klo;  // one value fills the band (quantised task vectors): it is the answer
  if (!bracketed || stored != in_band) return kth_key_radix(kt, dt, t, n, k);
  // Gather the chunks' candidates at the front and select among them.
  int64_t at = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const uint32_t* src = cand.data() + c * (cap + 64);
    std::copy(src, src + res[c].stored, cand.begin() + at);
    at += res[c].stored;
  }
  cand.resize(static_cast<size_t>(at));
  return kth_largest_of(cand, k - above);
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
  const cpu::KernelTable& kt = kernels();
  const int dt = dtype_index(pre.scalar_type(), op);
  const auto tp = data_ptrs(ts);
  float thr[kMaxModels];
  for (int i = 0; i < m; ++i) thr[i] = bits_f(kth_key(kt, dt, tp[i], n, k));
  const cpu::TiesArgs args{pre.data_ptr(), tp.data(), m, thr, static_cast<float>(lam), out.data_ptr()};
  run_chunks(kt.ties_merge[dt], &args, n);
  return out;
}

// ---- dare: drop with probability p (counter-based hash of (seed, index)), rescale by 1/(1-p) ----------
at::Tensor dare_cpu(const at::Tensor& task_vector, double p, int64_t seed) {
  constexpr const char* op = "dare";
  check_dare_args(task_vector, p);
  check_cpu(op, task_vector);
  const at::Tensor t = task_vector.contiguous();
  at::Tensor out = new_output(t);
  const cpu::DareArgs args{t.data_ptr(), dare_key(seed), dare_threshold(p), static_cast<float>(1.0 / (1.0 - p)),
                           out.data_ptr(), native_bf16()};
  run_chunks(kernels().dare[dtype_index(t.scalar_type(), op)], &args, out.numel());
  return out;
}


// The functional ops return a new tensor; the *_out ops write into the caller's (reused) output, which spares
// the first-touch page faults of a fresh allocation on every call (they dominate large CPU merges).
at::Tensor weighted_sum_cpu(at::TensorList tensors, c10::optional<at::ArrayRef<double>> weights, const c10::optional<at::Tensor>& base) {
  return weighted_sum_impl(tensors, weights, base, nullptr);
}
void weighted_sum_out_cpu(at::TensorList tensors, c10::optional<at::ArrayRef<double>> weights, const c10::optional<at::Tensor>& base,
                          at::Tensor& out) {
  weighted_sum_impl(tensors, weights, base, &out);
}
at::Tensor fisher_merge_cpu(at::TensorList params, at::TensorList fishers, c10::optional<at::ArrayRef<double>> weights, double eps,
                            c10::string_view fallback) {
  return fisher_merge_impl(params, fishers, weights, eps, fallback, nullptr);
}
void fisher_merge_out_cpu(at::TensorList params, at::TensorList fishers, c10::optional<at::ArrayRef<double>> weights, double eps,
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
