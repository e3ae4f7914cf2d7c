// Paged KV cache kernels on CUDA (torch-free): pack a request's blocks into the self-describing
// buffer of kv_format.h, unpack such a buffer into a cache of another block size / head count /
// dtype / layout, and compact accepted tokens. Same buffer bytes and cache contents as the CPU
// kernels in kv.h; raw pointers, sizes, strides, a stream; every launcher returns cudaError_t.
//
// Block ids are checked on the device (no host synchronization, so pack and compact can be
// captured in a CUDA graph): a block id outside [0, num_blocks) is never dereferenced. pack
// writes zeros (and scale 0) for such a block, unpack and compact leave the destination
// untouched. The torch side raises for every error it can see without reading device memory.
//
// Arithmetic uses explicit round-to-nearest intrinsics (__fmul_rn, __fadd_rn, __fdiv_rn) so the
// compiler cannot contract a multiply and an add into one FMA: the CPU rounds each step, and the
// quantized bytes must match it bit for bit.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "disagg/common.cuh"
#include "disagg/kv_format.h"

namespace disagg {
namespace cuda {
namespace kv {

using disagg::kv::BufferHeader;
using disagg::kv::CacheGeom;
using disagg::kv::Quant;

// Layer pointers travel in the kernel's parameters (no device-side pointer array, so nothing is
// copied from the host and a launch stays capturable); more layers take several launches.
constexpr int kMaxLayersPerLaunch = 64;
struct LayerPtrs {
  const void* p[kMaxLayersPerLaunch];
};

namespace detail {

// ---- element conversions: the bit manipulations of kv.h, on the device ----------------------

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ float load(bf16_t x) {
  return __uint_as_float(static_cast<uint32_t>(x.bits) << 16);
}
// Integer decoding like kv.h's load(f16_t): same NaN payload (quiet bit set), no denormal
// arithmetic (the subnormal product is exact and normal).
__device__ __forceinline__ float load(f16_t x) {
  const uint32_t h = x.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = h & 0x7c00u, mant = h & 0x3ffu;
  const uint32_t normal = (((h & 0x7fffu) << 13) + ((127u - 15u) << 23));
  const uint32_t sub =
      __float_as_uint(__fmul_rn(static_cast<float>(static_cast<int32_t>(mant)), 5.9604644775390625e-8f));
  const uint32_t special = 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u);
  const uint32_t r = exp == 0x7c00u ? special : (exp == 0 ? sub : normal);
  return __uint_as_float(r | sign);
}

template <typename T> __device__ __forceinline__ T store(float f);
template <> __device__ __forceinline__ float store<float>(float f) { return f; }
template <> __device__ __forceinline__ bf16_t store<bf16_t>(float f) { return from_float_d<bf16_t>(f); }
// common.h's from_float<f16_t>, step for step (its NaN is sign|0x7e00, which the hardware
// conversion does not promise).
template <> __device__ __forceinline__ f16_t store<f16_t>(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};
  if (a < 0x38800000u) {
    if (a < 0x33000000u) return f16_t{sign};
    const uint32_t e = a >> 23;
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return f16_t{static_cast<uint16_t>(sign | r)};
  }
  const uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u);
  return f16_t{static_cast<uint16_t>(sign | (r >> 13))};
}

__device__ __forceinline__ uint32_t abs_bits(float x) { return __float_as_uint(x) & 0x7fffffffu; }
__device__ __forceinline__ uint32_t abs_bits(bf16_t x) { return x.bits & 0x7fffu; }
__device__ __forceinline__ uint32_t abs_bits(f16_t x) { return x.bits & 0x7fffu; }
template <typename T> struct InfBits;
template <> struct InfBits<float> { static constexpr uint32_t kV = 0x7f800000u; };
template <> struct InfBits<bf16_t> { static constexpr uint32_t kV = 0x7f80u; };
template <> struct InfBits<f16_t> { static constexpr uint32_t kV = 0x7c00u; };
__device__ __forceinline__ float from_abs_bits(uint32_t b, float*) { return __uint_as_float(b); }
__device__ __forceinline__ float from_abs_bits(uint32_t b, bf16_t*) { return load(bf16_t{static_cast<uint16_t>(b)}); }
__device__ __forceinline__ float from_abs_bits(uint32_t b, f16_t*) { return load(f16_t{static_cast<uint16_t>(b)}); }

__device__ __forceinline__ float round_half_even(float x) {
  return __fsub_rn(__fadd_rn(x, 12582912.0f), 12582912.0f);
}

// kv.h's fp8e4m3_from_float (torch's float8_e4m3fn rounding, saturation to +-448, NaN code).
__device__ __forceinline__ uint8_t fp8e4m3_from_float(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t sign = (u >> 24) & 0x80u;
  const int32_t a = static_cast<int32_t>(u & 0x7fffffffu);
  const float small = __uint_as_float(static_cast<uint32_t>(min(a, 0x3c800000)));
  const int32_t sub = static_cast<int32_t>(round_half_even(__fmul_rn(small, 512.0f)));
  const uint32_t ua = static_cast<uint32_t>(a);
  const int32_t nrm =
      static_cast<int32_t>(((ua + 0x7ffffu + ((ua >> 20) & 1u)) >> 20) - ((127u - 7u) << 3));
  int32_t r = a < 0x3c800000 ? sub : nrm;
  r = a > 0x43e00000 ? 0x7e : r;  // beyond 448.0f, inf included: saturate (as torch 2.13)
  r = a > 0x7f800000 ? 0x7f : r;  // NaN
  return static_cast<uint8_t>(static_cast<uint32_t>(r) | sign);
}

__device__ __forceinline__ float fp8e4m3_to_float(uint8_t b) {
  const uint32_t m = b & 0x7fu;
  const uint32_t normal = (m << 20) + ((127u - 7u) << 23);
  const uint32_t sub =
      __float_as_uint(__fmul_rn(static_cast<float>(static_cast<int32_t>(m)), 0.001953125f));
  uint32_t r = m < 8u ? sub : normal;
  r = m == 0x7fu ? 0x7fc00000u : r;
  return __uint_as_float(r | (static_cast<uint32_t>(b & 0x80u) << 24));
}

__device__ __forceinline__ uint8_t quantize(Quant q, float x, float inv) {
  const float y = __fmul_rn(x, inv);
  if (q == Quant::kInt8) {
    const int32_t r = static_cast<int32_t>(round_half_even(y));
    return static_cast<uint8_t>(static_cast<int8_t>(min(127, max(-127, r))));
  }
  return fp8e4m3_from_float(y);
}

__device__ __forceinline__ float dequantize(Quant q, uint8_t b, float scale) {
  const float x = q == Quant::kInt8 ? static_cast<float>(static_cast<int8_t>(b)) : fp8e4m3_to_float(b);
  return __fmul_rn(x, scale);
}

__device__ __forceinline__ bool block_ok(const int64_t* table, int64_t j, int64_t num_blocks) {
  const int64_t b = table[j];
  return b >= 0 && b < num_blocks;
}

__device__ __forceinline__ int64_t cache_offset(const CacheGeom& g, int64_t b, int64_t c, int64_t o,
                                                int64_t h) {
  return b * g.stride_block + c * g.stride_kv + o * g.stride_token + h * g.stride_head;
}

// Copies (or converts) one row of D elements. kVec: both ends 16-byte aligned and D a multiple
// of the vector width (checked on the host), so the row moves in 16-byte loads and stores.
template <typename S, typename T, bool kVec>
__device__ __forceinline__ void copy_row(const S* src, T* dst, int64_t D, int lane, int nlanes) {
  if constexpr (kVec) {
    const int64_t nv = D * static_cast<int64_t>(sizeof(T)) / 16;
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    for (int64_t i = lane; i < nv; i += nlanes) d[i] = s[i];
  } else if constexpr (std::is_same<S, T>::value) {
    for (int64_t i = lane; i < D; i += nlanes) dst[i] = src[i];  // bits kept, NaN payloads too
  } else {
    for (int64_t i = lane; i < D; i += nlanes) dst[i] = store<T>(load(src[i]));
  }
}

template <typename T>
__device__ __forceinline__ void zero_row(T* dst, int64_t D, int lane, int nlanes) {
  for (int64_t i = lane; i < D; i += nlanes) dst[i] = store<T>(0.0f);
}

struct PackArgs {
  CacheGeom g;
  int64_t layer0 = 0;       // buffer layer of the launch's first layer
  int64_t num_layers = 0;   // layers in this launch
  int64_t num_tokens = 0, nblk = 0;
  int64_t head_start = 0, head_count = 0;
  Quant quant = Quant::kNone;
};

// One thread block per (layer, K/V, request block); each warp takes (token, head) rows.
template <typename T, bool kVec>
__global__ void pack_kernel(LayerPtrs layers, const int64_t* __restrict__ table, PackArgs a,
                            uint8_t* __restrict__ payload) {
  const int64_t it = blockIdx.x;
  const int64_t l = it / (2 * a.nblk), c = (it / a.nblk) % 2, j = it % a.nblk;
  const int64_t bs = a.g.block_size, D = a.g.head_dim, Hc = a.head_count, row = Hc * D;
  const int64_t t0 = j * bs, nt = min(bs, a.num_tokens - t0);
  const bool ok = block_ok(table, j, a.g.num_blocks);
  const T* base = static_cast<const T*>(layers.p[l]) +
                  (ok ? cache_offset(a.g, table[j], c, 0, a.head_start) : 0);
  T* dst = reinterpret_cast<T*>(payload) + (((a.layer0 + l) * 2 + c) * a.num_tokens + t0) * row;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t r = warp; r < nt * Hc; r += nwarps) {
    const int64_t o = r / Hc, h = r % Hc;
    T* d = dst + o * row + h * D;
    if (ok) copy_row<T, T, kVec>(base + o * a.g.stride_token + h * a.g.stride_head, d, D, lane, 32);
    else zero_row(d, D, lane, 32);
  }
}

// One warp per (layer, K/V, request block, head) group: absolute maximum, scale, bytes. A group
// holding inf or NaN gets a NaN scale and zero bytes (the CPU op raises instead; see kv.cu).
template <typename T>
__global__ void pack_quant_kernel(LayerPtrs layers, const int64_t* __restrict__ table, PackArgs a,
                                  uint8_t* __restrict__ payload, float* __restrict__ scales) {
  const int lane = threadIdx.x & 31;
  const int64_t grp = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const int64_t Hc = a.head_count;
  if (grp >= a.num_layers * 2 * a.nblk * Hc) return;
  const int64_t h = grp % Hc, it = grp / Hc;
  const int64_t l = it / (2 * a.nblk), c = (it / a.nblk) % 2, j = it % a.nblk;
  const int64_t bs = a.g.block_size, D = a.g.head_dim, row = Hc * D;
  const int64_t t0 = j * bs, nt = min(bs, a.num_tokens - t0);
  const int64_t lb = a.layer0 + l;
  uint8_t* dst = payload + ((lb * 2 + c) * a.num_tokens + t0) * row + h * D;
  float* sc = scales + ((lb * 2 + c) * a.nblk + j) * Hc + h;
  const bool ok = block_ok(table, j, a.g.num_blocks);
  const T* base = static_cast<const T*>(layers.p[l]) +
                  (ok ? cache_offset(a.g, table[j], c, 0, a.head_start + h) : 0);
  uint32_t mx = 0;
  if (ok)
    for (int64_t o = 0; o < nt; ++o)
      for (int64_t d = lane; d < D; d += 32) mx = max(mx, abs_bits(base[o * a.g.stride_token + d]));
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = max(mx, __shfl_xor_sync(kFullMask, mx, off));
  const bool finite = mx < InfBits<T>::kV;
  float scale = 0.0f, inv = 0.0f;
  if (!finite) {
    scale = __uint_as_float(0x7fc00000u);
  } else {
    const float amax = from_abs_bits(mx, static_cast<T*>(nullptr));
    if (amax > 0.0f && a.quant == Quant::kInt8) {
      scale = __fdiv_rn(amax, 127.0f);
      inv = __fdiv_rn(127.0f, amax);
    } else if (amax > 0.0f) {  // fp8: a power-of-two scale (kv_format.h)
      const int32_t k = ::disagg::kv::fp8_scale_exponent(__float_as_uint(amax));
      scale = __uint_as_float(::disagg::kv::pow2_bits(k));
      inv = __uint_as_float(::disagg::kv::pow2_bits(-k));
    }
  }
  if (lane == 0) *sc = scale;
  for (int64_t o = 0; o < nt; ++o)
    for (int64_t d = lane; d < D; d += 32)
      dst[o * row + d] = (ok && finite) ? quantize(a.quant, load(base[o * a.g.stride_token + d]), inv) : 0;
}

// The header (a kernel parameter, so nothing is copied from host memory) and the zero padding
// between payload and scales, as the CPU op and the reference write them.
__global__ void pack_header_kernel(BufferHeader h, uint8_t* __restrict__ out, int64_t pad_begin) {
  const uint8_t* src = reinterpret_cast<const uint8_t*>(&h);
  for (int i = threadIdx.x; i < static_cast<int>(sizeof(BufferHeader)); i += blockDim.x) out[i] = src[i];
  for (int64_t i = pad_begin + threadIdx.x; i < h.scales_offset; i += blockDim.x) out[i] = 0;
}

struct UnpackArgs {
  CacheGeom g;               // destination geometry
  int64_t layer0 = 0;        // buffer layer of the launch's first layer
  int64_t num_tokens = 0, nblk = 0, heads = 0, head_start = 0;
  int64_t scale_group = 0, ngroups = 0;
  Quant quant = Quant::kNone;
};

// One thread block per (layer, K/V, destination block).
template <typename P, typename T, bool kVec>
__global__ void unpack_kernel(const uint8_t* __restrict__ buf, int64_t payload_offset,
                              int64_t scales_offset, LayerPtrs layers,
                              const int64_t* __restrict__ table, UnpackArgs a) {
  const int64_t it = blockIdx.x;
  const int64_t l = it / (2 * a.nblk), c = (it / a.nblk) % 2, j = it % a.nblk;
  if (!block_ok(table, j, a.g.num_blocks)) return;
  const int64_t bs = a.g.block_size, D = a.g.head_dim, Hc = a.heads, row = Hc * D;
  const int64_t t0 = j * bs, nt = min(bs, a.num_tokens - t0), lb = a.layer0 + l;
  T* base = static_cast<T*>(const_cast<void*>(layers.p[l])) + cache_offset(a.g, table[j], c, 0, a.head_start);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (a.quant == Quant::kNone) {
    const P* src = reinterpret_cast<const P*>(buf + payload_offset) + ((lb * 2 + c) * a.num_tokens + t0) * row;
    for (int64_t r = warp; r < nt * Hc; r += nwarps) {
      const int64_t o = r / Hc, h = r % Hc;
      copy_row<P, T, kVec>(src + o * row + h * D, base + o * a.g.stride_token + h * a.g.stride_head,
                           D, lane, 32);
    }
    return;
  }
  const uint8_t* q = buf + payload_offset + ((lb * 2 + c) * a.num_tokens + t0) * row;
  const float* sc = reinterpret_cast<const float*>(buf + scales_offset) + (lb * 2 + c) * a.ngroups * Hc;
  for (int64_t r = warp; r < nt * Hc; r += nwarps) {
    const int64_t o = r / Hc, h = r % Hc;
    const float s = sc[((t0 + o) / a.scale_group) * Hc + h];
    T* d = base + o * a.g.stride_token + h * a.g.stride_head;
    const uint8_t* qr = q + o * row + h * D;
    for (int64_t i = lane; i < D; i += 32) d[i] = store<T>(dequantize(a.quant, qr[i], s));
  }
}

// compact, step 1 and 2: gather every source token into scratch, then scatter to the
// destinations; two kernels make any overlap of sources and destinations safe.
struct CompactArgs {
  CacheGeom g;
  int64_t layer0 = 0, table_len = 0, n = 0, dst_start = 0;
};

__device__ __forceinline__ bool pos_ok(const int64_t* table, const CompactArgs& a, int64_t pos) {
  return pos >= 0 && pos < a.table_len * a.g.block_size &&
         block_ok(table, pos / a.g.block_size, a.g.num_blocks);
}

template <typename T, bool kVec, bool kGather>
__global__ void compact_kernel(LayerPtrs layers, const int64_t* __restrict__ table,
                               const int64_t* __restrict__ src_pos, CompactArgs a,
                               T* __restrict__ scratch) {
  const int64_t it = blockIdx.x;  // (layer, K/V, i)
  const int64_t l = it / (2 * a.n), c = (it / a.n) % 2, i = it % a.n;
  const int64_t bs = a.g.block_size, H = a.g.num_heads, D = a.g.head_dim;
  const int64_t sp = src_pos[i], dp = a.dst_start + i;
  if (!pos_ok(table, a, sp) || !pos_ok(table, a, dp)) return;
  T* layer = static_cast<T*>(const_cast<void*>(layers.p[l]));
  T* s = scratch + (((a.layer0 + l) * 2 + c) * a.n + i) * H * D;
  const int64_t pos = kGather ? sp : dp;
  T* cache = layer + cache_offset(a.g, table[pos / bs], c, pos % bs, 0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t h = warp; h < H; h += nwarps) {
    if (kGather) copy_row<T, T, kVec>(cache + h * a.g.stride_head, s + h * D, D, lane, 32);
    else copy_row<T, T, kVec>(s + h * D, cache + h * a.g.stride_head, D, lane, 32);
  }
}

constexpr int kThreads = 128;

template <typename T>
inline bool geom_vec_ok(const CacheGeom& g) {
  const int64_t e = static_cast<int64_t>(sizeof(T));
  return (g.head_dim * e) % 16 == 0 && (g.stride_block * e) % 16 == 0 && (g.stride_kv * e) % 16 == 0 &&
         (g.stride_token * e) % 16 == 0 && (g.stride_head * e) % 16 == 0;
}

inline bool layers_aligned(const void* const* layers, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!aligned16(layers[i])) return false;
  return true;
}

inline LayerPtrs chunk(const void* const* layers, int64_t first, int64_t n) {
  LayerPtrs p{};
  for (int64_t i = 0; i < n; ++i) p.p[i] = layers[first + i];
  return p;
}

}  // namespace detail

// Bytes of scratch that compact() needs (one copy of the moved tokens).
inline size_t compact_workspace(int64_t num_layers, const CacheGeom& g, int64_t n, int64_t elem_bytes) {
  return static_cast<size_t>(num_layers * 2 * n * g.num_heads * g.head_dim * elem_bytes);
}

// layers[i]: cache of the i-th packed layer (device pointers). table: the request's block ids
// (int64, device). hdr from make_header; out: hdr.total_bytes device bytes.
template <typename T>
cudaError_t pack(const void* const* layers, const int64_t* table, const CacheGeom& g,
                 int64_t head_start, const BufferHeader& hdr, uint8_t* out, cudaStream_t stream) {
  const int64_t L = hdr.num_layers, T_ = hdr.num_tokens, Hc = hdr.num_heads;
  const int64_t nblk = disagg::kv::ceil_div(T_, g.block_size);
  const Quant quant = static_cast<Quant>(hdr.quant);
  const int64_t payload_bytes = L * 2 * T_ * Hc * g.head_dim * hdr.elem_bytes;
  detail::pack_header_kernel<<<1, detail::kThreads, 0, stream>>>(hdr, out, hdr.payload_offset + payload_bytes);
  DISAGG_CUDA_TRY(cudaGetLastError());
  if (L == 0 || nblk == 0) return cudaSuccess;
  const bool vec = quant == Quant::kNone && detail::geom_vec_ok<T>(g) && aligned16(out) &&
                   ((head_start * static_cast<int64_t>(sizeof(T))) % 16 == 0) &&
                   detail::layers_aligned(layers, L);
  for (int64_t l0 = 0; l0 < L; l0 += kMaxLayersPerLaunch) {
    detail::PackArgs a;
    a.g = g;
    a.layer0 = l0;
    a.num_layers = L - l0 < kMaxLayersPerLaunch ? L - l0 : kMaxLayersPerLaunch;
    a.num_tokens = T_;
    a.nblk = nblk;
    a.head_start = head_start;
    a.head_count = Hc;
    a.quant = quant;
    const LayerPtrs ptrs = detail::chunk(layers, l0, a.num_layers);
    if (quant == Quant::kNone) {
      const unsigned grid = static_cast<unsigned>(a.num_layers * 2 * nblk);
      if (vec) detail::pack_kernel<T, true><<<grid, detail::kThreads, 0, stream>>>(ptrs, table, a, out + hdr.payload_offset);
      else detail::pack_kernel<T, false><<<grid, detail::kThreads, 0, stream>>>(ptrs, table, a, out + hdr.payload_offset);
    } else {
      const int64_t groups = a.num_layers * 2 * nblk * Hc;
      const int warps = detail::kThreads / 32;
      const unsigned grid = static_cast<unsigned>((groups + warps - 1) / warps);
      detail::pack_quant_kernel<T><<<grid, detail::kThreads, 0, stream>>>(
          ptrs, table, a, out + hdr.payload_offset, reinterpret_cast<float*>(out + hdr.scales_offset));
    }
    DISAGG_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

// buf: a packed buffer on the device whose header (parsed on the host) is hdr. P is the payload
// element type (the sender's dtype, or uint8_t when quantized); T the destination's.
template <typename P, typename T>
cudaError_t unpack(const uint8_t* buf, const BufferHeader& hdr, void* const* layers,
                   const int64_t* table, const CacheGeom& g, int64_t head_start, cudaStream_t stream) {
  const int64_t L = hdr.num_layers, T_ = hdr.num_tokens;
  const int64_t nblk = disagg::kv::ceil_div(T_, g.block_size);
  if (L == 0 || nblk == 0) return cudaSuccess;
  const Quant quant = static_cast<Quant>(hdr.quant);
  const bool vec = quant == Quant::kNone && sizeof(P) == sizeof(T) && detail::geom_vec_ok<T>(g) &&
                   aligned16(buf) && ((head_start * static_cast<int64_t>(sizeof(T))) % 16 == 0) &&
                   detail::layers_aligned(reinterpret_cast<const void* const*>(layers), L);
  for (int64_t l0 = 0; l0 < L; l0 += kMaxLayersPerLaunch) {
    detail::UnpackArgs a;
    a.g = g;
    a.layer0 = l0;
    const int64_t nl = L - l0 < kMaxLayersPerLaunch ? L - l0 : kMaxLayersPerLaunch;
    a.num_tokens = T_;
    a.nblk = nblk;
    a.heads = hdr.num_heads;
    a.head_start = head_start;
    a.quant = quant;
    a.scale_group = quant == Quant::kNone ? 1 : hdr.scale_group;
    a.ngroups = quant == Quant::kNone ? 0 : disagg::kv::ceil_div(T_, a.scale_group);
    const LayerPtrs ptrs = detail::chunk(reinterpret_cast<const void* const*>(layers), l0, nl);
    const unsigned grid = static_cast<unsigned>(nl * 2 * nblk);
    if (vec)
      detail::unpack_kernel<P, T, true><<<grid, detail::kThreads, 0, stream>>>(
          buf, hdr.payload_offset, hdr.scales_offset, ptrs, table, a);
    else
      detail::unpack_kernel<P, T, false><<<grid, detail::kThreads, 0, stream>>>(
          buf, hdr.payload_offset, hdr.scales_offset, ptrs, table, a);
    DISAGG_CUDA_TRY(cudaGetLastError());
  }
  return cudaSuccess;
}

// For every layer and K/V: position dst_start + i <- position src_pos[i] (int64, device).
// scratch: compact_workspace() bytes, 16-byte aligned.
template <typename T>
cudaError_t compact(void* const* layers, int64_t num_layers, const CacheGeom& g, const int64_t* table,
                    int64_t table_len, const int64_t* src_pos, int64_t n, int64_t dst_start,
                    void* scratch, cudaStream_t stream) {
  if (n == 0 || num_layers == 0) return cudaSuccess;
  const bool vec = detail::geom_vec_ok<T>(g) && aligned16(scratch) &&
                   detail::layers_aligned(reinterpret_cast<const void* const*>(layers), num_layers);
  T* s = static_cast<T*>(scratch);
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t l0 = 0; l0 < num_layers; l0 += kMaxLayersPerLaunch) {
      detail::CompactArgs a;
      a.g = g;
      a.layer0 = l0;
      a.table_len = table_len;
      a.n = n;
      a.dst_start = dst_start;
      const int64_t nl = num_layers - l0 < kMaxLayersPerLaunch ? num_layers - l0 : kMaxLayersPerLaunch;
      const LayerPtrs ptrs = detail::chunk(reinterpret_cast<const void* const*>(layers), l0, nl);
      const unsigned grid = static_cast<unsigned>(nl * 2 * n);
      if (pass == 0) {
        if (vec) detail::compact_kernel<T, true, true><<<grid, detail::kThreads, 0, stream>>>(ptrs, table, src_pos, a, s);
        else detail::compact_kernel<T, false, true><<<grid, detail::kThreads, 0, stream>>>(ptrs, table, src_pos, a, s);
      } else {
        if (vec) detail::compact_kernel<T, true, false><<<grid, detail::kThreads, 0, stream>>>(ptrs, table, src_pos, a, s);
        else detail::compact_kernel<T, false, false><<<grid, detail::kThreads, 0, stream>>>(ptrs, table, src_pos, a, s);
      }
      DISAGG_CUDA_TRY(cudaGetLastError());
    }
  }
  return cudaSuccess;
}

}  // namespace kv
}  // namespace cuda
}  // namespace disagg
