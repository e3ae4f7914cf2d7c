// The one place where the disagg op schemas are declared. Backend implementations live in
// csrc/cpu/ and csrc/cuda/ (TORCH_LIBRARY_IMPL); fake kernels in python/disagg/_fake.py.
#include <torch/library.h>

TORCH_LIBRARY(disagg, m) {
  // ---- MoE routing -----------------------------------------------------------------------
  // logits [T,E] -> (weights [T,k] f32, ids [T,k] i32 (-1 dropped), slots [T,k] i32, counts [E] i32)
  m.def(
      "route(Tensor logits, int top_k, str scoring='softmax', Tensor? bias=None, "
      "int num_groups=1, int topk_groups=1, str group_score='max', bool renormalize=True, "
      "float routed_scaling_factor=1.0, float capacity_factor=0.0, str drop_policy='position', "
      "str overflow='drop') -> (Tensor, Tensor, Tensor, Tensor)");
  // ids/slots [T,k] -> (dest [T*k], src [rows], expert_offsets [E+1], rank_offsets [R+1])
  m.def(
      "moe_layout(Tensor ids, int num_experts, int ep_size=1, int capacity=0, Tensor? slots=None)"
      " -> (Tensor, Tensor, Tensor, Tensor)");
  // x [T,H], src [rows] -> [rows,H] expert-ordered copy of the tokens (zero rows where src=-1)
  m.def("moe_permute(Tensor x, Tensor src, int top_k) -> Tensor");
  // y [rows,H], dest [T*k], weights [T,k] -> [T,H] weighted sum in float32
  m.def("moe_combine(Tensor y, Tensor dest, Tensor weights, ScalarType? out_dtype=None) -> Tensor");

  // ---- Paged KV cache ----------------------------------------------------------------------

  // ---- Token trees (speculative decoding) --------------------------------------------------

  // ---- Attention ---------------------------------------------------------------------------
  // q [B,Hq,D], kv_cache [NB,2,bs,Hkv,D], block_tables [B,M], ctx_lens [B] -> [B,Hq,D]
  m.def(
      "paged_decode_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor ctx_lens, "
      "float scale, int sliding_window=0) -> Tensor");
}
