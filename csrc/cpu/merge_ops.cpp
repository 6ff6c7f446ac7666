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
#include <memory>
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

constexpr uint32_t kInfKey = 0x7f800000u;  // magnitude key of +-inf and NaN

// f(i) for i in [0, count) on torch's intra-op threads, handed out one at a time (dynamic), not split into one
// contiguous share per thread as at::parallel_for does: on a shared machine (or beside the engine's reader
// thread) a descheduled thread's share is then taken over by the others instead of being waited for.
// Tensors under kTiesSerialBelow elements run on the calling thread alone: there a parallel region's start,
// barriers and the other threads' spinning cost more than the second core gives (and the engine's reader thread
// has a core to itself meanwhile).
constexpr int64_t kTiesSerialBelow = int64_t{1} << 20;

template <typename F>
void ties_parallel(int64_t count, int64_t n, const F& f) {
#ifdef _OPENMP
  const int nt = at::get_num_threads();
  if (count > 1 && nt > 1 && n >= kTiesSerialBelow && !at::in_parallel_region()) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t i = 0; i < count; ++i) f(i);
    return;
  }
#endif
  for (int64_t i = 0; i < count; ++i) f(i);
}

// The k-th largest magnitude key by an exact two-pass radix select over 16-bit digits (the fallback of the
// sampled selection below): histogram the keys' high 16 bits, find the bin holding the k-th largest, then
// histogram the low 16 bits of the keys in that bin. Chunks count into their own histograms in parallel.
uint32_t kth_key_radix(const cpu::KernelTable& kt, int dt, const void* t, const void* pre, int64_t n, int64_t k) {
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
        kt.ties_hist[dt](t, pre, lo, hi, pass, high, hist.data() + c * kBins);
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

// The k-th largest (1-based) of keys[0, len), in place.
uint32_t kth_largest_of(uint32_t* keys, int64_t len, int64_t k) {
  std::nth_element(keys, keys + (k - 1), keys + len, std::greater<uint32_t>());
  return keys[k - 1];
}

// The k-th largest of the keys in parts[j][0, lens[j]) (all in [klo, khi], multiples of 2^shift: bf16 keys have
// 16 zero low bits, fp16 keys 13). When that range holds few possible values (quantised data, such as bf16 task
// vectors, put many keys on each), they are counted in place (four interleaved histograms, so equal neighbours do
// not wait on each other's increments); otherwise they are gathered and selected.
uint32_t kth_largest_in_band(const std::vector<uint32_t*>& parts, const std::vector<int64_t>& lens, int64_t k,
                             uint32_t klo, uint32_t khi, int shift) {
  int64_t len = 0;
  for (int64_t l : lens) len += l;
  const uint32_t bins = ((khi - klo) >> shift) + 1;
  if (bins > (1u << 16) || static_cast<int64_t>(bins) * 4 > len) {
    uint32_t* at = parts[0];
    for (size_t j = 0; j < parts.size(); ++j) {
      if (parts[j] != at) std::memmove(at, parts[j], static_cast<size_t>(lens[j]) * sizeof(uint32_t));
      at += lens[j];
    }
    return kth_largest_of(parts[0], len, k);
  }
  std::vector<int64_t> count(4 * static_cast<size_t>(bins), 0);
  for (size_t j = 0; j < parts.size(); ++j) {
    const uint32_t* p = parts[j];
    const int64_t l = lens[j];
    int64_t e = 0;
    for (; e + 4 <= l; e += 4) {
      ++count[(p[e] - klo) >> shift];
      ++count[bins + ((p[e + 1] - klo) >> shift)];
      ++count[2 * bins + ((p[e + 2] - klo) >> shift)];
      ++count[3 * bins + ((p[e + 3] - klo) >> shift)];
    }
    for (; e < l; ++e) ++count[(p[e] - klo) >> shift];
  }
  for (int64_t b = bins - 1; b >= 0; --b) {
    const int64_t c = count[b] + count[bins + b] + count[2 * bins + b] + count[3 * bins + b];
    if (c >= k) return klo + (static_cast<uint32_t>(b) << shift);
    k -= c;
  }
  return klo;
}

// The thresholds (k-th largest magnitude keys) of every task vector, and whether any value was NaN / Inf.
//
// Small tensors: all keys, one selection. Larger ones: a strided sample of kSample keys brackets the k-th largest
// in a narrow band [klo, khi] (±~5 standard deviations of the sample quantile); one vectorised pass counts the
// keys above the band and keeps those inside it (about 2% of the tensor), and a selection among those gives the
// exact answer. If the band missed (it cannot for all but adversarial layouts), the exact radix select runs.
// One parallel pass over element chunks serves up to kGroup models (in the model form the chunk of pre is then
// read once and kept in cache); the per-model steps (sample, selection among the candidates) are serial.
// With pre (the model form) the keys are those of τ_i = t_i - pre, rounded to the storage type.
bool ties_thresholds(const cpu::KernelTable& kt, int dt, const std::vector<const void*>& tp, const void* pre,
                     int64_t n, int64_t k, uint32_t* thr) {
  constexpr int64_t kSample = 1 << 15;
  constexpr int kGroup = 4;
  const int m = static_cast<int>(tp.size());
  std::vector<uint8_t> bad(static_cast<size_t>(m), 0);
  if (n <= 4 * kSample) {
    std::unique_ptr<uint32_t[]> keys(new uint32_t[static_cast<size_t>(n)]);
    for (int i = 0; i < m; ++i) {
      kt.ties_keys[dt](tp[i], pre, 0, 1, n, keys.get());
      bad[i] = std::find(keys.get(), keys.get() + n, kInfKey) != keys.get() + n;
      thr[i] = kth_largest_of(keys.get(), n, k);
    }
    return std::find(bad.begin(), bad.end(), 1) != bad.end();
  }
  const int64_t stride = n / kSample;
  const double r = static_cast<double>(k) * kSample / static_cast<double>(n);  // expected rank in the sample
  const double half = 5.0 * std::sqrt(r * (1.0 - r / kSample) + 1.0) + 8.0;
  const int64_t r_hi = static_cast<int64_t>(std::floor(r - half)), r_lo = static_cast<int64_t>(std::ceil(r + half));
  std::vector<uint32_t> klo(static_cast<size_t>(m)), khi(static_cast<size_t>(m));
  std::vector<uint32_t> sample(static_cast<size_t>(kSample));
  for (int i = 0; i < m; ++i) {
    kt.ties_keys[dt](tp[i], pre, stride / 2, stride, kSample, sample.data());
    khi[i] = r_hi < 1 ? std::numeric_limits<uint32_t>::max() : kth_largest_of(sample.data(), kSample, r_hi);
    klo[i] = r_lo > kSample ? 0u : kth_largest_of(sample.data(), kSample, r_lo);
  }
  // Element chunks, each with its own candidate buffer per model: room for 8x the expected band (quantised values,
  // such as bf16 task vectors, put several times more keys in the band than the sample predicts; beyond that the
  // radix select runs). Left uninitialised, so only the pages the candidates fill are ever touched. Very large
  // tensors take one model per pass, so the buffers' address space stays below the tensor's own size.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64 * at::get_num_threads(), n / kGrain));
  const double band_frac = static_cast<double>(r_lo - r_hi) / kSample;
  const int64_t cap = std::min<int64_t>(n / chunks + 1, static_cast<int64_t>(8.0 * band_frac * (n / chunks)) + 4096);
  const int64_t slot = cap + 64;
  const int group = n > (int64_t{1} << 27) ? 1 : std::min(m, kGroup);
  const int shift = dt == cpu::kBF16 ? 16 : dt == cpu::kF16 ? 13 : 0;  // zero low bits of every key
  std::unique_ptr<uint32_t[]> cand(new uint32_t[static_cast<size_t>(group * chunks * slot)]);
  std::vector<cpu::BandResult> res(static_cast<size_t>(group * chunks));
  std::vector<int> radix;  // models whose band missed
  for (int g0 = 0; g0 < m; g0 += group) {
    const int g = std::min(group, m - g0);
    ties_parallel(chunks, n, [&](int64_t c) {
      const int64_t lo = n / chunks * c + std::min(c, n % chunks);
      const int64_t hi = lo + n / chunks + (c < n % chunks ? 1 : 0);
      for (int j = 0; j < g; ++j)
        res[j * chunks + c] = kt.ties_band[dt](tp[g0 + j], pre, lo, hi, klo[g0 + j], khi[g0 + j],
                                               cand.get() + (j * chunks + c) * slot, cap);
    });
    std::vector<uint8_t> miss(static_cast<size_t>(g), 0);
    {  // serial: on this small, shared machine a parallel region per step cost more in spinning than it saved
      for (int64_t j = 0; j < g; ++j) {
        const int i = g0 + static_cast<int>(j);
        int64_t above = 0, in_band = 0, stored = 0;
        for (int64_t c = 0; c < chunks; ++c) {
          const auto& x = res[j * chunks + c];
          above += x.above; in_band += x.in_band; stored += x.stored; bad[i] |= x.nonfinite > 0;
        }
        const bool bracketed = above < k && above + in_band >= k;
        if (bracketed && klo[i] == khi[i]) {  // one value fills the band (quantised task vectors): the answer
          thr[i] = klo[i];
          continue;
        }
        if (!bracketed || stored != in_band) {
          miss[j] = 1;
          continue;
        }
        // Select among the chunks' candidates (counted in place, or gathered at the front of the buffer).
        std::vector<uint32_t*> parts;
        std::vector<int64_t> lens;
        for (int64_t c = 0; c < chunks; ++c) {
          parts.push_back(cand.get() + (j * chunks + c) * slot);
          lens.push_back(res[j * chunks + c].stored);
        }
        thr[i] = kth_largest_in_band(parts, lens, k - above, klo[i], khi[i], shift);
      }
    }
    for (int j = 0; j < g; ++j)
      if (miss[j]) radix.push_back(g0 + j);
  }
  for (int i : radix) thr[i] = kth_key_radix(kt, dt, tp[i], pre, n, k);
  return std::find(bad.begin(), bad.end(), 1) != bad.end();
}

// check_finite: names the first input holding a NaN or Inf (the list in order, then pretrained), as the
// Python wrapper and the engine expect ("ties_merge: models[2] contains NaN or Inf"). Runs only after a pass
// saw a non-finite value (a model form difference can also overflow to Inf from finite inputs: no error then).
void ties_raise_nonfinite(const at::Tensor& pre, const std::vector<at::Tensor>& ts, bool models) {
  for (size_t i = 0; i < ts.size(); ++i)
    TORCH_CHECK_VALUE(at::isfinite(ts[i]).all().item<bool>(), "ties_merge: ", models ? "models" : "task_vectors",
                      "[", i, "] contains NaN or Inf");
  TORCH_CHECK_VALUE(at::isfinite(pre).all().item<bool>(), "ties_merge: pretrained contains NaN or Inf");
}

at::Tensor ties_merge_cpu(const at::Tensor& pretrained, at::TensorList task_vectors, double density, double lam,
                          bool models, bool check_finite) {
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
  uint32_t keys[kMaxModels];
  const bool seen_nonfinite = ties_thresholds(kt, dt, tp, models ? pre.data_ptr() : nullptr, n, k, keys);
  if (check_finite && seen_nonfinite) ties_raise_nonfinite(pre, ts, models);
  float thr[kMaxModels];
  for (int i = 0; i < m; ++i) thr[i] = bits_f(keys[i]);
  int pre_nonfinite = 0;
  const cpu::TiesArgs args{pre.data_ptr(), tp.data(), m, thr, static_cast<float>(lam), out.data_ptr(),
                           models, check_finite, &pre_nonfinite};
  const int64_t pieces = (n + kGrain - 1) / kGrain;
  ties_parallel(pieces, n, [&](int64_t c) { kt.ties_merge[dt](&args, c * kGrain, std::min(n, (c + 1) * kGrain)); });
  if (check_finite && pre_nonfinite) ties_raise_nonfinite(pre, ts, models);
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
