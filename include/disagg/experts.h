// Torch-free CPU kernel for the routed experts of a few tokens (decode): every token's top-k
// SiLU-gated MLPs and their weighted sum in one call, reading each used expert's weights once
// for all the tokens routed to it (a GEMV-style pass, memory-bound by design).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "disagg/common.h"
#include "disagg/cpu_vec.h"
#include "disagg/dot_tile.h"

namespace disagg {

namespace experts_detail {

// Scratch reused across calls (decode calls this every layer of every step: no allocation
// on the hot path once warm).
inline std::vector<float>& scratch() {
  thread_local std::vector<float> buf;
  return buf;
}

// g[i] = silu(g[i]) * u[i] over a row.
static inline void silu_mul_scalar(float* g, const float* u, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

#if DISAGG_HAVE_AVX512_PATH
DISAGG_AVX512 static void silu_mul_avx512(float* g, const float* u, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = v512::tail_mask(n - i);
    const __m512 x = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 e = v512::exp(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 s = _mm512_div_ps(x, _mm512_add_ps(one, e));
    _mm512_mask_storeu_ps(g + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + i)));
  }
}
#endif

static inline void silu_mul(bool avx512, float* g, const float* u, int64_t n) {
#if DISAGG_HAVE_AVX512_PATH
  if (avx512) return silu_mul_avx512(g, u, n);
#endif
  (void)avx512;
  silu_mul_scalar(g, u, n);
}

using namespace dot_tile_detail;

#if DISAGG_HAVE_AVX512_PATH
// The row blocks below are one panel each; packed weights are indexed by them.
static_assert(kPanelRows == 64, "moe_experts_cpu's row blocks are 64 rows");

// Elements of one packed 64-row panel of n-long rows: [16 lanes, ceil(n / 16), 4, 16].
inline int64_t moe_panel_elems(int64_t n) { return 16 * ((n + 15) / 16) * kPanelRows; }

// Per-thread scratch for one packed panel of n-long rows.
inline float* panel_buf(int64_t n) {
  thread_local std::vector<float> buf;
  const size_t need = static_cast<size_t>(dot_tile_detail::panel_scratch_floats(n));
  if (buf.size() < need) buf.resize(need);
  return buf.data();
}
#endif
constexpr int64_t kTokBlock = 32;  // tokens whose activations stay in L1 across a row block

}  // namespace experts_detail

// x [T, H]; ids [T, K] with -1 = dropped, else an expert in [0, E); weights [T, K] float32;
// w13 [E, 2I, H]: rows 0..I-1 the gate projection, I..2I-1 the up projection (HF's fused
// gate_up layout, i.e. Mixtral's w1 then w3); w2 [E, H, I] (the down projection);
// out [T, H] = sum_k weights[t,k] * w2[e] (silu(w13[e,:I] x_t) * (w13[e,I:] x_t)), e = ids[t,k],
// with float32 accumulation and one rounding to T at the end (dropped assignments add nothing).
// Per expert, the tokens routed to it are processed together in tiles of 4 tokens x 4 weight
// rows, so each used expert's weights are streamed once per call. Work is split over
// (expert, row block) on up to `num_threads` OpenMP threads when there is enough of it.
// The weights' type W may be narrower than the activations' T (bf16 weights of a checkpoint
// run in float32): each weight is widened exactly, so the result equals the one computed with
// float32 copies of the weights, for half the bytes streamed.
// w13p, w2p (optional, AVX-512 only): the same weights packed ahead of time (the Python
// ops.pack_moe_weights): per expert, ceil(I/64) gate panels, then as many up panels, of
// rows of H; w2p ceil(H/64) panels of rows of I; each panel as pack_panel_512 lays it out
// (moe_panel_elems elements). Then w13 and w2 are not read and every expert runs the panel
// path, with the same results bit for bit.
// Returns kInvalidArgument (writing nothing) when an id is outside [-1, E).
template <typename T, typename Idx, typename W = T>
Status moe_experts_cpu(const T* x, int64_t Tn, int64_t H, const Idx* ids, const float* weights,
                       int64_t K, const W* w13, const W* w2, int64_t E, int64_t I, T* out,
                       int num_threads = 1, const W* w13p = nullptr, const W* w2p = nullptr) {
  using namespace experts_detail;
  const int64_t A = Tn * K;  // assignments
  for (int64_t a = 0; a < A; ++a) {
    const int64_t e = static_cast<int64_t>(ids[a]);
    if (e < -1 || e >= E) return Status::kInvalidArgument;
  }
  if (Tn == 0 || H == 0) return Status::kOk;
  // Bound the scratch (kept per thread across calls) to 32 MB: long prefills of large models
  // run in token chunks, each streaming the weights once.
  constexpr int64_t kScratchFloats = int64_t(8) << 20;
  const int64_t per_tok = K * (2 * I + H) + (std::is_same<T, float>::value ? 0 : H);
  const int64_t max_tok = std::max<int64_t>(1, kScratchFloats / std::max<int64_t>(1, per_tok));
  if (Tn > max_tok) {
    for (int64_t t0 = 0; t0 < Tn; t0 += max_tok) {
      const int64_t n = std::min(max_tok, Tn - t0);
      const Status s = moe_experts_cpu<T, Idx, W>(x + t0 * H, n, H, ids + t0 * K, weights + t0 * K,
                                               K, w13, w2, E, I, out + t0 * H, num_threads,
                                               w13p, w2p);
      if (s != Status::kOk) return s;
    }
    return Status::kOk;
  }
  // Counting sort of the assignments by expert, in token order within an expert.
  std::vector<int64_t> offs(E + 1, 0), order(A);
  for (int64_t a = 0; a < A; ++a)
    if (ids[a] >= 0) ++offs[static_cast<int64_t>(ids[a]) + 1];
  for (int64_t e = 0; e < E; ++e) offs[e + 1] += offs[e];
  {
    std::vector<int64_t> fill(offs.begin(), offs.end() - 1);
    for (int64_t a = 0; a < A; ++a)
      if (ids[a] >= 0) order[fill[static_cast<int64_t>(ids[a])]++] = a;
  }
  // Scratch: float32 copy of x (when T is 16-bit), gate/up outputs [A, 2I] (the activation
  // overwrites the gate half), expert outputs [A, H].
  const bool convert = !std::is_same<T, float>::value;
  std::vector<float>& buf = scratch();
  const size_t need = static_cast<size_t>((convert ? Tn * H : 0) + A * 2 * I + A * H);
  if (buf.size() < need) buf.resize(need);
  float* xf = buf.data();
  float* act = xf + (convert ? Tn * H : 0);
  float* y = act + A * 2 * I;
  const float* xrow0 = nullptr;
  if (convert) {
    for (int64_t i = 0; i < Tn * H; ++i) xf[i] = to_float(x[i]);
    xrow0 = xf;
  } else {
    xrow0 = reinterpret_cast<const float*>(x);
  }
  const bool avx512 = cpu_has_avx512();
  // Row blocks: enough tasks to spread over threads, big enough to amortise a task.
  const int64_t rb1 = 64, rb2 = 64;
  std::vector<int64_t> used;
  for (int64_t e = 0; e < E; ++e)
    if (offs[e + 1] > offs[e]) used.push_back(e);
  const int64_t nb1 = (I + rb1 - 1) / rb1, nb2 = (H + rb2 - 1) / rb2;
  const int64_t tasks1 = static_cast<int64_t>(used.size()) * nb1;
  const int64_t tasks2 = static_cast<int64_t>(used.size()) * nb2;
  const bool parallel = num_threads > 1 &&
                        static_cast<int64_t>(used.size()) * 3 * I * H * int64_t(sizeof(W)) >=
                            (int64_t(1) << 19);
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
    // Phase 1: gate and up rows j, j+1 together; act = silu(gate) * up.
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks1; ++task) {
      const int64_t e = used[task / nb1];
      const int64_t j0 = (task % nb1) * rb1, j1 = std::min(I, j0 + rb1);
      const W* we = w13p != nullptr ? nullptr : w13 + e * 2 * I * H;
#if DISAGG_HAVE_AVX512_PATH
      if (w13p != nullptr || (avx512 && offs[e + 1] - offs[e] >= kPanelMinTokens)) {
        // Many tokens (or packed weights): the same sums through 64-row panels (dot_tile.h).
        float* wp = w13p != nullptr ? nullptr : panel_buf(H);
        const int64_t base = offs[e];
        for (int64_t p0 = j0; p0 < j1; p0 += kPanelRows) {
          const int64_t nr = std::min<int64_t>(kPanelRows, j1 - p0);
          for (int half = 0; half < 2; ++half) {  // gate rows, then up rows
            auto a_of = [&](int64_t t) { return xrow0 + (order[base + t] / K) * H; };
            auto emit = [&](int64_t t, const float* v) {
              float* ar = act + (base + t) * 2 * I + half * I + p0;
              for (int64_t r = 0; r < nr; ++r) ar[r] = v[r];
            };
            if (w13p != nullptr) {
              const int64_t pe = moe_panel_elems(H), np = (I + kPanelRows - 1) / kPanelRows;
              const W* pk = w13p + ((e * 2 + half) * np + p0 / kPanelRows) * pe;
              // Fetch the panel read two later: this half's next row block.
              const bool has_nx = p0 + kPanelRows < I;
              panel_gemm(offs[e + 1] - base, H, pk, a_of, emit, has_nx ? pk + pe : nullptr,
                         pe * int64_t(sizeof(W)));
              continue;
            }
            pack_panel_512<kPanelR>(we + half * I * H, I, H, p0, wp);
            // packed next: these rows of the up half, or the gate half's next rows
            const int64_t nxt = half == 0 ? I + p0 : p0 + kPanelRows;
            const int64_t nxt_rows = std::min<int64_t>(kPanelRows, (half == 0 ? 2 * I : I) - nxt);
            panel_gemm(offs[e + 1] - base, H, static_cast<const float*>(wp), a_of, emit,
                       we + nxt * H, std::max<int64_t>(0, nxt_rows) * H * int64_t(sizeof(W)));
          }
        }
      } else
#endif
      // Token blocks keep their activation rows in L1 while the block's weight rows (in
      // L2 after the first block) go by; only the first block prefetches weights.
      for (int64_t tb = offs[e]; tb < offs[e + 1]; tb += kTokBlock) {
      const int64_t te = std::min(offs[e + 1], tb + kTokBlock);
      for (int64_t j = j0; j < j1; j += 2) {
        const int64_t j2 = std::min(j + 1, I - 1);  // odd I: the last pair repeats a row
        const W* w[4] = {we + j * H, we + j2 * H, we + (I + j) * H, we + (I + j2) * H};
        const int64_t jn = std::min(j + 4, I - 1), jn2 = std::min(j + 5, I - 1);
        const W* pf[4] = {we + jn * H, we + jn2 * H, we + (I + jn) * H, we + (I + jn2) * H};
        for (int64_t t0 = tb; t0 < te; t0 += kTokTile) {
          const int nt = static_cast<int>(std::min<int64_t>(kTokTile, te - t0));
          const float* a[kTokTile];
          for (int i = 0; i < nt; ++i) a[i] = xrow0 + (order[t0 + i] / K) * H;
          float o[kTokTile][4];
          dot_tile(avx512, a, nt, w, H, o, t0 == offs[e] ? pf : nullptr);
          for (int i = 0; i < nt; ++i) {
            float* ar = act + (t0 + i) * 2 * I;
            ar[j] = o[i][0];
            ar[I + j] = o[i][2];
            if (j + 1 < I) {
              ar[j + 1] = o[i][1];
              ar[I + j + 1] = o[i][3];
            }
          }
        }
      }
      }
      for (int64_t t = offs[e]; t < offs[e + 1]; ++t) {
        float* ar = act + t * 2 * I;
        silu_mul(avx512, ar + j0, ar + I + j0, j1 - j0);
      }
    }
    // Phase 2: down projection rows m..m+3 for every token of the expert.
#pragma omp for schedule(static)
    for (int64_t task = 0; task < tasks2; ++task) {
      const int64_t e = used[task / nb2];
      const int64_t m0 = (task % nb2) * rb2, m1 = std::min(H, m0 + rb2);
      const W* we = w2p != nullptr ? nullptr : w2 + e * H * I;
#if DISAGG_HAVE_AVX512_PATH
      if (w2p != nullptr || (avx512 && offs[e + 1] - offs[e] >= kPanelMinTokens)) {
        float* wp = w2p != nullptr ? nullptr : panel_buf(I);
        const int64_t base = offs[e];
        for (int64_t p0 = m0; p0 < m1; p0 += kPanelRows) {
          const int64_t nr = std::min<int64_t>(kPanelRows, m1 - p0);
          auto a_of = [&](int64_t t) { return static_cast<const float*>(act + (base + t) * 2 * I); };
          auto emit = [&](int64_t t, const float* v) {
            float* yr = y + order[base + t] * H + p0;
            for (int64_t r = 0; r < nr; ++r) yr[r] = v[r];
          };
          if (w2p != nullptr) {
            const int64_t pe = moe_panel_elems(I), np = (H + kPanelRows - 1) / kPanelRows;
            const W* pk = w2p + (e * np + p0 / kPanelRows) * pe;
            panel_gemm(offs[e + 1] - base, I, pk, a_of, emit,
                       p0 + 2 * kPanelRows < H ? pk + 2 * pe : nullptr, pe * int64_t(sizeof(W)));
            continue;
          }
          pack_panel_512<kPanelR>(we, H, I, p0, wp);
          const int64_t nxt_rows = std::min<int64_t>(kPanelRows, H - (p0 + kPanelRows));
          panel_gemm(offs[e + 1] - base, I, static_cast<const float*>(wp), a_of, emit,
                     we + (p0 + kPanelRows) * I,
                     std::max<int64_t>(0, nxt_rows) * I * int64_t(sizeof(W)));
        }
        continue;
      }
#endif
      for (int64_t tb = offs[e]; tb < offs[e + 1]; tb += kTokBlock) {
      const int64_t te = std::min(offs[e + 1], tb + kTokBlock);
      for (int64_t m = m0; m < m1; m += 4) {
        const W* w[4];
        const W* pf[4];
        for (int r = 0; r < 4; ++r) {
          w[r] = we + std::min(m + r, H - 1) * I;
          pf[r] = we + std::min(m + 8 + r, H - 1) * I;
        }
        for (int64_t t0 = tb; t0 < te; t0 += kTokTile) {
          const int nt = static_cast<int>(std::min<int64_t>(kTokTile, te - t0));
          const float* a[kTokTile];
          for (int i = 0; i < nt; ++i) a[i] = act + (t0 + i) * 2 * I;
          float o[kTokTile][4];
          dot_tile(avx512, a, nt, w, I, o, t0 == offs[e] ? pf : nullptr);
          for (int i = 0; i < nt; ++i) {
            float* yr = y + order[t0 + i] * H;
            for (int r = 0; r < 4 && m + r < H; ++r) yr[m + r] = o[i][r];
          }
        }
      }
      }
    }
    // Combine: each token's assignments in k order (the same sum however work was split).
#pragma omp for schedule(static)
    for (int64_t t = 0; t < Tn; ++t) {
      T* o = out + t * H;
      float* acc = nullptr;
      int64_t first = -1;
      for (int64_t k = 0; k < K; ++k)
        if (ids[t * K + k] >= 0) {
          first = k;
          break;
        }
      if (first < 0) {
        for (int64_t h = 0; h < H; ++h) o[h] = from_float<T>(0.f);
        continue;
      }
      acc = y + (t * K + first) * H;
      const float w0 = weights[t * K + first];
      for (int64_t h = 0; h < H; ++h) acc[h] *= w0;
      for (int64_t k = first + 1; k < K; ++k) {
        if (ids[t * K + k] < 0) continue;
        const float wk = weights[t * K + k];
        const float* yk = y + (t * K + k) * H;
#pragma omp simd
        for (int64_t h = 0; h < H; ++h) acc[h] += wk * yk[h];
      }
      for (int64_t h = 0; h < H; ++h) o[h] = from_float<T>(acc[h]);
    }
  }
  return Status::kOk;
}

}  // namespace disagg
