// CPU implementations of the token-tree ops: argument checks, then the torch-free kernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <sstream>
#include <string>
#include <tuple>

#include "checks.h"
#include "disagg/tree.h"

namespace disagg {
namespace {

// Turns a kernel's TreeError into a message that names the argument and the element.
[[noreturn]] void throw_tree_error(const char* op, const TreeError& e, int64_t N, int64_t V,
                                   int64_t D) {
  std::ostringstream m;
  m << "disagg." << op << ": ";
  switch (e.kind) {
    case TreeErrorKind::kNumNodes:
      m << "num_nodes[" << e.b << "] = " << static_cast<int64_t>(e.value) << " must be in [1, N="
        << N << "]";
      break;
    case TreeErrorKind::kRoot:
      m << "parents[" << e.b << ", 0] = " << static_cast<int64_t>(e.value)
        << " must be -1 (node 0 is the root)";
      break;
    case TreeErrorKind::kParent:
      m << "parents is not a tree: parents[" << e.b << ", " << e.i << "] = "
        << static_cast<int64_t>(e.value) << " must be in [0, " << e.i
        << ") (a parent precedes its child; anything else is a forward reference, a cycle or out "
           "of range)";
      break;
    case TreeErrorKind::kDepth:
      m << "max_depth: node " << e.i << " of request " << e.b << " has depth "
        << static_cast<int64_t>(e.value) << " > max_depth=" << D - 1;
      break;
    case TreeErrorKind::kToken:
      m << "tokens[" << e.b << ", " << e.i << "] = " << static_cast<int64_t>(e.value)
        << " must be in [0, V=" << V << ")";
      break;
    case TreeErrorKind::kTemperature:
      m << "temperature[" << e.b << "] = " << e.value << " must be finite and >= 0";
      break;
    case TreeErrorKind::kTopK:
      m << "top_k[" << e.b << "] = " << static_cast<int64_t>(e.value) << " must be >= 0 (0 = off)";
      break;
    case TreeErrorKind::kTopP:
      m << "top_p[" << e.b << "] = " << e.value << " must be in (0, 1]";
      break;
    case TreeErrorKind::kNone:
      m << "invalid argument";
      break;
  }
  TORCH_CHECK_VALUE(false, m.str());
}

// Parents [B, N], num_nodes [B] and (optionally) tokens [B, N], checked and widened to int64
// (a copy of O(B*N) integers; the kernels then never see two index types).
struct TreeInputs {
  at::Tensor parents, num_nodes, tokens;
  TreeBatch batch;
};

TreeInputs tree_inputs(const char* op, const at::Tensor& parents, const at::Tensor& num_nodes,
                       const at::Tensor* tokens) {
  check_dim(parents, 2, op, "parents", "[B, N]");
  check_index(parents, op, "parents");
  check_dim(num_nodes, 1, op, "num_nodes", "[B]");
  check_index(num_nodes, op, "num_nodes");
  check_same_device(parents, num_nodes, op, "num_nodes");
  const int64_t B = parents.size(0), N = parents.size(1);
  DISAGG_CHECK_VALUE(N >= 1, op, "parents must have at least one node column (the root), got N=0");
  DISAGG_CHECK_VALUE(num_nodes.size(0) == B, op, "num_nodes must have B=", B, " entries, got ",
                     num_nodes.size(0));
  TreeInputs in;
  in.parents = parents.to(at::kLong).contiguous();
  in.num_nodes = num_nodes.to(at::kLong).contiguous();
  in.batch.parents = in.parents.data_ptr<int64_t>();
  in.batch.num_nodes = in.num_nodes.data_ptr<int64_t>();
  in.batch.batch = B;
  in.batch.nodes = N;
  if (tokens) {
    check_dim(*tokens, 2, op, "tokens", "[B, N]");
    check_index(*tokens, op, "tokens");
    check_same_device(parents, *tokens, op, "tokens");
    DISAGG_CHECK_VALUE(tokens->sizes() == parents.sizes(), op, "tokens must have the shape of parents ",
                       parents.sizes(), ", got ", tokens->sizes());
    in.tokens = tokens->to(at::kLong).contiguous();
    in.batch.tokens = in.tokens.data_ptr<int64_t>();
  }
  return in;
}

void check_logits(const char* op, const char* name, const at::Tensor& x, const at::Tensor& parents) {
  check_dim(x, 3, op, name, "[B, N, V]");
  check_float(x, op, name);
  check_same_device(parents, x, op, name);
  DISAGG_CHECK_VALUE(x.size(0) == parents.size(0) && x.size(1) == parents.size(1), op, name,
                     " must be [B, N, V] with [B, N] = ", parents.sizes(), ", got ", x.sizes());
  DISAGG_CHECK_VALUE(x.size(2) >= 1, op, name, " must have V >= 1");
}

template <typename T>
RowsView<T> rows_view(const at::Tensor& x) {
  RowsView<T> r;
  r.data = reinterpret_cast<const T*>(x.data_ptr());
  r.stride_b = x.stride(0);
  r.stride_n = x.stride(1);
  r.vocab = x.size(2);
  return r;
}

// Rows must be contiguous over the vocabulary; a batch/node stride is fine (e.g. a slice of a
// larger logits buffer is used in place, never copied).
at::Tensor rows_contiguous(const at::Tensor& x) {
  return (x.stride(2) == 1 || x.size(2) == 1) ? x : x.contiguous();
}

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

std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_outputs(const at::Tensor& like, int64_t B,
                                                              int64_t N, VerifyOut* o) {
  auto i32 = like.options().dtype(at::kInt);
  at::Tensor accepted = at::empty({B, N}, i32), len = at::empty({B}, i32), bonus = at::empty({B}, i32);
  o->accepted = accepted.data_ptr<int32_t>();
  o->accept_len = len.data_ptr<int32_t>();
  o->bonus = bonus.data_ptr<int32_t>();
  return {accepted, len, bonus};
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

at::Tensor per_request(const char* op, const char* name, const at::Tensor& t, int64_t B,
                       const at::Tensor& like, bool is_float) {
  check_dim(t, 1, op, name, "[B]");
  DISAGG_CHECK_VALUE(t.size(0) == B, op, name, " must have B=", B, " entries, got ", t.size(0));
  check_same_device(like, t, op, name);
  if (is_float) {
    DISAGG_CHECK_VALUE(at::isFloatingType(t.scalar_type()), op, name,
                       " must be a floating tensor, got ", t.scalar_type());
    return t.to(at::kFloat).contiguous();
  }
  check_index(t, op, name);
  return t.to(at::kLong).contiguous();
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
