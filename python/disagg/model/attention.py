"""Attention over a paged KV cache, and the per-step metadata that describes a batch.

A batch is a flat list of new tokens from several sequences: decode sequences (one new token
each) first, then prefill chunks. Each new token's K/V is written into the cache at its slot,
then decode rows attend in one batched call and each prefill chunk attends on its own.
"""
from __future__ import annotations

import array
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import ops


def long_tensor(values: list) -> torch.Tensor:
    """int64 tensor of a list of ints through a C array: 2-4x faster than ``torch.tensor`` on
    the short lists a step builds (several per step, every step)."""
    if not values:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(array.array("q", values), dtype=torch.int64)


@dataclass
class TreeMask:
    """Which keys the queries of a token-tree chunk see, for ``paged_tree_attention``: all
    ``ctx`` committed keys, then the tree keys (cache positions ``ctx + j``) whose bit ``j`` is
    set in the query's row of ``bits [q_len, W]`` int32 (``tree_build``'s ancestor mask). The
    chunk's queries are its last ``q_len`` tree keys."""

    ctx: int
    bits: torch.Tensor


@dataclass
class PrefillChunk:
    start: int  # first row of the chunk in the flat batch
    q_len: int  # new tokens in the chunk
    ctx_len: int  # tokens of the sequence once the chunk is written (earlier ones + q_len)
    block_table: torch.Tensor  # [num_blocks] int64, blocks holding positions 0..ctx_len-1
    # Optional boolean [q_len, ctx_len]: which cached keys each new token sees, or a TreeMask
    # (token trees: a node sees the context and its ancestors only); None = causal.
    mask: Optional[object] = None


@dataclass
class AttentionMetadata:
    """Everything attention needs about one forward step, shared by all layers.

    Build it with :meth:`build`; rows ``0..num_decode-1`` are decode tokens.
    """

    slot_mapping: torch.Tensor  # [N] int64 flat cache slot of each new token
    block_size: int
    num_decode: int = 0
    decode_block_tables: Optional[torch.Tensor] = None  # [B, max_blocks] int64
    decode_ctx_lens: Optional[torch.Tensor] = None  # [B] int64 (including the new token)
    prefills: list = field(default_factory=list)
    sliding_window: Optional[int] = None
    kv_rows: Optional[torch.Tensor] = None  # [2N] rows of cache.view(-1, Hkv, D): K then V
    _trees: Optional[tuple] = None  # tree_batch() cache
    _rows: Optional[tuple] = None  # row_attention() cache

    # Longest prefill context attended row by row (see row_attention): up to here the paged
    # decode kernel per query row beat batched causal SDPA on the benchmark CPU (1.2-1.7x at
    # 64-512 keys), at 1024 SDPA's tiling wins.
    ROW_ATTN_MAX_CTX = 512

    def row_attention(self) -> Optional[tuple]:
        """``(block_tables [N, M], ctx_lens [N])`` treating every row of the step as a decode
        query: a prefill row at position p attends to the first p + 1 keys of its sequence,
        which is causal attention, sliding window included. One ``paged_decode_attention_rope``
        call then does RoPE, the K/V writes and the attention of the whole step. None when a
        chunk carries a mask or a token tree, or a context is over ``ROW_ATTN_MAX_CTX``."""
        if self._rows is None:
            self._rows = ()
            if all(c.mask is None and c.ctx_len <= self.ROW_ATTN_MAX_CTX for c in self.prefills):
                nd = self.num_decode
                if not self.prefills:
                    if nd:
                        self._rows = (self.decode_block_tables, self.decode_ctx_lens)
                else:
                    bs = self.block_size
                    nbs = [-(-c.ctx_len // bs) for c in self.prefills]
                    mb = max(nbs + ([self.decode_block_tables.shape[1]] if nd else []))
                    tables = torch.zeros(nd + len(nbs), mb, dtype=torch.int64)
                    ctx: list = []
                    counts = [1] * nd
                    if nd:
                        tables[:nd, :self.decode_block_tables.shape[1]] = self.decode_block_tables
                        ctx = self.decode_ctx_lens.tolist()
                    for i, (c, nb) in enumerate(zip(self.prefills, nbs)):
                        tables[nd + i, :nb] = c.block_table[:nb]
                        ctx.extend(range(c.ctx_len - c.q_len + 1, c.ctx_len + 1))
                        counts.append(c.q_len)
                    self._rows = (tables.repeat_interleave(long_tensor(counts), 0),
                                  long_tensor(ctx))
        return self._rows or None

    def tree_batch(self) -> Optional[tuple]:
        """The ``TreeMask`` chunks (token trees) as ``paged_tree_attention`` arguments,
        computed once per step: ``(q_rows, block_tables, ctx_lens, tree_lens, q_offsets,
        bits)``, ``q_rows`` a slice when the chunks' rows are contiguous; None without trees."""
        if self._trees is None:
            trees = [c for c in self.prefills if isinstance(c.mask, TreeMask)]
            if not trees:
                self._trees = ()
                return None
            bs = self.block_size
            nblk = max(-(-c.ctx_len // bs) for c in trees)
            W = max(c.mask.bits.shape[1] for c in trees)
            tables = torch.zeros(len(trees), nblk, dtype=torch.int64)
            ctx, tl, offs, rows = [], [], [0], []
            for t, c in enumerate(trees):
                nb = -(-c.ctx_len // bs)
                tables[t, :nb] = c.block_table[:nb]
                ctx.append(c.mask.ctx)
                tl.append(c.ctx_len - c.mask.ctx)
                offs.append(offs[-1] + c.q_len)
                rows.append((c.start, c.q_len))
            bits = [c.mask.bits for c in trees]
            if any(b.shape[1] != W for b in bits):
                bits = [torch.nn.functional.pad(b, (0, W - b.shape[1])) for b in bits]
            if all(rows[k][0] == rows[k - 1][0] + rows[k - 1][1] for k in range(1, len(rows))):
                q_rows = slice(rows[0][0], rows[0][0] + offs[-1])
            else:
                q_rows = torch.cat([torch.arange(a, a + n) for a, n in rows])
            self._trees = (q_rows, tables, torch.tensor(ctx, dtype=torch.int64),
                           torch.tensor(tl, dtype=torch.int64),
                           torch.tensor(offs, dtype=torch.int64), torch.cat(bits))
        return self._trees or None

    def cache_rows(self) -> torch.Tensor:
        """Where the new tokens' K and V go in a layer cache viewed as ``[NB*2*bs, Hkv, D]``;
        computed once per step and shared by the layers."""
        if self.kv_rows is None:
            bs = self.block_size
            k = (self.slot_mapping // bs) * (2 * bs) + self.slot_mapping % bs
            self.kv_rows = torch.cat((k, k + bs))
        return self.kv_rows

    @classmethod
    def build(cls, seqs: Sequence[tuple], block_size: int, slot_mapping: torch.Tensor,
              sliding_window: Optional[int] = None) -> "AttentionMetadata":
        """From ``(q_len, ctx_len, block_table)`` per sequence, in row order, where
        ``block_table`` is a list or tensor of block ids; all sequences with ``q_len == 1``
        must come first (they are batched as decode). An optional fourth element, a
        :class:`TreeMask` (token trees, read in place by ``paged_tree_attention``) or a boolean
        ``[q_len, ctx_len]`` mask, replaces the causal mask of that sequence; such sequences
        are never batched as decode."""
        meta = cls(slot_mapping=slot_mapping, block_size=block_size,
                   sliding_window=sliding_window)
        nd = 0
        while nd < len(seqs) and seqs[nd][0] == 1 and (len(seqs[nd]) < 4 or seqs[nd][3] is None):
            nd += 1
        meta.num_decode = nd
        if nd:
            ctx = [s[1] for s in seqs[:nd]]
            max_blocks = (max(ctx) + block_size - 1) // block_size
            flat: list = []  # one flat list: torch.tensor is much slower on nested ones
            for s in seqs[:nd]:
                t = s[2]
                t = t.tolist() if isinstance(t, torch.Tensor) else t
                if len(t) >= max_blocks:
                    flat += t[:max_blocks]
                else:
                    flat += t
                    flat += [0] * (max_blocks - len(t))
            meta.decode_block_tables = long_tensor(flat).view(nd, max_blocks)
            meta.decode_ctx_lens = long_tensor(ctx)
        row = nd
        for s in seqs[nd:]:
            q_len, ctx_len, table = s[:3]
            table = torch.as_tensor(table, dtype=torch.int64)
            meta.prefills.append(PrefillChunk(row, q_len, ctx_len, table,
                                              s[3] if len(s) > 3 else None))
            row += q_len
        return meta


def write_kv(cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             meta: "AttentionMetadata") -> None:
    """Store new ``k, v [N, Hkv, D]`` into ``cache [NB, 2, bs, Hkv, D]`` at the step's slots."""
    cache.view(-1, cache.shape[-2], cache.shape[-1]).index_copy_(
        0, meta.cache_rows(), torch.cat((k, v)))


def _gather(cache: torch.Tensor, table: torch.Tensor, n: int, which: int) -> torch.Tensor:
    # [blocks, bs, H, D] -> [n, H, D]: the sequence's first n positions in order.
    x = cache[table, which]
    return x.reshape(-1, x.shape[-2], x.shape[-1])[:n]


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention for a flat batch ``q [N, Hq, D]`` with new ``k, v [N, Hkv, D]``.

    Writes the new K/V into ``cache`` and returns ``[N, Hq, D]``.
    """
    write_kv(cache, k, v, meta)
    nd = meta.num_decode
    if not meta.prefills:  # a pure decode step: one call, no output stitching
        return decode_attention(q, cache, meta, scale)
    out = torch.empty_like(q)
    hq, hkv = q.shape[1], k.shape[1]
    gqa = hq != hkv
    if nd:
        out[:nd] = decode_attention(q[:nd], cache, meta, scale)
    trees = meta.tree_batch()
    if trees is not None:
        # Every token tree of the step in one call, reading the pages in place.
        q_rows, tables, ctx, tl, offs, bits = trees
        out[q_rows] = ops.paged_tree_attention(q[q_rows], cache, tables, ctx, tl, offs, bits,
                                               scale, meta.sliding_window or 0)
    done = _whole_prompt_runs(q, k, v, out, meta, scale, gqa)
    for c in meta.prefills:
        if isinstance(c.mask, TreeMask) or c.start in done:
            continue
        qc = q[c.start:c.start + c.q_len].transpose(0, 1)[None]  # [1, Hq, q, D]
        if c.mask is not None:
            # Token tree: the mask already encodes ancestry (and any sliding window).
            kc = _gather(cache, c.block_table, c.ctx_len, 0).transpose(0, 1)[None]
            vc = _gather(cache, c.block_table, c.ctx_len, 1).transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask, scale=scale,
                                               enable_gqa=gqa)
        elif c.ctx_len == c.q_len and meta.sliding_window is None:
            # A whole prompt in one chunk: its K/V are the fresh ones, no gather needed.
            kc = k[c.start:c.start + c.q_len].transpose(0, 1)[None]
            vc = v[c.start:c.start + c.q_len].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale,
                                               enable_gqa=gqa)
        else:
            kc = _gather(cache, c.block_table, c.ctx_len, 0).transpose(0, 1)[None]
            vc = _gather(cache, c.block_table, c.ctx_len, 1).transpose(0, 1)[None]
            q_pos = torch.arange(c.ctx_len - c.q_len, c.ctx_len)
            k_pos = torch.arange(c.ctx_len)
            mask = k_pos[None, :] <= q_pos[:, None]
            if meta.sliding_window is not None:
                mask &= k_pos[None, :] > (q_pos[:, None] - meta.sliding_window)
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale,
                                               enable_gqa=gqa)
        out[c.start:c.start + c.q_len] = o[0].transpose(0, 1)
    return out


def _whole_prompt_runs(q, k, v, out, meta: AttentionMetadata, scale: float, gqa: bool) -> set:
    """Consecutive prompts computed whole in this step with the same length attend in one
    batched causal SDPA call over their fresh K/V (an offline batch of equal prompts is one
    call per layer instead of one per prompt). Returns the start rows it handled."""
    done: set = set()
    if meta.sliding_window is not None:
        return done
    run: list = []

    def flush():
        if len(run) >= 2:
            n, L, a = len(run), run[0].q_len, run[0].start
            shape = (n, L, q.shape[1], q.shape[2])
            qb = q[a:a + n * L].reshape(shape).transpose(1, 2)
            kb = k[a:a + n * L].reshape(n, L, k.shape[1], k.shape[2]).transpose(1, 2)
            vb = v[a:a + n * L].reshape(n, L, v.shape[1], v.shape[2]).transpose(1, 2)
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale,
                                               enable_gqa=gqa)
            out[a:a + n * L] = o.transpose(1, 2).reshape(n * L, q.shape[1], q.shape[2])
            done.update(c.start for c in run)
        run.clear()

    for c in meta.prefills:
        whole = c.mask is None and c.ctx_len == c.q_len
        if whole and run and c.q_len == run[-1].q_len and c.start == run[-1].start + c.q_len:
            run.append(c)
            continue
        flush()
        if whole:
            run.append(c)
    flush()
    return done


def decode_attention(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """One query token per sequence, ``q [B, Hq, D]`` -> ``[B, Hq, D]``.

    Reads the pages in place with the ``paged_decode_attention`` op: gathering them for SDPA
    copies the whole context every layer and step, which dominated long-context decode.
    """
    return ops.paged_decode_attention(q, cache, meta.decode_block_tables, meta.decode_ctx_lens,
                                      scale, meta.sliding_window or 0)


def decode_attention_sdpa(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                          scale: float) -> torch.Tensor:
    """The gather + SDPA path ``decode_attention`` replaced (kept for comparison)."""
    bt = meta.decode_block_tables
    B, nblk = bt.shape
    bs, hkv, d = cache.shape[2:]
    k = cache[bt, 0].reshape(B, nblk * bs, hkv, d).transpose(1, 2)
    v = cache[bt, 1].reshape(B, nblk * bs, hkv, d).transpose(1, 2)
    lens = meta.decode_ctx_lens
    k_pos = torch.arange(nblk * bs)
    mask = k_pos[None, :] < lens[:, None]
    if meta.sliding_window is not None:
        mask &= k_pos[None, :] > (lens[:, None] - 1 - meta.sliding_window)
    o = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :],
                                       scale=scale, enable_gqa=q.shape[1] != hkv)
    return o[:, :, 0, :]
