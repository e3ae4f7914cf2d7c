// Argument checks of the token-tree ops, shared by the CPU (csrc/cpu/tree.cpp) and CUDA
// (csrc/cuda/tree.cu) implementations: shapes, dtypes and devices raise the same errors on both;
// value errors found by a kernel (TreeError) become the same messages.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>
#include <tuple>

#include "checks.h"
#include "disagg/tree.h"

namespace disagg {
namespace tree_checks {

// Turns a kernel's TreeError into a message that names the argument and the element.
[[noreturn]] inline void throw_tree_error(const char* op, const TreeError& e, int64_t N, int64_t V,
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

inline TreeInputs tree_inputs(const char* op, const at::Tensor& parents, const at::Tensor& num_nodes,
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

inline void check_logits(const char* op, const char* name, const at::Tensor& x, const at::Tensor& parents) {
  check_dim(x, 3, op, name, "[B, N, V]");
  check_float(x, op, name);
  check_same_device(parents, x, op, name);
  DISAGG_CHECK_VALUE(x.size(0) == parents.size(0) && x.size(1) == parents.size(1), op, name,
                     " must be [B, N, V] with [B, N] = ", parents.sizes(), ", got ", x.sizes());
  DISAGG_CHECK_VALUE(x.size(2) >= 1, op, name, " must have V >= 1");
}

template <typename T>
inline RowsView<T> rows_view(const at::Tensor& x) {
  RowsView<T> r;
  r.data = reinterpret_cast<const T*>(x.data_ptr());
  r.stride_b = x.stride(0);
  r.stride_n = x.stride(1);
  r.vocab = x.size(2);
  return r;
}

// Rows must be contiguous over the vocabulary; a batch/node stride is fine (e.g. a slice of a
// larger logits buffer is used in place, never copied).
inline at::Tensor rows_contiguous(const at::Tensor& x) {
  return (x.stride(2) == 1 || x.size(2) == 1) ? x : x.contiguous();
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> verify_outputs(const at::Tensor& like, int64_t B,
                                                              int64_t N, VerifyOut* o) {
  auto i32 = like.options().dtype(at::kInt);
  at::Tensor accepted = at::empty({B, N}, i32), len = at::empty({B}, i32), bonus = at::empty({B}, i32);
  o->accepted = accepted.data_ptr<int32_t>();
  o->accept_len = len.data_ptr<int32_t>();
  o->bonus = bonus.data_ptr<int32_t>();
  return {accepted, len, bonus};
}

inline at::Tensor per_request(const char* op, const char* name, const at::Tensor& t, int64_t B,
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

}  // namespace tree_checks
}  // namespace disagg
