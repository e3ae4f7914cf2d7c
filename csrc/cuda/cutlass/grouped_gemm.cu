// Expert FFN grouped GEMM over the expert-grouped layout (the portable CUTLASS 2.x path, SM80
// tensor cores, also runs on Hopper): for every expert e,
//   D[off[e]:off[e+1], :] = A[off[e]:off[e+1], :] @ W[e]^T
// with A [rows, K] bf16 row-major (tokens in expert order, as moe_permute writes them), W
// [E, N, K] bf16 (nn.Linear's [out, in] per expert) and D [rows, N] bf16, float accumulation.
//
// Problem sizes and pointers are built on the device from expert_offsets by a small kernel and
// the grouped kernel schedules its tiles on the device (GroupScheduleMode::kDeviceOnly), so no
// host synchronization is needed and the call can be captured in a CUDA graph.
//
// Built into the extension under DISAGG_CUTLASS (cmake/cuda.cmake) as the bf16 path of the
// expert_gemm op on CUDA (csrc/cuda/expert_gemm.cu), compiled without torch's headers; also
// compiled alone by scripts/cutlass_check.sh. A Hopper (SM90 TMA/WGMMA) variant is not written yet.
#include "grouped_gemm.h"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"

namespace disagg {
namespace cuda {
namespace grouped_gemm {

using Element = cutlass::bfloat16_t;
using Accumulator = float;
constexpr int kAlignment = 128 / cutlass::sizeof_bits<Element>::value;  // 8 bf16 = 16 bytes

using GemmKernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
    Element, cutlass::layout::RowMajor, cutlass::ComplexTransform::kNone, kAlignment,
    // W[e] is [N, K] row-major, i.e. the K x N operand B in column-major order.
    Element, cutlass::layout::ColumnMajor, cutlass::ComplexTransform::kNone, kAlignment,
    Element, cutlass::layout::RowMajor, Accumulator, cutlass::arch::OpClassTensorOp,
    cutlass::arch::Sm80, cutlass::gemm::GemmShape<128, 128, 32>,
    cutlass::gemm::GemmShape<64, 64, 32>, cutlass::gemm::GemmShape<16, 8, 16>,
    cutlass::epilogue::thread::LinearCombination<Element, kAlignment, Accumulator, Accumulator>,
    cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle, 4,
    cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
using Gemm = cutlass::gemm::device::GemmGrouped<GemmKernel>;
using LongIndex = typename cutlass::layout::RowMajor::Stride::LongIndex;

// Device arrays the grouped kernel reads, carved from one caller-provided workspace.
struct Workspace {
  size_t problems = 0, ptr_a = 0, ptr_b = 0, ptr_c = 0, lda = 0, ldb = 0, ldc = 0, bytes = 0;
};

inline Workspace workspace_layout(int num_experts) {
  auto up = [](size_t x) { return (x + 255) / 256 * 256; };
  Workspace w;
  size_t o = 0;
  w.problems = o; o += up(sizeof(cutlass::gemm::GemmCoord) * num_experts);
  w.ptr_a = o; o += up(sizeof(void*) * num_experts);
  w.ptr_b = o; o += up(sizeof(void*) * num_experts);
  w.ptr_c = o; o += up(sizeof(void*) * num_experts);
  w.lda = o; o += up(sizeof(LongIndex) * num_experts);
  w.ldb = o; o += up(sizeof(LongIndex) * num_experts);
  w.ldc = o; o += up(sizeof(LongIndex) * num_experts);
  w.bytes = o;
  return w;
}

namespace {

__global__ void setup_kernel(const Element* a, const Element* w, Element* d,
                             const int32_t* __restrict__ expert_offsets, int num_experts,
                             int64_t m_total, int n, int k, cutlass::gemm::GemmCoord* problems, Element** ptr_a,
                             Element** ptr_b, Element** ptr_c, LongIndex* lda, LongIndex* ldb,
                             LongIndex* ldc) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= num_experts) return;
  // Offsets are not checked on the host (that would synchronize): clamp them into [0, m_total]
  // and never let a problem reach before its start, so no row outside `a`/`d` is touched.
  auto clamp = [m_total](int64_t v) { return v < 0 ? 0 : (v > m_total ? m_total : v); };
  const int64_t begin = clamp(expert_offsets[e]);
  int64_t m = clamp(expert_offsets[e + 1]) - begin;
  if (m < 0) m = 0;
  problems[e] = cutlass::gemm::GemmCoord(static_cast<int>(m), n, k);
  ptr_a[e] = const_cast<Element*>(a) + begin * k;
  ptr_b[e] = const_cast<Element*>(w) + static_cast<int64_t>(e) * n * k;
  ptr_c[e] = d + begin * n;
  lda[e] = k;
  ldb[e] = k;
  ldc[e] = n;
}

}  // namespace

size_t workspace_bytes(int num_experts) { return workspace_layout(num_experts).bytes; }

// D = per-expert A @ W[e]^T as above. n and k must be multiples of 8 (16-byte accesses);
// workspace holds workspace_bytes(num_experts) bytes, 256-byte aligned.
cudaError_t run_bf16(const void* a_, const void* w_, void* d_, const int32_t* expert_offsets,
                     int num_experts, int64_t m_total, int n, int k, void* workspace,
                     size_t workspace_size, cudaStream_t stream) {
  const auto* a = static_cast<const Element*>(a_);
  const auto* w = static_cast<const Element*>(w_);
  auto* d = static_cast<Element*>(d_);
  const Workspace ws = workspace_layout(num_experts);
  if (num_experts < 1 || n % kAlignment != 0 || k % kAlignment != 0 ||
      workspace_size < ws.bytes)
    return cudaErrorInvalidValue;
  unsigned char* base = static_cast<unsigned char*>(workspace);
  auto* problems = reinterpret_cast<cutlass::gemm::GemmCoord*>(base + ws.problems);
  auto** ptr_a = reinterpret_cast<Element**>(base + ws.ptr_a);
  auto** ptr_b = reinterpret_cast<Element**>(base + ws.ptr_b);
  auto** ptr_c = reinterpret_cast<Element**>(base + ws.ptr_c);
  auto* lda = reinterpret_cast<LongIndex*>(base + ws.lda);
  auto* ldb = reinterpret_cast<LongIndex*>(base + ws.ldb);
  auto* ldc = reinterpret_cast<LongIndex*>(base + ws.ldc);
  setup_kernel<<<(num_experts + 127) / 128, 128, 0, stream>>>(a, w, d, expert_offsets,
                                                             num_experts, m_total, n, k, problems,
                                                             ptr_a, ptr_b, ptr_c, lda, ldb, ldc);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // One full wave of persistent blocks; the kernel walks the tiles of all problems itself.
  const int blocks = Gemm::sufficient();
  if (blocks <= 0) return cudaErrorInvalidConfiguration;
  typename Gemm::EpilogueOutputOp::Params epilogue(1.0f, 0.0f);
  typename Gemm::Arguments args(problems, num_experts, blocks, epilogue, ptr_a, ptr_b, ptr_c,
                                ptr_c, lda, ldb, ldc, ldc);
  Gemm gemm;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess)
    return cudaErrorInvalidValue;
  if (gemm.run(stream) != cutlass::Status::kSuccess) {
    err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  }
  return cudaGetLastError();
}

}  // namespace grouped_gemm
}  // namespace cuda
}  // namespace disagg
