// CPU implementations of the routing ops: argument checks, then the torch-free kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include <ATen/MemoryOverlap.h>

#include "checks.h"
#include "disagg/routing.h"
#include "fresh_output.h"
#include "route_params.h"

namespace disagg {
namespace {

template <typename E>
E parse_choice(const std::string& v, const char* op, const char* name,
               std::initializer_list<std::pair<const char*, E>> options) {
  std::string allowed;
  for (const auto& o : options) {
    if (v == o.first) return o.second;
    allowed += allowed.empty() ? "" : ", ";
    allowed += o.first;
  }
  DISAGG_CHECK_VALUE(false, op, name, " must be one of {", allowed, "}, got '", v, "'");
  return options.begin()->second;
}

}  // namespace

RouteParams make_route_params(const at::Tensor& logits, int64_t top_k, const std::string& scoring,
                              const c10::optional<at::Tensor>& bias, int64_t num_groups,
                              int64_t topk_groups, const std::string& group_score,
                              bool renormalize, double routed_scaling_factor,
                              double capacity_factor, const std::string& drop_policy,
                              const std::string& overflow) {
  const char* op = "route";
  check_dim(logits, 2, op, "logits", "[T, E]");
  check_float(logits, op, "logits");
  DISAGG_CHECK_VALUE(logits.stride(1) == 1, op, "logits must have unit stride in the expert dim");
  const int64_t T = logits.size(0), E = logits.size(1);
  DISAGG_CHECK_VALUE(E >= 1, op, "logits must have at least one expert column, got E=", E);
  DISAGG_CHECK_VALUE(top_k >= 1 && top_k <= E, op, "top_k must be in [1, E=", E, "], got ", top_k);
  DISAGG_CHECK_VALUE(num_groups >= 1 && E % num_groups == 0, op,
                     "num_groups must be >= 1 and divide E=", E, ", got ", num_groups);
  DISAGG_CHECK_VALUE(topk_groups >= 1 && topk_groups <= num_groups, op,
                     "topk_groups must be in [1, num_groups=", num_groups, "], got ", topk_groups);
  DISAGG_CHECK_VALUE(top_k <= topk_groups * (E / num_groups), op, "top_k=", top_k,
                     " exceeds the experts of the chosen groups (topk_groups * E / num_groups = ",
                     topk_groups * (E / num_groups), ")");
  DISAGG_CHECK_VALUE(std::isfinite(routed_scaling_factor), op,
                     "routed_scaling_factor must be finite, got ", routed_scaling_factor);
  DISAGG_CHECK_VALUE(!std::isnan(capacity_factor), op, "capacity_factor must not be NaN");
  RouteParams p;
  p.num_tokens = T;
  p.num_experts = E;
  p.top_k = top_k;
  p.logits_row_stride = logits.stride(0);
  p.scoring = parse_choice<Scoring>(scoring, op, "scoring",
                                    {{"softmax", Scoring::kSoftmax}, {"sigmoid", Scoring::kSigmoid}});
  p.num_groups = num_groups;
  p.topk_groups = topk_groups;
  p.group_score = parse_choice<GroupScore>(
      group_score, op, "group_score", {{"max", GroupScore::kMax}, {"sum_top2", GroupScore::kSumTop2}});
  p.renormalize = renormalize;
  p.routed_scaling_factor = static_cast<float>(routed_scaling_factor);
  p.capacity = route_capacity(capacity_factor, T, top_k, E);
  p.drop_policy = parse_choice<DropPolicy>(
      drop_policy, op, "drop_policy", {{"position", DropPolicy::kPosition}, {"probs", DropPolicy::kProbs}});
  p.overflow = parse_choice<Overflow>(overflow, op, "overflow",
                                      {{"drop", Overflow::kDrop}, {"reroute", Overflow::kReroute}});
  if (bias.has_value()) {
    const auto& b = *bias;
    check_dim(b, 1, op, "bias", "[E]");
    DISAGG_CHECK_VALUE(b.size(0) == E, op, "bias must have E=", E, " entries, got ", b.size(0));
    check_dtype(b, at::kFloat, op, "bias");
    check_contiguous(b, op, "bias");
    check_same_device(logits, b, op, "bias");
  }
  return p;
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu_op(
    const at::Tensor& logits, int64_t top_k, c10::string_view scoring,
    const c10::optional<at::Tensor>& bias, int64_t num_groups, int64_t topk_groups,
    c10::string_view group_score, bool renormalize, double routed_scaling_factor,
    double capacity_factor, c10::string_view drop_policy, c10::string_view overflow) {
  RouteParams p = make_route_params(logits, top_k, std::string(scoring), bias, num_groups,
                                    topk_groups, std::string(group_score), renormalize,
                                    routed_scaling_factor, capacity_factor,
                                    std::string(drop_policy), std::string(overflow));
  const int64_t T = p.num_tokens, E = p.num_experts;
  auto i32 = logits.options().dtype(at::kInt);
  at::Tensor weights = at::empty({T, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({T, top_k}, i32);
  at::Tensor slots = at::empty({T, top_k}, i32);
  at::Tensor counts = at::empty({E}, i32);
  at::Tensor bias_c;
  if (bias.has_value()) {
    bias_c = *bias;
    p.bias = bias_c.data_ptr<float>();
  }
  Status s = DISAGG_DISPATCH_FLOAT(logits.scalar_type(), "route", [&] {
    return route_cpu<scalar_t>(reinterpret_cast<const scalar_t*>(logits.data_ptr()), p,
                               weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                               slots.data_ptr<int32_t>(), counts.data_ptr<int32_t>());
  });
  check_status(s, "route", "routing failed");
  return {weights, ids, slots, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_layout_cpu_op(
    const at::Tensor& ids, int64_t num_experts, int64_t ep_size, int64_t capacity,
    const c10::optional<at::Tensor>& slots) {
  const char* op = "moe_layout";
  check_dim(ids, 2, op, "ids", "[T, k]");
  check_index(ids, op, "ids");
  DISAGG_CHECK_VALUE(num_experts >= 1, op, "num_experts must be >= 1, got ", num_experts);
  DISAGG_CHECK_VALUE(ep_size >= 1 && ep_size <= num_experts, op, "ep_size must be in [1, num_experts=",
                     num_experts, "], got ", ep_size);
  DISAGG_CHECK_VALUE(capacity >= 0, op, "capacity must be >= 0, got ", capacity);
  at::Tensor ids_c = ids.contiguous();
  at::Tensor slots_c;
  if (capacity > 0) {
    DISAGG_CHECK_VALUE(slots.has_value(), op, "slots are required when capacity > 0 (padded layout)");
    check_index(*slots, op, "slots");
    DISAGG_CHECK_VALUE(slots->sizes() == ids.sizes(), op, "slots must have the shape of ids ",
                       ids.sizes(), ", got ", slots->sizes());
    slots_c = slots->to(ids.scalar_type()).contiguous();
  }
  const int64_t A = ids.numel();
  const int64_t rows = capacity > 0 ? num_experts * capacity : A;
  auto i32 = ids.options().dtype(at::kInt);
  at::Tensor dest = at::empty({A}, i32), src = at::empty({rows}, i32);
  at::Tensor eoff = at::empty({num_experts + 1}, i32), roff = at::empty({ep_size + 1}, i32);
  Status s;
  if (ids.scalar_type() == at::kInt) {
    s = moe_layout_cpu<int32_t>(ids_c.data_ptr<int32_t>(),
                                capacity > 0 ? slots_c.data_ptr<int32_t>() : nullptr, A,
                                num_experts, ep_size, capacity, dest.data_ptr<int32_t>(),
                                src.data_ptr<int32_t>(), eoff.data_ptr<int32_t>(),
                                roff.data_ptr<int32_t>());
  } else {
    s = moe_layout_cpu<int64_t>(ids_c.data_ptr<int64_t>(),
                                capacity > 0 ? slots_c.data_ptr<int64_t>() : nullptr, A,
                                num_experts, ep_size, capacity, dest.data_ptr<int32_t>(),
                                src.data_ptr<int32_t>(), eoff.data_ptr<int32_t>(),
                                roff.data_ptr<int32_t>());
  }
  check_status(s, op,
               "ids must be in [-1, num_experts) and slots in [0, capacity) with no slot used twice");
  return {dest, src, eoff, roff};
}

}  // namespace

void check_permute_args(const at::Tensor& x, const at::Tensor& src, int64_t top_k,
                        const at::Tensor& out) {
  const char* op = "moe_permute";
  check_dim(x, 2, op, "x", "[T, H]");
  check_float(x, op, "x");
  DISAGG_CHECK_VALUE(x.stride(1) == 1, op, "x must have unit stride in the hidden dim");
  check_dim(src, 1, op, "src", "[rows]");
  check_dtype(src, at::kInt, op, "src");
  DISAGG_CHECK_VALUE(top_k >= 1, op, "top_k must be >= 1, got ", top_k);
  const int64_t rows = src.size(0), H = x.size(1);
  DISAGG_CHECK_VALUE(out.dim() == 2 && out.size(0) == rows && out.size(1) == H, op,
                     "out must be [rows=", rows, ", H=", H, "], got ", out.sizes());
  DISAGG_CHECK_VALUE(out.scalar_type() == x.scalar_type(), op, "out must have x's dtype ",
                     x.scalar_type(), ", got ", out.scalar_type());
  check_contiguous(out, op, "out");
  check_same_device(x, src, op, "src");
  check_same_device(x, out, op, "out");
}

void check_combine_args(const at::Tensor& y, const at::Tensor& dest, const at::Tensor& weights,
                        const char* op) {
  check_dim(y, 2, op, "y", "[rows, H]");
  check_float(y, op, "y");
  check_dim(weights, 2, op, "weights", "[T, k]");
  check_dtype(weights, at::kFloat, op, "weights");
  check_dtype(dest, at::kInt, op, "dest");
  DISAGG_CHECK_VALUE(dest.numel() == weights.numel(), op, "dest must have T*k=", weights.numel(),
                     " entries, got ", dest.numel());
  check_same_device(y, dest, op, "dest");
  check_same_device(y, weights, op, "weights");
}

void check_combine_out(const at::Tensor& y, const at::Tensor& weights, const at::Tensor& out,
                       const char* op) {
  const int64_t T = weights.size(0), H = y.size(1);
  DISAGG_CHECK_VALUE(out.dim() == 2 && out.size(0) == T && out.size(1) == H, op,
                     "out must be [T=", T, ", H=", H, "], got ", out.sizes());
  DISAGG_CHECK_VALUE(out.scalar_type() == at::kFloat || out.scalar_type() == y.scalar_type(), op,
                     "out must be float32 or y's dtype ", y.scalar_type(), ", got ",
                     out.scalar_type());
  check_contiguous(out, op, "out");
  check_same_device(y, out, op, "out");
  DISAGG_CHECK_VALUE(at::get_overlap_status(out, y) == at::MemOverlapStatus::No, op,
                     "out must not overlap y (the rows are read while out is written)");
}

namespace {

void moe_permute_into_cpu_op(const at::Tensor& x, const at::Tensor& src, int64_t top_k,
                             at::Tensor& out) {
  const char* op = "moe_permute";
  check_permute_args(x, src, top_k, out);
  const int64_t rows = src.size(0), H = x.size(1);
  at::Tensor src_c = src.contiguous();
  Status s = DISAGG_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    return moe_permute_cpu<scalar_t>(reinterpret_cast<const scalar_t*>(x.data_ptr()), x.size(0), H,
                                     x.stride(0), src_c.data_ptr<int32_t>(), rows, top_k,
                                     reinterpret_cast<scalar_t*>(out.data_ptr()));
  });
  check_status(s, op, "src entries must be in [-1, T*top_k)");
}

at::Tensor moe_permute_cpu_op(const at::Tensor& x, const at::Tensor& src, int64_t top_k) {
  check_dim(x, 2, "moe_permute", "x", "[T, H]");
  check_dim(src, 1, "moe_permute", "src", "[rows]");
  at::Tensor out = empty_output({src.size(0), x.size(1)}, x.options());
  moe_permute_into_cpu_op(x, src, top_k, out);
  return out;
}

void run_combine(const at::Tensor& y, const at::Tensor& dest, const at::Tensor& weights,
                 at::Tensor& out, const char* op) {
  at::Tensor y_c = y.contiguous(), dest_c = dest.contiguous(), w_c = weights.contiguous();
  const int64_t T = weights.size(0), k = weights.size(1), H = y.size(1);
  const bool f32_out = out.scalar_type() == at::kFloat;
  Status s = DISAGG_DISPATCH_FLOAT(y.scalar_type(), op, [&] {
    const auto* yp = reinterpret_cast<const scalar_t*>(y_c.data_ptr());
    if (f32_out)
      return moe_combine_cpu<scalar_t, float, float>(yp, y.size(0), H, dest_c.data_ptr<int32_t>(),
                                                     w_c.data_ptr<float>(), T, k,
                                                     out.data_ptr<float>());
    return moe_combine_cpu<scalar_t, float, scalar_t>(yp, y.size(0), H, dest_c.data_ptr<int32_t>(),
                                                      w_c.data_ptr<float>(), T, k,
                                                      reinterpret_cast<scalar_t*>(out.data_ptr()));
  });
  check_status(s, op, "dest entries must be in [-1, rows)");
}

at::Tensor moe_combine_cpu_op(const at::Tensor& y, const at::Tensor& dest, const at::Tensor& weights,
                              c10::optional<at::ScalarType> out_dtype) {
  const char* op = "moe_combine";
  check_combine_args(y, dest, weights, op);
  const at::ScalarType od = out_dtype.value_or(y.scalar_type());
  DISAGG_CHECK_VALUE(od == at::kFloat || od == y.scalar_type(), op,
                     "out_dtype must be float32 or y's dtype, got ", od);
  at::Tensor out = empty_output({weights.size(0), y.size(1)}, y.options().dtype(od));
  run_combine(y, dest, weights, out, op);
  return out;
}

void moe_combine_into_cpu_op(const at::Tensor& y, const at::Tensor& dest, const at::Tensor& weights,
                             at::Tensor& out) {
  const char* op = "moe_combine_into";
  check_combine_args(y, dest, weights, op);
  check_combine_out(y, weights, out, op);
  run_combine(y, dest, weights, out, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) {
  m.impl("route", &route_cpu_op);
  m.impl("moe_layout", &moe_layout_cpu_op);
  m.impl("moe_permute", &moe_permute_cpu_op);
  m.impl("moe_permute_into", &moe_permute_into_cpu_op);
  m.impl("moe_combine", &moe_combine_cpu_op);
  m.impl("moe_combine_into", &moe_combine_into_cpu_op);
}

}  // namespace disagg
