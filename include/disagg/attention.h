// Torch-free CPU kernel for decode attention over a paged KV cache: one query token per
// sequence attends to its cached keys/values through its block table, without first gathering
// the pages into a contiguous buffer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "disagg/common.h"

namespace disagg {

// q [B, Hq, D]; cache [num_blocks, 2, block_size, Hkv, D] (index 0 = K, 1 = V), contiguous;
// block_tables [B, max_blocks]; ctx_lens [B] (keys per sequence, including the current token);
// out [B, Hq, D]. Query head h reads KV head h / (Hq / Hkv) (grouped-query attention).
// sliding_window > 0 keeps only the last `sliding_window` keys. Accumulation is float32.
// Work is split over (sequence, KV head) pairs on up to `num_threads` OpenMP threads; small
// batches stay on the calling thread, where a parallel region costs more than it saves.
// Returns kInvalidArgument (writing nothing) when a context length is outside
// [1, max_blocks * block_size] or a used block id is outside [0, num_blocks).
template <typename T, typename Idx>
Status paged_decode_attention_cpu(const T* q, int64_t B, int64_t Hq, int64_t D, const T* cache,
                                  int64_t num_blocks, int64_t block_size, int64_t Hkv,
                                  const Idx* block_tables, int64_t max_blocks,
                                  const Idx* ctx_lens, float scale, int64_t sliding_window,
                                  T* out, int num_threads = 1) {
  if (Hkv <= 0 || Hq % Hkv != 0 || block_size <= 0) return Status::kInvalidArgument;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = static_cast<int64_t>(ctx_lens[b]);
    if (L < 1 || L > max_blocks * block_size) return Status::kInvalidArgument;
    const int64_t used = (L + block_size - 1) / block_size;
    for (int64_t i = 0; i < used; ++i) {
      const int64_t blk = static_cast<int64_t>(block_tables[b * max_blocks + i]);
      if (blk < 0 || blk >= num_blocks) return Status::kInvalidArgument;
    }
  }
  const int64_t G = Hq / Hkv;
  const int64_t row = Hkv * D;  // elements per cached token
  const int64_t kv_stride = block_size * row;  // from K to V of a block
  const int64_t blk_stride = 2 * kv_stride;
  int64_t total_keys = 0;
  for (int64_t b = 0; b < B; ++b) total_keys += static_cast<int64_t>(ctx_lens[b]);
  const bool parallel = num_threads > 1 && B * Hkv > 1 && total_keys * Hq * D >= (1 << 18);
#pragma omp parallel for schedule(dynamic) num_threads(num_threads) if (parallel)
  for (int64_t task = 0; task < B * Hkv; ++task) {
    const int64_t b = task / Hkv, h = task % Hkv;
    const int64_t L = static_cast<int64_t>(ctx_lens[b]);
    const int64_t start = sliding_window > 0 ? std::max<int64_t>(0, L - sliding_window) : 0;
    const int64_t n = L - start;
    const Idx* table = block_tables + b * max_blocks;
    std::vector<float> qf(G * D), acc(G * D, 0.f), s(G * n);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d)
        qf[g * D + d] = to_float(q[(b * Hq + h * G + g) * D + d]) * scale;
    std::vector<float> mx(G, -INFINITY), sum(G, 0.f);
    // Pass 1: scores; the keys of one token are read once for all G query heads. Walking
    // block by block keeps the inner loops free of divisions.
    for (int64_t i = 0; i < n;) {
      const int64_t p = start + i;
      const int64_t off0 = p % block_size;
      const int64_t run = std::min(block_size - off0, n - i);
      const T* k = cache + static_cast<int64_t>(table[p / block_size]) * blk_stride +
                   off0 * row + h * D;
      for (int64_t j = 0; j < run; ++j, k += row) {
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * to_float(k[d]);
          s[g * n + i + j] = dot;
          mx[g] = std::max(mx[g], dot);
        }
      }
      i += run;
    }
    for (int64_t g = 0; g < G; ++g) {
      float* sg = s.data() + g * n;
      for (int64_t i = 0; i < n; ++i) {
        sg[i] = std::exp(sg[i] - mx[g]);
        sum[g] += sg[i];
      }
    }
    // Pass 2: probability-weighted values.
    for (int64_t i = 0; i < n;) {
      const int64_t p = start + i;
      const int64_t off0 = p % block_size;
      const int64_t run = std::min(block_size - off0, n - i);
      const T* v = cache + static_cast<int64_t>(table[p / block_size]) * blk_stride + kv_stride +
                   off0 * row + h * D;
      for (int64_t j = 0; j < run; ++j, v += row) {
        for (int64_t g = 0; g < G; ++g) {
          const float w = s[g * n + i + j];
          float* ag = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += w * to_float(v[d]);
        }
      }
      i += run;
    }
    for (int64_t g = 0; g < G; ++g) {
      const float inv = 1.f / sum[g];
      T* o = out + (b * Hq + h * G + g) * D;
      for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(acc[g * D + d] * inv);
    }
  }
  return Status::kOk;
}

}  // namespace disagg
