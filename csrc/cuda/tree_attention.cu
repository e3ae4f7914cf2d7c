// CUDA implementation of paged_tree_attention: the CPU op's argument checks, the index tensors'
// values checked on the host with the CPU kernel's own check (one copy of a few small integer
// tensors, so bad input gets the same error as on the CPU), then the torch-free kernel of
// include/disagg/tree_attention.cuh on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "checks.h"
#include "cuda/cuda_checks.h"
#include "disagg/tree_attention.cuh"
#include "disagg/tree_attention.h"

namespace disagg {
namespace {

namespace dt = cuda::tree_attention;

at::Tensor paged_tree_attention_cuda_op(const at::Tensor& q, const at::Tensor& kv_cache,
                                        const at::Tensor& block_tables,
                                        const at::Tensor& ctx_lens, const at::Tensor& tree_lens,
                                        const at::Tensor& q_offsets, const at::Tensor& tree_mask,
                                        double scale, int64_t sliding_window) {
  const char* op = "paged_tree_attention";
  check_paged_tree_attention(q, kv_cache, block_tables, ctx_lens, tree_lens, q_offsets, tree_mask,
                             scale, sliding_window, op);
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t B = block_tables.size(0), Hkv = kv_cache.size(3);
  DISAGG_CHECK_VALUE(D <= dt::kMaxHeadDim, op, "head_dim must be at most ", dt::kMaxHeadDim,
                     " on CUDA, got ", D);
  DISAGG_CHECK_VALUE(B >= 1, op, "block_tables must have at least one row");
  c10::cuda::CUDAGuard guard(q.device());
  // One index type on both sides; host copies for the value checks.
  const at::Tensor bt = block_tables.to(at::kLong).contiguous();
  const at::Tensor cl = ctx_lens.to(at::kLong).contiguous();
  const at::Tensor tl = tree_lens.to(at::kLong).contiguous();
  const at::Tensor qo = q_offsets.to(at::kLong).contiguous();
  const at::Tensor tm = tree_mask.contiguous();
  {
    const at::Tensor hbt = bt.cpu(), hcl = cl.cpu(), htl = tl.cpu(), hqo = qo.cpu(),
                     htm = tm.cpu();
    const char* what = nullptr;
    const Status st = paged_tree_attention_check<int64_t>(
        T, B, kv_cache.size(0), kv_cache.size(2), hbt.data_ptr<int64_t>(), bt.size(1),
        hcl.data_ptr<int64_t>(), htl.data_ptr<int64_t>(), hqo.data_ptr<int64_t>(),
        htm.data_ptr<int32_t>(), tm.size(1), &what);
    check_status(st, op, what ? what : "bad arguments");
  }
  const at::Tensor q_c = q.contiguous();
  at::Tensor out = at::empty_like(q_c);
  if (T == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(q.scalar_type(), op, [&] {
    return dt::paged_tree_attention<scalar_t, int64_t>(
        reinterpret_cast<const scalar_t*>(q_c.data_ptr()), T, Hq, D,
        reinterpret_cast<const scalar_t*>(kv_cache.data_ptr()), kv_cache.size(2), Hkv,
        bt.data_ptr<int64_t>(), bt.size(1), cl.data_ptr<int64_t>(), tl.data_ptr<int64_t>(),
        qo.data_ptr<int64_t>(), B, tm.data_ptr<int32_t>(), tm.size(1),
        static_cast<float>(scale), sliding_window, reinterpret_cast<scalar_t*>(out.data_ptr()),
        stream);
  });
  check_cuda(err, op);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CUDA, m) {
  m.impl("paged_tree_attention", &paged_tree_attention_cuda_op);
}

}  // namespace disagg
