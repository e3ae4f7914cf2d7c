// MoE routing kernels on the CPU (torch-free): fused scoring + (grouped) top-k + capacity, and
// the expert-grouped dispatch layout, permute and weighted combine.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "disagg/common.h"
#include "disagg/cpu_features.h"
#include "disagg/moe_combine_x86.h"
#include "disagg/route_x86.h"
#include "disagg/routing_params.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace disagg {

namespace detail {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// True when experts are ranked by their logits: softmax and sigmoid are monotone, so without a
// selection bias or groups the logit order is the score order -- minus the spurious ties that
// exp underflow creates -- and only the k chosen scores need computing.
inline bool ranks_by_logits(const RouteParams& p) {
  return p.bias == nullptr && !(p.num_groups > 1 && p.topk_groups < p.num_groups);
}

// Loads a row as float with NaN -> -inf; returns its maximum.
template <typename T>
inline float load_row(const T* x, int64_t E, float* out) {
  float mx = kNegInf;
  for (int64_t e = 0; e < E; ++e) {
    const float v = to_float(x[e]);
    out[e] = std::isnan(v) ? kNegInf : v;
    mx = std::max(mx, out[e]);
  }
  return mx;
}

// Unnormalised score u(x): weights are u / Z. Softmax: exp(x - max) (a +inf maximum gives 1 to
// the +inf entries, 0 elsewhere; a -inf maximum gives 0 everywhere). Sigmoid: sigmoid(x).
inline float unnormalised(float x, float mx, Scoring scoring) {
  if (scoring == Scoring::kSigmoid) return 1.0f / (1.0f + std::exp(-x));
  if (mx == kPosInf) return x == kPosInf ? 1.0f : 0.0f;
  if (mx == kNegInf) return 0.0f;
  return std::exp(x - mx);
}

// Sum of u over the row: the softmax denominator (or the number of +inf entries).
inline float unnormalised_sum(const float* xv, int64_t E, float mx, Scoring scoring) {
  float s = 0.0f;
  for (int64_t e = 0; e < E; ++e) s += unnormalised(xv[e], mx, scoring);
  return s;
}

// Ranking values of one token: its logits, or (with bias/groups) score + bias with the experts
// of unchosen groups at -inf. `xv` holds the loaded row, `mx` its maximum.
inline void selection_row(const float* xv, float mx, const RouteParams& p, float* sel,
                          float* gscore, int32_t* gorder, char* keep_group) {
  const int64_t E = p.num_experts;
  if (ranks_by_logits(p)) {
    std::copy(xv, xv + E, sel);
    return;
  }
  const float S = p.scoring == Scoring::kSoftmax ? unnormalised_sum(xv, E, mx, p.scoring) : 1.0f;
  const float inv = S > 0.0f ? 1.0f / S : 0.0f;
  for (int64_t e = 0; e < E; ++e)
    sel[e] = unnormalised(xv[e], mx, p.scoring) * inv + (p.bias ? p.bias[e] : 0.0f);
  if (p.num_groups <= 1 || p.topk_groups >= p.num_groups) return;
  const int64_t G = p.num_groups, per = E / G;
  for (int64_t g = 0; g < G; ++g) {
    const float* s = sel + g * per;
    if (p.group_score == GroupScore::kMax || per < 2) {
      float m = s[0];
      for (int64_t i = 1; i < per; ++i) m = std::max(m, s[i]);
      gscore[g] = m;
    } else {
      float a = kNegInf, b = kNegInf;
      for (int64_t i = 0; i < per; ++i) {
        if (s[i] > a) { b = a; a = s[i]; } else if (s[i] > b) { b = s[i]; }
      }
      gscore[g] = a + b;
    }
    gorder[g] = static_cast<int32_t>(g);
    keep_group[g] = 0;
  }
  std::partial_sort(gorder, gorder + p.topk_groups, gorder + G, [&](int32_t a, int32_t b) {
    return ranks_before(gscore[a], a, gscore[b], b);
  });
  for (int64_t i = 0; i < p.topk_groups; ++i) keep_group[gorder[i]] = 1;
  for (int64_t g = 0; g < G; ++g)
    if (!keep_group[g])
      for (int64_t i = 0; i < per; ++i) sel[g * per + i] = kNegInf;
}

// Indices of the k best entries of sel (ties to the lower index), best first.
inline void topk_row(const float* sel, int64_t E, int64_t k, int32_t* idx, int32_t* scratch) {
  if (k <= 16) {
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e) {
      const float s = sel[e];
      if (n == k && !ranks_before(s, static_cast<int32_t>(e), sel[idx[n - 1]], idx[n - 1])) continue;
      int64_t pos = (n < k) ? n++ : k - 1;
      while (pos > 0 && ranks_before(s, static_cast<int32_t>(e), sel[idx[pos - 1]], idx[pos - 1])) {
        idx[pos] = idx[pos - 1];
        --pos;
      }
      idx[pos] = static_cast<int32_t>(e);
    }
    return;
  }
  std::iota(scratch, scratch + E, 0);
  std::partial_sort(scratch, scratch + k, scratch + E, [&](int32_t a, int32_t b) {
    return ranks_before(sel[a], a, sel[b], b);
  });
  std::copy(scratch, scratch + k, idx);
}

// One pass over a row for the common case (ranking by logits, k <= 16): load, NaN -> -inf and
// insertion into the running top-k, with the k-th value kept in a register so that most experts
// cost a single compare. Equal values keep the earlier (lower) index ahead.
template <typename T>
inline void topk_logits_row(const T* x, int64_t E, int64_t k, float* vals, int32_t* idx) {
  int64_t n = 0;
  float worst = kNegInf;
  for (int64_t e = 0; e < E; ++e) {
    float v = to_float(x[e]);
    if (std::isnan(v)) v = kNegInf;
    if (n == k) {
      if (!(v > worst)) continue;
    }
    int64_t pos = (n < k) ? n++ : k - 1;
    while (pos > 0 && v > vals[pos - 1]) {
      vals[pos] = vals[pos - 1];
      idx[pos] = idx[pos - 1];
      --pos;
    }
    vals[pos] = v;
    idx[pos] = static_cast<int32_t>(e);
    worst = vals[n - 1];
  }
}

}  // namespace detail

// Fused routing. Outputs: weights [T,k] float, ids [T,k] (-1 = dropped), slots [T,k] (position in
// the expert's buffer, -1 = dropped) and counts [E] (assignments each expert received).
//
// Capacity semantics (capacity > 0):
//  * position: for each expert, the first `capacity` assignments in token order are kept.
//  * probs:    for each expert, the `capacity` assignments with the highest weight are kept
//              (ties to the lower token index).
//  Kept assignments take slots 0.. in token order. With overflow == reroute, the dropped
//  assignments are then visited in priority order (position: token order; probs: weight
//  descending) and each moves to the token's best remaining expert by selection score (within
//  the chosen groups, not already held by the token) that still has room, taking the next free
//  slot; its weight becomes that expert's score under the same normalisation as the original
//  choice. Assignments that find no room are dropped: id -1, slot -1, weight 0.
template <typename T>
Status route_cpu(const T* logits, const RouteParams& p, float* weights, int32_t* ids,
                 int32_t* slots, int32_t* counts) {
  const int64_t Tn = p.num_tokens, E = p.num_experts, k = p.top_k;
  if (E < 1 || k < 1 || k > E) return Status::kInvalidArgument;
  if (p.num_groups < 1 || E % p.num_groups != 0 || p.topk_groups < 1 || p.topk_groups > p.num_groups)
    return Status::kInvalidArgument;
  // Per-token row maximum and weight normaliser Z (weight = u / Z * scale), kept for rerouting.
  std::vector<float> row_max(static_cast<size_t>(Tn)), norm(static_cast<size_t>(Tn));

  // Tokens go in groups of kGroup (the SIMD top-k interleaves up to that many rows).
  constexpr int64_t kGroup = 4;
  const int64_t ngroups = (Tn + kGroup - 1) / kGroup;
#pragma omp parallel if (Tn * E > 32768)
  {
    std::vector<float> xv(E), sel(E), gscore(p.num_groups);
    std::vector<int32_t> gorder(p.num_groups), scratch(E), idx_g(kGroup * k);
    std::vector<char> keep_group(p.num_groups);
    std::vector<float> vals_g(kGroup * k);
    const bool fast = detail::ranks_by_logits(p) && k <= 16;
#if DISAGG_X86_SIMD
    const bool simd_topk = fast && E <= x86::kTopkMaxExperts && cpu::use_avx512();
#endif
#pragma omp for schedule(static)
    for (int64_t g = 0; g < ngroups; ++g) {
      const int64_t t_end = std::min(Tn, (g + 1) * kGroup);
      int64_t t = g * kGroup;
      while (t < t_end) {
        // top-k of one or more rows into vals_g / idx_g
        int64_t done = 1;
        float slow_mx = 0.0f;  // the row maximum on the general path
        if (fast) {  // the maximum is the first choice; the row is read once
#if DISAGG_X86_SIMD
          if (simd_topk) {
            done = x86::topk_logits_rows_avx512(logits + t * p.logits_row_stride, p.logits_row_stride,
                                                t_end - t, E, k, vals_g.data(), idx_g.data());
          } else {
            detail::topk_logits_row(logits + t * p.logits_row_stride, E, k, vals_g.data(), idx_g.data());
          }
#else
          detail::topk_logits_row(logits + t * p.logits_row_stride, E, k, vals_g.data(), idx_g.data());
#endif
        } else {
          slow_mx = detail::load_row(logits + t * p.logits_row_stride, E, xv.data());
          detail::selection_row(xv.data(), slow_mx, p, sel.data(), gscore.data(), gorder.data(),
                                keep_group.data());
          detail::topk_row(sel.data(), E, k, idx_g.data(), scratch.data());
          for (int64_t j = 0; j < k; ++j) vals_g[j] = xv[idx_g[j]];
        }
        for (int64_t r = 0; r < done; ++r, ++t) {
          const T* row = logits + t * p.logits_row_stride;
          const float* vals = vals_g.data() + r * k;
          const int32_t* idx = idx_g.data() + r * k;
          float* w = weights + t * k;
          const float mx = fast ? vals[0] : slow_mx;
          float chosen = 0.0f;
          for (int64_t j = 0; j < k; ++j) {
            w[j] = detail::unnormalised(vals[j], mx, p.scoring);
            chosen += w[j];
          }
          float z;
          if (p.renormalize) {
            z = chosen;
          } else if (p.scoring == Scoring::kSoftmax) {
            if (fast) detail::load_row(row, E, xv.data());
            z = detail::unnormalised_sum(xv.data(), E, mx, p.scoring);
          } else {
            z = 1.0f;
          }
          if (!(z > 0.0f)) z = 1.0f;  // a row with no mass keeps zero weights
          row_max[t] = mx;
          norm[t] = z;
          for (int64_t j = 0; j < k; ++j) {
            ids[t * k + j] = idx[j];
            w[j] = w[j] / z * p.routed_scaling_factor;
          }
        }
      }
    }
  }

  std::fill(counts, counts + E, 0);
  const int64_t N = Tn * k;
  if (p.capacity <= 0) {  // dropless: slots are positions in token order
    for (int64_t a = 0; a < N; ++a) slots[a] = counts[ids[a]]++;
    return Status::kOk;
  }
  const int64_t C = p.capacity;
  std::vector<int64_t> dropped;  // assignment indices, filled in priority order
  if (p.drop_policy == DropPolicy::kPosition) {
    for (int64_t a = 0; a < N; ++a) {
      const int32_t e = ids[a];
      if (counts[e] < C) {
        slots[a] = counts[e]++;
      } else {
        slots[a] = -1;
        dropped.push_back(a);
      }
    }
  } else {
    // Bucket the assignments by expert (token order), keep each bucket's C heaviest.
    std::vector<int64_t> start(E + 1, 0), order(N);
    for (int64_t a = 0; a < N; ++a) ++start[ids[a] + 1];
    for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t a = 0; a < N; ++a) order[fill[ids[a]]++] = a;
    std::vector<char> keep(N, 0);
    auto heavier = [&](int64_t a, int64_t b) {
      return weights[a] > weights[b] || (weights[a] == weights[b] && a < b);
    };
    for (int64_t e = 0; e < E; ++e) {
      int64_t* b = order.data() + start[e];
      int64_t* en = order.data() + start[e + 1];
      if (en - b > C) std::nth_element(b, b + C, en, heavier);
      for (int64_t* q = b; q < std::min(en, b + C); ++q) keep[*q] = 1;
    }
    for (int64_t a = 0; a < N; ++a) {
      if (keep[a]) {
        slots[a] = counts[ids[a]]++;
      } else {
        slots[a] = -1;
        dropped.push_back(a);
      }
    }
    if (p.overflow == Overflow::kReroute) std::stable_sort(dropped.begin(), dropped.end(), heavier);
  }

  if (p.overflow == Overflow::kReroute && !dropped.empty()) {
    std::vector<float> xv(E), sel(E), gscore(p.num_groups);
    std::vector<int32_t> gorder(p.num_groups), cand(E);
    std::vector<char> keep_group(p.num_groups);
    const bool grouped = p.num_groups > 1 && p.topk_groups < p.num_groups;
    int64_t cached_token = -1;
    for (int64_t a : dropped) {
      const int64_t t = a / k;
      if (t != cached_token) {
        const float mx = detail::load_row(logits + t * p.logits_row_stride, E, xv.data());
        detail::selection_row(xv.data(), mx, p, sel.data(), gscore.data(), gorder.data(),
                              keep_group.data());
        std::iota(cand.begin(), cand.end(), 0);
        std::sort(cand.begin(), cand.end(), [&](int32_t x, int32_t y) {
          return ranks_before(sel[x], x, sel[y], y);
        });
        cached_token = t;
      }
      int32_t chosen = -1;
      for (int64_t r = 0; r < E && chosen < 0; ++r) {
        const int32_t e = cand[r];
        if (grouped && sel[e] == detail::kNegInf) break;  // the rest lie outside the chosen groups
        if (counts[e] >= C) continue;
        bool held = false;
        for (int64_t j = 0; j < k; ++j) held |= (ids[t * k + j] == e);
        if (!held) chosen = e;
      }
      if (chosen >= 0) {
        ids[a] = chosen;
        slots[a] = counts[chosen]++;
        weights[a] = detail::unnormalised(xv[chosen], row_max[t], p.scoring) / norm[t] *
                     p.routed_scaling_factor;
      }
    }
  }
  for (int64_t a : dropped) {
    if (slots[a] < 0) {
      ids[a] = -1;
      weights[a] = 0.0f;
    }
  }
  return Status::kOk;
}

// ---------------------------------------------------------------------------------------------
// Dispatch layout: from ids [T,k] (-1 = dropped) to an expert-grouped order.
//  compact (capacity == 0): rows of expert e occupy [expert_offsets[e], expert_offsets[e+1]),
//    within an expert in token order; num_rows = T*k, rows past expert_offsets[E] are empty.
//  padded (capacity > 0): row of assignment a is e*C + slots[a]; num_rows = E*C.
// Outputs: dest [T*k] (row of each assignment, -1 if dropped), src [num_rows] (assignment index
// of each row, -1 if empty), expert_offsets [E+1], rank_offsets [R+1] (rank r owns experts
// [r*E/R, (r+1)*E/R) rounded down, i.e. contiguous, balanced split).
template <typename I>
Status moe_layout_cpu(const I* ids, const I* slots, int64_t num_assign, int64_t E, int64_t R,
                      int64_t capacity, int32_t* dest, int32_t* src, int32_t* expert_offsets,
                      int32_t* rank_offsets) {
  const int64_t rows = capacity > 0 ? E * capacity : num_assign;
  std::fill(src, src + rows, -1);
  std::fill(expert_offsets, expert_offsets + E + 1, 0);
  for (int64_t a = 0; a < num_assign; ++a) {
    const int64_t e = static_cast<int64_t>(ids[a]);
    if (e < -1 || e >= E) return Status::kInvalidArgument;
    if (e >= 0) ++expert_offsets[e + 1];
  }
  if (capacity > 0) {
    for (int64_t e = 0; e <= E; ++e) expert_offsets[e] = static_cast<int32_t>(e * capacity);
    for (int64_t a = 0; a < num_assign; ++a) {
      const int64_t e = static_cast<int64_t>(ids[a]);
      if (e < 0) { dest[a] = -1; continue; }
      const int64_t s = static_cast<int64_t>(slots[a]);
      if (s < 0 || s >= capacity) return Status::kInvalidArgument;
      const int64_t row = e * capacity + s;
      if (src[row] != -1) return Status::kInvalidArgument;  // two assignments in one slot
      dest[a] = static_cast<int32_t>(row);
      src[row] = static_cast<int32_t>(a);
    }
  } else {
    for (int64_t e = 0; e < E; ++e) expert_offsets[e + 1] += expert_offsets[e];
    std::vector<int32_t> fill(expert_offsets, expert_offsets + E);
    for (int64_t a = 0; a < num_assign; ++a) {
      const int64_t e = static_cast<int64_t>(ids[a]);
      if (e < 0) { dest[a] = -1; continue; }
      const int32_t row = fill[e]++;
      dest[a] = row;
      src[row] = static_cast<int32_t>(a);
    }
  }
  for (int64_t r = 0; r <= R; ++r) rank_offsets[r] = expert_offsets[(r * E) / R];
  return Status::kOk;
}

// out[r, :] = x[src[r] / k, :] (zeros where src[r] == -1). Rows are independent: parallel.
template <typename T>
Status moe_permute_cpu(const T* x, int64_t num_tokens, int64_t hidden, int64_t x_row_stride,
                       const int32_t* src, int64_t rows, int64_t top_k, T* out) {
  for (int64_t r = 0; r < rows; ++r)
    if (src[r] < -1 || src[r] >= num_tokens * top_k) return Status::kInvalidArgument;
#if DISAGG_X86_SIMD
  const int64_t row_bytes = hidden * static_cast<int64_t>(sizeof(T));
  if (cpu::use_avx512() && rows * row_bytes >= x86::kCombineStreamBytes && row_bytes % 64 == 0 &&
      x86::aligned_to(out, 64)) {
#pragma omp parallel
    {
#ifdef _OPENMP
      const int64_t nth = omp_get_num_threads(), id = omp_get_thread_num();
#else
      const int64_t nth = 1, id = 0;
#endif
      x86::permute_rows_stream(reinterpret_cast<const char*>(x),
                               x_row_stride * static_cast<int64_t>(sizeof(T)), src, top_k,
                               rows * id / nth, rows * (id + 1) / nth, reinterpret_cast<char*>(out),
                               row_bytes);
    }
    return Status::kOk;
  }
#endif
#pragma omp parallel for schedule(static) if (rows * hidden > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    T* o = out + r * hidden;
    if (src[r] < 0) {
      std::memset(static_cast<void*>(o), 0, sizeof(T) * hidden);
    } else {
      std::memcpy(static_cast<void*>(o), x + (src[r] / top_k) * x_row_stride, sizeof(T) * hidden);
    }
  }
  return Status::kOk;
}

namespace detail {

// acc[h] (+)= w * x[h] over one row; the 16-bit loads are plain bit shifts so the loops vectorize.
// The first row adds to 0.0f (as the SIMD and CUDA kernels do, so a -0 product gives +0).
DISAGG_MULTIVERSION static void axpy_row(float* acc, const float* x, float w, int64_t n, bool first) {
  if (first) {
    for (int64_t h = 0; h < n; ++h) acc[h] = 0.0f + w * x[h];
  } else {
    for (int64_t h = 0; h < n; ++h) acc[h] += w * x[h];
  }
}

DISAGG_MULTIVERSION static void axpy_row(float* acc, const bf16_t* x, float w, int64_t n, bool first) {
  const uint16_t* b = reinterpret_cast<const uint16_t*>(x);
  for (int64_t h = 0; h < n; ++h) {
    const uint32_t u = static_cast<uint32_t>(b[h]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    acc[h] = (first ? 0.0f : acc[h]) + w * f;
  }
}

static inline void axpy_row(float* acc, const f16_t* x, float w, int64_t n, bool first) {
  for (int64_t h = 0; h < n; ++h) acc[h] = (first ? 0.0f : acc[h]) + w * to_float(x[h]);
}

static inline void store_row(float* out, const float* acc, int64_t n) {
  std::memcpy(out, acc, sizeof(float) * n);
}

DISAGG_MULTIVERSION static void store_row(bf16_t* out, const float* acc, int64_t n) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  for (int64_t h = 0; h < n; ++h) {
    uint32_t u;
    std::memcpy(&u, &acc[h], sizeof(u));
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // nearest even
    const uint32_t nan = (u >> 16) | 0x40u;                            // quiet NaN
    o[h] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
  }
}

static inline void store_row(f16_t* out, const float* acc, int64_t n) {
  for (int64_t h = 0; h < n; ++h) out[h] = from_float<f16_t>(acc[h]);
}

}  // namespace detail

// out[t, :] = sum_j weights[t,j] * y[dest[t,j], :] accumulated in float; dest == -1 skipped.
template <typename T, typename W, typename O>
Status moe_combine_cpu(const T* y, int64_t rows, int64_t hidden, const int32_t* dest,
                       const W* weights, int64_t num_tokens, int64_t top_k, O* out) {
  for (int64_t a = 0; a < num_tokens * top_k; ++a)
    if (dest[a] < -1 || dest[a] >= rows) return Status::kInvalidArgument;
#if DISAGG_X86_SIMD
  if constexpr (std::is_same<W, float>::value) {
    if (cpu::use_avx2()) {
      const bool nt = num_tokens * hidden * static_cast<int64_t>(sizeof(O)) >= x86::kCombineStreamBytes;
      const bool wide = cpu::use_avx512();
#pragma omp parallel if (num_tokens * hidden > 65536)
      {
#ifdef _OPENMP
        const int64_t nth = omp_get_num_threads(), id = omp_get_thread_num();
#else
        const int64_t nth = 1, id = 0;
#endif
        // contiguous token ranges: each thread's prefetch runs on into its own next token
        const int64_t t0 = num_tokens * id / nth, t1 = num_tokens * (id + 1) / nth;
        if (wide && std::is_same<T, bf16_t>::value && std::is_same<O, bf16_t>::value && cpu::use_avx512bf16()) {
          x86::combine_tokens_avx512<T, O, true>(y, hidden, dest, weights, top_k, t0, t1, out, nt);
        } else if (wide) {
          x86::combine_tokens_avx512(y, hidden, dest, weights, top_k, t0, t1, out, nt);
        } else {
          x86::combine_tokens_avx2(y, hidden, dest, weights, top_k, t0, t1, out, nt);
        }
      }
      return Status::kOk;
    }
  }
#endif
#pragma omp parallel if (num_tokens * hidden > 65536)
  {
    std::vector<float> acc(static_cast<size_t>(std::min<int64_t>(hidden, 1024)));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < num_tokens; ++t) {
      // Tiles of the hidden dim keep the accumulator in L1 across the k rows.
      constexpr int64_t kTile = 1024;
      for (int64_t h0 = 0; h0 < hidden; h0 += kTile) {
        const int64_t n = std::min(kTile, hidden - h0);
        // The k rows sit at scattered places: ask for the next token's rows of this tile now,
        // so their cache misses overlap this token's arithmetic.
        if (t + 1 < num_tokens) {
          for (int64_t j = 0; j < top_k; ++j) {
            const int32_t r = dest[(t + 1) * top_k + j];
            if (r < 0) continue;
            const char* p = reinterpret_cast<const char*>(y + static_cast<int64_t>(r) * hidden + h0);
            for (int64_t b = 0; b < n * static_cast<int64_t>(sizeof(T)); b += 64) __builtin_prefetch(p + b);
          }
        }
        bool first = true;
        for (int64_t j = 0; j < top_k; ++j) {
          const int32_t r = dest[t * top_k + j];
          if (r < 0) continue;
          detail::axpy_row(acc.data(), y + static_cast<int64_t>(r) * hidden + h0,
                           to_float(weights[t * top_k + j]), n, first);
          first = false;
        }
        if (first) std::fill(acc.begin(), acc.begin() + n, 0.0f);  // every assignment dropped
        detail::store_row(out + t * hidden + h0, acc.data(), n);
      }
    }
  }
  return Status::kOk;
}

}  // namespace disagg
