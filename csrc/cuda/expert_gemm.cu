// CUDA implementation of expert_gemm. bf16 with N and K multiples of 8 runs the CUTLASS grouped
// GEMM (csrc/cuda/cutlass, built under DISAGG_CUTLASS; the Hopper TMA/WGMMA kernel on compute
// capability 9.x when built for 90a, the SM80 kernel otherwise): per-expert problems are built from
// expert_offsets on the device, nothing synchronizes, and offsets out of range are clamped
// there (no row outside x or the output is touched). Other dtypes or shapes, or a build without
// CUTLASS, run one torch matmul per expert after copying the offsets to the host (synchronizes,
// and raises the CPU op's errors for bad offsets).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda/cuda_checks.h"
#include "expert_gemm_checks.h"
#ifdef DISAGG_WITH_CUTLASS
#include "cuda/cutlass/grouped_gemm.h"
#endif

namespace disagg {
namespace {

at::Tensor expert_gemm_cuda_op(const at::Tensor& x, const at::Tensor& w,
                               const at::Tensor& expert_offsets) {
  const char* op = "expert_gemm";
  check_expert_gemm(x, w, expert_offsets, op);
  c10::cuda::CUDAGuard guard(x.device());
#ifdef DISAGG_WITH_CUTLASS
  const int64_t M = x.size(0), N = w.size(1), K = x.size(1), E = w.size(0);
  const bool cutlass_ok = x.scalar_type() == at::kBFloat16 && N % 8 == 0 && K % 8 == 0 &&
                          N <= INT32_MAX && K <= INT32_MAX && E <= INT32_MAX && M <= INT32_MAX &&
                          M > 0 && E > 0;
  if (cutlass_ok) {
    const at::Tensor xc = x.contiguous(), wc = w.contiguous();
    const at::Tensor off = expert_offsets.to(at::kInt).contiguous();
    // rows outside [offsets[0], offsets[E]) are defined as zero: the GEMM writes the rest
    at::Tensor out = at::zeros({M, N}, x.options());
    namespace gg = cuda::grouped_gemm;
    auto ws_of = &gg::workspace_bytes;
    auto run = &gg::run_bf16;
#ifdef DISAGG_WITH_CUTLASS_SM90
    if (gg::sm90_selected()) {
      ws_of = &gg::workspace_bytes_sm90;
      run = &gg::run_bf16_sm90;
    }
#endif
    const size_t ws_bytes = ws_of(static_cast<int>(E));
    at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    const bool aligned = reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(wc.data_ptr()) % 16 == 0;
    if (aligned) {
      const cudaError_t err =
          run(xc.data_ptr(), wc.data_ptr(), out.data_ptr(), off.data_ptr<int32_t>(),
              static_cast<int>(E), M, static_cast<int>(N), static_cast<int>(K), ws.data_ptr(),
              ws_bytes, c10::cuda::getCurrentCUDAStream());
      check_cuda(err, op);
      return out;
    }
  }
#endif
  return expert_gemm_per_expert(x, w, expert_offsets, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CUDA, m) { m.impl("expert_gemm", &expert_gemm_cuda_op); }

}  // namespace disagg
