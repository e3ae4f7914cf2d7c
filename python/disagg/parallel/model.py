"""One rank's share of a model: its pipeline stage's layers, its TP shard of every weight, its
experts, and a ``forward`` with the interface of :class:`disagg.model.CausalLM` (so the
single-process engine and scheduler drive it unchanged) that talks to the other ranks."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import ops
from ..model.attention import AttentionMetadata, _gather, paged_attention, write_kv
from ..model.config import ModelConfig
from ..model.loader import WeightStore
from ..model.model import (_DTYPES, CausalLM, DecoderLayer, DenseMLP, MoE, _act,
                           moe_weight_names, rms_norm)
from ..moe.dispatcher import EPDispatcher, expert_range
from .comm import Comm, CountingTransport
from .layout import ParallelLayout, RankGroups, head_range, kv_head_range, vocab_range


def split_counts(n: int, parts: int) -> list:
    """Balanced contiguous split of ``n`` rows over ``parts`` ranks (earlier ranks +1)."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _sl(r: range, scale: int = 1) -> slice:
    return slice(r.start * scale, r.stop * scale)


class EPMoE:
    """Routed experts spread over an expert-parallel group, moved by ``EPDispatcher``.

    ``split_group`` (the TP group when EP spans the TP ranks): its ranks hold the same tokens,
    so each dispatches only its share and the shares are all-gathered afterwards; otherwise
    all tokens are dispatched. ``partial`` marks outputs that still need the TP all-reduce
    (experts split over TP).
    """

    def __init__(self, gate, w13, w2, experts: range, top_k, renormalize, act, dispatcher,
                 comm: Comm, split_group=None, shared=None, shared_gate=None,
                 partial: bool = False, shared_split: bool = False):
        self.gate, self.w13, self.w2 = gate, w13, w2  # [Le, H, 2I], [Le, I, H]
        self.experts = experts
        self.inter = w2.shape[1]
        self.top_k, self.renormalize, self.act = top_k, renormalize, act
        self.disp, self.comm = dispatcher, comm
        self.split_group = split_group
        self.split_n = dist.get_world_size(split_group) if split_group is not None else 1
        self.split_rank = dist.get_rank(split_group) if split_group is not None else 0
        self.shared, self.shared_gate = shared, shared_gate
        self.partial = partial
        # With a split group, a shared expert sharded over it (its intermediate dimension)
        # runs on every token; its partial sums and this rank's routed rows then meet in one
        # all-reduce instead of an all-gather of the routed rows.
        self.shared_split = shared_split and shared is not None and self.split_n > 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        counts = None
        x_all = x
        if self.split_n > 1:
            counts = split_counts(x.shape[0], self.split_n)
            a = sum(counts[:self.split_rank])
            x = x[a:a + counts[self.split_rank]]
        T, k = x.shape[0], self.top_k
        if T:
            r = ops.route(F.linear(x, self.gate), k, renormalize=self.renormalize)
            ids, w = r.ids, r.weights
        else:  # nothing to send, but the all-to-alls still need this rank
            ids = torch.zeros(0, k, dtype=torch.int32)
            w = torch.zeros(0, k, dtype=torch.float32)
        recv, per_expert, handle = self.disp.dispatch(x, ids, w)
        y = torch.empty_like(recv)
        I = self.inter
        off = 0
        for e, n in enumerate(per_expert.tolist()):
            if n:
                h = torch.mm(recv[off:off + n], self.w13[e])
                torch.mm(self.act(h[:, :I]) * h[:, I:], self.w2[e], out=y[off:off + n])
            off += n
        out = self.disp.combine(y, handle, out_dtype=x.dtype)
        if self.shared_split:
            full = torch.sigmoid(F.linear(x_all, self.shared_gate)) * self.shared(x_all)
            full[a:a + T] += out
            # the MLP all-reduce of a TP layer (tag tp.mlp): [tokens, hidden], as a dense MLP
            return self.comm.all_reduce(full, self.split_group, "tp.mlp")
        if self.shared is not None and T:
            out = out + torch.sigmoid(F.linear(x, self.shared_gate)) * self.shared(x)
        if counts is not None:
            out = self.comm.all_gather_rows(out, counts, self.split_group, "ep.tp_gather")
        return out


class ParallelLayer:
    """A decoder layer with TP-sharded attention heads and MLP, optionally CP-split rows."""

    def __init__(self, cfg: ModelConfig, w: dict, mlp, mlp_partial: bool, nh: int, nkv: int,
                 comm: Comm, tp_group, cp_group, index: int):
        self.cfg, self.w, self.mlp, self.mlp_partial = cfg, w, mlp, mlp_partial
        self.nh, self.nkv, self.hd = nh, nkv, cfg.head_dim
        self.q_size, self.kv_size = nh * self.hd, nkv * self.hd
        self.scale = self.hd ** -0.5
        self.comm, self.tp_group, self.cp_group = comm, tp_group, cp_group
        self.index = index

    def __call__(self, h, cos, sin, meta, cache, rows) -> torch.Tensor:
        w, eps = self.w, self.cfg.rms_norm_eps
        # the same projection as one process, over this rank's heads
        q, k, v = DecoderLayer.project_qkv(self, h, cos, sin)
        N = q.shape[0]
        if rows is None:
            # An empty micro-batch has no sequences to attend for.
            a = paged_attention(q, k, v, cache, meta, self.scale) if N else q
        else:
            # Context parallel: every rank needs every key and value (its queries attend to
            # all earlier positions, and the full cache is what it hands on), so K/V are
            # all-gathered once per layer; queries, projections and MLPs stay split.
            r0, r1, counts = rows
            kv = self.comm.all_gather_rows(torch.cat((k, v), 1).contiguous(), counts,
                                           self.cp_group, "cp.kv")
            write_kv(cache, kv[:, :self.nkv], kv[:, self.nkv:], meta)
            a = attention_rows(q, cache, meta, r0, r1, self.scale)
        if self.tp_group is None:
            o = F.linear(a.reshape(N, self.q_size), w["o"], w.get("o_bias"))
        else:
            o = self.comm.all_reduce(F.linear(a.reshape(N, self.q_size), w["o"]),
                                     self.tp_group, "tp.attn")
            if "o_bias" in w:
                o = o + w["o_bias"]
        h = h + o
        x = rms_norm(h, w["post_norm"], eps)
        if N or isinstance(self.mlp, EPMoE):
            m = self.mlp(x)
        else:
            m = torch.zeros_like(x)
        if self.mlp_partial:
            m = self.comm.all_reduce(m, self.tp_group, "tp.mlp")
        return h + m


def attention_rows(q, cache, meta, r0: int, r1: int, scale: float) -> torch.Tensor:
    """Attention for rows ``r0:r1`` of the flat batch (``q`` holds just those rows), reading
    keys and values from the cache, which already holds the whole step's K/V."""
    out = torch.empty_like(q)
    gqa = q.shape[1] != cache.shape[3]
    sw = meta.sliding_window
    nd = meta.num_decode
    a, b = r0, min(r1, nd)
    if b > a:
        out[:b - a] = ops.paged_decode_attention(q[:b - a], cache, meta.decode_block_tables[a:b],
                                                 meta.decode_ctx_lens[a:b], scale, sw or 0)
    for c in meta.prefills:
        s, e = max(c.start, r0), min(c.start + c.q_len, r1)
        if e <= s:
            continue
        first = c.ctx_len - c.q_len + (s - c.start)
        q_pos = torch.arange(first, first + (e - s))
        kmax = first + (e - s)
        kc = _gather(cache, c.block_table, kmax, 0).transpose(0, 1)[None]
        vc = _gather(cache, c.block_table, kmax, 1).transpose(0, 1)[None]
        k_pos = torch.arange(kmax)
        mask = k_pos[None, :] <= q_pos[:, None]
        if sw is not None:
            mask &= k_pos[None, :] > (q_pos[:, None] - sw)
        qc = q[s - r0:e - r0].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale,
                                           enable_gqa=gqa)
        out[s - r0:e - r0] = o[0].transpose(0, 1)
    return out


class ParallelCausalLM(CausalLM):
    """This rank's part of a model under a :class:`ParallelLayout`.

    ``config`` is the local view the engine sizes its KV cache from (this stage's layers,
    this TP rank's KV heads); ``global_config`` is the checkpoint's. ``forward`` returns the
    full ``[M, vocab]`` logits on every rank (gathered over TP, broadcast from the last
    pipeline stage), so every rank of a replica samples the same tokens and their schedulers
    never diverge.
    """

    def __init__(self, cfg: ModelConfig, layout: ParallelLayout, groups: RankGroups, comm: Comm,
                 ws: WeightStore, dtype: torch.dtype):
        self.global_config = cfg
        self.layout, self.groups, self.comm, self.dtype = layout, groups, comm, dtype
        c = groups.coords
        self.tp, self.tp_rank = layout.tp, c["tp"]
        self.tp_group = groups.group("tp")
        self.cp, self.cp_rank, self.cp_group = layout.cp, c["cp"], groups.group("cp")
        self.stage = c["pp"]
        self.first, self.last = self.stage == 0, self.stage == layout.pp - 1
        pp_ranks = groups.ranks("pp")
        self.pp_group = groups.group("pp")
        self.prev_rank = pp_ranks[self.stage - 1] if not self.first else None
        self.next_rank = pp_ranks[self.stage + 1] if not self.last else None
        self.last_rank = pp_ranks[-1]
        self.forward_calls = 0
        # Micro-batches per step under PP: one per stage keeps every stage busy once the
        # pipeline has filled.
        self.micro_batches = layout.pp
        self.fatal: Optional[BaseException] = None
        self.layer_ids = layout.stage_layers(cfg.num_hidden_layers, self.stage)
        ep_ranks = groups.ranks("ep")
        # Replicas step in lock-step only when they share an EP group's all-to-alls.
        self.needs_lockstep = layout.ep > 1 and len({layout.coords(r)["dp"] for r in ep_ranks}) > 1
        self._load(cfg, ws)
        self.nh = len(head_range(cfg.num_attention_heads, self.tp, self.tp_rank))
        self.nkv = len(kv_head_range(cfg.num_key_value_heads, self.tp, self.tp_rank))
        self.config = dataclasses.replace(cfg, num_hidden_layers=len(self.layer_ids),
                                          num_key_value_heads=self.nkv)
        from ..model.rope import RotaryEmbedding

        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings,
                                    cfg.rope_scaling)

    @classmethod
    def from_pretrained(cls, path: str, layout: ParallelLayout, groups: RankGroups, comm: Comm,
                        dtype="auto") -> "ParallelCausalLM":
        cfg = ModelConfig.from_file(path)
        if dtype == "auto":
            dtype = _DTYPES.get(cfg.torch_dtype, torch.float32)
            if dtype == torch.float16:
                dtype = torch.bfloat16
        elif isinstance(dtype, str):
            dtype = _DTYPES[dtype]
        return cls(cfg, layout, groups, comm, WeightStore(path, dtype), dtype)

    # ---- loading only this rank's slices ------------------------------------------------------

    def _load(self, cfg: ModelConfig, ws: WeightStore) -> None:
        tp, r = self.tp, self.tp_rank
        self.vocab = vocab_range(cfg.vocab_size, tp, r)
        self.vocab_per = -(-cfg.vocab_size // tp)
        rows = lambda n, rg: ws.get_part(n, (_sl(rg),)) if tp > 1 else ws.require(n)  # noqa: E731
        self.embed = rows("model.embed_tokens.weight", self.vocab) if self.first else None
        self.norm = self.lm_head = None
        if self.last:
            self.norm = ws.require("model.norm.weight")
            name = "lm_head.weight"
            if cfg.tie_word_embeddings or not ws.has(name):
                name = "model.embed_tokens.weight"
            self.lm_head = rows(name, self.vocab)
        act = _act(cfg.hidden_act)
        hd = cfg.head_dim
        qh = head_range(cfg.num_attention_heads, tp, r)
        kh = kv_head_range(cfg.num_key_value_heads, tp, r)
        self.layers = []
        for i in self.layer_ids:
            p = f"model.layers.{i}."
            a = p + "self_attn."
            part = lambda n, rg: ws.get_part(n, (_sl(rg, hd),))  # noqa: E731
            w = {
                "input_norm": ws.require(p + "input_layernorm.weight"),
                "post_norm": ws.require(p + "post_attention_layernorm.weight"),
                "qkv": torch.cat([part(a + "q_proj.weight", qh), part(a + "k_proj.weight", kh),
                                  part(a + "v_proj.weight", kh)]),
                "o": ws.get_part(a + "o_proj.weight", (slice(None), _sl(qh, hd))),
            }
            if cfg.attention_bias or ws.has(a + "q_proj.bias"):
                w["qkv_bias"] = torch.cat([part(a + "q_proj.bias", qh), part(a + "k_proj.bias", kh),
                                           part(a + "v_proj.bias", kh)])
            if ws.has(a + "o_proj.bias"):
                w["o_bias"] = ws.get(a + "o_proj.bias")
            if cfg.qk_norm:
                w["q_norm"] = ws.require(a + "q_norm.weight")
                w["k_norm"] = ws.require(a + "k_norm.weight")
            mlp, partial = self._mlp(cfg, ws, i, act)
            self.layers.append(ParallelLayer(cfg, w, mlp, partial, len(qh), len(kh), self.comm,
                                             self.tp_group, self.cp_group if self.cp > 1 else None,
                                             i))

    def _dense(self, ws, prefix: str, names, inter: int, act, split: bool) -> DenseMLP:
        g, u, d = (prefix + n + ".weight" for n in names)
        if not split or self.tp == 1:
            return DenseMLP(torch.cat([ws.require(g), ws.require(u)]), ws.require(d), act)
        if inter % self.tp:
            raise ValueError(f"intermediate size {inter} does not split over tp={self.tp}")
        ir = range(self.tp_rank * inter // self.tp, (self.tp_rank + 1) * inter // self.tp)
        return DenseMLP(torch.cat([ws.get_part(g, (_sl(ir),)), ws.get_part(u, (_sl(ir),))]),
                        ws.get_part(d, (slice(None), _sl(ir))), act)

    def _mlp(self, cfg: ModelConfig, ws: WeightStore, i: int, act):
        """Returns ``(mlp, partial)``; ``partial``: the output still needs the TP all-reduce."""
        p = f"model.layers.{i}."
        tp, lay = self.tp, self.layout
        if not cfg.is_moe_layer(i):
            return (self._dense(ws, p + "mlp.", ("gate_proj", "up_proj", "down_proj"),
                                cfg.intermediate_size, act, True), tp > 1)
        E = cfg.num_experts
        m, names = moe_weight_names(cfg, ws, i)
        inter = cfg.moe_intermediate_size or cfg.intermediate_size
        ep_over_tp = lay.ep > 1 and lay.ep_over_tp
        split_experts = tp > 1 and not ep_over_tp  # TP inside every expert
        if lay.ep > 1:
            ep_group, ep_ranks = self.groups.group("ep"), self.groups.ranks("ep")
            experts = expert_range(ep_ranks.index(self.groups.rank), lay.ep, E)
        else:
            experts = range(E)
        if split_experts:
            if inter % tp:
                raise ValueError(f"expert intermediate size {inter} does not split over tp={tp}")
            ir = range(self.tp_rank * inter // tp, (self.tp_rank + 1) * inter // tp)
        else:
            ir = range(inter)
        es = slice(experts.start, experts.stop)
        if ws.has(m + "experts.gate_up_proj"):  # fused [E, 2I, H] / [E, H, I]
            gu = m + "experts.gate_up_proj"
            gate_up = torch.cat([ws.get_part(gu, (es, _sl(ir))),
                                 ws.get_part(gu, (es, slice(inter + ir.start, inter + ir.stop)))], 1)
            down = ws.get_part(m + "experts.down_proj", (es, slice(None), _sl(ir)))
        else:
            g, u, d = names
            gate_up = torch.stack([torch.cat([
                ws.get_part(m + f"experts.{e}.{g}.weight", (_sl(ir),)),
                ws.get_part(m + f"experts.{e}.{u}.weight", (_sl(ir),))]) for e in experts])
            down = torch.stack([ws.get_part(m + f"experts.{e}.{d}.weight", (slice(None), _sl(ir)))
                                for e in experts])
        gate = ws.require(m + "gate.weight")
        shared = shared_gate = None
        if cfg.shared_expert_intermediate_size:
            # TP-sharded like a dense MLP in every layout (each rank loads its slice of the
            # intermediate dimension); the gate [1, hidden] is replicated.
            shared = self._dense(ws, m + "shared_expert.", ("gate_proj", "up_proj", "down_proj"),
                                 cfg.shared_expert_intermediate_size, act, True)
            shared_gate = ws.require(m + "shared_expert_gate.weight")
        if lay.ep == 1:
            return (MoE(gate, gate_up, down, cfg.num_experts_per_tok, cfg.norm_topk_prob, act,
                        shared, shared_gate), tp > 1)
        disp = EPDispatcher(E, transport=CountingTransport(self.comm, ep_group, "ep"))
        return (EPMoE(gate, gate_up.transpose(1, 2).contiguous(),
                      down.transpose(1, 2).contiguous(), experts, cfg.num_experts_per_tok,
                      cfg.norm_topk_prob, act, disp, self.comm,
                      split_group=self.tp_group if ep_over_tp and tp > 1 else None,
                      shared=shared, shared_gate=shared_gate, partial=split_experts,
                      shared_split=ep_over_tp and tp > 1), split_experts)

    def weight_bytes(self) -> int:
        """Bytes of checkpoint weights this rank holds (its shard, not the model)."""
        seen, total = set(), 0

        def add(t):
            nonlocal total
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()

        for t in (self.embed, self.lm_head, self.norm):
            add(t)
        for layer in self.layers:
            for t in layer.w.values():
                add(t)
            mlp = layer.mlp
            for name in ("gate_up", "down", "gate", "w13", "w2", "shared_gate"):
                add(getattr(mlp, name, None))
            sh = getattr(mlp, "shared", None)
            if sh is not None:
                add(sh.gate_up)
                add(sh.down)
        return total

    # ---- running --------------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return self.embed[ids]
        # Vocab-parallel lookup: rows this rank does not own contribute zeros to the sum.
        lo, hi = self.vocab.start, self.vocab.stop
        mine = (ids >= lo) & (ids < hi)
        local = (ids - lo).clamp(0, max(0, hi - lo - 1))
        e = self.embed[local] * mine[:, None].to(self.dtype)
        return self.comm.all_reduce(e, self.tp_group, "tp.embed")

    @torch.inference_mode()
    def forward(self, input_ids, positions, meta, kv_caches, logits_rows=None) -> torch.Tensor:
        try:
            return self._forward(input_ids, positions, meta, kv_caches, logits_rows)
        except BaseException as e:
            # The engine turns a failed forward into failed requests and carries on; across
            # ranks that would desynchronise the schedulers, so the driver re-raises this.
            self.fatal = e
            raise

    def _forward(self, input_ids, positions, meta, kv_caches, logits_rows):
        self.forward_calls += 1
        cfg = self.global_config
        H, V = cfg.hidden_size, cfg.vocab_size
        N = input_ids.numel()
        rows = None
        if self.cp > 1:
            counts = split_counts(N, self.cp)
            r0 = sum(counts[:self.cp_rank])
            rows = (r0, r0 + counts[self.cp_rank], counts)
            parts = [(r0, r0 + counts[self.cp_rank], meta)]
        elif self.layout.pp > 1:
            parts = micro_batches(meta, N, self.micro_batches)
        else:
            parts = [(0, N, meta)]
        outs, sends = [], []
        # Micro-batch i leaves this stage (non-blocking send) before i+1 starts, so the next
        # stage works on i while this one works on i+1: within a step the stages overlap
        # except for the fill and drain of the pipeline.
        for a, b, m in parts:
            if self.first:
                x = input_ids[a:b]
            else:
                x = self.comm.recv(torch.empty(b - a, H, dtype=self.dtype), self.prev_rank,
                                   "pp.act")
            # after_layer (CausalLM's hook) sees local layer indices, once the step's last
            # micro-batch has written them
            hook = self.after_layer if (a, b) == parts[-1][:2] else None
            h = self.stage_forward(x, positions[a:b], m, kv_caches, rows, hook)
            if self.last:
                outs.append(h)
            else:
                sends.append(self.comm.isend(h, self.next_rank, "pp.act"))
        for w in sends:
            self.comm.wait(w, "pp.act")
        M = N if logits_rows is None else logits_rows.numel()
        if not self.last:
            logits = torch.empty(M, V, dtype=torch.float32)
        else:
            h = torch.cat(outs) if len(outs) > 1 else outs[0]
            if rows is not None:
                h = self.comm.all_gather_rows(h, rows[2], self.cp_group, "cp.hidden")
            if logits_rows is not None:
                h = h[logits_rows]
            logits = self.logits(h)
        if self.layout.pp > 1:
            self.comm.broadcast(logits, self.last_rank, self.pp_group, "pp.logits")
        return logits

    def stage_forward(self, x: torch.Tensor, positions: torch.Tensor, meta, kv_caches,
                      rows=None, after_layer=None) -> torch.Tensor:
        """This stage's layers over one batch: ``x`` is token ids on the first stage (which
        embeds them), the previous stage's hidden states ``[N, hidden]`` elsewhere.
        ``after_layer(i)`` runs after local layer ``i`` has written its K/V."""
        h = self._embed(x) if self.first else x
        cos, sin = self.rope.cos_sin(positions, self.dtype)
        for i, (layer, cache) in enumerate(zip(self.layers, kv_caches)):
            h = layer(h, cos, sin, meta, cache, rows)
            if after_layer is not None:
                after_layer(i)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Last stage: final norm and LM head over the rows ``h``, full ``[M, vocab]`` float32
        logits on every TP rank (each computes its vocabulary columns, all-gathered)."""
        cfg = self.global_config
        h = rms_norm(h, self.norm, cfg.rms_norm_eps)
        logits = F.linear(h, self.lm_head).float()
        if self.tp > 1:
            V = cfg.vocab_size
            counts = [len(vocab_range(V, self.tp, r)) for r in range(self.tp)]
            logits = self.comm.all_gather_rows(logits.t().contiguous(), counts,
                                               self.tp_group, "tp.logits").t().contiguous()
        return logits

    @torch.inference_mode()
    def idle_step(self) -> None:
        """Take part in one step's expert all-to-alls with no tokens: a replica with nothing
        to run still owes its EP peers its side of every exchange (once per micro-batch)."""
        self.forward_calls += 1
        x = torch.zeros(0, self.global_config.hidden_size, dtype=self.dtype)
        for _ in range(self.micro_batches if self.layout.pp > 1 and self.cp == 1 else 1):
            for layer in self.layers:
                if isinstance(layer.mlp, EPMoE):
                    layer.mlp(x)


def micro_batches(meta: AttentionMetadata, n: int, m: int) -> list:
    """Split a step's flat batch into ``m`` contiguous micro-batches on sequence boundaries
    (some may be empty; the count is fixed so that replicas sharing expert all-to-alls make
    the same number of exchanges). Returns ``(row_start, row_end, metadata)`` per part."""
    units = [(i, i + 1) for i in range(meta.num_decode)]
    units += [(c.start, c.start + c.q_len) for c in meta.prefills]
    bounds = [[None, None] for _ in range(m)]
    for s, e in units:
        j = min(m - 1, s * m // max(n, 1))
        if bounds[j][0] is None:
            bounds[j][0] = s
        bounds[j][1] = e
    parts, prev = [], 0
    for s, e in bounds:
        if s is None:
            s = e = prev
        parts.append((s, e, _sub_meta(meta, s, e)))
        prev = e
    return parts


def _sub_meta(meta: AttentionMetadata, a: int, b: int) -> AttentionMetadata:
    nd = max(0, min(b, meta.num_decode) - a)
    sub = AttentionMetadata(slot_mapping=meta.slot_mapping[a:b], block_size=meta.block_size,
                            num_decode=nd, sliding_window=meta.sliding_window)
    if nd:
        sub.decode_block_tables = meta.decode_block_tables[a:a + nd]
        sub.decode_ctx_lens = meta.decode_ctx_lens[a:a + nd]
    sub.prefills = [dataclasses.replace(c, start=c.start - a) for c in meta.prefills
                    if a <= c.start < b]
    return sub
