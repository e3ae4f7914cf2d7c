// Torch-free AVX-512 helpers for the CPU kernels of the model's hot path (experts, norms,
// decode attention): loads that widen float32/bfloat16/float16 to 16 float32 lanes, masked
// tails, a vector exp, and the runtime check that picks these paths. Functions here carry their
// own target attribute, so the rest of the build stays baseline x86-64; callers must be
// compiled with DISAGG_AVX512 too and run only when cpu_has_avx512() is true.
#pragma once

#include <cstdint>
#include <cstdlib>

#include "disagg/common.h"
#include "disagg/cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DISAGG_HAVE_AVX512_PATH 1
#include <immintrin.h>
#define DISAGG_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#else
#define DISAGG_HAVE_AVX512_PATH 0
#define DISAGG_AVX512
#endif

namespace disagg {

// True where the AVX-512 paths may run (F, BW, VL, DQ): cpu::use_avx512() (which also honours
// DISAGG_NO_AVX512 and DISAGG_NO_SIMD, see cpu_features.h) plus DQ; checked once.
inline bool cpu_has_avx512() {
#if DISAGG_HAVE_AVX512_PATH
  static const bool ok = cpu::use_avx512() && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

#if DISAGG_HAVE_AVX512_PATH
namespace v512 {

DISAGG_AVX512 inline __mmask16 tail_mask(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

DISAGG_AVX512 inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
DISAGG_AVX512 inline __m512 load(const bf16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
DISAGG_AVX512 inline __m512 load(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// The first n (< 16) lanes, zeros above; never reads past p[n-1].
DISAGG_AVX512 inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
DISAGG_AVX512 inline __m512 load(const bf16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
DISAGG_AVX512 inline __m512 load(const f16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// Stores round each lane exactly as from_float does (nearest even; NaN stays NaN).
DISAGG_AVX512 inline void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
template <typename T>
DISAGG_AVX512 inline void store(T* p, __m512 v, __mmask16 m) {
  alignas(64) float tmp[16];
  _mm512_store_ps(tmp, v);
  for (int i = 0; i < 16; ++i)
    if (m >> i & 1) p[i] = from_float<T>(tmp[i]);
}

// The four horizontal sums of a0..a3, in lanes 0..3 (cheaper than four reductions).
DISAGG_AVX512 inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 u0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
  const __m512 u1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
  // per 128-bit lane: u0 = [a0, a1, a0, a1] partials, u1 likewise for a2, a3
  __m512 w = _mm512_add_ps(_mm512_shuffle_ps(u0, u1, 0x44), _mm512_shuffle_ps(u0, u1, 0xEE));
  w = _mm512_add_ps(w, _mm512_shuffle_f32x4(w, w, 0x4E));
  w = _mm512_add_ps(w, _mm512_shuffle_f32x4(w, w, 0xB1));
  return _mm512_castps512_ps128(w);
}

// exp for float32 lanes: 2^n * p(r) with n = round(x / ln2), r = x - n ln2 (split in two
// parts), p a degree-6 polynomial; within 2 ulp for x <= 88.7, 0 below -104 (and for -inf).
// Inputs are clamped to [-104, 88.72], so NaN is not propagated: callers feed it
// max-subtracted softmax scores and SiLU arguments.
DISAGG_AVX512 inline __m512 exp(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
  const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7228391f)), _mm512_set1_ps(-104.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

}  // namespace v512
#endif

}  // namespace disagg
