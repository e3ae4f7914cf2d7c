// Torch-free CUDA kernels for the model-layer ops with no library kernel elsewhere: RMSNorm
// (plain and fused with the residual add before it) and the RoPE + KV-cache write that opens a
// decode step's attention (paged_decode_attention_rope; the attention itself is attention.cuh).
// Launchers take a stream, return the launch's cudaError_t and never synchronize.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "disagg/common.cuh"

namespace disagg {
namespace cuda {
namespace layers {

constexpr int kNormThreads = 256;

// One block per row. Pass 1 forms the new residual (rounded to T, written back when `x` is
// given) and its sum of squares; pass 2 reads it back and writes HF's RMSNorm rounding:
// out = T(w * T(r * rsqrt(mean(r^2) + eps))) (for float32: w * (r * inv)). The products are
// explicit round-to-nearest operations so nvcc does not fuse them.
template <typename T>
__global__ void add_rms_norm_kernel(T* residual, const T* x, const T* w, int64_t H, float eps,
                                    T* out) {
  __shared__ float part[32];
  const int64_t row = blockIdx.x;
  T* r = residual + row * H;
  const T* xr = x != nullptr ? x + row * H : nullptr;
  float ss = 0.f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float v = to_float_d(r[h]);
    if (xr != nullptr) {
      const T nv = from_float_d<T>(__fadd_rn(v, to_float_d(xr[h])));
      r[h] = nv;
      v = to_float_d(nv);
    }
    ss = fmaf(v, v, ss);
  }
  ss = warp_sum(ss);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) part[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    float t = lane < static_cast<int>(blockDim.x >> 5) ? part[lane] : 0.f;
    t = warp_sum(t);
    if (lane == 0) part[0] = t;
  }
  __syncthreads();
  const float inv =
      __fdiv_rn(1.f, __fsqrt_rn(__fadd_rn(__fdiv_rn(part[0], static_cast<float>(H)), eps)));
  T* o = out + row * H;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    const float n = to_float_d(from_float_d<T>(__fmul_rn(to_float_d(r[h]), inv)));
    o[h] = from_float_d<T>(__fmul_rn(to_float_d(w[h]), n));
  }
}

// residual [N, H] += x (x may be null: plain RMSNorm of `residual`, which is then only read),
// then out [N, H] = RMSNorm(residual) * w. Returns cudaErrorInvalidValue for H < 1 or eps < 0.
template <typename T>
cudaError_t add_rms_norm(T* residual, const T* x, const T* w, int64_t N, int64_t H, float eps,
                         T* out, cudaStream_t stream) {
  if (H < 1 || !(eps >= 0.f) || N < 0) return cudaErrorInvalidValue;
  if (N == 0) return cudaSuccess;
  int threads = 32;
  while (threads < kNormThreads && threads < H) threads *= 2;
  add_rms_norm_kernel<T><<<static_cast<unsigned>(N), threads, 0, stream>>>(residual, x, w, H,
                                                                           eps, out);
  return cudaGetLastError();
}

// Rotate-half RoPE of one head: o[d] = x1 c[d] - x2 s[d], o[d + D/2] = x2 c[d+D/2] + x1 s[d+D/2]
// (float32, rounded to T), as the CPU op computes it (no fused multiply-add).
template <typename T>
__device__ __forceinline__ void rope_pair(const T* x, const T* c, const T* s, int64_t d,
                                          int64_t half, T* o) {
  const float x1 = to_float_d(x[d]), x2 = to_float_d(x[d + half]);
  o[d] = from_float_d<T>(__fsub_rn(__fmul_rn(x1, to_float_d(c[d])),
                                   __fmul_rn(x2, to_float_d(s[d]))));
  o[d + half] = from_float_d<T>(__fadd_rn(__fmul_rn(x2, to_float_d(c[d + half])),
                                          __fmul_rn(x1, to_float_d(s[d + half]))));
}

// One block per token b: q heads rotated into q_out [B, Hq, D]; k heads rotated and v heads
// copied into the cache at position ctx_lens[b] - 1 of the block table. A token whose context
// length or block id is out of range writes nothing to the cache (the attention kernel then
// gives its rows NaN, see attention.cuh).
template <typename T, typename Idx>
__global__ void rope_write_kernel(const T* qkv, int64_t Hq, int64_t Hkv, int64_t D, const T* cos,
                                  const T* sin, T* cache, int64_t num_blocks, int64_t block_size,
                                  const Idx* block_tables, int64_t max_blocks, const Idx* ctx_lens,
                                  T* q_out) {
  const int64_t b = blockIdx.x, half = D / 2;
  const T* src = qkv + b * (Hq + 2 * Hkv) * D;
  const T* c = cos + b * D;
  const T* s = sin + b * D;
  for (int64_t i = threadIdx.x; i < Hq * half; i += blockDim.x) {
    const int64_t h = i / half, d = i % half;
    rope_pair(src + h * D, c, s, d, half, q_out + (b * Hq + h) * D);
  }
  const int64_t L = static_cast<int64_t>(ctx_lens[b]);
  if (L < 1 || L > max_blocks * block_size) return;
  const int64_t p = L - 1;
  const int64_t blk = static_cast<int64_t>(block_tables[b * max_blocks + p / block_size]);
  if (blk < 0 || blk >= num_blocks) return;
  const int64_t row = Hkv * D;
  T* kdst = cache + blk * 2 * block_size * row + (p % block_size) * row;
  T* vdst = kdst + block_size * row;
  for (int64_t i = threadIdx.x; i < Hkv * half; i += blockDim.x) {
    const int64_t h = i / half, d = i % half;
    rope_pair(src + (Hq + h) * D, c, s, d, half, kdst + h * D);
  }
  const T* vsrc = src + (Hq + Hkv) * D;
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) vdst[i] = vsrc[i];
}

// qkv [B, (Hq + 2 Hkv) * D], cos/sin [B, D], cache [num_blocks, 2, block_size, Hkv, D],
// block_tables [B, max_blocks], ctx_lens [B] -> q_out [B, Hq, D] and the cache written.
template <typename T, typename Idx>
cudaError_t rope_write(const T* qkv, int64_t B, int64_t Hq, int64_t Hkv, int64_t D, const T* cos,
                       const T* sin, T* cache, int64_t num_blocks, int64_t block_size,
                       const Idx* block_tables, int64_t max_blocks, const Idx* ctx_lens, T* q_out,
                       cudaStream_t stream) {
  if (B < 0 || Hq < 1 || Hkv < 1 || D < 2 || D % 2 != 0 || block_size < 1)
    return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  rope_write_kernel<T, Idx><<<static_cast<unsigned>(B), 128, 0, stream>>>(
      qkv, Hq, Hkv, D, cos, sin, cache, num_blocks, block_size, block_tables, max_blocks,
      ctx_lens, q_out);
  return cudaGetLastError();
}

}  // namespace layers
}  // namespace cuda
}  // namespace disagg
