// Instantiates every launcher of include/disagg/routing.cuh for every storage type, without
// torch, so that template errors in the kernels show up in CI (tests/test_cuda_headers.py)
// instead of only in the full CUDA build.
#include "disagg/routing.cuh"

namespace dc = disagg::cuda;
using disagg::bf16_t;
using disagg::f16_t;

#define DISAGG_INSTANTIATE_FLOAT(T)                                                              \
  template cudaError_t dc::route<T>(const T*, const disagg::RouteParams&, float*, int32_t*,      \
                                    int32_t*, int32_t*, void*, size_t, cudaStream_t);            \
  template cudaError_t dc::moe_permute<T>(const T*, int64_t, int64_t, int64_t, const int32_t*,   \
                                          int64_t, int64_t, T*, cudaStream_t);                   \
  template cudaError_t dc::moe_combine<T, T>(const T*, int64_t, int64_t, const int32_t*,         \
                                             const float*, int64_t, int64_t, T*, cudaStream_t);

DISAGG_INSTANTIATE_FLOAT(float)
DISAGG_INSTANTIATE_FLOAT(bf16_t)
DISAGG_INSTANTIATE_FLOAT(f16_t)

// 16-bit inputs combined into float32 outputs (out_dtype=float32).
template cudaError_t dc::moe_combine<bf16_t, float>(const bf16_t*, int64_t, int64_t,
                                                    const int32_t*, const float*, int64_t,
                                                    int64_t, float*, cudaStream_t);
template cudaError_t dc::moe_combine<f16_t, float>(const f16_t*, int64_t, int64_t, const int32_t*,
                                                   const float*, int64_t, int64_t, float*,
                                                   cudaStream_t);

template cudaError_t dc::moe_layout<int32_t>(const int32_t*, const int32_t*, int64_t, int64_t,
                                             int64_t, int64_t, int32_t*, int32_t*, int32_t*,
                                             int32_t*, void*, size_t, cudaStream_t);
template cudaError_t dc::moe_layout<int64_t>(const int64_t*, const int64_t*, int64_t, int64_t,
                                             int64_t, int64_t, int32_t*, int32_t*, int32_t*,
                                             int32_t*, void*, size_t, cudaStream_t);
