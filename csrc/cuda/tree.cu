// CUDA implementations of the token-tree ops: the argument checks of csrc/tree_checks.h (shared
// with the CPU ops), then the torch-free kernels of include/disagg/tree.cuh on the current
// stream. Nothing here synchronizes with the host: value errors (a malformed tree, a token out
// of range, a bad sampling parameter) give the documented sentinel outputs instead of raising.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "checks.h"
#include "disagg/tree.cuh"
#include "tree_checks.h"

namespace disagg {
namespace {

using namespace tree_checks;

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "disagg.", op, ": CUDA error: ", cudaGetErrorString(err));
}

void check_on_cuda(const at::Tensor& t, const char* op, const char* name) {
  DISAGG_CHECK_VALUE(t.is_cuda(), op, name, " must be a CUDA tensor, got ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> tree_build_cuda_op(
    const at::Tensor& parents, const at::Tensor& num_nodes, int64_t max_depth) {
  const char* op = "tree_build";
  check_on_cuda(parents, op, "parents");
  TreeInputs in = tree_inputs(op, parents, num_nodes, nullptr);
  const int64_t B = in.batch.batch, N = in.batch.nodes, W = (N + 31) / 32;
  DISAGG_CHECK_VALUE(max_depth >= -1 && max_depth < N, op, "max_depth must be -1 (= N-1) or in [0, N=",
                     N, "), got ", max_depth);
  const int64_t D = max_depth < 0 ? N : max_depth + 1;
  c10::cuda::CUDAGuard guard(parents.device());
  auto i32 = parents.options().dtype(at::kInt);
  at::Tensor depth = at::empty({B, N}, i32), mask = at::empty({B, N, W}, i32);
  at::Tensor fc = at::empty({B, N}, i32), ns = at::empty({B, N}, i32);
  at::Tensor paths = at::empty({B, N, D}, i32), leaves = at::empty({B}, i32);
  cuda::tree::BuildOut o{depth.data_ptr<int32_t>(), mask.data_ptr<int32_t>(), fc.data_ptr<int32_t>(),
                         ns.data_ptr<int32_t>(),    paths.data_ptr<int32_t>(), leaves.data_ptr<int32_t>()};
  check_cuda(cuda::tree::tree_build(in.batch.parents, in.batch.num_nodes, B, N, D, o,
                                    c10::cuda::getCurrentCUDAStream()),
             op);
  return {depth, mask, fc, ns, paths, leaves};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_greedy_cuda_op(
    const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& parents,
    const at::Tensor& num_nodes) {
  const char* op = "tree_verify_greedy";
  check_on_cuda(parents, op, "parents");
  TreeInputs in = tree_inputs(op, parents, num_nodes, &tokens);
  const int64_t B = in.batch.batch, N = in.batch.nodes;
  c10::cuda::CUDAGuard guard(parents.device());
  VerifyOut o;
  auto out = verify_outputs(parents, B, N, &o);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if (logits.dim() == 2 && (logits.scalar_type() == at::kInt || logits.scalar_type() == at::kLong)) {
    check_same_device(parents, logits, op, "logits");
    DISAGG_CHECK_VALUE(logits.sizes() == parents.sizes(), op,
                       "logits given as target ids must be [B, N] = ", parents.sizes(), ", got ",
                       logits.sizes());
    const at::Tensor ids = logits.to(at::kLong).contiguous();
    err = cuda::tree::tree_verify_greedy<float>(nullptr, 0, 0, 0, ids.data_ptr<int64_t>(),
                                                in.batch.tokens, in.batch.parents,
                                                in.batch.num_nodes, B, N, o.accepted, o.accept_len,
                                                o.bonus, stream);
  } else {
    check_logits(op, "logits", logits, parents);
    const at::Tensor x = rows_contiguous(logits);
    err = DISAGG_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
      return cuda::tree::tree_verify_greedy<scalar_t>(
          reinterpret_cast<const scalar_t*>(x.data_ptr()), x.stride(0), x.stride(1), x.size(2),
          nullptr, in.batch.tokens, in.batch.parents, in.batch.num_nodes, B, N, o.accepted,
          o.accept_len, o.bonus, stream);
    });
  }
  check_cuda(err, op);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_sample_cuda_op(
    const at::Tensor& logits, const at::Tensor& tokens, const at::Tensor& parents,
    const at::Tensor& num_nodes, const at::Tensor& temperature, const at::Tensor& top_k,
    const at::Tensor& top_p, const at::Tensor& seed, const at::Tensor& offset,
    const c10::optional<at::Tensor>& draft_probs) {
  const char* op = "tree_verify_sample";
  check_on_cuda(parents, op, "parents");
  TreeInputs in = tree_inputs(op, parents, num_nodes, &tokens);
  const int64_t B = in.batch.batch, N = in.batch.nodes;
  check_logits(op, "logits", logits, parents);
  c10::cuda::CUDAGuard guard(parents.device());
  // per-request parameters stay on the device (converted there): no host synchronization
  const at::Tensor temp = per_request(op, "temperature", temperature, B, parents, true);
  const at::Tensor tk = per_request(op, "top_k", top_k, B, parents, false);
  const at::Tensor tp = per_request(op, "top_p", top_p, B, parents, true);
  const at::Tensor sd = per_request(op, "seed", seed, B, parents, false);
  const at::Tensor off = per_request(op, "offset", offset, B, parents, false);
  const at::Tensor x = rows_contiguous(logits);
  const int64_t V = x.size(2);
  DISAGG_CHECK_VALUE(V <= INT32_MAX, op, "logits must have V < 2^31, got ", V);
  at::Tensor q;
  if (draft_probs.has_value()) {
    check_logits(op, "draft_probs", *draft_probs, parents);
    DISAGG_CHECK_VALUE(draft_probs->size(2) == V, op, "draft_probs must have the vocabulary of logits V=",
                       V, ", got ", draft_probs->size(2));
    q = rows_contiguous(*draft_probs);
  }
  VerifyOut o;
  auto out = verify_outputs(parents, B, N, &o);
  const at::Tensor ws = at::empty({static_cast<int64_t>(cuda::tree::sample_workspace(B, V)) + 1},
                                  parents.options().dtype(at::kByte));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(x.scalar_type(), op, [&] {
    using logit_t = scalar_t;
    const auto* lp = reinterpret_cast<const logit_t*>(x.data_ptr());
    auto launch = [&](const auto* qp, int64_t qsb, int64_t qsn) {
      using Q = std::remove_const_t<std::remove_pointer_t<decltype(qp)>>;
      return cuda::tree::tree_verify_sample<logit_t, Q>(
          lp, x.stride(0), x.stride(1), V, qp, qsb, qsn, in.batch.tokens, in.batch.parents,
          in.batch.num_nodes, B, N, temp.data_ptr<float>(), tk.data_ptr<int64_t>(),
          tp.data_ptr<float>(), sd.data_ptr<int64_t>(), off.data_ptr<int64_t>(), ws.data_ptr(),
          o.accepted, o.accept_len, o.bonus, stream);
    };
    if (!q.defined()) return launch(static_cast<const float*>(nullptr), 0, 0);
    return DISAGG_DISPATCH_FLOAT(q.scalar_type(), op, [&] {
      return launch(reinterpret_cast<const scalar_t*>(q.data_ptr()), q.stride(0), q.stride(1));
    });
  });
  check_cuda(err, op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CUDA, m) {
  m.impl("tree_build", &tree_build_cuda_op);
  m.impl("tree_verify_greedy", &tree_verify_greedy_cuda_op);
  m.impl("tree_verify_sample", &tree_verify_sample_cuda_op);
}

}  // namespace disagg
