// Argument checking for route, shared by the CPU and CUDA op implementations: both backends
// accept and reject exactly the same calls.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "disagg/routing_params.h"

namespace disagg {

// Validates route's arguments (raising a ValueError that names the argument) and translates
// them into RouteParams. p.bias is left null: the caller points it at the tensor it keeps alive.
RouteParams make_route_params(const at::Tensor& logits, int64_t top_k, const std::string& scoring,
                              const c10::optional<at::Tensor>& bias, int64_t num_groups,
                              int64_t topk_groups, const std::string& group_score,
                              bool renormalize, double routed_scaling_factor,
                              double capacity_factor, const std::string& drop_policy,
                              const std::string& overflow);

// Validates moe_permute_into's arguments (shared by both backends; the device check is the
// backend's own).
void check_permute_args(const at::Tensor& x, const at::Tensor& src, int64_t top_k,
                        const at::Tensor& out);

// Validates moe_combine's y, dest and weights, and moe_combine_into's out (shared by both
// backends; the device check of y is the backend's own).
void check_combine_args(const at::Tensor& y, const at::Tensor& dest, const at::Tensor& weights,
                        const char* op);
void check_combine_out(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& out,
                       const char* op);

}  // namespace disagg
