"""Speculation inside the continuous-batching engine.

Per step, the engine hands the decode rows of speculating requests to ``SpecRunner.prepare``,
which drafts a tree for each (batched over requests for the draft model), reserves KV slots
for the tree nodes and returns the rows to add to the target's batch: each tree is one
sequence whose new tokens are its nodes, at positions ``context + depth``, attending to the
paged context and to their ancestors (the mask from ``tree_build``). After the single target
forward, ``verify`` runs the tree-verify op on every tree, moves the accepted nodes' KV to
consecutive positions (``kv_compact``), drops the rest (``PagedKVCache.truncate``), rolls the
draft cache back to the accepted path, and returns the new tokens (accepted drafts + bonus).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import ops
from .config import SpecConfig
from .drafters import DraftTree, ModelDrafter, NgramDrafter


@dataclass
class SpecMetrics:
    """Counters of speculative steps; :meth:`summary` gives the derived figures."""

    verify_steps: int = 0  # (request, target forward) pairs that verified a tree
    emitted_tokens: int = 0  # tokens those steps produced, bonus included
    draft_nodes: int = 0  # draft nodes proposed (roots excluded)
    draft_s: float = 0.0
    verify_s: float = 0.0
    depth_tried: list = field(default_factory=list)  # [d-1]: trees reaching depth d
    depth_accepted: list = field(default_factory=list)  # [d-1]: steps accepting >= d drafts

    def record(self, tree_depth: int, accept_len: int, nodes: int) -> None:
        self.verify_steps += 1
        self.emitted_tokens += accept_len
        self.draft_nodes += nodes - 1
        while len(self.depth_tried) < tree_depth:
            self.depth_tried.append(0)
            self.depth_accepted.append(0)
        for d in range(tree_depth):
            self.depth_tried[d] += 1
            if accept_len - 1 > d:
                self.depth_accepted[d] += 1

    def summary(self) -> dict:
        """``acceptance_length`` (mean tokens per verified tree, bonus included),
        ``acceptance_rate_by_depth`` (share of trees reaching depth d that accepted a draft
        there), draft and verify seconds, and the raw counters."""
        n = self.verify_steps
        return {
            "verify_steps": n,
            "emitted_tokens": self.emitted_tokens,
            "draft_nodes": self.draft_nodes,
            "acceptance_length": self.emitted_tokens / n if n else 0.0,
            "acceptance_rate_by_depth": [a / t if t else 0.0 for a, t in
                                         zip(self.depth_accepted, self.depth_tried)],
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
        }


@dataclass
class TreePlan:
    """One request's tree in the current step."""

    seq: object  # the engine's ScheduledSeq
    cfg: SpecConfig
    tree: DraftTree
    ctx: int  # the root's position
    positions: list
    mask: object  # model.attention.TreeMask: context + ancestors
    max_depth: int


class SpecRunner:
    """Drafts, verifies and rolls back speculative trees for an :class:`Engine`.

    Parameters
    ----------
    engine : Engine
        Its model, KV cache and limits are used.
    config : SpecConfig
        The engine's default (requests override it through ``SamplingParams.speculative``).
    """

    def __init__(self, engine, config: SpecConfig):
        from ..model import CausalLM, resolve_model_path

        self.engine = engine
        self.default = config
        self.ngram = NgramDrafter()
        self.drafter: Optional[ModelDrafter] = None
        dm = config.draft_model
        if dm is not None:
            if not isinstance(dm, CausalLM):
                dm = CausalLM.from_pretrained(resolve_model_path(dm), dtype=engine.model.dtype)
            tv, dv = engine.model.config.vocab_size, dm.config.vocab_size
            if dv > tv:
                raise ValueError(f"draft model vocabulary ({dv}) is larger than the target's "
                                 f"({tv}): they must share the tokenizer")
            # Room for every sequence plus its largest tree.
            extra = engine.scheduler.config.max_num_seqs * (
                -(-config.tree.max_nodes // engine.block_size) + 1)
            self.drafter = ModelDrafter(dm, engine.kv.num_blocks + extra, engine.block_size)
        elif config.method == "draft":
            raise ValueError("SpecConfig(method='draft') needs a draft_model")
        self.state: dict = {}  # rid -> [seed, offset, generator]
        self.backoff: dict = {}  # rid -> [steps in a row without an accepted draft, steps to skip]
        self.metrics = SpecMetrics()

    # ---- per request ------------------------------------------------------------------------

    def validate(self, params) -> None:
        """Raise ``ValueError`` for a request override this engine cannot serve."""
        c = SpecConfig.coerce(getattr(params, "speculative", None))
        if c is not None and c.method == "draft" and self.drafter is None:
            raise ValueError("speculative method 'draft' needs an engine started with a "
                             "draft model")

    def config_for(self, req) -> Optional[SpecConfig]:
        c = SpecConfig.coerce(getattr(req.params, "speculative", None)) or self.default
        if c.method == "off" or req.params.has_penalties:
            # Penalties change the target distribution token by token; verify cannot see that.
            return None
        if c.method == "draft" and self.drafter is None:
            return None
        if c.backoff:
            b = self.backoff.get(req.request_id)
            if b is not None and b[1] > 0:  # backing off: a plain step, no drafting
                b[1] -= 1
                return None
        return c

    def _outcome(self, rid, c: SpecConfig, accepted: int) -> None:
        """Back-off bookkeeping: after ``k`` consecutive steps without an accepted draft the
        request decodes plainly (and does not draft) for ``min(backoff, 2**(k-1))`` steps."""
        if not c.backoff:
            return
        b = self.backoff.setdefault(rid, [0, 0])
        if accepted:
            b[0] = 0
        else:
            b[0] += 1
            b[1] = min(c.backoff, 2 ** min(b[0] - 1, 30))

    def release(self, rid) -> None:
        """Forget a finished request (its draft cache blocks return)."""
        self.state.pop(rid, None)
        self.backoff.pop(rid, None)
        if self.drafter is not None:
            self.drafter.release(rid)

    def _state(self, req):
        st = self.state.get(req.request_id)
        if st is None:
            p = req.params
            if p.seed is not None:
                seed = p.seed
            elif req.generator is not None:
                seed = int(torch.randint(0, 2 ** 62, (1,), generator=req.generator))
            else:
                seed = 0
            gen = torch.Generator()
            gen.manual_seed((seed * 0x9E3779B1 + 1) % (2 ** 63))
            st = self.state[req.request_id] = [seed, 0, gen]
        return st

    # ---- one step ---------------------------------------------------------------------------

    def prepare(self, entries: list) -> list:
        """Draft trees for ``entries`` (``(ScheduledSeq, SpecConfig)``, decode rows whose KV
        slot for the root is reserved). Returns a ``TreePlan`` or None (plain decode) each."""
        from ..kv import OutOfBlocksError

        t0 = time.perf_counter()
        eng = self.engine
        trees: list = [None] * len(entries)
        batch, where = [], []
        for k, (s, c) in enumerate(entries):
            req = s.req
            if c.method == "ngram":
                trees[k] = self.ngram.propose(req.all_token_ids, c.tree, c)
            else:
                st = self._state(req)
                p = req.params
                batch.append((req.request_id, req.all_token_ids, c.tree, c.stochastic,
                              p.temperature, st[2], c.min_prob))
                where.append(k)
        if batch:
            for k, t in zip(where, self.drafter.propose(batch, eng.model.config.vocab_size)):
                trees[k] = t
        plans = []
        for (s, c), tree in zip(entries, trees):
            ctx = s.start
            n = min(len(tree), eng.max_model_len - ctx)
            if 1 < n < len(tree):  # any prefix of the node order is still a tree
                tree = DraftTree(tree.tokens[:n], tree.parents[:n],
                                 None if tree.draft_probs is None else tree.draft_probs[:n],
                                 None if tree.draft_pos is None else tree.draft_pos[:n])
            if n > 1:
                try:
                    eng.kv.append(s.req.request_id, n - 1)
                except OutOfBlocksError:
                    n = 1
            if n <= 1:
                if c.method == "draft":
                    self.drafter.rollback(s.req.request_id, ctx, [0], tree.draft_pos)
                if len(tree) <= 1:  # nothing drafted (no match, or pruned by min_prob)
                    self._outcome(s.req.request_id, c, 0)
                plans.append(None)
                continue
            plans.append(self._plan(s, c, tree, ctx))
        self.metrics.draft_s += time.perf_counter() - t0
        return plans

    def _plan(self, s, c: SpecConfig, tree: DraftTree, ctx: int) -> TreePlan:
        from ..model.attention import TreeMask

        parents = torch.tensor([tree.parents], dtype=torch.int32)
        tb = ops.tree_build(parents)
        depth = tb.depth[0].tolist()
        # Node i's K/V sits at cache position ctx + i; paged_tree_attention reads the context
        # in place and the ancestors from tree_build's bit mask (the sliding window too).
        return TreePlan(s, c, tree, ctx, [ctx + d for d in depth], TreeMask(ctx, tb.mask[0]),
                        max(depth))

    def verify(self, plans: list, logits: list) -> list:
        """Verify each plan against its target logits ``[N, V]``; compact the KV; returns the
        new tokens of each request (accepted drafts, then the bonus)."""
        t0 = time.perf_counter()
        out: list = [None] * len(plans)
        groups = {}
        for k, p in enumerate(plans):
            groups.setdefault(p.tree.draft_probs is not None, []).append(k)
        for stochastic, idx in groups.items():
            self._verify_group([plans[k] for k in idx], [logits[k] for k in idx], stochastic,
                               out, idx)
        self.metrics.verify_s += time.perf_counter() - t0
        return out

    def _verify_group(self, plans, logits, stochastic, out, idx):
        B = len(plans)
        N = max(len(p.tree) for p in plans)
        V = logits[0].shape[-1]
        lg = torch.zeros(B, N, V)
        toks = torch.zeros(B, N, dtype=torch.int64)
        par = torch.zeros(B, N, dtype=torch.int64)
        nn = torch.tensor([len(p.tree) for p in plans], dtype=torch.int32)
        for b, p in enumerate(plans):
            n = len(p.tree)
            lg[b, :n] = logits[b]
            toks[b, :n] = torch.tensor(p.tree.tokens)
            par[b, :n] = torch.tensor(p.tree.parents)
        temps = [p.seq.req.params.temperature for p in plans]
        if all(t == 0 for t in temps):
            res = ops.tree_verify_greedy(lg, toks, par, nn)
        else:
            dp = None
            if stochastic:
                dp = torch.zeros(B, N, V)
                for b, p in enumerate(plans):
                    dp[b, :len(p.tree)] = p.tree.draft_probs
            states = [self._state(p.seq.req) for p in plans]
            res = ops.tree_verify_sample(
                lg, toks, par, nn,
                temperature=torch.tensor(temps, dtype=torch.float32),
                top_k=torch.tensor([max(0, p.seq.req.params.top_k) for p in plans]),
                top_p=torch.tensor([p.seq.req.params.top_p for p in plans],
                                   dtype=torch.float32),
                seed=torch.tensor([st[0] for st in states]),
                offset=torch.tensor([st[1] for st in states]), draft_probs=dp)
            for st in states:
                st[1] += 1
        acc, alen, bonus = res.accepted.tolist(), res.accept_len.tolist(), res.bonus.tolist()
        kv = self.engine.kv
        for b, p in enumerate(plans):
            L = alen[b]
            path = acc[b][:L]
            rid = p.seq.req.request_id
            src = [p.ctx + a for a in path]
            if path == list(range(L)):
                kv.truncate(rid, p.ctx + L)
            else:
                kv.compact(rid, src, p.ctx, truncate=True)
            if p.cfg.method == "draft":
                self.drafter.rollback(rid, p.ctx, path, p.tree.draft_pos)
            self.metrics.record(p.max_depth, L, len(p.tree))
            self._outcome(rid, p.cfg, L - 1)
            out[idx[b]] = [p.tree.tokens[a] for a in path[1:]] + [bonus[b]]
