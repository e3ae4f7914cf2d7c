// Entry points of the CUTLASS grouped GEMM (grouped_gemm.cu). No CUTLASS or torch types here, so
// the torch-facing op (csrc/cuda/expert_gemm.cu) includes this without the CUTLASS headers; the
// CUTLASS translation unit is compiled without torch's.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace disagg {
namespace cuda {
namespace grouped_gemm {

// Bytes of device workspace run_bf16 needs for num_experts problems.
size_t workspace_bytes(int num_experts);

// For every expert e, rows [off[e], off[e+1]) of d [m_total, n] = a [m_total, k] rows @ w[e]^T,
// w [E, n, k]; bf16 in and out, float accumulation. expert_offsets [E+1] int32 on the device
// (clamped to [0, m_total] and made non-decreasing on the device; rows outside are not written).
// n and k multiples of 8, pointers 16-byte aligned. No host synchronization.
cudaError_t run_bf16(const void* a, const void* w, void* d, const int32_t* expert_offsets,
                     int num_experts, int64_t m_total, int n, int k, void* workspace,
                     size_t workspace_size, cudaStream_t stream);

// Hopper path (grouped_gemm_sm90.cu, built when the architectures include 90a): same contract.
// sm90_selected() is true on a compute capability 9.x device unless the environment variable
// DISAGG_GROUPED_GEMM is "sm80" (read at every call, so tests can compare both paths).
bool sm90_selected();
size_t workspace_bytes_sm90(int num_experts);
cudaError_t run_bf16_sm90(const void* a, const void* w, void* d, const int32_t* expert_offsets,
                          int num_experts, int64_t m_total, int n, int k, void* workspace,
                          size_t workspace_size, cudaStream_t stream);

}  // namespace grouped_gemm
}  // namespace cuda
}  // namespace disagg
