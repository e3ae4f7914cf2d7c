// Torch-free micro-kernel shared by the CPU GEMV-style kernels (experts, linear): dot
// products of up to 4 float32 activation rows with 4 weight rows of a [rows, n] matrix stored
// as HF stores projections (row = output feature), with float32 accumulation. Each (row,
// token) dot is computed the same way whatever the tile, so results never depend on how many
// tokens share a tile.
#pragma once

#include <algorithm>
#include <cstdint>

#include "disagg/common.h"
#include "disagg/cpu_vec.h"

namespace disagg {
namespace dot_tile_detail {

constexpr int kTokTile = 4;  // tokens per micro-tile (accumulators: 4 tokens x 4 rows)

// out[i][r] = dot(a[i][0:n], w[r][0:n]) for i < nt, r < 4; activations float32, weights T.
// The portable path, also compiled for AVX2 (picked at load time, see common.h).
template <typename T>
DISAGG_MULTIVERSION static void dot_tile_scalar(const float* const* a, int nt, const T* const* w,
                                                int64_t n, float out[][4]) {
  for (int i = 0; i < nt; ++i)
    for (int r = 0; r < 4; ++r) {
      float s = 0.f;
      const float* ai = a[i];
      const T* wr = w[r];
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < n; ++d) s += ai[d] * to_float(wr[d]);
      out[i][r] = s;
    }
}

#if DISAGG_HAVE_AVX512_PATH
// pf: 4 rows to prefetch into L1 while this tile streams its own (rows two tiles ahead), or
// null. Decode streams the weights from DRAM with little work per byte; the prefetches keep
// the loads ahead of the hardware prefetchers' ramp-up at every new row.
template <int NT, typename T>
DISAGG_AVX512 inline void dot_tile_512(const float* const* a, const T* const* w, int64_t n,
                                       float out[][4], const T* const* pf) {
  __m512 acc[NT][4];
  for (int i = 0; i < NT; ++i)
    for (int r = 0; r < 4; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    if (pf != nullptr) {
      for (int r = 0; r < 4; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(pf[r] + d), _MM_HINT_T0);
    }
    const __m512 w0 = v512::load(w[0] + d), w1 = v512::load(w[1] + d);
    const __m512 w2 = v512::load(w[2] + d), w3 = v512::load(w[3] + d);
    for (int i = 0; i < NT; ++i) {
      const __m512 x = _mm512_loadu_ps(a[i] + d);
      acc[i][0] = _mm512_fmadd_ps(x, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(x, w1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(x, w2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(x, w3, acc[i][3]);
    }
  }
  if (d < n) {
    const __mmask16 m = v512::tail_mask(n - d);
    const __m512 w0 = v512::load(w[0] + d, m), w1 = v512::load(w[1] + d, m);
    const __m512 w2 = v512::load(w[2] + d, m), w3 = v512::load(w[3] + d, m);
    for (int i = 0; i < NT; ++i) {
      const __m512 x = _mm512_maskz_loadu_ps(m, a[i] + d);
      acc[i][0] = _mm512_fmadd_ps(x, w0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(x, w1, acc[i][1]);
      acc[i][2] = _mm512_fmadd_ps(x, w2, acc[i][2]);
      acc[i][3] = _mm512_fmadd_ps(x, w3, acc[i][3]);
    }
  }
  for (int i = 0; i < NT; ++i)
    _mm_storeu_ps(out[i], v512::reduce4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
}

template <typename T>
DISAGG_AVX512 inline void dot_tile_avx512(const float* const* a, int nt, const T* const* w,
                                          int64_t n, float out[][4], const T* const* pf) {
  switch (nt) {
    case 1: dot_tile_512<1>(a, w, n, out, pf); break;
    case 2: dot_tile_512<2>(a, w, n, out, pf); break;
    case 3: dot_tile_512<3>(a, w, n, out, pf); break;
    default: dot_tile_512<4>(a, w, n, out, pf); break;
  }
}
#endif

// ---- Panel path: the same sums, for many tokens --------------------------------------------
// dot_tile's result for an output is fixed by its arithmetic alone: lane l (0..15) of the
// accumulator takes the fused multiply-adds of the products with d = l (mod 16) in d order
// (the masked tail adds +0 to the lanes past n), then reduce4 sums the lanes as
// ((A0 + A2) + (A1 + A3)), A_q = (l0 + l2) + (l1 + l3) over the lanes 4q..4q+3. With many
// tokens per weight row the horizontal sum costs as much as the products; the panel path
// instead keeps 16 weight rows across a vector (a packed, lane-major copy of a 64-row
// block), computes each lane's chain for 6 tokens x 64 rows at once and sums the lanes with
// vertical adds in the same tree. Every output equals dot_tile's bit for bit, so callers pick
// the path by batch size without changing a result (1.2-1.4x dot_tile from 32 tokens on).

// The lanes in the order the tree sums them (siblings next to each other). Panels store their
// lane blocks in this order, so the passes read a panel from start to end; the permutation is
// its own inverse, so it also gives each lane's slot.
constexpr int kLaneOrder[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

// Floats a packed panel of R vectors (16 R rows) of n-long rows takes.
template <int R>
inline int64_t panel_floats(int64_t n) { return 16 * ((n + 15) / 16) * 16 * R; }

#if DISAGG_HAVE_AVX512_PATH
// r[i] <-> column i of the 16 x 16 matrix whose rows are r[0..15].
DISAGG_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    u[4 * k + 0] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
    u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_f32x4(u[k], u[k + 4], 0x88);
    t[k + 4] = _mm512_shuffle_f32x4(u[k], u[k + 4], 0xDD);
    t[k + 8] = _mm512_shuffle_f32x4(u[k + 8], u[k + 12], 0x88);
    t[k + 12] = _mm512_shuffle_f32x4(u[k + 8], u[k + 12], 0xDD);
  }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_f32x4(t[k], t[k + 8], 0xDD);
  }
}

// wp[((kLaneOrder[l] * J + j) * R + v) * 16 + i] = w[(r0 + 16 v + i) * n + 16 j + l] (0 past
// n or past the rows), J = ceil(n / 16): rows r0..r0+16R-1 of a [rows, n] matrix, lane-major,
// widened to float32; by 16 x 16 register transposes.
template <int R, typename T>
DISAGG_AVX512 inline void pack_panel_512(const T* w, int64_t rows, int64_t n, int64_t r0,
                                         float* wp) {
  const int64_t J = (n + 15) / 16;
  for (int v = 0; v < R; ++v)
    for (int64_t j = 0; j < J; ++j) {
      const __mmask16 m = v512::tail_mask(n - 16 * j);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t row = r0 + 16 * v + i;
        r[i] = row < rows ? v512::load(w + row * n + 16 * j, m) : _mm512_setzero_ps();
      }
      transpose16(r);
      for (int l = 0; l < 16; ++l)
        _mm512_storeu_ps(wp + ((kLaneOrder[l] * J + j) * R + v) * 16, r[l]);
    }
}

// out[t][0..16R-1] = dot_tile's outputs for tokens a[0..NT-1] and the rows of panel wp.
// The lanes are taken in an order where tree siblings follow each other, and summed as they
// come through a small stack (stk: 4 * NT * R * 16 floats).
template <int NT, int R, typename P>
DISAGG_AVX512 inline void panel_tile_512(const float* const* a, int64_t n, const P* wp,
                                         float* const* out, float* stk,
                                         const char* pf = nullptr, int64_t pf_lines = 0) {
  constexpr int S = NT * R * 16;
  // With 1-2 tokens a pass has too few accumulators to cover the FMA latency: two sibling
  // lanes then run together and are added as the tree adds them.
  constexpr int LP = NT * R <= 8 ? 2 : 1;
  const int64_t J = (n + 15) / 16, full = n / 16, rem = n % 16;
  int depth = 0, level[4];
  for (int li = 0; li < 16; li += LP) {
    __m512 acc2[LP][NT][R];
    const P* wl[LP];
    int lane[LP];
    int64_t steps[LP], common = full + 1;
    for (int q = 0; q < LP; ++q) {
      lane[q] = kLaneOrder[li + q];
      wl[q] = wp + (li + q) * J * 16 * R;  // lanes are stored in the order they are summed
      steps[q] = full + (rem != 0 && lane[q] < rem ? 1 : 0);
      common = std::min(common, steps[q]);
      for (int t = 0; t < NT; ++t)
        for (int v = 0; v < R; ++v) acc2[q][t][v] = _mm512_setzero_ps();
    }
    if (pf != nullptr) {  // this pass's share of the lines to fetch into L2
      for (int64_t k = li * pf_lines / 16; k < (li + LP) * pf_lines / 16; ++k)
        _mm_prefetch(pf + k * 64, _MM_HINT_T1);
    }
    for (int64_t j = 0; j < common; ++j)
      for (int q = 0; q < LP; ++q) {
        __m512 w[R];
        for (int v = 0; v < R; ++v) w[v] = v512::load(wl[q] + (j * R + v) * 16);
        for (int t = 0; t < NT; ++t) {
          const __m512 x = _mm512_set1_ps(a[t][16 * j + lane[q]]);
          for (int v = 0; v < R; ++v) acc2[q][t][v] = _mm512_fmadd_ps(x, w[v], acc2[q][t][v]);
        }
      }
    for (int q = 0; q < LP; ++q) {
      if (steps[q] > common) {  // a tail lane the sibling lacks
        __m512 w[R];
        for (int v = 0; v < R; ++v) w[v] = v512::load(wl[q] + (common * R + v) * 16);
        for (int t = 0; t < NT; ++t) {
          const __m512 x = _mm512_set1_ps(a[t][16 * common + lane[q]]);
          for (int v = 0; v < R; ++v) acc2[q][t][v] = _mm512_fmadd_ps(x, w[v], acc2[q][t][v]);
        }
      }
      if (rem != 0 && lane[q] >= rem)  // the masked tail's fma(0, 0, acc)
        for (int t = 0; t < NT; ++t)
          for (int v = 0; v < R; ++v)
            acc2[q][t][v] = _mm512_add_ps(acc2[q][t][v], _mm512_setzero_ps());
    }
    __m512 (&acc)[NT][R] = acc2[0];
    if constexpr (LP == 2)
      for (int t = 0; t < NT; ++t)
        for (int v = 0; v < R; ++v) acc[t][v] = _mm512_add_ps(acc2[0][t][v], acc2[1][t][v]);
    int lev = LP - 1;
    while (depth > 0 && level[depth - 1] == lev) {
      const float* s = stk + (--depth) * S;
      for (int t = 0; t < NT; ++t)
        for (int v = 0; v < R; ++v)
          acc[t][v] = _mm512_add_ps(_mm512_loadu_ps(s + (t * R + v) * 16), acc[t][v]);
      ++lev;
    }
    if (lev == 4) {
      for (int t = 0; t < NT; ++t)
        for (int v = 0; v < R; ++v) _mm512_storeu_ps(out[t] + v * 16, acc[t][v]);
    } else {
      float* s = stk + depth * S;
      for (int t = 0; t < NT; ++t)
        for (int v = 0; v < R; ++v) _mm512_storeu_ps(s + (t * R + v) * 16, acc[t][v]);
      level[depth++] = lev;
    }
  }
}

// out[t][0..16R-1] for nt <= NT tokens.
template <int NT, int R, typename P>
DISAGG_AVX512 inline void panel_tile(const float* const* a, int nt, int64_t n, const P* wp,
                                     float* const* out, float* stk, const char* pf = nullptr,
                                     int64_t pf_lines = 0) {
  if constexpr (NT > 1) {
    if (nt < NT) return panel_tile<NT - 1, R, P>(a, nt, n, wp, out, stk, pf, pf_lines);
  }
  panel_tile_512<NT, R, P>(a, n, wp, out, stk, pf, pf_lines);
}

constexpr int kPanelR = 4;                 // vectors of rows per panel
constexpr int kPanelRows = 16 * kPanelR;   // rows per panel
constexpr int kPanelTok = 6;               // tokens per panel tile
constexpr int64_t kPanelMinTokens = 24;    // below this dot_tile is as fast (1 core, Zen 5)

// Floats of scratch a packed panel of n-long rows needs.
inline int64_t panel_scratch_floats(int64_t n) { return panel_floats<kPanelR>(n); }

// For tokens 0..ntok-1 (activation rows a_of(t)) and the packed panel wp of rows
// r0..r0+kPanelRows-1 (float32, or bf16 packed ahead of time and widened as read):
// emit(t, vals) with vals[0..kPanelRows) = dot_tile's outputs.
// [pf, pf + pf_bytes): the weights the caller packs next, fetched into L2 a few lines per
// tile meanwhile (packing from DRAM otherwise stalls on every row).
template <typename P, typename A, typename Emit>
DISAGG_AVX512 inline void panel_gemm(int64_t ntok, int64_t n, const P* wp, A a_of,
                                     Emit emit, const void* pf = nullptr, int64_t pf_bytes = 0) {
  alignas(64) float tmp[kPanelTok][kPanelRows];
  alignas(64) float stk[4 * kPanelTok * kPanelRows];
  const char* pfc = static_cast<const char*>(pf);
  const int64_t lines = pf != nullptr ? (pf_bytes + 63) / 64 : 0;
  const int64_t tiles = (ntok + kPanelTok - 1) / kPanelTok;
  const int64_t per_tile = tiles > 0 ? (lines + tiles - 1) / tiles : 0;
  int64_t next_line = 0;
  for (int64_t t0 = 0; t0 < ntok; t0 += kPanelTok) {
    // This tile's share of the lines, spread over its 16 lane passes.
    const int64_t first = next_line, count = std::min(lines, next_line + per_tile) - first;
    next_line += count;
    const int nt = static_cast<int>(std::min<int64_t>(kPanelTok, ntok - t0));
    const float* a[kPanelTok];
    float* o[kPanelTok];
    for (int i = 0; i < nt; ++i) {
      a[i] = a_of(t0 + i);
      o[i] = tmp[i];
    }
    panel_tile<kPanelTok, kPanelR, P>(a, nt, n, wp, o, stk, count > 0 ? pfc + first * 64 : nullptr,
                                      count);
    for (int i = 0; i < nt; ++i) emit(t0 + i, static_cast<const float*>(tmp[i]));
  }
}
#endif

template <typename T>
inline void dot_tile(bool avx512, const float* const* a, int nt, const T* const* w, int64_t n,
                     float out[][4], const T* const* pf = nullptr) {
#if DISAGG_HAVE_AVX512_PATH
  if (avx512) return dot_tile_avx512(a, nt, w, n, out, pf);
#endif
  (void)avx512;
  (void)pf;
  dot_tile_scalar(a, nt, w, n, out);
}

}  // namespace dot_tile_detail
}  // namespace disagg
