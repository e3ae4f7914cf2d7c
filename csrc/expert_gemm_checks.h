// Argument checks of expert_gemm and its one-matmul-per-expert path, shared by the CPU op and
// the CUDA op (which falls back to it where no grouped-GEMM kernel applies).
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace disagg {

inline void check_expert_gemm(const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& offsets, const char* op) {
  check_dim(x, 2, op, "x", "[M, K]");
  check_float(x, op, "x");
  check_dim(w, 3, op, "w", "[E, N, K]");
  check_dtype(w, x.scalar_type(), op, "w");
  check_dim(offsets, 1, op, "expert_offsets", "[E + 1]");
  check_index(offsets, op, "expert_offsets");
  check_same_device(x, w, op, "w");
  check_same_device(x, offsets, op, "expert_offsets");
  DISAGG_CHECK_VALUE(w.size(2) == x.size(1), op, "w's K (dim 2) must equal x's K ", x.size(1),
                     ", got ", w.size(2));
  DISAGG_CHECK_VALUE(offsets.size(0) == w.size(0) + 1, op, "expert_offsets must have E+1=",
                     w.size(0) + 1, " entries, got ", offsets.size(0));
}

// Rows [offsets[e], offsets[e+1]) of x times w[e]^T, one at::mm_out per non-empty expert; the
// offsets are validated on the host (so a CUDA caller pays one copy of E+1 integers).
inline at::Tensor expert_gemm_per_expert(const at::Tensor& x, const at::Tensor& w,
                                         const at::Tensor& expert_offsets, const char* op) {
  const int64_t M = x.size(0), E = w.size(0);
  const at::Tensor off = expert_offsets.to(at::kCPU, at::kLong).contiguous();
  const int64_t* o = off.data_ptr<int64_t>();
  DISAGG_CHECK_VALUE(o[0] >= 0 && o[E] <= M, op, "expert_offsets must lie in [0, M=", M,
                     "], got [", o[0], ", ", o[E], "]");
  for (int64_t e = 0; e < E; ++e)
    DISAGG_CHECK_VALUE(o[e] <= o[e + 1], op, "expert_offsets must be non-decreasing, got ", o[e],
                       " then ", o[e + 1], " at expert ", e);
  at::Tensor out = at::zeros({M, w.size(1)}, x.options());
  for (int64_t e = 0; e < E; ++e) {
    if (o[e + 1] == o[e]) continue;
    at::Tensor seg = out.narrow(0, o[e], o[e + 1] - o[e]);
    at::mm_out(seg, x.narrow(0, o[e], o[e + 1] - o[e]), w[e].t());
  }
  return out;
}

}  // namespace disagg
