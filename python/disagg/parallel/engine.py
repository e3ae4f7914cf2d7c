"""Running a model under a parallel layout: one engine per rank, a request router over the
data-parallel replicas, lock-step stepping where replicas share expert all-to-alls, and the
per-step communication log behind the layout report."""
from __future__ import annotations

import dataclasses
import math
import os
import secrets
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..engine import Engine, SamplingParams
from ..model import resolve_model_path
from .comm import Comm
from .layout import ParallelLayout
from .model import ParallelCausalLM


class RequestRouter:
    """Assigns requests to data-parallel replicas: each goes to the replica with the fewest
    tokens (prompt + max new) assigned so far, lowest index on ties. Every rank computes the
    same assignment from the same prompts, so no message is needed."""

    def __init__(self, dp: int):
        self.load = [0] * dp

    def route(self, prompt_len: int, max_tokens: int) -> int:
        d = min(range(len(self.load)), key=lambda i: (self.load[i], i))
        self.load[d] += prompt_len + max_tokens
        return d


class ParallelEngine:
    """This rank's engine under ``layout`` (call on every rank of an initialized job).

    Parameters
    ----------
    model : str
        Model folder or ``"default"``.
    layout : ParallelLayout
    comm : Comm, optional
        Accounting and watchdog (one is made with ``timeout_s``).
    pipeline : {"auto", "steps", "micro"}
        With ``pp > 1``: ``"steps"`` keeps several steps in flight (request groups, see
        :mod:`disagg.parallel.pipeline`); ``"micro"`` cuts each step into ``pp``
        micro-batches and drains the pipeline every step. ``"auto"``: steps, except where
        replicas step in lock-step (EP shared across replicas) or with CP, which need micro.
    steps_in_flight : int, optional
        Request groups (steps in flight at most) for ``"steps"``; default ``pp``.
    **engine_kwargs
        As for :class:`disagg.engine.Engine`.
    """

    def __init__(self, model: str, layout: ParallelLayout, *, dtype: str = "auto",
                 comm: Optional[Comm] = None, timeout_s: float = 60.0, pipeline: str = "auto",
                 steps_in_flight: Optional[int] = None, **engine_kwargs):
        if pipeline not in ("auto", "steps", "micro"):
            raise ValueError(f"pipeline must be 'auto', 'steps' or 'micro', got {pipeline!r}")
        path = resolve_model_path(model)
        self.layout = layout
        self.comm = comm or Comm(timeout_s)
        self.comm.start_watchdog()
        self.groups = layout.build()
        self.rank = self.groups.rank
        self.coords = self.groups.coords
        self.model = ParallelCausalLM.from_pretrained(path, layout, self.groups, self.comm, dtype)
        cfg = self.model.global_config
        bs = engine_kwargs.get("block_size", 16)
        if engine_kwargs.get("num_blocks") is None:
            # Sized from the whole model so that every rank of a replica gets the same number
            # of blocks: their schedulers must make identical decisions.
            max_len = min(engine_kwargs.get("max_model_len") or cfg.max_position_embeddings,
                          cfg.max_position_embeddings)
            per_block = (2 * bs * cfg.num_key_value_heads * cfg.head_dim
                         * self.model.dtype.itemsize * cfg.num_hidden_layers)
            want = engine_kwargs.get("max_num_seqs", 64) * math.ceil(max_len / bs)
            engine_kwargs["num_blocks"] = max(1, min(
                want, engine_kwargs.pop("kv_cache_bytes", 1 << 30) // per_block))
        tok = path if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
        self.engine = Engine(self.model, tok, **engine_kwargs)
        self.step_log: list = []
        # This rank's own view of the last generate call ({prompt index: token ids}); every
        # rank that runs a scheduler (all TP ranks of a replica's first stage) holds the same.
        self.last_results: dict = {}
        steps_ok = layout.pp > 1 and layout.cp == 1 and not self.model.needs_lockstep
        if pipeline == "steps" and not steps_ok:
            raise ValueError("pipeline='steps' needs pp > 1, cp == 1 and no EP group shared "
                             f"by replicas; layout is {layout.describe()}")
        self.pipeline = None
        if steps_ok and pipeline != "micro":
            from .pipeline import StepPipeline

            self.pipeline = StepPipeline(self, steps_in_flight)

    def report(self) -> str:
        """The layout (who holds what) and, per kind of collective, what this rank moved."""
        lines = [self.layout.report(self.model.global_config), "",
                 f"rank {self.rank} holds {self.model.weight_bytes() / 2**20:.2f} MiB of "
                 f"weights",
                 *self._pipeline_lines(),
                 f"rank {self.rank} communication ({len(self.step_log)} steps)",
                 "  kind          tag               calls        bytes   seconds"]
        for (kind, tag), (c, b, t) in sorted(self.comm.stats.items()):
            lines.append(f"  {kind:<13} {tag:<16} {c:>6} {b:>12} {t:>9.3f}")
        return "\n".join(lines)

    def _pipeline_lines(self) -> list:
        if self.layout.pp == 1:
            return []
        if self.pipeline is None:
            return [f"pipeline: {self.model.micro_batches} micro-batches per step "
                    f"(drained every step)"]
        p = self.pipeline
        line = f"pipeline: steps in flight, {p.in_flight} request groups"
        if p.first:
            line += (f"; {p.stats['steps']} steps issued, at most {p.stats['max_in_flight']} "
                     f"in flight, {self.engine.scheduler.num_preemptions} preemptions")
        return [line]

    def _sync_has_work(self, mine: bool) -> bool:
        # Only replicas that share expert all-to-alls must agree on stepping; the ranks of one
        # replica already agree (same requests, same scheduler decisions, same logits).
        if not self.model.needs_lockstep:
            return mine
        flag = torch.tensor([1 if mine else 0], dtype=torch.int32)
        self.comm.all_reduce(flag, dist.group.WORLD, "control", op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def generate(self, prompts: Sequence, params: Optional[SamplingParams] = None
                 ) -> Optional[list]:
        """Generate for every prompt (every rank passes the same list).

        Returns, on global rank 0, one dict per prompt in order (``prompt_token_ids``,
        ``token_ids``, ``text``, ``finish_reason``, and ``error`` for a rejected prompt);
        ``None`` on the other ranks.
        """
        params = params or SamplingParams()
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        eng = self.engine
        router = RequestRouter(self.layout.dp)
        mine = {}
        results = {}
        per_request = self._seeded(params, len(prompts))
        schedules = self.pipeline is None or self.pipeline.first
        for i, p in enumerate(prompts):
            n = len(p.get("prompt_token_ids", p.get("prompt", ""))) if isinstance(p, dict) \
                else len(p)
            if router.route(n, params.max_tokens) != self.coords["dp"] or not schedules:
                continue
            try:
                mine[eng.add_request(p, per_request(i))] = i
            except ValueError as e:
                results[i] = {"prompt_token_ids": list(p.get("prompt_token_ids", []))
                              if isinstance(p, dict) else [], "token_ids": [], "text": "",
                              "finish_reason": "error", "error": str(e)}
        if self.pipeline is not None:
            self._run_pipelined(mine, results)
        else:
            self._run_steps(mine, results)
        self.last_results = {i: r["token_ids"] for i, r in results.items()}
        # Every rank of a replica holds the same results; its first rank speaks for it.
        leader = self.coords["tp"] == 0 and self.coords["cp"] == 0 and self.coords["pp"] == 0
        gathered = self.comm.gather_object(results if leader else {})
        if gathered is None:
            return None
        merged = {}
        for g in gathered:
            merged.update(g)
        return [merged.get(i) for i in range(len(prompts))]

    def _seeded(self, params: SamplingParams, n: int):
        """Per-request params: an unseeded sampling request gets a seed drawn once per call on
        global rank 0 and broadcast (one int64), so every rank of a replica samples the same
        tokens (the engine would seed each rank's generator from the OS otherwise)."""
        if params.greedy or params.seed is not None:
            return lambda i: params
        base = torch.tensor([secrets.randbits(62) if self.rank == 0 else 0], dtype=torch.int64)
        self.comm.broadcast(base, 0, dist.group.WORLD, "control")
        b = int(base[0])
        return lambda i: dataclasses.replace(params, seed=(b + i * 0x9E3779B97F4A7C15)
                                             % (1 << 63))

    @staticmethod
    def _result(req_out) -> dict:
        o = req_out.outputs[0]
        r = {"prompt_token_ids": req_out.prompt_token_ids, "token_ids": list(o.token_ids),
             "text": o.text, "finish_reason": o.finish_reason}
        if req_out.error:
            r["error"] = req_out.error
        return r

    def _run_pipelined(self, mine: dict, results: dict) -> None:
        pipe = self.pipeline
        if not pipe.first:
            pipe.run_stage()
            return

        def finished(req):
            if req.request_id in mine:
                results[mine[req.request_id]] = self._result(req.to_output())

        pipe.run_first(finished)

    def _run_steps(self, mine: dict, results: dict) -> None:
        eng = self.engine
        model = self.model
        while self._sync_has_work(eng.has_unfinished()):
            before = model.forward_calls
            snap = {k: v[1] for k, v in self.comm.stats.items()}
            t0 = time.perf_counter()
            tokens = eng.stats["prefill_tokens"] + eng.stats["decode_tokens"]
            outs = eng.step(emit_all=False)
            if model.fatal is not None:
                raise RuntimeError(f"rank {self.rank}: forward failed: {model.fatal}") \
                    from model.fatal
            if model.forward_calls == before and model.needs_lockstep:
                model.idle_step()
            new_tokens = eng.stats["prefill_tokens"] + eng.stats["decode_tokens"] - tokens
            self.step_log.append({
                "tokens": new_tokens, "seconds": time.perf_counter() - t0,
                "bytes": {k: v[1] - snap.get(k, 0) for k, v in self.comm.stats.items()
                          if v[1] - snap.get(k, 0)}})
            for out in outs:
                if out.finished and out.request_id in mine:
                    results[mine[out.request_id]] = self._result(out)
