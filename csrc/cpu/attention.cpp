// CPU implementation of paged decode attention: argument checks, then the torch-free kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "checks.h"
#include "disagg/attention.h"

namespace disagg {
namespace {

at::Tensor paged_decode_attention_cpu_op(const at::Tensor& q, const at::Tensor& kv_cache,
                                         const at::Tensor& block_tables,
                                         const at::Tensor& ctx_lens, double scale,
                                         int64_t sliding_window) {
  const char* op = "paged_decode_attention";
  check_paged_decode_attention(q, kv_cache, block_tables, ctx_lens, scale, sliding_window, op);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = kv_cache.size(3);
  at::Tensor q_c = q.contiguous(), bt = block_tables.contiguous(), cl = ctx_lens.contiguous();
  at::Tensor out = at::empty_like(q_c);
  if (B == 0) return out;
  Status s = DISAGG_DISPATCH_FLOAT(q.scalar_type(), op, [&] {
    const auto* qp = reinterpret_cast<const scalar_t*>(q_c.data_ptr());
    const auto* cp = reinterpret_cast<const scalar_t*>(kv_cache.data_ptr());
    auto* op_ = reinterpret_cast<scalar_t*>(out.data_ptr());
    if (bt.scalar_type() == at::kInt)
      return paged_decode_attention_cpu<scalar_t, int32_t>(
          qp, B, Hq, D, cp, kv_cache.size(0), kv_cache.size(2), Hkv, bt.data_ptr<int32_t>(),
          bt.size(1), cl.data_ptr<int32_t>(), static_cast<float>(scale), sliding_window, op_,
          at::get_num_threads());
    return paged_decode_attention_cpu<scalar_t, int64_t>(
        qp, B, Hq, D, cp, kv_cache.size(0), kv_cache.size(2), Hkv, bt.data_ptr<int64_t>(),
        bt.size(1), cl.data_ptr<int64_t>(), static_cast<float>(scale), sliding_window, op_,
          at::get_num_threads());
  });
  check_status(s, op,
               "ctx_lens must be in [1, max_blocks * block_size] and the blocks they use in "
               "[0, num_blocks)");
  return out;
}

at::Tensor paged_decode_attention_rope_cpu_op(const at::Tensor& qkv, const at::Tensor& cos,
                                              const at::Tensor& sin, at::Tensor& kv_cache,
                                              const at::Tensor& block_tables,
                                              const at::Tensor& ctx_lens, int64_t num_heads,
                                              double scale, int64_t sliding_window) {
  const char* op = "paged_decode_attention_rope";
  check_paged_decode_attention_rope(qkv, cos, sin, kv_cache, block_tables, ctx_lens, num_heads,
                                    scale, sliding_window, op);
  const int64_t B = qkv.size(0), Hkv = kv_cache.size(3), D = kv_cache.size(4);
  at::Tensor c = cos.contiguous(), s_ = sin.contiguous();
  at::Tensor bt = block_tables.contiguous(), cl = ctx_lens.contiguous();
  at::Tensor out = at::empty({B, num_heads, D}, qkv.options());
  if (B == 0) return out;
  at::Tensor qs = at::empty({B, num_heads, D}, qkv.options());
  Status st = DISAGG_DISPATCH_FLOAT(qkv.scalar_type(), op, [&] {
    const auto* xp = reinterpret_cast<const scalar_t*>(qkv.data_ptr());
    const auto* cp = reinterpret_cast<const scalar_t*>(c.data_ptr());
    const auto* sp = reinterpret_cast<const scalar_t*>(s_.data_ptr());
    auto* kp = reinterpret_cast<scalar_t*>(kv_cache.data_ptr());
    auto* qp = reinterpret_cast<scalar_t*>(qs.data_ptr());
    auto* op_ = reinterpret_cast<scalar_t*>(out.data_ptr());
    if (bt.scalar_type() == at::kInt)
      return paged_decode_attention_rope_cpu<scalar_t, int32_t>(
          xp, B, num_heads, D, cp, sp, kp, kv_cache.size(0), kv_cache.size(2), Hkv,
          bt.data_ptr<int32_t>(), bt.size(1), cl.data_ptr<int32_t>(), static_cast<float>(scale),
          sliding_window, qp, op_, at::get_num_threads());
    return paged_decode_attention_rope_cpu<scalar_t, int64_t>(
        xp, B, num_heads, D, cp, sp, kp, kv_cache.size(0), kv_cache.size(2), Hkv,
        bt.data_ptr<int64_t>(), bt.size(1), cl.data_ptr<int64_t>(), static_cast<float>(scale),
        sliding_window, qp, op_, at::get_num_threads());
  });
  check_status(st, op,
               "ctx_lens must be in [1, max_blocks * block_size] and the blocks they use in "
               "[0, num_blocks)");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention_cpu_op);
  m.impl("paged_decode_attention_rope", &paged_decode_attention_rope_cpu_op);
}

}  // namespace disagg
