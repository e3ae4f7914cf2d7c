// CUDA implementation of paged_decode_attention: the CPU op's argument checks, then the
// torch-free split-K kernel of include/disagg/attention.cuh on the current stream. Nothing
// synchronizes (context lengths and block ids are checked on the device: a sequence with a bad
// one gets NaN rows, see attention.cuh), so decode steps can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "checks.h"
#include "cuda/cuda_checks.h"
#include "disagg/attention.cuh"
#include "disagg/layers.cuh"

namespace disagg {
namespace {

namespace att = cuda::attention;

int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 1;
  }
  return n;
}

at::Tensor paged_decode_attention_cuda_op(const at::Tensor& q, const at::Tensor& kv_cache,
                                          const at::Tensor& block_tables,
                                          const at::Tensor& ctx_lens, double scale,
                                          int64_t sliding_window) {
  const char* op = "paged_decode_attention";
  check_paged_decode_attention(q, kv_cache, block_tables, ctx_lens, scale, sliding_window, op);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t num_blocks = kv_cache.size(0), block_size = kv_cache.size(2);
  const int64_t Hkv = kv_cache.size(3), max_blocks = block_tables.size(1);
  DISAGG_CHECK_VALUE(D <= att::kMaxHeadDim, op, "head_dim must be at most ", att::kMaxHeadDim,
                     " on CUDA, got ", D);
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor q_c = q.contiguous();
  at::Tensor out = at::empty_like(q_c);
  if (B == 0) return out;
  // one index type on the device (no-ops for int64 inputs)
  const at::Tensor bt = block_tables.to(at::kLong).contiguous();
  const at::Tensor cl = ctx_lens.to(at::kLong).contiguous();
  att::Plan plan;
  check_cuda(att::make_plan(B, Hq, Hkv, D, block_size, max_blocks, sliding_window,
                            sm_count(q.get_device()), &plan),
             op);
  at::Tensor ws;
  if (plan.workspace_bytes > 0)
    ws = at::empty({static_cast<int64_t>(plan.workspace_bytes)}, q.options().dtype(at::kByte));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(q.scalar_type(), op, [&] {
    return att::paged_decode_attention<scalar_t>(
        reinterpret_cast<const scalar_t*>(q_c.data_ptr()),
        reinterpret_cast<const scalar_t*>(kv_cache.data_ptr()), num_blocks, block_size,
        bt.data_ptr<int64_t>(), max_blocks, cl.data_ptr<int64_t>(), static_cast<float>(scale),
        sliding_window, reinterpret_cast<scalar_t*>(out.data_ptr()), plan,
        ws.defined() ? ws.data_ptr() : nullptr, stream);
  });
  check_cuda(err, op);
  return out;
}

// RoPE on q and k and the new K/V written at position ctx_lens - 1 (layers.cuh), then the
// split-K decode kernel on the rotated q: two launches, no host synchronization.
at::Tensor paged_decode_attention_rope_cuda_op(const at::Tensor& qkv, const at::Tensor& cos,
                                               const at::Tensor& sin, at::Tensor& kv_cache,
                                               const at::Tensor& block_tables,
                                               const at::Tensor& ctx_lens, int64_t num_heads,
                                               double scale, int64_t sliding_window) {
  const char* op = "paged_decode_attention_rope";
  check_paged_decode_attention_rope(qkv, cos, sin, kv_cache, block_tables, ctx_lens, num_heads,
                                    scale, sliding_window, op);
  const int64_t B = qkv.size(0), Hkv = kv_cache.size(3), D = kv_cache.size(4);
  DISAGG_CHECK_VALUE(D <= att::kMaxHeadDim, op, "head_dim must be at most ", att::kMaxHeadDim,
                     " on CUDA, got ", D);
  c10::cuda::CUDAGuard guard(qkv.device());
  if (B == 0) return at::empty({0, num_heads, D}, qkv.options());
  const at::Tensor c = cos.contiguous(), s_ = sin.contiguous();
  const at::Tensor bt = block_tables.to(at::kLong).contiguous();
  const at::Tensor cl = ctx_lens.to(at::kLong).contiguous();
  at::Tensor qs = at::empty({B, num_heads, D}, qkv.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(qkv.scalar_type(), op, [&] {
    return cuda::layers::rope_write<scalar_t, int64_t>(
        reinterpret_cast<const scalar_t*>(qkv.data_ptr()), B, num_heads, Hkv, D,
        reinterpret_cast<const scalar_t*>(c.data_ptr()),
        reinterpret_cast<const scalar_t*>(s_.data_ptr()),
        reinterpret_cast<scalar_t*>(kv_cache.data_ptr()), kv_cache.size(0), kv_cache.size(2),
        bt.data_ptr<int64_t>(), bt.size(1), cl.data_ptr<int64_t>(),
        reinterpret_cast<scalar_t*>(qs.data_ptr()), stream);
  });
  check_cuda(err, op);
  return paged_decode_attention_cuda_op(qs, kv_cache, bt, cl, scale, sliding_window);
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CUDA, m) {
  m.impl("paged_decode_attention", &paged_decode_attention_cuda_op);
  m.impl("paged_decode_attention_rope", &paged_decode_attention_rope_cuda_op);
}

}  // namespace disagg
