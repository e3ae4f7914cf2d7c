// CUDA implementations of the routing ops: the same argument checks as the CPU ops, then the
// torch-free kernels of include/disagg/routing.cuh on the current stream. Scratch memory comes
// from torch's caching allocator, so nothing here synchronizes and every op can be captured in
// a CUDA graph. Only c10's CUDA headers are used (not ATen/cuda/CUDAContext.h), so building needs
// no cuBLAS/cuSPARSE headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "checks.h"
#include "cuda/cuda_checks.h"
#include "disagg/routing.cuh"
#include "route_params.h"

namespace disagg {
namespace {

void check_on_cuda(const at::Tensor& t, const char* op, const char* name) {
  DISAGG_CHECK_VALUE(t.is_cuda(), op, name, " must be a CUDA tensor, got ", t.device());
}

// Scratch bytes as a uint8 tensor; the caching allocator aligns blocks to at least 256 bytes.
at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cuda_op(
    const at::Tensor& logits, int64_t top_k, c10::string_view scoring,
    const c10::optional<at::Tensor>& bias, int64_t num_groups, int64_t topk_groups,
    c10::string_view group_score, bool renormalize, double routed_scaling_factor,
    double capacity_factor, c10::string_view drop_policy, c10::string_view overflow) {
  const char* op = "route";
  RouteParams p = make_route_params(logits, top_k, std::string(scoring), bias, num_groups,
                                    topk_groups, std::string(group_score), renormalize,
                                    routed_scaling_factor, capacity_factor,
                                    std::string(drop_policy), std::string(overflow));
  check_on_cuda(logits, op, "logits");
  const int64_t T = p.num_tokens, E = p.num_experts;
  DISAGG_CHECK_VALUE(T * top_k <= INT32_MAX, op, "T*top_k must fit in int32, got ", T * top_k);
  c10::cuda::CUDAGuard guard(logits.device());
  auto i32 = logits.options().dtype(at::kInt);
  at::Tensor weights = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, top_k}, i32);
  at::Tensor slots = at::empty({T, top_k}, i32);
  at::Tensor counts = at::empty({E}, i32);
  if (bias.has_value()) p.bias = bias->data_ptr<float>();
  cuda::RouteWorkspace layout;
  check_cuda(cuda::route_workspace(p, &layout), op);
  at::Tensor ws = workspace(layout.bytes, logits);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(logits.scalar_type(), op, [&] {
    return cuda::route<scalar_t>(reinterpret_cast<const scalar_t*>(logits.data_ptr()), p,
                                 weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                                 slots.data_ptr<int32_t>(), counts.data_ptr<int32_t>(),
                                 ws.data_ptr(), layout.bytes, stream);
  });
  check_cuda(err, op);
  return {weights, ids, slots, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_layout_cuda_op(
    const at::Tensor& ids, int64_t num_experts, int64_t ep_size, int64_t capacity,
    const c10::optional<at::Tensor>& slots) {
  const char* op = "moe_layout";
  check_dim(ids, 2, op, "ids", "[T, k]");
  check_index(ids, op, "ids");
  check_on_cuda(ids, op, "ids");
  DISAGG_CHECK_VALUE(num_experts >= 1, op, "num_experts must be >= 1, got ", num_experts);
  DISAGG_CHECK_VALUE(ep_size >= 1 && ep_size <= num_experts, op,
                     "ep_size must be in [1, num_experts=", num_experts, "], got ", ep_size);
  DISAGG_CHECK_VALUE(capacity >= 0, op, "capacity must be >= 0, got ", capacity);
  const int64_t A = ids.numel();
  DISAGG_CHECK_VALUE(A <= INT32_MAX, op, "ids must have at most 2^31-1 entries, got ", A);
  DISAGG_CHECK_VALUE(num_experts * std::max<int64_t>(capacity, 1) <= INT32_MAX, op,
                     "num_experts * capacity must fit in int32");
  c10::cuda::CUDAGuard guard(ids.device());
  at::Tensor ids_c = ids.contiguous();
  at::Tensor slots_c;
  if (capacity > 0) {
    DISAGG_CHECK_VALUE(slots.has_value(), op, "slots are required when capacity > 0 (padded layout)");
    check_index(*slots, op, "slots");
    check_same_device(ids, *slots, op, "slots");
    DISAGG_CHECK_VALUE(slots->sizes() == ids.sizes(), op, "slots must have the shape of ids ",
                       ids.sizes(), ", got ", slots->sizes());
    slots_c = slots->to(ids.scalar_type()).contiguous();
  }
  const int64_t rows = capacity > 0 ? num_experts * capacity : A;
  auto i32 = ids.options().dtype(at::kInt);
  at::Tensor dest = at::empty({A}, i32), src = at::empty({rows}, i32);
  at::Tensor eoff = at::empty({num_experts + 1}, i32), roff = at::empty({ep_size + 1}, i32);
  const cuda::LayoutWorkspace layout = cuda::moe_layout_workspace(A, num_experts, capacity);
  at::Tensor ws = workspace(layout.bytes, ids);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (ids.scalar_type() == at::kInt) {
    err = cuda::moe_layout<int32_t>(ids_c.data_ptr<int32_t>(),
                                    capacity > 0 ? slots_c.data_ptr<int32_t>() : nullptr, A,
                                    num_experts, ep_size, capacity, dest.data_ptr<int32_t>(),
                                    src.data_ptr<int32_t>(), eoff.data_ptr<int32_t>(),
                                    roff.data_ptr<int32_t>(), ws.data_ptr(), layout.bytes, stream);
  } else {
    err = cuda::moe_layout<int64_t>(ids_c.data_ptr<int64_t>(),
                                    capacity > 0 ? slots_c.data_ptr<int64_t>() : nullptr, A,
                                    num_experts, ep_size, capacity, dest.data_ptr<int32_t>(),
                                    src.data_ptr<int32_t>(), eoff.data_ptr<int32_t>(),
                                    roff.data_ptr<int32_t>(), ws.data_ptr(), layout.bytes, stream);
  }
  check_cuda(err, op);
  return {dest, src, eoff, roff};
}

void moe_permute_into_cuda_op(const at::Tensor& x, const at::Tensor& src, int64_t top_k,
                              at::Tensor& out) {
  const char* op = "moe_permute";
  check_permute_args(x, src, top_k, out);
  check_on_cuda(x, op, "x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor src_c = src.contiguous();
  const int64_t rows = src.size(0), H = x.size(1);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    return cuda::moe_permute<scalar_t>(reinterpret_cast<const scalar_t*>(x.data_ptr()), x.size(0),
                                       H, x.stride(0), src_c.data_ptr<int32_t>(), rows, top_k,
                                       reinterpret_cast<scalar_t*>(out.data_ptr()), stream);
  });
  check_cuda(err, op);
}

at::Tensor moe_permute_cuda_op(const at::Tensor& x, const at::Tensor& src, int64_t top_k) {
  check_dim(x, 2, "moe_permute", "x", "[T, H]");
  check_dim(src, 1, "moe_permute", "src", "[rows]");
  at::Tensor out = at::empty({src.size(0), x.size(1)}, x.options());
  moe_permute_into_cuda_op(x, src, top_k, out);
  return out;
}

void run_combine_cuda(const at::Tensor& y, const at::Tensor& dest, const at::Tensor& weights,
                      at::Tensor& out, const char* op) {
  c10::cuda::CUDAGuard guard(y.device());
  at::Tensor y_c = y.contiguous(), dest_c = dest.contiguous(), w_c = weights.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = y.size(1);
  const bool f32_out = out.scalar_type() == at::kFloat;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(y.scalar_type(), op, [&] {
    const auto* yp = reinterpret_cast<const scalar_t*>(y_c.data_ptr());
    if (f32_out)
      return cuda::moe_combine<scalar_t, float>(yp, y.size(0), H, dest_c.data_ptr<int32_t>(),
                                                w_c.data_ptr<float>(), T, k,
                                                out.data_ptr<float>(), stream);
    return cuda::moe_combine<scalar_t, scalar_t>(yp, y.size(0), H, dest_c.data_ptr<int32_t>(),
                                                 w_c.data_ptr<float>(), T, k,
                                                 reinterpret_cast<scalar_t*>(out.data_ptr()),
                                                 stream);
  });
  check_cuda(err, op);
}

at::Tensor moe_combine_cuda_op(const at::Tensor& y, const at::Tensor& dest,
                               const at::Tensor& weights, c10::optional<at::ScalarType> out_dtype) {
  const char* op = "moe_combine";
  check_combine_args(y, dest, weights, op);
  check_on_cuda(y, op, "y");
  const at::ScalarType od = out_dtype.value_or(y.scalar_type());
  DISAGG_CHECK_VALUE(od == at::kFloat || od == y.scalar_type(), op,
                     "out_dtype must be float32 or y's dtype, got ", od);
  at::Tensor out = at::empty({weights.size(0), y.size(1)}, y.options().dtype(od));
  run_combine_cuda(y, dest, weights, out, op);
  return out;
}

void moe_combine_into_cuda_op(const at::Tensor& y, const at::Tensor& dest,
                              const at::Tensor& weights, at::Tensor& out) {
  const char* op = "moe_combine_into";
  check_combine_args(y, dest, weights, op);
  check_on_cuda(y, op, "y");
  check_combine_out(y, weights, out, op);
  run_combine_cuda(y, dest, weights, out, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CUDA, m) {
  m.impl("route", &route_cuda_op);
  m.impl("moe_layout", &moe_layout_cuda_op);
  m.impl("moe_permute", &moe_permute_cuda_op);
  m.impl("moe_permute_into", &moe_permute_into_cuda_op);
  m.impl("moe_combine", &moe_combine_cuda_op);
  m.impl("moe_combine_into", &moe_combine_into_cuda_op);
}

}  // namespace disagg
