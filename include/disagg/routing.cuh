// MoE routing kernels on CUDA (torch-free): fused scoring + (grouped) top-k + capacity, the
// expert-grouped dispatch layout, permute and weighted combine. Same contracts as the CPU kernels
// in routing.h; raw pointers, sizes, a stream; every entry point returns cudaError_t and never
// synchronizes with the host, so all of them can be captured in a CUDA graph.
//
// route runs as a short chain of kernels:
//   1. one warp per token: ranking values (logits, or scores + bias with groups), top-k, weights,
//      the row maximum and the weight normaliser
//   2. one warp per chunk of assignments: each assignment's rank among the chunk's earlier
//      assignments to the same expert, and the chunk's per-expert histogram
//   3. one warp per expert: exclusive prefix of the histogram over chunks, expert totals
//   4. per assignment: final slot = chunk base + rank, then the capacity rule
//      - position: keep slot < capacity
//      - probs: assignments are scattered into expert-grouped lists, then one block per expert
//        finds the capacity-th heaviest by radix select and numbers the kept ones in token order
//   5. overflow=reroute only: the dropped assignments in priority order (stable select or a
//      radix sort on the weight), then ONE warp moves them one after another, because each move
//      changes the room left for the next (the CPU op's sequential rule, kept exactly).
// Steps 2-4 make the "token order" slots of the CPU op without atomics, so ids, slots and
// counts equal the CPU op's whenever the scores order the experts the same way.
#pragma once

#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_select.cuh>

#include <cstddef>
#include <cstdint>

#include "disagg/common.cuh"
#include "disagg/routing_params.h"

namespace disagg {
namespace cuda {
namespace detail {

constexpr int kWarp = 32;

__host__ __device__ inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// ---- per-token building blocks (one warp, arrays in shared memory) -----------------------------

// Loads one token's row as float into xv[0..E) with NaN -> -inf; returns its maximum.
template <typename T>
__device__ float warp_load_row(const T* __restrict__ x, int E, float* xv) {
  const int lane = threadIdx.x & 31;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += kWarp) {
    const float v = to_float_d(x[e]);
    xv[e] = isnan(v) ? -INFINITY : v;
    mx = fmaxf(mx, xv[e]);
  }
  __syncwarp();
  return warp_max(mx);
}

// Unnormalised score u(x) (weights are u / Z), the same formulas as detail::unnormalised on
// the CPU: softmax exp(x - max) (a +inf maximum gives 1 to the +inf entries and 0 elsewhere, a
// -inf maximum 0 everywhere), sigmoid 1 / (1 + exp(-x)).
__device__ __forceinline__ float unnormalised_d(float x, float mx, Scoring scoring) {
  if (scoring == Scoring::kSigmoid) return 1.0f / (1.0f + expf(-x));
  if (mx == INFINITY) return x == INFINITY ? 1.0f : 0.0f;
  if (mx == -INFINITY) return 0.0f;
  return expf(x - mx);
}

// Sum of u over the row (the softmax denominator), reduced over the warp.
__device__ __forceinline__ float warp_unnormalised_sum(const float* xv, int E, float mx,
                                                       Scoring scoring) {
  float s = 0.0f;
  for (int e = threadIdx.x & 31; e < E; e += kWarp) s += unnormalised_d(xv[e], mx, scoring);
  return warp_sum(s);
}

// Without bias or groups, experts are ranked by their logits (softmax and sigmoid are monotone),
// which avoids the spurious ties of exp underflow; as detail::ranks_by_logits on the CPU.
__host__ __device__ __forceinline__ bool ranks_by_logits(const RouteParams& p) {
  return p.bias == nullptr && !(p.num_groups > 1 && p.topk_groups < p.num_groups);
}

// Ranking values sel[0..E) of one token (detail::selection_row on the CPU): the logits, or score
// + bias with the experts outside the topk_groups best groups at -inf. gscore[G] and gtaken[G]
// are scratch.
__device__ void warp_selection_row(const float* xv, float mx, const RouteParams& p, float* sel,
                                   float* gscore, uint8_t* gtaken) {
  const int lane = threadIdx.x & 31;
  const int E = static_cast<int>(p.num_experts);
  if (ranks_by_logits(p)) {
    for (int e = lane; e < E; e += kWarp) sel[e] = xv[e];
    __syncwarp();
    return;
  }
  const float S = p.scoring == Scoring::kSoftmax ? warp_unnormalised_sum(xv, E, mx, p.scoring)
                                                 : 1.0f;
  const float inv = S > 0.0f ? 1.0f / S : 0.0f;
  for (int e = lane; e < E; e += kWarp)
    sel[e] = unnormalised_d(xv[e], mx, p.scoring) * inv + (p.bias ? p.bias[e] : 0.0f);
  __syncwarp();
  if (p.num_groups <= 1 || p.topk_groups >= p.num_groups) return;
  const int G = static_cast<int>(p.num_groups), per = E / G;
  for (int g = lane; g < G; g += kWarp) {
    const float* x = sel + g * per;
    float gs;
    if (p.group_score == GroupScore::kMax || per < 2) {
      gs = x[0];
      for (int i = 1; i < per; ++i) gs = (gs < x[i]) ? x[i] : gs;  // std::max, as on the CPU
    } else {
      float a = -INFINITY, b = -INFINITY;
      for (int i = 0; i < per; ++i) {
        if (x[i] > a) { b = a; a = x[i]; } else if (x[i] > b) { b = x[i]; }
      }
      gs = a + b;
    }
    gscore[g] = gs;
    gtaken[g] = 0;
  }
  __syncwarp();
  for (int i = 0; i < p.topk_groups; ++i) {
    float bs = -INFINITY;
    int32_t bi = -1;
    for (int g = lane; g < G; g += kWarp)
      if (!gtaken[g] && ranks_before_d(gscore[g], g, bs, bi)) { bs = gscore[g]; bi = g; }
    warp_argbest(bs, bi);
    if (lane == 0) gtaken[bi] = 1;
    __syncwarp();
  }
  for (int e = lane; e < E; e += kWarp)
    if (!gtaken[e / per]) sel[e] = -INFINITY;
  __syncwarp();
}

// The lane's best expert among its own (e = lane, lane+32, ...) that is not taken yet.
__device__ __forceinline__ void lane_best(const float* sel, const uint8_t* taken, int E, float& bs,
                                          int32_t& bi) {
  bs = -INFINITY;
  bi = -1;
  for (int e = threadIdx.x & 31; e < E; e += kWarp)
    if (!taken[e] && ranks_before_d(sel[e], e, bs, bi)) { bs = sel[e]; bi = e; }
}

// The k best experts by (sel desc, index asc), best first, into idx[0..k). Each round takes the
// warp's best; only the lane that owned the winner rescans its experts.
__device__ void warp_topk(const float* sel, int E, int k, uint8_t* taken, int32_t* idx) {
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < E; e += kWarp) taken[e] = 0;
  float bs;
  int32_t bi;
  lane_best(sel, taken, E, bs, bi);
  for (int j = 0; j < k; ++j) {
    float ws = bs;
    int32_t wi = bi;
    warp_argbest(ws, wi);
    if (lane == 0) idx[j] = wi;
    if (bi >= 0 && wi == bi) {  // this lane owned the winner
      taken[wi] = 1;
      lane_best(sel, taken, E, bs, bi);
    }
  }
  __syncwarp();
}

// Shared memory of one warp in the per-token kernels.
struct TokenSmem {
  size_t score, sel, gscore, idx, cnt, taken, gtaken, bytes;
};

__host__ __device__ inline TokenSmem token_smem(int64_t E, int64_t G, int64_t k, bool with_cnt) {
  TokenSmem m{};
  size_t o = 0;
  m.score = o; o += 4 * E;
  m.sel = o; o += 4 * E;
  m.gscore = o; o += 4 * G;
  m.idx = o; o += 4 * k;
  m.cnt = o; o += with_cnt ? 4 * E : 0;
  m.taken = o; o += E;
  m.gtaken = o; o += G;
  m.bytes = align_up(o, 16);
  return m;
}

// Step 1: one warp per token.
template <typename T>
__global__ void route_topk_kernel(const T* __restrict__ logits, RouteParams p,
                                  float* __restrict__ weights, int32_t* __restrict__ ids,
                                  float* __restrict__ row_max, float* __restrict__ norm) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
  const int E = static_cast<int>(p.num_experts), k = static_cast<int>(p.top_k);
  const TokenSmem m = token_smem(E, p.num_groups, k, false);
  unsigned char* base = smem_raw + static_cast<size_t>(warp) * m.bytes;
  float* xv = reinterpret_cast<float*>(base + m.score);
  float* sel = reinterpret_cast<float*>(base + m.sel);
  float* gscore = reinterpret_cast<float*>(base + m.gscore);
  int32_t* idx = reinterpret_cast<int32_t*>(base + m.idx);
  uint8_t* taken = base + m.taken;
  uint8_t* gtaken = base + m.gtaken;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * wpb + warp; t < p.num_tokens;
       t += static_cast<int64_t>(gridDim.x) * wpb) {
    const float mx = warp_load_row(logits + t * p.logits_row_stride, E, xv);
    warp_selection_row(xv, mx, p, sel, gscore, gtaken);
    warp_topk(sel, E, k, taken, idx);
    // Weights as on the CPU: u / z * scale, z the sum of the chosen u (in choice order, so it
    // matches bit for bit), or the softmax denominator, or 1.
    float chosen = 0.0f;
    for (int j = 0; j < k; ++j) chosen += unnormalised_d(xv[idx[j]], mx, p.scoring);
    float z;
    if (p.renormalize) {
      z = chosen;
    } else if (p.scoring == Scoring::kSoftmax) {
      z = warp_unnormalised_sum(xv, E, mx, p.scoring);
    } else {
      z = 1.0f;
    }
    if (!(z > 0.0f)) z = 1.0f;  // a row with no mass keeps zero weights
    if (lane == 0) {
      row_max[t] = mx;
      norm[t] = z;
    }
    for (int j = lane; j < k; j += kWarp) {
      ids[t * k + j] = idx[j];
      weights[t * k + j] = unnormalised_d(xv[idx[j]], mx, p.scoring) / z * p.routed_scaling_factor;
    }
    __syncwarp();
  }
}

// ---- stable per-expert ranks (steps 2 and 3; shared with moe_layout) ---------------------------

// Step 2: one warp per chunk of `chunk` assignments (a multiple of 32). rank[a] is the number of
// earlier assignments of the chunk with the same expert; hist[e * nchunks + c] the chunk's count
// for expert e. ids outside [0, E) get rank -1 and are not counted.
template <typename I>
__global__ void chunk_rank_kernel(const I* __restrict__ ids, int64_t n, int E, int chunk,
                                  int nchunks, int32_t* __restrict__ rank,
                                  int32_t* __restrict__ hist) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
  int32_t* cnt = reinterpret_cast<int32_t*>(smem_raw) + static_cast<size_t>(warp) * E;
  for (int c = blockIdx.x * wpb + warp; c < nchunks; c += gridDim.x * wpb) {
    for (int e = lane; e < E; e += kWarp) cnt[e] = 0;
    __syncwarp();
    const int64_t begin = static_cast<int64_t>(c) * chunk;
    const int64_t end = begin + chunk < n ? begin + chunk : n;
    for (int64_t b = begin; b < end; b += kWarp) {
      const int64_t a = b + lane;
      int e = -1;
      if (a < end) {
        const int64_t v = static_cast<int64_t>(ids[a]);
        e = (v >= 0 && v < E) ? static_cast<int>(v) : -1;
      }
      const unsigned peers = __match_any_sync(kFullMask, e);
      int32_t r = -1;
      if (e >= 0) r = cnt[e] + __popc(peers & ((1u << lane) - 1u));
      __syncwarp();
      if (e >= 0 && lane == __ffs(peers) - 1) cnt[e] += __popc(peers);
      __syncwarp();
      if (a < end) rank[a] = r;
    }
    for (int e = lane; e < E; e += kWarp) hist[static_cast<int64_t>(e) * nchunks + c] = cnt[e];
    __syncwarp();
  }
}

// Step 3: one warp per expert. hist[e][c] becomes the expert's assignments in chunks before c;
// total[e] the expert's assignments; counts[e] (when given) min(total, cap) or total if cap <= 0.
__global__ void chunk_scan_kernel(int32_t* __restrict__ hist, int E, int nchunks,
                                  int32_t* __restrict__ total, int32_t* __restrict__ counts,
                                  int64_t cap) {
  const int lane = threadIdx.x & 31;
  const int e = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (e >= E) return;  // whole warps leave together
  int32_t* h = hist + static_cast<int64_t>(e) * nchunks;
  // Each lane owns a contiguous run of chunks: its loads are independent and overlap.
  const int per = (nchunks + kWarp - 1) / kWarp;
  const int b = lane * per, en = b + per < nchunks ? b + per : nchunks;
  int32_t s = 0;
  for (int c = b; c < en; ++c) s += h[c];
  const int32_t incl = warp_inclusive_scan(s);
  int32_t run = incl - s;
  for (int c = b; c < en; ++c) {
    const int32_t v = h[c];
    h[c] = run;
    run += v;
  }
  if (lane == 31) {
    total[e] = incl;
    if (counts) counts[e] = (cap > 0 && incl > cap) ? static_cast<int32_t>(cap) : incl;
  }
}

// Exclusive prefix of total[0..E) into off[0..E], and rank_off[r] = off[r*E/R] (one block).
__global__ void expert_offsets_kernel(const int32_t* __restrict__ total, int E,
                                      int32_t* __restrict__ off, int R,
                                      int32_t* __restrict__ rank_off) {
  __shared__ int32_t scratch[33];
  int32_t carry = 0;
  for (int b = 0; b < E; b += blockDim.x) {
    const int e = b + threadIdx.x;
    const int32_t v = e < E ? total[e] : 0;
    int32_t tot;
    const int32_t ex = block_exclusive_scan(v, scratch, &tot);
    if (e < E) off[e] = carry + ex;
    carry += tot;
  }
  if (threadIdx.x == 0) off[E] = carry;
  __syncthreads();
  if (rank_off)
    for (int r = threadIdx.x; r <= R; r += blockDim.x)
      rank_off[r] = off[static_cast<int64_t>(r) * E / R];
}

// ---- capacity (step 4) -------------------------------------------------------------------------

// Order-preserving key of a float weight (+0 and -0 equal, as `>` on the CPU sees them), with the
// assignment index in the low word so that ties go to the lower index and keys are unique.
__device__ __forceinline__ uint64_t weight_key(float w, int64_t a) {
  const uint32_t u = __float_as_uint(w == 0.0f ? 0.0f : w);
  const uint32_t f = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(f) << 32) | (0xffffffffu - static_cast<uint32_t>(a));
}

// Slot of every assignment = chunk base + rank, then the position rule (or, for probs, the
// scatter into expert-grouped lists). flags/aidx feed the reroute selection when given.
__global__ void route_apply_kernel(int32_t* __restrict__ ids, float* __restrict__ weights,
                                   const int32_t* __restrict__ rank,
                                   const int32_t* __restrict__ hist, int64_t n, int nchunks,
                                   int chunk, RouteParams p, const int32_t* __restrict__ off,
                                   int32_t* __restrict__ slots, int32_t* __restrict__ grouped,
                                   uint8_t* __restrict__ flags, int32_t* __restrict__ aidx) {
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < n;
       a += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t e = ids[a];
    const int32_t r = hist[static_cast<int64_t>(e) * nchunks + a / chunk] + rank[a];
    if (aidx) aidx[a] = static_cast<int32_t>(a);
    if (p.capacity <= 0) {
      slots[a] = r;
    } else if (p.drop_policy == DropPolicy::kPosition) {
      const bool keep = r < p.capacity;
      slots[a] = keep ? r : -1;
      if (!keep && p.overflow == Overflow::kDrop) {
        ids[a] = -1;
        weights[a] = 0.0f;
      }
      if (flags) flags[a] = keep ? 0 : 1;
    } else {
      grouped[off[e] + r] = static_cast<int32_t>(a);
    }
  }
}

// probs: one block per expert. Experts within capacity keep everything in token order; for the
// others a radix select over the 64-bit keys finds the capacity-th heaviest assignment, then a
// block scan numbers the kept ones in token order. Dropped ones get their sort key in drop_keys
// (reroute) or are cleared (drop).
__global__ void probs_select_kernel(int32_t* __restrict__ ids, float* __restrict__ weights,
                                    const int32_t* __restrict__ total,
                                    const int32_t* __restrict__ off,
                                    const int32_t* __restrict__ grouped, RouteParams p,
                                    int32_t* __restrict__ slots, int32_t* __restrict__ counts,
                                    uint64_t* __restrict__ drop_keys) {
  __shared__ int32_t bins[256];
  __shared__ int32_t scratch[33];
  __shared__ uint64_t s_prefix;
  __shared__ int32_t s_rem;
  const int e = blockIdx.x;
  const int32_t n = total[e];
  const int64_t C = p.capacity;
  const int32_t* m = grouped + off[e];
  if (n <= C) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) slots[m[i]] = i;
    if (threadIdx.x == 0) counts[e] = n;
    return;
  }
  uint64_t prefix = 0, mask = 0;
  int32_t rem = static_cast<int32_t>(C);
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) bins[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int32_t a = m[i];
      const uint64_t key = weight_key(weights[a], a);
      if ((key & mask) == prefix) atomicAdd(&bins[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int32_t above = 0;
      int b = 255;
      for (; b > 0; --b) {
        if (above + bins[b] >= rem) break;
        above += bins[b];
      }
      s_prefix = prefix | (static_cast<uint64_t>(b) << shift);
      s_rem = rem - above;
    }
    __syncthreads();
    prefix = s_prefix;
    rem = s_rem;
    mask |= static_cast<uint64_t>(255) << shift;
  }
  const uint64_t threshold = prefix;  // the key of the C-th heaviest; keys are unique
  int32_t carry = 0;
  for (int b = 0; b < n; b += blockDim.x) {
    const int i = b + threadIdx.x;
    int32_t a = -1;
    uint64_t key = 0;
    if (i < n) {
      a = m[i];
      key = weight_key(weights[a], a);
    }
    const int32_t keep = (i < n && key >= threshold) ? 1 : 0;
    int32_t tot;
    const int32_t ex = block_exclusive_scan(keep, scratch, &tot);
    if (i < n) {
      if (keep) {
        slots[a] = carry + ex;
      } else {
        slots[a] = -1;
        if (drop_keys) {
          drop_keys[a] = key;
        } else {
          ids[a] = -1;
          weights[a] = 0.0f;
        }
      }
    }
    carry += tot;
  }
  if (threadIdx.x == 0) counts[e] = static_cast<int32_t>(C);
}

// ---- reroute (step 5) --------------------------------------------------------------------------

// One warp visits the dropped assignments in priority order and moves each to the token's best
// expert (selection order, inside the chosen groups, not held by the token) that still has room.
// Sequential on purpose: every move changes the room the next one sees.
template <typename T>
__global__ void reroute_kernel(const T* __restrict__ logits, RouteParams p,
                               const float* __restrict__ row_max,
                               const float* __restrict__ norm, const int32_t* __restrict__ order,
                               const int32_t* __restrict__ num_order,
                               const uint64_t* __restrict__ sorted_keys, int64_t n,
                               int32_t* __restrict__ ids, float* __restrict__ weights,
                               int32_t* __restrict__ slots, int32_t* __restrict__ counts) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x & 31;
  const int E = static_cast<int>(p.num_experts), k = static_cast<int>(p.top_k);
  const TokenSmem m = token_smem(E, p.num_groups, k, true);
  float* xv = reinterpret_cast<float*>(smem_raw + m.score);
  float* sel = reinterpret_cast<float*>(smem_raw + m.sel);
  float* gscore = reinterpret_cast<float*>(smem_raw + m.gscore);
  int32_t* cnt = reinterpret_cast<int32_t*>(smem_raw + m.cnt);
  uint8_t* held = smem_raw + m.taken;
  uint8_t* gtaken = smem_raw + m.gtaken;
  const bool grouped = p.num_groups > 1 && p.topk_groups < p.num_groups;
  const int64_t C = p.capacity;
  for (int e = lane; e < E; e += kWarp) {
    cnt[e] = counts[e];
    held[e] = 0;
  }
  __syncwarp();
  const int64_t D = num_order ? static_cast<int64_t>(*num_order) : n;
  int64_t cached = -1;
  int64_t visited = 0;
  for (int64_t i = 0; i < D; ++i) {
    if (sorted_keys && sorted_keys[i] == 0) break;  // past the dropped ones
    ++visited;
    const int32_t a = order[i];
    const int64_t t = a / k;
    if (t != cached) {
      const float mx = warp_load_row(logits + t * p.logits_row_stride, E, xv);
      warp_selection_row(xv, mx, p, sel, gscore, gtaken);
      cached = t;
    }
    const int32_t* tid = ids + t * k;
    for (int j = lane; j < k; j += kWarp)
      if (tid[j] >= 0) held[tid[j]] = 1;
    __syncwarp();
    float bs = -INFINITY;
    int32_t bi = -1;
    for (int e = lane; e < E; e += kWarp) {
      if (held[e] || cnt[e] >= C || (grouped && sel[e] == -INFINITY)) continue;
      if (ranks_before_d(sel[e], e, bs, bi)) { bs = sel[e]; bi = e; }
    }
    warp_argbest(bs, bi);
    __syncwarp();
    for (int j = lane; j < k; j += kWarp)
      if (tid[j] >= 0) held[tid[j]] = 0;
    // Lanes run independently: every lane must have cleared its flag (reading the token's old
    // ids) before lane 0 changes ids[a].
    __syncwarp();
    if (lane == 0 && bi >= 0) {
      ids[a] = bi;
      slots[a] = cnt[bi]++;
      weights[a] = unnormalised_d(xv[bi], row_max[t], p.scoring) / norm[t] *
                   p.routed_scaling_factor;
    }
    __syncwarp();
  }
  for (int64_t i = lane; i < visited; i += kWarp) {
    const int32_t a = order[i];
    if (slots[a] < 0) {
      ids[a] = -1;
      weights[a] = 0.0f;
    }
  }
  for (int e = lane; e < E; e += kWarp) counts[e] = cnt[e];
}

// ---- launch helpers ----------------------------------------------------------------------------

inline int grid_for(int64_t work, int per_block, int64_t cap = 1 << 20) {
  int64_t g = (work + per_block - 1) / per_block;
  if (g < 1) g = 1;
  return static_cast<int>(g < cap ? g : cap);
}

// Warps per block for a kernel using `per_warp` bytes of dynamic shared memory per warp; opts the
// kernel into more than 48 KiB when one warp needs it.
template <typename K>
inline cudaError_t warps_for_smem(K kernel, size_t per_warp, int max_warps, int* warps) {
  constexpr size_t kDefaultSmem = 48 * 1024;  // dynamic shared memory without opting in
  int w = max_warps;
  while (w > 1 && per_warp * w > kDefaultSmem) --w;
  if (per_warp * w > kDefaultSmem) {
    int dev = 0, optin = 0;
    DISAGG_CUDA_TRY(cudaGetDevice(&dev));
    DISAGG_CUDA_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (per_warp > static_cast<size_t>(optin)) return cudaErrorInvalidValue;  // E far too large
    DISAGG_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(per_warp)));
  }
  *warps = w;
  return cudaSuccess;
}

// Chunk length for the stable ranks: long enough that clearing and writing the per-expert
// histogram (E entries) stays small next to the chunk's own work.
inline int rank_chunk(int64_t E) {
  const int64_t c = ((E + 31) / 32) * 32;
  return static_cast<int>(c > 256 ? c : 256);
}

template <typename I>
inline cudaError_t launch_stable_ranks(const I* ids, int64_t n, int E, int chunk, int nchunks,
                                       int32_t* rank, int32_t* hist, int32_t* total,
                                       int32_t* counts, int64_t cap, cudaStream_t stream) {
  int wpb = 1;
  DISAGG_CUDA_TRY(warps_for_smem(chunk_rank_kernel<I>, sizeof(int32_t) * E, 8, &wpb));
  chunk_rank_kernel<I><<<grid_for(nchunks, wpb), wpb * kWarp, sizeof(int32_t) * E * wpb, stream>>>(
      ids, n, E, chunk, nchunks, rank, hist);
  DISAGG_CUDA_TRY(cudaGetLastError());
  chunk_scan_kernel<<<grid_for(E, 8), 8 * kWarp, 0, stream>>>(hist, E, nchunks, total, counts, cap);
  return cudaGetLastError();
}

}  // namespace detail

// ---- route -------------------------------------------------------------------------------------

// Where route keeps its intermediate arrays inside one caller-provided workspace (byte offsets).
struct RouteWorkspace {
  size_t row_max = 0, norm = 0, rank = 0, hist = 0, total = 0, off = 0, grouped = 0, aidx = 0, order = 0,
         flags = 0, num_sel = 0, keys_in = 0, keys_out = 0, temp = 0;
  size_t temp_bytes = 0, bytes = 0;
  int chunk = 0, nchunks = 0;
};

// Computes the workspace layout for p (host only; asks CUB for its scratch size, launches
// nothing).
inline cudaError_t route_workspace(const RouteParams& p, RouteWorkspace* w) {
  using detail::align_up;
  const int64_t T = p.num_tokens, E = p.num_experts, n = p.num_tokens * p.top_k;
  RouteWorkspace r;
  r.chunk = detail::rank_chunk(E);
  r.nchunks = static_cast<int>((n + r.chunk - 1) / r.chunk);
  const bool probs = p.capacity > 0 && p.drop_policy == DropPolicy::kProbs;
  const bool reroute = p.capacity > 0 && p.overflow == Overflow::kReroute;
  size_t o = 0;
  auto take = [&](size_t bytes) {
    const size_t at = o;
    o = align_up(o + bytes, 256);
    return at;
  };
  r.row_max = take(4 * T);
  r.norm = take(4 * T);
  r.rank = take(4 * n);
  r.hist = take(4 * E * static_cast<int64_t>(r.nchunks));
  r.total = take(4 * E);
  if (probs) {
    r.off = take(4 * (E + 1));
    r.grouped = take(4 * n);
  }
  if (reroute) {
    r.aidx = take(4 * n);
    r.order = take(4 * n);
    if (probs) {
      r.keys_in = take(8 * n);
      r.keys_out = take(8 * n);
      DISAGG_CUDA_TRY(cub::DeviceRadixSort::SortPairsDescending(
          nullptr, r.temp_bytes, static_cast<const uint64_t*>(nullptr),
          static_cast<uint64_t*>(nullptr), static_cast<const int32_t*>(nullptr),
          static_cast<int32_t*>(nullptr), static_cast<int>(n)));
    } else {
      r.flags = take(n);
      r.num_sel = take(4);
      DISAGG_CUDA_TRY(cub::DeviceSelect::Flagged(
          nullptr, r.temp_bytes, static_cast<const int32_t*>(nullptr),
          static_cast<const uint8_t*>(nullptr), static_cast<int32_t*>(nullptr),
          static_cast<int32_t*>(nullptr), static_cast<int>(n)));
    }
    r.temp = take(r.temp_bytes);
  }
  r.bytes = o;
  *w = r;
  return cudaSuccess;
}

// Fused routing with the CPU op's semantics (see route_cpu in routing.h). Outputs weights [T,k],
// ids [T,k], slots [T,k], counts [E]; workspace must hold route_workspace(p).bytes bytes,
// 256-byte aligned. No host synchronization.
template <typename T>
cudaError_t route(const T* logits, const RouteParams& p, float* weights, int32_t* ids,
                  int32_t* slots, int32_t* counts, void* workspace, size_t workspace_bytes,
                  cudaStream_t stream) {
  using namespace detail;
  const int64_t Tn = p.num_tokens, E = p.num_experts, k = p.top_k, n = Tn * k;
  if (E < 1 || k < 1 || k > E || p.num_groups < 1 || E % p.num_groups != 0 ||
      p.topk_groups < 1 || p.topk_groups > p.num_groups || n > INT32_MAX || E > INT32_MAX / 2)
    return cudaErrorInvalidValue;
  if (Tn == 0) return cudaMemsetAsync(counts, 0, sizeof(int32_t) * E, stream);
  RouteWorkspace w;
  DISAGG_CUDA_TRY(route_workspace(p, &w));
  if (workspace_bytes < w.bytes || !aligned16(workspace)) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  float* row_max = reinterpret_cast<float*>(ws + w.row_max);
  float* norm = reinterpret_cast<float*>(ws + w.norm);
  int32_t* rank = reinterpret_cast<int32_t*>(ws + w.rank);
  int32_t* hist = reinterpret_cast<int32_t*>(ws + w.hist);
  int32_t* total = reinterpret_cast<int32_t*>(ws + w.total);
  const bool probs = p.capacity > 0 && p.drop_policy == DropPolicy::kProbs;
  const bool reroute = p.capacity > 0 && p.overflow == Overflow::kReroute;

  // 1. scores and top-k, one warp per token
  const TokenSmem m = token_smem(E, p.num_groups, k, false);
  int wpb = 1;
  DISAGG_CUDA_TRY(warps_for_smem(route_topk_kernel<T>, m.bytes, 8, &wpb));
  route_topk_kernel<T><<<grid_for(Tn, wpb), wpb * kWarp, m.bytes * wpb, stream>>>(
      logits, p, weights, ids, row_max, norm);
  DISAGG_CUDA_TRY(cudaGetLastError());

  // 2-3. stable ranks per expert; counts are final here unless probs/reroute change them
  DISAGG_CUDA_TRY(launch_stable_ranks<int32_t>(ids, n, static_cast<int>(E), w.chunk, w.nchunks,
                                               rank, hist, total, probs ? nullptr : counts,
                                               p.capacity, stream));
  int32_t* off = probs ? reinterpret_cast<int32_t*>(ws + w.off) : nullptr;
  int32_t* grouped = probs ? reinterpret_cast<int32_t*>(ws + w.grouped) : nullptr;
  if (probs) {
    expert_offsets_kernel<<<1, 1024, 0, stream>>>(total, static_cast<int>(E), off, 1, nullptr);
    DISAGG_CUDA_TRY(cudaGetLastError());
  }
  int32_t* aidx = reroute ? reinterpret_cast<int32_t*>(ws + w.aidx) : nullptr;
  uint8_t* flags = (reroute && !probs) ? ws + w.flags : nullptr;
  uint64_t* keys_in = (reroute && probs) ? reinterpret_cast<uint64_t*>(ws + w.keys_in) : nullptr;
  if (keys_in) DISAGG_CUDA_TRY(cudaMemsetAsync(keys_in, 0, sizeof(uint64_t) * n, stream));

  // 4. slots and the capacity rule
  route_apply_kernel<<<grid_for(n, 256), 256, 0, stream>>>(ids, weights, rank, hist, n,
                                                           w.nchunks, w.chunk, p, off, slots,
                                                           grouped, flags, aidx);
  DISAGG_CUDA_TRY(cudaGetLastError());
  if (probs) {
    probs_select_kernel<<<static_cast<unsigned>(E), 256, 0, stream>>>(ids, weights, total, off,
                                                                     grouped, p, slots, counts,
                                                                     keys_in);
    DISAGG_CUDA_TRY(cudaGetLastError());
  }
  if (!reroute) return cudaSuccess;

  // 5. reroute: dropped assignments in priority order, then one warp moves them
  int32_t* order = reinterpret_cast<int32_t*>(ws + w.order);
  void* temp = ws + w.temp;
  size_t temp_bytes = w.temp_bytes;
  const int32_t* num_order = nullptr;
  const uint64_t* sorted_keys = nullptr;
  if (probs) {
    uint64_t* keys_out = reinterpret_cast<uint64_t*>(ws + w.keys_out);
    DISAGG_CUDA_TRY(cub::DeviceRadixSort::SortPairsDescending(
        temp, temp_bytes, keys_in, keys_out, aidx, order, static_cast<int>(n), 0, 64, stream));
    sorted_keys = keys_out;
  } else {
    int32_t* num_sel = reinterpret_cast<int32_t*>(ws + w.num_sel);
    DISAGG_CUDA_TRY(cub::DeviceSelect::Flagged(temp, temp_bytes, aidx, flags, order, num_sel,
                                               static_cast<int>(n), stream));
    num_order = num_sel;
  }
  const TokenSmem mr = token_smem(E, p.num_groups, k, true);
  int one = 1;
  DISAGG_CUDA_TRY(warps_for_smem(reroute_kernel<T>, mr.bytes, 1, &one));
  reroute_kernel<T><<<1, kWarp, mr.bytes, stream>>>(logits, p, row_max, norm, order, num_order,
                                                     sorted_keys, n, ids, weights, slots, counts);
  return cudaGetLastError();
}

// ---- moe_layout --------------------------------------------------------------------------------

namespace detail {

// Compact layout: row = expert offset + stable rank. Invalid ids (outside [-1, E)) are treated
// as dropped: the kernels never index memory with them.
template <typename I>
__global__ void layout_compact_kernel(const I* __restrict__ ids, int64_t n, int E,
                                      const int32_t* __restrict__ rank,
                                      const int32_t* __restrict__ hist, int nchunks, int chunk,
                                      const int32_t* __restrict__ off, int32_t* __restrict__ dest,
                                      int32_t* __restrict__ src) {
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < n;
       a += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = static_cast<int64_t>(ids[a]);
    if (e < 0 || e >= E) {
      dest[a] = -1;
      continue;
    }
    const int32_t row = off[e] + hist[e * nchunks + a / chunk] + rank[a];
    dest[a] = row;
    src[row] = static_cast<int32_t>(a);
  }
}

// Padded layout: row = e * capacity + slot. An out-of-range id or slot, or a slot already taken
// by another assignment, leaves the assignment dropped (dest = -1).
template <typename I>
__global__ void layout_padded_kernel(const I* __restrict__ ids, const I* __restrict__ slots,
                                     int64_t n, int E, int64_t capacity,
                                     int32_t* __restrict__ dest, int32_t* __restrict__ src) {
  for (int64_t a = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; a < n;
       a += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = static_cast<int64_t>(ids[a]);
    const int64_t s = static_cast<int64_t>(slots[a]);
    if (e < 0 || e >= E || s < 0 || s >= capacity) {
      dest[a] = -1;
      continue;
    }
    const int64_t row = e * capacity + s;
    const int32_t prev = atomicCAS(&src[row], -1, static_cast<int32_t>(a));
    dest[a] = prev == -1 ? static_cast<int32_t>(row) : -1;
  }
}

__global__ void padded_offsets_kernel(int E, int64_t capacity, int R, int32_t* __restrict__ off,
                                      int32_t* __restrict__ rank_off) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= E) off[i] = static_cast<int32_t>(i * capacity);
  if (i <= R) rank_off[i] = static_cast<int32_t>((static_cast<int64_t>(i) * E / R) * capacity);
}

}  // namespace detail

struct LayoutWorkspace {
  size_t rank = 0, hist = 0, total = 0, bytes = 0;
  int chunk = 0, nchunks = 0;
};

inline LayoutWorkspace moe_layout_workspace(int64_t num_assign, int64_t E, int64_t capacity) {
  using detail::align_up;
  LayoutWorkspace w;
  if (capacity > 0) return w;  // the padded layout needs no scratch
  w.chunk = detail::rank_chunk(E);
  w.nchunks = static_cast<int>((num_assign + w.chunk - 1) / w.chunk);
  w.rank = 0;
  w.hist = align_up(4 * num_assign, 256);
  w.total = w.hist + align_up(4 * E * static_cast<int64_t>(w.nchunks), 256);
  w.bytes = w.total + align_up(4 * E, 256);
  return w;
}

// Expert-grouped dispatch layout (moe_layout_cpu in routing.h). On CUDA, ids/slots outside their
// ranges cannot be reported without a host sync: such assignments are treated as dropped and no
// memory outside the outputs is touched.
template <typename I>
cudaError_t moe_layout(const I* ids, const I* slots, int64_t num_assign, int64_t E, int64_t R,
                       int64_t capacity, int32_t* dest, int32_t* src, int32_t* expert_offsets,
                       int32_t* rank_offsets, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  using namespace detail;
  if (E < 1 || R < 1 || R > E || capacity < 0 || num_assign > INT32_MAX ||
      E * (capacity > 0 ? capacity : 1) > INT32_MAX || E > INT32_MAX / 2)
    return cudaErrorInvalidValue;
  const int64_t rows = capacity > 0 ? E * capacity : num_assign;
  if (rows > 0) DISAGG_CUDA_TRY(cudaMemsetAsync(src, 0xff, sizeof(int32_t) * rows, stream));
  if (capacity > 0) {
    padded_offsets_kernel<<<grid_for(E + 1, 256), 256, 0, stream>>>(
        static_cast<int>(E), capacity, static_cast<int>(R), expert_offsets, rank_offsets);
    DISAGG_CUDA_TRY(cudaGetLastError());
    if (num_assign == 0) return cudaSuccess;
    layout_padded_kernel<I><<<grid_for(num_assign, 256), 256, 0, stream>>>(
        ids, slots, num_assign, static_cast<int>(E), capacity, dest, src);
    return cudaGetLastError();
  }
  const LayoutWorkspace w = moe_layout_workspace(num_assign, E, capacity);
  if (workspace_bytes < w.bytes || !aligned16(workspace)) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  int32_t* rank = reinterpret_cast<int32_t*>(ws + w.rank);
  int32_t* hist = reinterpret_cast<int32_t*>(ws + w.hist);
  int32_t* total = reinterpret_cast<int32_t*>(ws + w.total);
  if (num_assign > 0) {
    DISAGG_CUDA_TRY(launch_stable_ranks<I>(ids, num_assign, static_cast<int>(E), w.chunk,
                                           w.nchunks, rank, hist, total, nullptr, 0, stream));
  } else {
    DISAGG_CUDA_TRY(cudaMemsetAsync(total, 0, sizeof(int32_t) * E, stream));
  }
  expert_offsets_kernel<<<1, 1024, 0, stream>>>(total, static_cast<int>(E), expert_offsets,
                                                static_cast<int>(R), rank_offsets);
  DISAGG_CUDA_TRY(cudaGetLastError());
  if (num_assign == 0) return cudaSuccess;
  layout_compact_kernel<I><<<grid_for(num_assign, 256), 256, 0, stream>>>(
      ids, num_assign, static_cast<int>(E), rank, hist, w.nchunks, w.chunk, expert_offsets, dest,
      src);
  return cudaGetLastError();
}

// ---- moe_permute / moe_combine -----------------------------------------------------------------

namespace detail {

// One block per output row (grid-stride), threads over 16-byte vectors when kVec.
template <typename T, bool kVec>
__global__ void moe_permute_kernel(const T* __restrict__ x, int64_t num_tokens, int64_t hidden,
                                   int64_t x_row_stride, const int32_t* __restrict__ src,
                                   int64_t rows, int64_t top_k, T* __restrict__ out) {
  using V = Vec16<T>;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t s = src[r];
    const bool valid = s >= 0 && s < num_tokens * top_k;
    const T* xr = x + (valid ? (s / top_k) * x_row_stride : 0);
    T* o = out + r * hidden;
    if (kVec) {
      const int64_t nv = hidden / V::kN;
      const uint4* xv = reinterpret_cast<const uint4*>(xr);
      uint4* ov = reinterpret_cast<uint4*>(o);
      int64_t i = threadIdx.x;
      // Four independent 16-byte loads in flight per thread before their stores.
      for (; i + 3 * blockDim.x < nv; i += 4 * blockDim.x) {
        uint4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) v[u] = valid ? __ldg(xv + i + u * blockDim.x) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < 4; ++u) ov[i + u * blockDim.x] = v[u];
      }
      for (; i < nv; i += blockDim.x) ov[i] = valid ? __ldg(xv + i) : make_uint4(0, 0, 0, 0);
    } else {
      for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
        if (valid) {
          o[i] = xr[i];
        } else {
          o[i] = from_float_d<T>(0.0f);
        }
      }
    }
  }
}

// One block per token (grid-stride); each thread accumulates VEC consecutive elements over the
// token's k rows in float. __fmul_rn/__fadd_rn keep the CPU's separate multiply and add (no
// fused multiply-add), so results agree with the CPU op bit for bit.
template <typename T, typename O, int VEC>
__global__ void moe_combine_kernel(const T* __restrict__ y, int64_t rows, int64_t hidden,
                                   const int32_t* __restrict__ dest,
                                   const float* __restrict__ weights, int64_t num_tokens,
                                   int64_t top_k, O* __restrict__ out) {
  struct alignas(sizeof(T) * VEC) InV { T v[VEC]; };
  struct alignas(sizeof(O) * VEC >= 16 ? 16 : sizeof(O) * VEC) OutV { O v[VEC]; };
  const int64_t nv = hidden / VEC;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int32_t* dt = dest + t * top_k;
    const float* wt = weights + t * top_k;
    O* o = out + t * hidden;
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      float acc[VEC];
#pragma unroll
      for (int u = 0; u < VEC; ++u) acc[u] = 0.0f;
      for (int64_t j = 0; j < top_k; ++j) {
        const int32_t r = dt[j];
        if (r < 0 || r >= rows) continue;
        const float w = wt[j];
        const InV v = *reinterpret_cast<const InV*>(y + static_cast<int64_t>(r) * hidden + i * VEC);
#pragma unroll
        for (int u = 0; u < VEC; ++u) acc[u] = __fadd_rn(acc[u], __fmul_rn(w, to_float_d(v.v[u])));
      }
      OutV ov;
#pragma unroll
      for (int u = 0; u < VEC; ++u) ov.v[u] = from_float_d<O>(acc[u]);
      *reinterpret_cast<OutV*>(o + i * VEC) = ov;
    }
  }
}

inline int threads_for(int64_t items) {
  int64_t t = ((items + 31) / 32) * 32;
  if (t < 32) t = 32;
  return static_cast<int>(t > 256 ? 256 : t);
}

}  // namespace detail

// out[r, :] = x[src[r] / top_k, :], zero rows where src[r] == -1 (or, on CUDA, out of range).
// 16-byte loads/stores when the row length, x's row stride and both pointers allow.
template <typename T>
cudaError_t moe_permute(const T* x, int64_t num_tokens, int64_t hidden, int64_t x_row_stride,
                        const int32_t* src, int64_t rows, int64_t top_k, T* out,
                        cudaStream_t stream) {
  using namespace detail;
  if (hidden < 0 || rows < 0 || top_k < 1) return cudaErrorInvalidValue;
  if (rows == 0 || hidden == 0) return cudaSuccess;
  constexpr int kN = Vec16<T>::kN;
  const bool vec = hidden % kN == 0 && x_row_stride % kN == 0 && aligned16(x) && aligned16(out);
  const int grid = grid_for(rows, 1, 1 << 16);
  if (vec) {
    moe_permute_kernel<T, true><<<grid, threads_for(hidden / kN), 0, stream>>>(
        x, num_tokens, hidden, x_row_stride, src, rows, top_k, out);
  } else {
    moe_permute_kernel<T, false><<<grid, threads_for(hidden), 0, stream>>>(
        x, num_tokens, hidden, x_row_stride, src, rows, top_k, out);
  }
  return cudaGetLastError();
}

// out[t, :] = sum_j weights[t, j] * y[dest[t*k + j], :] in float (dest == -1, or on CUDA out of
// range, skipped). y and out are contiguous rows of `hidden`.
template <typename T, typename O>
cudaError_t moe_combine(const T* y, int64_t rows, int64_t hidden, const int32_t* dest,
                        const float* weights, int64_t num_tokens, int64_t top_k, O* out,
                        cudaStream_t stream) {
  using namespace detail;
  if (hidden < 0 || num_tokens < 0 || top_k < 0) return cudaErrorInvalidValue;
  if (num_tokens == 0 || hidden == 0) return cudaSuccess;
  constexpr int kN = Vec16<T>::kN;
  const int grid = grid_for(num_tokens, 1, 1 << 16);
  if (hidden % kN == 0 && aligned16(y) && aligned16(out)) {
    moe_combine_kernel<T, O, kN><<<grid, threads_for(hidden / kN), 0, stream>>>(
        y, rows, hidden, dest, weights, num_tokens, top_k, out);
  } else {
    moe_combine_kernel<T, O, 1><<<grid, threads_for(hidden), 0, stream>>>(
        y, rows, hidden, dest, weights, num_tokens, top_k, out);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace disagg
