// CUDA implementations of the model-layer ops: rms_norm / add_rms_norm (the torch-free kernels of
// include/disagg/layers.cuh), linear (cuBLAS through ATen) and moe_experts (a device-side
// composite of the library's own CUDA ops). The argument checks are the CPU ops' (layer_checks.h).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda/cuda_checks.h"
#include "disagg/layers.cuh"
#include "layer_checks.h"

namespace disagg {
namespace {

namespace dl = cuda::layers;

at::Tensor rms_norm_cuda_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm";
  check_norm_args(x, weight, eps, op, "x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_c = x.contiguous(), w_c = weight.contiguous();
  at::Tensor out = at::empty_like(x_c);
  const int64_t H = x.size(-1), N = x.numel() / H;
  if (N == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // x is passed as the residual with nothing to add: the kernel only reads it.
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    return dl::add_rms_norm<scalar_t>(reinterpret_cast<scalar_t*>(x_c.data_ptr()), nullptr,
                                      reinterpret_cast<const scalar_t*>(w_c.data_ptr()), N, H,
                                      static_cast<float>(eps),
                                      reinterpret_cast<scalar_t*>(out.data_ptr()), stream);
  });
  check_cuda(err, op);
  return out;
}

at::Tensor add_rms_norm_cuda_op(at::Tensor& residual, const at::Tensor& x,
                                const at::Tensor& weight, double eps) {
  const char* op = "add_rms_norm";
  check_add_rms_norm(residual, x, weight, eps, op);
  c10::cuda::CUDAGuard guard(residual.device());
  at::Tensor x_c = x.contiguous(), w_c = weight.contiguous();
  at::Tensor out = at::empty_like(residual);
  const int64_t H = residual.size(-1), N = residual.numel() / H;
  if (N == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(residual.scalar_type(), op, [&] {
    return dl::add_rms_norm<scalar_t>(reinterpret_cast<scalar_t*>(residual.data_ptr()),
                                      reinterpret_cast<const scalar_t*>(x_c.data_ptr()),
                                      reinterpret_cast<const scalar_t*>(w_c.data_ptr()), N, H,
                                      static_cast<float>(eps),
                                      reinterpret_cast<scalar_t*>(out.data_ptr()), stream);
  });
  check_cuda(err, op);
  return out;
}

// cuBLAS (float32 accumulation) through ATen: on a GPU a hand-written GEMV has nothing to add.
at::Tensor linear_cuda_op(const at::Tensor& x, const at::Tensor& weight,
                          const std::optional<at::Tensor>& bias) {
  const bool bf16_weight = check_linear(x, weight, bias, "linear");
  c10::cuda::CUDAGuard guard(x.device());
  return at::linear(x, bf16_weight ? weight.to(x.scalar_type()) : weight, bias);
}

// route's ids -> moe_layout -> moe_permute -> expert_gemm (w13) -> SiLU(gate) * up ->
// expert_gemm (w2) -> moe_combine with the routing weights, all on the device with no host
// synchronization where expert_gemm runs its grouped kernel (bf16, sizes multiples of 8).
// Intermediates are in x's dtype between the GEMMs (the CPU kernel keeps them in float32), and
// bf16 weights under float32 x are widened to float32 copies per call.
at::Tensor moe_experts_cuda_op(const at::Tensor& x, const at::Tensor& ids,
                               const at::Tensor& weights, const at::Tensor& w13,
                               const at::Tensor& w2) {
  const char* op = "moe_experts";
  const bool bf16_weights = check_moe_experts(x, ids, weights, w13, w2, op);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), H = x.size(1), K = ids.size(1);
  const int64_t E = w13.size(0), I = w2.size(2);
  if (T == 0 || K == 0) return at::zeros({T, H}, x.options());
  static auto layout_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("disagg::moe_layout", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, int64_t, int64_t, int64_t, const std::optional<at::Tensor>&)>();
  static auto permute_op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("disagg::moe_permute", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t)>();
  static auto gemm_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("disagg::expert_gemm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  static auto combine_op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("disagg::moe_combine", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            std::optional<at::ScalarType>)>();
  const at::Tensor a13 = bf16_weights ? w13.to(at::kFloat) : w13;
  const at::Tensor a2 = bf16_weights ? w2.to(at::kFloat) : w2;
  const auto lay = layout_op.call(ids.contiguous(), E, 1, 0, std::nullopt);
  const at::Tensor& dest = std::get<0>(lay);
  const at::Tensor& src = std::get<1>(lay);
  const at::Tensor& offsets = std::get<2>(lay);
  const at::Tensor xp = permute_op.call(x.contiguous(), src, K);
  const at::Tensor h = gemm_op.call(xp, a13, offsets);
  const at::Tensor act = (at::silu(h.narrow(1, 0, I)) * h.narrow(1, I, I)).contiguous();
  const at::Tensor y = gemm_op.call(act, a2, offsets);
  return combine_op.call(y, dest, weights, x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CUDA, m) {
  m.impl("rms_norm", &rms_norm_cuda_op);
  m.impl("add_rms_norm", &add_rms_norm_cuda_op);
  m.impl("linear", &linear_cuda_op);
  m.impl("moe_experts", &moe_experts_cuda_op);
}

}  // namespace disagg
