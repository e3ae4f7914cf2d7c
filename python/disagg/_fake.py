"""Fake (meta) kernels for every disagg op, so the ops trace under torch.compile."""
from __future__ import annotations

import torch
from torch.library import register_fake

# ---- MoE routing ---------------------------------------------------------------------------


@register_fake("disagg::route")
def _route_fake(logits, top_k, scoring="softmax", bias=None, num_groups=1, topk_groups=1,
                group_score="max", renormalize=True, routed_scaling_factor=1.0,
                capacity_factor=0.0, drop_policy="position", overflow="drop"):
    torch._check(logits.dim() == 2, lambda: "disagg.route: logits must be 2-D [T, E]")
    T, E = logits.shape
    torch._check(1 <= top_k, lambda: f"disagg.route: top_k must be >= 1, got {top_k}")
    w = logits.new_empty((T, top_k), dtype=torch.float32)
    i = logits.new_empty((T, top_k), dtype=torch.int32)
    return w, i, torch.empty_like(i), logits.new_empty((E,), dtype=torch.int32)


@register_fake("disagg::moe_layout")
def _moe_layout_fake(ids, num_experts, ep_size=1, capacity=0, slots=None):
    A = ids.numel()
    rows = num_experts * capacity if capacity > 0 else A
    mk = lambda n: ids.new_empty((n,), dtype=torch.int32)  # noqa: E731
    return mk(A), mk(rows), mk(num_experts + 1), mk(ep_size + 1)


@register_fake("disagg::moe_permute")
def _moe_permute_fake(x, src, top_k):
    return x.new_empty((src.shape[0], x.shape[1]))


@register_fake("disagg::moe_permute_into")
def _moe_permute_into_fake(x, src, top_k, out):
    return None


@register_fake("disagg::moe_combine")
def _moe_combine_fake(y, dest, weights, out_dtype=None):
    return y.new_empty((weights.shape[0], y.shape[1]), dtype=out_dtype or y.dtype)


@register_fake("disagg::moe_combine_into")
def _moe_combine_into_fake(y, dest, weights, out):
    return None


# ---- Paged KV cache ------------------------------------------------------------------------


def _kv_geometry(caches, layout):
    c0 = caches[0]
    torch._check(c0.dim() == 5, lambda: "disagg.kv: caches must be 5-D")
    if layout == "HND":
        return c0.shape[3], c0.shape[2], c0.shape[4]  # block_size, heads, head_dim
    return c0.shape[2], c0.shape[3], c0.shape[4]


@register_fake("disagg::kv_pack")
def _kv_pack_fake(caches, block_table, num_tokens, layer_start=0, layer_end=-1, head_start=0,
                  head_end=-1, quant="none", layout="NHD"):
    from .ops import kv_pack_nbytes

    bs, heads, dim = _kv_geometry(caches, layout)
    nl = (len(caches) if layer_end < 0 else layer_end) - layer_start
    nh = (heads if head_end < 0 else head_end) - head_start
    n = kv_pack_nbytes(nl, num_tokens, nh, dim, caches[0].dtype, quant, bs)
    return caches[0].new_empty((n,), dtype=torch.uint8)


@register_fake("disagg::kv_pack_into")
def _kv_pack_into_fake(caches, block_table, num_tokens, out, layer_start=0, layer_end=-1,
                       head_start=0, head_end=-1, quant="none", layout="NHD"):
    return None


@register_fake("disagg::kv_unpack")
def _kv_unpack_fake(buffer, caches, block_table, layer_start=0, head_start=0, layout="NHD"):
    return None


@register_fake("disagg::kv_compact")
def _kv_compact_fake(caches, block_table, src_positions, dst_start, layout="NHD"):
    return None



# ---- Token trees ---------------------------------------------------------------------------


def _tree_bn(parents):
    torch._check(parents.dim() == 2, lambda: "disagg.tree: parents must be 2-D [B, N]")
    return parents.shape[0], parents.shape[1]


@register_fake("disagg::tree_build")
def _tree_build_fake(parents, num_nodes, max_depth=-1):
    B, N = _tree_bn(parents)
    D = N if max_depth < 0 else max_depth + 1
    mk = lambda *s: parents.new_empty(s, dtype=torch.int32)  # noqa: E731
    return mk(B, N), mk(B, N, (N + 31) // 32), mk(B, N), mk(B, N), mk(B, N, D), mk(B)


def _tree_verify_outputs(parents):
    B, N = _tree_bn(parents)
    mk = lambda *s: parents.new_empty(s, dtype=torch.int32)  # noqa: E731
    return mk(B, N), mk(B), mk(B)


@register_fake("disagg::tree_verify_greedy")
def _tree_verify_greedy_fake(logits, tokens, parents, num_nodes):
    return _tree_verify_outputs(parents)


@register_fake("disagg::tree_verify_sample")
def _tree_verify_sample_fake(logits, tokens, parents, num_nodes, temperature, top_k, top_p, seed,
                             offset, draft_probs=None):
    return _tree_verify_outputs(parents)

# ---- Attention -----------------------------------------------------------------------------


@register_fake("disagg::paged_decode_attention")
def _paged_decode_attention_fake(q, kv_cache, block_tables, ctx_lens, scale, sliding_window=0):
    torch._check(q.dim() == 3, lambda: "disagg.paged_decode_attention: q must be 3-D [B, Hq, D]")
    return torch.empty_like(q)

# ---- Tree attention (speculative decoding) ---------------------------------------------------


@register_fake("disagg::paged_tree_attention")
def _paged_tree_attention_fake(q, kv_cache, block_tables, ctx_lens, tree_lens, q_offsets,
                               tree_mask, scale, sliding_window=0):
    torch._check(q.dim() == 3, lambda: "disagg.paged_tree_attention: q must be 3-D [T, Hq, D]")
    torch._check(tree_mask.dim() == 2,
                 lambda: "disagg.paged_tree_attention: tree_mask must be 2-D [T, W]")
    return torch.empty_like(q)

# ---- Expert FFN ----------------------------------------------------------------------------


@register_fake("disagg::expert_gemm")
def _expert_gemm_fake(x, w, expert_offsets):
    torch._check(x.dim() == 2 and w.dim() == 3, lambda: "disagg.expert_gemm: x must be [M, K], w [E, N, K]")
    return x.new_empty((x.shape[0], w.shape[1]))

# ---- Model layers (decode hot path) ---------------------------------------------------------


@register_fake("disagg::moe_experts")
def _moe_experts_fake(x, ids, weights, w13, w2):
    torch._check(x.dim() == 2, lambda: "disagg.moe_experts: x must be 2-D [T, H]")
    return x.new_empty(x.shape)


@register_fake("disagg::moe_experts_packed")
def _moe_experts_packed_fake(x, ids, weights, w13p, w2p, inter):
    torch._check(x.dim() == 2, lambda: "disagg.moe_experts_packed: x must be 2-D [T, H]")
    return x.new_empty(x.shape)


@register_fake("disagg::rms_norm")
def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@register_fake("disagg::add_rms_norm")
def _add_rms_norm_fake(residual, x, weight, eps):
    return torch.empty_like(residual)


@register_fake("disagg::paged_decode_attention_rope")
def _paged_decode_attention_rope_fake(qkv, cos, sin, kv_cache, block_tables, ctx_lens,
                                      num_heads, scale, sliding_window=0):
    torch._check(qkv.dim() == 2, lambda: "disagg.paged_decode_attention_rope: qkv must be 2-D")
    return qkv.new_empty((qkv.shape[0], num_heads, kv_cache.shape[-1]))


@register_fake("disagg::linear")
def _linear_fake(x, weight, bias=None):
    torch._check(weight.dim() == 2, lambda: "disagg.linear: weight must be 2-D [M, K]")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
