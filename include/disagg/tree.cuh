// Token-tree kernels on CUDA (torch-free): tree_build, greedy verification and lossless
// speculative sampling, with the contracts of the CPU kernels in tree.h. Raw pointers, sizes,
// a stream; every launcher returns cudaError_t and never synchronizes, so verification can be
// captured in a CUDA graph (seed and offset are read on the device).
//
// One thread block per request. Index inputs are int64 (the torch side widens int32), outputs
// int32. Invalid input cannot be raised without a host synchronization, so a request whose tree,
// tokens or sampling parameters are invalid gets sentinel outputs instead: tree_build writes
// num_leaves = -1 and the padding values everywhere else; verification writes accept_len = 0,
// bonus = -1 and accepted all -1 (a valid request always has accept_len >= 1).
//
// Agreement with the CPU op: the arithmetic of tree.h is repeated step by step with explicit
// round-to-nearest intrinsics (no FMA contraction), and the float sums that decide a sample are
// taken in the CPU's order (row_sum's 8 interleaved partial sums, 256-entry block sums), so the
// sampled tokens are bit-identical. One exception: top-p's total mass and the running sums
// inside its cutoff bucket are double sums that the CPU takes in index / sorted order; here
// they are exact per bucket and summed bucket by bucket, which equals the CPU's value whenever
// the CPU's own double sums are exact (every probability above about 2^-30 of the total) and
// otherwise can differ in the last bit, moving the top-p cutoff only when the target mass falls
// within that rounding.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "disagg/common.cuh"
#include "disagg/philox.h"

namespace disagg {
namespace cuda {
namespace tree {

constexpr int kThreads = 256;

namespace detail {

// ---- block reductions (blockDim.x == kThreads) -----------------------------------------------

struct Smem {
  float f[32];
  int32_t i[33];
  double d[32];
};

__device__ __forceinline__ float block_max(float v, Smem& s) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) s.f[warp] = v;
  __syncthreads();
  float r = -INFINITY;
  for (int w = 0; w < kThreads / 32; ++w) r = fmaxf(r, s.f[w]);
  return r;
}

__device__ __forceinline__ int32_t block_sum_int(int32_t v, Smem& s) {
  v = warp_sum_int(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) s.i[warp] = v;
  __syncthreads();
  int32_t r = 0;
  for (int w = 0; w < kThreads / 32; ++w) r += s.i[w];
  return r;
}

__device__ __forceinline__ int32_t block_min_int(int32_t v, Smem& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = min(v, __shfl_xor_sync(kFullMask, v, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) s.i[warp] = v;
  __syncthreads();
  int32_t r = s.i[0];
  for (int w = 1; w < kThreads / 32; ++w) r = min(r, s.i[w]);
  return r;
}

__device__ __forceinline__ int32_t block_max_int(int32_t v, Smem& s) {
  return -block_min_int(-v, s);
}

// Best (value, index): higher value, ties to the lower index (ranks_before_d).
__device__ __forceinline__ int32_t block_argbest(float v, int32_t i, Smem& s) {
  warp_argbest(v, i);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) {
    s.f[warp] = v;
    s.i[warp] = i;
  }
  __syncthreads();
  float bv = s.f[0];
  int32_t bi = s.i[0];
  for (int w = 1; w < kThreads / 32; ++w)
    if (ranks_before_d(s.f[w], s.i[w], bv, bi)) {
      bv = s.f[w];
      bi = s.i[w];
    }
  return bi;
}

__device__ __forceinline__ float nan_to_neginf(float x) { return isnan(x) ? -INFINITY : x; }

// tree.h's row_argmax: lowest id holding the maximum, NaN as -inf, 0 when nothing is above -inf.
template <typename T>
__device__ int32_t row_argmax(const T* x, int64_t V, Smem& s) {
  float bv = -INFINITY;
  int32_t bi = -1;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float f = nan_to_neginf(to_float_d(x[v]));
    if (bi < 0 || f > bv) {  // strided in increasing order: a tie keeps the lower id
      bv = f;
      bi = static_cast<int32_t>(v);
    }
  }
  const int32_t r = block_argbest(bv, bi, s);
  return r < 0 ? 0 : r;
}

// tree.h's row_sum, in its exact order: 8 interleaved partial sums over the first V - V % 8
// entries, the tail summed on its own, then the 8 partials added to it. Threads 0..7 run the
// partial sums; the result is broadcast to the block.
__device__ float row_sum_exact(const float* x, int64_t V, Smem& s) {
  const int64_t V8 = V - V % 8;
  __syncthreads();
  if (threadIdx.x < 8) {
    float acc = 0.0f;
    // the adds are a dependent chain (the CPU's order); unrolling lets the loads run ahead
#pragma unroll 8
    for (int64_t v = threadIdx.x; v < V8; v += 8) acc = __fadd_rn(acc, x[v]);
    s.f[threadIdx.x] = acc;
  }
  __syncthreads();
  float r = 0.0f;
  for (int64_t v = V8; v < V; ++v) r = __fadd_rn(r, x[v]);
  for (int l = 0; l < 8; ++l) r = __fadd_rn(r, s.f[l]);
  __syncthreads();
  return r;
}

// tree.h's exp_nonpos, operation by operation.
__device__ __forceinline__ float exp_nonpos(float x) {
  constexpr uint32_t kLimit = 0xC2AE0000u;
  const uint32_t ux = __float_as_uint(x);
  const uint32_t under = ux > kLimit ? 0xFFFFFFFFu : 0u;
  const float xc = __uint_as_float((ux & ~under) | (kLimit & under));
  const float fn = static_cast<float>(static_cast<int32_t>(__fsub_rn(__fmul_rn(xc, 1.44269504088896341f), 0.5f)));
  float r = __fsub_rn(xc, __fmul_rn(fn, 0.693359375f));
  r = __fadd_rn(r, __fmul_rn(fn, 2.12194440e-4f));
  float p = 1.9875691500e-4f;
  p = __fadd_rn(__fmul_rn(p, r), 1.3981999507e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 8.3334519073e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 4.1665795894e-2f);
  p = __fadd_rn(__fmul_rn(p, r), 1.6666665459e-1f);
  p = __fadd_rn(__fmul_rn(p, r), 5.0000001201e-1f);
  const float y = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(p, r), r), r), 1.0f);
  const float scale = __int_as_float((static_cast<int32_t>(fn) + 127) << 23);
  return __uint_as_float(__float_as_uint(__fmul_rn(y, scale)) & ~under);
}

// Order-preserving key of a float (larger float, larger key; -0 and +0 share one key).
__device__ __forceinline__ uint32_t fkey(float f) {
  const uint32_t u = f == 0.0f ? 0u : __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float fkey_inv(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct SampleSmem {
  Smem r;
  uint32_t hist[256];
  double mass[4096];
  uint32_t word;
  int32_t flag;
};

// The k-th largest value of p[0..V) by a 4-pass radix select over fkey.
__device__ float kth_largest(const float* p, int64_t V, int64_t k, SampleSmem& s) {
  uint32_t prefix = 0, mask = 0;
  int64_t left = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) s.hist[i] = 0;
    __syncthreads();
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const uint32_t key = fkey(p[v]);
      if ((key & mask) == prefix) atomicAdd(&s.hist[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int64_t cum = 0;
      uint32_t digit = 0;
      for (int d = 255; d >= 0; --d) {
        if (cum + s.hist[d] >= left) {
          digit = static_cast<uint32_t>(d);
          break;
        }
        cum += s.hist[d];
      }
      s.word = digit;
      s.r.d[0] = static_cast<double>(left - cum);
    }
    __syncthreads();
    prefix |= s.word << shift;
    mask |= 255u << shift;
    left = static_cast<int64_t>(s.r.d[0]);
    __syncthreads();
  }
  return fkey_inv(prefix);
}

// top-k of tree.h's target_probs on the scaled logits p: keep values > kth and the first
// (k - #greater) entries equal to kth in index order; the rest become -inf. Each thread owns a
// contiguous segment so that one block scan numbers the equal entries in index order.
__device__ void apply_top_k(float* p, int64_t V, int64_t k, SampleSmem& s) {
  const float kth = kth_largest(p, V, k, s);
  int32_t greater = 0;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) greater += p[v] > kth;
  greater = block_sum_int(greater, s.r);
  const int64_t equal_left = k - greater;
  const int64_t seg = (V + kThreads - 1) / kThreads;
  const int64_t lo = threadIdx.x * seg, hi = lo + seg < V ? lo + seg : V;
  int32_t eq = 0;
  for (int64_t v = lo; v < hi; ++v) eq += p[v] == kth;
  int32_t total;
  int32_t before = block_exclusive_scan(eq, s.r.i, &total);
  for (int64_t v = lo; v < hi; ++v) {
    const float x = p[v];
    if (x > kth) continue;
    if (x == kth && before < equal_left) {
      ++before;
      continue;
    }
    p[v] = -INFINITY;
  }
  __syncthreads();
}

// tree.h's apply_top_p. Bucket masses are exact double sums (entries of one bucket share their
// exponent), the scan over buckets from the top repeats the CPU's sequence of additions, and
// the cutoff inside the bucket is found by radix passes over the remaining 20 mantissa bits.
__device__ void apply_top_p(float* p, int64_t V, double top_p, SampleSmem& s) {
  constexpr int kShift = 20, kBuckets = 1 << (32 - kShift);
  for (int i = threadIdx.x; i < kBuckets; i += kThreads) s.mass[i] = 0.0;
  __syncthreads();
  for (int64_t v = threadIdx.x; v < V; v += kThreads)
    if (p[v] > 0.0f) atomicAdd(&s.mass[__float_as_uint(p[v]) >> kShift], static_cast<double>(p[v]));
  __syncthreads();
  // warp 0: total and the cutoff bucket, adding the non-empty buckets in the CPU's order
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    double total = 0.0;
    for (int base = 0; base < kBuckets; base += 32) {
      unsigned nz = __ballot_sync(kFullMask, s.mass[base + lane] > 0.0);
      while (nz) {
        const int b = base + __ffs(nz) - 1;
        nz &= nz - 1;
        total += s.mass[b];
      }
    }
    const double target = top_p * total;
    double above = 0.0;
    int cut = -1;
    for (int base = kBuckets - 32; base >= 0 && cut < 0; base -= 32) {
      unsigned nz = __ballot_sync(kFullMask, s.mass[base + lane] > 0.0);
      while (nz && cut < 0) {
        const int hi = 31 - __clz(nz);
        nz &= ~(1u << hi);
        const int b = base + hi;
        if (above + s.mass[b] >= target) cut = b;
        else above += s.mass[b];
      }
    }
    if (lane == 0) {
      s.flag = cut;
      s.r.d[0] = above;
      s.r.d[1] = target;
    }
  }
  __syncthreads();
  const int cut = s.flag;
  double above = s.r.d[0];
  const double target = s.r.d[1];
  __syncthreads();
  if (cut < 0) return;
  // radix passes over bits 19..12, 11..4, 3..0 of the entries in the cut bucket, from the top:
  // find the value pc where the running mass first reaches the target
  uint32_t prefix = static_cast<uint32_t>(cut) << kShift, mask = 0xfff00000u;
  const int shifts[3] = {12, 4, 0};
  const int widths[3] = {8, 8, 4};
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = shifts[pass], nbins = 1 << widths[pass];
    for (int i = threadIdx.x; i < nbins; i += kThreads) s.mass[i] = 0.0;
    __syncthreads();
    for (int64_t v = threadIdx.x; v < V; v += kThreads) {
      const uint32_t u = __float_as_uint(p[v]);
      if (p[v] > 0.0f && (u & mask) == prefix)
        atomicAdd(&s.mass[(u >> shift) & static_cast<uint32_t>(nbins - 1)], static_cast<double>(p[v]));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int digit = -1;
      for (int d = nbins - 1; d >= 0; --d) {
        if (s.mass[d] > 0.0 && above + s.mass[d] >= target) {
          digit = d;
          break;
        }
        above += s.mass[d];
      }
      if (digit < 0) {  // rounding: the smallest non-empty bin holds the cutoff
        for (int d = 0; d < nbins; ++d)
          if (s.mass[d] > 0.0) {
            digit = d;
            break;
          }
        // undo the additions of that bin and every bin below it
        above = s.r.d[0];
        for (int d = nbins - 1; d > digit; --d) above += s.mass[d];
      }
      s.word = static_cast<uint32_t>(digit);
      s.r.d[0] = above;
    }
    __syncthreads();
    prefix |= s.word << shift;
    mask |= static_cast<uint32_t>(nbins - 1) << shift;
    above = s.r.d[0];
    __syncthreads();
  }
  // entries equal to pc in index order (usually one): the first where the running mass
  // reaches the target, else the last
  const float pc = __uint_as_float(prefix);
  int32_t prev = -1, ci = -1;
  double run = above;
  for (;;) {
    int32_t nxt = 0x7fffffff;
    for (int64_t v = prev + 1 + threadIdx.x; v < V; v += kThreads)
      if (p[v] == pc) {
        nxt = static_cast<int32_t>(v);
        break;
      }
    nxt = block_min_int(nxt, s.r);
    if (nxt == 0x7fffffff) break;
    ci = nxt;
    prev = nxt;
    run += pc;
    if (run >= target) break;
  }
  __syncthreads();
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float x = p[v];
    if (x > 0.0f && (x < pc || (x == pc && v > ci))) p[v] = 0.0f;
  }
  __syncthreads();
}

// tree.h's target_probs into p[V] (device memory owned by this block).
template <typename T>
__device__ void target_probs(const T* x, int64_t V, float temperature, int64_t top_k, float top_p,
                             float* p, SampleSmem& s) {
  float m = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += kThreads) {
    const float y = nan_to_neginf(__fdiv_rn(to_float_d(x[v]), temperature));
    p[v] = y;
    m = fmaxf(m, y);
  }
  m = block_max(m, s.r);
  if (m == INFINITY) {
    int32_t n = 0;
    for (int64_t v = threadIdx.x; v < V; v += kThreads) n += p[v] == m;
    const float share = __fdiv_rn(1.0f, static_cast<float>(block_sum_int(n, s.r)));
    for (int64_t v = threadIdx.x; v < V; v += kThreads) p[v] = p[v] == m ? share : 0.0f;
    __syncthreads();
    return;
  }
  if (m == -INFINITY) {
    const int32_t a = row_argmax(x, V, s.r);
    for (int64_t v = threadIdx.x; v < V; v += kThreads) p[v] = v == a ? 1.0f : 0.0f;
    __syncthreads();
    return;
  }
  __syncthreads();
  if (top_k > 0 && top_k < V) apply_top_k(p, V, top_k, s);
  for (int64_t v = threadIdx.x; v < V; v += kThreads) p[v] = exp_nonpos(__fsub_rn(p[v], m));
  __syncthreads();
  if (top_p < 1.0f) apply_top_p(p, V, static_cast<double>(top_p), s);
  const float inv = __fdiv_rn(1.0f, row_sum_exact(p, V, s.r));
  for (int64_t v = threadIdx.x; v < V; v += kThreads) p[v] = __fmul_rn(p[v], inv);
  __syncthreads();
}

// tree.h's sample_from: block sums of 256 entries (each in row_sum's order), their double total,
// then the CPU's walk. bsum: ceil(V/256) doubles of device scratch.
__device__ int32_t sample_from(const float* p, int64_t V, double u, double* bsum, SampleSmem& s) {
  constexpr int64_t kBlock = 256;
  const int64_t nb = (V + kBlock - 1) / kBlock;
  // one thread per (block, lane): the interleaved partials of row_sum over 256 entries
  for (int64_t k = threadIdx.x; k < nb; k += kThreads) {
    const int64_t b0 = k * kBlock, n = V - b0 < kBlock ? V - b0 : kBlock, n8 = n - n % 8;
    float acc[8];
    for (int l = 0; l < 8; ++l) acc[l] = 0.0f;
    for (int64_t v = 0; v < n8; v += 8)
      for (int l = 0; l < 8; ++l) acc[l] = __fadd_rn(acc[l], p[b0 + v + l]);
    float r = 0.0f;
    for (int64_t v = n8; v < n; ++v) r = __fadd_rn(r, p[b0 + v]);
    for (int l = 0; l < 8; ++l) r = __fadd_rn(r, acc[l]);
    bsum[k] = static_cast<double>(r);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int64_t k = 0; k < nb; ++k) total += bsum[k];
    int32_t result = -2;  // -2: argmax fallback below
    if (total > 0.0) {
      const double target = u * total;
      double acc = 0.0;
      int64_t last_pos = -1;
      result = -1;
      for (int64_t k = 0; k < nb && result < 0; ++k) {
        const int64_t b0 = k * kBlock, n = V - b0 < kBlock ? V - b0 : kBlock;
        if (acc + bsum[k] <= target && k + 1 < nb) {
          acc += bsum[k];
          continue;
        }
        for (int64_t v = b0; v < b0 + n; ++v) {
          if (p[v] <= 0.0f) continue;
          acc += p[v];
          last_pos = v;
          if (acc > target) {
            result = static_cast<int32_t>(v);
            break;
          }
        }
      }
      if (result < 0 && last_pos >= 0) result = static_cast<int32_t>(last_pos);
      if (result < 0) {
        for (int64_t v = V - 1; v >= 0; --v)
          if (p[v] > 0.0f) {
            result = static_cast<int32_t>(v);
            break;
          }
        if (result < 0) result = 0;
      }
    }
    s.flag = result;
  }
  __syncthreads();
  const int32_t r = s.flag;
  __syncthreads();
  if (r == -2) return row_argmax(p, V, s.r);
  return r;
}

// ---- validation (per request, on the device) ----------------------------------------------------

// tree_validate for request b: num_nodes, root, parents, and tokens in [0, vocab) when vocab > 0.
__device__ bool tree_ok(const int64_t* par, int64_t n, int64_t N, const int64_t* tok, int64_t vocab,
                        Smem& s) {
  if (n < 1 || n > N) return false;
  int bad = threadIdx.x == 0 && par[0] != -1;
  for (int64_t i = 1 + threadIdx.x; i < n; i += kThreads) {
    bad |= par[i] < 0 || par[i] >= i;
    if (vocab > 0 && tok) bad |= tok[i] < 0 || tok[i] >= vocab;
  }
  return !__syncthreads_or(bad);
}

// The first child of `cur` (index order) whose token is `want`, or -1: a block-wide search over
// the nodes after cur (children always come after their parent).
__device__ int32_t find_child(const int64_t* par, const int64_t* tok, int64_t cur, int64_t n,
                              int64_t want, Smem& s) {
  int32_t best = 0x7fffffff;
  for (int64_t c = cur + 1 + threadIdx.x; c < n; c += kThreads)
    if (par[c] == cur && tok[c] == want) best = min(best, static_cast<int32_t>(c));
  best = block_min_int(best, s);
  return best == 0x7fffffff ? -1 : best;
}

__device__ void write_invalid(int32_t* acc, int64_t N, int32_t* len, int32_t* bonus) {
  for (int64_t j = threadIdx.x; j < N; j += kThreads) acc[j] = -1;
  if (threadIdx.x == 0) {
    *len = 0;
    *bonus = -1;
  }
}

// ---- kernels ---------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) tree_build_kernel(
    const int64_t* __restrict__ parents, const int64_t* __restrict__ num_nodes, int64_t N, int64_t D,
    int32_t* __restrict__ depth, int32_t* __restrict__ mask, int32_t* __restrict__ first_child,
    int32_t* __restrict__ next_sibling, int32_t* __restrict__ leaf_paths,
    int32_t* __restrict__ num_leaves) {
  __shared__ Smem s;
  const int64_t b = blockIdx.x, W = (N + 31) / 32;
  const int64_t* par = parents + b * N;
  int32_t* d = depth + b * N;
  int32_t* m = mask + b * N * W;
  int32_t* fc = first_child + b * N;
  int32_t* ns = next_sibling + b * N;
  int32_t* lp = leaf_paths + b * N * D;
  int64_t n = num_nodes[b];
  bool ok = tree_ok(par, n, N, nullptr, 0, s);
  if (ok) {  // depths by walking up (parent < child bounds each walk), then the depth limit
    int bad = 0;
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      int32_t k = 0;
      for (int64_t j = i; j > 0; j = par[j]) ++k;
      d[i] = k;
      bad |= k > D - 1;
    }
    ok = !__syncthreads_or(bad);
  }
  if (!ok) n = 0;  // an invalid request is written as an empty one, num_leaves = -1
  for (int64_t i = n + threadIdx.x; i < N; i += kThreads) d[i] = -1;
  for (int64_t w = threadIdx.x; w < N * W; w += kThreads) m[w] = 0;
  for (int64_t i = threadIdx.x; i < N; i += kThreads) {
    fc[i] = i < n ? 0x7fffffff : -1;
    ns[i] = -1;
  }
  for (int64_t w = threadIdx.x; w < N * D; w += kThreads) lp[w] = -1;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    int32_t* row = m + i * W;  // this thread's row only: ancestors-or-self
    for (int64_t j = i; j >= 0; j = par[j]) row[j / 32] |= static_cast<int32_t>(1u << (j % 32));
    if (i > 0) {
      atomicMin(&fc[par[i]], static_cast<int32_t>(i));
      for (int64_t j = i + 1; j < n; ++j)
        if (par[j] == par[i]) {
          ns[i] = static_cast<int32_t>(j);
          break;
        }
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < n; i += kThreads)
    if (fc[i] == 0x7fffffff) fc[i] = -1;
  __syncthreads();
  // leaves in index order: a block scan per chunk of kThreads nodes numbers them
  int32_t leaves = 0;
  for (int64_t base = 0; base < n; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const int32_t leaf = i < n && fc[i] < 0;
    int32_t total;
    const int32_t k = leaves + block_exclusive_scan(leaf, s.i, &total);
    if (leaf)
      for (int64_t j = i; j >= 0; j = par[j]) lp[static_cast<int64_t>(k) * D + d[j]] = static_cast<int32_t>(j);
    leaves += total;
  }
  if (threadIdx.x == 0) num_leaves[b] = ok ? leaves : -1;
}

// Greedy verification; ids (the target's choices [B, N]) replace the logits when not null.
template <typename T, bool kIds>
__global__ void __launch_bounds__(kThreads) tree_verify_greedy_kernel(
    const T* __restrict__ logits, int64_t stride_b, int64_t stride_n, int64_t V,
    const int64_t* __restrict__ ids, const int64_t* __restrict__ tokens,
    const int64_t* __restrict__ parents, const int64_t* __restrict__ num_nodes, int64_t N,
    int32_t* __restrict__ accepted, int32_t* __restrict__ accept_len, int32_t* __restrict__ bonus) {
  __shared__ Smem s;
  const int64_t b = blockIdx.x;
  const int64_t* par = parents + b * N;
  const int64_t* tok = tokens + b * N;
  int32_t* acc = accepted + b * N;
  const int64_t n = num_nodes[b];
  if (!tree_ok(par, n, N, tok, kIds ? 0 : V, s)) {
    write_invalid(acc, N, accept_len + b, bonus + b);
    return;
  }
  int64_t cur = 0, len = 1;
  if (threadIdx.x == 0) acc[0] = 0;
  for (;;) {
    const int64_t want = kIds ? ids[b * N + cur] : row_argmax(logits + b * stride_b + cur * stride_n, V, s);
    const int32_t next = find_child(par, tok, cur, n, want, s);
    if (next < 0) {
      if (threadIdx.x == 0) bonus[b] = static_cast<int32_t>(want);
      break;
    }
    if (threadIdx.x == 0) acc[len] = next;
    ++len;
    cur = next;
  }
  for (int64_t j = len + threadIdx.x; j < N; j += kThreads) acc[j] = -1;
  if (threadIdx.x == 0) accept_len[b] = static_cast<int32_t>(len);
}

struct SampleArgs {
  const float* temperature;
  const int64_t* top_k;
  const float* top_p;
  const int64_t* seed;
  const int64_t* offset;
};

template <typename T, typename Q>
__global__ void __launch_bounds__(kThreads) tree_verify_sample_kernel(
    const T* __restrict__ logits, int64_t stride_b, int64_t stride_n, int64_t V,
    const Q* __restrict__ draft, int64_t q_stride_b, int64_t q_stride_n,
    const int64_t* __restrict__ tokens, const int64_t* __restrict__ parents,
    const int64_t* __restrict__ num_nodes, int64_t N, SampleArgs sp, uint8_t* __restrict__ ws,
    size_t ws_stride, int32_t* __restrict__ accepted, int32_t* __restrict__ accept_len,
    int32_t* __restrict__ bonus) {
  __shared__ SampleSmem s;
  const int64_t b = blockIdx.x;
  const int64_t* par = parents + b * N;
  const int64_t* tok = tokens + b * N;
  int32_t* acc = accepted + b * N;
  const int64_t n = num_nodes[b];
  const float temp = sp.temperature[b], top_p = sp.top_p[b];
  const int64_t top_k = sp.top_k[b];
  const bool params_ok = temp >= 0.0f && !isinf(temp) && top_k >= 0 && top_p > 0.0f && top_p <= 1.0f;
  if (!tree_ok(par, n, N, tok, V, s.r) || !params_ok) {
    write_invalid(acc, N, accept_len + b, bonus + b);
    return;
  }
  if (threadIdx.x == 0) acc[0] = 0;
  int64_t cur = 0, len = 1;
  if (temp == 0.0f) {  // tree_verify_greedy's rule, no draws
    for (;;) {
      const int64_t want = row_argmax(logits + b * stride_b + cur * stride_n, V, s.r);
      const int32_t next = find_child(par, tok, cur, n, want, s.r);
      if (next < 0) {
        if (threadIdx.x == 0) bonus[b] = static_cast<int32_t>(want);
        break;
      }
      if (threadIdx.x == 0) acc[len] = next;
      ++len;
      cur = next;
    }
  } else {
    float* p = reinterpret_cast<float*>(ws + b * ws_stride);
    float* scratch = p + V;
    double* bsum = reinterpret_cast<double*>(ws + b * ws_stride + ((2 * V * sizeof(float) + 15) / 16) * 16);
    const uint64_t seed = static_cast<uint64_t>(sp.seed[b]), offset = static_cast<uint64_t>(sp.offset[b]);
    uint32_t draw = 0;
    for (;;) {
      target_probs(logits + b * stride_b + cur * stride_n, V, temp, top_k, top_p, p, s);
      int32_t next = -1;
      double remaining = 1.0;  // deterministic drafts: mass not yet rejected (thread 0's copy)
      // children of cur in index order, each tried with one uniform number
      for (int64_t c = cur + 1; c < n && next < 0; ++c) {
        if (par[c] != cur) continue;
        const double u = philox_uniform(seed, offset, draw++);
        const int64_t x = tok[c];
        if (draft == nullptr) {
          // sampling without replacement over the candidates: a scalar rule, one thread
          if (threadIdx.x == 0) {
            const float px = p[x];
            if (px > 0.0f && u * remaining < px) {
              s.word = 1;
            } else {
              s.word = 0;
              remaining = remaining - px > 0.0 ? remaining - px : 0.0;
              p[x] = 0.0f;
            }
          }
          __syncthreads();
          if (s.word) next = static_cast<int32_t>(c);
          __syncthreads();
        } else {
          const Q* q = draft + b * q_stride_b + cur * q_stride_n;
          const float px = p[x], qx = to_float_d(q[x]);
          const bool ok = qx > 0.0f ? (u * qx < px) : (px > 0.0f);
          if (ok) {
            next = static_cast<int32_t>(c);
            break;
          }
          // residual: p := normalise(max(p - q, 0)), left as p when it sums to 0
          __syncthreads();
          for (int64_t v = threadIdx.x; v < V; v += kThreads) {
            const float r = __fsub_rn(p[v], to_float_d(q[v]));
            scratch[v] = r > 0.0f ? r : 0.0f;
          }
          const float rs = row_sum_exact(scratch, V, s.r);
          if (rs > 0.0f) {
            const float inv = __fdiv_rn(1.0f, rs);
            for (int64_t v = threadIdx.x; v < V; v += kThreads) p[v] = __fmul_rn(scratch[v], inv);
          }
          __syncthreads();
        }
      }
      if (next < 0) {
        const int32_t t = sample_from(p, V, philox_uniform(seed, offset, draw++), bsum, s);
        if (threadIdx.x == 0) bonus[b] = t;
        break;
      }
      if (threadIdx.x == 0) acc[len] = next;
      ++len;
      cur = next;
    }
  }
  for (int64_t j = len + threadIdx.x; j < N; j += kThreads) acc[j] = -1;
  if (threadIdx.x == 0) accept_len[b] = static_cast<int32_t>(len);
}

}  // namespace detail

// Outputs of tree_build, all int32 device arrays (see tree.h's tree_build_cpu for the layout).
struct BuildOut {
  int32_t *depth, *mask, *first_child, *next_sibling, *leaf_paths, *num_leaves;
};

inline cudaError_t tree_build(const int64_t* parents, const int64_t* num_nodes, int64_t B, int64_t N,
                              int64_t D, const BuildOut& o, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  detail::tree_build_kernel<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      parents, num_nodes, N, D, o.depth, o.mask, o.first_child, o.next_sibling, o.leaf_paths,
      o.num_leaves);
  return cudaGetLastError();
}

// Logits [B, N, V] rows contiguous over V (strides in elements), or ids [B, N] (logits null).
template <typename T>
cudaError_t tree_verify_greedy(const T* logits, int64_t stride_b, int64_t stride_n, int64_t V,
                               const int64_t* ids, const int64_t* tokens, const int64_t* parents,
                               const int64_t* num_nodes, int64_t B, int64_t N, int32_t* accepted,
                               int32_t* accept_len, int32_t* bonus, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (ids)
    detail::tree_verify_greedy_kernel<T, true><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        logits, stride_b, stride_n, V, ids, tokens, parents, num_nodes, N, accepted, accept_len, bonus);
  else
    detail::tree_verify_greedy_kernel<T, false><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        logits, stride_b, stride_n, V, ids, tokens, parents, num_nodes, N, accepted, accept_len, bonus);
  return cudaGetLastError();
}

// Scratch per request of tree_verify_sample: p and the residual (V floats each), block sums.
inline size_t sample_workspace_stride(int64_t V) {
  const size_t floats = (2 * static_cast<size_t>(V) * sizeof(float) + 15) / 16 * 16;
  const size_t sums = ((static_cast<size_t>(V) + 255) / 256 * sizeof(double) + 15) / 16 * 16;
  return floats + sums;
}
inline size_t sample_workspace(int64_t B, int64_t V) { return static_cast<size_t>(B) * sample_workspace_stride(V); }

// Per-request parameters are device arrays [B]: temperature, top_p float; top_k, seed, offset
// int64. draft (may be null): [B, N, V] draft probabilities. ws: sample_workspace(B, V) bytes.
template <typename T, typename Q>
cudaError_t tree_verify_sample(const T* logits, int64_t stride_b, int64_t stride_n, int64_t V,
                               const Q* draft, int64_t q_stride_b, int64_t q_stride_n,
                               const int64_t* tokens, const int64_t* parents,
                               const int64_t* num_nodes, int64_t B, int64_t N,
                               const float* temperature, const int64_t* top_k, const float* top_p,
                               const int64_t* seed, const int64_t* offset, void* ws,
                               int32_t* accepted, int32_t* accept_len, int32_t* bonus,
                               cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  detail::SampleArgs sp{temperature, top_k, top_p, seed, offset};
  detail::tree_verify_sample_kernel<T, Q><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
      logits, stride_b, stride_n, V, draft, q_stride_b, q_stride_n, tokens, parents, num_nodes, N,
      sp, static_cast<uint8_t*>(ws), sample_workspace_stride(V), accepted, accept_len, bonus);
  return cudaGetLastError();
}

}  // namespace tree
}  // namespace cuda
}  // namespace disagg
