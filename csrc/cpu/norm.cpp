// CPU implementation of rms_norm and add_rms_norm: argument checks, then the torch-free kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "disagg/norm.h"

namespace disagg {
namespace {

void check_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps, const char* op,
                     const char* xname) {
  check_float(x, op, xname);
  DISAGG_CHECK_VALUE(x.dim() >= 1, op, xname, " must have at least 1 dim [..., H], got a scalar");
  check_dim(weight, 1, op, "weight", "[H]");
  check_dtype(weight, x.scalar_type(), op, "weight");
  check_same_device(x, weight, op, "weight");
  DISAGG_CHECK_VALUE(weight.size(0) == x.size(-1), op, "weight must have H=", x.size(-1),
                     " entries, got ", weight.size(0));
  DISAGG_CHECK_VALUE(x.size(-1) >= 1, op, xname, " must have a last dim >= 1");
  DISAGG_CHECK_VALUE(eps >= 0.0 && std::isfinite(eps), op, "eps must be finite and >= 0, got ",
                     eps);
}

at::Tensor rms_norm_cpu_op(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm";
  check_norm_args(x, weight, eps, op, "x");
  at::Tensor x_c = x.contiguous(), w_c = weight.contiguous();
  at::Tensor out = at::empty_like(x_c);
  const int64_t H = x.size(-1), N = x.numel() / H;
  if (N == 0) return out;
  Status s = DISAGG_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    return rms_norm_cpu<scalar_t>(reinterpret_cast<const scalar_t*>(x_c.data_ptr()),
                                  reinterpret_cast<const scalar_t*>(w_c.data_ptr()), N, H,
                                  static_cast<float>(eps),
                                  reinterpret_cast<scalar_t*>(out.data_ptr()));
  });
  check_status(s, op, "bad sizes or eps");
  return out;
}

at::Tensor add_rms_norm_cpu_op(at::Tensor& residual, const at::Tensor& x,
                               const at::Tensor& weight, double eps) {
  const char* op = "add_rms_norm";
  check_norm_args(residual, weight, eps, op, "residual");
  check_contiguous(residual, op, "residual");
  check_dtype(x, residual.scalar_type(), op, "x");
  check_same_device(residual, x, op, "x");
  DISAGG_CHECK_VALUE(x.sizes() == residual.sizes(), op, "x must have residual's shape ",
                     residual.sizes(), ", got ", x.sizes());
  at::Tensor x_c = x.contiguous(), w_c = weight.contiguous();
  at::Tensor out = at::empty_like(residual);
  const int64_t H = residual.size(-1), N = residual.numel() / H;
  if (N == 0) return out;
  Status s = DISAGG_DISPATCH_FLOAT(residual.scalar_type(), op, [&] {
    return add_rms_norm_cpu<scalar_t>(reinterpret_cast<scalar_t*>(residual.data_ptr()),
                                      reinterpret_cast<const scalar_t*>(x_c.data_ptr()),
                                      reinterpret_cast<const scalar_t*>(w_c.data_ptr()), N, H,
                                      static_cast<float>(eps),
                                      reinterpret_cast<scalar_t*>(out.data_ptr()));
  });
  check_status(s, op, "bad sizes or eps");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) {
  m.impl("rms_norm", &rms_norm_cpu_op);
  m.impl("add_rms_norm", &add_rms_norm_cpu_op);
}

}  // namespace disagg
