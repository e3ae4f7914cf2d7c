// Torch-free device helpers shared by the CUDA kernels: float conversions of the storage types
// in common.h, warp reductions with the library's tie rule, and 16-byte vector access.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "disagg/common.h"

namespace disagg {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// Launch checks: a kernel launch reports configuration errors only through cudaGetLastError.
#define DISAGG_CUDA_TRY(expr)                    \
  do {                                           \
    const cudaError_t disagg_err_ = (expr);      \
    if (disagg_err_ != cudaSuccess) return disagg_err_; \
  } while (0)

// ---- float conversions (arithmetic is always float) -------------------------------------------

__device__ __forceinline__ float to_float_d(float x) { return x; }
__device__ __forceinline__ float to_float_d(bf16_t x) {
  return __uint_as_float(static_cast<uint32_t>(x.bits) << 16);
}
__device__ __forceinline__ float to_float_d(f16_t x) {
  return __half2float(__ushort_as_half(x.bits));
}

template <typename T> __device__ __forceinline__ T from_float_d(float f);
template <> __device__ __forceinline__ float from_float_d<float>(float f) { return f; }
// Same bit manipulation as the CPU's from_float<bf16_t> (round to nearest even, NaN kept quiet),
// so CPU and CUDA results agree bit for bit.
template <> __device__ __forceinline__ bf16_t from_float_d<bf16_t>(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}
template <> __device__ __forceinline__ f16_t from_float_d<f16_t>(float f) {
  return f16_t{__half_as_ushort(__float2half_rn(f))};
}

// ---- selection order --------------------------------------------------------------------------

// Higher score first, ties to the lower index; index < 0 means "no candidate" and loses to all.
__device__ __forceinline__ bool ranks_before_d(float sa, int32_t ia, float sb, int32_t ib) {
  if (ib < 0) return ia >= 0;
  if (ia < 0) return false;
  return sa > sb || (sa == sb && ia < ib);
}

// Warp-wide best (score, index) under ranks_before_d; every lane gets the result.
__device__ __forceinline__ void warp_argbest(float& s, int32_t& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float os = __shfl_xor_sync(kFullMask, s, off);
    const int32_t oi = __shfl_xor_sync(kFullMask, i, off);
    if (ranks_before_d(os, oi, s, i)) {
      s = os;
      i = oi;
    }
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

__device__ __forceinline__ int32_t warp_sum_int(int32_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Inclusive prefix sum over the lanes of a warp.
__device__ __forceinline__ int32_t warp_inclusive_scan(int32_t v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int32_t o = __shfl_up_sync(kFullMask, v, off);
    if (lane >= off) v += o;
  }
  return v;
}

// Exclusive prefix sum over a whole block (blockDim.x a multiple of 32, at most 1024). `scratch`
// holds 33 ints of shared memory. Returns this thread's exclusive prefix; *total gets the sum.
__device__ __forceinline__ int32_t block_exclusive_scan(int32_t v, int32_t* scratch,
                                                        int32_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int32_t incl = warp_inclusive_scan(v);
  if (lane == 31) scratch[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    const int32_t w = lane < nwarps ? scratch[lane] : 0;
    const int32_t wi = warp_inclusive_scan(w);
    if (lane < nwarps) scratch[lane] = wi - w;
    if (lane == 31) scratch[32] = wi;
  }
  __syncthreads();
  const int32_t r = scratch[warp] + incl - v;
  *total = scratch[32];
  __syncthreads();  // scratch may be reused right after
  return r;
}

// ---- 16-byte vectors --------------------------------------------------------------------------

template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
  T v[kN];
};

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace cuda
}  // namespace disagg
