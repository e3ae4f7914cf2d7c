// CPU implementation of expert_gemm: the expert-grouped matmul of the MoE FFN as one torch
// matmul per expert segment (ATen's CPU GEMM is the kernel here; the CUDA op has its own).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "expert_gemm_checks.h"

namespace disagg {
namespace {

at::Tensor expert_gemm_cpu_op(const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& expert_offsets) {
  const char* op = "expert_gemm";
  check_expert_gemm(x, w, expert_offsets, op);
  const int64_t M = x.size(0), E = w.size(0);
  const at::Tensor off = expert_offsets.to(at::kLong).contiguous();
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

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) { m.impl("expert_gemm", &expert_gemm_cpu_op); }

}  // namespace disagg
