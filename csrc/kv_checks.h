// Argument checks of the paged KV cache ops, shared by the CPU (csrc/cpu/kv.cpp) and CUDA
// (csrc/cuda/kv.cu) implementations so that both raise the same errors for the same inputs.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "checks.h"
#include "disagg/kv_format.h"

namespace disagg {
namespace kv_checks {

using kv::CacheGeom;
using kv::Quant;

inline bool is_hnd(c10::string_view layout, const char* op) {
  DISAGG_CHECK_VALUE(layout == "NHD" || layout == "HND", op,
                     "layout must be 'NHD' ([blocks, 2, block_size, heads, dim]) or 'HND' "
                     "([blocks, 2, heads, block_size, dim]), got '", std::string(layout), "'");
  return layout == "HND";
}

inline Quant parse_quant(c10::string_view q, const char* op) {
  if (q == "none") return Quant::kNone;
  if (q == "int8") return Quant::kInt8;
  if (q == "fp8_e4m3") return Quant::kFp8E4M3;
  DISAGG_CHECK_VALUE(false, op, "quant must be one of {none, int8, fp8_e4m3}, got '",
                     std::string(q), "'");
  return Quant::kNone;
}

inline kv::DType to_kv_dtype(at::ScalarType s) {
  return s == at::kFloat ? kv::DType::kFloat32
                         : (s == at::kBFloat16 ? kv::DType::kBFloat16 : kv::DType::kFloat16);
}

// Every layer must have the same shape, dtype, strides and device, with the head dim innermost
// and contiguous: the kernels address all layers with one set of strides.
inline CacheGeom check_caches(at::TensorList caches, bool hnd, const char* op, c10::DeviceType dev) {
  DISAGG_CHECK_VALUE(!caches.empty(), op, "caches must hold at least one layer");
  const at::Tensor& c0 = caches[0];
  const char* shape = hnd ? "[num_blocks, 2, kv_heads, block_size, head_dim] (layout HND)"
                          : "[num_blocks, 2, block_size, kv_heads, head_dim] (layout NHD)";
  check_dim(c0, 5, op, "caches[0]", shape);
  check_float(c0, op, "caches[0]");
  DISAGG_CHECK_VALUE(c0.device().type() == dev, op, "caches[0] must be on ",
                     (dev == c10::DeviceType::CPU ? "the CPU for the CPU kernel" : "a CUDA device for the CUDA kernel"),
                     ", got ", c0.device());
  DISAGG_CHECK_VALUE(c0.size(1) == 2, op, "caches[0] dim 1 must be 2 (K and V) for ", shape,
                     ", got shape ", c0.sizes());
  DISAGG_CHECK_VALUE(c0.stride(4) == 1, op, "caches[0] must have unit stride in head_dim");
  for (size_t i = 1; i < caches.size(); ++i) {
    const at::Tensor& c = caches[i];
    DISAGG_CHECK_VALUE(c.sizes() == c0.sizes(), op, "caches[", i, "] has shape ", c.sizes(),
                       ", caches[0] has ", c0.sizes(), " (all layers must match)");
    DISAGG_CHECK_VALUE(c.scalar_type() == c0.scalar_type(), op, "caches[", i, "] has dtype ",
                       c.scalar_type(), ", caches[0] has ", c0.scalar_type());
    DISAGG_CHECK_VALUE(c.strides() == c0.strides(), op, "caches[", i, "] has strides ", c.strides(),
                       ", caches[0] has ", c0.strides());
    DISAGG_CHECK_VALUE(c.device() == c0.device(), op, "caches[", i, "] is on ", c.device(),
                       ", caches[0] on ", c0.device());
  }
  CacheGeom g;
  g.num_blocks = c0.size(0);
  g.head_dim = c0.size(4);
  g.stride_block = c0.stride(0);
  g.stride_kv = c0.stride(1);
  if (hnd) {
    g.num_heads = c0.size(2);
    g.block_size = c0.size(3);
    g.stride_head = c0.stride(2);
    g.stride_token = c0.stride(3);
  } else {
    g.block_size = c0.size(2);
    g.num_heads = c0.size(3);
    g.stride_token = c0.stride(2);
    g.stride_head = c0.stride(3);
  }
  DISAGG_CHECK_VALUE(g.block_size >= 1 && g.num_heads >= 1 && g.head_dim >= 1, op,
                     "caches must have non-empty block_size, kv_heads and head_dim, got shape ",
                     c0.sizes());
  return g;
}

// Shape, dtype and device of the block table, and that it covers `needed` entries.
inline void check_block_table_shape(const at::Tensor& table, int64_t needed, const CacheGeom& g,
                                    const at::Tensor& like, const char* op, const char* need_what) {
  check_dim(table, 1, op, "block_table", "[num_blocks_of_request]");
  check_index(table, op, "block_table");
  check_same_device(like, table, op, "block_table");
  DISAGG_CHECK_VALUE(table.size(0) >= needed, op, "block_table has ", table.size(0),
                     " entries but ", need_what, " needs ", needed, " (block_size ", g.block_size, ")");
}

// The above, plus the ids of the first `needed` entries (the ones the op will touch), checked on
// the host before any copy. `table` must be readable by the host (a CPU tensor).
inline at::Tensor check_block_table(const at::Tensor& table, int64_t needed, const CacheGeom& g,
                                    const at::Tensor& like, const char* op, const char* need_what) {
  check_block_table_shape(table, needed, g, like, op, need_what);
  at::Tensor t = table.contiguous();
  const int64_t bad = t.scalar_type() == at::kInt
                          ? kv::find_bad_block(t.data_ptr<int32_t>(), needed, g.num_blocks)
                          : kv::find_bad_block(t.data_ptr<int64_t>(), needed, g.num_blocks);
  DISAGG_CHECK_VALUE(bad < 0, op, "block_table[", bad, "] = ", (bad < 0 ? 0 : t[bad].item<int64_t>()),
                     " is out of range [0, num_blocks=", g.num_blocks, ")");
  return t;
}

// `header` holds the buffer's first bytes (at most 64) as host memory: the buffer itself for a CPU
// tensor, a copy for a device tensor.
inline kv::BufferHeader check_buffer(const at::Tensor& buffer, const uint8_t* header, const char* op) {
  check_dim(buffer, 1, op, "buffer", "[nbytes] (from kv_pack)");
  check_dtype(buffer, at::kByte, op, "buffer");
  check_contiguous(buffer, op, "buffer");
  kv::BufferHeader h;
  const char* why = "";
  Status s = kv::parse_header(header, buffer.numel(), &h, &why);
  DISAGG_CHECK_VALUE(s == Status::kOk, op, why, " (buffer has ", buffer.numel(), " bytes)");
  return h;
}

// The placement checks of kv_unpack (the buffer's layers and heads inside the caches).
inline void check_unpack_placement(const kv::BufferHeader& h, const CacheGeom& g, int64_t L,
                                   int64_t layer_start, int64_t head_start, const char* op) {
  DISAGG_CHECK_VALUE(h.head_dim == g.head_dim, op, "buffer holds head_dim ", h.head_dim,
                     " but caches have head_dim ", g.head_dim);
  DISAGG_CHECK_VALUE(layer_start >= 0 && layer_start + h.num_layers <= L, op, "layer_start=",
                     layer_start, " places the buffer's ", h.num_layers, " layers outside caches (",
                     L, " layers)");
  DISAGG_CHECK_VALUE(head_start >= 0 && head_start + h.num_heads <= g.num_heads, op, "head_start=",
                     head_start, " places the buffer's ", h.num_heads,
                     " heads outside the caches' kv_heads=", g.num_heads);
}

// Everything kv_pack / kv_pack_into check before reading data, and the buffer's header.
struct PackGeom {
  CacheGeom g;
  kv::BufferHeader hdr;
  int64_t layer_start = 0, num_layers = 0, head_start = 0, head_count = 0;
  Quant quant = Quant::kNone;
};

inline PackGeom check_pack(at::TensorList caches, const at::Tensor& block_table, int64_t num_tokens,
                           int64_t layer_start, int64_t layer_end, int64_t head_start,
                           int64_t head_end, c10::string_view quant, c10::string_view layout,
                           const char* op, c10::DeviceType dev) {
  PackGeom pl;
  pl.g = check_caches(caches, is_hnd(layout, op), op, dev);
  const CacheGeom& g = pl.g;
  const int64_t L = static_cast<int64_t>(caches.size());
  if (layer_end < 0) layer_end = L;
  DISAGG_CHECK_VALUE(layer_start >= 0 && layer_start <= layer_end && layer_end <= L, op,
                     "layer range [layer_start, layer_end) must lie in [0, ", L, "] (len(caches)), got [",
                     layer_start, ", ", layer_end, ")");
  if (head_end < 0) head_end = g.num_heads;
  DISAGG_CHECK_VALUE(head_start >= 0 && head_start < head_end && head_end <= g.num_heads, op,
                     "head range [head_start, head_end) must be a non-empty part of [0, kv_heads=",
                     g.num_heads, "), got [", head_start, ", ", head_end, ")");
  DISAGG_CHECK_VALUE(num_tokens >= 0 && num_tokens <= INT32_MAX, op,
                     "num_tokens must be in [0, 2^31), got ", num_tokens);
  check_block_table_shape(block_table, kv::ceil_div(num_tokens, g.block_size), g, caches[0], op,
                          "num_tokens");
  pl.layer_start = layer_start;
  pl.num_layers = layer_end - layer_start;
  pl.head_start = head_start;
  pl.head_count = head_end - head_start;
  pl.quant = parse_quant(quant, op);
  pl.hdr = kv::make_header(to_kv_dtype(caches[0].scalar_type()), pl.quant, pl.num_layers,
                           num_tokens, pl.head_count, g.head_dim, g.block_size, layer_start,
                           head_start);
  return pl;
}

// kv_pack_into's destination buffer.
inline void check_pack_out(const at::Tensor& out, const at::Tensor& like, int64_t need, const char* op) {
  check_dim(out, 1, op, "out", "[nbytes]");
  check_dtype(out, at::kByte, op, "out");
  check_contiguous(out, op, "out");
  check_same_device(like, out, op, "out");
  DISAGG_CHECK_VALUE(out.numel() >= need, op, "out has ", out.numel(),
                     " bytes, the packed request needs ", need);
}

// kv_compact's scalar checks (the positions themselves are data).
inline void check_compact(const at::Tensor& src_positions, const at::Tensor& block_table,
                          int64_t dst_start, const CacheGeom& g, const at::Tensor& like,
                          const char* op) {
  check_dim(src_positions, 1, op, "src_positions", "[n]");
  check_index(src_positions, op, "src_positions");
  check_same_device(like, src_positions, op, "src_positions");
  check_block_table_shape(block_table, block_table.dim() == 1 ? block_table.size(0) : 0, g, like,
                          op, "compact");
  const int64_t cap = block_table.size(0) * g.block_size, n = src_positions.size(0);
  DISAGG_CHECK_VALUE(dst_start >= 0 && dst_start + n <= cap, op, "dst_start=", dst_start, " with ",
                     n, " positions is outside the block table's ", cap, " token slots");
}

}  // namespace kv_checks
}  // namespace disagg
