// AVX-512 top-k of one row of router logits (torch-free), for rows of up to 256 experts.
//
// The row is loaded once into registers as order-preserving integer keys (NaN -> -inf, -0 -> +0,
// lanes past E below everything), then the k best are extracted one at a time: a vector max,
// the lowest lane holding it (ties go to the lower expert index), and that lane knocked out.
// There is no data-dependent branch, where an insertion sort on random logits mispredicts on
// most of its ~k*ln(E/k) insertions. Results equal detail::topk_logits_row's exactly.
#pragma once

#include "disagg/cpu_features.h"

#if DISAGG_X86_SIMD

#include <immintrin.h>

#include <climits>
#include <cstdint>
#include <cstring>

#include "disagg/common.h"

#ifndef DISAGG_TARGET_AVX512
#define DISAGG_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c")))
#endif

namespace disagg {
namespace x86 {

constexpr int64_t kTopkMaxExperts = 256;

DISAGG_TARGET_AVX512 inline __m512 load16f(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
DISAGG_TARGET_AVX512 inline __m512 load16f(const bf16_t* p, __mmask16 m) {
  const __m256i r = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16));
}
DISAGG_TARGET_AVX512 inline __m512 load16f(const f16_t* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// Order-preserving key of a float: NaN counts as -inf, -0 as +0; lanes outside `m` get INT_MIN,
// below the key of -inf, so they are never chosen while real experts remain (k <= E).
DISAGG_TARGET_AVX512 inline __m512i float_keys(__m512 v, __mmask16 m) {
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  v = _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(-__builtin_inff()));
  v = _mm512_add_ps(v, _mm512_setzero_ps());  // -0 + 0 = +0: equal values, equal keys
  const __m512i b = _mm512_castps_si512(v);
  const __m512i key = _mm512_xor_si512(b, _mm512_and_si512(_mm512_srai_epi32(b, 31), _mm512_set1_epi32(0x7fffffff)));
  return _mm512_mask_mov_epi32(_mm512_set1_epi32(INT_MIN), m, key);
}

inline float key_to_float(int32_t key) {
  const uint32_t b = static_cast<uint32_t>(key < 0 ? key ^ 0x7fffffff : key);
  float f;
  std::memcpy(&f, &b, sizeof(f));
  return f;
}

// R rows (`stride` elements apart) at once: each extraction step is a chain of dependent
// latencies (max, reduce, compare, knock out), so independent rows interleaved keep the core busy.
// vals / idx are [R][k].
template <int NB, int R, typename T>
DISAGG_TARGET_AVX512 void topk_rows_nb(const T* x, int64_t stride, int64_t E, int64_t k,
                                       float* vals, int32_t* idx) {
  __m512i key[R][NB];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int b = 0; b < NB; ++b) {
      const int64_t left = E - 16 * b;
      const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
      key[r][b] = float_keys(load16f(x + r * stride + 16 * b, m), m);
    }
  }
  const __m512i gone = _mm512_set1_epi32(INT_MIN);
  for (int64_t j = 0; j < k; ++j) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512i mx = key[r][0];
#pragma GCC unroll 16
      for (int b = 1; b < NB; ++b) mx = _mm512_max_epi32(mx, key[r][b]);
      const int32_t best = _mm512_reduce_max_epi32(mx);
      const __m512i bv = _mm512_set1_epi32(best);
      // the lowest (block, lane) holding the maximum: the lane masks of blocks 4w..4w+3 in
      // word w, the first set bit isolated without a data-dependent branch
      constexpr int W = (NB + 3) / 4;
      uint64_t wd[W];
#pragma GCC unroll 4
      for (int w = 0; w < W; ++w) wd[w] = 0;
#pragma GCC unroll 16
      for (int b = 0; b < NB; ++b)
        wd[b / 4] |= static_cast<uint64_t>(_mm512_cmpeq_epi32_mask(key[r][b], bv)) << (16 * (b % 4));
      uint64_t one[W];
      int64_t pos = 0;
      bool seen = false;
#pragma GCC unroll 4
      for (int w = 0; w < W; ++w) {
        one[w] = seen ? 0 : (wd[w] & (0 - wd[w]));
        pos = (!seen && wd[w]) ? 64 * w + __builtin_ctzll(wd[w] | (uint64_t(1) << 63)) : pos;
        seen = seen || wd[w] != 0;
      }
#pragma GCC unroll 16
      for (int b = 0; b < NB; ++b) {
        const __mmask16 hit = static_cast<__mmask16>(one[b / 4] >> (16 * (b % 4)));
        key[r][b] = _mm512_mask_mov_epi32(key[r][b], hit, gone);
      }
      idx[r * k + j] = static_cast<int32_t>(pos);
      vals[r * k + j] = key_to_float(best);
    }
  }
}

// Rows interleaved per call for NB blocks of 16 experts (R * NB <= 16 key registers of 32).
constexpr int topk_rows_for(int nb) { return nb <= 4 ? 4 : (nb <= 8 ? 2 : 1); }

template <int NB, typename T>
inline int64_t topk_rows_dispatch(const T* x, int64_t stride, int64_t rows, int64_t E, int64_t k,
                                  float* vals, int32_t* idx) {
  constexpr int R = topk_rows_for(NB);
  if (rows >= R) {
    topk_rows_nb<NB, R>(x, stride, E, k, vals, idx);
    return R;
  }
  topk_rows_nb<NB, 1>(x, stride, E, k, vals, idx);
  return 1;
}

// The k best logits (best first, ties to the lower index) of up to kTopkRows rows starting at
// x, rows `stride` elements apart; E <= kTopkMaxExperts, k <= E. vals / idx are [rows][k].
// Returns how many rows were done (at least 1).
constexpr int64_t kTopkRows = 4;

template <typename T>
inline int64_t topk_logits_rows_avx512(const T* x, int64_t stride, int64_t rows, int64_t E,
                                       int64_t k, float* vals, int32_t* idx) {
  switch ((E + 15) / 16) {
    case 1: return topk_rows_dispatch<1>(x, stride, rows, E, k, vals, idx);
    case 2: return topk_rows_dispatch<2>(x, stride, rows, E, k, vals, idx);
    case 3: return topk_rows_dispatch<3>(x, stride, rows, E, k, vals, idx);
    case 4: return topk_rows_dispatch<4>(x, stride, rows, E, k, vals, idx);
    case 5: return topk_rows_dispatch<5>(x, stride, rows, E, k, vals, idx);
    case 6: return topk_rows_dispatch<6>(x, stride, rows, E, k, vals, idx);
    case 7: return topk_rows_dispatch<7>(x, stride, rows, E, k, vals, idx);
    case 8: return topk_rows_dispatch<8>(x, stride, rows, E, k, vals, idx);
    case 9: return topk_rows_dispatch<9>(x, stride, rows, E, k, vals, idx);
    case 10: return topk_rows_dispatch<10>(x, stride, rows, E, k, vals, idx);
    case 11: return topk_rows_dispatch<11>(x, stride, rows, E, k, vals, idx);
    case 12: return topk_rows_dispatch<12>(x, stride, rows, E, k, vals, idx);
    case 13: return topk_rows_dispatch<13>(x, stride, rows, E, k, vals, idx);
    case 14: return topk_rows_dispatch<14>(x, stride, rows, E, k, vals, idx);
    case 15: return topk_rows_dispatch<15>(x, stride, rows, E, k, vals, idx);
    default: return topk_rows_dispatch<16>(x, stride, rows, E, k, vals, idx);
  }
}

}  // namespace x86
}  // namespace disagg

#endif  // DISAGG_X86_SIMD
