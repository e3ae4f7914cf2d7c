// Argument checks of the model-layer ops (rms_norm, add_rms_norm, linear, moe_experts,
// moe_experts_packed), shared by the CPU and CUDA ops so both raise the same errors for the
// same bad input.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <vector>

#include "checks.h"

namespace disagg {

inline void check_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps,
                            const char* op, const char* xname) {
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

// residual (updated in place) and x of one shape.
inline void check_add_rms_norm(const at::Tensor& residual, const at::Tensor& x,
                               const at::Tensor& weight, double eps, const char* op) {
  check_norm_args(residual, weight, eps, op, "residual");
  check_contiguous(residual, op, "residual");
  check_dtype(x, residual.scalar_type(), op, "x");
  check_same_device(residual, x, op, "x");
  DISAGG_CHECK_VALUE(x.sizes() == residual.sizes(), op, "x must have residual's shape ",
                     residual.sizes(), ", got ", x.sizes());
}

// x [..., K], weight [M, K] (HF layout, contiguous), bias [M]? of x's dtype.
// weight in x's dtype, or bfloat16 with float32 x (returns true then: widened as read).
inline bool check_linear(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const char* op) {
  check_float(x, op, "x");
  DISAGG_CHECK_VALUE(x.dim() >= 1, op, "x must have at least 1 dim [..., K], got a scalar");
  check_dim(weight, 2, op, "weight", "[M, K]");
  const bool bf16_weight = x.scalar_type() == at::kFloat &&
                           weight.scalar_type() == at::kBFloat16;
  check_dtype(weight, bf16_weight ? at::kBFloat16 : x.scalar_type(), op, "weight");
  check_contiguous(weight, op, "weight");
  check_same_device(x, weight, op, "weight");
  const int64_t K = x.size(-1), M = weight.size(0);
  DISAGG_CHECK_VALUE(weight.size(1) == K, op, "weight must be [M, K=", K, "], got ",
                     weight.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    check_dim(b, 1, op, "bias", "[M]");
    check_dtype(b, x.scalar_type(), op, "bias");
    check_same_device(x, b, op, "bias");
    DISAGG_CHECK_VALUE(b.size(0) == M, op, "bias must have M=", M, " entries, got ", b.size(0));
  }
  return bf16_weight;
}

// x [T, H], ids [T, k], weights [T, k] of the expert ops.
inline void check_moe_tokens(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                             const char* op) {
  check_dim(x, 2, op, "x", "[T, H]");
  check_float(x, op, "x");
  check_dim(ids, 2, op, "ids", "[T, k]");
  check_index(ids, op, "ids");
  check_dim(weights, 2, op, "weights", "[T, k]");
  check_float(weights, op, "weights");
  check_same_device(x, ids, op, "ids");
  check_same_device(x, weights, op, "weights");
  const int64_t T = x.size(0), K = ids.size(1);
  DISAGG_CHECK_VALUE(ids.size(0) == T, op, "ids must have T=", T, " rows, got ", ids.size(0));
  DISAGG_CHECK_VALUE(weights.size(0) == T && weights.size(1) == K, op, "weights must be [", T,
                     ", ", K, "] like ids, got ", weights.sizes());
}

// x [T, H], ids/weights [T, k], w13 [E, 2I, H], w2 [E, H, I]: weights in x's dtype, or bfloat16
// with float32 x. Returns whether the weights are bfloat16 under float32 x.
inline bool check_moe_experts(const at::Tensor& x, const at::Tensor& ids,
                              const at::Tensor& weights, const at::Tensor& w13,
                              const at::Tensor& w2, const char* op) {
  check_moe_tokens(x, ids, weights, op);
  const bool bf16_weights = x.scalar_type() == at::kFloat &&
                            w13.scalar_type() == at::kBFloat16;
  const at::ScalarType wt = bf16_weights ? at::kBFloat16 : x.scalar_type();
  check_dim(w13, 3, op, "w13", "[E, 2I, H]");
  check_dtype(w13, wt, op, "w13");
  check_contiguous(w13, op, "w13");
  check_dim(w2, 3, op, "w2", "[E, H, I]");
  check_dtype(w2, wt, op, "w2");
  check_contiguous(w2, op, "w2");
  check_same_device(x, w13, op, "w13");
  check_same_device(x, w2, op, "w2");
  const int64_t H = x.size(1), E = w13.size(0), I = w2.size(2);
  DISAGG_CHECK_VALUE(w13.size(2) == H, op, "w13 must be [E, 2I, H=", H, "], got ", w13.sizes());
  DISAGG_CHECK_VALUE(w2.size(0) == E && w2.size(1) == H, op, "w2 must be [E=", E, ", H=", H,
                     ", I], got ", w2.sizes());
  DISAGG_CHECK_VALUE(w13.size(1) == 2 * I, op, "w13 must have 2I=", 2 * I,
                     " rows per expert (I from w2), got ", w13.size(1));
  return bf16_weights;
}

// moe_experts_packed: x, ids, weights as moe_experts; w13p [E, 2, ceil(I/64), 16, ceil(H/16),
// 4, 16] and w2p [E, ceil(H/64), 16, ceil(I/16), 4, 16] from pack_moe_weights. Returns
// whether the packed weights are bf16 under float32 tokens.
inline bool check_moe_experts_packed(const at::Tensor& x, const at::Tensor& ids,
                                     const at::Tensor& weights, const at::Tensor& w13p,
                                     const at::Tensor& w2p, int64_t inter, const char* op) {
  check_moe_tokens(x, ids, weights, op);
  const bool bf16_weights = x.scalar_type() == at::kFloat &&
                            w13p.scalar_type() == at::kBFloat16;
  const at::ScalarType wt = bf16_weights ? at::kBFloat16 : x.scalar_type();
  check_dtype(w13p, wt, op, "w13p");
  check_contiguous(w13p, op, "w13p");
  check_dtype(w2p, wt, op, "w2p");
  check_contiguous(w2p, op, "w2p");
  check_same_device(x, w13p, op, "w13p");
  check_same_device(x, w2p, op, "w2p");
  const int64_t H = x.size(1);
  DISAGG_CHECK_VALUE(inter >= 1, op, "inter must be >= 1, got ", inter);
  const int64_t E = w13p.dim() == 7 ? w13p.size(0) : -1;
  const std::vector<int64_t> want13 = {E, 2, (inter + 63) / 64, 16, (H + 15) / 16, 4, 16};
  const std::vector<int64_t> want2 = {E, (H + 63) / 64, 16, (inter + 15) / 16, 4, 16};
  DISAGG_CHECK_VALUE(w13p.sizes().vec() == want13, op, "w13p must be pack_moe_weights' [E, 2, ",
                     want13[2], ", 16, ", want13[4], ", 4, 16] for H=", H, ", inter=", inter,
                     ", got ", w13p.sizes());
  DISAGG_CHECK_VALUE(w2p.sizes().vec() == want2, op, "w2p must be pack_moe_weights' [E=", E,
                     ", ", want2[1], ", 16, ", want2[3], ", 4, 16] for H=", H, ", inter=", inter,
                     ", got ", w2p.sizes());
  return bf16_weights;
}

}  // namespace disagg
