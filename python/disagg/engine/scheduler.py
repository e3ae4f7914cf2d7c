"""Continuous-batching scheduler: which requests compute how many tokens in the next step.

Every step, running requests go first (a decode token each, or the next chunk of a prompt),
then waiting requests are admitted in arrival order while the token budget, the sequence
limit and the KV cache allow. When the cache runs out of blocks, the newest running request
is preempted: its blocks are freed and it is recomputed from its tokens later.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from ..kv.cache import OutOfBlocksError
from .request import Request, Status


@dataclass
class SchedulerConfig:
    """Limits per step.

    Attributes
    ----------
    max_num_seqs : int
        Sequences in one step at most.
    max_num_batched_tokens : int
        Token budget per step (decode tokens plus prefill chunks).
    enable_chunked_prefill : bool
        Split prompts that do not fit the remaining budget into chunks; without it a prompt
        is computed in one step (the budget is raised to the model's context length).
    """

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True


@dataclass
class ScheduledSeq:
    req: Request
    start: int  # first position computed this step
    num_new: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the sequence's end, so a token is sampled from it."""
        return self.start + self.num_new == self.req.num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache, max_model_len: int):
        self.config = config
        self.kv = kv_cache
        self.max_model_len = max_model_len
        self.waiting: deque = deque()
        self.running: list = []
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a request out of the queues and return its blocks (finish, abort, error)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        if self.kv.has(req.request_id):
            self.kv.free(req.request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        if self.kv.has(req.request_id):
            self.kv.free(req.request_id)
        req.num_computed = 0
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _grow(self, req: Request, total: int) -> bool:
        need = total - self.kv.num_tokens(req.request_id)
        if need <= 0:
            return True
        try:
            self.kv.append(req.request_id, need)
            return True
        except OutOfBlocksError:
            return False

    def _token_budget(self) -> int:
        """Tokens one step may compute (a whole prompt at least without chunked prefill)."""
        cfg = self.config
        if not cfg.enable_chunked_prefill:
            return max(cfg.max_num_batched_tokens, self.max_model_len)
        return cfg.max_num_batched_tokens

    def _admit(self, out: list, budget: int, limit: int) -> int:
        """Admit waiting requests in arrival order while blocks, the token ``budget`` and
        ``limit`` running sequences allow, appending their work to ``out``; returns the budget
        left."""
        chunked = self.config.enable_chunked_prefill
        while self.waiting and budget > 0 and len(self.running) < limit:
            req = self.waiting[0]
            n = req.num_tokens - req.num_computed
            if n > budget:
                if not chunked:
                    break
                n = budget
            if not self.kv.can_allocate(n):
                break
            self.kv.allocate(req.request_id, n)
            self.waiting.popleft()
            req.status = Status.RUNNING
            if getattr(req, "scheduled_time", None) is None:  # queue time for serving metrics
                req.scheduled_time = time.perf_counter()
            self._admitted(req)
            self.running.append(req)
            out.append(ScheduledSeq(req, req.num_computed, n))
            budget -= n
        return budget

    def _admitted(self, req: Request) -> None:
        """Called for each request :meth:`_admit` takes in (subclasses track admission order)."""

    def schedule(self) -> list:
        """Decide the next step; returns ``ScheduledSeq``s (may be empty)."""
        cfg = self.config
        budget = self._token_budget()
        out: list = []
        preempted = False
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
            while not ok:
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
                ok = self._grow(req, req.num_computed + n)
            if not ok:
                break
            out.append(ScheduledSeq(req, req.num_computed, n))
            budget -= n
            i += 1
        # New work waits while running requests are being preempted: admitting it would only
        # take the blocks they need back.
        if not preempted:
            self._admit(out, budget, cfg.max_num_seqs)
        return out
