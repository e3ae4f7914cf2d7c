// Torch-free CPU kernel for a dense projection y = x W^T + b with W stored as HF stores it
// ([out_features, in_features]). Built on the same 4-token x 4-row dot tile as the experts
// kernel; for the few rows of a decode step it streams W once at memory speed, where a BLAS
// call spends most of its time in setup.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "disagg/common.h"
#include "disagg/cpu_vec.h"
#include "disagg/dot_tile.h"

namespace disagg {

// x [N, K], w [M, K], bias [M] or null -> out [N, M]; float32 accumulation, one rounding to T.
// Work is split over blocks of 64 output features x 64 tokens on up to `num_threads` OpenMP
// threads when there is enough of it. Each output is the same whatever N and the threads.
// The weight's type W may be bf16 under float32 T (a bf16 checkpoint run in float32): each
// weight is widened exactly, so the outputs equal those of a float32 copy, bit for bit.
template <typename T, typename W = T>
Status linear_cpu(const T* x, int64_t N, int64_t K, const W* w, int64_t M, const T* bias, T* out,
                  int num_threads = 1) {
  using namespace dot_tile_detail;
  if (N < 0 || K < 0 || M < 0) return Status::kInvalidArgument;
  if (N == 0 || M == 0) return Status::kOk;
  const float* xf = nullptr;
  thread_local std::vector<float> conv;
  if constexpr (std::is_same<T, float>::value) {
    xf = x;
  } else {
    if (conv.size() < static_cast<size_t>(N * K)) conv.resize(N * K);
    for (int64_t i = 0; i < N * K; ++i) conv[i] = to_float(x[i]);
    xf = conv.data();
  }
  const bool avx512 = cpu_has_avx512();
  constexpr int64_t RB = 64, TB = 64;
  const int64_t nrb = (M + RB - 1) / RB, ntb = (N + TB - 1) / TB;
  const bool parallel = num_threads > 1 && nrb * ntb > 1 && N * M * K >= (int64_t(1) << 20);
#if DISAGG_HAVE_AVX512_PATH
  if (avx512 && N >= kPanelMinTokens && M >= kPanelRows / 2) {
    // Many tokens: packed panels of 64 rows, each reused by up to 256 tokens (not for a few
    // output features, e.g. a router's: a panel computes all 64 rows).
    constexpr int64_t PTB = 256;
    const int64_t npb = (M + kPanelRows - 1) / kPanelRows, nptb = (N + PTB - 1) / PTB;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
    for (int64_t task = 0; task < npb * nptb; ++task) {
      const int64_t m0 = (task % npb) * kPanelRows, n0 = (task / npb) * PTB;
      const int nr = static_cast<int>(std::min<int64_t>(kPanelRows, M - m0));
      thread_local std::vector<float> wp;
      if (wp.size() < static_cast<size_t>(panel_scratch_floats(K)))
        wp.resize(panel_scratch_floats(K));
      pack_panel_512<kPanelR>(w, M, K, m0, wp.data());
      float b[kPanelRows] = {};
      if (bias != nullptr)
        for (int r = 0; r < nr; ++r) b[r] = to_float(bias[m0 + r]);
      panel_gemm(
          std::min(PTB, N - n0), K, wp.data(),
          [&](int64_t t) { return xf + (n0 + t) * K; },
          [&](int64_t t, const float* v) {
            T* orow = out + (n0 + t) * M + m0;
            for (int r = 0; r < nr; ++r) orow[r] = from_float<T>(v[r] + b[r]);
          },
          w + (m0 + kPanelRows) * K,
          std::max<int64_t>(0, std::min<int64_t>(kPanelRows, M - m0 - kPanelRows)) * K *
              int64_t(sizeof(W)));
    }
    return Status::kOk;
  }
#endif
#pragma omp parallel for schedule(static) num_threads(num_threads) if (parallel)
  for (int64_t task = 0; task < nrb * ntb; ++task) {
    const int64_t m0 = (task % nrb) * RB, m1 = std::min(M, m0 + RB);
    const int64_t n0 = (task / nrb) * TB, n1 = std::min(N, n0 + TB);
    for (int64_t m = m0; m < m1; m += 4) {
      const W* wr[4];
      const W* pf[4];
      for (int r = 0; r < 4; ++r) {
        wr[r] = w + std::min(m + r, M - 1) * K;
        pf[r] = w + std::min(m + 8 + r, M - 1) * K;
      }
      float b[4] = {0.f, 0.f, 0.f, 0.f};
      if (bias != nullptr)
        for (int r = 0; r < 4; ++r) b[r] = to_float(bias[std::min(m + r, M - 1)]);
      for (int64_t t0 = n0; t0 < n1; t0 += kTokTile) {
        const int nt = static_cast<int>(std::min<int64_t>(kTokTile, n1 - t0));
        const float* a[kTokTile];
        for (int i = 0; i < nt; ++i) a[i] = xf + (t0 + i) * K;
        float o[kTokTile][4];
        dot_tile(avx512, a, nt, wr, K, o, t0 == n0 ? pf : nullptr);
        for (int i = 0; i < nt; ++i) {
          T* orow = out + (t0 + i) * M;
          for (int r = 0; r < 4 && m + r < M; ++r) orow[m + r] = from_float<T>(o[i][r] + b[r]);
        }
      }
    }
  }
  return Status::kOk;
}

}  // namespace disagg
