// CUDA implementations of the paged KV cache ops: the argument checks of csrc/kv_checks.h (shared
// with the CPU ops), then the torch-free kernels of include/disagg/kv.cuh on the current stream.
//
// Host synchronization: kv_pack, kv_pack_into and kv_compact never synchronize (block ids and
// positions are checked on the device, see kv.cuh). kv_unpack reads the buffer's 64-byte header
// and the block table on the host, as the CPU op does: the launch geometry comes from the header,
// so unpack synchronizes once and raises the CPU op's errors for a bad header or block id.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "checks.h"
#include "cuda/cuda_checks.h"
#include "disagg/kv.cuh"
#include "kv_checks.h"

namespace disagg {
namespace {

using kv::CacheGeom;
using kv::Quant;
using namespace kv_checks;

void run_pack(at::TensorList caches, const at::Tensor& block_table, const PackGeom& pl,
              uint8_t* out, const char* op) {
  std::vector<const void*> ptrs;
  for (int64_t l = 0; l < pl.num_layers; ++l) ptrs.push_back(caches[pl.layer_start + l].data_ptr());
  // one index type on the device (a no-op for int64 tables)
  const at::Tensor table = block_table.to(at::kLong).contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(caches[0].scalar_type(), op, [&] {
    return cuda::kv::pack<scalar_t>(ptrs.data(), table.data_ptr<int64_t>(), pl.g, pl.head_start,
                                    pl.hdr, out, stream);
  });
  check_cuda(err, op);
}

at::Tensor kv_pack_cuda_op(at::TensorList caches, const at::Tensor& block_table, int64_t num_tokens,
                           int64_t layer_start, int64_t layer_end, int64_t head_start,
                           int64_t head_end, c10::string_view quant, c10::string_view layout) {
  const char* op = "kv_pack";
  const PackGeom pl = check_pack(caches, block_table, num_tokens, layer_start, layer_end, head_start,
                                 head_end, quant, layout, op, c10::DeviceType::CUDA);
  c10::cuda::CUDAGuard guard(caches[0].device());
  at::Tensor out = at::empty({pl.hdr.total_bytes}, caches[0].options().dtype(at::kByte));
  run_pack(caches, block_table, pl, out.data_ptr<uint8_t>(), op);
  return out;
}

void kv_pack_into_cuda_op(at::TensorList caches, const at::Tensor& block_table, int64_t num_tokens,
                          const at::Tensor& out, int64_t layer_start, int64_t layer_end,
                          int64_t head_start, int64_t head_end, c10::string_view quant,
                          c10::string_view layout) {
  const char* op = "kv_pack_into";
  const PackGeom pl = check_pack(caches, block_table, num_tokens, layer_start, layer_end, head_start,
                                 head_end, quant, layout, op, c10::DeviceType::CUDA);
  check_pack_out(out, caches[0], pl.hdr.total_bytes, op);
  c10::cuda::CUDAGuard guard(caches[0].device());
  run_pack(caches, block_table, pl, out.data_ptr<uint8_t>(), op);
}

void kv_unpack_cuda_op(const at::Tensor& buffer, at::TensorList caches, const at::Tensor& block_table,
                       int64_t layer_start, int64_t head_start, c10::string_view layout) {
  const char* op = "kv_unpack";
  const CacheGeom g = check_caches(caches, is_hnd(layout, op), op, c10::DeviceType::CUDA);
  check_same_device(caches[0], buffer, op, "buffer");
  c10::cuda::CUDAGuard guard(caches[0].device());
  // The header decides the launch geometry: copy its 64 bytes to the host (a synchronizing copy).
  const at::Tensor head =
      buffer.dim() == 1 && buffer.scalar_type() == at::kByte && buffer.is_contiguous()
          ? buffer.narrow(0, 0, std::min<int64_t>(buffer.numel(), kv::kHeaderBytes)).cpu()
          : at::Tensor();
  const kv::BufferHeader h =
      check_buffer(buffer, head.defined() ? head.data_ptr<uint8_t>() : nullptr, op);
  const int64_t L = static_cast<int64_t>(caches.size());
  check_unpack_placement(h, g, L, layer_start, head_start, op);
  // ids checked on the host like the CPU op (this op synchronizes anyway)
  const int64_t needed = kv::ceil_div(h.num_tokens, g.block_size);
  check_block_table_shape(block_table, needed, g, caches[0], op, "the buffer's num_tokens");
  const at::Tensor host_table = block_table.cpu();
  check_block_table(host_table, needed, g, host_table, op, "the buffer's num_tokens");
  const at::Tensor table = block_table.to(at::kLong).contiguous();
  std::vector<void*> ptrs;
  for (int64_t l = 0; l < h.num_layers; ++l) ptrs.push_back(caches[layer_start + l].data_ptr());
  const uint8_t* buf = buffer.data_ptr<uint8_t>();
  const auto quant = static_cast<Quant>(h.quant);
  const auto src_dtype = static_cast<kv::DType>(h.dtype);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* idx = table.data_ptr<int64_t>();
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(caches[0].scalar_type(), op, [&] {
    if (quant != Quant::kNone)
      return cuda::kv::unpack<uint8_t, scalar_t>(buf, h, ptrs.data(), idx, g, head_start, stream);
    switch (src_dtype) {
      case kv::DType::kFloat32:
        return cuda::kv::unpack<float, scalar_t>(buf, h, ptrs.data(), idx, g, head_start, stream);
      case kv::DType::kBFloat16:
        return cuda::kv::unpack<bf16_t, scalar_t>(buf, h, ptrs.data(), idx, g, head_start, stream);
      default:
        return cuda::kv::unpack<f16_t, scalar_t>(buf, h, ptrs.data(), idx, g, head_start, stream);
    }
  });
  check_cuda(err, op);
}

void kv_compact_cuda_op(at::TensorList caches, const at::Tensor& block_table,
                        const at::Tensor& src_positions, int64_t dst_start, c10::string_view layout) {
  const char* op = "kv_compact";
  const CacheGeom g = check_caches(caches, is_hnd(layout, op), op, c10::DeviceType::CUDA);
  check_compact(src_positions, block_table, dst_start, g, caches[0], op);
  c10::cuda::CUDAGuard guard(caches[0].device());
  const int64_t n = src_positions.size(0), L = static_cast<int64_t>(caches.size());
  if (n == 0) return;
  const at::Tensor table = block_table.to(at::kLong).contiguous();
  const at::Tensor src = src_positions.to(at::kLong).contiguous();
  const size_t bytes = cuda::kv::compact_workspace(L, g, n, caches[0].element_size());
  const at::Tensor scratch =
      at::empty({static_cast<int64_t>(bytes)}, caches[0].options().dtype(at::kByte));
  std::vector<void*> ptrs;
  for (const auto& c : caches) ptrs.push_back(c.data_ptr());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const cudaError_t err = DISAGG_DISPATCH_FLOAT(caches[0].scalar_type(), op, [&] {
    return cuda::kv::compact<scalar_t>(ptrs.data(), L, g, table.data_ptr<int64_t>(), table.size(0),
                                       src.data_ptr<int64_t>(), n, dst_start, scratch.data_ptr(),
                                       stream);
  });
  check_cuda(err, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(disagg, CUDA, m) {
  m.impl("kv_pack", &kv_pack_cuda_op);
  m.impl("kv_pack_into", &kv_pack_into_cuda_op);
  m.impl("kv_unpack", &kv_unpack_cuda_op);
  m.impl("kv_compact", &kv_compact_cuda_op);
}

}  // namespace disagg
