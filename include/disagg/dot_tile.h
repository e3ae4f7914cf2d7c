// Torch-free micro-kernel shared by the CPU GEMV-style kernels (experts, linear): dot
// products of up to 4 float32 activation rows with 4 weight rows of a [rows, n] matrix stored
// as HF stores projections (row = output feature), with float32 accumulation. Each (row,
// token) dot is computed the same way whatever the tile, so results never depend on how many
// tokens share a tile.
#pragma once

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
