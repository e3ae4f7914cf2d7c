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
}
