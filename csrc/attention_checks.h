// Argument checks of the paged attention ops (decode, decode with RoPE, tree), shared by the CPU
// and CUDA ops so all raise the same errors for the same bad shapes, dtypes and devices.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "checks.h"

namespace disagg {

// kv_cache [num_blocks, 2, block_size, Hkv, D] (K at index 0, V at 1) of the queries' dtype.
inline void check_paged_kv_cache(const at::Tensor& kv_cache, at::ScalarType dtype, const char* op) {
  check_dim(kv_cache, 5, op, "kv_cache", "[num_blocks, 2, block_size, Hkv, D]");
  check_dtype(kv_cache, dtype, op, "kv_cache");
  check_contiguous(kv_cache, op, "kv_cache");
  DISAGG_CHECK_VALUE(kv_cache.size(1) == 2, op, "kv_cache dim 1 must be 2 (K, V), got ",
                     kv_cache.size(1));
}

// block_tables [B, max_blocks] and ctx_lens [B] of one index dtype, on the device of `ref` (as
// kv_cache is).
inline void check_block_tables(const at::Tensor& ref, const at::Tensor& kv_cache,
                               const at::Tensor& block_tables, const at::Tensor& ctx_lens,
                               int64_t B, const char* op) {
  check_dim(block_tables, 2, op, "block_tables", "[B, max_blocks]");
  check_index(block_tables, op, "block_tables");
  check_dim(ctx_lens, 1, op, "ctx_lens", "[B]");
  DISAGG_CHECK_VALUE(ctx_lens.scalar_type() == block_tables.scalar_type(), op,
                     "ctx_lens must have block_tables' dtype ", block_tables.scalar_type(),
                     ", got ", ctx_lens.scalar_type());
  check_same_device(ref, kv_cache, op, "kv_cache");
  check_same_device(ref, block_tables, op, "block_tables");
  check_same_device(ref, ctx_lens, op, "ctx_lens");
  DISAGG_CHECK_VALUE(block_tables.size(0) == B, op, "block_tables must have B=", B,
                     " rows, got ", block_tables.size(0));
  DISAGG_CHECK_VALUE(ctx_lens.size(0) == B, op, "ctx_lens must have B=", B, " entries, got ",
                     ctx_lens.size(0));
}

inline void check_scale_window(double scale, int64_t sliding_window, const char* op) {
  DISAGG_CHECK_VALUE(std::isfinite(scale), op, "scale must be finite, got ", scale);
  DISAGG_CHECK_VALUE(sliding_window >= 0, op, "sliding_window must be >= 0, got ", sliding_window);
}

inline void check_paged_decode_attention(const at::Tensor& q, const at::Tensor& kv_cache,
                                         const at::Tensor& block_tables,
                                         const at::Tensor& ctx_lens, double scale,
                                         int64_t sliding_window, const char* op) {
  check_dim(q, 3, op, "q", "[B, Hq, D]");
  check_float(q, op, "q");
  check_paged_kv_cache(kv_cache, q.scalar_type(), op);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = kv_cache.size(3);
  check_block_tables(q, kv_cache, block_tables, ctx_lens, B, op);
  DISAGG_CHECK_VALUE(kv_cache.size(4) == D, op, "kv_cache head_dim must equal q's ", D, ", got ",
                     kv_cache.size(4));
  DISAGG_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, op, "q heads (", Hq,
                     ") must be a multiple of kv_cache heads (", Hkv, ")");
  check_scale_window(scale, sliding_window, op);
}

// qkv [B, (num_heads + 2 Hkv) * D] from the fused projection, cos/sin [B, D] (RoPE tables).
inline void check_paged_decode_attention_rope(const at::Tensor& qkv, const at::Tensor& cos,
                                              const at::Tensor& sin, const at::Tensor& kv_cache,
                                              const at::Tensor& block_tables,
                                              const at::Tensor& ctx_lens, int64_t num_heads,
                                              double scale, int64_t sliding_window,
                                              const char* op) {
  check_dim(qkv, 2, op, "qkv", "[B, (Hq + 2 Hkv) * D]");
  check_float(qkv, op, "qkv");
  check_contiguous(qkv, op, "qkv");
  check_paged_kv_cache(kv_cache, qkv.scalar_type(), op);
  const int64_t B = qkv.size(0), Hkv = kv_cache.size(3), D = kv_cache.size(4);
  DISAGG_CHECK_VALUE(num_heads >= 1 && num_heads % Hkv == 0, op, "num_heads (", num_heads,
                     ") must be a positive multiple of kv_cache heads (", Hkv, ")");
  DISAGG_CHECK_VALUE(D % 2 == 0, op, "head_dim must be even for RoPE, got ", D);
  DISAGG_CHECK_VALUE(qkv.size(1) == (num_heads + 2 * Hkv) * D, op, "qkv must have (",
                     num_heads, " + 2 * ", Hkv, ") * ", D, " = ", (num_heads + 2 * Hkv) * D,
                     " columns, got ", qkv.size(1));
  for (const auto* t : {&cos, &sin}) {
    const char* name = t == &cos ? "cos" : "sin";
    check_dim(*t, 2, op, name, "[B, D]");
    check_dtype(*t, qkv.scalar_type(), op, name);
    check_same_device(qkv, *t, op, name);
    DISAGG_CHECK_VALUE(t->size(0) == B && t->size(1) == D, op, name, " must be [", B, ", ", D,
                       "], got ", t->sizes());
  }
  check_block_tables(qkv, kv_cache, block_tables, ctx_lens, B, op);
  check_scale_window(scale, sliding_window, op);
}

// Shapes, dtypes and devices of paged_tree_attention (the values of the index tensors are
// checked by paged_tree_attention_check in disagg/tree_attention.h).
inline void check_paged_tree_attention(const at::Tensor& q, const at::Tensor& kv_cache,
                                       const at::Tensor& block_tables, const at::Tensor& ctx_lens,
                                       const at::Tensor& tree_lens, const at::Tensor& q_offsets,
                                       const at::Tensor& tree_mask, double scale,
                                       int64_t sliding_window, const char* op) {
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
}

}  // namespace disagg
