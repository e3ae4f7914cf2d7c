// Torch-free CPU kernel for token-tree attention over a paged KV cache: the nodes of a draft
// tree attend to the request's committed keys/values, read in place through its block table,
// plus their ancestors in the tree, given by a bit-packed ancestor mask (tree_build's format).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "disagg/common.h"
#include "disagg/tree.h"  // exp_nonpos

namespace disagg {

// Sequence b owns query rows [q_offsets[b], q_offsets[b+1]) of q [T, Hq, D]. Its cache holds
// ctx_lens[b] committed tokens (positions 0..ctx-1) followed by tree_lens[b] tree nodes at
// cache positions ctx .. ctx + tree_len - 1 (their K/V already written). Query row r sees all
// committed keys and the tree keys j whose bit j % 32 of word j / 32 in tree_mask[r] (int32
// [T, W]) is set: its ancestors and itself. Ancestors come before descendants, so the set bits
// of a row, in index order, are the path from the root; the k-th of them is at RoPE position
// ctx + k and the query at ctx + (set bits) - 1. sliding_window > 0 keeps the keys whose
// position p satisfies p > query position - sliding_window (as decode does).
// cache [num_blocks, 2, block_size, Hkv, D] contiguous; block_tables [B, max_blocks];
// out [T, Hq, D]; query head h reads KV head h / (Hq / Hkv). Accumulation in float32, online
// softmax over key tiles (memory bounded by the tile, not the context).
// On bad input returns kInvalidArgument, writes nothing, and points *what at a message
// naming the argument.
template <typename Idx>
Status paged_tree_attention_check(int64_t T, int64_t B, int64_t num_blocks, int64_t block_size,
                                  const Idx* block_tables, int64_t max_blocks,
                                  const Idx* ctx_lens, const Idx* tree_lens,
                                  const Idx* q_offsets, const int32_t* tree_mask, int64_t W,
                                  const char** what) {
  if (q_offsets[0] != 0 || static_cast<int64_t>(q_offsets[B]) != T) {
    *what = "q_offsets must start at 0 and end at q.size(0)";
    return Status::kInvalidArgument;
  }
  for (int64_t b = 0; b < B; ++b) {  // before any row is read
    if (q_offsets[b + 1] < q_offsets[b]) {
      *what = "q_offsets must be non-decreasing";
      return Status::kInvalidArgument;
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    const int64_t c = static_cast<int64_t>(ctx_lens[b]);
    const int64_t n = static_cast<int64_t>(tree_lens[b]);
    const int64_t q0 = static_cast<int64_t>(q_offsets[b]), q1 = static_cast<int64_t>(q_offsets[b + 1]);
    if (c < 0) {
      *what = "ctx_lens must be >= 0";
      return Status::kInvalidArgument;
    }
    if (n < 0 || n > 32 * W) {
      *what = "tree_lens must be in [0, 32 * tree_mask.size(1)]";
      return Status::kInvalidArgument;
    }
    if (c + n > max_blocks * block_size) {
      *what = "ctx_lens + tree_lens must fit the block table (max_blocks * block_size)";
      return Status::kInvalidArgument;
    }
    const int64_t used = (c + n + block_size - 1) / block_size;
    for (int64_t i = 0; i < used; ++i) {
      const int64_t blk = static_cast<int64_t>(block_tables[b * max_blocks + i]);
      if (blk < 0 || blk >= num_blocks) {
        *what = "block_tables entries in use must be in [0, num_blocks)";
        return Status::kInvalidArgument;
      }
    }
    for (int64_t r = q0; r < q1; ++r) {
      const int32_t* m = tree_mask + r * W;
      int64_t bits = 0;
      for (int64_t w = 0; w < W; ++w) {
        const uint32_t word = static_cast<uint32_t>(m[w]);
        bits += __builtin_popcount(word);
        const int64_t lo = 32 * w;  // bits at index >= n are outside the tree
        if (n <= lo ? word != 0 : (n - lo < 32 && (word >> (n - lo)) != 0)) {
          *what = "tree_mask sets a bit at or past the sequence's tree_lens";
          return Status::kInvalidArgument;
        }
      }
      if (bits == 0) {
        *what = "tree_mask rows must set at least one bit (the node itself)";
        return Status::kInvalidArgument;
      }
    }
  }
  return Status::kOk;
}

namespace tree_attention_detail {

constexpr int64_t kTile = 64;  // keys per tile

// s[j] = bias[j] + q . k_j for the tile's keys, with kT the keys transposed [D][kTile]: the
// loop runs along the keys, so it vectorises without a horizontal sum per dot product.
DISAGG_MULTIVERSION static void scores(const float* q, const float* kT, int64_t D, int64_t n,
                                       const float* bias, float* s) {
  for (int64_t j = 0; j < n; ++j) s[j] = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float qd = q[d];
    const float* kd = kT + d * kTile;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] += qd * kd[j];
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] += bias[j];  // 0 or -inf
}

// The same for four queries at once, 16 keys at a time: each key load feeds four
// accumulators held in registers. Columns of kT from n up to the next multiple of 16 are
// read but their results are dropped.
DISAGG_MULTIVERSION static void scores4(const float* q, const float* kT, int64_t D, int64_t n,
                                        const float* const* bias, float* s) {
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    float a0[16] = {}, a1[16] = {}, a2[16] = {}, a3[16] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* kd = kT + d * kTile + j0;
      const float q0 = q[d], q1 = q[D + d], q2 = q[2 * D + d], q3 = q[3 * D + d];
      for (int jj = 0; jj < 16; ++jj) {
        const float k = kd[jj];
        a0[jj] += q0 * k;
        a1[jj] += q1 * k;
        a2[jj] += q2 * k;
        a3[jj] += q3 * k;
      }
    }
    const int64_t m = std::min<int64_t>(16, n - j0);
    for (int64_t jj = 0; jj < m; ++jj) {
      s[j0 + jj] = a0[jj] + bias[0][j0 + jj];
      s[kTile + j0 + jj] = a1[jj] + bias[1][j0 + jj];
      s[2 * kTile + j0 + jj] = a2[jj] + bias[2][j0 + jj];
      s[3 * kTile + j0 + jj] = a3[jj] + bias[3][j0 + jj];
    }
  }
}

// Online-softmax step of one query for a tile of scores s (overwritten by the weights, all 0
// when nothing in the tile is visible): new running max and sum, acc rescaled to the new max.
DISAGG_MULTIVERSION static void softmax_step(float* s, int64_t n, float* mx, float* sum,
                                             float* acc, int64_t D) {
  float m = *mx;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
  if (m == -INFINITY) {  // nothing visible yet
    for (int64_t j = 0; j < n; ++j) s[j] = 0.f;
    return;
  }
  const float corr = detail::exp_nonpos(*mx - m);  // 0 on the first visible tile (mx = -inf)
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = detail::exp_nonpos(s[j] - m);  // masked keys: exactly 0
    total += s[j];
  }
  if (corr != 1.f)
    for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
  *sum = *sum * corr + total;
  *mx = m;
}

// acc_k += sum_j w_k[j] * v_j for `nqv` (1..4) queries (rows of acc, stride D; weights stride
// kTile): each value row is loaded once for all of them.
DISAGG_MULTIVERSION static void accumulate(float* acc, const float* w, int64_t nqv,
                                           const float* vt, int64_t n, int64_t D) {
  float* a0 = acc;
  float* a1 = acc + (nqv > 1 ? D : 0);
  float* a2 = acc + (nqv > 2 ? 2 * D : 0);
  float* a3 = acc + (nqv > 3 ? 3 * D : 0);
  for (int64_t j = 0; j < n; ++j) {
    const float w0 = w[j];
    const float w1 = nqv > 1 ? w[kTile + j] : 0.f;
    const float w2 = nqv > 2 ? w[2 * kTile + j] : 0.f;
    const float w3 = nqv > 3 ? w[3 * kTile + j] : 0.f;
    if (w0 == 0.f && w1 == 0.f && w2 == 0.f && w3 == 0.f) continue;
    const float* vj = vt + j * D;
    if (nqv == 4) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const float v = vj[d];
        a0[d] += w0 * v;
        a1[d] += w1 * v;
        a2[d] += w2 * v;
        a3[d] += w3 * v;
      }
    } else {
      for (int64_t k = 0; k < nqv; ++k) {
        const float wk = w[k * kTile + j];
        float* ak = acc + k * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ak[d] += wk * vj[d];
      }
    }
  }
}

}  // namespace tree_attention_detail

template <typename T, typename Idx>
Status paged_tree_attention_cpu(const T* q, int64_t Tq, int64_t Hq, int64_t D, const T* cache,
                                int64_t num_blocks, int64_t block_size, int64_t Hkv,
                                const Idx* block_tables, int64_t max_blocks, const Idx* ctx_lens,
                                const Idx* tree_lens, const Idx* q_offsets, int64_t B,
                                const int32_t* tree_mask, int64_t W, float scale,
                                int64_t sliding_window, T* out, const char** what,
                                int num_threads = 1) {
  using tree_attention_detail::kTile;
  static const char* no_what = nullptr;
  if (what == nullptr) what = &no_what;
  if (Hkv <= 0 || Hq % Hkv != 0 || block_size <= 0 || W <= 0) {
    *what = "q heads must be a multiple of kv_cache heads";
    return Status::kInvalidArgument;
  }
  Status st = paged_tree_attention_check<Idx>(Tq, B, num_blocks, block_size, block_tables,
                                              max_blocks, ctx_lens, tree_lens, q_offsets,
                                              tree_mask, W, what);
  if (st != Status::kOk) return st;
  const int64_t G = Hq / Hkv;
  const int64_t row = Hkv * D;  // elements per cached token
  const int64_t kv_stride = block_size * row;  // from K to V of a block
  const int64_t blk_stride = 2 * kv_stride;
  int64_t work = 0;
  for (int64_t b = 0; b < B; ++b)
    work += (static_cast<int64_t>(q_offsets[b + 1]) - static_cast<int64_t>(q_offsets[b])) *
            (static_cast<int64_t>(ctx_lens[b]) + static_cast<int64_t>(tree_lens[b]));
  const bool parallel = num_threads > 1 && B * Hkv > 1 && work * Hq * D >= (1 << 18);
#pragma omp parallel for schedule(dynamic) num_threads(num_threads) if (parallel)
  for (int64_t task = 0; task < B * Hkv; ++task) {
    const int64_t b = task / Hkv, h = task % Hkv;
    const int64_t q0 = static_cast<int64_t>(q_offsets[b]);
    const int64_t nq = static_cast<int64_t>(q_offsets[b + 1]) - q0;
    if (nq == 0) continue;
    const int64_t ctx = static_cast<int64_t>(ctx_lens[b]);
    const int64_t ntree = static_cast<int64_t>(tree_lens[b]);
    const Idx* table = block_tables + b * max_blocks;
    const int64_t Q = nq * G;  // query vectors of this (sequence, KV head), row-major (r, g)
    std::vector<float> qf(Q * D), acc(Q * D, 0.f), mx(Q, -INFINITY), sum(Q, 0.f), s(4 * kTile);
    std::vector<float> kT(D * kTile), vt(kTile * D), bias(nq * kTile);
    std::vector<int64_t> qpos(nq), lo(nq);  // query position; first visible context key
    int64_t lo_min = ctx;
    for (int64_t r = 0; r < nq; ++r) {
      int64_t bits = 0;
      for (int64_t w = 0; w < W; ++w)
        bits += __builtin_popcount(static_cast<uint32_t>(tree_mask[(q0 + r) * W + w]));
      qpos[r] = ctx + bits - 1;
      lo[r] = sliding_window > 0 ? std::max<int64_t>(0, qpos[r] - sliding_window + 1) : 0;
      lo_min = std::min(lo_min, lo[r]);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[(r * G + g) * D + d] = to_float(q[((q0 + r) * Hq + h * G + g) * D + d]) * scale;
    }
    // One tile of keys at cache positions p(0..n): K (transposed) and V of this head are
    // converted to float once and shared by every query vector; bias (0 or -inf per query
    // row) says which keys each query sees.
    auto tile = [&](auto pos_of, int64_t n) {
      for (int64_t j = 0; j < n; ++j) {
        const int64_t p = pos_of(j);
        const T* k = cache + static_cast<int64_t>(table[p / block_size]) * blk_stride +
                     (p % block_size) * row + h * D;
        const T* v = k + kv_stride;
        for (int64_t d = 0; d < D; ++d) {
          kT[d * kTile + j] = to_float(k[d]);
          vt[j * D + d] = to_float(v[d]);
        }
      }
      int64_t i = 0;
      for (; i + 4 <= Q; i += 4) {
        const float* bq[4];
        for (int k = 0; k < 4; ++k) bq[k] = bias.data() + ((i + k) / G) * kTile;
        tree_attention_detail::scores4(qf.data() + i * D, kT.data(), D, n, bq, s.data());
        for (int k = 0; k < 4; ++k)
          tree_attention_detail::softmax_step(s.data() + k * kTile, n, &mx[i + k], &sum[i + k],
                                              acc.data() + (i + k) * D, D);
        tree_attention_detail::accumulate(acc.data() + i * D, s.data(), 4, vt.data(), n, D);
      }
      for (; i < Q; ++i) {
        tree_attention_detail::scores(qf.data() + i * D, kT.data(), D, n,
                                      bias.data() + (i / G) * kTile, s.data());
        tree_attention_detail::softmax_step(s.data(), n, &mx[i], &sum[i], acc.data() + i * D, D);
        tree_attention_detail::accumulate(acc.data() + i * D, s.data(), 1, vt.data(), n, D);
      }
    };
    // The committed context (shared by every node of the tree).
    for (int64_t p0 = lo_min; p0 < ctx; p0 += kTile) {
      const int64_t n = std::min(kTile, ctx - p0);
      for (int64_t r = 0; r < nq; ++r)
        for (int64_t j = 0; j < n; ++j) bias[r * kTile + j] = p0 + j >= lo[r] ? 0.f : -INFINITY;
      tile([p0](int64_t j) { return p0 + j; }, n);
    }
    // The tree nodes: visible iff an ancestor-or-self bit is set (and inside the window).
    for (int64_t j0 = 0; j0 < ntree; j0 += kTile) {
      const int64_t n = std::min(kTile, ntree - j0);
      for (int64_t r = 0; r < nq; ++r) {
        const int32_t* m = tree_mask + (q0 + r) * W;
        int64_t rank = 0;  // set bits before j0: the depth of the next visible node
        for (int64_t w = 0; w < j0 / 32; ++w) rank += __builtin_popcount(static_cast<uint32_t>(m[w]));
        for (int64_t j = 0; j < n; ++j) {
          const int64_t t = j0 + j;
          const bool on = (static_cast<uint32_t>(m[t / 32]) >> (t % 32)) & 1u;
          bool ok = on;
          if (on) {
            if (sliding_window > 0) ok = ctx + rank > qpos[r] - sliding_window;
            ++rank;
          }
          bias[r * kTile + j] = ok ? 0.f : -INFINITY;
        }
      }
      const int64_t base = ctx + j0;
      tile([base](int64_t j) { return base + j; }, n);
    }
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t i = r * G + g;
        const float inv = sum[i] > 0.f ? 1.f / sum[i] : 0.f;
        T* o = out + ((q0 + r) * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(acc[i * D + d] * inv);
      }
  }
  return Status::kOk;
}

}  // namespace disagg
