// Routing parameters and the capacity formula, shared by the CPU (routing.h) and CUDA
// (routing.cuh) kernels. Host-only and torch-free; no OpenMP, so nvcc can include it anywhere.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace disagg {

enum class Scoring : int32_t { kSoftmax = 0, kSigmoid = 1 };
enum class GroupScore : int32_t { kMax = 0, kSumTop2 = 1 };
enum class DropPolicy : int32_t { kPosition = 0, kProbs = 1 };
enum class Overflow : int32_t { kDrop = 0, kReroute = 1 };

struct RouteParams {
  int64_t num_tokens = 0;
  int64_t num_experts = 0;
  int64_t top_k = 1;
  int64_t logits_row_stride = 0;  // elements between consecutive tokens
  Scoring scoring = Scoring::kSoftmax;
  const float* bias = nullptr;  // [E] selection bias or nullptr
  int64_t num_groups = 1;
  int64_t topk_groups = 1;
  GroupScore group_score = GroupScore::kMax;
  bool renormalize = true;
  float routed_scaling_factor = 1.0f;
  int64_t capacity = 0;  // <= 0: dropless
  DropPolicy drop_policy = DropPolicy::kPosition;
  Overflow overflow = Overflow::kDrop;
};

// Capacity per expert: ceil(capacity_factor * T * k / E). The product is formed in double and a
// relative 1e-9 slack absorbs the representation error of factors such as 1.2, so that
// 1.2 * 100 * 2 / 8 gives 30 and not 31. capacity_factor <= 0 means dropless (returns 0).
inline int64_t route_capacity(double capacity_factor, int64_t num_tokens, int64_t top_k,
                              int64_t num_experts) {
  if (!(capacity_factor > 0.0) || num_tokens <= 0) return 0;
  const double c = capacity_factor * static_cast<double>(num_tokens) *
                   static_cast<double>(top_k) / static_cast<double>(num_experts);
  const double r = std::ceil(c - 1e-9 * std::max(1.0, c));
  return std::max<int64_t>(1, static_cast<int64_t>(r));
}

}  // namespace disagg
