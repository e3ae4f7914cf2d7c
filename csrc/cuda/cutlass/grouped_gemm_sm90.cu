// Expert FFN grouped GEMM, Hopper path (CUTLASS 3.x: TMA loads, WGMMA, warp-specialized
// cooperative kernel over an array of problems). Same contract as grouped_gemm.cu's SM80 path:
// for every expert e, D[off[e]:off[e+1], :] = A[off[e]:off[e+1], :] @ W[e]^T, bf16 in and out,
// float accumulation, problems built on the device from expert_offsets (no host sync; the tile
// scheduler reads the problem shapes on the device).
//
// Compiled only when the build targets sm_90a (DISAGG_CUDA_ARCHS contains 90a); chosen at run
// time on a compute capability 9.x device unless DISAGG_GROUPED_GEMM=sm80.
#include "grouped_gemm.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace disagg {
namespace cuda {
namespace grouped_gemm {
namespace sm90 {

using namespace cute;

using Element = cutlass::bfloat16_t;
using Accumulator = float;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) each
using LayoutA = cutlass::layout::RowMajor;     // tokens [m, K]
using LayoutB = cutlass::layout::ColumnMajor;  // W[e] [N, K] row-major = K x N column-major
using LayoutD = cutlass::layout::RowMajor;     // out [m, N]
constexpr int kAlign = 128 / cutlass::sizeof_bits<Element>::value;
using TileShape = Shape<_128, _128, _64>;
using ClusterShape = Shape<_1, _1, _1>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator, Element,
    LayoutD*, kAlign, Element, LayoutD*, kAlign,
    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<Element, Accumulator>>::CollectiveOp;

using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element,
    LayoutB*, kAlign, Accumulator, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<
        static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
using StrideA = typename Kernel::InternalStrideA;
using StrideB = typename Kernel::InternalStrideB;
using StrideC = typename Kernel::InternalStrideC;
using StrideD = typename Kernel::InternalStrideD;
using Shape3 = typename ProblemShape::UnderlyingProblemShape;

// Every operand has a unit stride along its contiguous mode (1) and a dynamic leading
// dimension (mode 0): the setup kernel sets only the latter.
static_assert(is_static<decltype(get<1>(StrideA{}))>::value, "A must be K-contiguous");
static_assert(is_static<decltype(get<1>(StrideB{}))>::value, "B must be K-contiguous");
static_assert(is_static<decltype(get<1>(StrideD{}))>::value, "D must be N-contiguous");

// Device arrays of the grouped kernel, carved from the caller's workspace (256-byte aligned
// pieces), then CUTLASS's own workspace.
struct Layout {
  size_t shapes = 0, ptr_a = 0, ptr_b = 0, ptr_d = 0, sa = 0, sb = 0, sd = 0, cutlass = 0,
         bytes = 0;
};

inline size_t up(size_t x) { return (x + 255) / 256 * 256; }

typename Gemm::Arguments make_args(int num_experts, Shape3* shapes, const Element** pa,
                                   StrideA* sa, const Element** pb, StrideB* sb, Element** pd,
                                   StrideD* sd, int device, int sm_count) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {num_experts, shapes, nullptr},  // problem shapes on the device only
      {pa, sa, pb, sb},
      {{}, const_cast<const Element**>(pd), sd, pd, sd},  // C = D with beta = 0: never read
      hw};
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  return args;
}

Layout layout(int num_experts, int device, int sm_count) {
  Layout l;
  size_t o = 0;
  l.shapes = o; o += up(sizeof(Shape3) * num_experts);
  l.ptr_a = o; o += up(sizeof(void*) * num_experts);
  l.ptr_b = o; o += up(sizeof(void*) * num_experts);
  l.ptr_d = o; o += up(sizeof(void*) * num_experts);
  l.sa = o; o += up(sizeof(StrideA) * num_experts);
  l.sb = o; o += up(sizeof(StrideB) * num_experts);
  l.sd = o; o += up(sizeof(StrideD) * num_experts);
  l.cutlass = o;
  auto args = make_args(num_experts, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                        nullptr, device, sm_count);
  o += up(Gemm::get_workspace_size(args));
  l.bytes = o;
  return l;
}

__global__ void setup_kernel(const Element* a, const Element* w, Element* d,
                             const int32_t* __restrict__ expert_offsets, int num_experts,
                             int64_t m_total, int n, int k, Shape3* shapes, const Element** pa,
                             const Element** pb, Element** pd, StrideA* sa, StrideB* sb,
                             StrideD* sd) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= num_experts) return;
  auto clamp = [m_total](int64_t v) { return v < 0 ? 0 : (v > m_total ? m_total : v); };
  const int64_t begin = clamp(expert_offsets[e]);
  int64_t m = clamp(expert_offsets[e + 1]) - begin;
  if (m < 0) m = 0;
  shapes[e] = Shape3(static_cast<int>(m), n, k);
  pa[e] = a + begin * k;
  pb[e] = w + static_cast<int64_t>(e) * n * k;
  pd[e] = d + begin * n;
  StrideA s_a{};
  get<0>(s_a) = k;
  StrideB s_b{};
  get<0>(s_b) = k;
  StrideD s_d{};
  get<0>(s_d) = n;
  sa[e] = s_a;
  sb[e] = s_b;
  sd[e] = s_d;
}

int sm_count_of(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 0;
  }
  return n;
}

}  // namespace sm90

bool sm90_selected() {
  const char* pick = std::getenv("DISAGG_GROUPED_GEMM");
  if (pick != nullptr && std::strcmp(pick, "sm80") == 0) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return major == 9;
}

size_t workspace_bytes_sm90(int num_experts) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return sm90::layout(num_experts, device, sm90::sm_count_of(device)).bytes;
}

cudaError_t run_bf16_sm90(const void* a, const void* w, void* d, const int32_t* expert_offsets,
                          int num_experts, int64_t m_total, int n, int k, void* workspace,
                          size_t workspace_size, cudaStream_t stream) {
  using namespace sm90;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const int sms = sm_count_of(device);
  const Layout l = layout(num_experts, device, sms);
  if (num_experts < 1 || n % kAlign != 0 || k % kAlign != 0 || workspace_size < l.bytes)
    return cudaErrorInvalidValue;
  auto* base = static_cast<unsigned char*>(workspace);
  auto* shapes = reinterpret_cast<Shape3*>(base + l.shapes);
  auto** pa = reinterpret_cast<const Element**>(base + l.ptr_a);
  auto** pb = reinterpret_cast<const Element**>(base + l.ptr_b);
  auto** pd = reinterpret_cast<Element**>(base + l.ptr_d);
  auto* sa = reinterpret_cast<StrideA*>(base + l.sa);
  auto* sb = reinterpret_cast<StrideB*>(base + l.sb);
  auto* sd = reinterpret_cast<StrideD*>(base + l.sd);
  setup_kernel<<<(num_experts + 127) / 128, 128, 0, stream>>>(
      static_cast<const Element*>(a), static_cast<const Element*>(w), static_cast<Element*>(d),
      expert_offsets, num_experts, m_total, n, k, shapes, pa, pb, pd, sa, sb, sd);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  auto args = make_args(num_experts, shapes, pa, sa, pb, sb, pd, sd, device, sms);
  Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return cudaErrorInvalidValue;
  if (gemm.initialize(args, base + l.cutlass, stream) != cutlass::Status::kSuccess)
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
