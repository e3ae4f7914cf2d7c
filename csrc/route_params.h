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

}  // namespace disagg
