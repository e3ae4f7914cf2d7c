// CPU implementation of moe_experts and moe_experts_packed: argument checks, then the
// torch-free kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "layer_checks.h"
#include "disagg/experts.h"

namespace disagg {
namespace {

// The kernel for every (token type, weight type, ids type): HF-layout weights w13, w2, or
// packed ones p13, p2 (the others undefined).
at::Tensor run_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                       const at::Tensor& w13, const at::Tensor& w2, const at::Tensor& p13,
                       const at::Tensor& p2, int64_t E, int64_t I, bool bf16_weights,
                       const char* op) {
  const int64_t T_ = x.size(0), H = x.size(1), K = ids.size(1);
  at::Tensor x_c = x.contiguous(), ids_c = ids.contiguous();
  at::Tensor w_c = weights.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({T_, H}, x.options());
  auto ptr = [](const at::Tensor& t, auto tag) {
    return t.defined() ? reinterpret_cast<const decltype(tag)*>(t.data_ptr()) : nullptr;
  };
  auto run = [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    const auto* xp = reinterpret_cast<const T*>(x_c.data_ptr());
    auto* op_ = reinterpret_cast<T*>(out.data_ptr());
    if (ids_c.scalar_type() == at::kInt)
      return moe_experts_cpu<T, int32_t, W>(xp, T_, H, ids_c.data_ptr<int32_t>(),
                                            w_c.data_ptr<float>(), K, ptr(w13, w_tag),
                                            ptr(w2, w_tag), E, I, op_, at::get_num_threads(),
                                            ptr(p13, w_tag), ptr(p2, w_tag));
    return moe_experts_cpu<T, int64_t, W>(xp, T_, H, ids_c.data_ptr<int64_t>(),
                                          w_c.data_ptr<float>(), K, ptr(w13, w_tag),
                                          ptr(w2, w_tag), E, I, op_, at::get_num_threads(),
                                          ptr(p13, w_tag), ptr(p2, w_tag));
  };
  // bf16 weights under float32 tokens are widened in the kernel (see check_moe_experts).
  Status s = bf16_weights ? run(float{}, bf16_t{})
                          : DISAGG_DISPATCH_FLOAT(x.scalar_type(), op,
                                                  [&] { return run(scalar_t{}, scalar_t{}); });
  check_status(s, op, "ids must be in [-1, E=" + std::to_string(E) + ")");
  return out;
}

at::Tensor moe_experts_cpu_op(const at::Tensor& x, const at::Tensor& ids,
                              const at::Tensor& weights, const at::Tensor& w13,
                              const at::Tensor& w2) {
  const char* op = "moe_experts";
  const bool bf16_weights = check_moe_experts(x, ids, weights, w13, w2, op);
  return run_experts(x, ids, weights, w13, w2, at::Tensor(), at::Tensor(), w13.size(0),
                     w2.size(2), bf16_weights, op);
}

at::Tensor moe_experts_packed_cpu_op(const at::Tensor& x, const at::Tensor& ids,
                                     const at::Tensor& weights, const at::Tensor& w13p,
                                     const at::Tensor& w2p, int64_t inter) {
  const char* op = "moe_experts_packed";
  const bool bf16_weights = check_moe_experts_packed(x, ids, weights, w13p, w2p, inter, op);
  DISAGG_CHECK_VALUE(cpu_has_avx512(), op, "packed expert weights need a CPU with AVX-512 "
                     "(use moe_experts with the HF layout elsewhere)");
  return run_experts(x, ids, weights, at::Tensor(), at::Tensor(), w13p, w2p, w13p.size(0),
                     inter, bf16_weights, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) {
  m.impl("moe_experts", &moe_experts_cpu_op);
  m.impl("moe_experts_packed", &moe_experts_packed_cpu_op);
}

}  // namespace disagg
