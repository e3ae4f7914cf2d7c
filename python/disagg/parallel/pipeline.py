"""Pipeline parallelism with several steps in flight.

The requests of a replica are split into request groups (``pp`` of them by default) that share
one KV block pool. The first stage schedules a step for one group, runs its layers and sends the
step on; without waiting for the result it schedules the next group, so that while stage 1 runs
group A's step, stage 0 runs group B's. A group's next step is scheduled once its previous
step's tokens are back: the last stage samples only the rows that end a sequence and sends the
tokens point-to-point to the first stage (no logits leave the last stage).

Messages between stages, in order on each link: the sizes ``[header bytes, rows]``, then one
buffer with the step header (JSON: the sequences' lengths and block tables, which rows to
sample and how) followed by the step's hidden states ``[rows, hidden]``. Only the first stage
schedules and allocates KV blocks; the other stages write their layers' K/V into the same
block ids, which the header carries. Every wait goes through
:class:`~disagg.parallel.comm.Comm` (watchdog and timeout). See docs/parallel.md.
"""
from __future__ import annotations

import itertools
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..engine.request import Status
from ..engine.sampling import SamplingParams, apply_penalties, sample_row
from ..engine.scheduler import ScheduledSeq, Scheduler
from ..model.attention import AttentionMetadata

_SAMPLE_FIELDS = ("temperature", "top_k", "top_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty")


class GroupScheduler(Scheduler):
    """The scheduler of one request group: its own running list, the shared waiting queue and
    KV pool of :class:`PipelineScheduler`.

    It schedules like :class:`~disagg.engine.scheduler.Scheduler` (running requests first, a
    decode token or the next prompt chunk each; then admissions in arrival order), with two
    rules for sharing:

    * a group admits at most its fair share, ``ceil(unfinished / groups)`` sequences, so the
      groups stay balanced and every stage has work;
    * out of blocks, a group first preempts its own newer requests. If the request still does
      not fit and newer requests run in other groups (whose steps may be in flight, so they
      cannot be preempted now), it keeps its blocks, skips this step and marks enough of those
      newer requests to be preempted at their group's next scheduling; meanwhile no group
      admits new work. The oldest request is thus never preempted while it is not alone, as
      with one scheduler, and every request finishes.
    """

    def __init__(self, shared: "PipelineScheduler", index: int):
        super().__init__(shared.config, shared.kv, shared.max_model_len)
        self.shared, self.index = shared, index
        self.waiting = shared.waiting
        self.starving = False

    def _preempt(self, req) -> None:
        super()._preempt(req)
        self.shared.evict.discard(req.request_id)

    def schedule(self) -> list:
        sh, cfg = self.shared, self.config
        for req in [r for r in self.running if r.request_id in sh.evict]:
            self._preempt(req)
        budget = self._token_budget()
        self.starving = False
        out, preempted = [], False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = req.num_tokens - req.num_computed
            if n > budget:
                if not cfg.enable_chunked_prefill:
                    i += 1
                    continue
                n = budget
            ok = self._grow(req, req.num_computed + n)
            while not ok and self.running[-1] is not req:
                self._preempt(self.running[-1])
                preempted = True
                ok = self._grow(req, req.num_computed + n)
            if not ok:
                need = (self.kv.blocks_needed(req.num_computed + n)
                        - self.kv.blocks_needed(self.kv.num_tokens(req.request_id))
                        - self.kv.num_free_blocks)
                if self._evict_newer(req, need):
                    self.starving = True
                else:  # the newest running request of all gives way, as with one scheduler
                    self._preempt(req)
                    preempted = True
                break
            out.append(ScheduledSeq(req, req.num_computed, n))
            budget -= n
            i += 1
        total = len(self.waiting) + sum(len(g.running) for g in sh.groups)
        limit = min(cfg.max_num_seqs, max(1, math.ceil(total / len(sh.groups))))
        if not preempted and not any(g.starving for g in sh.groups):
            self._admit(out, budget, limit)
        return out

    def _admitted(self, req) -> None:
        self.shared.order[req.request_id] = next(self.shared.seq)

    def _evict_newer(self, req, need: int) -> bool:
        """Mark requests of other groups admitted after ``req`` for preemption, newest first,
        until they hold ``need`` blocks; False if there are none."""
        sh = self.shared
        mine = sh.order[req.request_id]
        newer = sorted(((sh.order[r.request_id], r) for g in sh.groups if g is not self
                        for r in g.running if sh.order[r.request_id] > mine),
                       key=lambda t: -t[0])
        if not newer:
            return False
        freed = 0
        for _, r in newer:
            if freed >= need:
                break
            if r.request_id not in sh.evict:
                sh.evict.add(r.request_id)
            freed += len(self.kv.block_ids(r.request_id)) if self.kv.has(r.request_id) else 0
        return True


class PipelineScheduler:
    """Takes the place of the engine's scheduler on the first stage: ``groups`` group
    schedulers over one KV pool and one waiting queue (the engine's ``add``, ``remove``,
    ``has_work`` go through here)."""

    def __init__(self, base: Scheduler, groups: int):
        self.config, self.kv, self.max_model_len = base.config, base.kv, base.max_model_len
        self.waiting: deque = deque(base.waiting)
        self.order: dict = {}  # request id -> admission number (later = newer)
        self.seq = itertools.count()
        self.evict: set = set()
        self.groups = [GroupScheduler(self, i) for i in range(groups)]

    @property
    def running(self) -> list:
        return [r for g in self.groups for r in g.running]

    @property
    def num_preemptions(self) -> int:
        return sum(g.num_preemptions for g in self.groups)

    def add(self, req) -> None:
        self.waiting.append(req)

    def remove(self, req) -> None:
        for g in self.groups:
            if req in g.running:
                g.running.remove(req)
                break
        else:
            if req in self.waiting:
                self.waiting.remove(req)
        self.evict.discard(req.request_id)
        self.order.pop(req.request_id, None)
        if self.kv.has(req.request_id):
            self.kv.free(req.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting) or any(g.running for g in self.groups)

    def schedule(self) -> list:
        raise RuntimeError("a pipelined engine schedules per request group "
                           "(PipelineScheduler.groups[i].schedule())")


@dataclass
class _Step:
    group: int
    sched: list
    id: int = -1
    sampled: list = field(default_factory=list)
    rows: int = 0


class _SamplerState:
    """What the last stage keeps of a request that is not greedy: its parameters, its
    generator, and for penalties its tokens."""

    def __init__(self, d: dict):
        self.params = SamplingParams(**{k: d[k] for k in _SAMPLE_FIELDS}, max_tokens=1)
        self.gen = torch.Generator()
        self.gen.manual_seed(d["seed"])
        self.prompt = d.get("prompt", [])
        self.out: list = []


class StepPipeline:
    """Drives one rank of a pipelined replica with several steps in flight.

    Parameters
    ----------
    peng : ParallelEngine
        This rank's engine (its model, engine, comm and step log).
    steps_in_flight : int, optional
        Request groups, and so steps in flight at most (default: ``pp``).
    """

    def __init__(self, peng, steps_in_flight: Optional[int] = None):
        m = peng.model
        self.peng, self.model, self.comm, self.eng = peng, m, peng.comm, peng.engine
        pp_ranks = peng.groups.ranks("pp")
        self.first_rank, self.last_rank = pp_ranks[0], pp_ranks[-1]
        self.first, self.last = m.first, m.last
        self.in_flight = peng.layout.pp if steps_in_flight is None else steps_in_flight
        if self.in_flight < 1:
            raise ValueError(f"steps_in_flight must be >= 1, got {self.in_flight}")
        self.bs = self.eng.block_size
        self.sw = m.config.sliding_window
        if self.first:
            self.sched = PipelineScheduler(self.eng.scheduler, self.in_flight)
            self.eng.scheduler = self.sched
        self._sends: list = []  # (step id, handle, tag) of sends not yet waited on
        self._next_id = 0  # first stage: id of the next step issued
        self._acked = -1  # first stage: every step up to this one has returned its tokens
        self._sent_params: set = set()  # request ids whose sampler state the last stage holds
        self._done: list = []  # of those, finished since the last header
        self._samplers: dict = {}  # last stage: request id -> _SamplerState
        self.stats = {"steps": 0, "max_in_flight": 0}  # first stage: steps issued, overlap

    # ---- messages ---------------------------------------------------------------------------

    def _send_step(self, hdr: dict, h: Optional[torch.Tensor]) -> None:
        """Two messages: ``[header bytes, rows]`` (int64), then the header's JSON bytes and the
        hidden states ``[rows, hidden]`` packed in one byte buffer."""
        b = json.dumps(hdr, separators=(",", ":")).encode()
        b += b" " * (-len(b) % 8)  # the hidden states that follow stay aligned
        body = torch.frombuffer(bytearray(b), dtype=torch.uint8)
        rows = 0
        if h is not None and h.numel():
            rows = h.shape[0]
            body = torch.cat((body, h.contiguous().view(-1).view(torch.uint8)))
        nxt = self.model.next_rank
        for t, tag in ((torch.tensor([len(b), rows], dtype=torch.int64), "pp.header"),
                       (body, "pp.act")):
            self._sends.append((hdr.get("id", -1), self.comm.isend(t, nxt, tag), tag))

    def _recv_step(self):
        """The previous stage's ``(header, hidden states or None)``."""
        prev = self.model.prev_rank
        n, rows = self.comm.recv(torch.empty(2, dtype=torch.int64), prev, "pp.header").tolist()
        H = self.model.global_config.hidden_size
        dt = self.model.dtype
        body = self.comm.recv(torch.empty(n + rows * H * dt.itemsize, dtype=torch.uint8), prev,
                              "pp.act")
        hdr = json.loads(bytes(body[:n].numpy()).decode())
        h = body[n:].view(dt).view(rows, H) if rows else None
        return hdr, h

    def _reap_sends(self, upto: Optional[int] = None) -> None:
        """Wait for the sends of steps up to ``upto`` (all with None). Once the first stage
        has a step's tokens, every stage has received that step, so these waits return at
        once: no stage ever blocks on a receiver that may itself be waiting to send. Each
        header carries the first stage's ``ack``, which bounds what is held."""
        while self._sends and (upto is None or self._sends[0][0] <= upto):
            _, handle, tag = self._sends.pop(0)
            self.comm.wait(handle, tag)

    # ---- a step's geometry, the same on every stage -------------------------------------------

    def _geometry(self, seqs: list):
        pos, slots, meta_seqs = [], [], []
        bs = self.bs
        for q_len, end, blocks, _ in seqs:
            for p in range(end - q_len, end):
                pos.append(p)
                slots.append(blocks[p // bs] * bs + p % bs)
            meta_seqs.append((q_len, end, blocks))
        meta = AttentionMetadata.build(meta_seqs, bs, torch.tensor(slots, dtype=torch.long),
                                       self.sw)
        rows, r = [], 0
        for q_len, _, _, samples in seqs:
            r += q_len
            if samples:
                rows.append(r - 1)
        return torch.tensor(pos, dtype=torch.long), meta, rows

    def _count(self, seqs: list) -> None:
        st = self.eng.stats
        st["steps"] += 1
        for q_len, _, _, samples in seqs:
            if q_len == 1:
                st["decode_tokens"] += 1
            else:
                st["prefill_tokens"] += q_len

    def _log(self, tokens: int, t0: float, snap: dict) -> None:
        self.peng.step_log.append({
            "tokens": tokens, "seconds": time.perf_counter() - t0,
            "bytes": {k: v[1] - snap.get(k, 0) for k, v in self.comm.stats.items()
                      if v[1] - snap.get(k, 0)}})

    # ---- first stage ------------------------------------------------------------------------

    def run_first(self, on_finished) -> None:
        """Schedule, run and complete steps until every request is done; ``on_finished(req)``
        for each finished request."""
        groups = self.sched.groups
        inflight: deque = deque()
        busy: set = set()
        rr, idle = 0, 0
        with torch.inference_mode():
            while True:
                issued = False
                if len(inflight) < self.in_flight:
                    for j in range(len(groups)):
                        g = (rr + j) % len(groups)
                        if g in busy:
                            continue
                        sched = groups[g].schedule()
                        if sched:
                            inflight.append(self._issue(g, sched))
                            self.stats["steps"] += 1
                            self.stats["max_in_flight"] = max(self.stats["max_in_flight"],
                                                              len(inflight))
                            busy.add(g)
                            rr, issued = g + 1, True
                            break
                if issued:
                    idle = 0
                    continue
                if inflight:
                    step = inflight.popleft()
                    busy.discard(step.group)
                    self._complete(step, on_finished)
                    continue
                if not self.sched.has_work():
                    break
                # Evictions asked for by a starving group take effect at the other groups'
                # next scheduling; a few passes with nothing in flight settle them.
                idle += 1
                if idle > len(groups) + 1:
                    raise RuntimeError("pipeline scheduler made no progress: no request fits "
                                       "the KV cache")
            self._send_step({"stop": 1, "done": self._done}, None)
            self._done = []
            self._reap_sends()

    def _issue(self, g: int, sched: list) -> _Step:
        t0, snap = time.perf_counter(), {k: v[1] for k, v in self.comm.stats.items()}
        # decode rows first: AttentionMetadata batches them in one attention call
        sched.sort(key=lambda s: 0 if s.num_new == 1 else 1)
        step = _Step(g, sched)
        ids, seqs, sample, new = [], [], [], {}
        bs = self.bs
        for s in sched:
            req = s.req
            rid = req.request_id
            end = s.start + s.num_new
            np_ = len(req.prompt_token_ids)
            a, b = s.start, end
            ids.extend(req.output_token_ids[a - np_:b - np_] if a >= np_ else
                       req.prompt_token_ids[a:b] + req.output_token_ids[:max(0, b - np_)])
            blocks = self.kv_blocks(rid)[:-(-end // bs)]
            seqs.append([s.num_new, end, blocks, int(s.samples)])
            if s.samples:
                step.sampled.append(s)
                p = req.params
                if p.greedy and not p.has_penalties:
                    sample.append(None)
                    continue
                sample.append(rid)
                if rid not in self._sent_params:
                    d = {k: getattr(p, k) for k in _SAMPLE_FIELDS}
                    # The request's own seed when given; ParallelEngine gives unseeded ones a
                    # seed every rank of the replica shares.
                    d["seed"] = p.seed if p.seed is not None else 0
                    if p.has_penalties:
                        d["prompt"] = req.prompt_token_ids
                    new[rid] = d
                    self._sent_params.add(rid)
        self._count(seqs)
        pos, meta, _ = self._geometry(seqs)
        step.rows = len(ids)
        self.model.forward_calls += 1
        h = self.model.stage_forward(torch.tensor(ids, dtype=torch.long), pos, meta,
                                     self.eng.kv.caches)
        step.id = self._next_id
        self._next_id += 1
        self._send_step({"id": step.id, "ack": self._acked, "seqs": seqs, "sample": sample,
                         "new": new, "done": self._done}, h)
        self._done = []
        self._log(len(ids), t0, snap)
        return step

    def kv_blocks(self, rid) -> list:
        return self.eng.kv.block_ids(rid)

    def _complete(self, step: _Step, on_finished) -> None:
        n = len(step.sampled)
        toks = self.comm.recv(torch.empty(n, dtype=torch.int64), self.last_rank,
                              "pp.tokens").tolist() if n else []
        # Steps complete in issue order; this one's tokens are back, so every stage has it.
        self._acked = step.id
        self._reap_sends(step.id)
        eng = self.eng
        for s in step.sched:
            s.req.num_computed += s.num_new
        now = time.perf_counter()
        for s, tok in zip(step.sampled, toks):
            req = s.req
            if req.finished:
                continue
            if tok < 0:
                eng._finish(req, "error", error="sampling failed on the last pipeline stage "
                                                "(non-finite logits)")
            else:
                req.output_token_ids.append(tok)
                if req.first_token_time is None:
                    req.first_token_time = now
                eng._check_stop(req, tok)
                if req.callback is not None:
                    if not req.finished and not req.params.stop_strings:
                        req.text = eng._detok(req)
                    req.callback(req.to_output())
            if req.finished:
                if req.request_id in self._sent_params:
                    self._sent_params.discard(req.request_id)
                    self._done.append(req.request_id)
                on_finished(req)

    # ---- other stages -----------------------------------------------------------------------

    def run_stage(self) -> None:
        """Receive, run and pass on steps until the first stage says stop."""
        with torch.inference_mode():
            while True:
                hdr, h = self._recv_step()
                t0 = time.perf_counter()
                snap = {k: v[1] for k, v in self.comm.stats.items()}
                for rid in hdr.get("done", ()):
                    self._samplers.pop(rid, None)
                if hdr.get("stop"):
                    if not self.last:
                        self._send_step(hdr, None)
                    self._reap_sends()
                    self._samplers.clear()
                    return
                seqs = hdr["seqs"]
                self._count(seqs)
                pos, meta, rows = self._geometry(seqs)
                N = int(pos.numel())
                if h is None or h.shape[0] != N:
                    raise RuntimeError(f"rank {self.peng.rank}: step header has {N} rows, "
                                       f"the activations {0 if h is None else h.shape[0]}")
                self.model.forward_calls += 1
                h = self.model.stage_forward(h, pos, meta, self.eng.kv.caches)
                if self.last:
                    for rid, d in hdr["new"].items():
                        self._samplers[rid] = _SamplerState(d)
                    toks = self._sample(h, rows, hdr["sample"])
                    if toks.numel():
                        self._sends.append((hdr["id"], self.comm.isend(toks, self.first_rank,
                                                                       "pp.tokens"), "pp.tokens"))
                else:
                    self._send_step(hdr, h)
                self._reap_sends(hdr["ack"])
                self._log(N, t0, snap)

    def _sample(self, h: torch.Tensor, rows: list, sample: list) -> torch.Tensor:
        if not rows:
            return torch.empty(0, dtype=torch.int64)
        logits = self.model.logits(h[torch.tensor(rows, dtype=torch.long)])
        toks = logits.argmax(-1)
        for j, rid in enumerate(sample):
            if rid is None:
                continue
            st = self._samplers[rid]
            lg = logits[j]
            try:
                if st.params.has_penalties:
                    lg = apply_penalties(lg, st.prompt, st.out, st.params)
                t = sample_row(lg, st.params, st.gen)
            except (FloatingPointError, RuntimeError):
                t = -1  # the first stage fails this request, the others go on
            st.out.append(t)
            toks[j] = t
        return toks
