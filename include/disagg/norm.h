// Torch-free CPU kernels for RMSNorm, plain and fused with the residual add that precedes it
// in a pre-norm transformer (one pass over the rows instead of an add and a norm).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "disagg/common.h"
#include "disagg/cpu_vec.h"

namespace disagg {

namespace norm_detail {

// Rows of H float32 values in `r`: out = w * to_T(r * rsqrt(mean(r^2) + eps)), rounded as HF's
// RMSNorm does (normalise in float32, cast to T, then scale in T).
template <typename T>
static inline void norm_row_scalar(const float* r, const T* w, int64_t H, float eps, T* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t h = 0; h < H; ++h) ss += r[h] * r[h];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
  for (int64_t h = 0; h < H; ++h)
    out[h] = from_float<T>(to_float(w[h]) * to_float(from_float<T>(r[h] * inv)));
}

#if DISAGG_HAVE_AVX512_PATH
// float32 only (16-bit types take the scalar path, whose double rounding matches HF).
DISAGG_AVX512 static void add_norm_rows_f32_avx512(float* res, const float* x, const float* w,
                                                   int64_t N, int64_t H, float eps, float* out) {
  for (int64_t n = 0; n < N; ++n) {
    float* r = res + n * H;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t h = 0; h < H; h += 16) {
      const __mmask16 m = v512::tail_mask(H - h);
      __m512 v = _mm512_maskz_loadu_ps(m, r + h);
      if (x != nullptr) {
        v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, x + n * H + h));
        _mm512_mask_storeu_ps(r + h, m, v);
      }
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const float inv = 1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(H) + eps);
    const __m512 vi = _mm512_set1_ps(inv);
    float* o = out + n * H;
    for (int64_t h = 0; h < H; h += 16) {
      const __mmask16 m = v512::tail_mask(H - h);
      const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, r + h), vi);
      _mm512_mask_storeu_ps(o + h, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + h), v));
    }
  }
}
#endif

}  // namespace norm_detail

// residual [N, H] (in place), x [N, H] (may be null: no add), w [H] -> residual += x (rounded
// to T), then out [N, H] = HF's RMSNorm of the new residual (float32 statistics).
// Returns kInvalidArgument for H <= 0 or a negative / NaN eps.
template <typename T>
Status add_rms_norm_cpu(T* residual, const T* x, const T* w, int64_t N, int64_t H, float eps,
                        T* out) {
  if (H <= 0 || !(eps >= 0.f)) return Status::kInvalidArgument;
#if DISAGG_HAVE_AVX512_PATH
  if constexpr (std::is_same<T, float>::value) {
    if (cpu_has_avx512()) {
      norm_detail::add_norm_rows_f32_avx512(residual, x, w, N, H, eps, out);
      return Status::kOk;
    }
  }
#endif
  std::vector<float> r(H);
  for (int64_t n = 0; n < N; ++n) {
    T* rr = residual + n * H;
    for (int64_t h = 0; h < H; ++h) {
      if (x != nullptr) rr[h] = from_float<T>(to_float(rr[h]) + to_float(x[n * H + h]));
      r[h] = to_float(rr[h]);
    }
    norm_detail::norm_row_scalar(r.data(), w, H, eps, out + n * H);
  }
  return Status::kOk;
}

// out = RMSNorm(x) without touching x.
template <typename T>
Status rms_norm_cpu(const T* x, const T* w, int64_t N, int64_t H, float eps, T* out) {
  if (H <= 0 || !(eps >= 0.f)) return Status::kInvalidArgument;
  // The fused kernel only writes `residual` when it adds, so x may be passed as residual.
  return add_rms_norm_cpu(const_cast<T*>(x), static_cast<const T*>(nullptr), w, N, H, eps, out);
}

}  // namespace disagg
