// CPU implementations of the token-tree ops: argument checks, then the torch-free kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <tuple>

#include "checks.h"
#include "disagg/tree.h"
#include "tree_checks.h"

namespace disagg {
namespace {

using namespace tree_checks;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tree_build_cpu_op(
    const at::Tensor& parents, const at::Tensor& num_nodes, int64_t max_depth) {
  const char* op = "tree_build";
  TreeInputs in = tree_inputs(op, parents, num_nodes, nullptr);
  const int64_t B = in.batch.batch, N = in.batch.nodes, W = (N + 31) / 32;
  DISAGG_CHECK_VALUE(max_depth >= -1 && max_depth < N, op, "max_depth must be -1 (= N-1) or in [0, N=",
                     N, "), got ", max_depth);
  const int64_t D = max_depth < 0 ? N : max_depth + 1;
  auto i32 = parents.options().dtype(at::kInt);
  at::Tensor depth = at::empty({B, N}, i32), mask = at::empty({B, N, W}, i32);
  at::Tensor fc = at::empty({B, N}, i32), ns = at::empty({B, N}, i32);
  at::Tensor paths = at::empty({B, N, D}, i32), leaves = at::empty({B}, i32);
  TreeError err;
  Status s = tree_build_cpu(in.batch, D, depth.data_ptr<int32_t>(), mask.data_ptr<int32_t>(),
                            fc.data_ptr<int32_t>(), ns.data_ptr<int32_t>(), paths.data_ptr<int32_t>(),
                            leaves.data_ptr<int32_t>(), &err);
  if (s != Status::kOk) throw_tree_error(op, err, N, 0, D);
  return {depth, mask, fc, ns, paths, leaves};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_greedy_cpu_op(
    const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& parents,
    const at::Tensor& num_nodes) {
  const char* op = "tree_verify_greedy";
  TreeInputs in = tree_inputs(op, parents, num_nodes, &tokens);
  const int64_t B = in.batch.batch, N = in.batch.nodes;
  VerifyOut o;
  auto out = verify_outputs(parents, B, N, &o);
  TreeError err;
  Status s;
  int64_t V = 0;
  if (logits.dim() == 2 && (logits.scalar_type() == at::kInt || logits.scalar_type() == at::kLong)) {
    // The target's choices were computed elsewhere (e.g. a fused argmax in the LM head).
    check_same_device(parents, logits, op, "logits");
    DISAGG_CHECK_VALUE(logits.sizes() == parents.sizes(), op,
                       "logits given as target ids must be [B, N] = ", parents.sizes(), ", got ",
                       logits.sizes());
    at::Tensor ids = logits.to(at::kLong).contiguous();
    s = tree_verify_greedy_ids_cpu(ids.data_ptr<int64_t>(), N, in.batch, o, &err);
  } else {
    check_logits(op, "logits", logits, parents);
    at::Tensor x = rows_contiguous(logits);
    V = x.size(2);
    s = DISAGG_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
      return tree_verify_greedy_cpu<scalar_t>(rows_view<scalar_t>(x), in.batch, o, &err);
    });
  }
  if (s != Status::kOk) throw_tree_error(op, err, N, V, 0);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_sample_cpu_op(
    const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& parents,
    const at::Tensor& num_nodes, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset,
    const c10::optional<at::Tensor>& draft_probs) {
  const char* op = "tree_verify_sample";
  TreeInputs in = tree_inputs(op, parents, num_nodes, &tokens);
  const int64_t B = in.batch.batch, N = in.batch.nodes;
  check_logits(op, "logits", logits, parents);
  at::Tensor temp = per_request(op, "temperature", temperature, B, parents, true);
  at::Tensor tk = per_request(op, "top_k", top_k, B, parents, false);
  at::Tensor tp = per_request(op, "top_p", top_p, B, parents, true);
  at::Tensor sd = per_request(op, "seed", seed, B, parents, false);
  at::Tensor off = per_request(op, "offset", offset, B, parents, false);
  at::Tensor x = rows_contiguous(logits);
  const int64_t V = x.size(2);
  at::Tensor q;
  if (draft_probs.has_value()) {
    check_logits(op, "draft_probs", *draft_probs, parents);
    DISAGG_CHECK_VALUE(draft_probs->size(2) == V, op, "draft_probs must have the vocabulary of logits V=",
                       V, ", got ", draft_probs->size(2));
    q = rows_contiguous(*draft_probs);
  }
  SampleParams sp;
  sp.temperature = temp.data_ptr<float>();
  sp.top_k = tk.data_ptr<int64_t>();
  sp.top_p = tp.data_ptr<float>();
  sp.seed = sd.data_ptr<int64_t>();
  sp.offset = off.data_ptr<int64_t>();
  VerifyOut o;
  auto out = verify_outputs(parents, B, N, &o);
  TreeError err;
  Status s = DISAGG_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    using logit_t = scalar_t;
    const RowsView<logit_t> lv = rows_view<logit_t>(x);
    if (!q.defined()) return tree_verify_sample_cpu<logit_t, float>(lv, nullptr, in.batch, sp, o, &err);
    return DISAGG_DISPATCH_FLOAT(q.scalar_type(), op, [&] {
      const RowsView<scalar_t> qv = rows_view<scalar_t>(q);
      return tree_verify_sample_cpu<logit_t, scalar_t>(lv, &qv, in.batch, sp, o, &err);
    });
  });
  if (s != Status::kOk) throw_tree_error(op, err, N, V, 0);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) {
  m.impl("tree_build", &tree_build_cpu_op);
  m.impl("tree_verify_greedy", &tree_verify_greedy_cpu_op);
  m.impl("tree_verify_sample", &tree_verify_sample_cpu_op);
}

}  // namespace disagg
