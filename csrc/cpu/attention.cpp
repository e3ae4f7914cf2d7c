// CPU implementation of paged decode attention: argument checks, then the torch-free kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "disagg/attention.h"

namespace disagg {
namespace {

at::Tensor paged_decode_attention_cpu_op(const at::Tensor& q, const at::Tensor& kv_cache,
                                         const at::Tensor& block_tables,
                                         const at::Tensor& ctx_lens, double scale,
                                         int64_t sliding_window) {
  const char* op = "paged_decode_attention";
  check_dim(q, 3, op, "q", "[B, Hq, D]");
  check_float(q, op, "q");
  check_dim(kv_cache, 5, op, "kv_cache", "[num_blocks, 2, block_size, Hkv, D]");
  check_dtype(kv_cache, q.scalar_type(), op, "kv_cache");
  check_contiguous(kv_cache, op, "kv_cache");
  DISAGG_CHECK_VALUE(kv_cache.size(1) == 2, op, "kv_cache dim 1 must be 2 (K, V), got ",
                     kv_cache.size(1));
  check_dim(block_tables, 2, op, "block_tables", "[B, max_blocks]");
  check_index(block_tables, op, "block_tables");
  check_dim(ctx_lens, 1, op, "ctx_lens", "[B]");
  DISAGG_CHECK_VALUE(ctx_lens.scalar_type() == block_tables.scalar_type(), op,
                     "ctx_lens must have block_tables' dtype ", block_tables.scalar_type(),
                     ", got ", ctx_lens.scalar_type());
  check_same_device(q, kv_cache, op, "kv_cache");
  check_same_device(q, block_tables, op, "block_tables");
  check_same_device(q, ctx_lens, op, "ctx_lens");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = kv_cache.size(3);
  DISAGG_CHECK_VALUE(kv_cache.size(4) == D, op, "kv_cache head_dim must equal q's ", D, ", got ",
                     kv_cache.size(4));
  DISAGG_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, op, "q heads (", Hq,
                     ") must be a multiple of kv_cache heads (", Hkv, ")");
  DISAGG_CHECK_VALUE(block_tables.size(0) == B, op, "block_tables must have B=", B,
                     " rows, got ", block_tables.size(0));
  DISAGG_CHECK_VALUE(ctx_lens.size(0) == B, op, "ctx_lens must have B=", B, " entries, got ",
                     ctx_lens.size(0));
  DISAGG_CHECK_VALUE(std::isfinite(scale), op, "scale must be finite, got ", scale);
  DISAGG_CHECK_VALUE(sliding_window >= 0, op, "sliding_window must be >= 0, got ", sliding_window);
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

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention_cpu_op);
}

}  // namespace disagg
