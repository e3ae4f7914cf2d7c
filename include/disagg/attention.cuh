// Decode attention over a paged KV cache on CUDA (torch-free), the GPU side of attention.h: one
// query token per sequence attends to its cached keys/values through its block table, with
// grouped-query attention and float32 accumulation. Split-K ("flash-decoding"): the keys of a
// sequence are cut into chunks, one thread block per (chunk, KV head, group of up to 8 query
// heads, sequence) computes a partial softmax and a partial output, and a second kernel merges
// the partials with their maxima and sums. A sequence that fits in one chunk is written directly.
//
// No host synchronization (the launch geometry comes from sizes the host knows: the block
// table's width and the sliding window), so the op can be captured in a CUDA graph. Context
// lengths and block ids are checked on the device: a sequence whose ctx_len is outside
// [1, max_blocks * block_size], or whose used block ids leave [0, num_blocks), gets NaN in all of
// its output rows instead of an exception, and no out-of-range page is ever read.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "disagg/common.cuh"

namespace disagg {
namespace cuda {
namespace attention {

constexpr int kThreads = 128;      // threads per block of the partial kernel
constexpr int kHeadsPerBlock = 8;  // query heads of one KV head handled by a block (GQA)
constexpr int kMaxChunk = 256;     // keys per split, at most
constexpr int kMinChunk = 32;
constexpr int64_t kMaxHeadDim = 1024;  // shared memory holds q (and later the output) as float

// Launch geometry and workspace of one call; from host-known sizes only.
struct Plan {
  int64_t B = 0, Hq = 0, Hkv = 0, D = 0;
  int64_t group = 1;       // Hq / Hkv query heads per KV head
  int64_t head_groups = 1; // ceil(group / kHeadsPerBlock)
  int64_t chunk = kMaxChunk;
  int64_t num_splits = 1;  // chunks of the longest possible context
  bool vec = false;        // 16-byte loads (set by the launcher from the pointers)
  size_t workspace_bytes = 0;  // float partials, 0 when num_splits == 1
  size_t smem_bytes = 0;
};

namespace detail {

template <typename T>
struct VecOf {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
};

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Shared memory layout of the partial kernel (in floats, then the key offsets):
//   qo [kHeadsPerBlock * D]   scaled queries during the scores, output partials afterwards
//   s  [kHeadsPerBlock * chunk] scores, then exp(score - max)
//   ml [2 * kHeadsPerBlock]   max and sum per head
//   off[chunk] int64          element offset of each key row in the cache
__host__ __device__ inline size_t smem_floats(int64_t D, int64_t chunk) {
  return static_cast<size_t>(kHeadsPerBlock) * (D + chunk) + 2 * kHeadsPerBlock;
}
__host__ __device__ inline size_t smem_bytes(int64_t D, int64_t chunk) {
  const size_t f = smem_floats(D, chunk) * sizeof(float);
  return (f + 7) / 8 * 8 + static_cast<size_t>(chunk) * sizeof(int64_t);
}

template <int N, typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[N]) {
  if constexpr (N == 1) {
    f[0] = to_float_d(*p);
  } else {
    const Vec16<T> v = *reinterpret_cast<const Vec16<T>*>(p);
#pragma unroll
    for (int e = 0; e < N; ++e) f[e] = to_float_d(v.v[e]);
  }
}

// One block: keys [c0, c0 + nk) of sequence b's window (relative to `start`), KV head h, query
// heads h * group + hg * kHeadsPerBlock + [0, gb). N elements per load (16 bytes or 1).
template <typename T, int N>
__global__ void __launch_bounds__(kThreads)
    partial_kernel(const T* __restrict__ q, const T* __restrict__ cache,
                   const int64_t* __restrict__ block_tables, const int64_t* __restrict__ ctx_lens,
                   int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t num_blocks,
                   int64_t block_size, int64_t max_blocks, int64_t group, int64_t head_groups,
                   int64_t chunk, int64_t num_splits, float scale, int64_t sliding_window,
                   T* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* qo = reinterpret_cast<float*>(smem_raw);
  float* s = qo + kHeadsPerBlock * D;
  float* ml = s + kHeadsPerBlock * chunk;
  int64_t* off = reinterpret_cast<int64_t*>(
      smem_raw + (smem_floats(D, chunk) * sizeof(float) + 7) / 8 * 8);
  __shared__ int bad;

  const int tid = threadIdx.x;
  const int64_t split = blockIdx.x;
  const int64_t h = blockIdx.y / head_groups, hg = blockIdx.y % head_groups;
  const int64_t g0 = h * group + hg * kHeadsPerBlock;  // first query head of this block
  const int gb = static_cast<int>(group - hg * kHeadsPerBlock < kHeadsPerBlock
                                      ? group - hg * kHeadsPerBlock
                                      : kHeadsPerBlock);
  const int64_t row = Hkv * D;                  // elements per cached token
  const int64_t kv_stride = block_size * row;   // K to V of a block
  const int64_t blk_stride = 2 * kv_stride;
  const int64_t nvec = D / N;

  for (int64_t b = blockIdx.z; b < B; b += gridDim.z) {
    const int64_t L = ctx_lens[b];
    const bool len_ok = L >= 1 && L <= max_blocks * block_size;
    const int64_t start =
        len_ok && sliding_window > 0 && L > sliding_window ? L - sliding_window : 0;
    const int64_t n = len_ok ? L - start : 0;
    const int64_t c0 = split * chunk;
    // Splits past this sequence's keys: an empty partial (or nothing at all when unsplit).
    if (len_ok && c0 >= n) {
      if (num_splits > 1) {
        for (int g = tid; g < gb; g += kThreads) {
          const int64_t base = (b * Hq + g0 + g) * num_splits + split;
          part_ml[2 * base] = -INFINITY;
          part_ml[2 * base + 1] = 0.f;
        }
      }
      continue;
    }
    const int64_t nk = len_ok ? (n - c0 < chunk ? n - c0 : chunk) : 0;
    const int64_t* table = block_tables + b * max_blocks;
    if (tid == 0) bad = len_ok ? 0 : 1;
    // Scaled queries (float) and the cache offset of every key row of the chunk.
    for (int64_t i = tid; i < gb * D; i += kThreads) {
      const int64_t g = i / D, d = i % D;
      qo[g * D + d] = to_float_d(q[(b * Hq + g0 + g) * D + d]) * scale;
    }
    __syncthreads();
    for (int64_t i = tid; i < nk; i += kThreads) {
      const int64_t p = start + c0 + i;
      const int64_t blk = table[p / block_size];
      if (blk < 0 || blk >= num_blocks) {
        bad = 1;  // every writer stores the same value
        off[i] = -1;
      } else {
        off[i] = blk * blk_stride + (p % block_size) * row + h * D;
      }
    }
    __syncthreads();
    const bool invalid = bad != 0;
    if (!invalid) {
      // Scores: one thread per key; the key row is read once for all the block's query heads,
      // the queries come from shared memory (the same address on every lane: a broadcast).
      for (int64_t i = tid; i < nk; i += kThreads) {
        const T* k = cache + off[i];
        float acc[kHeadsPerBlock];
#pragma unroll
        for (int g = 0; g < kHeadsPerBlock; ++g) acc[g] = 0.f;
#pragma unroll(N == 1 ? 4 : 2)
        for (int64_t v = 0; v < nvec; ++v) {
          float kf[N];
          load_vec<N>(k + v * N, kf);
#pragma unroll
          for (int g = 0; g < kHeadsPerBlock; ++g) {
            if (g < gb) {
              const float* qg = qo + g * D + v * N;
#pragma unroll
              for (int e = 0; e < N; ++e) acc[g] = fmaf(qg[e], kf[e], acc[g]);
            }
          }
        }
#pragma unroll
        for (int g = 0; g < kHeadsPerBlock; ++g)
          if (g < gb) s[g * chunk + i] = acc[g];
      }
      __syncthreads();
      // Softmax pieces: one warp per query head: max, exp(score - max), sum.
      const int warp = tid >> 5, lane = tid & 31;
      for (int g = warp; g < gb; g += kThreads / 32) {
        float* sg = s + g * chunk;
        float m = -INFINITY;
        for (int64_t i = lane; i < nk; i += 32) m = fmaxf(m, sg[i]);
        m = warp_max(m);
        float sum = 0.f;
        for (int64_t i = lane; i < nk; i += 32) {
          const float e = expf(sg[i] - m);
          sg[i] = e;
          sum += e;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
          ml[2 * g] = m;
          ml[2 * g + 1] = sum;
        }
      }
      __syncthreads();
    }
    // Probability-weighted values: thread (r, c) owns column vector c for the keys r,
    // r + rows, ...; the row groups are then added in a fixed order (deterministic).
    const int64_t cols = nvec;
    int64_t rows = cols >= kThreads ? 1 : kThreads / cols;
    if (rows > 16) rows = 16;
    const int64_t r = tid / (cols < kThreads ? cols : kThreads);
    for (int64_t c_base = 0; c_base < cols; c_base += kThreads) {
      const int64_t c = c_base + (cols < kThreads ? tid % cols : tid);
      const bool active = !invalid && r < rows && c < cols;
      float acc[kHeadsPerBlock][N];
#pragma unroll
      for (int g = 0; g < kHeadsPerBlock; ++g)
#pragma unroll
        for (int e = 0; e < N; ++e) acc[g][e] = 0.f;
      if (active) {
        for (int64_t i = r; i < nk; i += rows) {
          float vf[N];
          load_vec<N>(cache + off[i] + kv_stride + c * N, vf);
#pragma unroll
          for (int g = 0; g < kHeadsPerBlock; ++g) {
            if (g < gb) {
              const float p = s[g * chunk + i];
#pragma unroll
              for (int e = 0; e < N; ++e) acc[g][e] = fmaf(p, vf[e], acc[g][e]);
            }
          }
        }
      }
      // qo now collects the output (the queries are no longer needed)
      for (int64_t rr = 0; rr < rows; ++rr) {
        __syncthreads();
        if (active && r == rr) {
#pragma unroll
          for (int g = 0; g < kHeadsPerBlock; ++g) {
            if (g < gb) {
#pragma unroll
              for (int e = 0; e < N; ++e) {
                float& o = qo[g * D + c * N + e];
                o = rr == 0 ? acc[g][e] : o + acc[g][e];
              }
            }
          }
        }
      }
    }
    __syncthreads();
    // Write: the final output when unsplit, else the partial and its (max, sum).
    for (int64_t i = tid; i < gb * D; i += kThreads) {
      const int64_t g = i / D, d = i % D;
      const int64_t hq = g0 + g;
      if (num_splits == 1) {
        const float v = invalid ? NAN : qo[g * D + d] * (1.f / ml[2 * g + 1]);
        out[(b * Hq + hq) * D + d] = from_float_d<T>(v);
      } else {
        part_o[((b * Hq + hq) * num_splits + split) * D + d] = invalid ? NAN : qo[g * D + d];
      }
    }
    if (num_splits > 1) {
      for (int g = tid; g < gb; g += kThreads) {
        const int64_t base = (b * Hq + g0 + g) * num_splits + split;
        part_ml[2 * base] = invalid ? NAN : ml[2 * g];
        part_ml[2 * base + 1] = invalid ? NAN : ml[2 * g + 1];
      }
    }
    __syncthreads();  // shared memory is reused by the next sequence of this block
  }
}

// One block per (query head, sequence): weights exp(m_s - M) of the splits (in shared memory),
// then out = sum_s w_s * o_s / sum_s w_s * l_s in split order. Any NaN partial (an invalid
// sequence) makes the whole row NaN.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                   int64_t B, int64_t Hq, int64_t D, int64_t num_splits, T* __restrict__ out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* w = reinterpret_cast<float*>(smem_raw);  // [num_splits]
  __shared__ float total;
  __shared__ int nan_seen;
  const int64_t hq = blockIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t base = (b * Hq + hq) * num_splits;
    const float* ml = part_ml + 2 * base;
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      float m = -INFINITY;
      int nan = 0;
      for (int64_t i = lane; i < num_splits; i += 32) {
        const float mi = ml[2 * i], li = ml[2 * i + 1];
        if (mi != mi || li != li) nan = 1;
        if (li > 0.f) m = fmaxf(m, mi);
      }
      m = warp_max(m);
      nan = warp_sum_int(nan);
      float t = 0.f;
      for (int64_t i = lane; i < num_splits; i += 32) {
        const float li = ml[2 * i + 1];
        const float wi = li > 0.f ? expf(ml[2 * i] - m) : 0.f;
        w[i] = wi;
        t = fmaf(wi, li, t);
      }
      t = warp_sum(t);
      if (lane == 0) {
        total = t;
        nan_seen = nan;
      }
    }
    __syncthreads();
    const float inv = 1.f / total;
    const bool invalid = nan_seen != 0;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      float acc = 0.f;
      const float* o = part_o + base * D + d;
      for (int64_t i = 0; i < num_splits; ++i) {
        const float wi = w[i];
        if (wi != 0.f) acc = fmaf(wi, o[i * D], acc);
      }
      out[(b * Hq + hq) * D + d] = from_float_d<T>(invalid ? NAN : acc * inv);
    }
    __syncthreads();
  }
}

}  // namespace detail

// Geometry of a call from host-known sizes: keys per split from the longest possible window
// (the table's width, or the sliding window), enough blocks to fill `num_sms` multiprocessors.
// Returns cudaErrorInvalidValue for sizes the kernels do not take (D outside [1, 1024], Hq not a
// multiple of Hkv).
inline cudaError_t make_plan(int64_t B, int64_t Hq, int64_t Hkv, int64_t D, int64_t block_size,
                             int64_t max_blocks, int64_t sliding_window, int num_sms, Plan* plan) {
  if (B < 0 || Hkv < 1 || Hq < 1 || Hq % Hkv != 0 || D < 1 || D > kMaxHeadDim ||
      block_size < 1 || max_blocks < 0)
    return cudaErrorInvalidValue;
  Plan p;
  p.B = B;
  p.Hq = Hq;
  p.Hkv = Hkv;
  p.D = D;
  p.group = Hq / Hkv;
  p.head_groups = detail::ceil_div(p.group, kHeadsPerBlock);
  int64_t longest = max_blocks * block_size;
  if (sliding_window > 0 && sliding_window < longest) longest = sliding_window;
  if (longest < 1) longest = 1;
  // Halve the chunk (more splits) while the grid would not fill the device twice over.
  const int64_t blocks_per_split = (B < 65535 ? B : 65535) * Hkv * p.head_groups;
  int64_t chunk = kMaxChunk;
  while (chunk > kMinChunk &&
         blocks_per_split * detail::ceil_div(longest, chunk) < 2 * static_cast<int64_t>(num_sms))
    chunk /= 2;
  p.chunk = chunk;
  p.num_splits = detail::ceil_div(longest, chunk);
  if (p.num_splits > 0x7fffffff) return cudaErrorInvalidValue;
  p.workspace_bytes =
      p.num_splits > 1
          ? static_cast<size_t>(B * Hq * p.num_splits) * (static_cast<size_t>(D) + 2) * sizeof(float)
          : 0;
  p.smem_bytes = detail::smem_bytes(D, chunk);
  *plan = p;
  return cudaSuccess;
}

// out [B, Hq, D] = attention of q [B, Hq, D] over the cache [num_blocks, 2, block_size, Hkv, D]
// (contiguous, K then V), block_tables [B, max_blocks] and ctx_lens [B] as int64 on the device.
// `workspace` holds plan.workspace_bytes (16-byte aligned; unused when num_splits == 1).
template <typename T>
cudaError_t paged_decode_attention(const T* q, const T* cache, int64_t num_blocks,
                                   int64_t block_size, const int64_t* block_tables,
                                   int64_t max_blocks, const int64_t* ctx_lens, float scale,
                                   int64_t sliding_window, T* out, const Plan& plan,
                                   void* workspace, cudaStream_t stream) {
  if (plan.B == 0) return cudaSuccess;
  if (plan.num_splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  constexpr int kVec = detail::VecOf<T>::kN;
  // 16-byte loads need every row start aligned: the cache base and D * sizeof(T).
  const bool vec = plan.D % kVec == 0 && aligned16(cache);
  float* part_o = static_cast<float*>(workspace);
  float* part_ml =
      plan.num_splits > 1 ? part_o + plan.B * plan.Hq * plan.num_splits * plan.D : nullptr;
  const dim3 grid(static_cast<unsigned>(plan.num_splits),
                  static_cast<unsigned>(plan.Hkv * plan.head_groups),
                  static_cast<unsigned>(plan.B < 65535 ? plan.B : 65535));
  if (plan.Hkv * plan.head_groups > 65535) return cudaErrorInvalidConfiguration;
  auto launch = [&](auto kernel) -> cudaError_t {
    if (plan.smem_bytes > 48 * 1024)
      DISAGG_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(plan.smem_bytes)));
    kernel<<<grid, kThreads, plan.smem_bytes, stream>>>(
        q, cache, block_tables, ctx_lens, plan.B, plan.Hq, plan.Hkv, plan.D, num_blocks,
        block_size, max_blocks, plan.group, plan.head_groups, plan.chunk, plan.num_splits, scale,
        sliding_window, out, part_o, part_ml);
    return cudaGetLastError();
  };
  DISAGG_CUDA_TRY(vec ? launch(detail::partial_kernel<T, kVec>)
                      : launch(detail::partial_kernel<T, 1>));
  if (plan.num_splits == 1) return cudaSuccess;
  const size_t smem = static_cast<size_t>(plan.num_splits) * sizeof(float);
  if (smem > 48 * 1024)
    DISAGG_CUDA_TRY(cudaFuncSetAttribute(detail::combine_kernel<T>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
  const dim3 cgrid(static_cast<unsigned>(plan.Hq),
                   static_cast<unsigned>(plan.B < 65535 ? plan.B : 65535));
  if (plan.Hq > 0x7fffffff) return cudaErrorInvalidConfiguration;
  detail::combine_kernel<T><<<cgrid, kThreads, smem, stream>>>(part_o, part_ml, plan.B, plan.Hq,
                                                               plan.D, plan.num_splits, out);
  return cudaGetLastError();
}

}  // namespace attention
}  // namespace cuda
}  // namespace disagg
