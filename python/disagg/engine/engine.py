"""The single-process engine: a model, a paged KV cache and a continuous-batching scheduler.

``add_request`` queues work, ``step`` runs one batched forward (decode tokens and prefill
chunks together) and returns what changed; servers drive ``step`` in a loop, ``LLM`` wraps it
for offline use.
"""
from __future__ import annotations

import itertools
import logging
import time
from typing import Callable, Optional, Union

import torch

from ..model import AttentionMetadata, CausalLM, resolve_model_path
from ..model.attention import long_tensor
from .request import Request, RequestOutput, Status
from .sampling import SamplingParams, apply_penalties, sample_row
from .scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)

PromptType = Union[str, dict, list]


class Engine:
    """Continuous-batching inference over one model in this process.

    Parameters
    ----------
    model : str or CausalLM
        A model folder, ``"default"`` (the packaged model), or a loaded ``CausalLM``.
    tokenizer : str, optional
        Folder with ``tokenizer.json``; defaults to the model folder.
    dtype : str
        ``"auto"`` (the checkpoint's), ``"float32"``, ``"bfloat16"``.
    block_size : int
        Tokens per KV block.
    num_blocks : int, optional
        KV blocks; by default enough for ``max_num_seqs`` full-length sequences, capped by
        ``kv_cache_bytes``.
    max_model_len : int, optional
        Context length limit (prompt + generated); defaults to the config's
        ``max_position_embeddings``, and never exceeds what the cache can hold.
    max_num_seqs, max_num_batched_tokens, enable_chunked_prefill
        See :class:`SchedulerConfig`.
    speculative : SpecConfig or str, optional
        Speculative decoding for every request (``"ngram"``, ``"off"``, or a
        :class:`disagg.spec.SpecConfig` with a draft model and a tree shape); requests override
        it through ``SamplingParams.speculative``. Metrics: :meth:`spec_metrics`.
    """

    def __init__(self, model: Union[str, CausalLM] = "default", tokenizer: Optional[str] = None,
                 *, dtype: str = "auto", block_size: int = 16, num_blocks: Optional[int] = None,
                 kv_cache_bytes: int = 1 << 30, max_model_len: Optional[int] = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 enable_chunked_prefill: bool = True, speculative=None):
        from ..kv import PagedKVCache
        from ..spec.config import SpecConfig
        from ..spec.runner import SpecRunner

        path = None
        if isinstance(model, CausalLM):
            self.model = model
        else:
            path = resolve_model_path(model)
            self.model = CausalLM.from_pretrained(path, dtype=dtype)
        cfg = self.model.config
        tok_path = tokenizer or path
        self.tokenizer = load_tokenizer(tok_path) if tok_path else None
        self.eos_token_ids = list(cfg.eos_token_id)
        if not self.eos_token_ids and self.tokenizer is not None:
            self.eos_token_ids = list(self.tokenizer.eos_token_ids)
        max_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        if num_blocks is None:
            bytes_per_block = (2 * block_size * cfg.num_key_value_heads * cfg.head_dim
                               * self.model.embed.element_size() * cfg.num_hidden_layers)
            want = max_num_seqs * -(-max_len // block_size)
            num_blocks = max(1, min(want, kv_cache_bytes // bytes_per_block))
        self.block_size = block_size
        self.kv = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size,
                               cfg.num_key_value_heads, cfg.head_dim, dtype=self.model.dtype)
        # One request alone must always fit, or preemption could never make progress.
        self.max_model_len = min(max_len, num_blocks * block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill),
            self.kv, self.max_model_len)
        self.requests: dict = {}
        self._pending: list = []  # outputs produced outside step() (aborts)
        self._ids = itertools.count()
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0}
        self.spec = SpecRunner(self, SpecConfig.coerce(speculative) or SpecConfig())
        # Disaggregated serving: called with a finishing request while its KV blocks are still
        # held, so a prefill worker can pack them for a decode worker before they are freed.
        self.on_finish_kv: Optional[Callable[[Request, str], None]] = None

    # ---- requests -------------------------------------------------------------------------

    def _prompt_ids(self, prompt: PromptType) -> tuple:
        vocab = self.model.config.vocab_size
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                text = prompt.get("prompt")
            elif "prompt" in prompt:
                return self._prompt_ids(prompt["prompt"])
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, str):
            if not prompt:
                raise ValueError("empty prompt")
            if self.tokenizer is None:
                raise ValueError("the model has no tokenizer.json: give prompt_token_ids")
            ids, text = self.tokenizer.encode(prompt), prompt
        elif isinstance(prompt, (list, tuple)):
            ids, text = prompt, None
        else:
            raise ValueError(f"unsupported prompt type {type(prompt).__name__}")
        if not isinstance(ids, (list, tuple)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of ints")
        if not ids:
            raise ValueError("empty prompt (no tokens)")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens, but the context length "
                             f"(max_model_len) is {self.max_model_len}: no room to generate")
        return list(ids), text

    def add_request(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None,
                    callback: Optional[Callable[[RequestOutput], None]] = None) -> str:
        """Queue a request; returns its id.

        Parameters
        ----------
        prompt : str, list of int, or dict
            Text, token ids, or ``{"prompt_token_ids": [...]}`` / ``{"prompt": "..."}``.
        params : SamplingParams
        callback : callable, optional
            Called with the request's ``RequestOutput`` after every new token (streaming)
            and when it finishes.

        Raises
        ------
        ValueError
            For a bad prompt or bad sampling values; nothing is queued and other requests
            are unaffected.
        """
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        params.validate()
        self.spec.validate(params)
        ids, text = self._prompt_ids(prompt)
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        req = Request(rid, text, ids, params, self.eos_token_ids, callback)
        self.requests[rid] = req
        self.scheduler.add(req)
        return rid

    def add_request_from_kv(self, prompt_token_ids: list, first_token: int, kv_buffer,
                            params: Optional[SamplingParams] = None,
                            request_id: Optional[str] = None,
                            callback: Optional[Callable[[RequestOutput], None]] = None) -> str:
        """Start decoding a request whose prompt was computed elsewhere (disaggregated decode).

        ``kv_buffer`` is a ``kv_pack`` buffer holding the prompt's K/V (from a cache of any
        block size), or None when the caller has already written the prompt's K/V into
        ``self.kv`` under ``request_id`` (e.g. layer by layer as parts arrived);
        ``first_token`` is the token the prefill worker sampled. The request joins the running
        batch directly with its prompt counted as computed.

        Raises
        ------
        ValueError
            Bad prompt, params, or a buffer that does not cover the prompt.
        OutOfBlocksError
            Not enough free blocks now; nothing changes, the caller may retry later.
        """
        from ..ops import kv_buffer_info

        params = params if params is not None else SamplingParams()
        params.validate()
        ids, _ = self._prompt_ids(list(prompt_token_ids))
        if kv_buffer is None:
            rid = str(request_id) if request_id is not None else None
            if rid is None or not self.kv.has(rid) or self.kv.num_tokens(rid) != len(ids):
                raise ValueError("add_request_from_kv without a buffer needs the prompt's K/V "
                                 "already in the cache under request_id")
            if rid in self.requests:
                raise ValueError(f"request id {rid!r} is already in use")
            if not 0 <= int(first_token) < self.model.config.vocab_size:
                raise ValueError(f"first_token {first_token} out of range")
            return self._start_from_kv(rid, ids, int(first_token), params, callback)
        info = kv_buffer_info(kv_buffer)
        if info.num_tokens != len(ids) or info.num_layers != self.model.config.num_hidden_layers:
            raise ValueError(f"KV buffer holds {info.num_tokens} tokens x {info.num_layers} "
                             f"layers, the prompt needs {len(ids)} x "
                             f"{self.model.config.num_hidden_layers}")
        if not 0 <= int(first_token) < self.model.config.vocab_size:
            raise ValueError(f"first_token {first_token} out of range")
        rid = str(request_id) if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        # one extra token of room so the first decode step cannot fail on a full last block
        if not self.kv.can_allocate(len(ids) + 1):
            from ..kv import OutOfBlocksError
            raise OutOfBlocksError(self.kv.blocks_needed(len(ids) + 1), self.kv.num_free_blocks,
                                   f"add_request_from_kv({rid!r})")
        self.kv.unpack(rid, kv_buffer)
        return self._start_from_kv(rid, ids, int(first_token), params, callback)

    def _start_from_kv(self, rid, ids, first_token, params, callback) -> str:
        req = Request(rid, None, ids, params, self.eos_token_ids, callback)
        req.num_computed = len(ids)
        req.status = Status.RUNNING
        req.output_token_ids.append(int(first_token))
        req.first_token_time = time.perf_counter()
        self.requests[rid] = req
        self.scheduler.running.append(req)
        self._check_stop(req, int(first_token))
        if req.finished:
            self._pending.append(req.to_output())
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; returns False if it is unknown or done."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        self._finish(req, "abort")
        self._pending.append(req.to_output())
        return True

    def spec_metrics(self) -> dict:
        """Speculative decoding figures since start: acceptance length (mean tokens per
        verified tree, bonus included), acceptance rate by depth, draft and verify seconds."""
        return self.spec.metrics.summary()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def num_unfinished(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    # ---- stepping -------------------------------------------------------------------------

    def _finish(self, req: Request, reason: str, stop_reason=None, error: Optional[str] = None):
        if self.on_finish_kv is not None and reason != "error" and self.kv.has(req.request_id):
            try:
                self.on_finish_kv(req, reason)
            except Exception as e:  # the hook's failure is this request's, not the engine's
                log.exception("on_finish_kv failed for %s", req.request_id)
                reason, error = "error", f"KV hand-off failed: {e}"
        self.scheduler.remove(req)
        self.spec.release(req.request_id)
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.stop_reason = stop_reason
        req.error = error
        req.finished_time = time.perf_counter()
        if req.stop_reason is None or not isinstance(req.stop_reason, str):
            req.text = self._detok(req)
        self.requests.pop(req.request_id, None)

    def _detok(self, req: Request) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(req.output_token_ids,
                                     skip_special_tokens=req.params.skip_special_tokens)

    def _new_tokens(self, s: ScheduledSeq) -> list:
        req = s.req
        np_ = len(req.prompt_token_ids)
        a, b = s.start, s.start + s.num_new
        if a >= np_:
            return req.output_token_ids[a - np_:b - np_]
        return req.prompt_token_ids[a:b] + req.output_token_ids[:max(0, b - np_)]

    def _check_stop(self, req: Request, tok: int) -> None:
        p = req.params
        if tok in req.stop_ids:
            reason = None if tok in self.eos_token_ids and tok not in (p.stop_token_ids or []) \
                else tok
            self._finish(req, "stop", reason)
            return
        if p.stop_strings:
            prev = len(req.text)
            req.text = self._detok(req)
            start = max(0, prev - max(len(s) for s in p.stop_strings))
            hit = None
            for s in p.stop_strings:
                j = req.text.find(s, start)
                if j >= 0 and (hit is None or j < hit[0]):
                    hit = (j, s)
            if hit is not None:
                j, s = hit
                req.text = req.text[:j + len(s)] if p.include_stop_str_in_output else req.text[:j]
                self._finish(req, "stop", s)
                return
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            self._finish(req, "length")

    def step(self, emit_all: bool = True) -> list:
        """Run one scheduling step and forward pass.

        Parameters
        ----------
        emit_all : bool
            False returns only finished requests (offline use: building an output per token
            per request costs more than it is worth there; callbacks still see every token).

        Returns
        -------
        list of RequestOutput
            One per request that produced a token or finished in this step (plus aborts
            since the last step).
        """
        outputs, self._pending = self._pending, []
        sched = self.scheduler.schedule()
        if not sched:
            return outputs
        # Decoding requests that speculate get a draft tree instead of one token.
        spec_on = self.spec.default.method != "off" or any(
            getattr(s.req.params, "speculative", None) is not None for s in sched)
        spec_in = [(s, c) for s in sched if s.num_new == 1 and s.samples
                   for c in [self.spec.config_for(s.req)] if c is not None] if spec_on else ()
        plans = {}
        if spec_in:
            for (s, _), plan in zip(spec_in, self.spec.prepare(spec_in)):
                if plan is not None:
                    plans[id(s)] = plan
        # Plain decode rows first (AttentionMetadata batches them in one attention call),
        # then trees, then prefill chunks.
        sched.sort(key=lambda s: 1 if id(s) in plans else (0 if s.num_new == 1 else 2))
        ids, pos, slots, seqs, rows, sampled = [], [], [], [], [], []
        bs = self.block_size
        row = 0
        for s in sched:
            end = s.start + s.num_new
            blocks = self.kv.block_ids_view(s.req.request_id)
            plan = plans.get(id(s)) if plans else None
            if plan is not None:
                # Node i's KV goes to position ctx + i; its RoPE position is ctx + depth.
                n = len(plan.tree)
                ids.extend(plan.tree.tokens)
                pos.extend(plan.positions)
                for p in range(s.start, s.start + n):
                    slots.append(blocks[p // bs] * bs + p % bs)
                seqs.append((n, s.start + n, blocks, plan.mask))
                rows.extend(range(row, row + n))
                row += n
                sampled.append(s)
                self.stats["decode_tokens"] += 1
                continue
            ids.extend(self._new_tokens(s))
            # Slots and block tables from plain lists: per-request tensor ops here cost more
            # than the model's own work at small batch sizes.
            for p in range(s.start, end):
                pos.append(p)
                slots.append(blocks[p // bs] * bs + p % bs)
            seqs.append((s.num_new, end, blocks))
            row += s.num_new
            if s.samples:
                rows.append(row - 1)
                sampled.append(s)
            if s.num_new == 1:
                self.stats["decode_tokens"] += 1
            else:
                self.stats["prefill_tokens"] += s.num_new
        self.stats["steps"] += 1
        t0 = time.perf_counter()
        try:
            meta = AttentionMetadata.build(seqs, bs, long_tensor(slots),
                                           self.model.config.sliding_window)
            # Every row sampled (a decode-only step): no row selection before the LM head.
            wanted = None if len(rows) == row and rows[-1] == row - 1 else \
                long_tensor(rows)
            logits = self.model.forward(long_tensor(ids), long_tensor(pos), meta,
                                        self.kv.caches, wanted)
        except Exception as e:  # a failed forward fails its batch, not the engine
            log.exception("forward failed")
            for s in sched:
                self._finish(s.req, "error", error=f"forward failed: {e}")
                outputs.append(s.req.to_output())
            return outputs
        for s in sched:
            s.req.num_computed += s.num_new
        new_tokens: list = [None] * len(sampled)
        if plans:
            # Rows of logits per sampled sequence: one, or one per tree node.
            spans, r = [], 0
            for s in sampled:
                n = len(plans[id(s)].tree) if id(s) in plans else 1
                spans.append((r, n))
                r += n
            self.spec.metrics.verify_s += time.perf_counter() - t0
            ks = [k for k, s in enumerate(sampled) if id(s) in plans]
            try:
                verified = self.spec.verify([plans[id(sampled[k])] for k in ks],
                                            [logits[spans[k][0]:spans[k][0] + spans[k][1]]
                                             for k in ks])
            except Exception as e:
                log.exception("speculative verification failed")
                for k in ks:
                    s = sampled[k]
                    self._finish(s.req, "error", error=f"verification failed: {e}")
                    outputs.append(s.req.to_output())
                verified = [[] for _ in ks]
            for k, toks in zip(ks, verified):
                new_tokens[k] = toks
                # The root was counted above; the accepted drafts' KV is now in place too.
                sampled[k].req.num_computed += max(0, len(toks) - 1)
            plain = [k for k in range(len(sampled)) if new_tokens[k] is None]
        else:
            plain = range(len(sampled))  # one row of logits each, in order
        if plain:
            plain_logits = logits
            if plans:
                plain_logits = logits[long_tensor([spans[k][0] for k in plain])]
            greedy = plain_logits.argmax(-1).tolist()
        now = time.perf_counter()
        for j, k in enumerate(plain):
            s = sampled[k]
            req = s.req
            p = req.params
            try:
                if p.greedy and not p.has_penalties:
                    new_tokens[k] = [greedy[j]]
                else:
                    lg = plain_logits[j]
                    if p.has_penalties:
                        lg = apply_penalties(lg, req.prompt_token_ids, req.output_token_ids, p)
                    new_tokens[k] = [sample_row(lg, p, req.generator)]
            except Exception as e:  # one request's failure (bad logits) is its own
                log.exception("request %s failed", req.request_id)
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")
                outputs.append(req.to_output())
                new_tokens[k] = []
        for k, s in enumerate(sampled):
            req = s.req
            if req.finished or not new_tokens[k]:
                continue
            p = req.params
            try:
                for tok in new_tokens[k]:
                    req.output_token_ids.append(tok)
                    if req.first_token_time is None:
                        req.first_token_time = now
                    self._check_stop(req, tok)
                    if req.finished:
                        break
                if req.callback is not None:
                    if not req.finished and not p.stop_strings:
                        req.text = self._detok(req)
                    out = req.to_output()
                    req.callback(out)
                    if emit_all or req.finished:
                        outputs.append(out)
                elif emit_all or req.finished:
                    outputs.append(req.to_output())
            except Exception as e:  # one request's failure (a callback) is its own
                log.exception("request %s failed", req.request_id)
                if not req.finished:
                    self._finish(req, "error", error=f"{type(e).__name__}: {e}")
                outputs.append(req.to_output())
        return outputs

    def run(self) -> list:
        """Step until every request is done; returns the final outputs in finishing order."""
        done = []
        while self.has_unfinished() or self._pending:
            for out in self.step(emit_all=False):
                if out.finished:
                    done.append(out)
        return done
