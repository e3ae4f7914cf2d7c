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

}  // namespace disagg
