// CPU implementation of moe_experts: argument checks, then the torch-free kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "layer_checks.h"
#include "disagg/experts.h"

namespace disagg {
namespace {

at::Tensor moe_experts_cpu_op(const at::Tensor& x, const at::Tensor& ids,
                              const at::Tensor& weights, const at::Tensor& w13,
                              const at::Tensor& w2) {
  const char* op = "moe_experts";
  const bool bf16_weights = check_moe_experts(x, ids, weights, w13, w2, op);
  const int64_t T = x.size(0), H = x.size(1), K = ids.size(1);
  const int64_t E = w13.size(0), I = w2.size(2);
  at::Tensor x_c = x.contiguous(), ids_c = ids.contiguous();
  at::Tensor w_c = weights.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({T, H}, x.options());
  if (bf16_weights) {
    const auto* xp = x_c.data_ptr<float>();
    const auto* w13p = reinterpret_cast<const bf16_t*>(w13.data_ptr());
    const auto* w2p = reinterpret_cast<const bf16_t*>(w2.data_ptr());
    Status s = ids_c.scalar_type() == at::kInt
                   ? moe_experts_cpu<float, int32_t, bf16_t>(
                         xp, T, H, ids_c.data_ptr<int32_t>(), w_c.data_ptr<float>(), K, w13p,
                         w2p, E, I, out.data_ptr<float>(), at::get_num_threads())
                   : moe_experts_cpu<float, int64_t, bf16_t>(
                         xp, T, H, ids_c.data_ptr<int64_t>(), w_c.data_ptr<float>(), K, w13p,
                         w2p, E, I, out.data_ptr<float>(), at::get_num_threads());
    check_status(s, op, "ids must be in [-1, E=" + std::to_string(E) + ")");
    return out;
  }
  Status s = DISAGG_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    const auto* xp = reinterpret_cast<const scalar_t*>(x_c.data_ptr());
    const auto* w13p = reinterpret_cast<const scalar_t*>(w13.data_ptr());
    const auto* w2p = reinterpret_cast<const scalar_t*>(w2.data_ptr());
    auto* op_ = reinterpret_cast<scalar_t*>(out.data_ptr());
    if (ids_c.scalar_type() == at::kInt)
      return moe_experts_cpu<scalar_t, int32_t>(xp, T, H, ids_c.data_ptr<int32_t>(),
                                                w_c.data_ptr<float>(), K, w13p, w2p, E, I, op_,
                                                at::get_num_threads());
    return moe_experts_cpu<scalar_t, int64_t>(xp, T, H, ids_c.data_ptr<int64_t>(),
                                              w_c.data_ptr<float>(), K, w13p, w2p, E, I, op_,
                                              at::get_num_threads());
  });
  check_status(s, op, "ids must be in [-1, E=" + std::to_string(E) + ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) { m.impl("moe_experts", &moe_experts_cpu_op); }

}  // namespace disagg
