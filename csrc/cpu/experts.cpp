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
  const int64_t T_ = x.size(0), H = x.size(1), K = ids.size(1);
  const int64_t E = w13.size(0), I = w2.size(2);
  at::Tensor x_c = x.contiguous(), ids_c = ids.contiguous();
  at::Tensor w_c = weights.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({T_, H}, x.options());
  // One call for every (token type T, weight type W) pair: ids int32 or int64.
  auto run = [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    const auto* xp = reinterpret_cast<const T*>(x_c.data_ptr());
    const auto* w13p = reinterpret_cast<const W*>(w13.data_ptr());
    const auto* w2p = reinterpret_cast<const W*>(w2.data_ptr());
    auto* op_ = reinterpret_cast<T*>(out.data_ptr());
    if (ids_c.scalar_type() == at::kInt)
      return moe_experts_cpu<T, int32_t, W>(xp, T_, H, ids_c.data_ptr<int32_t>(),
                                            w_c.data_ptr<float>(), K, w13p, w2p, E, I, op_,
                                            at::get_num_threads());
    return moe_experts_cpu<T, int64_t, W>(xp, T_, H, ids_c.data_ptr<int64_t>(),
                                          w_c.data_ptr<float>(), K, w13p, w2p, E, I, op_,
                                          at::get_num_threads());
  };
  // bf16 weights under float32 tokens are widened in the kernel (see check_moe_experts).
  Status s = bf16_weights ? run(float{}, bf16_t{})
                          : DISAGG_DISPATCH_FLOAT(x.scalar_type(), op,
                                                  [&] { return run(scalar_t{}, scalar_t{}); });
  check_status(s, op, "ids must be in [-1, E=" + std::to_string(E) + ")");
  return out;
}

at::Tensor moe_experts_packed_cpu_op(const at::Tensor& x, const at::Tensor& ids,
                                     const at::Tensor& weights, const at::Tensor& w13p,
                                     const at::Tensor& w2p, int64_t inter) {
  const char* op = "moe_experts_packed";
  const bool bf16_weights = check_moe_experts_packed(x, ids, weights, w13p, w2p, inter, op);
  DISAGG_CHECK_VALUE(cpu_has_avx512(), op, "packed expert weights need a CPU with AVX-512 "
                     "(use moe_experts with the HF layout elsewhere)");
  const int64_t T_ = x.size(0), H = x.size(1), K = ids.size(1), E = w13p.size(0);
  at::Tensor x_c = x.contiguous(), ids_c = ids.contiguous();
  at::Tensor w_c = weights.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({T_, H}, x.options());
  auto run = [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    const auto* xp = reinterpret_cast<const T*>(x_c.data_ptr());
    const auto* p13 = reinterpret_cast<const W*>(w13p.data_ptr());
    const auto* p2 = reinterpret_cast<const W*>(w2p.data_ptr());
    auto* op_ = reinterpret_cast<T*>(out.data_ptr());
    if (ids_c.scalar_type() == at::kInt)
      return moe_experts_cpu<T, int32_t, W>(xp, T_, H, ids_c.data_ptr<int32_t>(),
                                            w_c.data_ptr<float>(), K, nullptr, nullptr, E, inter,
                                            op_, at::get_num_threads(), p13, p2);
    return moe_experts_cpu<T, int64_t, W>(xp, T_, H, ids_c.data_ptr<int64_t>(),
                                          w_c.data_ptr<float>(), K, nullptr, nullptr, E, inter,
                                          op_, at::get_num_threads(), p13, p2);
  };
  Status s = bf16_weights ? run(float{}, bf16_t{})
                          : DISAGG_DISPATCH_FLOAT(x.scalar_type(), op,
                                                  [&] { return run(scalar_t{}, scalar_t{}); });
  check_status(s, op, "ids must be in [-1, E=" + std::to_string(E) + ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) {
  m.impl("moe_experts", &moe_experts_cpu_op);
  m.impl("moe_experts_packed", &moe_experts_packed_cpu_op);
}

}  // namespace disagg
