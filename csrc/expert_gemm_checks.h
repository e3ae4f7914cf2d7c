// Argument checks of expert_gemm, shared by the CPU and CUDA ops.
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

}  // namespace disagg
