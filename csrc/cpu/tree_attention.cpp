// CPU implementation of paged tree attention: argument checks, then the torch-free kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_checks.h"
#include "checks.h"
#include "disagg/tree_attention.h"

namespace disagg {
namespace {

at::Tensor paged_tree_attention_cpu_op(const at::Tensor& q, const at::Tensor& kv_cache,
                                       const at::Tensor& block_tables, const at::Tensor& ctx_lens,
                                       const at::Tensor& tree_lens, const at::Tensor& q_offsets,
                                       const at::Tensor& tree_mask, double scale,
                                       int64_t sliding_window) {
  const char* op = "paged_tree_attention";
  check_dim(q, 3, op, "q", "[T, Hq, D]");
  check_float(q, op, "q");
  check_paged_kv_cache(kv_cache, q.scalar_type(), op);
  check_dim(block_tables, 2, op, "block_tables", "[B, max_blocks]");
  check_index(block_tables, op, "block_tables");
  const auto idx = block_tables.scalar_type();
  check_dim(ctx_lens, 1, op, "ctx_lens", "[B]");
  check_dtype(ctx_lens, idx, op, "ctx_lens");
  check_dim(tree_lens, 1, op, "tree_lens", "[B]");
  check_dtype(tree_lens, idx, op, "tree_lens");
  check_dim(q_offsets, 1, op, "q_offsets", "[B + 1]");
  check_dtype(q_offsets, idx, op, "q_offsets");
  check_dim(tree_mask, 2, op, "tree_mask", "[T, W]");
  check_dtype(tree_mask, at::kInt, op, "tree_mask");
  for (const auto* p : {&kv_cache, &block_tables, &ctx_lens, &tree_lens, &q_offsets, &tree_mask}) {
    const char* name = p == &kv_cache ? "kv_cache" : p == &block_tables ? "block_tables"
                     : p == &ctx_lens ? "ctx_lens" : p == &tree_lens ? "tree_lens"
                     : p == &q_offsets ? "q_offsets" : "tree_mask";
    check_same_device(q, *p, op, name);
  }
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t B = block_tables.size(0);
  const int64_t Hkv = kv_cache.size(3);
  DISAGG_CHECK_VALUE(kv_cache.size(4) == D, op, "kv_cache head_dim must equal q's ", D, ", got ",
                     kv_cache.size(4));
  DISAGG_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, op, "q heads (", Hq,
                     ") must be a multiple of kv_cache heads (", Hkv, ")");
  DISAGG_CHECK_VALUE(ctx_lens.size(0) == B, op, "ctx_lens must have B=", B, " entries, got ",
                     ctx_lens.size(0));
  DISAGG_CHECK_VALUE(tree_lens.size(0) == B, op, "tree_lens must have B=", B, " entries, got ",
                     tree_lens.size(0));
  DISAGG_CHECK_VALUE(q_offsets.size(0) == B + 1, op, "q_offsets must have B+1=", B + 1,
                     " entries, got ", q_offsets.size(0));
  DISAGG_CHECK_VALUE(tree_mask.size(0) == T, op, "tree_mask must have T=", T,
                     " rows (one per query), got ", tree_mask.size(0));
  DISAGG_CHECK_VALUE(tree_mask.size(1) >= 1, op, "tree_mask must have at least one word per row");
  check_scale_window(scale, sliding_window, op);
  at::Tensor q_c = q.contiguous(), bt = block_tables.contiguous(), cl = ctx_lens.contiguous();
  at::Tensor tl = tree_lens.contiguous(), qo = q_offsets.contiguous(), tm = tree_mask.contiguous();
  at::Tensor out = at::empty_like(q_c);
  const char* what = nullptr;
  Status s = DISAGG_DISPATCH_FLOAT(q.scalar_type(), op, [&] {
    const auto* qp = reinterpret_cast<const scalar_t*>(q_c.data_ptr());
    const auto* cp = reinterpret_cast<const scalar_t*>(kv_cache.data_ptr());
    auto* op_ = reinterpret_cast<scalar_t*>(out.data_ptr());
    const int32_t* mp = tm.data_ptr<int32_t>();
    if (idx == at::kInt)
      return paged_tree_attention_cpu<scalar_t, int32_t>(
          qp, T, Hq, D, cp, kv_cache.size(0), kv_cache.size(2), Hkv, bt.data_ptr<int32_t>(),
          bt.size(1), cl.data_ptr<int32_t>(), tl.data_ptr<int32_t>(), qo.data_ptr<int32_t>(), B,
          mp, tm.size(1), static_cast<float>(scale), sliding_window, op_, &what,
          at::get_num_threads());
    return paged_tree_attention_cpu<scalar_t, int64_t>(
        qp, T, Hq, D, cp, kv_cache.size(0), kv_cache.size(2), Hkv, bt.data_ptr<int64_t>(),
        bt.size(1), cl.data_ptr<int64_t>(), tl.data_ptr<int64_t>(), qo.data_ptr<int64_t>(), B,
        mp, tm.size(1), static_cast<float>(scale), sliding_window, op_, &what,
        at::get_num_threads());
  });
  check_status(s, op, what ? what : "bad arguments");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) {
  m.impl("paged_tree_attention", &paged_tree_attention_cpu_op);
}

}  // namespace disagg
