// CPU implementation of linear: argument checks, then the torch-free kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "layer_checks.h"
#include "disagg/linear.h"

namespace disagg {
namespace {

at::Tensor linear_cpu_op(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  const char* op = "linear";
  const bool bf16_weight = check_linear(x, weight, bias, op);
  const int64_t K = x.size(-1), M = weight.size(0);
  at::Tensor b;
  if (bias.has_value()) b = bias->contiguous();
  at::Tensor x_c = x.contiguous();
  const int64_t N = K > 0 ? x.numel() / K : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = M;
  at::Tensor out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  if (K == 0) return out.zero_().add_(b.defined() ? b : at::zeros({M}, x.options()));
  auto run = [&](auto t_tag, auto w_tag) {
    using T = decltype(t_tag);
    using W = decltype(w_tag);
    return linear_cpu<T, W>(reinterpret_cast<const T*>(x_c.data_ptr()), N, K,
                            reinterpret_cast<const W*>(weight.data_ptr()), M,
                            b.defined() ? reinterpret_cast<const T*>(b.data_ptr()) : nullptr,
                            reinterpret_cast<T*>(out.data_ptr()), at::get_num_threads());
  };
  // a bf16 weight under float32 x is widened exactly as the kernel reads it
  Status s = bf16_weight ? run(float{}, bf16_t{})
                         : DISAGG_DISPATCH_FLOAT(x.scalar_type(), op,
                                                 [&] { return run(scalar_t{}, scalar_t{}); });
  check_status(s, op, "bad sizes");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) { m.impl("linear", &linear_cpu_op); }

}  // namespace disagg
