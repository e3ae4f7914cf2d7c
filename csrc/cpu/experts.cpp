// CPU implementation of moe_experts and moe_experts_packed: argument checks, then the
// torch-free kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <iterator>
#include <vector>

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

// [..., P, 16, J, 4, 16] panels (lane blocks in summing order) -> [..., rows, n].
at::Tensor unpack_rows(const at::Tensor& wp, int64_t rows, int64_t n) {
  const int64_t d = wp.dim() - 5;
  std::vector<int64_t> order(std::begin(dot_tile_detail::kLaneOrder),
                             std::end(dot_tile_detail::kLaneOrder));
  at::Tensor w = wp.index_select(d + 1, at::tensor(order, at::kLong));  // its own inverse
  std::vector<int64_t> perm, shape;
  for (int64_t i = 0; i < d; ++i) {
    perm.push_back(i);
    shape.push_back(wp.size(i));
  }
  for (int64_t i : {d, d + 3, d + 4, d + 2, d + 1}) perm.push_back(i);
  shape.push_back(wp.size(d) * 64);
  shape.push_back(wp.size(d + 2) * 16);
  return w.permute(perm).reshape(shape).narrow(d, 0, rows).narrow(d + 1, 0, n).contiguous();
}

at::Tensor moe_experts_packed_cpu_op(const at::Tensor& x, const at::Tensor& ids,
                                     const at::Tensor& weights, const at::Tensor& w13p,
                                     const at::Tensor& w2p, int64_t inter) {
  const char* op = "moe_experts_packed";
  const bool bf16_weights = check_moe_experts_packed(x, ids, weights, w13p, w2p, inter, op);
  const int64_t E = w13p.size(0), H = x.size(1);
  if (!cpu_has_avx512()) {
    // The panel kernels are AVX-512 code: elsewhere unpack and run the dot-tile path (the same
    // results; slow, for portability only: the model packs only where AVX-512 runs).
    return run_experts(x, ids, weights, unpack_rows(w13p, inter, H).reshape({E, 2 * inter, H}),
                       unpack_rows(w2p, H, inter), at::Tensor(), at::Tensor(), E, inter,
                       bf16_weights, op);
  }
  return run_experts(x, ids, weights, at::Tensor(), at::Tensor(), w13p, w2p, E, inter,
                     bf16_weights, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) {
  m.impl("moe_experts", &moe_experts_cpu_op);
  m.impl("moe_experts_packed", &moe_experts_packed_cpu_op);
}

}  // namespace disagg
