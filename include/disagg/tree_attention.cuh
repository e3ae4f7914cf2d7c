// Torch-free CUDA kernel for token-tree attention over a paged KV cache, with the contract of
// the CPU kernel in tree_attention.h: the nodes of sequence b (query rows [q_offsets[b],
// q_offsets[b+1])) see its ctx_lens[b] committed keys, read in place through its block table,
// plus the tree keys at cache positions ctx .. ctx + tree_len - 1 whose bit is set in their row
// of tree_mask (ancestors and itself); the k-th visible tree key sits at RoPE position ctx + k
// and the query at ctx + (set bits) - 1, which is what sliding_window > 0 compares.
// One warp per (query row, query head): each lane scores one key of a 32-key tile, the warp
// keeps an online softmax, and the value rows are accumulated with the head dimension split
// over the lanes (float32 throughout). The launcher does not validate the index tensors: the
// caller checks them first (paged_tree_attention_check in tree_attention.h).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "disagg/common.cuh"

namespace disagg {
namespace cuda {
namespace tree_attention {

constexpr int64_t kMaxHeadDim = 256;  // accumulators: kMaxHeadDim / 32 per lane
constexpr int kPerLane = static_cast<int>(kMaxHeadDim / 32);

template <typename T, typename Idx>
__global__ void __launch_bounds__(32)
    paged_tree_attention_kernel(const T* q, int64_t Hq, int64_t D, const T* cache,
                                int64_t block_size, int64_t Hkv, const Idx* block_tables,
                                int64_t max_blocks, const Idx* ctx_lens, const Idx* tree_lens,
                                const Idx* q_offsets, int64_t B, const int32_t* tree_mask,
                                int64_t W, float scale, int64_t sliding_window, T* out) {
  __shared__ float qs[kMaxHeadDim];
  const int64_t r = blockIdx.x, hq = blockIdx.y;
  const int lane = threadIdx.x;
  // the sequence owning row r: the last b with q_offsets[b] <= r (empty sequences skipped)
  int64_t lo = 0, hi = B;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (static_cast<int64_t>(q_offsets[mid]) <= r) lo = mid;
    else hi = mid - 1;
  }
  const int64_t b = lo;
  const int64_t ctx = static_cast<int64_t>(ctx_lens[b]);
  const int64_t ntree = static_cast<int64_t>(tree_lens[b]);
  const Idx* table = block_tables + b * max_blocks;
  const int32_t* mrow = tree_mask + r * W;
  const int64_t G = Hq / Hkv, h = hq / G;
  const int64_t row = Hkv * D, kv_stride = block_size * row, blk_stride = 2 * kv_stride;
  for (int64_t d = lane; d < D; d += 32)
    qs[d] = __fmul_rn(to_float_d(q[(r * Hq + hq) * D + d]), scale);
  int bits = 0;
  for (int64_t w = 0; w < W; ++w) bits += __popc(static_cast<uint32_t>(mrow[w]));
  const int64_t qpos = ctx + bits - 1;
  // first visible context key: the window ends sliding_window - 1 positions before the query
  const int64_t first = sliding_window > 0 && qpos - sliding_window + 1 > 0
                            ? qpos - sliding_window + 1 : 0;
  __syncwarp();

  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
  float m = -INFINITY, sum = 0.f;

  // One tile: lane j's key at cache position pos (visible or not); online-softmax update.
  auto tile = [&](int64_t pos, bool visible) {
    const T* k = nullptr;
    float s = -INFINITY;
    if (visible) {
      k = cache + static_cast<int64_t>(table[pos / block_size]) * blk_stride +
          (pos % block_size) * row + h * D;
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot = fmaf(qs[d], to_float_d(k[d]), dot);
      s = dot;
    }
    const float tm = warp_max(s);
    if (tm == -INFINITY) return;  // nothing visible in this tile (uniform over the warp)
    const float mn = fmaxf(m, tm);
    const float keep = m == -INFINITY ? 0.f : expf(m - mn);
    const float p = visible ? expf(s - mn) : 0.f;
    sum = sum * keep + warp_sum(p);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[i] *= keep;
    m = mn;
    const long long voff = visible ? static_cast<long long>((k - cache) + kv_stride) : -1;
    for (int j = 0; j < 32; ++j) {
      const float pj = __shfl_sync(kFullMask, p, j);
      const long long vj = __shfl_sync(kFullMask, voff, j);
      if (vj < 0) continue;
      const T* v = cache + vj;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int64_t d = lane + 32 * i;
        if (d < D) acc[i] = fmaf(pj, to_float_d(v[d]), acc[i]);
      }
    }
  };

  // the committed context
  for (int64_t p0 = first; p0 < ctx; p0 += 32) {
    const int64_t pos = p0 + lane;
    tile(pos, pos < ctx);
  }
  // the tree nodes: visible iff their bit is set (and, with a window, ctx + rank is inside it)
  for (int64_t j0 = 0; j0 < ntree; j0 += 32) {
    const int64_t t = j0 + lane;
    bool on = false;
    if (t < ntree) {
      const uint32_t word = static_cast<uint32_t>(mrow[t / 32]);
      on = (word >> (t % 32)) & 1u;
      if (on && sliding_window > 0) {
        int64_t rank = 0;  // set bits before t: this node's depth on the path
        for (int64_t w = 0; w < t / 32; ++w) rank += __popc(static_cast<uint32_t>(mrow[w]));
        rank += __popc(word & ((1u << (t % 32)) - 1u));
        on = ctx + rank > qpos - sliding_window;
      }
    }
    tile(ctx + t, on);
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  T* o = out + (r * Hq + hq) * D;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < D) o[d] = from_float_d<T>(acc[i] * inv);
  }
}

// q [T, Hq, D], cache [num_blocks, 2, block_size, Hkv, D], block_tables [B, max_blocks],
// ctx_lens / tree_lens [B], q_offsets [B + 1], tree_mask [T, W] -> out [T, Hq, D].
template <typename T, typename Idx>
cudaError_t paged_tree_attention(const T* q, int64_t Tq, int64_t Hq, int64_t D, const T* cache,
                                 int64_t block_size, int64_t Hkv, const Idx* block_tables,
                                 int64_t max_blocks, const Idx* ctx_lens, const Idx* tree_lens,
                                 const Idx* q_offsets, int64_t B, const int32_t* tree_mask,
                                 int64_t W, float scale, int64_t sliding_window, T* out,
                                 cudaStream_t stream) {
  if (Tq < 0 || Hq < 1 || Hkv < 1 || Hq % Hkv != 0 || D < 1 || D > kMaxHeadDim ||
      block_size < 1 || B < 1 || W < 1 || Hq > 65535)
    return cudaErrorInvalidValue;
  if (Tq == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(Tq), static_cast<unsigned>(Hq));
  paged_tree_attention_kernel<T, Idx><<<grid, 32, 0, stream>>>(
      q, Hq, D, cache, block_size, Hkv, block_tables, max_blocks, ctx_lens, tree_lens, q_offsets,
      B, tree_mask, W, scale, sliding_window, out);
  return cudaGetLastError();
}

}  // namespace tree_attention
}  // namespace cuda
}  // namespace disagg
