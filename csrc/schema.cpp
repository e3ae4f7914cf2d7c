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
  // the same into a caller-owned out [rows,H] (engines keep these buffers across steps)
  m.def("moe_permute_into(Tensor x, Tensor src, int top_k, Tensor(a!) out) -> ()");
  // y [rows,H], dest [T*k], weights [T,k] -> [T,H] weighted sum in float32
  m.def("moe_combine(Tensor y, Tensor dest, Tensor weights, ScalarType? out_dtype=None) -> Tensor");
  // the same into a caller-owned out [T,H] (float32 or y's dtype; must not overlap y)
  m.def("moe_combine_into(Tensor y, Tensor dest, Tensor weights, Tensor(a!) out) -> ()");

  // ---- Paged KV cache ----------------------------------------------------------------------
  // caches: per-layer [num_blocks, 2, block_size, kv_heads, head_dim] (NHD) or
  // [num_blocks, 2, kv_heads, block_size, head_dim] (HND); K at index 0 of dim 1, V at 1.
  // A request's first num_tokens tokens, layers [layer_start, layer_end), heads
  // [head_start, head_end) -> one uint8 buffer (64-byte header, payload, per-(block, head) scales)
  m.def(
      "kv_pack(Tensor[] caches, Tensor block_table, int num_tokens, int layer_start=0, "
      "int layer_end=-1, int head_start=0, int head_end=-1, str quant='none', str layout='NHD')"
      " -> Tensor");
  // the same into a caller-owned buffer (registered transfer memory), out.numel() >= kv_pack_nbytes
  m.def(
      "kv_pack_into(Tensor[] caches, Tensor block_table, int num_tokens, Tensor(a!) out, "
      "int layer_start=0, int layer_end=-1, int head_start=0, int head_end=-1, str quant='none', "
      "str layout='NHD') -> ()");
  // buffer -> caches[layer_start:], heads [head_start, head_start + heads) through block_table;
  // any destination block size, kv_heads, dtype and layout
  m.def(
      "kv_unpack(Tensor buffer, Tensor(a!)[] caches, Tensor block_table, int layer_start=0, "
      "int head_start=0, str layout='NHD') -> ()");
  // in place, all layers: position dst_start + i <- position src_positions[i] (overlap-safe)
  m.def(
      "kv_compact(Tensor(a!)[] caches, Tensor block_table, Tensor src_positions, int dst_start, "
      "str layout='NHD') -> ()");

  // ---- Token trees (speculative decoding) --------------------------------------------------
  // parents [B,N] (-1 root, parent < child), num_nodes [B] -> (depth [B,N], mask [B,N,ceil(N/32)]
  // int32 bit words (ancestor-or-self), first_child [B,N], next_sibling [B,N], leaf_paths [B,N,D]
  // (root-to-leaf node lists, -1 padded), num_leaves [B]); D = max_depth+1, or N if max_depth=-1
  m.def(
      "tree_build(Tensor parents, Tensor num_nodes, int max_depth=-1)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // logits [B,N,V] (or target ids [B,N]), tokens/parents [B,N], num_nodes [B] ->
  // (accepted [B,N] node indices from the root, -1 padded; accept_len [B]; bonus [B]), all int32
  m.def(
      "tree_verify_greedy(Tensor logits, Tensor tokens, Tensor parents, Tensor num_nodes)"
      " -> (Tensor, Tensor, Tensor)");
  // lossless speculative sampling; per-request temperature/top_k/top_p/seed/offset [B];
  // draft_probs [B,N,V] for stochastic drafts (SpecInfer), none for deterministic ones
  m.def(
      "tree_verify_sample(Tensor logits, Tensor tokens, Tensor parents, Tensor num_nodes, "
      "Tensor temperature, Tensor top_k, Tensor top_p, Tensor seed, Tensor offset, "
      "Tensor? draft_probs=None) -> (Tensor, Tensor, Tensor)");


  // ---- Attention ---------------------------------------------------------------------------
  // q [B,Hq,D], kv_cache [NB,2,bs,Hkv,D], block_tables [B,M], ctx_lens [B] -> [B,Hq,D]
  m.def(
      "paged_decode_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor ctx_lens, "
      "float scale, int sliding_window=0) -> Tensor");

  // ---- Tree attention (speculative decoding) -----------------------------------------------
  // q [T,Hq,D] (rows of sequence b: q_offsets[b]..q_offsets[b+1]), kv_cache [NB,2,bs,Hkv,D],
  // block_tables [B,M], ctx_lens [B] committed keys, tree_lens [B] tree keys after them,
  // q_offsets [B+1], tree_mask [T,W] int32 bit words (tree keys each query sees) -> [T,Hq,D]
  m.def(
      "paged_tree_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor ctx_lens, "
      "Tensor tree_lens, Tensor q_offsets, Tensor tree_mask, float scale, int sliding_window=0)"
      " -> Tensor");

  // ---- Expert FFN --------------------------------------------------------------------------
  // x [M,K] in expert order, w [E,N,K], expert_offsets [E+1] -> [M,N]: rows of expert e times
  // w[e]^T (float accumulation); rows outside [offsets[0], offsets[E]) are zero
  m.def("expert_gemm(Tensor x, Tensor w, Tensor expert_offsets) -> Tensor");

  // ---- Model layers (decode hot path) -----------------------------------------------------
  // x [T,H], ids [T,k] (-1 dropped), weights [T,k], w13 [E,2I,H] (gate rows then up rows),
  // w2 [E,H,I] -> [T,H]: sum_k weights * SiLU-gated expert MLP, float32 accumulation
  m.def("moe_experts(Tensor x, Tensor ids, Tensor weights, Tensor w13, Tensor w2) -> Tensor");
  // the same with w13/w2 packed by pack_moe_weights (CPU with AVX-512): bit-identical output
  m.def(
      "moe_experts_packed(Tensor x, Tensor ids, Tensor weights, Tensor w13p, Tensor w2p, "
      "int inter) -> Tensor");
  // x [...,H], weight [H] -> HF RMSNorm (float32 statistics)
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  // residual += x in place, then -> RMSNorm(residual)
  m.def("add_rms_norm(Tensor(a!) residual, Tensor x, Tensor weight, float eps) -> Tensor");
  // decode from the fused projection: qkv [B,(Hq+2Hkv)*D], cos/sin [B,D] -> RoPE on q and k,
  // K/V written at position ctx_lens-1 of each block table, then attention -> [B,Hq,D]
  m.def(
      "paged_decode_attention_rope(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) kv_cache, "
      "Tensor block_tables, Tensor ctx_lens, int num_heads, float scale, int sliding_window=0)"
      " -> Tensor");
  // x [...,K], weight [M,K] (HF layout), bias [M]? -> [...,M], float32 accumulation
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
}
