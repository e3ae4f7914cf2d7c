// CPU implementation of moe_experts: argument checks, then the torch-free kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "disagg/experts.h"

namespace disagg {
namespace {

at::Tensor moe_experts_cpu_op(const at::Tensor& x, const at::Tensor& ids,
                              const at::Tensor& weights, const at::Tensor& w13,
                              const at::Tensor& w2) {
  const char* op = "moe_experts";
  check_dim(x, 2, op, "x", "[T, H]");
  check_float(x, op, "x");
  check_dim(ids, 2, op, "ids", "[T, k]");
  check_index(ids, op, "ids");
  check_dim(weights, 2, op, "weights", "[T, k]");
  check_float(weights, op, "weights");
  // Weights in x's dtype, or bfloat16 weights with float32 x (widened exactly in the kernel).
  const bool bf16_weights = x.scalar_type() == at::kFloat &&
                            w13.scalar_type() == at::kBFloat16;
  const at::ScalarType wt = bf16_weights ? at::kBFloat16 : x.scalar_type();
  check_dim(w13, 3, op, "w13", "[E, 2I, H]");
  check_dtype(w13, wt, op, "w13");
  check_contiguous(w13, op, "w13");
  check_dim(w2, 3, op, "w2", "[E, H, I]");
  check_dtype(w2, wt, op, "w2");
  check_contiguous(w2, op, "w2");
  check_same_device(x, ids, op, "ids");
  check_same_device(x, weights, op, "weights");
  check_same_device(x, w13, op, "w13");
  check_same_device(x, w2, op, "w2");
  const int64_t T = x.size(0), H = x.size(1), K = ids.size(1);
  const int64_t E = w13.size(0), I = w2.size(2);
  DISAGG_CHECK_VALUE(ids.size(0) == T, op, "ids must have T=", T, " rows, got ", ids.size(0));
  DISAGG_CHECK_VALUE(weights.size(0) == T && weights.size(1) == K, op, "weights must be [", T,
                     ", ", K, "] like ids, got ", weights.sizes());
  DISAGG_CHECK_VALUE(w13.size(2) == H, op, "w13 must be [E, 2I, H=", H, "], got ", w13.sizes());
  DISAGG_CHECK_VALUE(w2.size(0) == E && w2.size(1) == H, op, "w2 must be [E=", E, ", H=", H,
                     ", I], got ", w2.sizes());
  DISAGG_CHECK_VALUE(w13.size(1) == 2 * I, op, "w13 must have 2I=", 2 * I,
                     " rows per expert (I from w2), got ", w13.size(1));
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
