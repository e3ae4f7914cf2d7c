"""Drafters: propose a token tree after a sequence's last token.

``NgramDrafter`` looks the sequence's suffix up in its own history (prompt lookup, no model).
``ModelDrafter`` runs a small draft model with its own paged KV cache, batched over requests,
one forward per tree depth, and keeps its cache in step with the accepted tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .config import SpecConfig, TreeShape


@dataclass
class DraftTree:
    """A proposal for one request.

    ``tokens[0]`` is the root (the sequence's last token, not yet in the target's cache);
    ``parents[i] < i``; children of a node are in preference order. ``draft_probs[i]`` is the
    distribution node ``i``'s children were drawn from (stochastic drafts only). ``draft_pos[i]``
    is where the draft model cached node ``i`` (offset past the root's position), -1 if not.
    """

    tokens: list
    parents: list
    draft_probs: Optional[torch.Tensor] = None
    draft_pos: Optional[list] = None

    def __len__(self) -> int:
        return len(self.tokens)


def pack_bits(rows: list, width: int) -> torch.Tensor:
    """Rows of key indices as ``[len(rows), ceil(width / 32)]`` int32 bit words (the
    ``tree_build`` mask format)."""
    W = max(1, -(-width // 32))
    out = torch.zeros(len(rows), W, dtype=torch.int64)
    for r, idx in enumerate(rows):
        for j in idx:
            out[r, j >> 5] |= 1 << (j & 31)
    return (out - ((out >> 31) << 32)).to(torch.int32)  # two's complement words


def chain_bits(n: int) -> torch.Tensor:
    """The mask of an ``n``-token chain (a causal chunk): row ``i`` sees keys ``0..i``."""
    return pack_bits([range(i + 1) for i in range(n)], n)


def _depths(parents: list) -> list:
    d = [0] * len(parents)
    for i in range(1, len(parents)):
        d[i] = d[parents[i]] + 1
    return d


class NgramDrafter:
    """Prompt lookup: continuations of earlier occurrences of the sequence's suffix.

    The longest suffix (``ngram_max`` down to ``ngram_min`` tokens) that occurred before is
    matched; the tokens that followed each occurrence (most recent first) are merged into a
    trie bounded by the static branching per depth.

    Parameters
    ----------
    window : int
        Only the last ``window`` tokens are searched, bounding the per-step cost.
    """

    def __init__(self, window: int = 4096):
        self.window = window

    def propose(self, tokens: list, shape: TreeShape, cfg: SpecConfig) -> DraftTree:
        branching = shape.static_branching()
        D = len(branching)
        hist = tokens[-self.window:]
        L = len(hist)
        conts: list = []
        want = branching[0]
        for n in range(min(cfg.ngram_max, L - 1), cfg.ngram_min - 1, -1):
            suffix = hist[L - n:]
            first = suffix[0]
            for p in range(L - n - 1, -1, -1):
                if hist[p] == first and hist[p:p + n] == suffix:
                    c = hist[p + n:p + n + D]
                    if c and c not in conts:
                        conts.append(c)
                        if len(conts) >= 4 * want:
                            break
            if len({c[0] for c in conts}) >= want:
                break
        toks, parents, children = [tokens[-1]], [-1], [dict()]
        depth = [0]
        for c in conts:
            node = 0
            for t in c:
                d = depth[node]
                nxt = children[node].get(t)
                if nxt is None:
                    if len(children[node]) >= branching[d]:
                        break
                    nxt = len(toks)
                    toks.append(t)
                    parents.append(node)
                    children.append(dict())
                    depth.append(d + 1)
                    children[node][t] = nxt
                node = nxt
        return DraftTree(toks, parents)


@dataclass
class _Grow:
    """A request's tree while it is being drafted."""

    rid: object
    ctx: int  # the root's position
    shape: TreeShape
    stochastic: bool
    temperature: float
    generator: Optional[torch.Generator]
    tokens: list
    parents: list
    depth: list
    score: list  # path log-probability (dynamic trees)
    draft_pos: list
    probs: dict  # node -> draft distribution its children come from (stochastic)
    frontier: list  # nodes whose logits the last forward produced
    stored: int = 1  # tree nodes in the draft cache (the root is the first)
    alive: bool = True
    min_prob: float = 0.0  # children less probable than this under the draft are not proposed


class ModelDrafter:
    """A dense (or any) draft model with its own paged KV cache.

    Parameters
    ----------
    model : CausalLM
        Shares the target's tokenizer; its vocabulary may be smaller than the target's.
    num_blocks, block_size : int
        Its cache; a request that does not fit simply gets no draft this step.
    """

    def __init__(self, model, num_blocks: int, block_size: int):
        from ..kv import PagedKVCache

        cfg = model.config
        self.model = model
        self.kv = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size,
                               cfg.num_key_value_heads, cfg.head_dim, dtype=model.dtype)
        self.computed: dict = {}  # rid -> tokens whose draft KV is valid (a prefix)
        self.window = cfg.sliding_window

    # ---- cache bookkeeping ------------------------------------------------------------------

    def release(self, rid) -> None:
        self.computed.pop(rid, None)
        if self.kv.has(rid):
            self.kv.free(rid)

    def rollback(self, rid, ctx: int, path: list, draft_pos: Optional[list]) -> None:
        """Keep the draft KV of the accepted path's leading nodes the draft had computed.

        ``path`` are the accepted node indices (root first); the root sits at ``ctx``.
        """
        if not self.kv.has(rid) or draft_pos is None:
            return
        src = []
        for node in path:
            if draft_pos[node] < 0:
                break
            src.append(ctx + draft_pos[node])
        if src == list(range(ctx, ctx + len(src))):
            self.kv.truncate(rid, ctx + len(src))
        else:
            self.kv.compact(rid, src, ctx, truncate=True)
        self.computed[rid] = ctx + len(src)

    # ---- drafting ---------------------------------------------------------------------------

    def _forward(self, chunks: list) -> torch.Tensor:
        """``chunks``: (rid, ids, positions, first cache position, mask or None, rows wanted
        within the chunk). KV goes to consecutive cache positions from the first one. Returns
        the wanted rows' logits in chunk order."""
        from ..model import AttentionMetadata

        # Single causal tokens go first so that they run as one batched decode attention.
        order = sorted(range(len(chunks)),
                       key=lambda i: not (len(chunks[i][1]) == 1 and chunks[i][4] is None))
        bs = self.kv.block_size
        ids, pos, slots, seqs, rows, spans = [], [], [], [], [], [None] * len(chunks)
        row = 0
        for i in order:
            rid, cids, cpos, start, mask, want = chunks[i]
            blocks = self.kv.block_ids(rid)
            ids.extend(cids)
            pos.extend(cpos)
            for p in range(start, start + len(cids)):
                slots.append(blocks[p // bs] * bs + p % bs)
            seqs.append((len(cids), start + len(cids), blocks, mask))
            spans[i] = (len(rows), len(want))
            rows.extend(row + r for r in want)
            row += len(cids)
        meta = AttentionMetadata.build(seqs, bs, torch.tensor(slots, dtype=torch.long),
                                       self.window)
        logits = self.model.forward(torch.tensor(ids, dtype=torch.long),
                                    torch.tensor(pos, dtype=torch.long), meta, self.kv.caches,
                                    torch.tensor(rows, dtype=torch.long))
        if order == sorted(order):
            return logits
        return torch.cat([logits[a:a + n] for a, n in spans])

    def _make_room(self, rid, total: int) -> bool:
        from ..kv import OutOfBlocksError

        try:
            if self.kv.has(rid):
                self.kv.append(rid, total - self.kv.num_tokens(rid))
            else:
                self.kv.allocate(rid, total)
            return True
        except OutOfBlocksError:
            return False

    def propose(self, reqs: list, vocab: int) -> list:
        """Draft a tree for each of ``reqs``: tuples ``(rid, tokens, shape, stochastic,
        temperature, generator)``; ``vocab`` is the target's vocabulary (the width of
        ``draft_probs``). Returns a ``DraftTree`` per request (just the root where the draft
        cache is full)."""
        from ..model.attention import TreeMask

        grows, chunks = [], []
        for rid, tokens, shape, stochastic, temp, gen, *rest in reqs:
            ctx = len(tokens) - 1
            done = min(self.computed.get(rid, 0), ctx)
            if self.kv.has(rid) and self.kv.num_tokens(rid) > done:
                self.kv.truncate(rid, done)
            g = _Grow(rid, ctx, shape, stochastic and not shape.dynamic and temp > 0, temp, gen,
                      [tokens[-1]], [-1], [0], [0.0], [0], {}, [0],
                      min_prob=float(rest[0]) if rest else 0.0)
            grows.append(g)
            if not self._make_room(rid, ctx + 1):
                self.release(rid)
                g.alive, g.draft_pos = False, None
                continue
            # Catch up on the tokens the draft has not seen (prompt, accepted drafts, bonus):
            # after the prompt, a short chain read in place by paged_tree_attention.
            n = ctx + 1 - done
            mask = TreeMask(done, chain_bits(n)) if done and n > 1 else None
            chunks.append((rid, tokens[done:], list(range(done, ctx + 1)), done, mask,
                           [ctx - done]))
            self.computed[rid] = ctx + 1
        max_depth = max((g.shape.max_depth for g in grows), default=0)
        live = [g for g in grows if g.alive]
        for d in range(1, max_depth + 1):
            if not chunks:
                break
            logits = self._forward(chunks)
            chunks, row, forwarded = [], 0, []
            for g in live:
                n = len(g.frontier)
                lg = logits[row:row + n]
                row += n
                new = self._expand(g, lg, d)
                if d >= g.shape.max_depth or not new:
                    continue
                nxt = self._next_frontier(g, new)
                if not nxt:
                    continue
                if not self._make_room(g.rid, g.ctx + g.stored + len(nxt)):
                    continue
                start = g.ctx + g.stored
                for j, u in enumerate(nxt):
                    g.draft_pos[u] = g.stored + j
                g.stored += len(nxt)
                g.frontier = nxt
                mask = self._mask(g, nxt)
                chunks.append((g.rid, [g.tokens[u] for u in nxt],
                               [g.ctx + g.depth[u] for u in nxt], start, mask,
                               list(range(len(nxt)))))
                forwarded.append(g)
            live = forwarded
        return [self._finish(g, vocab) for g in grows]

    def _expand(self, g: _Grow, logits: torch.Tensor, d: int) -> list:
        """Add children to the frontier nodes from their draft logits; returns the new nodes."""
        new = []
        if g.stochastic:
            q = torch.softmax(logits / g.temperature, -1)
            b = g.shape.branching[d - 1]
            draws = torch.multinomial(q, b, replacement=True, generator=g.generator).tolist()
            for k, u in enumerate(g.frontier):
                g.probs[u] = q[k]
                for t in draws[k]:
                    new.append(self._add(g, u, t, 0.0))
            return new
        logp = torch.log_softmax(logits, -1)
        b = g.shape.topk if g.shape.dynamic else g.shape.branching[d - 1]
        top = torch.topk(logp, min(b, logp.shape[-1]), -1)
        vals, idx = top.values.tolist(), top.indices.tolist()
        floor = math.log(g.min_prob) if g.min_prob > 0 else -math.inf
        for k, u in enumerate(g.frontier):
            for v, t in zip(vals[k], idx[k]):
                if v < floor:  # sorted: the rest are less probable still
                    break
                new.append(self._add(g, u, t, g.score[u] + v))
        return new

    @staticmethod
    def _add(g: _Grow, parent: int, tok: int, score: float) -> int:
        g.tokens.append(int(tok))
        g.parents.append(parent)
        g.depth.append(g.depth[parent] + 1)
        g.score.append(score)
        g.draft_pos.append(-1)
        return len(g.tokens) - 1

    @staticmethod
    def _next_frontier(g: _Grow, new: list) -> list:
        if not g.shape.dynamic:
            return new
        # EAGLE-2: expand only the most probable leaves (by path probability).
        best = sorted(new, key=lambda u: (-g.score[u], u))[:g.shape.topk]
        return sorted(best)

    @staticmethod
    def _mask(g: _Grow, nodes: list):
        """The nodes' view for ``paged_tree_attention``: the context, then the tree keys (at
        ``ctx + draft_pos``) of their ancestors and themselves; None for a chain's single node,
        which sees everything cached (plain decode)."""
        from ..model.attention import TreeMask

        rows = []
        for u in nodes:
            row, a = [], u
            while a >= 0:
                row.append(g.draft_pos[a])
                a = g.parents[a]
            rows.append(row)
        if len(nodes) == 1 and len(rows[0]) == g.stored:
            return None
        return TreeMask(g.ctx, pack_bits(rows, g.stored))

    def _finish(self, g: _Grow, vocab: int) -> DraftTree:
        if not g.alive:
            return DraftTree(g.tokens[:1], [-1])
        if g.shape.dynamic and len(g.tokens) - 1 > g.shape.num_nodes:
            # Keep the most probable nodes; a node's path probability never exceeds its
            # parent's, so ancestors rank first (index breaks ties) and the set is a tree.
            order = sorted(range(1, len(g.tokens)), key=lambda u: (-g.score[u], u))
            keep = {0}
            for u in order:
                if len(keep) > g.shape.num_nodes:
                    break
                if g.parents[u] in keep:
                    keep.add(u)
            old = sorted(keep)
            new_of = {u: i for i, u in enumerate(old)}
            return DraftTree([g.tokens[u] for u in old],
                             [-1] + [new_of[g.parents[u]] for u in old[1:]],
                             None, [g.draft_pos[u] for u in old])
        probs = None
        if g.stochastic:
            probs = torch.zeros(len(g.tokens), vocab)
            for u, q in g.probs.items():
                probs[u, :q.shape[0]] = q
        return DraftTree(g.tokens, g.parents, probs, g.draft_pos)
