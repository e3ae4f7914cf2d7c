"""Typed Python wrappers over ``torch.ops.disagg.*``.

Each wrapper only shapes arguments and names results; the work and the argument checks happen
in the registered op, so a direct ``torch.ops.disagg.<op>`` call behaves the same.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

_ops = torch.ops.disagg


# ---- MoE routing ---------------------------------------------------------------------------


class RouteOutput(NamedTuple):
    weights: torch.Tensor  # [T, k] float32, 0 where dropped
    ids: torch.Tensor  # [T, k] int32, -1 where dropped
    slots: torch.Tensor  # [T, k] int32, position in the expert's buffer, -1 where dropped
    counts: torch.Tensor  # [E] int32, assignments per expert after capacity


def route(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    bias: Optional[torch.Tensor] = None,
    num_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "max",
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    capacity_factor: float = 0.0,
    drop_policy: str = "position",
    overflow: str = "drop",
) -> RouteOutput:
    """Fused MoE routing: scores, (grouped) top-k, renormalisation and capacity in one op.

    Parameters
    ----------
    logits : Tensor [T, E]
        Router logits (float32, bfloat16 or float16). Scores are computed in float32.
    top_k : int
        Experts per token, ``1 <= top_k <= E``.
    scoring : {"softmax", "sigmoid"}
    bias : Tensor [E] float32, optional
        Selection bias (aux-loss-free balancing): added to the scores to choose experts, not
        to the returned weights.
    num_groups, topk_groups : int
        Grouped top-k: experts are split into ``num_groups`` equal groups, the best
        ``topk_groups`` groups (by ``group_score``: "max" or "sum_top2" of the selection
        scores) are kept, and the top-k is taken inside them.
    renormalize : bool
        Divide the chosen weights by their sum (before capacity is applied).
    routed_scaling_factor : float
        Multiplies the weights.
    capacity_factor : float
        Capacity per expert is ``ceil(capacity_factor * T * top_k / E)``; ``<= 0`` is dropless.
    drop_policy : {"position", "probs"}
        Which assignments an over-full expert keeps: the first in token order, or the
        highest-weighted (ties to the lower token index).
    overflow : {"drop", "reroute"}
        What happens to the rest: dropped, or moved to the token's next-best expert (by
        selection score, inside the chosen groups) that still has room.

    Returns
    -------
    RouteOutput(weights, ids, slots, counts)

    Notes
    -----
    Without ``bias`` and groups, experts are ranked by their logits (the order of the scores,
    without the ties exp underflow would create); otherwise by score + bias. Ties go to the
    lower expert index. NaN logits count as ``-inf``. Softmax over a row whose
    maximum is ``+inf`` shares 1 equally among the ``+inf`` entries; a row with no entry above
    ``-inf`` scores all zeros (its top-k are then chosen by bias and index, with weight 0).
    """
    w, i, s, c = _ops.route(
        logits, top_k, scoring, bias, num_groups, topk_groups, group_score, renormalize,
        routed_scaling_factor, capacity_factor, drop_policy, overflow,
    )
    return RouteOutput(w, i, s, c)


def route_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """The per-expert capacity ``route`` uses (0 = dropless); same formula as the kernel."""
    if not capacity_factor > 0 or num_tokens <= 0:
        return 0
    c = capacity_factor * num_tokens * top_k / num_experts
    return max(1, int(math.ceil(c - 1e-9 * max(1.0, c))))


class MoELayout(NamedTuple):
    dest: torch.Tensor  # [T*k] int32 row of each assignment (-1 dropped)
    src: torch.Tensor  # [rows] int32 assignment (t*k + j) of each row (-1 empty)
    expert_offsets: torch.Tensor  # [E+1] int32
    rank_offsets: torch.Tensor  # [R+1] int32


def moe_layout(
    ids: torch.Tensor,
    num_experts: int,
    *,
    ep_size: int = 1,
    capacity: int = 0,
    slots: Optional[torch.Tensor] = None,
) -> MoELayout:
    """Expert-grouped dispatch order for ``ids [T, k]``.

    ``capacity == 0``: compact layout, ``rows = T*k``; expert ``e`` owns rows
    ``expert_offsets[e]:expert_offsets[e+1]`` in token order, rows past ``expert_offsets[E]``
    are empty. ``capacity > 0``: padded ``[E, capacity]`` layout using ``slots`` from ``route``.
    Experts are split contiguously over ``ep_size`` ranks (rank r owns experts
    ``r*E//R .. (r+1)*E//R - 1``); ``rank_offsets`` gives each rank's rows.
    """
    return MoELayout(*_ops.moe_layout(ids, num_experts, ep_size, capacity, slots))


def moe_permute(x: torch.Tensor, src: torch.Tensor, top_k: int) -> torch.Tensor:
    """Gather tokens ``x [T, H]`` into expert order: ``out[r] = x[src[r] // top_k]``, zero rows
    where ``src[r] == -1``. For the padded layout, ``view(E, capacity, H)`` the result."""
    return _ops.moe_permute(x, src, top_k)


def moe_permute_into(x: torch.Tensor, src: torch.Tensor, top_k: int, out: torch.Tensor) -> torch.Tensor:
    """:func:`moe_permute` into a caller-owned ``out [rows, H]`` (same dtype as ``x``), so a
    serving loop reuses one buffer instead of allocating each step. Returns ``out``."""
    _ops.moe_permute_into(x, src, top_k, out)
    return out


def moe_combine(
    y: torch.Tensor,
    dest: torch.Tensor,
    weights: torch.Tensor,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Weighted combine back to token order: ``out[t] = sum_j weights[t,j] * y[dest[t*k+j]]``,
    accumulated in float32; dropped assignments (``dest == -1``) contribute nothing."""
    return _ops.moe_combine(y, dest.reshape(-1), weights, out_dtype)


def moe_combine_into(y: torch.Tensor, dest: torch.Tensor, weights: torch.Tensor,
                     out: torch.Tensor) -> torch.Tensor:
    """:func:`moe_combine` into a caller-owned ``out [T, H]`` (float32 or ``y``'s dtype, must not
    overlap ``y``), so a serving loop reuses one buffer instead of allocating each step.
    Returns ``out``."""
    _ops.moe_combine_into(y, dest.reshape(-1), weights, out)
    return out


# ---- Paged KV cache ------------------------------------------------------------------------

KV_QUANTS = ("none", "int8", "fp8_e4m3")
_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # header dtype codes 0, 1, 2
_KV_MAGIC = 0x564B4744  # "DGKV"
_KV_HEADER = "<IHHBBBBiiiiiiiqqq"  # see include/disagg/kv.h, struct BufferHeader (64 bytes)
KV_HEADER_BYTES = 64


class KVBufferInfo(NamedTuple):
    """What a ``kv_pack`` buffer's header says about it."""

    dtype: torch.dtype  # the sender's cache dtype
    quant: str  # "none", "int8" or "fp8_e4m3"
    num_layers: int
    num_tokens: int
    num_heads: int  # heads in the buffer (the packed slice)
    head_dim: int
    scale_group: int  # tokens per scale (the sender's block size) when quantized, else 0
    layer_start: int  # the sender's first packed layer
    head_start: int  # the sender's first packed head
    nbytes: int  # the buffer's total size


def kv_pack_nbytes(num_layers: int, num_tokens: int, num_heads: int, head_dim: int,
                   dtype: torch.dtype, quant: str = "none", block_size: int = 1) -> int:
    """Size in bytes of the buffer ``kv_pack`` produces for this geometry (header + payload +
    16-byte-aligned float32 scales, one per (layer, K/V, block, head) when quantized)."""
    elem = dtype.itemsize if quant == "none" else 1
    payload = num_layers * 2 * num_tokens * num_heads * head_dim * elem
    scales_at = (KV_HEADER_BYTES + payload + 15) // 16 * 16
    groups = 0 if quant == "none" else -(-num_tokens // block_size)
    return scales_at + num_layers * 2 * groups * num_heads * 4


def kv_buffer_info(buffer: torch.Tensor) -> KVBufferInfo:
    """Read the header of a ``kv_pack`` buffer (the op checks it in full when unpacking)."""
    import struct

    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() < KV_HEADER_BYTES:
        raise ValueError("disagg.kv_buffer_info: buffer must be a 1-D uint8 tensor from kv_pack "
                         f"(at least {KV_HEADER_BYTES} bytes), got {buffer.dtype} {tuple(buffer.shape)}")
    raw = bytes(buffer[:KV_HEADER_BYTES].cpu().tolist())
    (magic, version, _hb, dt, q, _eb, _r, layers, tokens, heads, dim, group, l0, h0, _po, _so,
     total) = struct.unpack(_KV_HEADER, raw)
    if magic != _KV_MAGIC:
        raise ValueError("disagg.kv_buffer_info: buffer does not start with the kv_pack magic")
    if version != 1 or dt > 2 or q > 2:
        raise ValueError(f"disagg.kv_buffer_info: unsupported buffer (version {version}, dtype "
                         f"code {dt}, quant code {q})")
    return KVBufferInfo(_KV_DTYPES[dt], KV_QUANTS[q], layers, tokens, heads, dim, group, l0, h0,
                        total)


def kv_pack(
    caches: list,
    block_table: torch.Tensor,
    num_tokens: int,
    *,
    layer_start: int = 0,
    layer_end: int = -1,
    head_start: int = 0,
    head_end: int = -1,
    quant: str = "none",
    layout: str = "NHD",
) -> torch.Tensor:
    """Pack one request's KV cache into one contiguous, self-describing uint8 buffer.

    Parameters
    ----------
    caches : list of Tensor
        Per-layer paged caches, all the same shape and dtype (float32, bfloat16 or float16):
        ``[num_blocks, 2, block_size, kv_heads, head_dim]`` for ``layout="NHD"`` or
        ``[num_blocks, 2, kv_heads, block_size, head_dim]`` for ``"HND"``; K at index 0 of dim 1.
    block_table : Tensor [n] int32 or int64
        The request's blocks in token order; the first ``ceil(num_tokens / block_size)`` are read
        (the last one possibly partly).
    num_tokens : int
    layer_start, layer_end : int
        Layers ``[layer_start, layer_end)`` of ``caches`` (``-1``: to the end), so a prefill
        worker can ship layers while later ones are still being computed.
    head_start, head_end : int
        KV heads ``[head_start, head_end)`` (``-1``: to the end), for a receiver with another
        tensor-parallel degree.
    quant : {"none", "int8", "fp8_e4m3"}
        Symmetric quantization with one float32 scale per (layer, K/V, block, head), carried in
        the buffer: int8 ``|err| <= amax / 254``; fp8 e4m3 ``|err| <= max(|x| / 16,
        amax / 448 * 2**-9)`` with a power-of-two scale (amax over the block's tokens of that
        head). Needs finite values.

    Returns
    -------
    Tensor [kv_pack_nbytes(...)] uint8
        64-byte header, payload ``[layer][K/V][token][head][dim]``, then the scales.
    """
    return _ops.kv_pack(caches, block_table, num_tokens, layer_start, layer_end, head_start,
                        head_end, quant, layout)


def kv_pack_into(
    caches: list,
    block_table: torch.Tensor,
    num_tokens: int,
    out: torch.Tensor,
    *,
    layer_start: int = 0,
    layer_end: int = -1,
    head_start: int = 0,
    head_end: int = -1,
    quant: str = "none",
    layout: str = "NHD",
) -> int:
    """``kv_pack`` into a caller-owned uint8 buffer (e.g. memory registered with a transfer
    engine); returns the number of bytes written (``out`` may be larger)."""
    _ops.kv_pack_into(caches, block_table, num_tokens, out, layer_start, layer_end, head_start,
                      head_end, quant, layout)
    L = len(caches)
    nl = (L if layer_end < 0 else layer_end) - layer_start
    c0 = caches[0]
    heads = c0.shape[3] if layout == "NHD" else c0.shape[2]
    bs = c0.shape[2] if layout == "NHD" else c0.shape[3]
    nh = (heads if head_end < 0 else head_end) - head_start
    return kv_pack_nbytes(nl, num_tokens, nh, c0.shape[4], c0.dtype, quant, bs)


def kv_unpack(
    buffer: torch.Tensor,
    caches: list,
    block_table: torch.Tensor,
    *,
    layer_start: int = 0,
    head_start: int = 0,
    layout: str = "NHD",
) -> None:
    """Scatter a ``kv_pack`` buffer into paged caches, in place.

    The destination may differ from the sender in block size (either way), KV head count (the
    buffer's heads land at ``[head_start, head_start + heads)``), dtype (converted with
    round-to-nearest-even; quantized payloads are dequantized) and layout (``"NHD"`` or
    ``"HND"``). The buffer's layer ``i`` goes to ``caches[layer_start + i]``; its tokens fill
    the first ``ceil(num_tokens / block_size)`` blocks of ``block_table``. Without quantization
    and with the sender's dtype the round trip is bit-exact.
    """
    _ops.kv_unpack(buffer, caches, block_table, layer_start, head_start, layout)


def kv_compact(
    caches: list,
    block_table: torch.Tensor,
    src_positions: torch.Tensor,
    dst_start: int,
    *,
    layout: str = "NHD",
) -> None:
    """Move token positions ``src_positions[i]`` to ``dst_start + i`` in every layer (K and V),
    in place: after speculative verification, the accepted tree nodes become consecutive.

    Positions index the request's tokens through ``block_table``. Any overlap of sources and
    destinations is handled (every source is read before it is overwritten); duplicates in
    ``src_positions`` are allowed.
    """
    _ops.kv_compact(caches, block_table, src_positions, dst_start, layout)

# ---- Token trees ---------------------------------------------------------------------------


class TreeBuildOutput(NamedTuple):
    depth: torch.Tensor  # [B, N] int32, root 0, -1 for padding nodes
    mask: torch.Tensor  # [B, N, ceil(N/32)] int32 bit words: bit j of row i = j is i or an ancestor
    first_child: torch.Tensor  # [B, N] int32, -1 = none / padding
    next_sibling: torch.Tensor  # [B, N] int32, -1 = none / padding
    leaf_paths: torch.Tensor  # [B, N, D] int32, row k = root-to-leaf nodes of the k-th leaf
    num_leaves: torch.Tensor  # [B] int32


class TreeVerifyOutput(NamedTuple):
    accepted: torch.Tensor  # [B, N] int32 node indices along the accepted path, root first, -1 padded
    accept_len: torch.Tensor  # [B] int32 entries of accepted (>= 1: the root counts)
    bonus: torch.Tensor  # [B] int32 the target's token after the last accepted node


def _full_num_nodes(parents: torch.Tensor, num_nodes: Optional[torch.Tensor]) -> torch.Tensor:
    if num_nodes is not None:
        return num_nodes
    return torch.full((parents.shape[0],), parents.shape[1], dtype=torch.int32,
                      device=parents.device)


def tree_build(parents: torch.Tensor, num_nodes: Optional[torch.Tensor] = None, *,
               max_depth: int = -1) -> TreeBuildOutput:
    """Traversal structures and the tree attention mask of a batch of draft trees.

    Parameters
    ----------
    parents : Tensor [B, N] int32 or int64
        ``parents[b, 0] == -1`` (node 0 is the root: the last accepted token) and
        ``0 <= parents[b, i] < i`` for ``0 < i < num_nodes[b]``. Entries past ``num_nodes[b]`` are
        padding and are ignored.
    num_nodes : Tensor [B] int, optional
        Nodes of each request's tree, ``1 <= num_nodes[b] <= N`` (default: N for all).
    max_depth : int
        Bound on the depth of a leaf; sets ``D = max_depth + 1`` columns of ``leaf_paths``.
        ``-1`` uses ``D = N``, which always fits but costs ``B*N*N`` int32.

    Returns
    -------
    TreeBuildOutput
        ``depth`` (positions are context length + depth), ``mask`` (bit ``j % 32`` of word
        ``j // 32`` in row ``i`` is set iff node ``j`` is node ``i`` or an ancestor; padding rows
        are zero; see :func:`unpack_tree_mask`), ``first_child``/``next_sibling`` (children in
        index order), ``leaf_paths`` (leaves in index order, each row the root-to-leaf node
        indices, -1 padded) and ``num_leaves``.
    """
    return TreeBuildOutput(*_ops.tree_build(parents, _full_num_nodes(parents, num_nodes), max_depth))


def unpack_tree_mask(mask: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """``tree_build``'s bit-packed mask ``[B, N, W]`` as a boolean ``[B, N, num_nodes]`` tensor."""
    bits = torch.arange(32, device=mask.device, dtype=torch.int32)
    full = ((mask.unsqueeze(-1) >> bits) & 1).bool()  # [B, N, W, 32]
    return full.flatten(-2)[..., :num_nodes]


def tree_verify_greedy(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                       num_nodes: Optional[torch.Tensor] = None) -> TreeVerifyOutput:
    """Greedy verification of a batch of draft trees.

    From the root, repeatedly move to the first child (lowest index) whose token equals the
    target's argmax at the current node; the bonus token is the argmax where no child matches.
    Only the logits rows of the nodes on the accepted path are read.

    Parameters
    ----------
    logits : Tensor [B, N, V] float32/bfloat16/float16, or Tensor [B, N] int
        Target logits at every node (row ``i`` is the next-token distribution after node ``i``),
        or the target's argmax ids. Argmax ties go to the lower token id; NaN counts as -inf.
    tokens : Tensor [B, N] int
        Draft token of each node (the root's entry is not read); ``0 <= tokens < V``.
    parents, num_nodes : see :func:`tree_build`.

    Returns
    -------
    TreeVerifyOutput
        ``accepted [B, N]`` (node indices from the root, -1 padded), ``accept_len [B]`` (entries
        of ``accepted``: 1 + accepted draft tokens) and ``bonus [B]``. The new tokens of request
        ``b`` are ``tokens[b, accepted[b, 1:accept_len[b]]]`` followed by ``bonus[b]``.
    """
    return TreeVerifyOutput(*_ops.tree_verify_greedy(logits, tokens, parents,
                                                      _full_num_nodes(parents, num_nodes)))


def _per_request(x, B: int, dtype: torch.dtype, device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x if x.dim() == 1 else x.expand(B)
    return torch.full((B,), x, dtype=dtype, device=device)


def tree_verify_sample(logits: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
                       num_nodes: Optional[torch.Tensor] = None, *, temperature=1.0, top_k=0,
                       top_p=1.0, seed=0, offset=0,
                       draft_probs: Optional[torch.Tensor] = None) -> TreeVerifyOutput:
    """Lossless verification of a batch of draft trees by speculative sampling.

    The tokens this returns are distributed exactly as sampling from the target one token at a
    time with the same temperature / top-k / top-p. At each visited node the target distribution
    ``p`` is ``softmax(top_k(logits / temperature))`` restricted to top-p and renormalised; the
    node's children are tried in index order:

    * deterministic drafts (``draft_probs=None``: top-k expansions, n-gram, any proposal): child
      token ``x`` is accepted with probability ``p(x) / (mass not yet rejected)``; a rejected
      token leaves ``p``. Repeated sibling tokens are handled (a repeat is always rejected).
    * stochastic drafts (children drawn i.i.d. from ``draft_probs[b, parent]``): accept ``x`` with
      probability ``min(1, p(x) / q(x))``, else ``p := normalise(max(p - q, 0))`` (SpecInfer).

    When all children are rejected (or at a leaf) the bonus token is sampled from the remaining
    ``p``. ``temperature == 0`` gives exactly :func:`tree_verify_greedy`'s result.

    Parameters
    ----------
    logits : Tensor [B, N, V] float32/bfloat16/float16
        Target logits at every node; only the rows of visited nodes are read.
    tokens, parents, num_nodes : see :func:`tree_verify_greedy`.
    temperature : float or Tensor [B]
        ``>= 0``; 0 is greedy.
    top_k : int or Tensor [B]
        Keep the ``top_k`` largest logits (ties to the lower id); 0 disables.
    top_p : float or Tensor [B]
        In ``(0, 1]``: keep the smallest most-probable set whose mass reaches ``top_p``; 1 disables.
    seed, offset : int or Tensor [B] int64
        Philox4x32-10 key and counter base. Draw ``k`` of request ``b`` uses counter
        ``(offset[b], k)``; advance ``offset`` by one per call for fresh randomness. The same
        inputs always give the same outputs (CUDA-graph friendly: no generator state).
    draft_probs : Tensor [B, N, V] float, optional
        Draft distribution at every node (row ``i`` = the distribution node ``i``'s children
        were drawn from). Only rows of visited nodes are read.

    Returns
    -------
    TreeVerifyOutput
        As for :func:`tree_verify_greedy`.
    """
    B, dev = parents.shape[0], parents.device
    return TreeVerifyOutput(*_ops.tree_verify_sample(
        logits, tokens, parents, _full_num_nodes(parents, num_nodes),
        _per_request(temperature, B, torch.float32, dev), _per_request(top_k, B, torch.int64, dev),
        _per_request(top_p, B, torch.float32, dev), _per_request(seed, B, torch.int64, dev),
        _per_request(offset, B, torch.int64, dev), draft_probs))

# ---- Attention -----------------------------------------------------------------------------


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Decode attention straight from a paged KV cache (no gather of the pages).

    Parameters
    ----------
    q : Tensor [B, Hq, D]
        One query token per sequence (float32, bfloat16 or float16).
    kv_cache : Tensor [num_blocks, 2, block_size, Hkv, D]
        One layer of a ``PagedKVCache`` (``[:, 0]`` keys, ``[:, 1]`` values), q's dtype.
    block_tables : Tensor [B, max_blocks] int32 or int64
        Each sequence's blocks in order; entries past its length are not read.
    ctx_lens : Tensor [B], block_tables' dtype
        Keys per sequence (including the current token), in ``[1, max_blocks*block_size]``.
    scale : float
        Softmax scale, usually ``D ** -0.5``.
    sliding_window : int
        If > 0, attend to the last ``sliding_window`` keys only.

    Returns
    -------
    Tensor [B, Hq, D] in q's dtype; query head ``h`` uses KV head ``h // (Hq // Hkv)``.
    """
    return _ops.paged_decode_attention(q, kv_cache, block_tables, ctx_lens, scale, sliding_window)

# ---- Tree attention (speculative decoding) ---------------------------------------------------


def paged_tree_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    tree_lens: torch.Tensor,
    q_offsets: torch.Tensor,
    tree_mask: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """Token-tree attention straight from a paged KV cache (no gather of the pages).

    Sequence ``b`` owns query rows ``q_offsets[b]:q_offsets[b+1]``. Its cache holds
    ``ctx_lens[b]`` committed tokens, then ``tree_lens[b]`` tree nodes (their K/V already
    written at cache positions ``ctx .. ctx + tree_len - 1``). Every query sees all committed
    keys, and the tree keys whose bit is set in its ``tree_mask`` row: its ancestors and
    itself (``tree_build``'s ancestor mask, one row per query).

    Parameters
    ----------
    q : Tensor [T, Hq, D]
        The queries of every sequence's tree nodes, flat (float32, bfloat16 or float16).
    kv_cache : Tensor [num_blocks, 2, block_size, Hkv, D]
        One layer of a ``PagedKVCache``, q's dtype.
    block_tables : Tensor [B, max_blocks] int32 or int64
        Blocks of each sequence in order (covering ``ctx + tree_len`` positions).
    ctx_lens, tree_lens : Tensor [B], block_tables' dtype
        Committed keys and tree keys per sequence (``>= 0``).
    q_offsets : Tensor [B + 1], block_tables' dtype
        Query rows per sequence, ``q_offsets[0] == 0``, ``q_offsets[B] == T``; a sequence
        may have fewer queries than tree keys (the draft model queries one depth at a time).
    tree_mask : Tensor [T, W] int32
        Bit ``j % 32`` of word ``j // 32`` set iff the query sees tree key ``j``; every row
        sets at least one bit, none at or past ``tree_lens[b]``. Ancestors precede their
        descendants, so the ``k``-th set bit of a row is at RoPE position ``ctx + k`` and
        the query at ``ctx + popcount(row) - 1`` (used by the sliding window).
    scale : float
        Softmax scale, usually ``D ** -0.5``.
    sliding_window : int
        If > 0, a query at position ``p`` sees keys at positions ``> p - sliding_window``.

    Returns
    -------
    Tensor [T, Hq, D] in q's dtype; query head ``h`` uses KV head ``h // (Hq // Hkv)``.
    """
    return _ops.paged_tree_attention(q, kv_cache, block_tables, ctx_lens, tree_lens, q_offsets,
                                     tree_mask, scale, sliding_window)


def tree_mask_rows(mask: torch.Tensor, num_nodes) -> torch.Tensor:
    """``tree_build``'s ``mask [B, N, W]`` as the ``[T, W]`` rows of ``paged_tree_attention``
    (the first ``num_nodes[b]`` rows of each request, in order)."""
    B, N, W = mask.shape
    n = torch.as_tensor(num_nodes, dtype=torch.long).reshape(-1)
    if bool((n == N).all()):
        return mask.reshape(B * N, W)
    keep = torch.arange(N)[None, :] < n[:, None]
    return mask[keep]

# ---- Expert FFN ----------------------------------------------------------------------------


def expert_gemm(x: torch.Tensor, w: torch.Tensor, expert_offsets: torch.Tensor) -> torch.Tensor:
    """The expert-grouped matmul of a MoE FFN: ``out[o[e]:o[e+1]] = x[o[e]:o[e+1]] @ w[e].T``.

    Parameters
    ----------
    x : Tensor [M, K]
        Token rows in expert order (as ``moe_permute`` writes them for the compact layout).
    w : Tensor [E, N, K]
        One ``nn.Linear`` weight (``[out, in]``) per expert, x's dtype.
    expert_offsets : Tensor [E + 1] int32 or int64
        ``moe_layout``'s ``expert_offsets``: non-decreasing, in ``[0, M]``.

    Returns
    -------
    Tensor [M, N] in x's dtype, float32 accumulation; rows outside ``[o[0], o[E])`` are zero.
    On CUDA, bf16 with N and K multiples of 8 runs a CUTLASS grouped GEMM without a host sync
    (offsets are then not validated: out-of-range values are clamped); otherwise one matmul per
    expert.
    """
    return _ops.expert_gemm(x, w, expert_offsets)

# ---- Model layers (decode hot path) ---------------------------------------------------------


def moe_experts(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> torch.Tensor:
    """The routed experts of a few tokens in one call: each token's top-k SiLU-gated MLPs and
    their weighted sum, reading each used expert's weights once for all its tokens.

    Meant for decode-sized batches; for large ones (prefill) ``moe_layout`` / ``moe_permute``
    / matmuls / ``moe_combine`` is faster.

    Parameters
    ----------
    x : Tensor [T, H]
        Tokens (float32, bfloat16 or float16).
    ids : Tensor [T, k] int32 or int64
        Expert of each assignment (``route``'s ids); -1 = dropped (adds nothing).
    weights : Tensor [T, k]
        Weight of each assignment (``route``'s weights); computed in float32.
    w13 : Tensor [E, 2I, H], x's dtype (or bfloat16 with float32 x), contiguous
        Per expert the gate projection's rows then the up projection's (HF's fused
        ``gate_up_proj`` layout; Mixtral's ``w1`` then ``w3``).
    w2 : Tensor [E, H, I], w13's dtype, contiguous
        The down projection. bfloat16 weights with float32 tokens (a bf16 checkpoint run in
        float32) are widened exactly as they are read: the result equals the one with float32
        copies of the weights, bit for bit, for half the bytes read.

    Returns
    -------
    Tensor [T, H] in x's dtype:
    ``sum_k weights[t,k] * w2[e] @ (silu(w13[e,:I] @ x[t]) * (w13[e,I:] @ x[t]))``,
    ``e = ids[t,k]``, accumulated in float32 and rounded once.
    """
    return _ops.moe_experts(x, ids, weights, w13, w2)


# Lane l of a 16-wide vector is stored in slot _LANE_ORDER[l] of a packed panel: the order in
# which the kernel sums the lanes (include/disagg/dot_tile.h, kLaneOrder; its own inverse).
_LANE_ORDER = [0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15]


def _pack_rows(w: torch.Tensor) -> torch.Tensor:
    """``[..., rows, n]`` -> ``[..., ceil(rows/64), 16, ceil(n/16), 4, 16]``: element
    ``[p, s, j, v, i] = w[64 p + 16 v + i, 16 j + _LANE_ORDER[s]]``, zero past the rows and n."""
    *lead, rows, n = w.shape
    P, J = -(-rows // 64), -(-n // 16)
    w = torch.nn.functional.pad(w, (0, J * 16 - n, 0, P * 64 - rows))
    w = w.reshape(*lead, P, 4, 16, J, 16)
    d = len(lead)
    w = w.permute(*range(d), d, d + 4, d + 3, d + 1, d + 2)
    return w[(slice(None),) * (d + 1) + (_LANE_ORDER,)].contiguous()


def _unpack_rows(wp: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    *lead, P, _, J, _, _ = wp.shape
    d = len(lead)
    wp = wp[(slice(None),) * (d + 1) + (_LANE_ORDER,)]
    w = wp.permute(*range(d), d, d + 3, d + 4, d + 2, d + 1).reshape(*lead, P * 64, J * 16)
    return w[..., :rows, :n].contiguous()


def pack_moe_weights(w13: torch.Tensor, w2: torch.Tensor) -> tuple:
    """Pack HF-layout expert weights for :func:`moe_experts_packed` (done once, at load).

    The layout keeps 16 weight rows across a vector, lane-major within 64-row panels:
    ``moe_experts`` builds the same panels on the fly for experts with many tokens, so the
    packed op skips that work and takes the panel path for decode-sized batches too. Same
    dtype and bytes as the input (plus padding to 64 rows and 16 columns).

    Parameters
    ----------
    w13 : Tensor [E, 2I, H]
    w2 : Tensor [E, H, I]

    Returns
    -------
    (w13p [E, 2, ceil(I/64), 16, ceil(H/16), 4, 16], w2p [E, ceil(H/64), 16, ceil(I/16), 4, 16])
    """
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[1] != 2 * w2.shape[2] \
            or w2.shape[1] != w13.shape[2] or w2.shape[0] != w13.shape[0]:
        raise ValueError(f"pack_moe_weights: w13 must be [E, 2I, H] and w2 [E, H, I], got "
                         f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    E, I2, H = w13.shape
    return _pack_rows(w13.reshape(E, 2, I2 // 2, H)), _pack_rows(w2)


def unpack_moe_weights(w13p: torch.Tensor, w2p: torch.Tensor, hidden: int, inter: int) -> tuple:
    """The HF-layout ``(w13 [E, 2I, H], w2 [E, H, I])`` that :func:`pack_moe_weights` packed."""
    E = w13p.shape[0]
    return (_unpack_rows(w13p, inter, hidden).reshape(E, 2 * inter, hidden),
            _unpack_rows(w2p, hidden, inter))


def moe_experts_packed(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       w13p: torch.Tensor, w2p: torch.Tensor, inter: int) -> torch.Tensor:
    """:func:`moe_experts` with weights from :func:`pack_moe_weights`: the same result bit
    for bit, with the panel path (no horizontal sums) for any number of tokens on CPUs with
    AVX-512 (elsewhere it unpacks the weights and runs ``moe_experts``'s path: portable, not
    fast). ``inter`` is the experts' intermediate size I. CPU tensors only."""
    return _ops.moe_experts_packed(x, ids, weights, w13p, w2p, inter)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim as HF computes it: float32 statistics, the normalised value
    cast to x's dtype, then scaled by ``weight`` (x's dtype)."""
    return _ops.rms_norm(x, weight, eps)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """``residual += x`` in place (contiguous ``residual``), then ``rms_norm(residual)``: the
    residual add and the next norm of a pre-norm layer in one pass."""
    return _ops.add_rms_norm(residual, x, weight, eps)


def paged_decode_attention_rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    ctx_lens: torch.Tensor,
    num_heads: int,
    scale: float,
    sliding_window: int = 0,
) -> torch.Tensor:
    """A decode step's attention from the fused QKV projection, in one call: RoPE on q and k,
    each token's K/V appended to the paged cache, then :func:`paged_decode_attention`.

    Parameters
    ----------
    qkv : Tensor [B, (num_heads + 2 Hkv) * D], contiguous
        One new token per sequence: its q heads, then k heads, then v heads.
    cos, sin : Tensor [B, D], qkv's dtype
        HF's rotary tables at each token's position (rotate-half convention:
        ``x * cos + rotate_half(x) * sin``, computed in float32).
    kv_cache : Tensor [num_blocks, 2, block_size, Hkv, D], modified in place
        The new token's K (rotated) and V are written at position ``ctx_lens[b] - 1`` of
        ``block_tables[b]``.
    block_tables, ctx_lens, scale, sliding_window
        As for :func:`paged_decode_attention`; ``ctx_lens`` includes the new token.

    Returns
    -------
    Tensor [B, num_heads, D] in qkv's dtype.
    """
    return _ops.paged_decode_attention_rope(qkv, cos, sin, kv_cache, block_tables, ctx_lens,
                                            num_heads, scale, sliding_window)


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (``weight`` ``[M, K]`` contiguous, as HF stores projections),
    float32 accumulation, one rounding to x's dtype. Streams the weight once for a few rows
    (decode), where a BLAS call costs mostly setup; also used for prefill-sized inputs.
    ``weight`` is in x's dtype, or bfloat16 under float32 ``x`` (a bf16 checkpoint run in
    float32: widened exactly as read, the result equals that of a float32 copy bit for bit);
    ``bias`` is in x's dtype."""
    return _ops.linear(x, weight, bias)
