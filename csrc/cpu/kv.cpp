// CPU implementations of the paged KV cache ops: argument checks (each error names the
// argument), then the torch-free kernels of include/disagg/kv.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "checks.h"
#include "disagg/kv.h"

namespace disagg {
namespace {

using kv::CacheGeom;
using kv::Quant;

bool is_hnd(c10::string_view layout, const char* op) {
  DISAGG_CHECK_VALUE(layout == "NHD" || layout == "HND", op,
                     "layout must be 'NHD' ([blocks, 2, block_size, heads, dim]) or 'HND' "
                     "([blocks, 2, heads, block_size, dim]), got '", std::string(layout), "'");
  return layout == "HND";
}

Quant parse_quant(c10::string_view q, const char* op) {
  if (q == "none") return Quant::kNone;
  if (q == "int8") return Quant::kInt8;
  if (q == "fp8_e4m3") return Quant::kFp8E4M3;
  DISAGG_CHECK_VALUE(false, op, "quant must be one of {none, int8, fp8_e4m3}, got '",
                     std::string(q), "'");
  return Quant::kNone;
}

kv::DType to_kv_dtype(at::ScalarType s) {
  return s == at::kFloat ? kv::DType::kFloat32
                         : (s == at::kBFloat16 ? kv::DType::kBFloat16 : kv::DType::kFloat16);
}

// Every layer must have the same shape, dtype, strides and device, with the head dim innermost
// and contiguous: the kernels address all layers with one set of strides.
CacheGeom check_caches(at::TensorList caches, bool hnd, const char* op) {
  DISAGG_CHECK_VALUE(!caches.empty(), op, "caches must hold at least one layer");
  const at::Tensor& c0 = caches[0];
  const char* shape = hnd ? "[num_blocks, 2, kv_heads, block_size, head_dim] (layout HND)"
                          : "[num_blocks, 2, block_size, kv_heads, head_dim] (layout NHD)";
  check_dim(c0, 5, op, "caches[0]", shape);
  check_float(c0, op, "caches[0]");
  DISAGG_CHECK_VALUE(c0.device().is_cpu(), op, "caches[0] must be on the CPU for the CPU kernel, got ",
                     c0.device());
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

// Checks the ids of the first `needed` entries (the ones the op will touch) before any copy.
at::Tensor check_block_table(const at::Tensor& table, int64_t needed, const CacheGeom& g,
                             const at::Tensor& like, const char* op, const char* need_what) {
  check_dim(table, 1, op, "block_table", "[num_blocks_of_request]");
  check_index(table, op, "block_table");
  check_same_device(like, table, op, "block_table");
  DISAGG_CHECK_VALUE(table.size(0) >= needed, op, "block_table has ", table.size(0),
                     " entries but ", need_what, " needs ", needed, " (block_size ", g.block_size, ")");
  at::Tensor t = table.contiguous();
  const int64_t bad = t.scalar_type() == at::kInt
                          ? kv::find_bad_block(t.data_ptr<int32_t>(), needed, g.num_blocks)
                          : kv::find_bad_block(t.data_ptr<int64_t>(), needed, g.num_blocks);
  DISAGG_CHECK_VALUE(bad < 0, op, "block_table[", bad, "] = ", (bad < 0 ? 0 : t[bad].item<int64_t>()),
                     " is out of range [0, num_blocks=", g.num_blocks, ")");
  return t;
}

template <typename F>
Status with_index(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kInt) return f(t.data_ptr<int32_t>());
  return f(t.data_ptr<int64_t>());
}

struct PackPlan {
  CacheGeom g;
  kv::PackParams p;
  kv::BufferHeader hdr;
  int64_t layer_start = 0;
  at::Tensor table;
};

PackPlan plan_pack(at::TensorList caches, const at::Tensor& block_table, int64_t num_tokens,
                   int64_t layer_start, int64_t layer_end, int64_t head_start, int64_t head_end,
                   c10::string_view quant, c10::string_view layout, const char* op) {
  PackPlan pl;
  pl.g = check_caches(caches, is_hnd(layout, op), op);
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
  pl.table = check_block_table(block_table, kv::ceil_div(num_tokens, g.block_size), g, caches[0], op,
                               "num_tokens");
  pl.p.g = g;
  pl.p.num_layers = layer_end - layer_start;
  pl.p.num_tokens = num_tokens;
  pl.p.head_start = head_start;
  pl.p.head_count = head_end - head_start;
  pl.p.quant = parse_quant(quant, op);
  pl.layer_start = layer_start;
  pl.hdr = kv::make_header(to_kv_dtype(caches[0].scalar_type()), pl.p.quant, pl.p.num_layers,
                           num_tokens, pl.p.head_count, g.head_dim, g.block_size, layer_start,
                           head_start);
  return pl;
}

void run_pack(at::TensorList caches, const PackPlan& pl, uint8_t* out, int64_t out_bytes, const char* op) {
  std::vector<const void*> ptrs;
  for (int64_t l = 0; l < pl.p.num_layers; ++l) ptrs.push_back(caches[pl.layer_start + l].data_ptr());
  Status s = DISAGG_DISPATCH_FLOAT(caches[0].scalar_type(), op, [&] {
    return with_index(pl.table, [&](auto* idx) {
      return kv::pack_cpu<scalar_t>(reinterpret_cast<const scalar_t* const*>(ptrs.data()), idx,
                                    pl.table.size(0), pl.p, pl.hdr, out, out_bytes);
    });
  });
  check_status(s, op, pl.p.quant != Quant::kNone && s == Status::kInvalidArgument
                          ? "caches hold inf or NaN in the packed range: quantized packing needs "
                            "finite values"
                          : "packing failed");
}

at::Tensor kv_pack_cpu_op(at::TensorList caches, const at::Tensor& block_table, int64_t num_tokens,
                          int64_t layer_start, int64_t layer_end, int64_t head_start,
                          int64_t head_end, c10::string_view quant, c10::string_view layout) {
  const char* op = "kv_pack";
  PackPlan pl = plan_pack(caches, block_table, num_tokens, layer_start, layer_end, head_start,
                          head_end, quant, layout, op);
  at::Tensor out = at::empty({pl.hdr.total_bytes}, caches[0].options().dtype(at::kByte));
  run_pack(caches, pl, out.data_ptr<uint8_t>(), pl.hdr.total_bytes, op);
  return out;
}

void kv_pack_into_cpu_op(at::TensorList caches, const at::Tensor& block_table, int64_t num_tokens,
                         const at::Tensor& out, int64_t layer_start, int64_t layer_end,
                         int64_t head_start, int64_t head_end, c10::string_view quant,
                         c10::string_view layout) {
  const char* op = "kv_pack_into";
  PackPlan pl = plan_pack(caches, block_table, num_tokens, layer_start, layer_end, head_start,
                          head_end, quant, layout, op);
  check_dim(out, 1, op, "out", "[nbytes]");
  check_dtype(out, at::kByte, op, "out");
  check_contiguous(out, op, "out");
  check_same_device(caches[0], out, op, "out");
  DISAGG_CHECK_VALUE(out.numel() >= pl.hdr.total_bytes, op, "out has ", out.numel(),
                     " bytes, the packed request needs ", pl.hdr.total_bytes);
  run_pack(caches, pl, out.data_ptr<uint8_t>(), out.numel(), op);
}

kv::BufferHeader check_buffer(const at::Tensor& buffer, const char* op) {
  check_dim(buffer, 1, op, "buffer", "[nbytes] (from kv_pack)");
  check_dtype(buffer, at::kByte, op, "buffer");
  check_contiguous(buffer, op, "buffer");
  kv::BufferHeader h;
  const char* why = "";
  Status s = kv::parse_header(buffer.data_ptr<uint8_t>(), buffer.numel(), &h, &why);
  DISAGG_CHECK_VALUE(s == Status::kOk, op, why, " (buffer has ", buffer.numel(), " bytes)");
  return h;
}

void kv_unpack_cpu_op(const at::Tensor& buffer, at::TensorList caches, const at::Tensor& block_table,
                      int64_t layer_start, int64_t head_start, c10::string_view layout) {
  const char* op = "kv_unpack";
  const CacheGeom g = check_caches(caches, is_hnd(layout, op), op);
  const kv::BufferHeader h = check_buffer(buffer, op);
  check_same_device(caches[0], buffer, op, "buffer");
  const int64_t L = static_cast<int64_t>(caches.size());
  DISAGG_CHECK_VALUE(h.head_dim == g.head_dim, op, "buffer holds head_dim ", h.head_dim,
                     " but caches have head_dim ", g.head_dim);
  DISAGG_CHECK_VALUE(layer_start >= 0 && layer_start + h.num_layers <= L, op, "layer_start=",
                     layer_start, " places the buffer's ", h.num_layers, " layers outside caches (",
                     L, " layers)");
  DISAGG_CHECK_VALUE(head_start >= 0 && head_start + h.num_heads <= g.num_heads, op, "head_start=",
                     head_start, " places the buffer's ", h.num_heads,
                     " heads outside the caches' kv_heads=", g.num_heads);
  at::Tensor table = check_block_table(block_table, kv::ceil_div(h.num_tokens, g.block_size), g,
                                       caches[0], op, "the buffer's num_tokens");
  std::vector<void*> ptrs;
  for (int64_t l = 0; l < h.num_layers; ++l) ptrs.push_back(caches[layer_start + l].data_ptr());
  kv::UnpackParams p;
  p.g = g;
  p.head_start = head_start;
  const uint8_t* buf = buffer.data_ptr<uint8_t>();
  const auto quant = static_cast<Quant>(h.quant);
  const auto src_dtype = static_cast<kv::DType>(h.dtype);
  Status s = DISAGG_DISPATCH_FLOAT(caches[0].scalar_type(), op, [&] {
    scalar_t* const* dst = reinterpret_cast<scalar_t* const*>(ptrs.data());
    return with_index(table, [&](auto* idx) {
      const int64_t n = table.size(0);
      if (quant != Quant::kNone) return kv::unpack_cpu<uint8_t>(buf, h, dst, idx, n, p);
      switch (src_dtype) {
        case kv::DType::kFloat32: return kv::unpack_cpu<float>(buf, h, dst, idx, n, p);
        case kv::DType::kBFloat16: return kv::unpack_cpu<bf16_t>(buf, h, dst, idx, n, p);
        default: return kv::unpack_cpu<f16_t>(buf, h, dst, idx, n, p);
      }
    });
  });
  check_status(s, op, "unpacking failed");
}

void kv_compact_cpu_op(at::TensorList caches, const at::Tensor& block_table,
                       const at::Tensor& src_positions, int64_t dst_start, c10::string_view layout) {
  const char* op = "kv_compact";
  const CacheGeom g = check_caches(caches, is_hnd(layout, op), op);
  check_dim(src_positions, 1, op, "src_positions", "[n]");
  check_index(src_positions, op, "src_positions");
  check_same_device(caches[0], src_positions, op, "src_positions");
  at::Tensor table = check_block_table(block_table, block_table.dim() == 1 ? block_table.size(0) : 0,
                                       g, caches[0], op, "compact");
  const int64_t cap = table.size(0) * g.block_size, n = src_positions.size(0);
  at::Tensor src = src_positions.to(at::kLong).contiguous();
  const int64_t* sp = src.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    DISAGG_CHECK_VALUE(sp[i] >= 0 && sp[i] < cap, op, "src_positions[", i, "] = ", sp[i],
                       " is outside the block table's ", cap, " token slots");
  DISAGG_CHECK_VALUE(dst_start >= 0 && dst_start + n <= cap, op, "dst_start=", dst_start, " with ",
                     n, " positions is outside the block table's ", cap, " token slots");
  std::vector<void*> ptrs;
  for (const auto& c : caches) ptrs.push_back(c.data_ptr());
  Status s = DISAGG_DISPATCH_FLOAT(caches[0].scalar_type(), op, [&] {
    return with_index(table, [&](auto* idx) {
      return kv::compact_cpu(reinterpret_cast<scalar_t* const*>(ptrs.data()),
                             static_cast<int64_t>(ptrs.size()), g, idx, table.size(0), sp, n,
                             dst_start);
    });
  });
  check_status(s, op, "compaction failed");
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CPU, m) {
  m.impl("kv_pack", &kv_pack_cpu_op);
  m.impl("kv_pack_into", &kv_pack_into_cpu_op);
  m.impl("kv_unpack", &kv_unpack_cpu_op);
  m.impl("kv_compact", &kv_compact_cpu_op);
}

}  // namespace disagg
