// CPU implementation of rms_norm and add_rms_norm: argument checks, then the torch-free kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "layer_checks.h"
#include "disagg/norm.h"

namespace disagg {
namespace {

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
  check_add_rms_norm(residual, x, weight, eps, op);
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
