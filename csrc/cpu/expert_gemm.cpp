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
  return expert_gemm_per_expert(x, w, expert_offsets, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) { m.impl("expert_gemm", &expert_gemm_cpu_op); }

}  // namespace disagg
