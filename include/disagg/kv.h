// Paged KV cache kernels on the CPU (torch-free): pack a request's blocks into one
// self-describing buffer (optionally a head slice, optionally int8/fp8 quantized), unpack it into
// a cache of another block size / head count / dtype / layout, and compact accepted tokens.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "disagg/common.h"
#include "disagg/cpu_features.h"
#include "disagg/kv_avx2.h"
#include "disagg/kv_format.h"

// The conversions below select between values computed on both paths; GCC only turns such
// selects into vector blends when it may assume FP operations do not trap. Nothing here reads
// the FP exception flags, so the results are the same either way.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// The row loops are also compiled for AVX2 (see DISAGG_MULTIVERSION in common.h).
#define DISAGG_KV_ROW DISAGG_MULTIVERSION

namespace disagg {
namespace kv {

// Work below this many bytes runs on the calling thread: waking a thread team costs more than
// the copy, and on a busy machine a descheduled team member stalls the whole op.
constexpr int64_t kParallelBytes = int64_t(1) << 20;

// ---- element conversions ---------------------------------------------------------------------
// Written branch-free (selects instead of ifs) so that the compiler vectorizes the row loops at
// the baseline ISA; results are bit-identical to common.h's to_float/from_float and to torch.

// Local min/max: std::min/std::max are compiled outside the optimize pragma above, and GCC does
// not inline across differing options, which would leave a call in every vector loop.
template <typename T> inline T kmin(T a, T b) { return b < a ? b : a; }
template <typename T> inline T kmax(T a, T b) { return a < b ? b : a; }

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, sizeof(u)); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, sizeof(f)); return f; }

// Adding and removing 1.5 * 2^23 rounds a float with |x| < 2^22 to an integer, half to even,
// without a libm call (nearbyint is a function call on baseline x86-64 and blocks vectorizing).
inline float round_half_even(float x) {
  constexpr float kMagic = 12582912.0f;
  return (x + kMagic) - kMagic;
}

inline float load(float x) { return x; }
inline float load(bf16_t x) { return u2f(static_cast<uint32_t>(x.bits) << 16); }
inline float load(f16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = h & 0x7c00u, mant = h & 0x3ffu;
  // three candidates, then a select: normal (exponent rebased 15 -> 127 by an integer add),
  // subnormal (mant * 2^-24: an exact int->float and a product that is a normal float, so the
  // result does not depend on denormals-are-zero mode), inf/NaN (payload kept, quiet bit set
  // as the hardware conversion torch uses does)
  const uint32_t normal = (((h & 0x7fffu) << 13) + ((127u - 15u) << 23));
  const uint32_t sub = f2u(static_cast<float>(static_cast<int32_t>(mant)) * 5.9604644775390625e-8f);
  const uint32_t special = 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u);
  const uint32_t r = exp == 0x7c00u ? special : (exp == 0 ? sub : normal);
  return u2f(r | sign);
}

template <typename T> inline T store(float f);
template <> inline float store<float>(float f) { return f; }
template <> inline bf16_t store<bf16_t>(float f) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // nearest even
  const uint32_t nan = (u >> 16) | 0x40u;                           // quiet NaN, sign kept
  return bf16_t{static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded)};
}
template <> inline f16_t store<f16_t>(float f) { return from_float<f16_t>(f); }

// |x| as an unsigned integer of the storage width: for non-negative floats the bit patterns
// order like the values, so an integer max finds the absolute maximum (and inf/NaN sort above
// every finite value, which is how non-finite groups are detected).
inline uint32_t abs_bits(float x) { return f2u(x) & 0x7fffffffu; }
inline uint16_t abs_bits(bf16_t x) { return static_cast<uint16_t>(x.bits & 0x7fffu); }
inline uint16_t abs_bits(f16_t x) { return static_cast<uint16_t>(x.bits & 0x7fffu); }
template <typename T> struct AbsBits;
template <> struct AbsBits<float> { using type = uint32_t; static constexpr uint32_t kInf = 0x7f800000u; };
template <> struct AbsBits<bf16_t> { using type = uint16_t; static constexpr uint32_t kInf = 0x7f80u; };
template <> struct AbsBits<f16_t> { using type = uint16_t; static constexpr uint32_t kInf = 0x7c00u; };
inline float from_abs_bits(uint32_t b, float*) { return u2f(b); }
inline float from_abs_bits(uint32_t b, bf16_t*) { return load(bf16_t{static_cast<uint16_t>(b)}); }
inline float from_abs_bits(uint32_t b, f16_t*) { return load(f16_t{static_cast<uint16_t>(b)}); }

// float -> fp8 e4m3fn (bias 7, no infinities, 0x7f/0xff = NaN, max 448), rounding to nearest
// even like torch's float8_e4m3fn cast (torch 2.13), including its edge cases: it saturates,
// so every |x| > 448 and +-inf give +-448 (0x7e/0xfe), and NaN gives the NaN code with its sign.
inline uint8_t fp8e4m3_from_float(float f) {
  const uint32_t u = f2u(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  const int32_t a = static_cast<int32_t>(u & 0x7fffffffu);  // < 2^31: signed compares are exact
  // below 2^-6 the grid is the subnormal step 2^-9: |f| * 512 is exact and rounds to 0..8,
  // where 8 is code 0x08, exactly the smallest normal (the integer min() keeps the lanes that
  // take the normal path, inf and NaN included, small and finite)
  const float sub_f = round_half_even(u2f(static_cast<uint32_t>(kmin(a, 0x3c800000))) * 512.0f);
  const int32_t sub = static_cast<int32_t>(sub_f);
  // normal: drop 20 of the 23 mantissa bits rounding to nearest even (a carry into the exponent
  // is the right result), then move the exponent bias from 127 to 7
  const uint32_t ua = static_cast<uint32_t>(a);  // unsigned: the rounding add may pass 2^31
  const int32_t nrm = static_cast<int32_t>(((ua + 0x7ffffu + ((ua >> 20) & 1u)) >> 20) - ((127u - 7u) << 3));
  int32_t r = a < 0x3c800000 ? sub : nrm;
  r = a > 0x43e00000 ? 0x7e : r;  // beyond 448.0f, inf included: saturate
  r = a > 0x7f800000 ? 0x7f : r;  // NaN
  return static_cast<uint8_t>(static_cast<uint32_t>(r) | sign);
}

inline float fp8e4m3_to_float(uint8_t b) {
  const uint32_t m = b & 0x7fu;
  // normal: exponent rebased 7 -> 127 by an integer add; subnormal (exponent field 0):
  // m * 2^-9 from an exact int->float (no denormal arithmetic, so FTZ/DAZ modes do not matter)
  const uint32_t normal = (m << 20) + ((127u - 7u) << 23);
  const uint32_t sub = f2u(static_cast<float>(static_cast<int32_t>(m)) * 0.001953125f);
  uint32_t r = m < 8u ? sub : normal;
  r = m == 0x7fu ? 0x7fc00000u : r;
  return u2f(r | (static_cast<uint32_t>(b & 0x80u) << 24));
}

// Copy n elements with a dtype change (memcpy when the types agree).
template <typename S, typename D>
DISAGG_KV_ROW void convert_row(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same<S, D>::value) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(S));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = store<D>(load(src[i]));
  }
}

// Symmetric quantization parameters of one group from its absolute maximum. `scale` is what the
// receiver multiplies by; `inv` what the sender multiplies by. An all-zero group gets scale 0.
struct QuantParams { float scale, inv; };

inline QuantParams quant_params(Quant q, float amax) {
  if (!(amax > 0.0f)) return {0.0f, 0.0f};
  if (q == Quant::kInt8) return {amax / 127.0f, 127.0f / amax};
  const int32_t k = fp8_scale_exponent(f2u(amax));  // a power of two: see kv_format.h
  return {u2f(pow2_bits(k)), u2f(pow2_bits(-k))};
}

template <typename T>
inline void quantize_row(Quant q, const T* src, uint8_t* dst, int64_t n, float inv) {
  if (q == Quant::kInt8) {
    // |x * inv| <= 127 up to one rounding of inv, so the rounded value fits an int32 and the
    // clamp (in integers, cheaper than float compares) only catches a hair above 127
    for (int64_t i = 0; i < n; ++i) {
      const int32_t r = static_cast<int32_t>(round_half_even(load(src[i]) * inv));
      dst[i] = static_cast<uint8_t>(static_cast<int8_t>(kmin(127, kmax(-127, r))));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = fp8e4m3_from_float(load(src[i]) * inv);
  }
}

template <typename T>
inline void dequantize_row(Quant q, const uint8_t* src, T* dst, int64_t n, float scale) {
  if (q == Quant::kInt8) {
    for (int64_t i = 0; i < n; ++i)
      dst[i] = store<T>(static_cast<float>(static_cast<int8_t>(src[i])) * scale);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = store<T>(fp8e4m3_to_float(src[i]) * scale);
  }
}

// One (block, head) group of nt rows of D elements (rows `src_stride` / `dst_stride` apart):
// its absolute maximum, its scale, and the quantized rows. One call per group keeps the
// dispatch to the AVX2 clone and the loop set-up off the per-row path. Returns false (and
// writes nothing but a NaN scale) when the group holds inf or NaN.
template <typename T>
DISAGG_KV_ROW bool quantize_group(Quant q, const T* src, int64_t src_stride, uint8_t* dst,
                                  int64_t dst_stride, int64_t nt, int64_t D, float* scale) {
  typename AbsBits<T>::type mx = 0;
  for (int64_t o = 0; o < nt; ++o) {
    const T* r = src + o * src_stride;
    for (int64_t d = 0; d < D; ++d) mx = kmax(mx, abs_bits(r[d]));
  }
  if (mx >= AbsBits<T>::kInf) {
    *scale = std::numeric_limits<float>::quiet_NaN();
    return false;
  }
  const QuantParams qp = quant_params(q, from_abs_bits(mx, static_cast<T*>(nullptr)));
  *scale = qp.scale;
  for (int64_t o = 0; o < nt; ++o) quantize_row(q, src + o * src_stride, dst + o * dst_stride, D, qp.inv);
  return true;
}

// Buffers of this size and more are written with non-temporal stores where the kernels can:
// the receiver reads them from memory anyway, and they would only evict the cache rows still to
// be read.
constexpr int64_t kStreamBytes = int64_t(4) << 20;

// One token of a quantized payload (Hc rows of D bytes, contiguous) into the destination (rows
// `dst_head_stride` apart), head h scaled by scales[h].
template <typename T>
DISAGG_KV_ROW void dequantize_token(Quant q, const uint8_t* src, T* dst, int64_t dst_head_stride,
                                    int64_t Hc, int64_t D, const float* scales) {
  for (int64_t h = 0; h < Hc; ++h) dequantize_row(q, src + h * D, dst + h * dst_head_stride, D, scales[h]);
}

// ---- pack ------------------------------------------------------------------------------------

struct PackParams {
  CacheGeom g;
  int64_t num_layers = 0;  // layers in the buffer
  int64_t num_tokens = 0;
  int64_t head_start = 0, head_count = 0;
  Quant quant = Quant::kNone;
};

// Source element (block b, kv c, token-in-block o, head h, dim 0) of one layer.
inline int64_t cache_offset(const CacheGeom& g, int64_t b, int64_t c, int64_t o, int64_t h) {
  return b * g.stride_block + c * g.stride_kv + o * g.stride_token + h * g.stride_head;
}

// layers[i] points at the cache of the i-th packed layer. `out` receives header + payload +
// scales (hdr.total_bytes, checked against out_bytes). The block ids must be checked by the
// caller with find_bad_block; they are re-checked here so the kernel is safe on its own.
template <typename T, typename Idx>
Status pack_cpu(const T* const* layers, const Idx* table, int64_t table_len, const PackParams& p,
                const BufferHeader& hdr, uint8_t* out, int64_t out_bytes) {
  const CacheGeom& g = p.g;
  const int64_t bs = g.block_size, D = g.head_dim, Hc = p.head_count;
  if (hdr.total_bytes > out_bytes) return Status::kBufferTooSmall;
  if (ceil_div(p.num_tokens, bs) > table_len) return Status::kInvalidArgument;
  if (find_bad_block(table, ceil_div(p.num_tokens, bs), g.num_blocks) >= 0) return Status::kInvalidArgument;
  if (p.head_start < 0 || p.head_start + Hc > g.num_heads) return Status::kInvalidArgument;
  std::memcpy(out, &hdr, sizeof(hdr));
  const int64_t nblk = ceil_div(p.num_tokens, bs);
  // the bytes between the payload and the 16-byte aligned scales are part of the buffer too:
  // zero them rather than send whatever the allocation held
  const int64_t payload_end = hdr.payload_offset + p.num_layers * 2 * p.num_tokens * Hc * D * hdr.elem_bytes;
  std::memset(out + payload_end, 0, static_cast<size_t>(hdr.scales_offset - payload_end));
  const bool stream = hdr.total_bytes >= kStreamBytes;
  const int64_t items = p.num_layers * 2 * nblk;
  const int64_t row = Hc * D;  // payload elements per token
  uint8_t* payload = out + hdr.payload_offset;
  float* scales = reinterpret_cast<float*>(out + hdr.scales_offset);
  // a token's heads are contiguous in the cache when heads are the inner dim (NHD)
  const bool heads_contig = g.stride_head == D;
  // a whole block is one contiguous run when, in addition, all heads are taken
  const bool block_contig = heads_contig && Hc == g.num_heads && g.stride_token == g.num_heads * D;
#if DISAGG_X86_SIMD
  const bool simd_quant = p.quant != Quant::kNone && D % 32 == 0 && cpu::use_avx2();
  const bool wide = simd_quant && cpu::use_avx512();
  const bool stream_plain = stream && cpu::use_avx2();
#endif
#pragma omp parallel if (items * bs * row * static_cast<int64_t>(sizeof(T)) > kParallelBytes)
  {
  std::vector<uint32_t> mx(static_cast<size_t>(Hc)), lanes(static_cast<size_t>(Hc) * 8);
  std::vector<float> inv(static_cast<size_t>(Hc));
  std::vector<char> skip(static_cast<size_t>(Hc));
#pragma omp for schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t l = it / (2 * nblk), c = (it / nblk) % 2, j = it % nblk;
    const T* base = layers[l] + cache_offset(g, static_cast<int64_t>(table[j]), c, 0, p.head_start);
    const int64_t t0 = j * bs, nt = kmin(bs, p.num_tokens - t0);
    const int64_t first = ((l * 2 + c) * p.num_tokens + t0) * row;  // payload element index
    if (p.quant == Quant::kNone) {
      T* dst = reinterpret_cast<T*>(payload) + first;
#if DISAGG_X86_SIMD
      if (block_contig && stream_plain) {
        const T* next = nullptr;
        if (it + 1 < items) {
          const int64_t l1 = (it + 1) / (2 * nblk), c1 = ((it + 1) / nblk) % 2, j1 = (it + 1) % nblk;
          next = layers[l1] + cache_offset(g, static_cast<int64_t>(table[j1]), c1, 0, p.head_start);
        }
        avx2::stream_copy(dst, base, nt * row * static_cast<int64_t>(sizeof(T)), next);
        continue;
      }
#endif
      if (block_contig) {
        std::memcpy(dst, base, static_cast<size_t>(nt * row) * sizeof(T));
      } else if (heads_contig) {
        for (int64_t o = 0; o < nt; ++o)
          std::memcpy(dst + o * row, base + o * g.stride_token, static_cast<size_t>(row) * sizeof(T));
      } else {
        for (int64_t o = 0; o < nt; ++o)
          for (int64_t h = 0; h < Hc; ++h)
            std::memcpy(dst + o * row + h * D, base + o * g.stride_token + h * g.stride_head,
                        static_cast<size_t>(D) * sizeof(T));
      }
      continue;
    }
    // Quantized: one scale per (block, head) from the block's absolute maximum.
    uint8_t* dst = payload + first;
    float* sc = scales + ((l * 2 + c) * nblk + j) * Hc;
#if DISAGG_X86_SIMD
    if (simd_quant) {  // two passes over the item in memory order; the second reads from L1/L2
      const T* next = nullptr;
      if (it + 1 < items) {
        const int64_t l1 = (it + 1) / (2 * nblk), c1 = ((it + 1) / nblk) % 2, j1 = (it + 1) % nblk;
        next = layers[l1] + cache_offset(g, static_cast<int64_t>(table[j1]), c1, 0, p.head_start);
      }
      avx2::block_abs_bits(base, g.stride_token, g.stride_head, nt, Hc, D, mx.data(), lanes.data());
      for (int64_t h = 0; h < Hc; ++h) {
        skip[h] = mx[h] >= AbsBits<T>::kInf;
        const QuantParams qp = quant_params(p.quant, from_abs_bits(mx[h], static_cast<T*>(nullptr)));
        sc[h] = skip[h] ? std::numeric_limits<float>::quiet_NaN() : qp.scale;
        inv[h] = qp.inv;
      }
      if (wide) {
        avx2::quantize_block512(p.quant == Quant::kInt8, base, g.stride_token, g.stride_head, nt, Hc,
                                D, inv.data(), skip.data(), dst, row, stream, next);
      } else {
        avx2::quantize_block(p.quant == Quant::kInt8, base, g.stride_token, g.stride_head, nt, Hc, D,
                             inv.data(), skip.data(), dst, row, stream, next);
      }
      continue;
    }
#endif
    for (int64_t h = 0; h < Hc; ++h)
      quantize_group(p.quant, base + h * g.stride_head, g.stride_token, dst + h * D, row, nt, D, sc + h);
  }
#if DISAGG_X86_SIMD
  if (stream) _mm_sfence();  // each thread orders its non-temporal stores before the op returns
#endif
  }
  if (p.quant != Quant::kNone) {
    // non-finite values have no meaningful scale: report instead of sending garbage
    const int64_t ns = p.num_layers * 2 * nblk * Hc;
    for (int64_t i = 0; i < ns; ++i)
      if (scales[i] != scales[i])  /* NaN */ return Status::kInvalidArgument;
  }
  return Status::kOk;
}

// ---- unpack ----------------------------------------------------------------------------------

struct UnpackParams {
  CacheGeom g;             // destination geometry
  int64_t head_start = 0;  // destination head of the buffer's first head
};

// Payload element type P (float, bf16_t, f16_t, or uint8_t for quantized payloads) into a
// destination cache of type T. layers[i] is the destination of the buffer's i-th layer.
template <typename P, typename T, typename Idx>
Status unpack_cpu(const uint8_t* buf, const BufferHeader& hdr, T* const* layers, const Idx* table,
                  int64_t table_len, const UnpackParams& p) {
  const CacheGeom& g = p.g;
  const int64_t T_ = hdr.num_tokens, Hc = hdr.num_heads, D = hdr.head_dim, bs = g.block_size;
  const int64_t nblk = ceil_div(T_, bs);
  if (D != g.head_dim || p.head_start < 0 || p.head_start + Hc > g.num_heads) return Status::kInvalidArgument;
  if (nblk > table_len || find_bad_block(table, nblk, g.num_blocks) >= 0) return Status::kInvalidArgument;
  const Quant quant = static_cast<Quant>(hdr.quant);
  const int64_t row = Hc * D;
  const P* payload = reinterpret_cast<const P*>(buf + hdr.payload_offset);
  const float* scales = reinterpret_cast<const float*>(buf + hdr.scales_offset);
  const int64_t sgroup = hdr.scale_group, ngroups = quant == Quant::kNone ? 0 : ceil_div(T_, sgroup);
  const bool heads_contig = g.stride_head == D;
  const bool block_contig = heads_contig && Hc == g.num_heads && g.stride_token == g.num_heads * D;
  const int64_t items = hdr.num_layers * 2 * nblk;
#if DISAGG_X86_SIMD
  const bool simd_dequant = quant != Quant::kNone && D % 8 == 0 && cpu::use_avx2();
  // the destination blocks are written once and not read back by this op
  const bool stream_plain = items * bs * row * static_cast<int64_t>(sizeof(T)) >= kStreamBytes && cpu::use_avx2();
#endif
#pragma omp parallel if (items * bs * row * static_cast<int64_t>(sizeof(T)) > kParallelBytes)
  {
#pragma omp for schedule(static)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t l = it / (2 * nblk), c = (it / nblk) % 2, j = it % nblk;
    T* base = layers[l] + cache_offset(g, static_cast<int64_t>(table[j]), c, 0, p.head_start);
    const int64_t t0 = j * bs, nt = kmin(bs, T_ - t0);
    const P* src = payload + ((l * 2 + c) * T_ + t0) * row;
    if (quant == Quant::kNone) {
#if DISAGG_X86_SIMD
      if (block_contig && stream_plain && std::is_same<P, T>::value) {
        avx2::stream_copy(base, src, nt * row * static_cast<int64_t>(sizeof(T)), nullptr);
        continue;
      }
#endif
      if (block_contig) {
        convert_row(src, base, nt * row);
      } else if (heads_contig) {
        for (int64_t o = 0; o < nt; ++o) convert_row(src + o * row, base + o * g.stride_token, row);
      } else {
        for (int64_t o = 0; o < nt; ++o)
          for (int64_t h = 0; h < Hc; ++h)
            convert_row(src + o * row + h * D, base + o * g.stride_token + h * g.stride_head, D);
      }
      continue;
    }
    const float* sc = scales + (l * 2 + c) * ngroups * Hc;
    const uint8_t* q = reinterpret_cast<const uint8_t*>(src);
#if DISAGG_X86_SIMD
    if (simd_dequant) {
      for (int64_t o = 0; o < nt; ++o)
        avx2::dequantize_token(quant == Quant::kInt8, q + o * row, base + o * g.stride_token,
                               g.stride_head, Hc, D, sc + ((t0 + o) / sgroup) * Hc);
      continue;
    }
#endif
    for (int64_t o = 0; o < nt; ++o)
      dequantize_token(quant, q + o * row, base + o * g.stride_token, g.stride_head, Hc, D,
                       sc + ((t0 + o) / sgroup) * Hc);
  }
#if DISAGG_X86_SIMD
  if (stream_plain) _mm_sfence();  // each thread orders its non-temporal stores
#endif
  }
  return Status::kOk;
}

// ---- compact ---------------------------------------------------------------------------------

// For each layer and K/V: position dst_start + i <- position src[i] (positions index the
// request's tokens through the block table). Overlapping ranges are handled: when every source
// lies at or after its destination and sources increase, copying in order never overwrites a
// source before it is read (the usual case after speculative verification); otherwise the
// sources are first gathered into a scratch buffer.
template <typename T, typename Idx, typename Pos>
Status compact_cpu(T* const* layers, int64_t num_layers, const CacheGeom& g, const Idx* table,
                   int64_t table_len, const Pos* src, int64_t n, int64_t dst_start) {
  const int64_t bs = g.block_size, H = g.num_heads, D = g.head_dim, cap = table_len * bs;
  if (dst_start < 0 || dst_start + n > cap) return Status::kInvalidArgument;
  if (find_bad_block(table, table_len, g.num_blocks) >= 0) return Status::kInvalidArgument;
  bool in_order = true;
  for (int64_t i = 0; i < n; ++i) {
    if (src[i] < 0 || static_cast<int64_t>(src[i]) >= cap) return Status::kInvalidArgument;
    in_order &= static_cast<int64_t>(src[i]) >= dst_start + i && (i == 0 || src[i] > src[i - 1]);
  }
  if (n == 0) return Status::kOk;
  const bool heads_contig = g.stride_head == D;
  auto slot = [&](T* layer, int64_t c, int64_t pos) {
    return layer + cache_offset(g, static_cast<int64_t>(table[pos / bs]), c, pos % bs, 0);
  };
  // one token's K (or V) for all heads: H*D elements, contiguous in NHD
  auto copy_token = [&](const T* from, T* to) {
    if (heads_contig) {
      std::memcpy(to, from, static_cast<size_t>(H * D) * sizeof(T));
    } else {
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(to + h * g.stride_head, from + h * g.stride_head, static_cast<size_t>(D) * sizeof(T));
    }
  };
#pragma omp parallel for schedule(static) if (num_layers * 2 * n * H * D * static_cast<int64_t>(sizeof(T)) > kParallelBytes)
  for (int64_t lc = 0; lc < num_layers * 2; ++lc) {
    T* layer = layers[lc / 2];
    const int64_t c = lc % 2;
    if (in_order) {
      for (int64_t i = 0; i < n; ++i)
        if (static_cast<int64_t>(src[i]) != dst_start + i)
          copy_token(slot(layer, c, src[i]), slot(layer, c, dst_start + i));
      continue;
    }
    std::vector<T> scratch(static_cast<size_t>(n * H * D));
    for (int64_t i = 0; i < n; ++i) {
      const T* from = slot(layer, c, src[i]);
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(scratch.data() + (i * H + h) * D, from + h * g.stride_head, static_cast<size_t>(D) * sizeof(T));
    }
    for (int64_t i = 0; i < n; ++i) {
      T* to = slot(layer, c, dst_start + i);
      for (int64_t h = 0; h < H; ++h)
        std::memcpy(to + h * g.stride_head, scratch.data() + (i * H + h) * D, static_cast<size_t>(D) * sizeof(T));
    }
  }
  return Status::kOk;
}

}  // namespace kv
}  // namespace disagg

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
