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
    Ties go to the lower expert index. NaN logits count as ``-inf``. Softmax over a row whose
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


def moe_combine(
    y: torch.Tensor,
    dest: torch.Tensor,
    weights: torch.Tensor,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Weighted combine back to token order: ``out[t] = sum_j weights[t,j] * y[dest[t*k+j]]``,
    accumulated in float32; dropped assignments (``dest == -1``) contribute nothing."""
    return _ops.moe_combine(y, dest.reshape(-1), weights, out_dtype)


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
