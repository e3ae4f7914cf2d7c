// Torch-free CPU kernel for decode attention over a paged KV cache: one query token per
// sequence attends to its cached keys/values through its block table, without first gathering
// the pages into a contiguous buffer.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "disagg/common.h"
#include "disagg/cpu_vec.h"

namespace disagg {

namespace attn_detail {

#if DISAGG_HAVE_AVX512_PATH
// Scores s[0..n) -> their softmax numerators exp(s - max), in place; returns 1 / their sum.
DISAGG_AVX512 inline float softmax_numerators(float* s, int64_t n) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY),
                                                v512::tail_mask(n - j), s + j));
  const __m512 mv = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = v512::tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(
        m, v512::exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), mv)));
    _mm512_mask_storeu_ps(s + j, m, e);
    sum = _mm512_add_ps(sum, e);
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// One (sequence, KV head) task: G query heads over n keys whose K rows are kp[i] and V rows
// vp[i]; q rows (already scaled) in qf [G, D] float32; out rows at o[g * D]. `s` holds G * n
// floats. Scores 4 keys at a time, a vectorized softmax, then probability-weighted values with
// the accumulators in registers.
template <typename T>
DISAGG_AVX512 static void attend_avx512(const float* qf, int64_t G, int64_t D, const T* const* kp,
                                        const T* const* vp, int64_t n, float* s, T* o,
                                        int64_t o_stride) {
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = qf + g * D;
    float* sg = s + g * n;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = v512::tail_mask(D - d);
        const __m512 qv = _mm512_maskz_loadu_ps(m, qg + d);
        a0 = _mm512_fmadd_ps(qv, v512::load(kp[i] + d, m), a0);
        a1 = _mm512_fmadd_ps(qv, v512::load(kp[i + 1] + d, m), a1);
        a2 = _mm512_fmadd_ps(qv, v512::load(kp[i + 2] + d, m), a2);
        a3 = _mm512_fmadd_ps(qv, v512::load(kp[i + 3] + d, m), a3);
      }
      _mm_storeu_ps(sg + i, v512::reduce4(a0, a1, a2, a3));
    }
    for (; i < n; ++i) {
      __m512 a0 = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) {
        const __mmask16 m = v512::tail_mask(D - d);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, qg + d), v512::load(kp[i] + d, m), a0);
      }
      sg[i] = _mm512_reduce_add_ps(a0);
    }
    const float inv = softmax_numerators(sg, n);
    // weighted values: one 16-lane slice of the head at a time, all keys
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = v512::tail_mask(D - d);
      __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
      int64_t j = 0;
      for (; j + 2 <= n; j += 2) {
        acc0 = _mm512_fmadd_ps(_mm512_set1_ps(sg[j]), v512::load(vp[j] + d, m), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_set1_ps(sg[j + 1]), v512::load(vp[j + 1] + d, m), acc1);
      }
      if (j < n) acc0 = _mm512_fmadd_ps(_mm512_set1_ps(sg[j]), v512::load(vp[j] + d, m), acc0);
      v512::store(o + g * o_stride + d, _mm512_mul_ps(_mm512_add_ps(acc0, acc1),
                                                      _mm512_set1_ps(inv)), m);
    }
  }
}

// The same for D = 16 * DV: q rows in registers, no masks, and the probability-weighted
// values for GB query heads at once from each V row read, two keys at a time into separate
// accumulators (the FMA chains otherwise wait on each other's latency).
template <int DV, int GB, typename T>
DISAGG_AVX512 static void weigh_values(const float* s, int64_t n, const T* const* vp,
                                       const float* inv, T* o, int64_t o_stride) {
  __m512 a0[GB][DV], a1[GB][DV];
  for (int g = 0; g < GB; ++g)
    for (int v = 0; v < DV; ++v) a0[g][v] = a1[g][v] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    __m512 v0[DV], v1[DV];
    for (int v = 0; v < DV; ++v) {
      v0[v] = v512::load(vp[j] + 16 * v);
      v1[v] = v512::load(vp[j + 1] + 16 * v);
    }
    for (int g = 0; g < GB; ++g) {
      const __m512 p0 = _mm512_set1_ps(s[g * n + j]), p1 = _mm512_set1_ps(s[g * n + j + 1]);
      for (int v = 0; v < DV; ++v) {
        a0[g][v] = _mm512_fmadd_ps(p0, v0[v], a0[g][v]);
        a1[g][v] = _mm512_fmadd_ps(p1, v1[v], a1[g][v]);
      }
    }
  }
  if (j < n) {
    for (int v = 0; v < DV; ++v) {
      const __m512 vv = v512::load(vp[j] + 16 * v);
      for (int g = 0; g < GB; ++g)
        a0[g][v] = _mm512_fmadd_ps(_mm512_set1_ps(s[g * n + j]), vv, a0[g][v]);
    }
  }
  for (int g = 0; g < GB; ++g)
    for (int v = 0; v < DV; ++v)
      v512::store(o + g * o_stride + 16 * v,
                  _mm512_mul_ps(_mm512_add_ps(a0[g][v], a1[g][v]), _mm512_set1_ps(inv[g])),
                  static_cast<__mmask16>(0xffff));
}

template <int DV, typename T>
DISAGG_AVX512 static void attend_dv(const float* qf, int64_t G, const T* const* kp,
                                    const T* const* vp, int64_t n, float* s, T* o,
                                    int64_t o_stride) {
  constexpr int64_t D = 16 * DV;
  float inv[8];
  for (int64_t g = 0; g < G; ++g) {
    __m512 q[DV];
    for (int v = 0; v < DV; ++v) q[v] = _mm512_loadu_ps(qf + g * D + 16 * v);
    float* sg = s + g * n;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
      __m512 a0 = _mm512_mul_ps(q[0], v512::load(kp[i]));
      __m512 a1 = _mm512_mul_ps(q[0], v512::load(kp[i + 1]));
      __m512 a2 = _mm512_mul_ps(q[0], v512::load(kp[i + 2]));
      __m512 a3 = _mm512_mul_ps(q[0], v512::load(kp[i + 3]));
      for (int v = 1; v < DV; ++v) {
        a0 = _mm512_fmadd_ps(q[v], v512::load(kp[i] + 16 * v), a0);
        a1 = _mm512_fmadd_ps(q[v], v512::load(kp[i + 1] + 16 * v), a1);
        a2 = _mm512_fmadd_ps(q[v], v512::load(kp[i + 2] + 16 * v), a2);
        a3 = _mm512_fmadd_ps(q[v], v512::load(kp[i + 3] + 16 * v), a3);
      }
      _mm_storeu_ps(sg + i, v512::reduce4(a0, a1, a2, a3));
    }
    for (; i < n; ++i) {
      __m512 a0 = _mm512_mul_ps(q[0], v512::load(kp[i]));
      for (int v = 1; v < DV; ++v) a0 = _mm512_fmadd_ps(q[v], v512::load(kp[i] + 16 * v), a0);
      sg[i] = _mm512_reduce_add_ps(a0);
    }
    inv[g] = softmax_numerators(sg, n);
  }
  // As many query heads per pass as keep the accumulators (2 * GB * DV) in registers.
  constexpr int GB = DV == 1 ? 8 : DV == 2 ? 4 : DV == 4 ? 2 : 1;
  int64_t g = 0;
  for (; g + GB <= G; g += GB)
    weigh_values<DV, GB>(s + g * n, n, vp, inv + g, o + g * o_stride, o_stride);
  for (; g < G; ++g) weigh_values<DV, 1>(s + g * n, n, vp, inv + g, o + g * o_stride, o_stride);
}
#endif

}  // namespace attn_detail

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
  const bool avx512 = cpu_has_avx512();
#pragma omp parallel for schedule(dynamic) num_threads(num_threads) if (parallel)
  for (int64_t task = 0; task < B * Hkv; ++task) {
    const int64_t b = task / Hkv, h = task % Hkv;
    const int64_t L = static_cast<int64_t>(ctx_lens[b]);
    const int64_t start = sliding_window > 0 ? std::max<int64_t>(0, L - sliding_window) : 0;
    const int64_t n = L - start;
    const Idx* table = block_tables + b * max_blocks;
#if DISAGG_HAVE_AVX512_PATH
    if (avx512) {
      // Scratch kept per thread across calls: q [G, D], scores [G, n], row pointers [2n].
      thread_local std::vector<float> fbuf;
      thread_local std::vector<const T*> pbuf;
      if (fbuf.size() < static_cast<size_t>(G * D + G * n)) fbuf.resize(G * D + G * n);
      if (pbuf.size() < static_cast<size_t>(2 * n)) pbuf.resize(2 * n);
      float* qf = fbuf.data();
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d)
          qf[g * D + d] = to_float(q[(b * Hq + h * G + g) * D + d]) * scale;
      const T** kp = pbuf.data();
      const T** vp = kp + n;
      for (int64_t i = 0; i < n;) {  // block by block: no division per key
        const int64_t p = start + i, off = p % block_size;
        const int64_t run = std::min(block_size - off, n - i);
        const T* base = cache + static_cast<int64_t>(table[p / block_size]) * blk_stride +
                        off * row + h * D;
        for (int64_t r = 0; r < run; ++r, ++i) {
          kp[i] = base + r * row;
          vp[i] = kp[i] + kv_stride;
        }
      }
      T* o = out + (b * Hq + h * G) * D;
      float* sc = qf + G * D;
      switch (G <= 8 ? D : 0) {  // head sizes with a register-resident kernel
        case 16: attn_detail::attend_dv<1, T>(qf, G, kp, vp, n, sc, o, D); break;
        case 32: attn_detail::attend_dv<2, T>(qf, G, kp, vp, n, sc, o, D); break;
        case 64: attn_detail::attend_dv<4, T>(qf, G, kp, vp, n, sc, o, D); break;
        case 128: attn_detail::attend_dv<8, T>(qf, G, kp, vp, n, sc, o, D); break;
        default: attn_detail::attend_avx512<T>(qf, G, D, kp, vp, n, sc, o, D);
      }
      continue;
    }
#endif
    (void)avx512;
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

// Decode attention for a step's new tokens straight from the fused QKV projection: RoPE on
// q and k, the new K/V appended to the cache, then paged_decode_attention_cpu. qkv [B, (Hq +
// 2 Hkv) * D] holds each token's q heads, k heads, v heads; cos, sin [B, D] are HF's rotary
// tables at each token's position (rotate-half convention: x * cos + rotate_half(x) * sin,
// computed in float32 and rounded to T); the new token sits at position ctx_lens[b] - 1 of its
// block table, where its K/V are written. q_scratch holds B * Hq * D elements (the rotated q).
// D must be even. Returns kInvalidArgument (writing nothing) on the same conditions as
// paged_decode_attention_cpu.
template <typename T, typename Idx>
Status paged_decode_attention_rope_cpu(const T* qkv, int64_t B, int64_t Hq, int64_t D,
                                       const T* cos, const T* sin, T* cache, int64_t num_blocks,
                                       int64_t block_size, int64_t Hkv, const Idx* block_tables,
                                       int64_t max_blocks, const Idx* ctx_lens, float scale,
                                       int64_t sliding_window, T* q_scratch, T* out,
                                       int num_threads = 1) {
  if (Hkv <= 0 || Hq % Hkv != 0 || block_size <= 0 || D % 2 != 0) return Status::kInvalidArgument;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t L = static_cast<int64_t>(ctx_lens[b]);
    if (L < 1 || L > max_blocks * block_size) return Status::kInvalidArgument;
    const int64_t used = (L + block_size - 1) / block_size;
    for (int64_t i = 0; i < used; ++i) {
      const int64_t blk = static_cast<int64_t>(block_tables[b * max_blocks + i]);
      if (blk < 0 || blk >= num_blocks) return Status::kInvalidArgument;
    }
  }
  const int64_t half = D / 2, width = (Hq + 2 * Hkv) * D;
  const int64_t row = Hkv * D, kv_stride = block_size * row, blk_stride = 2 * kv_stride;
  auto rope = [&](const T* x, const T* c, const T* s, T* o) {
    for (int64_t d = 0; d < half; ++d) {
      const float x1 = to_float(x[d]), x2 = to_float(x[d + half]);
      o[d] = from_float<T>(x1 * to_float(c[d]) - x2 * to_float(s[d]));
      o[d + half] = from_float<T>(x2 * to_float(c[d + half]) + x1 * to_float(s[d + half]));
    }
  };
  for (int64_t b = 0; b < B; ++b) {
    const T* src = qkv + b * width;
    const T* c = cos + b * D;
    const T* sn = sin + b * D;
    for (int64_t h = 0; h < Hq; ++h) rope(src + h * D, c, sn, q_scratch + (b * Hq + h) * D);
    const int64_t p = static_cast<int64_t>(ctx_lens[b]) - 1;
    T* kdst = cache + static_cast<int64_t>(block_tables[b * max_blocks + p / block_size]) *
                          blk_stride + (p % block_size) * row;
    for (int64_t h = 0; h < Hkv; ++h) rope(src + (Hq + h) * D, c, sn, kdst + h * D);
    std::memcpy(kdst + kv_stride, src + (Hq + Hkv) * D, sizeof(T) * row);
  }
  return paged_decode_attention_cpu<T, Idx>(q_scratch, B, Hq, D, cache, num_blocks, block_size,
                                            Hkv, block_tables, max_blocks, ctx_lens, scale,
                                            sliding_window, out, num_threads);
}

}  // namespace disagg
