// x86 kernels of moe_combine (torch-free): AVX-512 and AVX2 versions that produce the same bits.
//
// Per token, 32 hidden elements at a time are accumulated over the token's k rows in float
// registers (acc = 0; acc = acc + w * x, a separate multiply and add in row order, like the
// portable and CUDA kernels), then rounded once to the output type. The k rows lie at scattered
// places: the next token's rows are prefetched in step with this token's loads (a whole token of
// lead: short, fixed distances left the combine at half a copy's speed). Outputs of kStreamBytes
// and more are written with non-temporal stores: they would only evict the rows still to be read.
#pragma once

#include "disagg/cpu_features.h"

#if DISAGG_X86_SIMD

#include <immintrin.h>

#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "disagg/common.h"

#define DISAGG_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c")))
#define DISAGG_TARGET_AVX2 __attribute__((target("avx2,f16c")))

namespace disagg {
namespace x86 {

constexpr int64_t kCombineStreamBytes = int64_t(4) << 20;

// The product is rounded on its own before the add (no fused multiply-add, which GCC would
// otherwise form for AVX-512 code): the empty asm makes it opaque to the optimiser.
DISAGG_TARGET_AVX2 inline float keep(float v) {
  asm("" : "+x"(v));
  return v;
}
DISAGG_TARGET_AVX2 inline __m256 keep(__m256 v) {
  asm("" : "+x"(v));
  return v;
}
DISAGG_TARGET_AVX512 inline __m512 keep(__m512 v) {
  asm("" : "+v"(v));
  return v;
}

inline bool aligned_to(const void* p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

// ---- scalar pieces (AVX2 tails), bit-identical to the vector lanes ---------------------------

DISAGG_TARGET_AVX2 inline float load1(const float* p) { return *p; }
DISAGG_TARGET_AVX2 inline float load1(const bf16_t* p) {
  const uint32_t u = static_cast<uint32_t>(p->bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
DISAGG_TARGET_AVX2 inline float load1(const f16_t* p) { return _cvtsh_ss(p->bits); }

DISAGG_TARGET_AVX2 inline uint32_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;  // quiet NaN, sign kept
  return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;                   // nearest even
}
DISAGG_TARGET_AVX2 inline void store1(float* p, float v) { *p = v; }
DISAGG_TARGET_AVX2 inline void store1(bf16_t* p, float v) { p->bits = static_cast<uint16_t>(bf16_bits(v)); }
DISAGG_TARGET_AVX2 inline void store1(f16_t* p, float v) {
  p->bits = static_cast<uint16_t>(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// ---- AVX-512: 32 elements as two zmm of floats -----------------------------------------------

// (a full chunk takes a plain load: masked loads cost more on some cores)
DISAGG_TARGET_AVX512 inline void load32(const float* p, __mmask32 m, __m512& lo, __m512& hi) {
  if (m == 0xffffffffu) {
    lo = _mm512_loadu_ps(p);
    hi = _mm512_loadu_ps(p + 16);
    return;
  }
  lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), p);
  hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), p + 16);
}
DISAGG_TARGET_AVX512 inline void load32(const bf16_t* p, __mmask32 m, __m512& lo, __m512& hi) {
  const __m512i r = m == 0xffffffffu ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(m, p);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(r)), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(r, 1)), 16));
}
DISAGG_TARGET_AVX512 inline void load32(const f16_t* p, __mmask32 m, __m512& lo, __m512& hi) {
  const __m512i r = m == 0xffffffffu ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(m, p);
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(r));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(r, 1));
}

DISAGG_TARGET_AVX512 inline __m256i bf16_round16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i top = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(top, _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __m512i qnan = _mm512_or_si512(top, _mm512_set1_epi32(0x40));
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  return _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, qnan));
}

DISAGG_TARGET_AVX512 inline void store_words(void* p, __mmask32 m, __m512i v) {
  if (m == 0xffffffffu) {
    _mm512_storeu_si512(p, v);
  } else {
    _mm512_mask_storeu_epi16(p, m, v);
  }
}

DISAGG_TARGET_AVX512 inline void store32(float* p, __mmask32 m, __m512 lo, __m512 hi, bool nt) {
  if (nt && m == 0xffffffffu && aligned_to(p, 64)) {
    _mm512_stream_ps(p, lo);
    _mm512_stream_ps(p + 16, hi);
  } else if (m == 0xffffffffu) {
    _mm512_storeu_ps(p, lo);
    _mm512_storeu_ps(p + 16, hi);
  } else {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>(m), lo);
    _mm512_mask_storeu_ps(p + 16, static_cast<__mmask16>(m >> 16), hi);
  }
}
DISAGG_TARGET_AVX512 inline void store32_16(void* p, __mmask32 m, __m256i lo, __m256i hi, bool nt) {
  const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  if (nt && m == 0xffffffffu && aligned_to(p, 64)) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  } else {
    store_words(p, m, v);
  }
}
DISAGG_TARGET_AVX512 inline void store32(bf16_t* p, __mmask32 m, __m512 lo, __m512 hi, bool nt) {
  store32_16(p, m, bf16_round16(lo), bf16_round16(hi), nt);
}
DISAGG_TARGET_AVX512 inline void store32(f16_t* p, __mmask32 m, __m512 lo, __m512 hi, bool nt) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  store32_16(p, m, _mm512_cvtps_ph(lo, kRound), _mm512_cvtps_ph(hi, kRound), nt);
}

// bf16 in a lane order of its own: interleaving zero words below the bf16 words gives the
// float bits in one instruction per 16 lanes (instead of a widening move and a shift). lo holds
// words {0-3, 8-11, 16-19, 24-27} of the 32, hi the others; the arithmetic is per lane, so the
// order only matters when storing, where one two-source permute restores it.
DISAGG_TARGET_AVX512 inline void load32_interleaved(const bf16_t* p, __mmask32 m, __m512& lo, __m512& hi) {
  const __m512i r = m == 0xffffffffu ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi16(m, p);
  lo = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), r));
  hi = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), r));
}

// source dword (0-15 in lo, 16-31 in hi) of output element j of an interleaved pair
constexpr int interleaved_dword(int j) { return (j % 8) < 4 ? (j / 8) * 4 + (j % 8) : 16 + (j / 8) * 4 + (j % 8) - 4; }

DISAGG_TARGET_AVX512 inline void store32_interleaved(float* p, __mmask32 m, __m512 lo, __m512 hi, bool nt) {
  const __m512i i0 = _mm512_setr_epi32(
      interleaved_dword(0), interleaved_dword(1), interleaved_dword(2), interleaved_dword(3),
      interleaved_dword(4), interleaved_dword(5), interleaved_dword(6), interleaved_dword(7),
      interleaved_dword(8), interleaved_dword(9), interleaved_dword(10), interleaved_dword(11),
      interleaved_dword(12), interleaved_dword(13), interleaved_dword(14), interleaved_dword(15));
  const __m512i i1 = _mm512_setr_epi32(
      interleaved_dword(16), interleaved_dword(17), interleaved_dword(18), interleaved_dword(19),
      interleaved_dword(20), interleaved_dword(21), interleaved_dword(22), interleaved_dword(23),
      interleaved_dword(24), interleaved_dword(25), interleaved_dword(26), interleaved_dword(27),
      interleaved_dword(28), interleaved_dword(29), interleaved_dword(30), interleaved_dword(31));
  store32(p, m, _mm512_permutex2var_ps(lo, i0, hi), _mm512_permutex2var_ps(lo, i1, hi), nt);
}

// float -> bf16 bits (nearest even, quiet NaN) left in the high word of each dword
DISAGG_TARGET_AVX512 inline __m512i bf16_round_high(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
}

DISAGG_TARGET_AVX512 inline void store32_interleaved(bf16_t* p, __mmask32 m, __m512 lo, __m512 hi, bool nt) {
  alignas(64) static constexpr uint16_t kIdx[32] = {
#define DISAGG_W(j) static_cast<uint16_t>(2 * interleaved_dword(j) + 1)
      DISAGG_W(0), DISAGG_W(1), DISAGG_W(2), DISAGG_W(3), DISAGG_W(4), DISAGG_W(5), DISAGG_W(6), DISAGG_W(7),
      DISAGG_W(8), DISAGG_W(9), DISAGG_W(10), DISAGG_W(11), DISAGG_W(12), DISAGG_W(13), DISAGG_W(14), DISAGG_W(15),
      DISAGG_W(16), DISAGG_W(17), DISAGG_W(18), DISAGG_W(19), DISAGG_W(20), DISAGG_W(21), DISAGG_W(22), DISAGG_W(23),
      DISAGG_W(24), DISAGG_W(25), DISAGG_W(26), DISAGG_W(27), DISAGG_W(28), DISAGG_W(29), DISAGG_W(30), DISAGG_W(31)};
#undef DISAGG_W
  const __m512i v = _mm512_permutex2var_epi16(bf16_round_high(lo), _mm512_load_si512(kIdx), bf16_round_high(hi));
  if (nt && m == 0xffffffffu && aligned_to(p, 64)) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  } else {
    store_words(p, m, v);
  }
}

// The same with vcvtne2ps2bf16 (AVX-512 BF16; inline assembly, so that this header needs no
// compiler flag for it and the caller picks it at run time): one instruction rounds both halves
// to nearest even and quiets NaNs as bf16_round_high does, and one word permute restores the
// order. The instruction treats float denormals as zero, so a vector holding one (a weighted sum
// under 2^-126 in magnitude) takes the integer path: the bits stay those of the portable kernel.
DISAGG_TARGET_AVX512 inline void store32_interleaved_ne(bf16_t* p, __mmask32 m, __m512 lo, __m512 hi, bool nt) {
  // |x| < 2^-126 (the sign shifted out): denormals, and zeros, which the integer path handles
  // as well (a vector of zeros only comes from tokens whose rows were all dropped)
  const __m512i lim = _mm512_set1_epi32(0x01000000);
  const __mmask16 dlo = _mm512_cmplt_epu32_mask(_mm512_slli_epi32(_mm512_castps_si512(lo), 1), lim);
  const __mmask16 dhi = _mm512_cmplt_epu32_mask(_mm512_slli_epi32(_mm512_castps_si512(hi), 1), lim);
  if (__builtin_expect((dlo | dhi) != 0, 0)) {
    store32_interleaved(p, m, lo, hi, nt);
    return;
  }
  alignas(64) static constexpr uint16_t kIdx[32] = {
#define DISAGG_W(j) static_cast<uint16_t>(interleaved_dword(j))
      DISAGG_W(0), DISAGG_W(1), DISAGG_W(2), DISAGG_W(3), DISAGG_W(4), DISAGG_W(5), DISAGG_W(6), DISAGG_W(7),
      DISAGG_W(8), DISAGG_W(9), DISAGG_W(10), DISAGG_W(11), DISAGG_W(12), DISAGG_W(13), DISAGG_W(14), DISAGG_W(15),
      DISAGG_W(16), DISAGG_W(17), DISAGG_W(18), DISAGG_W(19), DISAGG_W(20), DISAGG_W(21), DISAGG_W(22), DISAGG_W(23),
      DISAGG_W(24), DISAGG_W(25), DISAGG_W(26), DISAGG_W(27), DISAGG_W(28), DISAGG_W(29), DISAGG_W(30), DISAGG_W(31)};
#undef DISAGG_W
  __m512i packed;  // words 0-15 from lo, 16-31 from hi
  asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(packed) : "v"(hi), "v"(lo));
  const __m512i v = _mm512_permutexvar_epi16(_mm512_load_si512(kIdx), packed);
  if (nt && m == 0xffffffffu && aligned_to(p, 64)) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), v);
  } else {
    store_words(p, m, v);
  }
}

// ---- AVX2: 32 elements as four ymm of floats -------------------------------------------------

DISAGG_TARGET_AVX2 inline void load32(const float* p, __m256 v[4]) {
  for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(p + 8 * i);
}
DISAGG_TARGET_AVX2 inline void load32(const bf16_t* p, __m256 v[4]) {
  for (int i = 0; i < 4; ++i) {
    const __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * i));
    v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r), 16));
  }
}
DISAGG_TARGET_AVX2 inline void load32(const f16_t* p, __m256 v[4]) {
  for (int i = 0; i < 4; ++i) v[i] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * i)));
}

DISAGG_TARGET_AVX2 inline __m256i bf16_round8x2(__m256 a, __m256 b) {
  // two halves of 8 floats -> 16 bf16 in order
  __m256i out[2];
  const __m256 in[2] = {a, b};
  for (int i = 0; i < 2; ++i) {
    const __m256i u = _mm256_castps_si256(in[i]);
    const __m256i top = _mm256_srli_epi32(u, 16);
    const __m256i lsb = _mm256_and_si256(top, _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i qnan = _mm256_or_si256(top, _mm256_set1_epi32(0x40));
    // unsigned a > 0x7f800000 for a < 2^31: a signed compare is exact
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    out[i] = _mm256_blendv_epi8(r, qnan, nan);
  }
  // packus works per 128-bit lane: [a0..3 b0..3 | a4..7 b4..7] -> fix the order with a permute
  const __m256i p = _mm256_packus_epi32(out[0], out[1]);
  return _mm256_permute4x64_epi64(p, 0xd8);
}

DISAGG_TARGET_AVX2 inline void store32(float* p, const __m256 v[4], bool nt) {
  if (nt && aligned_to(p, 32)) {
    for (int i = 0; i < 4; ++i) _mm256_stream_ps(p + 8 * i, v[i]);
  } else {
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(p + 8 * i, v[i]);
  }
}
DISAGG_TARGET_AVX2 inline void store16x2(void* p, __m256i a, __m256i b, bool nt) {
  __m256i* q = reinterpret_cast<__m256i*>(p);
  if (nt && aligned_to(p, 32)) {
    _mm256_stream_si256(q, a);
    _mm256_stream_si256(q + 1, b);
  } else {
    _mm256_storeu_si256(q, a);
    _mm256_storeu_si256(q + 1, b);
  }
}
DISAGG_TARGET_AVX2 inline void store32(bf16_t* p, const __m256 v[4], bool nt) {
  store16x2(p, bf16_round8x2(v[0], v[1]), bf16_round8x2(v[2], v[3]), nt);
}
DISAGG_TARGET_AVX2 inline void store32(f16_t* p, const __m256 v[4], bool nt) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256i a = _mm256_set_m128i(_mm256_cvtps_ph(v[1], kRound), _mm256_cvtps_ph(v[0], kRound));
  const __m256i b = _mm256_set_m128i(_mm256_cvtps_ph(v[3], kRound), _mm256_cvtps_ph(v[2], kRound));
  store16x2(p, a, b, nt);
}

// ---- the token loop ---------------------------------------------------------------------------

// The valid rows (dest >= 0) of token t and their weights.
template <typename T>
inline int64_t token_rows(const T* y, int64_t hidden, const int32_t* dest, const float* weights,
                          int64_t t, int64_t k, const T** rows, float* w) {
  int64_t n = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int32_t r = dest[t * k + j];
    if (r < 0) continue;
    rows[n] = y + static_cast<int64_t>(r) * hidden;
    w[n++] = weights[t * k + j];
  }
  return n;
}

// While token t is combined, the same 32 elements of token t + 1's rows are prefetched: the
// next token's rows (scattered, so the hardware prefetchers find no stream) arrive in full
// while this token's are summed, a whole row of lead instead of a fixed distance.
template <typename T>
inline void prefetch_next(const T* const* nxt, int64_t nn, int64_t h) {
  for (int64_t j = 0; j < nn; ++j)
    for (int64_t b = 0; b < 32 * static_cast<int64_t>(sizeof(T)); b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(nxt[j] + h) + b, _MM_HINT_T0);
}

// Tokens [t0, t1) of out[t] = sum_j w[t,j] * y[dest[t,j]]. `nt`: non-temporal stores.
// kNe: bf16 outputs rounded with vcvtne2ps2bf16 (only where cpu::use_avx512bf16()).
template <typename T, typename O, bool kNe = false>
DISAGG_TARGET_AVX512 void combine_tokens_avx512(const T* y, int64_t hidden, const int32_t* dest,
                                                const float* weights, int64_t k, int64_t t0,
                                                int64_t t1, O* out, bool nt) {
  std::vector<const T*> rows_a(k), rows_b(k);
  std::vector<float> w_a(k), w_b(k);
  const T** cur = rows_a.data();
  const T** nxt = rows_b.data();
  float* cw = w_a.data();
  float* nw = w_b.data();
  int64_t n = t0 < t1 ? token_rows(y, hidden, dest, weights, t0, k, cur, cw) : 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t nn = t + 1 < t1 ? token_rows(y, hidden, dest, weights, t + 1, k, nxt, nw) : 0;
    O* o = out + t * hidden;
    for (int64_t h = 0; h < hidden; h += 32) {
      const __mmask32 m = h + 32 <= hidden ? 0xffffffffu : ((1u << (hidden - h)) - 1u);
      prefetch_next(nxt, nn, h);
      constexpr bool kInterleaved = std::is_same<T, bf16_t>::value;
      __m512 alo = _mm512_setzero_ps(), ahi = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; ++j) {
        __m512 xlo, xhi;
        if constexpr (kInterleaved) {
          load32_interleaved(cur[j] + h, m, xlo, xhi);
        } else {
          load32(cur[j] + h, m, xlo, xhi);
        }
        const __m512 w = _mm512_set1_ps(cw[j]);
        alo = _mm512_add_ps(alo, keep(_mm512_mul_ps(w, xlo)));
        ahi = _mm512_add_ps(ahi, keep(_mm512_mul_ps(w, xhi)));
      }
      if constexpr (kNe && kInterleaved && std::is_same<O, bf16_t>::value) {
        store32_interleaved_ne(o + h, m, alo, ahi, nt);
      } else if constexpr (kInterleaved && (std::is_same<O, bf16_t>::value || std::is_same<O, float>::value)) {
        store32_interleaved(o + h, m, alo, ahi, nt);
      } else {
        store32(o + h, m, alo, ahi, nt);
      }
    }
    std::swap(cur, nxt);
    std::swap(cw, nw);
    n = nn;
  }
  if (nt) _mm_sfence();
}

template <typename T, typename O>
DISAGG_TARGET_AVX2 void combine_tokens_avx2(const T* y, int64_t hidden, const int32_t* dest,
                                            const float* weights, int64_t k, int64_t t0,
                                            int64_t t1, O* out, bool nt) {
  std::vector<const T*> rows_a(k), rows_b(k);
  std::vector<float> w_a(k), w_b(k);
  const T** cur = rows_a.data();
  const T** nxt = rows_b.data();
  float* cw = w_a.data();
  float* nw = w_b.data();
  const int64_t full = hidden / 32 * 32;
  int64_t n = t0 < t1 ? token_rows(y, hidden, dest, weights, t0, k, cur, cw) : 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t nn = t + 1 < t1 ? token_rows(y, hidden, dest, weights, t + 1, k, nxt, nw) : 0;
    O* o = out + t * hidden;
    for (int64_t h = 0; h < full; h += 32) {
      prefetch_next(nxt, nn, h);
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t j = 0; j < n; ++j) {
        __m256 x[4];
        load32(cur[j] + h, x);
        const __m256 w = _mm256_set1_ps(cw[j]);
        for (int i = 0; i < 4; ++i) acc[i] = _mm256_add_ps(acc[i], keep(_mm256_mul_ps(w, x[i])));
      }
      store32(o + h, acc, nt);
    }
    for (int64_t h = full; h < hidden; ++h) {
      float acc = 0.0f;
      for (int64_t j = 0; j < n; ++j) acc = acc + keep(cw[j] * load1(cur[j] + h));
      store1(o + h, acc);
    }
    std::swap(cur, nxt);
    std::swap(cw, nw);
    n = nn;
  }
  if (nt) _mm_sfence();
}

// ---- moe_permute: row gather -------------------------------------------------------------------

// Rows [r0, r1) of out[r] = x[src[r] / k] (src < 0: zeros), `row_bytes` a multiple of 64 and
// `out` 64-byte aligned: whole lines with non-temporal stores (no read for ownership of the
// destination: a third less traffic than memcpy's), and the next row's source prefetched a line
// per line copied, so its misses overlap this row's copy.
DISAGG_TARGET_AVX512 inline void permute_rows_stream(const char* x, int64_t x_row_bytes,
                                                     const int32_t* src, int64_t k, int64_t r0,
                                                     int64_t r1, char* out, int64_t row_bytes) {
  for (int64_t r = r0; r < r1; ++r) {
    __m512i* o = reinterpret_cast<__m512i*>(out + r * row_bytes);
    const char* nxt = r + 1 < r1 && src[r + 1] >= 0 ? x + (src[r + 1] / k) * x_row_bytes : nullptr;
    if (src[r] < 0) {
      for (int64_t b = 0; b < row_bytes; b += 64) _mm512_stream_si512(o + b / 64, _mm512_setzero_si512());
      continue;
    }
    const char* s = x + (src[r] / k) * x_row_bytes;
    for (int64_t b = 0; b < row_bytes; b += 64) {
      if (nxt != nullptr) _mm_prefetch(nxt + b, _MM_HINT_T0);
      _mm512_stream_si512(o + b / 64, _mm512_loadu_si512(s + b));
    }
  }
  _mm_sfence();
}

}  // namespace x86
}  // namespace disagg

#endif  // DISAGG_X86_SIMD
