// AVX2 (and, for the quantizing pass, AVX-512) kernels of the quantized KV pack and unpack
// (torch-free), bit-identical to the portable code of kv.h: the absolute maximum of a (block, head) group as an integer max over |x| bits,
// x * inv rounded to int8 or encoded to fp8 e4m3fn (torch's rounding and saturation), and the
// dequantizing decode. Rows of D elements, D a multiple of 32.
#pragma once

#include "disagg/cpu_features.h"

#if DISAGG_X86_SIMD

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "disagg/common.h"

#ifndef DISAGG_TARGET_AVX2
#define DISAGG_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#endif

namespace disagg {
namespace kv {
namespace avx2 {

inline bool is_aligned32(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 31) == 0; }

// ---- loads of 8 elements as float, stores of 8 floats ----------------------------------------

DISAGG_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
DISAGG_TARGET_AVX2 inline __m256 load8(const bf16_t* p) {
  const __m128i r = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r), 16));
}
DISAGG_TARGET_AVX2 inline __m256 load8(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

DISAGG_TARGET_AVX2 inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
DISAGG_TARGET_AVX2 inline void store8(bf16_t* p, __m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i top = _mm256_srli_epi32(u, 16);
  const __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), _mm256_and_si256(top, _mm256_set1_epi32(1))), 16);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i b = _mm256_blendv_epi8(r, _mm256_or_si256(top, _mm256_set1_epi32(0x40)), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}
DISAGG_TARGET_AVX2 inline void store8(f16_t* p, __m256 v) {
  // the hardware conversion rounds to nearest even like from_float<f16_t>; NaN payloads keep
  // their top bits (from_float gives the canonical 0x7e00), so NaN groups, which quantized
  // buffers never hold, are the only place where the two could differ
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// ---- plain copies with non-temporal stores -----------------------------------------------------

// memcpy for large transfers whose destination is not read again soon: the destination lines
// are written without being read first (no read-for-ownership), which saves a third of the
// memory traffic. `next` (or null) is the source of the following copy, prefetched meanwhile.
DISAGG_TARGET_AVX2 inline void stream_copy(void* dst, const void* src, int64_t bytes, const void* next) {
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
  const char* nx = static_cast<const char*>(next);
  int64_t i = 0;
  const int64_t head = std::min<int64_t>(bytes, (32 - (reinterpret_cast<uintptr_t>(d) & 31)) & 31);
  if (head) std::memcpy(d, s, static_cast<size_t>(head));
  i = head;
  for (; i + 128 <= bytes; i += 128) {
    if (nx != nullptr) {
      _mm_prefetch(nx + i, _MM_HINT_T0);
      _mm_prefetch(nx + i + 64, _MM_HINT_T0);
    }
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 64));
    const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 96), e);
  }
  if (i < bytes) std::memcpy(d + i, s + i, static_cast<size_t>(bytes - i));
}

// ---- absolute maximum of a group --------------------------------------------------------------

DISAGG_TARGET_AVX2 inline uint32_t hmax_epu32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}

// max over nt rows (`stride` elements apart) of D elements of |x| as storage bits
DISAGG_TARGET_AVX2 inline uint32_t group_abs_bits(const float* src, int64_t stride, int64_t nt, int64_t D) {
  const __m256i mask = _mm256_set1_epi32(0x7fffffff);
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
  for (int64_t o = 0; o < nt; ++o) {
    const float* r = src + o * stride;
    for (int64_t d = 0; d < D; d += 16) {
      a0 = _mm256_max_epu32(a0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + d)), mask));
      a1 = _mm256_max_epu32(a1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + d + 8)), mask));
    }
  }
  return hmax_epu32(_mm256_max_epu32(a0, a1));
}

template <typename T16>
DISAGG_TARGET_AVX2 inline uint32_t group_abs_bits16(const T16* src, int64_t stride, int64_t nt, int64_t D) {
  const __m256i mask = _mm256_set1_epi16(0x7fff);
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
  for (int64_t o = 0; o < nt; ++o) {
    const T16* r = src + o * stride;
    for (int64_t d = 0; d < D; d += 32) {
      a0 = _mm256_max_epu16(a0, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + d)), mask));
      a1 = _mm256_max_epu16(a1, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + d + 16)), mask));
    }
  }
  const __m256i m = _mm256_max_epu16(a0, a1);
  // widen the 16 halves to 32 bits (both are non-negative) and reduce
  const __m256i lo = _mm256_and_si256(m, _mm256_set1_epi32(0xffff));
  const __m256i hi = _mm256_srli_epi32(m, 16);
  return hmax_epu32(_mm256_max_epu32(lo, hi));
}
DISAGG_TARGET_AVX2 inline uint32_t group_abs_bits(const bf16_t* src, int64_t stride, int64_t nt, int64_t D) {
  return group_abs_bits16(src, stride, nt, D);
}
DISAGG_TARGET_AVX2 inline uint32_t group_abs_bits(const f16_t* src, int64_t stride, int64_t nt, int64_t D) {
  return group_abs_bits16(src, stride, nt, D);
}

// ---- quantize ----------------------------------------------------------------------------------

// fp8 e4m3fn codes (in the low byte of each lane) of 8 floats, bit-identical to kv.h's
// fp8e4m3_from_float: |y| clamped to 448 (torch saturates, inf included), the normal code
// (exponent rebias, mantissa rounded to nearest even) and the subnormal code (|y| * 512 rounded)
// combined by a max -- below 2^-6 the subnormal code is never smaller, from 2^-6 on it is 8 and
// the normal code is not (checked for every float) -- then NaN and the sign.
DISAGG_TARGET_AVX2 inline __m256i fp8_codes(__m256 y) {
  const __m256i u = _mm256_castps_si256(y);
  const __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i c = _mm256_min_epi32(a, _mm256_set1_epi32(0x43e00000));
  const __m256i sub = _mm256_cvtps_epi32(
      _mm256_mul_ps(_mm256_castsi256_ps(_mm256_min_epi32(c, _mm256_set1_epi32(0x3c800000))), _mm256_set1_ps(512.0f)));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(c, 20), _mm256_set1_epi32(1));
  const __m256i nrm = _mm256_sub_epi32(
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(c, _mm256_set1_epi32(0x7ffff)), lsb), 20),
      _mm256_set1_epi32((127 - 7) << 3));
  __m256i r = _mm256_max_epi32(nrm, sub);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7f), _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7f800000)));
  return _mm256_or_si256(r, _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80)));
}

// int8 values (in each 32-bit lane) of 8 floats: round to nearest even, clamp to [-127, 127]
DISAGG_TARGET_AVX2 inline __m256i int8_values(__m256 y) {
  const __m256i r = _mm256_cvtps_epi32(y);
  return _mm256_max_epi32(_mm256_min_epi32(r, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
}

// four vectors of 8 lanes holding bytes -> 32 bytes in order
DISAGG_TARGET_AVX2 inline __m256i pack_bytes(__m256i a, __m256i b, __m256i c, __m256i d, bool is_signed) {
  const __m256i ab = is_signed ? _mm256_packs_epi32(a, b) : _mm256_packus_epi32(a, b);
  const __m256i cd = is_signed ? _mm256_packs_epi32(c, d) : _mm256_packus_epi32(c, d);
  const __m256i x = is_signed ? _mm256_packs_epi16(ab, cd) : _mm256_packus_epi16(ab, cd);
  // per 128-bit lane the dwords are [a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7]
  return _mm256_permutevar8x32_epi32(x, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// nt rows of D elements (`src_stride` apart) times inv into rows `dst_stride` bytes apart;
// `stream`: non-temporal stores where the destination is 32-byte aligned.
template <typename T>
DISAGG_TARGET_AVX2 void quantize_rows(bool int8, const T* src, int64_t src_stride, uint8_t* dst,
                                      int64_t dst_stride, int64_t nt, int64_t D, float inv, bool stream) {
  const __m256 vinv = _mm256_set1_ps(inv);
  for (int64_t o = 0; o < nt; ++o) {
    const T* s = src + o * src_stride;
    uint8_t* q = dst + o * dst_stride;
    const bool nt_row = stream && is_aligned32(q);
    for (int64_t d = 0; d < D; d += 32) {
      const __m256 y0 = _mm256_mul_ps(load8(s + d), vinv);
      const __m256 y1 = _mm256_mul_ps(load8(s + d + 8), vinv);
      const __m256 y2 = _mm256_mul_ps(load8(s + d + 16), vinv);
      const __m256 y3 = _mm256_mul_ps(load8(s + d + 24), vinv);
      const __m256i b = int8 ? pack_bytes(int8_values(y0), int8_values(y1), int8_values(y2), int8_values(y3), true)
                             : pack_bytes(fp8_codes(y0), fp8_codes(y1), fp8_codes(y2), fp8_codes(y3), false);
      if (nt_row) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(q + d), b);
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + d), b);
      }
    }
  }
}

// ---- the same with AVX-512 (16 lanes, 32 registers): the fp8 encoder is ALU-bound in AVX2 ----

#ifndef DISAGG_TARGET_AVX512
#define DISAGG_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c")))
#endif

DISAGG_TARGET_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
DISAGG_TARGET_AVX512 inline __m512 load16(const bf16_t* p) {
  const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16));
}
DISAGG_TARGET_AVX512 inline __m512 load16(const f16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

DISAGG_TARGET_AVX512 inline __m512i fp8_codes16(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
  const __m512i c = _mm512_min_epi32(a, _mm512_set1_epi32(0x43e00000));
  const __m512i sub = _mm512_cvtps_epi32(
      _mm512_mul_ps(_mm512_castsi512_ps(_mm512_min_epi32(c, _mm512_set1_epi32(0x3c800000))), _mm512_set1_ps(512.0f)));
  // the exponent rebias folded into the rounding add; an arithmetic shift keeps the (then
  // negative) values below 2^-6 small, where the max picks the subnormal code anyway
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(c, 20), _mm512_set1_epi32(1));
  const __m512i nrm = _mm512_srai_epi32(
      _mm512_add_epi32(_mm512_add_epi32(c, _mm512_set1_epi32(0x7ffff - (((127 - 7) << 3) << 20))), lsb), 20);
  __m512i r = _mm512_max_epi32(nrm, sub);
  r = _mm512_mask_mov_epi32(r, _mm512_cmpgt_epi32_mask(a, _mm512_set1_epi32(0x7f800000)), _mm512_set1_epi32(0x7f));
  return _mm512_mask_or_epi32(r, _mm512_cmplt_epi32_mask(u, _mm512_setzero_si512()), r, _mm512_set1_epi32(0x80));
}

DISAGG_TARGET_AVX512 inline __m512i int8_values16(__m512 y) {
  const __m512i r = _mm512_cvtps_epi32(y);
  return _mm512_max_epi32(_mm512_min_epi32(r, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
}

template <bool kInt8, typename T>
DISAGG_TARGET_AVX512 inline __attribute__((always_inline)) void quantize_rows512(const T* src, uint8_t* dst, int64_t D, float inv, bool stream) {
  const __m512 vinv = _mm512_set1_ps(inv);
  int64_t d = 0;
  if (stream && D % 64 == 0 && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
    // whole 64-byte lines per non-temporal store: a line written in halves can leave the
    // write-combining buffer early and cost a read after all
    for (; d < D; d += 64) {
      __m128i b[4];
      for (int i = 0; i < 4; ++i) {
        const __m512 y = _mm512_mul_ps(load16(src + d + 16 * i), vinv);
        b[i] = _mm512_cvtepi32_epi8(kInt8 ? int8_values16(y) : fp8_codes16(y));
      }
      const __m512i v = _mm512_inserti64x4(
          _mm512_castsi256_si512(_mm256_inserti128_si256(_mm256_castsi128_si256(b[0]), b[1], 1)),
          _mm256_inserti128_si256(_mm256_castsi128_si256(b[2]), b[3], 1), 1);
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + d), v);
    }
    return;
  }
  const bool nt_row = stream && is_aligned32(dst);
  for (; d < D; d += 32) {
    const __m512 y0 = _mm512_mul_ps(load16(src + d), vinv);
    const __m512 y1 = _mm512_mul_ps(load16(src + d + 16), vinv);
    // values fit a byte (int8 clamped to +-127, fp8 codes 0..255): vpmovdb truncates exactly
    const __m128i b0 = _mm512_cvtepi32_epi8(kInt8 ? int8_values16(y0) : fp8_codes16(y0));
    const __m128i b1 = _mm512_cvtepi32_epi8(kInt8 ? int8_values16(y1) : fp8_codes16(y1));
    const __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(b0), b1, 1);
    if (nt_row) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + d), b);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), b);
    }
  }
}

// fp8 e4m3fn codes of 32 bf16 values times 2^-k (the power-of-two fp8 scale, -116 <= k, and
// |x| * 2^-k <= 448), in the low byte of each 16-bit lane, without float arithmetic: 32 lanes a
// vector where the float encoder has 16. Normal results (|y| >= 2^-6, i.e. exponent field
// >= 121 + k) drop 4 of bf16's 7 mantissa bits rounding to nearest even and move the exponent
// bias by an integer subtract (`c_nrm` = (120 + k) << 3). Results below 2^-6 are rare in a
// group scaled to its maximum: only when a vector holds one does the subnormal path run,
// RNE(M >> s) with M the 8-bit significand and s = 125 + k - exponent (>= 5; s >= 9 gives 0, as
// do bf16 denormals since k >= -116). Bit-identical to fp8e4m3_from_float(x * 2^-k).
DISAGG_TARGET_AVX512 inline __m512i fp8_codes32_bf16(__m512i v, __m512i c_nrm, __m512i thr_m1,
                                                     __m512i s_base) {
  const __m512i a = _mm512_and_si512(v, _mm512_set1_epi16(0x7fff));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi16(a, 4), _mm512_set1_epi16(1));
  const __m512i t = _mm512_srli_epi16(_mm512_add_epi16(_mm512_add_epi16(a, _mm512_set1_epi16(7)), lsb), 4);
  // zeros give 0 (a mask, not the subtract's wrap-around)
  __m512i r = _mm512_maskz_sub_epi16(_mm512_test_epi16_mask(a, a), t, c_nrm);
  // 0 < a < threshold  <=>  a - 1 < threshold - 1 (unsigned): nonzero results below 2^-6
  const __mmask32 sub = _mm512_cmplt_epu16_mask(_mm512_sub_epi16(a, _mm512_set1_epi16(1)), thr_m1);
  if (__builtin_expect(sub != 0, 0)) {
    const __m512i s = _mm512_min_epu16(_mm512_sub_epi16(s_base, _mm512_srli_epi16(a, 7)), _mm512_set1_epi16(16));
    const __m512i m = _mm512_or_si512(_mm512_and_si512(a, _mm512_set1_epi16(0x7f)), _mm512_set1_epi16(0x80));
    const __m512i one = _mm512_set1_epi16(1);
    const __m512i half_m1 = _mm512_sub_epi16(_mm512_sllv_epi16(one, _mm512_sub_epi16(s, one)), one);
    const __m512i odd = _mm512_and_si512(_mm512_srlv_epi16(m, s), one);
    r = _mm512_mask_mov_epi16(r, sub, _mm512_srlv_epi16(_mm512_add_epi16(_mm512_add_epi16(m, half_m1), odd), s));
  }
  // | the sign: r | ((v >> 8) & 0x80)
  return _mm512_ternarylogic_epi32(r, _mm512_srli_epi16(v, 8), _mm512_set1_epi16(0x80), 0xf8);
}

// Rows of D bf16 values (D a multiple of 32) to fp8 with scale 2^k.
DISAGG_TARGET_AVX512 inline __attribute__((always_inline)) void quantize_rows512_fp8_bf16(
    const bf16_t* src, uint8_t* dst, int64_t D, int32_t k, bool stream) {
  const __m512i c_nrm = _mm512_set1_epi16(static_cast<int16_t>((120 + k) << 3));
  const __m512i thr_m1 = _mm512_set1_epi16(static_cast<int16_t>(((121 + k) << 7) - 1));
  const __m512i s_base = _mm512_set1_epi16(static_cast<int16_t>(125 + k));
  int64_t d = 0;
  if (stream && D % 64 == 0 && (reinterpret_cast<uintptr_t>(dst) & 63) == 0) {
    for (; d < D; d += 64) {  // whole 64-byte lines per non-temporal store
      const __m256i b0 = _mm512_cvtepi16_epi8(fp8_codes32_bf16(_mm512_loadu_si512(src + d), c_nrm, thr_m1, s_base));
      const __m256i b1 = _mm512_cvtepi16_epi8(fp8_codes32_bf16(_mm512_loadu_si512(src + d + 32), c_nrm, thr_m1, s_base));
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + d), _mm512_inserti64x4(_mm512_castsi256_si512(b0), b1, 1));
    }
    return;
  }
  const bool nt_row = stream && is_aligned32(dst);
  for (; d < D; d += 32) {
    const __m256i b = _mm512_cvtepi16_epi8(fp8_codes32_bf16(_mm512_loadu_si512(src + d), c_nrm, thr_m1, s_base));
    if (nt_row) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + d), b);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), b);
    }
  }
}

// (the element type and the quantization are template parameters, so that each loop is compiled
// with its constants in registers)
template <bool kInt8, typename T>
DISAGG_TARGET_AVX512 void quantize_block512_t(const T* base, int64_t stride_token, int64_t stride_head,
                                              int64_t nt, int64_t Hc, int64_t D, const float* inv,
                                              const char* skip, uint8_t* dst, int64_t row, bool stream,
                                              const T* next) {
  for (int64_t o = 0; o < nt; ++o)
    for (int64_t h = 0; h < Hc; ++h) {
      const int64_t off = o * stride_token + h * stride_head;
      if (next != nullptr)
        for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(next + off) + b, _MM_HINT_T0);
      if (skip[h]) continue;
      if constexpr (!kInt8 && std::is_same<T, bf16_t>::value) {
        // a power-of-two scale 2^k: inv = 2^-k (0 for an all-zero group, which keeps the float path)
        uint32_t ib;
        std::memcpy(&ib, inv + h, sizeof(ib));
        const int32_t k = 127 - static_cast<int32_t>(ib >> 23);
        if (inv[h] != 0.0f && k >= -116 && D % 32 == 0) {
          quantize_rows512_fp8_bf16(base + off, dst + o * row + h * D, D, k, stream);
          continue;
        }
      }
      quantize_rows512<kInt8>(base + off, dst + o * row + h * D, D, inv[h], stream);
    }
}

template <typename T>
inline void quantize_block512(bool int8, const T* base, int64_t stride_token, int64_t stride_head,
                              int64_t nt, int64_t Hc, int64_t D, const float* inv, const char* skip,
                              uint8_t* dst, int64_t row, bool stream, const T* next) {
  if (int8) {
    quantize_block512_t<true>(base, stride_token, stride_head, nt, Hc, D, inv, skip, dst, row, stream, next);
  } else {
    quantize_block512_t<false>(base, stride_token, stride_head, nt, Hc, D, inv, skip, dst, row, stream, next);
  }
}

// A whole (layer, K/V, block) item, token by token (the order the cache and the buffer are laid
// out in, so reads and writes stream): mx[h] = the group's max |x| bits over its nt tokens.
// `lanes` is scratch of Hc * 8 words: one vector of running maxima per head, reduced once.
DISAGG_TARGET_AVX2 inline __m256i abs_max_row(const float* r, int64_t D, __m256i acc) {
  const __m256i mask = _mm256_set1_epi32(0x7fffffff);
  for (int64_t d = 0; d < D; d += 8)
    acc = _mm256_max_epu32(acc, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + d)), mask));
  return acc;
}
template <typename T16>
DISAGG_TARGET_AVX2 inline __m256i abs_max_row(const T16* r, int64_t D, __m256i acc) {
  const __m256i mask = _mm256_set1_epi16(0x7fff);
  for (int64_t d = 0; d < D; d += 16)
    acc = _mm256_max_epu16(acc, _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + d)), mask));
  return acc;
}
DISAGG_TARGET_AVX2 inline uint32_t reduce_abs(__m256i acc, const float*) { return hmax_epu32(acc); }
template <typename T16>
DISAGG_TARGET_AVX2 inline uint32_t reduce_abs(__m256i acc, const T16*) {
  return hmax_epu32(_mm256_max_epu32(_mm256_and_si256(acc, _mm256_set1_epi32(0xffff)), _mm256_srli_epi32(acc, 16)));
}

template <typename T>
DISAGG_TARGET_AVX2 void block_abs_bits(const T* base, int64_t stride_token, int64_t stride_head,
                                       int64_t nt, int64_t Hc, int64_t D, uint32_t* mx, uint32_t* lanes) {
  __m256i* acc = reinterpret_cast<__m256i*>(lanes);
  for (int64_t h = 0; h < Hc; ++h) _mm256_storeu_si256(acc + h, _mm256_setzero_si256());
  for (int64_t o = 0; o < nt; ++o)
    for (int64_t h = 0; h < Hc; ++h)
      _mm256_storeu_si256(acc + h, abs_max_row(base + o * stride_token + h * stride_head, D,
                                               _mm256_loadu_si256(acc + h)));
  for (int64_t h = 0; h < Hc; ++h) mx[h] = reduce_abs(_mm256_loadu_si256(acc + h), base);
}

// ... and its payload: token o, head h -> dst + o * row + h * D, times inv[h] (heads with
// skip[h] set are left unwritten: their group is not finite and the pack fails). Items are
// whole blocks at scattered places: `next` (the next item's base, or null) is prefetched row by
// row meanwhile, so its misses overlap this pass's arithmetic (the first pass then reads from
// cache).
template <typename T>
DISAGG_TARGET_AVX2 inline void prefetch_row(const T* p, int64_t D) {
  for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(T)); b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
}

template <typename T>
DISAGG_TARGET_AVX2 void quantize_block(bool int8, const T* base, int64_t stride_token, int64_t stride_head,
                                       int64_t nt, int64_t Hc, int64_t D, const float* inv,
                                       const char* skip, uint8_t* dst, int64_t row, bool stream,
                                       const T* next) {
  for (int64_t o = 0; o < nt; ++o)
    for (int64_t h = 0; h < Hc; ++h) {
      const int64_t off = o * stride_token + h * stride_head;
      if (next != nullptr) prefetch_row(next + off, D);
      if (!skip[h]) quantize_rows(int8, base + off, 0, dst + o * row + h * D, 0, 1, D, inv[h], stream);
    }
}

// ---- dequantize ---------------------------------------------------------------------------------

// 8 fp8 e4m3fn codes (bytes) -> floats: kv.h's fp8e4m3_to_float
DISAGG_TARGET_AVX2 inline __m256 fp8_decode(__m128i bytes8) {
  const __m256i b = _mm256_cvtepu8_epi32(bytes8);
  const __m256i m = _mm256_and_si256(b, _mm256_set1_epi32(0x7f));
  const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(m, 20), _mm256_set1_epi32((127 - 7) << 23));
  const __m256i sub = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(m), _mm256_set1_ps(0.001953125f)));
  __m256i r = _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(8), m));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc00000), _mm256_cmpeq_epi32(m, _mm256_set1_epi32(0x7f)));
  return _mm256_castsi256_ps(_mm256_or_si256(r, _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24)));
}

DISAGG_TARGET_AVX2 inline __m256 int8_decode(__m128i bytes8) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes8));
}

// one token: Hc rows of D bytes (contiguous) into rows `dst_head_stride` elements apart, head h
// scaled by scales[h]
template <typename T>
DISAGG_TARGET_AVX2 void dequantize_token(bool int8, const uint8_t* src, T* dst, int64_t dst_head_stride,
                                         int64_t Hc, int64_t D, const float* scales) {
  for (int64_t h = 0; h < Hc; ++h) {
    const uint8_t* q = src + h * D;
    T* o = dst + h * dst_head_stride;
    const __m256 sc = _mm256_set1_ps(scales[h]);
    for (int64_t d = 0; d < D; d += 8) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + d));
      const __m256 x = int8 ? int8_decode(b) : fp8_decode(b);
      store8(o + d, _mm256_mul_ps(x, sc));
    }
  }
}

}  // namespace avx2
}  // namespace kv
}  // namespace disagg

#endif  // DISAGG_X86_SIMD
