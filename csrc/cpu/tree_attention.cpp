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
  check_paged_tree_attention(q, kv_cache, block_tables, ctx_lens, tree_lens, q_offsets, tree_mask,
                             scale, sliding_window, op);
  const auto idx = block_tables.scalar_type();
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t B = block_tables.size(0);
  const int64_t Hkv = kv_cache.size(3);
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
