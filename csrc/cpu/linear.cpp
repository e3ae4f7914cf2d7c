// CPU implementation of linear: argument checks, then the torch-free kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "disagg/linear.h"

namespace disagg {
namespace {

at::Tensor linear_cpu_op(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias) {
  const char* op = "linear";
  check_float(x, op, "x");
  DISAGG_CHECK_VALUE(x.dim() >= 1, op, "x must have at least 1 dim [..., K], got a scalar");
  check_dim(weight, 2, op, "weight", "[M, K]");
  check_dtype(weight, x.scalar_type(), op, "weight");
  check_contiguous(weight, op, "weight");
  check_same_device(x, weight, op, "weight");
  const int64_t K = x.size(-1), M = weight.size(0);
  DISAGG_CHECK_VALUE(weight.size(1) == K, op, "weight must be [M, K=", K, "], got ",
                     weight.sizes());
  at::Tensor b;
  if (bias.has_value()) {
    b = *bias;
    check_dim(b, 1, op, "bias", "[M]");
    check_dtype(b, x.scalar_type(), op, "bias");
    check_same_device(x, b, op, "bias");
    DISAGG_CHECK_VALUE(b.size(0) == M, op, "bias must have M=", M, " entries, got ", b.size(0));
    b = b.contiguous();
  }
  at::Tensor x_c = x.contiguous();
  const int64_t N = K > 0 ? x.numel() / K : 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = M;
  at::Tensor out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  if (K == 0) return out.zero_().add_(b.defined() ? b : at::zeros({M}, x.options()));
  Status s = DISAGG_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    return linear_cpu<scalar_t>(
        reinterpret_cast<const scalar_t*>(x_c.data_ptr()), N, K,
        reinterpret_cast<const scalar_t*>(weight.data_ptr()), M,
        b.defined() ? reinterpret_cast<const scalar_t*>(b.data_ptr()) : nullptr,
        reinterpret_cast<scalar_t*>(out.data_ptr()), at::get_num_threads());
  });
  check_status(s, op, "bad sizes");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) { m.impl("linear", &linear_cpu_op); }

}  // namespace disagg
