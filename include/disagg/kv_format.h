// The packed KV buffer format and the cache geometry, shared by the CPU kernels (kv.h) and the
// CUDA kernels (kv.cuh): plain host C++, no vector code, no framework types.
#pragma once

#include <cstdint>
#include <cstring>

#include "disagg/common.h"

namespace disagg {
namespace kv {

// ---- buffer format ---------------------------------------------------------------------------
// A packed buffer is  [header (64 B)] [payload] [pad to 16] [scales]  (all little-endian).
// payload: elements [layer][kv (0=K, 1=V)][token][head][dim], token-major so that a run of tokens
//          of one layer and one of K/V is contiguous whatever the receiver's block size is.
// scales:  float32 [layer][kv][group][head] when quantized, group = token / scale_group (the
//          sender's block size: one scale per (block, head)).

constexpr uint32_t kMagic = 0x564b4744u;  // "DGKV" in memory order
constexpr uint16_t kVersion = 1;
constexpr int64_t kHeaderBytes = 64;

enum class DType : uint8_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class Quant : uint8_t { kNone = 0, kInt8 = 1, kFp8E4M3 = 2 };

struct BufferHeader {
  uint32_t magic;
  uint16_t version;
  uint16_t header_bytes;
  uint8_t dtype;        // DType of the sender's cache
  uint8_t quant;        // Quant of the payload
  uint8_t elem_bytes;   // bytes per payload element
  uint8_t reserved;
  int32_t num_layers;
  int32_t num_tokens;
  int32_t num_heads;    // heads in the payload (the packed slice)
  int32_t head_dim;
  int32_t scale_group;  // tokens per scale when quantized (sender's block size), else 0
  int32_t layer_start;  // sender's first layer and head: informational, default placement
  int32_t head_start;
  int64_t payload_offset;
  int64_t scales_offset;
  int64_t total_bytes;
};
static_assert(sizeof(BufferHeader) == kHeaderBytes, "the header is part of the wire format");

#if defined(__CUDACC__)
#define DISAGG_KV_HD __host__ __device__
#else
#define DISAGG_KV_HD
#endif

// fp8 scales are powers of two, 2^k with k the smallest integer such that amax * 2^-k <= 448
// (e4m3's largest value, 1.75 * 2^8), so that scaling is exact: the encoder then rounds once,
// as a direct cast would, and can move exponents with an integer add. k >= -126 keeps both 2^k
// and 2^-k normal floats (a group whose amax is under 2^-118 gets a scale coarser than ideal;
// its error bound is then 2^-136 absolute). `amax_bits` are the float32 bits of amax > 0, finite.
DISAGG_KV_HD inline int32_t fp8_scale_exponent(uint32_t amax_bits) {
  const int32_t e = static_cast<int32_t>(amax_bits >> 23);  // biased exponent (sign is 0)
  if (e == 0) return -126;  // amax a float32 denormal: far below 2^-118
  const int32_t k = e - 127 - 8 + ((amax_bits & 0x7fffffu) > 0x600000u ? 1 : 0);
  return k < -126 ? -126 : k;
}
// 2^k as float32 bits, for -126 <= k <= 127.
DISAGG_KV_HD inline uint32_t pow2_bits(int32_t k) { return static_cast<uint32_t>(k + 127) << 23; }

inline int64_t dtype_bytes(DType d) { return d == DType::kFloat32 ? 4 : 2; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Fill a header for the given geometry; every size follows from it (the fake kernel in Python
// mirrors this arithmetic to size the output under torch.compile).
inline BufferHeader make_header(DType dtype, Quant quant, int64_t layers, int64_t tokens,
                                int64_t heads, int64_t head_dim, int64_t block_size,
                                int64_t layer_start, int64_t head_start) {
  BufferHeader h{};
  h.magic = kMagic;
  h.version = kVersion;
  h.header_bytes = static_cast<uint16_t>(kHeaderBytes);
  h.dtype = static_cast<uint8_t>(dtype);
  h.quant = static_cast<uint8_t>(quant);
  h.elem_bytes = static_cast<uint8_t>(quant == Quant::kNone ? dtype_bytes(dtype) : 1);
  h.num_layers = static_cast<int32_t>(layers);
  h.num_tokens = static_cast<int32_t>(tokens);
  h.num_heads = static_cast<int32_t>(heads);
  h.head_dim = static_cast<int32_t>(head_dim);
  h.scale_group = quant == Quant::kNone ? 0 : static_cast<int32_t>(block_size);
  h.layer_start = static_cast<int32_t>(layer_start);
  h.head_start = static_cast<int32_t>(head_start);
  h.payload_offset = kHeaderBytes;
  const int64_t payload = layers * 2 * tokens * heads * head_dim * h.elem_bytes;
  // scales start 16-byte aligned so that float loads are aligned on every platform
  h.scales_offset = (h.payload_offset + payload + 15) / 16 * 16;
  const int64_t groups = quant == Quant::kNone ? 0 : ceil_div(tokens, block_size);
  h.total_bytes = h.scales_offset + layers * 2 * groups * heads * static_cast<int64_t>(sizeof(float));
  return h;
}

// Reads and checks a header against the buffer it came in. On failure `why` names the field.
inline Status parse_header(const uint8_t* buf, int64_t nbytes, BufferHeader* out, const char** why) {
  if (nbytes < kHeaderBytes) { *why = "buffer is smaller than the 64-byte header"; return Status::kBufferTooSmall; }
  BufferHeader h;
  std::memcpy(&h, buf, sizeof(h));
  if (h.magic != kMagic) { *why = "buffer does not start with the kv_pack magic (not a packed KV buffer)"; return Status::kInvalidArgument; }
  if (h.version != kVersion) { *why = "buffer has an unsupported format version"; return Status::kUnsupported; }
  if (h.header_bytes != kHeaderBytes || h.payload_offset != kHeaderBytes) { *why = "buffer header size is inconsistent"; return Status::kInvalidArgument; }
  if (h.dtype > 2) { *why = "buffer header has an unknown dtype"; return Status::kInvalidArgument; }
  if (h.quant > 2) { *why = "buffer header has an unknown quantization"; return Status::kInvalidArgument; }
  if (h.num_layers < 0 || h.num_tokens < 0 || h.num_heads < 1 || h.head_dim < 1 ||
      (h.quant != 0 && h.scale_group < 1)) {
    *why = "buffer header has a negative or zero size"; return Status::kInvalidArgument;
  }
  const BufferHeader want = make_header(static_cast<DType>(h.dtype), static_cast<Quant>(h.quant),
                                        h.num_layers, h.num_tokens, h.num_heads, h.head_dim,
                                        h.quant != 0 ? h.scale_group : 1, h.layer_start, h.head_start);
  if (h.elem_bytes != want.elem_bytes || h.scales_offset != want.scales_offset ||
      h.total_bytes != want.total_bytes) {
    *why = "buffer header sizes do not match its geometry (corrupted header)"; return Status::kInvalidArgument;
  }
  if (h.total_bytes > nbytes) { *why = "buffer is shorter than the size its header declares"; return Status::kBufferTooSmall; }
  *out = h;
  return Status::kOk;
}

// ---- cache geometry --------------------------------------------------------------------------

// One layer's cache [num_blocks, 2, ...] addressed through strides (elements), so NHD
// ([block, kv, token, head, dim]) and HND ([block, kv, head, token, dim]) are the same code.
// The dim stride is 1.
struct CacheGeom {
  int64_t num_blocks = 0, block_size = 0, num_heads = 0, head_dim = 0;
  int64_t stride_block = 0, stride_kv = 0, stride_token = 0, stride_head = 0;
};

// Index of the first block id outside [0, num_blocks), or -1. Checked before any copy, so a bad
// table never causes an out-of-bounds access.
template <typename Idx>
inline int64_t find_bad_block(const Idx* table, int64_t n, int64_t num_blocks) {
  for (int64_t i = 0; i < n; ++i)
    if (table[i] < 0 || static_cast<int64_t>(table[i]) >= num_blocks) return i;
  return -1;
}

}  // namespace kv
}  // namespace disagg
