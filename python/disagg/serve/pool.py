"""Worker pools of the disaggregated server.

Units
-----
A pool (prefill, decode, or the colocated replicas) is a list of *units*. A unit is the ranks
of one parallel layout (``--prefill-tp/--prefill-ep``, ``--decode-tp/--decode-ep``):
``tp`` tensor-parallel ranks, and with ``ep > tp`` ``ep / tp`` data-parallel attention
replicas whose experts are spread over all ``ep`` ranks (EP across the unit). A unit with
``dp`` replicas serves ``dp`` *instances* (the router's unit of choice); a unit of one rank is
the plain single-process engine.

Control: rank 0 talks to a unit's first rank (its leader) only; the leader relays every batch
of control messages to the other members over the unit's ``torch.distributed`` group (JSON
bytes, one broadcast per loop iteration), so every member applies the same messages at the
same step and their schedulers stay identical. Each member still holds its own connection to
rank 0 for results and statistics, so rank 0 notices a dead member at once: a dead member fails
its whole unit (its requests get an error, ``/health`` reports 503, routing skips the unit);
the other members leave when their next collective fails or passes ``--pool-timeout``.

KV hand-off
-----------
When rank 0 routes a request it tells the prefill unit where the KV goes *and* tells the decode
unit what to expect (prompt, source ranks, tags), so decode ranks reserve blocks and post their
receives before the prefill runs (every part's size follows from the prompt length). The
prefill sends layer ranges as soon as they are computed (``--kv-layers-per-send N``, from the
model's ``after_layer`` hook), each of its TP ranks sending its KV-head slice to the decode
ranks that hold those heads (:func:`kv_head_plan`); the decode side unpacks parts as they
arrive, in any order. The first token goes straight from the prefill replica's first rank to
the decode ranks (a 16-byte message: status, token) and, for streaming, to rank 0.

A failed or timed-out part fails the request, or with ``--kv-retries 1`` makes the decode
replica recompute the prompt plus the tokens already streamed (rank 0 sends them) and carry on.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from ..kv import OutOfBlocksError
from ..parallel.layout import ParallelLayout, RankGroups, kv_head_range
from . import spec_options
from .worker import params_from_json

log = logging.getLogger(__name__)

TAGS_PER_REQUEST = 64  # tag = base * 64 + layer part; the last one carries the first token
TOKEN_TAG = TAGS_PER_REQUEST - 1
MAX_LAYER_PARTS = TAGS_PER_REQUEST - 1

# first-token message status
CONTINUE, FINISHED, NO_KV = 0, 1, 2


# ---- layouts -----------------------------------------------------------------------------------

def unit_shape(tp: int, ep: int) -> tuple:
    """``(tp, ep, dp)`` of one unit; ``ep`` must be 1 or a multiple of ``tp`` (EP spans the
    unit's TP ranks and ``ep / tp`` attention replicas)."""
    if tp < 1 or ep < 1:
        raise ValueError(f"tp and ep must be >= 1, got tp={tp}, ep={ep}")
    if ep > 1 and ep % tp:
        raise ValueError(f"ep={ep} must be a multiple of tp={tp} (EP spans the unit's ranks)")
    return tp, ep, (ep // tp if ep > 1 else 1)


@dataclass
class Unit:
    """One unit of a pool: ``ranks`` are global ranks in ParallelLayout order (tp fastest)."""

    uid: int
    role: str  # "prefill", "decode" or "both"
    ranks: list
    tp: int = 1
    ep: int = 1
    dp: int = 1

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def leader(self) -> int:
        return self.ranks[0]

    def layout(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, ep=self.ep, dp=self.dp)

    def replica(self, d: int) -> list:
        """Global ranks of attention replica ``d``, by TP rank."""
        return [self.ranks[d * self.tp + t] for t in range(self.tp)]

    def coords(self, rank: int) -> tuple:
        """``(tp_rank, replica)`` of a global rank of this unit."""
        i = self.ranks.index(rank)
        return i % self.tp, i // self.tp

    def to_json(self) -> dict:
        return {"uid": self.uid, "role": self.role, "ranks": self.ranks, "tp": self.tp,
                "ep": self.ep, "dp": self.dp}


def plan_units(mode: str, prefill: int, decode: int, prefill_tp: int = 1, prefill_ep: int = 1,
               decode_tp: int = 1, decode_ep: int = 1) -> list:
    """The units of a server: ranks ``1..`` go to the prefill units, then the decode units
    (colocated: ``prefill + decode`` single-rank replicas). World size is ``1 + sum of unit
    sizes``."""
    if prefill < 1 or decode < 1:
        raise ValueError("--prefill and --decode must be >= 1")
    units, nxt = [], 1
    if mode == "colocated":
        if max(prefill_tp, prefill_ep, decode_tp, decode_ep) > 1:
            raise ValueError("per-pool layouts (--prefill-tp/-ep, --decode-tp/-ep) need "
                             "--mode disaggregated")
        for i in range(prefill + decode):
            units.append(Unit(i, "both", [nxt + i]))
        return units
    for role, n, tp, ep in (("prefill", prefill, prefill_tp, prefill_ep),
                            ("decode", decode, decode_tp, decode_ep)):
        tp, ep, dp = unit_shape(tp, ep)
        for _ in range(n):
            size = tp * dp
            units.append(Unit(len(units), role, list(range(nxt, nxt + size)), tp, ep, dp))
            nxt += size
    return units


def world_size(units: list) -> int:
    return 1 + sum(u.size for u in units)


def build_unit_groups(units: list, rank: int, timeout_s: float):
    """Create every unit's process groups (collective over the whole job: every rank calls
    this with the same units). Returns ``(unit group, RankGroups)`` of ``rank``'s unit, with
    unit-local rank numbers in the RankGroups (``(None, None)`` for rank 0 and one-rank units).
    """
    import torch.distributed as dist

    to = datetime.timedelta(seconds=timeout_s)
    mine = (None, None)
    for u in units:
        if u.size == 1:
            continue
        ug = dist.new_group(u.ranks, timeout=to, backend="gloo")
        lay = u.layout()
        groups = {}
        for kind, lists in lay._groups().items():
            for local in lists:
                pg = (dist.new_group([u.ranks[i] for i in local], timeout=to, backend="gloo")
                      if len(local) > 1 else None)
                if rank in u.ranks and u.ranks.index(rank) in local:
                    groups[kind] = (pg, list(local))
        if rank in u.ranks:
            mine = (ug, RankGroups(lay, u.ranks.index(rank), groups))
    return mine


# ---- KV mapping between TP degrees ---------------------------------------------------------------

def kv_head_plan(num_kv_heads: int, tp_src: int, tp_dst: int) -> list:
    """Which prefill TP rank sends which KV heads to which decode TP rank.

    Returns ``(src, dst, head_start, head_end)`` tuples (global KV head numbers). Every decode
    rank ``d`` gets exactly the heads it holds, ``kv_head_range(n, tp_dst, d)``, each once, in
    contiguous runs, each run from one prefill rank that holds those heads. Heads held by
    several prefill ranks (``n < tp_src``: GQA replication) are taken from replica
    ``d mod copies`` so the sends spread over the copies. A prefill rank packs
    ``head_start - its first head .. head_end - its first head`` of its own cache (``kv_pack``
    ``head_start/head_end``); the decode rank unpacks at ``head_start - its first head``.
    """
    plan = []
    for d in range(tp_dst):
        dr = kv_head_range(num_kv_heads, tp_dst, d)
        h = dr.start
        while h < dr.stop:
            owners = [s for s in range(tp_src) if h in kv_head_range(num_kv_heads, tp_src, s)]
            s = owners[d % len(owners)]
            e = min(dr.stop, kv_head_range(num_kv_heads, tp_src, s).stop)
            plan.append((s, d, h, e))
            h = e
    return plan


def layer_parts(num_layers: int, per_send: int) -> list:
    """Layer ranges ``[(start, end), ...]`` sent one by one (``per_send <= 0``: all at once)."""
    if per_send <= 0 or per_send >= num_layers:
        return [(0, num_layers)]
    n = -(-num_layers // per_send)
    if n > MAX_LAYER_PARTS:
        per_send = -(-num_layers // MAX_LAYER_PARTS)
    return [(a, min(num_layers, a + per_send)) for a in range(0, num_layers, per_send)]


# ---- the worker --------------------------------------------------------------------------------

@dataclass
class _Expect:
    """A request a decode unit is waiting for (every member tracks every one, in order)."""

    rid: str
    msg: dict
    mine: bool
    t0: float
    need: int = 0
    got: int = 0
    held: list = None  # received parts waiting for the reservation
    reserved: bool = False
    token: Optional[tuple] = None
    fail: Optional[str] = None


class PoolWorker:
    """One worker rank: its unit's engine share, control relay, KV sends and receives.

    Parameters
    ----------
    rank : int
    unit : Unit
    engine : Engine
        This rank's engine (its model is this rank's share under the unit's layout).
    conn : LineConn
        The JSON-lines connection to rank 0.
    connector : KVConnector or None (colocated)
    unit_group : ProcessGroup or None
        The unit's group (None for one-rank units).
    args : Namespace
        ``prefill_tp``, ``decode_tp``, ``kv_layers_per_send``, ``kv_timeout``.
    """

    def __init__(self, rank: int, unit: Unit, engine, conn, connector, unit_group, args,
                 stats_interval_s: float = 0.25):
        self.rank, self.unit, self.engine, self.conn = rank, unit, engine, conn
        self.connector, self.unit_group = connector, unit_group
        self.role = unit.role
        self.tp_rank, self.dp = unit.coords(rank)
        self.is_leader = rank == unit.leader
        self.replica_leader = self.tp_rank == 0
        self.kv_timeout_s = float(args.kv_timeout)
        self.stats_interval_s = stats_interval_s
        model = engine.model
        cfg = getattr(model, "global_config", model.config)
        self.num_layers = model.config.num_hidden_layers
        self.num_kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim
        self.dtype = model.dtype
        self.parts = layer_parts(self.num_layers, int(getattr(args, "kv_layers_per_send", 0) or 0))
        self.prefill_tp = int(getattr(args, "prefill_tp", 1) or 1)
        self.decode_tp = int(getattr(args, "decode_tp", 1) or 1)
        self.plan = kv_head_plan(self.num_kv_heads, self.prefill_tp, self.decode_tp)
        self.lockstep = bool(getattr(model, "needs_lockstep", False))
        self.inbox: queue.Queue = queue.Queue()
        self.wake = threading.Event()
        self.running = True
        # prefill: rid -> hand-off state
        self.handoff: dict = {}
        self._final: list = []
        # decode: rid -> _Expect, in arrival order (the same on every member of the unit)
        self.expect: "OrderedDict[str, _Expect]" = OrderedDict()
        self.prefix: dict = {}  # recomputed requests: tokens streamed before the recompute
        self.unit_busy = False
        if connector is not None:
            connector.on_done = self.wake.set
        if self.role == "prefill":
            sch = engine.scheduler
            orig = sch.schedule

            def schedule():
                out = orig()
                # requests whose prompt completes in this step: their KV ships layer by layer
                self._final = [s.req for s in out if s.samples and not s.req.output_token_ids
                               and s.req.request_id in self.handoff]
                return out
            sch.schedule = schedule
            model.after_layer = self._after_layer

    # ---- control ---------------------------------------------------------------------------

    def _reader(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except Exception as e:
                log.error("rank %d: bad control message: %s", self.rank, e)
                msg = None
            self.inbox.put(msg)
            self.wake.set()
            if msg is None or (msg.get("op") == "shutdown" and self.is_leader):
                return

    def _drain(self, wait: float) -> list:
        msgs = []
        if wait > 0 and self.inbox.empty():
            self.wake.wait(wait)
        self.wake.clear()
        while True:
            try:
                msgs.append(self.inbox.get_nowait())
            except queue.Empty:
                return msgs

    def _control(self, wait: float) -> list:
        """This iteration's control messages, the same list on every member of the unit."""
        import torch.distributed as dist

        if self.unit_group is None:
            return self._drain(wait)
        if self.is_leader:
            msgs = self._drain(wait)
            if any(m is None for m in msgs):
                msgs = [{"op": "shutdown"}]
            data = json.dumps(msgs).encode() if msgs else b""
            n = torch.tensor([len(data)], dtype=torch.int64)
        else:
            if any(m is None for m in self._drain(0)):  # rank 0 went away
                return [None]
            n = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(n, self.unit.leader, group=self.unit_group)
        if int(n[0]) == 0:
            return []
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_leader
               else torch.empty(int(n[0]), dtype=torch.uint8))
        dist.broadcast(buf, self.unit.leader, group=self.unit_group)
        if self.is_leader:
            return msgs
        return json.loads(bytes(buf.numpy()))

    def send0(self, msg: dict) -> None:
        self.conn.send(msg)

    def _error_out(self, rid: str, error: str) -> None:
        self.send0({"op": "out", "rid": rid, "token_ids": [], "text": "", "finished": True,
                    "finish_reason": "error", "error": error})

    def _handle(self, msg: dict) -> None:
        op = msg["op"]
        rid = msg.get("rid")
        mine = msg.get("dp", 0) == self.dp
        if op == "add":
            if not mine:
                return
            params = params_from_json(msg.get("params", {}), self.engine)
            if self.role == "prefill":
                kv = msg["kv"]
                self.handoff[rid] = {"tag": int(kv["tag"]), "dst": list(kv["decode_ranks"]),
                                     "want": params.max_tokens, "sends": 0, "parts_sent": 0,
                                     "nbytes": 0, "ok": True, "error": None, "spans": [],
                                     "t_compute": None, "seconds": 0.0, "token_sent": False}
                params.max_tokens = 1
                params.speculative = None  # the decode rank speculates
            try:
                self.engine.add_request({"prompt_token_ids": msg["prompt_token_ids"]}, params,
                                        request_id=rid, callback=lambda out: None)
            except ValueError as e:
                if self.role == "prefill":
                    self._send_token(rid, NO_KV, 0)
                if self.replica_leader:
                    self._error_out(rid, str(e))
        elif op == "expect":
            self._expect(msg, mine)
        elif op == "recompute":
            self._drop_expect(rid)
            if mine:
                self._recompute(msg)
        elif op == "abort":
            self._drop_expect(rid)
            self.prefix.pop(rid, None)
            if mine:
                req = self.engine.requests.get(rid)
                h = self.handoff.get(rid)
                if req is not None and h is not None and h["parts_sent"] == 0:
                    self._send_token(rid, NO_KV, 0)  # nothing will follow: free the receivers
                self.engine.abort(rid)
        elif op == "shutdown":
            self.running = False
        else:
            log.warning("rank %d: unknown control op %r", self.rank, op)

    # ---- prefill side ----------------------------------------------------------------------

    def _after_layer(self, i: int) -> None:
        if not self._final:
            return
        for p, (l0, l1) in enumerate(self.parts):
            if i + 1 == l1:
                for req in self._final:
                    self._send_part(req.request_id, p, l0, l1)

    def _send_part(self, rid: str, p: int, l0: int, l1: int) -> None:
        h = self.handoff[rid]
        for s, d, h0, h1 in self.plan:
            if s != self.tp_rank:
                continue
            first = kv_head_range(self.num_kv_heads, self.prefill_tp, s).start
            buf = self.engine.kv.pack(rid, layers=(l0, l1), heads=(h0 - first, h1 - first))
            h["sends"] += 1
            h["nbytes"] += buf.numel()
            self.connector.send(f"{rid}|{p}|{d}", buf, h["dst"][d],
                                h["tag"] * TAGS_PER_REQUEST + p, {"rid": rid})
        h["parts_sent"] += 1

    def _send_token(self, rid: str, status: int, token: int) -> None:
        """The first token (or that none follows) to every decode rank of the request."""
        h = self.handoff.get(rid)
        if h is None or h["token_sent"]:
            return
        h["token_sent"] = True
        if not self.replica_leader:
            return
        msg = torch.tensor([status, token], dtype=torch.int64).view(torch.uint8)
        for d, dst in enumerate(h["dst"]):
            h["sends"] += 1
            self.connector.send(f"{rid}|tok|{d}", msg.clone(), dst,
                                h["tag"] * TAGS_PER_REQUEST + TOKEN_TAG,
                                {"rid": rid, "token": True})

    def _prefill_outputs(self, outs: list) -> None:
        now = time.perf_counter()
        for req in self._final:
            h = self.handoff.get(req.request_id)
            if h is not None and h["t_compute"] is None:
                h["t_compute"] = now
        self._final = []
        for out in outs:
            rid = out.request_id
            h = self.handoff.get(rid)
            if h is None:
                continue
            if not out.finished:
                continue
            o = out.outputs[0]
            if o.finish_reason in ("error", "abort") or out.error:
                self._send_token(rid, NO_KV, 0)
                if o.finish_reason == "error" and self.replica_leader:
                    self._error_out(rid, out.error or "prefill failed")
                self._maybe_done(rid)
                continue
            tok = o.token_ids[0]
            n_prompt = len(out.prompt_token_ids)
            cont = (o.finish_reason == "length" and h["want"] > 1
                    and n_prompt + 1 < self.engine.max_model_len)
            if h["parts_sent"] < len(self.parts):  # no KV went out: nothing to decode from
                cont = False
                if self.replica_leader:
                    self._error_out(rid, "prefill finished without sending its KV")
                self._send_token(rid, NO_KV, 0)
            else:
                self._send_token(rid, CONTINUE if cont else FINISHED, tok)
                if self.replica_leader:
                    st, at = out.metrics.get("scheduled_time"), out.metrics.get("arrival_time")
                    self.send0({"op": "first", "rid": rid, "token": tok, "text": o.text,
                                "finished": not cont, "finish_reason": o.finish_reason,
                                "queue_s": (st - at) if st is not None else None})
            self._maybe_done(rid)

    def _maybe_done(self, rid: str) -> None:
        h = self.handoff.get(rid)
        if h is None or h["sends"] > 0 or not h["token_sent"]:
            return
        self.handoff.pop(rid)
        if h["parts_sent"] == 0:
            return
        # each part is in flight from when it is handed to the connector (right after its
        # layers are computed and packed) to when its send completes; the part of that which
        # falls before the prompt's step ends is hidden behind compute, what runs past it is
        # exposed (the decode side may wait on it)
        spans = h["spans"]
        tc = h["t_compute"] or (max(e for _, e in spans) if spans else time.perf_counter())
        hidden = sum(max(0.0, min(e, tc) - a) for a, e in spans)
        exposed = max([0.0] + [e - tc for _, e in spans])
        self.send0({"op": "kv_sent", "rid": rid, "ok": h["ok"], "error": h["error"],
                    "nbytes": h["nbytes"], "seconds": h["seconds"], "hidden_s": hidden,
                    "exposed_s": exposed, "parts": len(self.parts)})

    # ---- decode side -----------------------------------------------------------------------

    def _expect(self, msg: dict, mine: bool) -> None:
        rid = msg["rid"]
        e = _Expect(rid, msg, mine, time.monotonic(), held=[])
        self.expect[rid] = e
        if not mine:
            return
        n = len(msg["prompt_token_ids"])
        src, base = msg["prefill_ranks"], int(msg["tag"]) * TAGS_PER_REQUEST
        from ..ops import kv_pack_nbytes

        first = kv_head_range(self.num_kv_heads, self.decode_tp, self.tp_rank).start
        for p, (l0, l1) in enumerate(self.parts):
            for s, d, h0, h1 in self.plan:
                if d != self.tp_rank:
                    continue
                nb = kv_pack_nbytes(l1 - l0, n, h1 - h0, self.head_dim, self.dtype)
                self.connector.recv(f"{rid}|{p}|{s}", nb, src[s], base + p,
                                    {"rid": rid, "head_start": h0 - first})
                e.need += 1
        self.connector.recv(f"{rid}|tok", 16, src[0], base + TOKEN_TAG, {"rid": rid, "token": True})

    def _drop_expect(self, rid: str) -> None:
        e = self.expect.pop(rid, None)
        if e is not None and e.mine and e.reserved and rid not in self.engine.requests \
                and self.engine.kv.has(rid):
            self.engine.kv.free(rid)

    def _reserve(self) -> None:
        kv = self.engine.kv
        for e in self.expect.values():
            if not e.mine or e.reserved or e.fail:
                continue
            try:
                kv.allocate(e.rid, len(e.msg["prompt_token_ids"]))
            except OutOfBlocksError:
                break  # in order: later ones wait behind this one
            e.reserved = True
            for buf, hs in e.held:
                kv.unpack(e.rid, buf, head_start=hs)
            e.held = []

    def _decode_results(self, res) -> None:
        e = self.expect.get(res.meta.get("rid"))
        if e is None or not e.mine:
            return  # late bytes of a request dropped here
        if not res.ok:
            e.fail = e.fail or res.error
            return
        if res.meta.get("token"):
            st, tok = torch.frombuffer(bytearray(res.buffer.numpy().tobytes()),
                                       dtype=torch.int64).tolist()
            e.token = (int(st), int(tok))
            return
        e.got += 1
        if e.reserved:
            self.engine.kv.unpack(e.rid, res.buffer, head_start=res.meta["head_start"])
        else:
            e.held.append((res.buffer, res.meta["head_start"]))

    def _codes(self, e: _Expect) -> tuple:
        """(ready, severity) this member reports for ``e``: severity 2 fail, 1 drop."""
        if not e.mine:
            return 1, 0
        if e.fail:
            return 0, 2
        if e.token is not None and e.token[0] != CONTINUE:
            return 0, 1
        if time.monotonic() - e.t0 > self.kv_timeout_s and not e.reserved:
            e.fail = "decode pool out of KV blocks (timed out)"
            return 0, 2
        ready = e.reserved and e.got == e.need and e.token is not None
        return (1 if ready else 0), 0

    def _any_work(self) -> bool:
        """Whether any member of the unit has engine work (lock-step EP replicas: a member
        without work still joins the step's all-to-alls)."""
        import torch.distributed as dist

        v = torch.tensor([int(self.engine.has_unfinished())], dtype=torch.int64)
        dist.all_reduce(v, op=dist.ReduceOp.MAX, group=self.unit_group)
        return bool(v.item())

    def _sync(self) -> None:
        """Agree with the unit on which expected requests start, drop or fail (identical
        decisions on every member, so their schedulers and caches stay the same)."""
        import torch.distributed as dist

        items = list(self.expect.values())
        codes = [self._codes(e) for e in items]
        if self.unit_group is not None and items:
            K = len(items)
            v = torch.tensor([c[0] for c in codes] + [-c[1] for c in codes], dtype=torch.int64)
            dist.all_reduce(v, op=dist.ReduceOp.MIN, group=self.unit_group)
            vals = v.tolist()
            codes = [(vals[k], -vals[K + k]) for k in range(K)]
        for e, (ready, sev) in zip(items, codes):
            if sev == 2:
                self._drop_expect(e.rid)
                if e.mine and self.replica_leader:
                    self.send0({"op": "kv_failed", "rid": e.rid,
                                "error": e.fail or "KV transfer failed on a peer rank"})
            elif sev == 1:
                self._drop_expect(e.rid)
            elif ready:
                self.expect.pop(e.rid)
                if e.mine:
                    self._start(e)

    def _start(self, e: _Expect) -> None:
        m = e.msg
        try:
            self.engine.add_request_from_kv(m["prompt_token_ids"], e.token[1], None,
                                            params_from_json(m.get("params", {}), self.engine),
                                            request_id=e.rid, callback=lambda out: None)
        except ValueError as err:
            if self.engine.kv.has(e.rid) and e.rid not in self.engine.requests:
                self.engine.kv.free(e.rid)
            if self.replica_leader:
                self._error_out(e.rid, str(err))

    def _recompute(self, msg: dict) -> None:
        rid = msg["rid"]
        streamed = list(msg.get("streamed") or [])
        p = dict(msg.get("params", {}))
        p["max_tokens"] = int(p.get("max_tokens", 16)) - len(streamed)
        if p["max_tokens"] < 1:
            return  # rank 0 finishes it
        self.prefix[rid] = streamed
        try:
            self.engine.add_request({"prompt_token_ids": list(msg["prompt_token_ids"]) + streamed},
                                    params_from_json(p, self.engine), request_id=rid,
                                    callback=lambda out: None)
        except ValueError as e:
            self.prefix.pop(rid, None)
            if self.replica_leader:
                self._error_out(rid, f"recompute failed: {e}")

    # ---- loop ------------------------------------------------------------------------------

    def _stats(self) -> dict:
        kv = self.engine.kv
        sch = self.engine.scheduler
        return {"op": "stats", "rank": self.rank, "running": len(sch.running),
                "waiting": len(sch.waiting) + sum(1 for e in self.expect.values() if e.mine),
                "num_blocks": kv.num_blocks, "free_blocks": kv.num_free_blocks,
                "requests_with_kv": len(kv.request_ids()),
                **spec_options.worker_stats(self.engine, self.role)}

    def _emit(self, outs: list) -> None:
        if not self.replica_leader:
            return
        for out in outs:
            rid = out.request_id
            o = out.outputs[0]
            ids, text = o.token_ids, o.text
            pre = self.prefix.get(rid)
            if pre is not None:
                ids = pre + list(ids)
                if self.engine.tokenizer is not None:
                    text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
                if out.finished:
                    self.prefix.pop(rid, None)
            m = {"op": "out", "rid": rid, "token_ids": ids, "text": text,
                 "finished": out.finished, "finish_reason": o.finish_reason, "error": out.error}
            st, at = out.metrics.get("scheduled_time"), out.metrics.get("arrival_time")
            if len(o.token_ids) == 1 and st is not None and self.role == "both":
                m["queue_s"] = st - at
            self.send0(m)

    def _collect(self) -> None:
        if self.connector is None:
            return
        for res in self.connector.poll():
            if res.kind == "send":
                rid = res.meta.get("rid")
                h = self.handoff.get(rid)
                if h is None:
                    continue
                h["sends"] -= 1
                h["seconds"] += res.seconds
                if not res.meta.get("token"):
                    h["spans"].append((res.meta["t_queued"], res.meta["t_end"]))
                if not res.ok:
                    h["ok"], h["error"] = False, h["error"] or res.error
                self._maybe_done(rid)
            else:
                self._decode_results(res)

    def run(self) -> None:
        threading.Thread(target=self._reader, daemon=True, name="ctrl-reader").start()
        last_stats = 0.0
        eng = self.engine
        try:
            while self.running:
                busy = eng.has_unfinished()
                wait = 0.0 if busy else (0.002 if (self.expect and self.unit_group is not None)
                                         else 0.05)
                for msg in self._control(wait):
                    if msg is None:
                        log.error("rank %d: lost the control connection; exiting", self.rank)
                        self.running = False
                        break
                    self._handle(msg)
                if not self.running:
                    break
                self._collect()
                if self.role == "decode":
                    self._reserve()
                if self.role == "decode" or self.unit_group is not None:
                    self._sync()
                if self.lockstep:
                    self.unit_busy = self._any_work()
                before = getattr(eng.model, "forward_calls", 0)
                outs = eng.step()
                fatal = getattr(eng.model, "fatal", None)
                if fatal is not None:
                    raise RuntimeError(f"forward failed: {fatal}")
                if (self.lockstep and self.unit_busy
                        and getattr(eng.model, "forward_calls", 0) == before):
                    eng.model.idle_step()  # EP peers still need this rank's all-to-alls
                if self.role == "prefill":
                    self._prefill_outputs(outs)
                else:
                    self._emit(outs)
                now = time.monotonic()
                if now - last_stats > self.stats_interval_s:
                    last_stats = now
                    self.send0(self._stats())
        except Exception as e:
            # a failed collective means a unit member is gone: this rank cannot continue
            log.error("rank %d (%s unit %d): %s; exiting", self.rank, self.role, self.unit.uid, e)
            os._exit(3)
        for rid in list(eng.requests):
            eng.abort(rid)
