// The CPU kernels of the merge ops, compiled once per instruction set: included by merge_kernels_base.cpp,
// merge_kernels_avx2.cpp and merge_kernels_avx512.cpp inside namespace pymerge::cpu::PYMERGE_ISA, after each
// has set its target (#pragma GCC target). Torch-free and without std:: templates in the kernels, so nothing
// compiled here can be shared with (and replace) a base-build copy at link time.
//
// The element-wise ops (weighted_sum, fisher_merge, dfmerge_combine) walk a chunk in blocks of kBlock elements
// with fp32 accumulators on the stack. Models are taken up to four at a time: one vectorised pass over the block
// reads four inputs and updates the accumulators once, so the accumulators (in L1) are loaded and stored once
// per four models rather than once per model; for M <= 4 they are written once and read once by the finishing
// pass. Accumulation order is model 0, 1, ..., as in the references of pymerge/ops.py.
#include <cstdint>

#include "pymerge/merge_math.h"
#include "kernel_table.h"

namespace {
// Storage types of the kernels: fp32 as is, fp16 / bf16 as their bits.
struct bf16_t { uint16_t x; };
struct f16_t { uint16_t x; };

constexpr int64_t kBlock = 1024;  // 4 KiB per fp32 accumulator: three of them stay in L1 with the input lines

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline uint32_t f_bits(float x) { uint32_t u; __builtin_memcpy(&u, &x, 4); return u; }
inline float bits_f(uint32_t u) { float x; __builtin_memcpy(&x, &u, 4); return x; }

// fp32 views of the storage types and back, branch-free (selects only) so the loops vectorise; c10's own
// conversions branch on NaN / subnormals, which stops the vectoriser. All round to nearest even. (GCC 12 does not
// vectorise _Float16 casts even with F16C; these bit-level conversions it does, 16 lanes at a time on AVX-512.)
inline float to_f(float x) { return x; }
inline float to_f(bf16_t x) { return bits_f(static_cast<uint32_t>(x.x) << 16); }
inline float to_f(f16_t x) {
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
template <> inline bf16_t from_f<bf16_t>(float x) {
  const uint32_t u = f_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return bf16_t{static_cast<uint16_t>(x != x ? 0x7fc0u : rounded)};
}
template <> inline f16_t from_f<f16_t>(float x) {
  // After F. Giesen's float_to_half_fast3_rtne, with its branches turned into selects.
  const uint32_t u = f_bits(x);
  const uint32_t sign = (u & 0x80000000u) >> 16;
  const uint32_t a = u & 0x7fffffffu;
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;                              // NaN / overflow -> Inf
  const float denorm_magic = bits_f(((127 - 15) + (23 - 10) + 1) << 23);
  const uint32_t sub = f_bits(bits_f(a) + denorm_magic) - f_bits(denorm_magic);         // subnormal or zero
  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;                    // rebias + round
  const uint32_t h = a >= 0x47800000u ? big : (a < 0x38800000u ? sub : normal);
  return f16_t{static_cast<uint16_t>(h | sign)};
}

// ---- vectorised fp16 / bf16 <-> fp32 (AVX2 / AVX-512 builds) ------------------------------------------
// fp16 goes through F16C's vcvtph2ps / vcvtps2ph (exact, round to nearest even: the same bits as the scalar
// code above, which GCC cannot vectorise well: ~15 integer ops per element). The element-wise kernels have explicit
// vector loops for fp16 (Direct: 16 lanes on AVX-512, 8 on AVX2); the scalar loops take the tails. bf16 stays with
// the compiler's vectorisation (a widening load and a shift; rounding back is a few integer ops): AVX512_BF16's
// vcvtneps2bf16 flushes subnormal results to zero, which torch does not, so only DARE uses it, with an exact
// fallback (dare_steps_bf16_native).
template <typename P> struct Direct { static constexpr bool value = false; };
#if defined(PYMERGE_AVX512) || defined(PYMERGE_AVX2)
template <> struct Direct<f16_t> { static constexpr bool value = true; };  // explicit vector loops (vload / vstore)
#endif

#if defined(PYMERGE_AVX512)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16_t* p) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
inline __m512 load16(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(bf16_t* p, __m512 x) {  // as from_f<bf16_t>: round to nearest even, NaN -> 0x7fc0
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i h = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(h));
}
inline void store16(f16_t* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

#if defined(PYMERGE_AVX2)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
inline __m256 load8(const f16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void store8(float* p, __m256 x) { _mm256_storeu_ps(p, x); }
inline void store8(bf16_t* p, __m256 x) {  // as from_f<bf16_t>: round to nearest even, NaN -> 0x7fc0
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  const __m256i h = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);  // 8 words in the low half
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void store8(f16_t* p, __m256 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

// The explicit fp16 loops (Direct) over one vector type: 16 lanes on AVX-512, 8 on AVX2.
#if defined(PYMERGE_AVX512)
#define PYMERGE_VEC 1
using vf = __m512;
constexpr int64_t kW = 16;
template <typename T> inline vf vload(const T* p) { return load16(p); }
template <typename T> inline void vstore(T* p, vf x) { store16(p, x); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline __mmask16 vgt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }  // false for NaN, as a > b
inline vf vselect(__mmask16 m, vf yes, vf no) { return _mm512_mask_blend_ps(m, no, yes); }
#elif defined(PYMERGE_AVX2)
#define PYMERGE_VEC 1
using vf = __m256;
constexpr int64_t kW = 8;
template <typename T> inline vf vload(const T* p) { return load8(p); }
template <typename T> inline void vstore(T* p, vf x) { store8(p, x); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vgt(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
inline vf vselect(vf m, vf yes, vf no) { return _mm256_blendv_ps(no, yes, m); }
#endif

// fp32 values back to fp16 (the Direct loops' finishing pass of weighted_sum with M > 4).
inline void store_block(f16_t* dst, const float* src, int64_t len) {
  int64_t e = 0;
#if defined(PYMERGE_AVX512)
  for (; e + 16 <= len; e += 16) store16(dst + e, _mm512_loadu_ps(src + e));
#elif defined(PYMERGE_AVX2)
  for (; e + 8 <= len; e += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + e),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; e < len; ++e) dst[e] = from_f<f16_t>(src[e]);
}
inline void store_block(float*, const float*, int64_t) {}
inline void store_block(bf16_t*, const float*, int64_t) {}

// |x| as an ordered key: the bits of |x| (non-negative floats order like their bit patterns); NaN -> +inf.
inline uint32_t key_bits(uint32_t abs_bits) { return abs_bits > 0x7f800000u ? 0x7f800000u : abs_bits; }
inline uint32_t magnitude_key(float x) { return key_bits(f_bits(x) & 0x7fffffffu); }
inline uint32_t magnitude_key(bf16_t x) { return key_bits(static_cast<uint32_t>(x.x & 0x7fffu) << 16); }
inline uint32_t magnitude_key(f16_t x) { return magnitude_key(to_f(x)); }

// ---- weighted_sum: base + Σ w_i t_i ---------------------------------------------------------------
enum Init { kFromAcc, kZero, kFromBase };

// One group of G models over [b0, b0 + len). OUT: the group is the only one (M <= 4), so it writes the output
// directly (o, already offset by b0) and the accumulators are never touched: no second pass over the block.
template <int G, Init I, bool OUT, typename P>
inline void ws_group(const P* const* x, const float* w, const P* base, int64_t b0, int64_t len, float* acc, P* o) {
  const P* x0 = x[0] + b0; const P* x1 = x[G > 1 ? 1 : 0] + b0;
  const P* x2 = x[G > 2 ? 2 : 0] + b0; const P* x3 = x[G > 3 ? 3 : 0] + b0;
  const float w0 = w[0], w1 = G > 1 ? w[1] : 0.f, w2 = G > 2 ? w[2] : 0.f, w3 = G > 3 ? w[3] : 0.f;
  const P* bp = base ? base + b0 : nullptr;
  int64_t e0 = 0;
#if defined(PYMERGE_VEC)
  if constexpr (Direct<P>::value) {  // kW lanes at a time; the scalar loop below takes the tail
    const vf v0 = vset1(w0), v1 = vset1(w1), v2 = vset1(w2), v3 = vset1(w3);
    for (; e0 + kW <= len; e0 += kW) {
      vf a = vset1(0.f);
      if constexpr (I == kFromAcc) a = vload(acc + e0);
      if constexpr (I == kFromBase) a = vload(bp + e0);
      a = vfmadd(v0, vload(x0 + e0), a);
      if constexpr (G > 1) a = vfmadd(v1, vload(x1 + e0), a);
      if constexpr (G > 2) a = vfmadd(v2, vload(x2 + e0), a);
      if constexpr (G > 3) a = vfmadd(v3, vload(x3 + e0), a);
      if constexpr (OUT) vstore(o + e0, a);
      else vstore(acc + e0, a);
    }
  }
#endif
#pragma omp simd
  for (int64_t e = e0; e < len; ++e) {
    float a = I == kFromAcc ? acc[e] : (I == kFromBase ? to_f(bp[e]) : 0.f);
    a += w0 * to_f(x0[e]);
    if constexpr (G > 1) a += w1 * to_f(x1[e]);
    if constexpr (G > 2) a += w2 * to_f(x2[e]);
    if constexpr (G > 3) a += w3 * to_f(x3[e]);
    if constexpr (OUT) o[e] = from_f<P>(a);
    else acc[e] = a;
  }
}

template <Init I, bool OUT, typename P>
inline void ws_any(int g, const P* const* x, const float* w, const P* base, int64_t b0, int64_t len, float* acc,
                   P* o) {
  switch (g) {
    case 4: ws_group<4, I, OUT>(x, w, base, b0, len, acc, o); break;
    case 3: ws_group<3, I, OUT>(x, w, base, b0, len, acc, o); break;
    case 2: ws_group<2, I, OUT>(x, w, base, b0, len, acc, o); break;
    default: ws_group<1, I, OUT>(x, w, base, b0, len, acc, o); break;
  }
}

template <typename P>
void weighted_sum_chunk(const void* args, int64_t lo, int64_t hi) {
  const auto& a = *static_cast<const pymerge::cpu::WeightedSumArgs*>(args);
  const P* const* x = reinterpret_cast<const P* const*>(a.in);
  const P* base = static_cast<const P*>(a.base);
  P* out = static_cast<P*>(a.out);
  alignas(64) float acc[kBlock];
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t len = min64(kBlock, hi - b0);
    P* o = out + b0;
    if (a.m <= 4) {  // one group: straight to the output
      if (base) ws_any<kFromBase, true>(a.m, x, a.w, base, b0, len, acc, o);
      else ws_any<kZero, true>(a.m, x, a.w, base, b0, len, acc, o);
      continue;
    }
    for (int i = 0; i < a.m; i += 4) {
      const int g = a.m - i < 4 ? a.m - i : 4;
      if (i > 0) ws_any<kFromAcc, false>(g, x + i, a.w + i, base, b0, len, acc, o);
      else if (base) ws_any<kFromBase, false>(g, x + i, a.w + i, base, b0, len, acc, o);
      else ws_any<kZero, false>(g, x + i, a.w + i, base, b0, len, acc, o);
    }
    if constexpr (Direct<P>::value) {
      store_block(o, acc, len);
    } else {
#pragma omp simd
      for (int64_t e = 0; e < len; ++e) o[e] = from_f<P>(acc[e]);
    }
  }
}

// ---- fisher_merge: Σ λ_i F_i θ_i / Σ λ_i F_i with a zero-Fisher fallback ----------------------------
template <int G, bool FIRST, bool AVG, typename P, typename F>
inline void fisher_group(const P* const* x, const F* const* f, const float* w, int64_t b0, int64_t len, float* num,
                         float* den, float* wp) {
  const P* x0 = x[0] + b0; const P* x1 = x[G > 1 ? 1 : 0] + b0;
  const P* x2 = x[G > 2 ? 2 : 0] + b0; const P* x3 = x[G > 3 ? 3 : 0] + b0;
  const F* f0 = f[0] + b0; const F* f1 = f[G > 1 ? 1 : 0] + b0;
  const F* f2 = f[G > 2 ? 2 : 0] + b0; const F* f3 = f[G > 3 ? 3 : 0] + b0;
  const float w0 = w[0], w1 = G > 1 ? w[1] : 0.f, w2 = G > 2 ? w[2] : 0.f, w3 = G > 3 ? w[3] : 0.f;
  int64_t e0 = 0;
#if defined(PYMERGE_VEC)
  if constexpr (Direct<P>::value) {  // kW lanes at a time; the scalar loop below takes the tail
    const vf v0 = vset1(w0), v1 = vset1(w1), v2 = vset1(w2), v3 = vset1(w3);
    for (; e0 + kW <= len; e0 += kW) {
      vf n = vset1(0.f), d = vset1(0.f), p = vset1(0.f);
      if constexpr (!FIRST) { n = vload(num + e0); d = vload(den + e0); }
      if constexpr (!FIRST && AVG) p = vload(wp + e0);
      auto step = [&](const P* xg, const F* fg, vf wg) {
        const vf xv = vload(xg + e0), wf = vmul(wg, vload(fg + e0));
        n = vfmadd(wf, xv, n);
        d = vadd(d, wf);
        if constexpr (AVG) p = vfmadd(wg, xv, p);
      };
      step(x0, f0, v0);
      if constexpr (G > 1) step(x1, f1, v1);
      if constexpr (G > 2) step(x2, f2, v2);
      if constexpr (G > 3) step(x3, f3, v3);
      vstore(num + e0, n);
      vstore(den + e0, d);
      if constexpr (AVG) vstore(wp + e0, p);
    }
  }
#endif
#pragma omp simd
  for (int64_t e = e0; e < len; ++e) {
    float n = FIRST ? 0.f : num[e], d = FIRST ? 0.f : den[e], p = (FIRST || !AVG) ? 0.f : wp[e];
    {
      const float xv = to_f(x0[e]), wf = w0 * to_f(f0[e]);
      n += wf * xv; d += wf;
      if constexpr (AVG) p += w0 * xv;
    }
    if constexpr (G > 1) {
      const float xv = to_f(x1[e]), wf = w1 * to_f(f1[e]);
      n += wf * xv; d += wf;
      if constexpr (AVG) p += w1 * xv;
    }
    if constexpr (G > 2) {
      const float xv = to_f(x2[e]), wf = w2 * to_f(f2[e]);
      n += wf * xv; d += wf;
      if constexpr (AVG) p += w2 * xv;
    }
    if constexpr (G > 3) {
      const float xv = to_f(x3[e]), wf = w3 * to_f(f3[e]);
      n += wf * xv; d += wf;
      if constexpr (AVG) p += w3 * xv;
    }
    num[e] = n; den[e] = d;
    if constexpr (AVG) wp[e] = p;
  }
}

template <bool FIRST, bool AVG, typename P, typename F>
inline void fisher_any(int g, const P* const* x, const F* const* f, const float* w, int64_t b0, int64_t len,
                       float* num, float* den, float* wp) {
  switch (g) {
    case 4: fisher_group<4, FIRST, AVG>(x, f, w, b0, len, num, den, wp); break;
    case 3: fisher_group<3, FIRST, AVG>(x, f, w, b0, len, num, den, wp); break;
    case 2: fisher_group<2, FIRST, AVG>(x, f, w, b0, len, num, den, wp); break;
    default: fisher_group<1, FIRST, AVG>(x, f, w, b0, len, num, den, wp); break;
  }
}

template <typename P, typename F, bool AVG>
void fisher_blocks(const pymerge::cpu::FisherArgs& a, int64_t lo, int64_t hi) {
  const P* const* x = reinterpret_cast<const P* const*>(a.p);
  const F* const* f = reinterpret_cast<const F* const*>(a.f);
  P* out = static_cast<P*>(a.out);
  const float eps = a.eps, wsum = a.wsum;
  alignas(64) float num[kBlock], den[kBlock], wp[kBlock];
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t len = min64(kBlock, hi - b0);
    for (int i = 0; i < a.m; i += 4) {
      const int g = a.m - i < 4 ? a.m - i : 4;
      if (i == 0) fisher_any<true, AVG>(g, x, f, a.w, b0, len, num, den, wp);
      else fisher_any<false, AVG>(g, x + i, f + i, a.w + i, b0, len, num, den, wp);
    }
    P* o = out + b0;
    int64_t e0 = 0;
#if defined(PYMERGE_VEC)
    if constexpr (Direct<P>::value) {  // pymerge::fisher_finish, kW lanes at a time; the loops below take the tail
      const vf veps = vset1(eps), vwsum = vset1(wsum), one = vset1(1.f);
      const P* x0 = x[0] + b0;
      for (; e0 + kW <= len; e0 += kW) {
        const vf d = vload(den + e0);
        const auto use = vgt(d, veps);
        const vf q = vdiv(vload(num + e0), vselect(use, d, one));
        const vf fb = AVG ? vdiv(vload(wp + e0), vwsum) : vload(x0 + e0);
        vstore(o + e0, vselect(use, q, fb));
      }
    }
#endif
    if (e0 == len) continue;
    if constexpr (AVG) {
#pragma omp simd
      for (int64_t e = e0; e < len; ++e) o[e] = from_f<P>(pymerge::fisher_finish(num[e], den[e], eps, wp[e] / wsum));
    } else {
      const P* x0 = x[0] + b0;  // re-read from cache: the block was just streamed
#pragma omp simd
      for (int64_t e = e0; e < len; ++e) o[e] = from_f<P>(pymerge::fisher_finish(num[e], den[e], eps, to_f(x0[e])));
    }
  }
}

template <typename P, typename F>
void fisher_merge_chunk(const void* args, int64_t lo, int64_t hi) {
  const auto& a = *static_cast<const pymerge::cpu::FisherArgs*>(args);
  if (a.average) fisher_blocks<P, F, true>(a, lo, hi);
  else fisher_blocks<P, F, false>(a, lo, hi);
}

// ---- dfmerge_combine: θ_pre + M Σ F_i λ_i τ_i / Σ F_i, else θ_pre + Σ λ_i τ_i ------------------------
template <int G, bool FIRST, typename P, typename F>
inline void df_group(const P* const* t, const F* const* f, const float* lam, int64_t b0, int64_t len, float* num,
                     float* den, float* plain) {
  const P* t0 = t[0] + b0; const P* t1 = t[G > 1 ? 1 : 0] + b0;
  const P* t2 = t[G > 2 ? 2 : 0] + b0; const P* t3 = t[G > 3 ? 3 : 0] + b0;
  const F* f0 = f[0] + b0; const F* f1 = f[G > 1 ? 1 : 0] + b0;
  const F* f2 = f[G > 2 ? 2 : 0] + b0; const F* f3 = f[G > 3 ? 3 : 0] + b0;
  const float l0 = lam[0], l1 = G > 1 ? lam[1] : 0.f, l2 = G > 2 ? lam[2] : 0.f, l3 = G > 3 ? lam[3] : 0.f;
  int64_t e0 = 0;
#if defined(PYMERGE_VEC)
  if constexpr (Direct<P>::value) {  // kW lanes at a time; the scalar loop below takes the tail
    const vf v0 = vset1(l0), v1 = vset1(l1), v2 = vset1(l2), v3 = vset1(l3);
    for (; e0 + kW <= len; e0 += kW) {
      vf n = vset1(0.f), d = vset1(0.f), p = vset1(0.f);
      if constexpr (!FIRST) {
        n = vload(num + e0); d = vload(den + e0); p = vload(plain + e0);
      }
      auto step = [&](const P* tg, const F* fg, vf lg) {
        const vf lt = vmul(lg, vload(tg + e0)), ff = vload(fg + e0);
        n = vfmadd(ff, lt, n);
        d = vadd(d, ff);
        p = vadd(p, lt);
      };
      step(t0, f0, v0);
      if constexpr (G > 1) step(t1, f1, v1);
      if constexpr (G > 2) step(t2, f2, v2);
      if constexpr (G > 3) step(t3, f3, v3);
      vstore(num + e0, n);
      vstore(den + e0, d);
      vstore(plain + e0, p);
    }
  }
#endif
#pragma omp simd
  for (int64_t e = e0; e < len; ++e) {
    float n = FIRST ? 0.f : num[e], d = FIRST ? 0.f : den[e], p = FIRST ? 0.f : plain[e];
    {
      const float lt = l0 * to_f(t0[e]), ff = to_f(f0[e]);
      n += ff * lt; d += ff; p += lt;
    }
    if constexpr (G > 1) {
      const float lt = l1 * to_f(t1[e]), ff = to_f(f1[e]);
      n += ff * lt; d += ff; p += lt;
    }
    if constexpr (G > 2) {
      const float lt = l2 * to_f(t2[e]), ff = to_f(f2[e]);
      n += ff * lt; d += ff; p += lt;
    }
    if constexpr (G > 3) {
      const float lt = l3 * to_f(t3[e]), ff = to_f(f3[e]);
      n += ff * lt; d += ff; p += lt;
    }
    num[e] = n; den[e] = d; plain[e] = p;
  }
}

template <bool FIRST, typename P, typename F>
inline void df_any(int g, const P* const* t, const F* const* f, const float* lam, int64_t b0, int64_t len,
                   float* num, float* den, float* plain) {
  switch (g) {
    case 4: df_group<4, FIRST>(t, f, lam, b0, len, num, den, plain); break;
    case 3: df_group<3, FIRST>(t, f, lam, b0, len, num, den, plain); break;
    case 2: df_group<2, FIRST>(t, f, lam, b0, len, num, den, plain); break;
    default: df_group<1, FIRST>(t, f, lam, b0, len, num, den, plain); break;
  }
}

template <typename P, typename F>
void dfmerge_combine_chunk(const void* args, int64_t lo, int64_t hi) {
  const auto& a = *static_cast<const pymerge::cpu::DfmergeArgs*>(args);
  const P* const* t = reinterpret_cast<const P* const*>(a.t);
  const F* const* f = reinterpret_cast<const F* const*>(a.f);
  const P* pre = static_cast<const P*>(a.pre);
  P* out = static_cast<P*>(a.out);
  const float mf = a.mf, eps = a.eps;
  alignas(64) float num[kBlock], den[kBlock], plain[kBlock];
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t len = min64(kBlock, hi - b0);
    for (int i = 0; i < a.m; i += 4) {
      const int g = a.m - i < 4 ? a.m - i : 4;
      if (i == 0) df_any<true>(g, t, f, a.lam, b0, len, num, den, plain);
      else df_any<false>(g, t + i, f + i, a.lam + i, b0, len, num, den, plain);
    }
    const P* pr = pre + b0;
    P* o = out + b0;
    int64_t e0 = 0;
#if defined(PYMERGE_VEC)
    if constexpr (Direct<P>::value) {  // pymerge::dfmerge_finish, kW lanes at a time; the loop below takes the tail
      const vf veps = vset1(eps), vm = vset1(mf), one = vset1(1.f);
      for (; e0 + kW <= len; e0 += kW) {
        const vf d = vload(den + e0);
        const auto use = vgt(d, veps);
        const vf q = vdiv(vmul(vm, vload(num + e0)), vselect(use, d, one));
        const vf delta = vselect(use, q, vload(plain + e0));
        vstore(o + e0, vadd(vload(pr + e0), delta));
      }
    }
#endif
    if (e0 == len) continue;
#pragma omp simd
    for (int64_t e = e0; e < len; ++e)
      o[e] = from_f<P>(pymerge::dfmerge_finish(to_f(pr[e]), num[e], den[e], plain[e], mf, eps));
  }
}

// ---- ties_merge: elect sign and disjoint mean of the trimmed values (thresholds given) ---------------
// The list holds task vectors τ_i, or fine-tuned models θ_i (MODELS): then τ_i = θ_i - θ_pre is formed on the fly,
// rounded to the storage type exactly as torch's own subtraction rounds, so both forms give the same bits.
// Trim on the integer magnitude key (the same test as ties_trim: |τ| >= threshold, NaN kept), which vectorises
// as two integer ops; sign election and the disjoint mean as in merge_math.h.
template <bool MODELS, typename P>
inline float tau_of(P t, float pre) {
  if constexpr (MODELS) return to_f(from_f<P>(to_f(t) - pre));
  else return to_f(t);
}

inline float trim_key(float x, uint32_t thr_key) {
  const uint32_t a = f_bits(x) & 0x7fffffffu;
  return (a > 0x7f800000u ? 0x7f800000u : a) >= thr_key ? x : 0.f;
}

inline uint32_t nonfinite(float x) { return (f_bits(x) & 0x7fffffffu) >= 0x7f800000u ? 1u : 0u; }

inline void agree_add(float total, float v, float& a, float& c) {
  const bool agree = pymerge::ties_agrees(total, v);
  a += agree ? v : 0.f;
  c += agree ? 1.f : 0.f;
}

// Blocks of kBlock elements with fp32 accumulators, models four at a time: one pass converts, trims and sums
// (the elected sign's total) and keeps the trimmed values in fp32 (in L1 / L2), one pass over those sums and
// counts the agreeing ones. (A single per-element pass with every model's value in registers did not vectorise
// with GCC 12: it stayed scalar and ran 2x slower.)
template <int G, bool FIRST, bool MODELS, typename P>
inline void ties_total(const P* const* t, const uint32_t* thr, const float* pf, int64_t b0, int64_t len, float* total,
                       float* tr) {
  const P* t0 = t[0] + b0; const P* t1 = t[G > 1 ? 1 : 0] + b0;
  const P* t2 = t[G > 2 ? 2 : 0] + b0; const P* t3 = t[G > 3 ? 3 : 0] + b0;
  const uint32_t k0 = thr[0], k1 = G > 1 ? thr[1] : 0, k2 = G > 2 ? thr[2] : 0, k3 = G > 3 ? thr[3] : 0;
  float* r0 = tr; float* r1 = tr + (G > 1 ? kBlock : 0); float* r2 = tr + (G > 2 ? 2 * kBlock : 0);
  float* r3 = tr + (G > 3 ? 3 * kBlock : 0);
#pragma omp simd
  for (int64_t e = 0; e < len; ++e) {
    float s = FIRST ? 0.f : total[e];
    const float p = pf[e];
    const float v0 = trim_key(tau_of<MODELS>(t0[e], p), k0);
    r0[e] = v0; s += v0;
    if constexpr (G > 1) { const float v = trim_key(tau_of<MODELS>(t1[e], p), k1); r1[e] = v; s += v; }
    if constexpr (G > 2) { const float v = trim_key(tau_of<MODELS>(t2[e], p), k2); r2[e] = v; s += v; }
    if constexpr (G > 3) { const float v = trim_key(tau_of<MODELS>(t3[e], p), k3); r3[e] = v; s += v; }
    total[e] = s;
  }
}

template <int G, bool FIRST>
inline void ties_agree(const float* tr, int64_t len, const float* total, float* acc, float* cnt) {
  const float* r0 = tr; const float* r1 = tr + (G > 1 ? kBlock : 0); const float* r2 = tr + (G > 2 ? 2 * kBlock : 0);
  const float* r3 = tr + (G > 3 ? 3 * kBlock : 0);
#pragma omp simd
  for (int64_t e = 0; e < len; ++e) {
    float a = FIRST ? 0.f : acc[e], c = FIRST ? 0.f : cnt[e];
    const float s = total[e];
    agree_add(s, r0[e], a, c);
    if constexpr (G > 1) agree_add(s, r1[e], a, c);
    if constexpr (G > 2) agree_add(s, r2[e], a, c);
    if constexpr (G > 3) agree_add(s, r3[e], a, c);
    acc[e] = a; cnt[e] = c;
  }
}

template <bool FIRST, bool MODELS, typename P>
inline void ties_total_any(int g, const P* const* t, const uint32_t* thr, const float* pf, int64_t b0, int64_t len,
                           float* total, float* tr) {
  switch (g) {
    case 4: ties_total<4, FIRST, MODELS>(t, thr, pf, b0, len, total, tr); break;
    case 3: ties_total<3, FIRST, MODELS>(t, thr, pf, b0, len, total, tr); break;
    case 2: ties_total<2, FIRST, MODELS>(t, thr, pf, b0, len, total, tr); break;
    default: ties_total<1, FIRST, MODELS>(t, thr, pf, b0, len, total, tr); break;
  }
}

template <bool FIRST>
inline void ties_agree_any(int g, const float* tr, int64_t len, const float* total, float* acc, float* cnt) {
  switch (g) {
    case 4: ties_agree<4, FIRST>(tr, len, total, acc, cnt); break;
    case 3: ties_agree<3, FIRST>(tr, len, total, acc, cnt); break;
    case 2: ties_agree<2, FIRST>(tr, len, total, acc, cnt); break;
    default: ties_agree<1, FIRST>(tr, len, total, acc, cnt); break;
  }
}

template <bool MODELS, typename P>
void ties_blocks(const P* const* tp, const P* pre, int m, const uint32_t* thr, float lam, P* out, int64_t lo,
                 int64_t hi, uint32_t& bad) {
  // trimmed values of every model for one block: 16 KiB at M = 4 (L1), 64 KiB at most
  alignas(64) float pf[kBlock], total[kBlock], acc[kBlock], cnt[kBlock], tr[pymerge::kMaxModels * kBlock];
  uint32_t b = 0;
  for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
    const int64_t len = min64(kBlock, hi - b0);
    const P* pr = pre + b0;
#pragma omp simd reduction(| : b)
    for (int64_t e = 0; e < len; ++e) {
      pf[e] = to_f(pr[e]);
      b |= nonfinite(pf[e]);
    }
    for (int i = 0; i < m; i += 4) {
      const int g = m - i < 4 ? m - i : 4;
      if (i == 0) ties_total_any<true, MODELS>(g, tp, thr, pf, b0, len, total, tr);
      else ties_total_any<false, MODELS>(g, tp + i, thr + i, pf, b0, len, total, tr + i * kBlock);
    }
    for (int i = 0; i < m; i += 4) {
      const int g = m - i < 4 ? m - i : 4;
      if (i == 0) ties_agree_any<true>(g, tr, len, total, acc, cnt);
      else ties_agree_any<false>(g, tr + i * kBlock, len, total, acc, cnt);
    }
    P* o = out + b0;
#pragma omp simd
    for (int64_t e = 0; e < len; ++e) o[e] = from_f<P>(pf[e] + lam * pymerge::ties_mean(acc[e], cnt[e]));
  }
  bad |= b;
}

template <bool MODELS, typename P>
void ties_merge_form(const pymerge::cpu::TiesArgs& a, int64_t lo, int64_t hi) {
  const P* const* tp = reinterpret_cast<const P* const*>(a.t);
  const P* pre = static_cast<const P*>(a.pre);
  P* out = static_cast<P*>(a.out);
  uint32_t thr[pymerge::kMaxModels];
  for (int i = 0; i < a.m; ++i) thr[i] = f_bits(a.thr[i]);
  uint32_t bad = 0;
  ties_blocks<MODELS>(tp, pre, a.m, thr, a.lam, out, lo, hi, bad);
  if (bad && a.check) __atomic_store_n(a.pre_nonfinite, 1, __ATOMIC_RELAXED);
}

template <typename P>
void ties_merge_chunk(const void* args, int64_t lo, int64_t hi) {
  const auto& a = *static_cast<const pymerge::cpu::TiesArgs*>(args);
  if (a.models) ties_merge_form<true, P>(a, lo, hi);
  else ties_merge_form<false, P>(a, lo, hi);
}

// ---- TIES selection helpers ------------------------------------------------------------------------
// Magnitude key of τ at e: of t[e], or (MODELS) of t[e] - pre[e] rounded to the storage type.
template <bool MODELS, typename P>
inline uint32_t tau_key(const P* t, const P* pre, int64_t e) {
  if constexpr (MODELS) return magnitude_key(from_f<P>(to_f(t[e]) - to_f(pre[e])));
  else return magnitude_key(t[e]);
}

template <bool MODELS, typename P>
void ties_keys_form(const P* t, const P* pre, int64_t start, int64_t stride, int64_t count, uint32_t* keys) {
  for (int64_t j = 0; j < count; ++j) keys[j] = tau_key<MODELS>(t, pre, start + j * stride);
}

template <typename P>
void ties_keys(const void* tv, const void* pv, int64_t start, int64_t stride, int64_t count, uint32_t* keys) {
  const P* t = static_cast<const P*>(tv);
  const P* pre = static_cast<const P*>(pv);
  if (pre) ties_keys_form<true>(t, pre, start, stride, count, keys);
  else ties_keys_form<false>(t, pre, start, stride, count, keys);
}

template <bool MODELS, typename P>
void ties_hist_form(const P* t, const P* pre, int64_t lo, int64_t hi, int pass, uint32_t high, uint32_t* h) {
  if (pass == 0) {
    for (int64_t e = lo; e < hi; ++e) ++h[tau_key<MODELS>(t, pre, e) >> 16];
  } else {
    for (int64_t e = lo; e < hi; ++e) {
      const uint32_t key = tau_key<MODELS>(t, pre, e);
      if ((key >> 16) == high) ++h[key & 0xffffu];
    }
  }
}

template <typename P>
void ties_hist(const void* tv, const void* pv, int64_t lo, int64_t hi, int pass, uint32_t high, uint32_t* h) {
  const P* t = static_cast<const P*>(tv);
  const P* pre = static_cast<const P*>(pv);
  if (pre) ties_hist_form<true>(t, pre, lo, hi, pass, high, h);
  else ties_hist_form<false>(t, pre, lo, hi, pass, high, h);
}

#if defined(PYMERGE_AVX512)
// 16 magnitude keys at once (AVX-512): the band pass below compresses the in-band keys with vpcompressd.
inline __m512i key_of_bits(__m512i u) {
  return _mm512_min_epu32(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
}
inline __m512 load16f(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16f(const bf16_t* p) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
inline __m512 load16f(const f16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
// keys of 16 values d (fp32) after rounding them to the storage type P, as from_f<P> rounds (nearest even)
inline __m512i keys16_rounded(__m512 d, float*) { return key_of_bits(_mm512_castps_si512(d)); }
inline __m512i keys16_rounded(__m512 d, bf16_t*) {
  const __m512i a = _mm512_and_si512(_mm512_castps_si512(d), _mm512_set1_epi32(0x7fffffff));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(a, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(0x7fff)), lsb);
  // NaN (a > 0x7f800000) can only round to >= 0x7f800000 here, so the clamp maps it to the key of +inf
  return key_of_bits(_mm512_slli_epi32(_mm512_srli_epi32(r, 16), 16));
}
inline __m512i keys16_rounded(__m512 d, f16_t*) {
  const __m256i h = _mm512_cvtps_ph(d, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return key_of_bits(_mm512_castps_si512(_mm512_cvtph_ps(h)));
}
template <bool MODELS, typename P>
inline __m512i keys16(const P* t, const P* pre, int64_t e) {
  if constexpr (MODELS) return keys16_rounded(_mm512_sub_ps(load16f(t + e), load16f(pre + e)), static_cast<P*>(nullptr));
  else return key_of_bits(_mm512_castps_si512(load16f(t + e)));  // conversions to fp32 are exact
}
#endif

template <bool MODELS, typename P>
pymerge::cpu::BandResult ties_band_form(const P* t, const P* pre, int64_t lo, int64_t hi, uint32_t klo, uint32_t khi,
                                        uint32_t* cand, int64_t cap) {
  int64_t above = 0, in_band = 0, stored = 0, bad = 0;
  int64_t e = lo;
#if defined(PYMERGE_AVX512)
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(klo)), vhi = _mm512_set1_epi32(static_cast<int>(khi));
  const __m512i one = _mm512_set1_epi32(1);
  // per-lane counters (a masked add per 16 keys, no scalar popcount chain) and the largest key (the key of NaN /
  // Inf is the largest possible): summed once at the end; a lane counts at most 2^32 - 1 keys (n < 2^36)
  __m512i above16 = _mm512_setzero_si512(), kmax = _mm512_setzero_si512();
  for (; e + 16 <= hi; e += 16) {
    const __m512i k = keys16<MODELS>(t, pre, e);
    above16 = _mm512_mask_add_epi32(above16, _mm512_cmpgt_epu32_mask(k, vhi), above16, one);
    kmax = _mm512_max_epu32(kmax, k);
    const __mmask16 in = _mm512_cmpge_epu32_mask(k, vlo) & _mm512_cmple_epu32_mask(k, vhi);
    if (in) {
      const int c = __builtin_popcount(in);
      in_band += c;
      if (stored < cap) {  // room for 16 more: cand has cap + 64 slots
        _mm512_storeu_si512(cand + stored, _mm512_maskz_compress_epi32(in, k));
        stored += c;
      }
    }
  }
  alignas(64) uint32_t lanes[16];
  _mm512_store_si512(lanes, above16);
  for (int j = 0; j < 16; ++j) above += lanes[j];
  bad += _mm512_reduce_max_epu32(kmax) == 0x7f800000u;
#endif
  for (; e < hi; ++e) {
    const uint32_t k = tau_key<MODELS>(t, pre, e);
    above += k > khi;
    bad += k == 0x7f800000u;
    const bool in = (k >= klo) & (k <= khi);
    in_band += in;
    cand[stored] = k;
    stored += in & (stored < cap);
  }
  return {above, in_band, stored < in_band ? stored : in_band, bad};
}

template <typename P>
pymerge::cpu::BandResult ties_band(const void* tv, const void* pv, int64_t lo, int64_t hi, uint32_t klo, uint32_t khi,
                                   uint32_t* cand, int64_t cap) {
  const P* t = static_cast<const P*>(tv);
  const P* pre = static_cast<const P*>(pv);
  if (pre) return ties_band_form<true>(t, pre, lo, hi, klo, khi, cand, cap);
  return ties_band_form<false>(t, pre, lo, hi, klo, khi, cand, cap);
}

// ---- dare: drop with probability p (counter-based hash of (seed, index)), rescale by 1/(1-p) ----------
// The same decision as pymerge::dare_apply (merge_math.h, also the CUDA kernel and ops.dare_random_bits), computed
// more cheaply: the counter z_e = key + (e + 1) * golden advances by golden per element (an add, not a 64-bit
// multiply), and mix64's last step z ^ (z >> 31) leaves bits 40..63 as they are, so r_e = (its input) >> 40.
inline uint32_t dare_r(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>(z >> 40);
}

#if defined(PYMERGE_AVX512)
// Keep bits of 8 consecutive elements with counters z (vpmullq: AVX-512DQ): r >= thr <=> z >= thr << 40 for the
// final z, as r = z >> 40 (thr < 2^24 here).
inline __mmask8 dare_keep8(__m512i z, __m512i thr40) {
  z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 30));
  z = _mm512_mullo_epi64(z, _mm512_set1_epi64(static_cast<long long>(0xBF58476D1CE4E5B9ull)));
  z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 27));
  z = _mm512_mullo_epi64(z, _mm512_set1_epi64(static_cast<long long>(0x94D049BB133111EBull)));
  return _mm512_cmpge_epu64_mask(z, thr40);
}
#endif

#if defined(PYMERGE_AVX512)
// The vectorised DARE loop over whole 16-element steps from e; returns where it stopped.
#define PYMERGE_DARE_STEPS(STORE)                                                                                   \
  const uint64_t g = pymerge::kGolden;                                                                              \
  const __m512i step8 = _mm512_set1_epi64(static_cast<long long>(8 * g));                                          \
  const __m512i step16 = _mm512_set1_epi64(static_cast<long long>(16 * g));                                        \
  for (; e + 16 <= hi; e += 16) {                                                                                   \
    const __mmask16 keep = _mm512_kunpackb(dare_keep8(_mm512_add_epi64(z0, step8), vthr), dare_keep8(z0, vthr));  \
    const __m512 y = _mm512_maskz_mul_ps(keep, load16(x + e), vscale);                                              \
    STORE;                                                                                                          \
    z0 = _mm512_add_epi64(z0, step16);                                                                              \
  }                                                                                                                 \
  return e;

template <typename P>
inline int64_t dare_steps(const P* x, P* o, int64_t e, int64_t hi, __m512i z0, __m512i vthr, __m512 vscale) {
  PYMERGE_DARE_STEPS(store16(o + e, y))
}

// bf16 on CPUs with AVX512_BF16: vcvtneps2bf16 rounds to nearest even in one instruction, but flushes subnormal
// results to zero and keeps NaN payloads; a step with such a lane (fpclass: denormal or NaN) rounds exactly with
// integer ops instead (store16), so the output bits are those of the other paths.
__attribute__((target("avx512bf16"))) int64_t dare_steps_bf16_native(const bf16_t* x, bf16_t* o, int64_t e,
                                                                      int64_t hi, __m512i z0, __m512i vthr,
                                                                      __m512 vscale) {
  PYMERGE_DARE_STEPS(
      if (__builtin_expect(_mm512_fpclass_ps_mask(y, 0xA1) != 0, 0)) store16(o + e, y);  // QNaN | SNaN | denormal
      else _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + e), (__m256i)_mm512_cvtneps_pbh(y)))
}
#undef PYMERGE_DARE_STEPS
#endif

#if defined(PYMERGE_AVX2)
// AVX2 has no 64-bit multiply: z * c (mod 2^64) from three 32 x 32 -> 64-bit products.
inline __m256i mul64c(__m256i z, __m256i c_lo, __m256i c_hi) {
  const __m256i lo = _mm256_mul_epu32(z, c_lo);
  const __m256i cross = _mm256_add_epi64(_mm256_mul_epu32(_mm256_srli_epi64(z, 32), c_lo), _mm256_mul_epu32(z, c_hi));
  return _mm256_add_epi64(lo, _mm256_slli_epi64(cross, 32));
}
// All-ones 64-bit lanes where r = mix(z) >> 40 >= thr (signed compare: r < 2^24 and thr - 1 >= -1).
inline __m256i dare_keep4(__m256i z, __m256i thr_m1) {
  const __m256i c1l = _mm256_set1_epi64x(0x1CE4E5B9ll), c1h = _mm256_set1_epi64x(0xBF58476Dll);
  const __m256i c2l = _mm256_set1_epi64x(0x133111EBll), c2h = _mm256_set1_epi64x(0x94D049BBll);
  z = mul64c(_mm256_xor_si256(z, _mm256_srli_epi64(z, 30)), c1l, c1h);
  z = mul64c(_mm256_xor_si256(z, _mm256_srli_epi64(z, 27)), c2l, c2h);
  return _mm256_cmpgt_epi64(_mm256_srli_epi64(z, 40), thr_m1);
}
#endif

template <typename P> constexpr bool kIsBf16 = false;
template <> constexpr bool kIsBf16<bf16_t> = true;

template <typename P>
void dare_chunk(const void* args, int64_t lo, int64_t hi) {
  const auto& a = *static_cast<const pymerge::cpu::DareArgs*>(args);
  const P* x = static_cast<const P*>(a.x);
  P* o = static_cast<P*>(a.out);
  const uint64_t key = a.key;
  const uint32_t thr = a.threshold;
  const float scale = a.scale;
  int64_t e = lo;
#if defined(PYMERGE_AVX512)
  if (thr < (1u << 24)) {  // else every element is dropped: the scalar loop below
    const uint64_t g = pymerge::kGolden;
    const __m512i lanes = _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1);  // e + 1 .. e + 8
    const __m512i z0 = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(key + static_cast<uint64_t>(lo) * g)),
                                        _mm512_mullo_epi64(lanes, _mm512_set1_epi64(static_cast<long long>(g))));
    const __m512i vthr = _mm512_set1_epi64(static_cast<long long>(static_cast<uint64_t>(thr) << 40));
    const __m512 vscale = _mm512_set1_ps(scale);
    if constexpr (kIsBf16<P>) {
      if (a.native_bf16) e = dare_steps_bf16_native(x, o, e, hi, z0, vthr, vscale);
      else e = dare_steps(x, o, e, hi, z0, vthr, vscale);
    } else {
      e = dare_steps(x, o, e, hi, z0, vthr, vscale);
    }
  }
#elif defined(PYMERGE_AVX2)
  {
    const uint64_t g = pymerge::kGolden;
    __m256i z0 = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(key + static_cast<uint64_t>(lo) * g)),
                                  _mm256_set_epi64x(static_cast<long long>(4 * g), static_cast<long long>(3 * g),
                                                    static_cast<long long>(2 * g), static_cast<long long>(g)));
    const __m256i step4 = _mm256_set1_epi64x(static_cast<long long>(4 * g));
    const __m256i step8 = _mm256_set1_epi64x(static_cast<long long>(8 * g));
    const __m256i thr_m1 = _mm256_set1_epi64x(static_cast<long long>(thr) - 1);
    const __m256 vscale = _mm256_set1_ps(scale);
    for (; e + 8 <= hi; e += 8) {
      // two 4-lane 64-bit masks -> one 8-lane 32-bit mask in element order: [0 1 4 5 | 2 3 6 7], then 64-bit swap
      const __m256 m = _mm256_shuffle_ps(_mm256_castsi256_ps(dare_keep4(z0, thr_m1)),
                                         _mm256_castsi256_ps(dare_keep4(_mm256_add_epi64(z0, step4), thr_m1)),
                                         _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 keep = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(m), _MM_SHUFFLE(3, 1, 2, 0)));
      store8(o + e, _mm256_and_ps(keep, _mm256_mul_ps(load8(x + e), vscale)));
      z0 = _mm256_add_epi64(z0, step8);
    }
  }
#endif
  const uint64_t z = key + static_cast<uint64_t>(e + 1) * pymerge::kGolden;
#pragma omp simd
  for (int64_t i = e; i < hi; ++i) {
    const uint64_t zi = z + static_cast<uint64_t>(i - e) * pymerge::kGolden;
    o[i] = from_f<P>(dare_r(zi) < thr ? 0.f : to_f(x[i]) * scale);
  }
}

const pymerge::cpu::KernelTable kTable = {
    PYMERGE_ISA_NAME,
    {&weighted_sum_chunk<float>, &weighted_sum_chunk<f16_t>, &weighted_sum_chunk<bf16_t>},
    {{&fisher_merge_chunk<float, float>, &fisher_merge_chunk<float, float>},
     {&fisher_merge_chunk<f16_t, f16_t>, &fisher_merge_chunk<f16_t, float>},
     {&fisher_merge_chunk<bf16_t, bf16_t>, &fisher_merge_chunk<bf16_t, float>}},
    {{&dfmerge_combine_chunk<float, float>, &dfmerge_combine_chunk<float, float>},
     {&dfmerge_combine_chunk<f16_t, f16_t>, &dfmerge_combine_chunk<f16_t, float>},
     {&dfmerge_combine_chunk<bf16_t, bf16_t>, &dfmerge_combine_chunk<bf16_t, float>}},
    {&ties_merge_chunk<float>, &ties_merge_chunk<f16_t>, &ties_merge_chunk<bf16_t>},
    {&dare_chunk<float>, &dare_chunk<f16_t>, &dare_chunk<bf16_t>},
    {&ties_band<float>, &ties_band<f16_t>, &ties_band<bf16_t>},
    {&ties_hist<float>, &ties_hist<f16_t>, &ties_hist<bf16_t>},
    {&ties_keys<float>, &ties_keys<f16_t>, &ties_keys<bf16_t>},
};
}  // namespace
