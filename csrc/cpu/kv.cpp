// CPU implementations of the paged KV cache ops: argument checks (each error names the
// argument), then the torch-free kernels of include/disagg/kv.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "checks.h"
#include "disagg/kv.h"
#include "fresh_output.h"
#include "kv_checks.h"

namespace disagg {
namespace {

using kv::CacheGeom;
using kv::Quant;
using namespace kv_checks;

template <typename F>
Status with_index(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kInt) return f(t.data_ptr<int32_t>());
  return f(t.data_ptr<int64_t>());
}

struct PackPlan {
  PackGeom geom;
  kv::PackParams p;
  kv::BufferHeader hdr;
  int64_t layer_start = 0;
  at::Tensor table;
};

PackPlan plan_pack(at::TensorList caches, const at::Tensor& block_table, int64_t num_tokens,
                   int64_t layer_start, int64_t layer_end, int64_t head_start, int64_t head_end,
                   c10::string_view quant, c10::string_view layout, const char* op) {
  PackPlan pl;
  pl.geom = check_pack(caches, block_table, num_tokens, layer_start, layer_end, head_start,
                       head_end, quant, layout, op, c10::DeviceType::CPU);
  const CacheGeom& g = pl.geom.g;
  pl.table = check_block_table(block_table, kv::ceil_div(num_tokens, g.block_size), g, caches[0], op,
                               "num_tokens");
  pl.p.g = g;
  pl.p.num_layers = pl.geom.num_layers;
  pl.p.num_tokens = num_tokens;
  pl.p.head_start = pl.geom.head_start;
  pl.p.head_count = pl.geom.head_count;
  pl.p.quant = pl.geom.quant;
  pl.layer_start = pl.geom.layer_start;
  pl.hdr = pl.geom.hdr;
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
  at::Tensor out = empty_output({pl.hdr.total_bytes}, caches[0].options().dtype(at::kByte));
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
  check_pack_out(out, caches[0], pl.hdr.total_bytes, op);
  run_pack(caches, pl, out.data_ptr<uint8_t>(), out.numel(), op);
}

void kv_unpack_cpu_op(const at::Tensor& buffer, at::TensorList caches, const at::Tensor& block_table,
                      int64_t layer_start, int64_t head_start, c10::string_view layout) {
  const char* op = "kv_unpack";
  const CacheGeom g = check_caches(caches, is_hnd(layout, op), op, c10::DeviceType::CPU);
  check_same_device(caches[0], buffer, op, "buffer");
  const kv::BufferHeader h = check_buffer(buffer, static_cast<const uint8_t*>(buffer.data_ptr()), op);
  const int64_t L = static_cast<int64_t>(caches.size());
  check_unpack_placement(h, g, L, layer_start, head_start, op);
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
  const CacheGeom g = check_caches(caches, is_hnd(layout, op), op, c10::DeviceType::CPU);
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
