"""Rank 0 of the server: the OpenAI-compatible HTTP frontend (aiohttp) and the request router.

Worker ranks connect to a control socket here and exchange JSON lines (see ``protocol``).
Workers form units (see ``pool``); an *instance* is one attention replica of a unit, and the
router picks instances.

Routing policy (least loaded):
  * disaggregated: the prefill instance with the fewest prompt tokens dispatched to it and not
    yet prefilled (ties: lower unit); the decode instance with the fewest requests it is
    decoding or about to receive, ties broken by its KV blocks in use.
  * colocated: the replica with the fewest unfinished requests, ties by pending prompt tokens.
Both picks are made when the request arrives: the prefill instance learns where to send the
KV, and the decode instance reserves blocks and posts its receives at once.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from aiohttp import web

from . import spec_options
from .metrics import Metrics
from .protocol import MAX_LINE, decode, encode

log = logging.getLogger(__name__)

_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids", "ignore_eos",
                  "repetition_penalty", "presence_penalty", "frequency_penalty",
                  "include_stop_str_in_output", "skip_special_tokens")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_


def _err(status: int, message: str, type_: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "code": status}},
                             status=status)


def apply_chat_template(messages, template: Optional[str] = None) -> str:
    """Render ``messages`` with the model's ``chat_template`` (tokenizer_config.json, in a
    sandboxed Jinja environment) or, without one, ``<|role|>\\ncontent\\n`` per message then
    ``<|assistant|>\\n``."""
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "'messages' must be a non-empty list")
    parts = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise HTTPError(400, "each message needs a role of system, user or assistant")
        c = m.get("content")
        if isinstance(c, list):  # OpenAI content parts: keep the text ones
            c = "".join(p.get("text", "") for p in c if isinstance(p, dict))
        if not isinstance(c, str):
            raise HTTPError(400, "message content must be a string")
        parts.append(f"<|{m['role']}|>\n{c}\n")
    if template:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment()
        msgs = [dict(m, content=c) for m, c in zip(messages, [
            m["content"] if isinstance(m["content"], str) else
            "".join(p.get("text", "") for p in m["content"] if isinstance(p, dict))
            for m in messages])]
        try:
            return env.from_string(template).render(messages=msgs, add_generation_prompt=True)
        except Exception as e:
            raise HTTPError(400, f"chat template failed: {e}")
    return "".join(parts) + "<|assistant|>\n"


@dataclass
class ServeRequest:
    rid: str
    prompt_ids: list
    params: dict
    max_tokens: int
    arrival: float = field(default_factory=time.perf_counter)
    prefill: Optional[tuple] = None  # instance (unit id, replica)
    decode: Optional[tuple] = None
    tag: int = 0
    retries_left: int = 0
    recomputing: bool = False
    phase: str = "prefill"  # prefill, transfer, decode, done
    token_ids: list = field(default_factory=list)
    text: str = ""
    first_token_t: Optional[float] = None
    last_token_t: Optional[float] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    aborted: bool = False
    event: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def done(self) -> bool:
        return self.phase == "done"


class Frontend:
    """Rank 0: HTTP, routing, bookkeeping over the worker ``units`` (see ``pool.Unit``)."""

    def __init__(self, args, units: list, tokenizer, model_name: str):
        self.args = args
        self.units = {u.uid: u for u in units}
        self.roles = {r: u.role for u in units for r in u.ranks}
        self.unit_of = {r: u for u in units for r in u.ranks}
        self.instances = {(u.uid, d): u for u in units for d in range(u.dp)}
        self.seed_sampling = any(u.size > 1 for u in units)
        self.tok = tokenizer
        self.model_name = model_name
        self.conns: dict = {}  # rank -> StreamWriter
        self.hello: dict = {}
        self.stats: dict = {}
        self.dead: dict = {}  # rank -> reason
        self.reqs: dict = {}
        self.load_tokens = {k: 0 for k in self.instances}
        self.load_reqs = {k: 0 for k in self.instances}
        self.tags = itertools.count(1)
        self.metrics = Metrics()
        self.ready = asyncio.Event()
        self.max_model_len = 0
        self.shutting_down = False
        self.chat_template = None
        if tokenizer is not None and getattr(args, "model_path", None):
            import os
            f = os.path.join(args.model_path, "tokenizer_config.json")
            if os.path.isfile(f):
                with open(f) as fh:
                    t = json.load(fh).get("chat_template")
                self.chat_template = t if isinstance(t, str) else None

    # ---- control plane -----------------------------------------------------------------------

    async def handle_worker(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        rank = None
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=self.args.startup_timeout)
            hello = decode(line)
            rank = int(hello["rank"])
            if rank not in self.roles or rank in self.conns:
                raise ValueError(f"unexpected hello from rank {rank}")
            self.conns[rank] = writer
            self.hello[rank] = hello
            if len(self.hello) == len(self.roles):
                self.max_model_len = min(h["max_model_len"] for h in self.hello.values())
                self.ready.set()
                log.info("all %d workers ready", len(self.roles))
            while True:
                line = await reader.readline()
                if not line:
                    break
                self.on_message(rank, decode(line))
        except asyncio.CancelledError:  # server shutdown
            return
        except Exception as e:  # a broken worker link fails that worker, not the server
            log.error("control link to rank %s failed: %s", rank, e)
        if rank is not None and not self.shutting_down:
            self.mark_dead(rank, "control connection lost (worker exited)")

    def send(self, rank: int, msg: dict) -> bool:
        w = self.conns.get(rank)
        if w is None or rank in self.dead:
            return False
        try:
            w.write(encode(msg))
            return True
        except Exception as e:
            self.mark_dead(rank, f"send failed: {e}")
            return False

    def mark_dead(self, rank: int, why: str) -> None:
        """A dead rank fails its whole unit (the others cannot step without it)."""
        if rank in self.dead:
            return
        u = self.unit_of[rank]
        log.error("rank %d (%s unit %d) is down: %s", rank, u.role, u.uid, why)
        self.dead[rank] = why
        for other in u.ranks:
            self.dead.setdefault(other, f"unit {u.uid} lost rank {rank}: {why}")
        for r in list(self.reqs.values()):
            if not r.done and u.uid in {k[0] for k in (r.prefill, r.decode) if k}:
                self.fail(r, f"worker rank {rank} ({u.role} unit {u.uid}) failed: {why}")

    def fail(self, r: ServeRequest, why: str) -> None:
        if r.done:
            return
        r.error = why
        r.finish_reason = "error"
        self.metrics.inc("disagg_requests_failed_total")
        self.release(r)

    def release(self, r: ServeRequest) -> None:
        """Finish ``r`` here and tell its ranks to drop it (no-op for ranks already done)."""
        if r.done:
            return
        self._prefill_done(r)
        if r.finish_reason in ("error", "abort"):
            for k in {r.prefill, r.decode} - {None}:
                self.send_unit(k, {"op": "abort", "rid": r.rid, "dp": k[1]})
        for k in {r.prefill, r.decode} - {None}:
            self.load_reqs[k] -= 1
        r.phase = "done"
        self.reqs.pop(r.rid, None)
        r.event.set()

    def _tokens(self, r: ServeRequest, ids: list, text: str) -> None:
        now = time.perf_counter()
        new = len(ids) - len(r.token_ids)
        if new <= 0:
            return
        if r.first_token_t is None:
            r.first_token_t = now
            self.metrics.ttft.observe(now - r.arrival)
        else:
            for _ in range(new):
                self.metrics.itl.observe((now - r.last_token_t) / new)
        r.last_token_t = now
        r.token_ids = list(ids)
        r.text = text
        self.metrics.inc("disagg_generation_tokens_total", new)
        r.event.set()

    def send_unit(self, key: tuple, msg: dict) -> bool:
        """Send to the leader of instance ``key``'s unit (it relays to the members)."""
        return self.send(self.instances[key].leader, msg)

    def _prefill_done(self, r: ServeRequest) -> None:
        if r.phase == "prefill":
            self.load_tokens[r.prefill] -= len(r.prompt_ids)
            r.phase = "decode"

    def on_message(self, rank: int, msg: dict) -> None:
        op = msg["op"]
        if op == "stats":
            self.stats[rank] = msg
            return
        r = self.reqs.get(msg.get("rid"))
        if op == "first":  # the prefill's first token (the decode ranks got it directly)
            if r is None or r.done or r.recomputing:
                return
            self._prefill_done(r)
            if msg.get("queue_s") is not None:
                self.metrics.queue.observe(msg["queue_s"])
            self._tokens(r, [msg["token"]], msg.get("text", ""))
            if msg.get("finished"):
                r.finish_reason = msg.get("finish_reason")
                self._finish_metrics(r)
                self.release(r)
        elif op == "kv_sent":
            self.metrics.inc("disagg_kv_transfers_total")
            if msg["ok"]:
                self.metrics.inc("disagg_kv_transfer_bytes_total", msg["nbytes"])
                self.metrics.kv_lat.observe(msg["seconds"])
                if msg["seconds"] > 0:
                    self.metrics.kv_gbps.observe(msg["nbytes"] / msg["seconds"] / 1e9)
                self.metrics.inc("disagg_kv_transfer_hidden_seconds_total", msg.get("hidden_s", 0))
                self.metrics.inc("disagg_kv_transfer_exposed_seconds_total",
                                 msg.get("exposed_s", 0))
                self.metrics.kv_exposed.observe(msg.get("exposed_s", 0))
            else:
                self.metrics.inc("disagg_kv_transfer_failures_total")
                if r is not None:
                    self.kv_failed(r, msg.get("error") or "KV transfer failed")
        elif op == "kv_failed":
            self.metrics.inc("disagg_kv_transfer_failures_total")
            if r is not None:
                self.kv_failed(r, msg.get("error") or "KV receive failed")
        elif op == "out":
            if r is None or r.done:
                return
            if r.phase == "prefill" and self.roles[rank] == "both":
                if msg.get("queue_s") is not None:
                    self.metrics.queue.observe(msg["queue_s"])
            if msg.get("token_ids"):
                self._prefill_done(r)
                self._tokens(r, msg["token_ids"], msg.get("text", ""))
            if msg.get("finished"):
                if msg.get("error"):
                    self.fail(r, msg["error"])
                    return
                r.finish_reason = msg.get("finish_reason")
                self._finish_metrics(r)
                self.release(r)

    def kv_failed(self, r: ServeRequest, why: str) -> None:
        """A KV part failed or timed out: recompute on the decode instance (``--kv-retries``)
        with the tokens streamed so far, or fail the request."""
        if r.done or r.recomputing:
            return
        if r.retries_left <= 0 or r.decode is None:
            self.fail(r, why)
            return
        r.retries_left -= 1
        r.recomputing = True
        self.metrics.inc("disagg_kv_retries_total")
        self._prefill_done(r)
        if len(r.token_ids) >= r.max_tokens:
            r.finish_reason = "length"
            self._finish_metrics(r)
            self.release(r)
            return
        msg = {"op": "recompute", "rid": r.rid, "dp": r.decode[1], "prompt_token_ids":
               r.prompt_ids, "params": dict(r.params, max_tokens=r.max_tokens),
               "streamed": list(r.token_ids)}
        if not self.send_unit(r.decode, msg):
            self.fail(r, why)

    def _finish_metrics(self, r: ServeRequest) -> None:
        now = time.perf_counter()
        self.metrics.e2e.observe(now - r.arrival)
        n = len(r.token_ids)
        if n > 1 and r.first_token_t is not None:
            self.metrics.tpot.observe((now - r.first_token_t) / (n - 1))

    # ---- routing -----------------------------------------------------------------------------

    def _alive(self, role: str) -> list:
        return [k for k, u in self.instances.items()
                if u.role == role and not any(x in self.dead for x in u.ranks)]

    def route(self, r: ServeRequest) -> None:
        if self.args.mode == "colocated":
            cands = self._alive("both")
            if not cands:
                raise HTTPError(503, "no live worker", "server_error")
            pick = min(cands, key=lambda k: (self.load_reqs[k], self.load_tokens[k], k))
            r.prefill, r.decode = pick, None
            self.load_reqs[pick] += 1
            self.load_tokens[pick] += len(r.prompt_ids)
            return
        pre, dec = self._alive("prefill"), self._alive("decode")
        if not pre or not dec:
            raise HTTPError(503, "no live prefill or decode worker", "server_error")

        def used(k):
            s = self.stats.get(self.instances[k].replica(k[1])[0])
            return 0 if s is None else s["num_blocks"] - s["free_blocks"]
        r.prefill = min(pre, key=lambda k: (self.load_tokens[k], k))
        r.decode = min(dec, key=lambda k: (self.load_reqs[k], used(k), k))
        self.load_tokens[r.prefill] += len(r.prompt_ids)
        self.load_reqs[r.prefill] += 1
        self.load_reqs[r.decode] += 1

    def num_waiting(self) -> int:
        return sum(1 for r in self.reqs.values() if r.phase == "prefill")

    def submit(self, prompt_ids: list, params: dict, max_tokens: int) -> ServeRequest:
        if not self.ready.is_set():
            raise HTTPError(503, "server is starting", "server_error")
        if self.num_waiting() >= self.args.max_waiting:
            self.metrics.inc("disagg_requests_rejected_total")
            raise HTTPError(429, f"too many waiting requests (limit {self.args.max_waiting})",
                            "rate_limit_error")
        if self.seed_sampling and params.get("temperature", 1.0) != 0 \
                and params.get("seed") is None:
            # the ranks of a unit must draw the same numbers: give them one seed
            params = dict(params, seed=random.getrandbits(31))
        r = ServeRequest(f"cmpl-{uuid.uuid4().hex[:16]}", prompt_ids, params, max_tokens)
        r.tag = next(self.tags)
        r.retries_left = int(getattr(self.args, "kv_retries", 0) or 0)
        self.route(r)
        self.reqs[r.rid] = r
        self.metrics.inc("disagg_requests_total")
        self.metrics.inc("disagg_prompt_tokens_total", len(prompt_ids))
        p = dict(params, max_tokens=max_tokens)
        msg = {"op": "add", "rid": r.rid, "prompt_token_ids": prompt_ids, "params": p,
               "dp": r.prefill[1]}
        if self.args.mode != "colocated":
            pu, du = self.instances[r.prefill], self.instances[r.decode]
            msg["kv"] = {"tag": r.tag, "decode_ranks": du.replica(r.decode[1])}
            # the decode instance reserves blocks and posts its receives now, before the
            # prefill has run, so parts land as soon as they are sent
            if not self.send_unit(r.decode, {
                    "op": "expect", "rid": r.rid, "dp": r.decode[1], "prompt_token_ids":
                    prompt_ids, "params": p, "tag": r.tag,
                    "prefill_ranks": pu.replica(r.prefill[1])}):
                self.fail(r, "decode instance unavailable")
                return r
        if not self.send_unit(r.prefill, msg):
            self.fail(r, "prefill instance unavailable")
        return r

    def abort(self, r: ServeRequest) -> None:
        if not r.done:
            r.finish_reason = "abort"
            r.aborted = True
            self.metrics.inc("disagg_requests_aborted_total")
            self.release(r)

    async def watchdog(self) -> None:
        """Fail requests past their deadline, so nothing waits forever."""
        while True:
            await asyncio.sleep(0.5)
            now = time.perf_counter()
            for r in list(self.reqs.values()):
                if now - r.arrival > self.args.request_timeout:
                    self.fail(r, f"request timed out after {self.args.request_timeout:.0f} s")

    # ---- HTTP --------------------------------------------------------------------------------

    @web.middleware
    async def auth_mw(self, request, handler):
        key = self.args.api_key
        if key and request.path != "/health":
            if request.headers.get("Authorization", "") != f"Bearer {key}":
                return _err(401, "invalid or missing API key", "authentication_error")
        try:
            return await handler(request)
        except HTTPError as e:
            return _err(e.status, e.message, e.type)
        except web.HTTPRequestEntityTooLarge:
            return _err(413, f"request body over the limit of {self.args.max_body_bytes} bytes")

    async def health(self, request):
        if self.dead:
            return web.json_response({"status": "degraded", "dead_ranks": {
                str(k): f"{self.roles[k]} unit {self.unit_of[k].uid}: {v}"
                for k, v in self.dead.items()}}, status=503)
        if not self.ready.is_set():
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ok"})

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": 0, "owned_by": "disagg",
            "max_model_len": self.max_model_len}]})

    async def metrics_ep(self, request):
        gauges = []
        pools = {}
        for rank, role in self.roles.items():
            s = self.stats.get(rank)
            if s is None:
                continue
            p = pools.setdefault(role, {"running": 0, "waiting": 0, "used": 0, "total": 0})
            p["running"] += s["running"]
            p["waiting"] += s["waiting"]
            p["used"] += s["num_blocks"] - s["free_blocks"]
            p["total"] += s["num_blocks"]
        for role, p in pools.items():
            lab = {"pool": role}
            gauges += [("disagg_num_requests_running", lab, p["running"]),
                       ("disagg_num_requests_waiting", lab, p["waiting"]),
                       ("disagg_kv_blocks_used", lab, p["used"]),
                       ("disagg_kv_blocks_total", lab, p["total"]),
                       ("disagg_kv_cache_usage_ratio", lab, p["used"] / max(1, p["total"]))]
        gauges += spec_options.gauges(self.roles, self.stats)
        gauges.append(("disagg_frontend_requests_in_flight", {}, len(self.reqs)))
        gauges.append(("disagg_workers_down", {}, len(self.dead)))
        return web.Response(text=self.metrics.render(gauges),
                            content_type="text/plain", charset="utf-8")

    async def _parse(self, request) -> dict:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON body: {e}")
        if not isinstance(data, dict):
            raise HTTPError(400, "the JSON body must be an object")
        model = data.get("model", self.model_name)
        if model != self.model_name:
            raise HTTPError(404, f"model {model!r} not found (serving {self.model_name!r})",
                            "not_found_error")
        return data

    def _build(self, data: dict, prompt) -> tuple:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise HTTPError(400, "empty prompt")
            ids = self.tok.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise HTTPError(400, "prompt must be a string or a list of token ids (one prompt)")
        if data.get("n", 1) != 1:
            raise HTTPError(400, "only n=1 is supported")
        mt = data.get("max_tokens", data.get("max_completion_tokens", 16))
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise HTTPError(400, "max_tokens must be a positive integer")
        if len(ids) + mt > self.max_model_len:
            raise HTTPError(400, f"this model's maximum context length is {self.max_model_len} "
                                 f"tokens; the request has {len(ids)} prompt tokens and "
                                 f"max_tokens={mt}")
        params = {k: data[k] for k in _SAMPLING_KEYS if data.get(k) is not None}
        if "temperature" not in params:
            params["temperature"] = 1.0
        try:
            spec = spec_options.parse_request(data, self.args)
        except ValueError as e:
            raise HTTPError(400, str(e))
        if spec is not None:
            params["speculative"] = spec
        try:  # validate here so bad values are a 400 and never reach a worker
            from .worker import params_from_json
            params_from_json(dict(params, max_tokens=mt)).validate()
        except (TypeError, ValueError) as e:
            raise HTTPError(400, f"bad sampling parameters: {e}")
        return ids, params, mt

    async def completions(self, request):
        data = await self._parse(request)
        ids, params, mt = self._build(data, data.get("prompt"))
        return await self._serve(request, data, ids, params, mt, chat=False)

    async def chat(self, request):
        data = await self._parse(request)
        prompt = apply_chat_template(data.get("messages"), self.chat_template)
        ids, params, mt = self._build(data, prompt)
        return await self._serve(request, data, ids, params, mt, chat=True)

    def _choice(self, r: ServeRequest, text: str, chat: bool, final: bool, extra: bool) -> dict:
        fr = r.finish_reason if final else None
        if chat:
            c = {"index": 0, "delta" if not final or extra else "message":
                 {"role": "assistant", "content": text}, "finish_reason": fr}
        else:
            c = {"index": 0, "text": text, "logprobs": None, "finish_reason": fr}
        return c

    async def _serve(self, request, data, ids, params, mt, chat: bool):
        r = self.submit(ids, params, mt)
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        want_ids = bool(data.get("return_token_ids"))
        usage = lambda: {"prompt_tokens": len(ids), "completion_tokens": len(r.token_ids),  # noqa
                         "total_tokens": len(ids) + len(r.token_ids)}
        if not data.get("stream"):
            try:
                await r.event.wait()
                while not r.done:
                    r.event.clear()
                    await r.event.wait()
            except asyncio.CancelledError:
                self.abort(r)  # the client went away
                raise
            if r.error:
                return _err(500, r.error, "server_error")
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": r.text},
                          "finish_reason": r.finish_reason}
            else:
                choice = {"index": 0, "text": r.text, "logprobs": None,
                          "finish_reason": r.finish_reason}
            if want_ids:
                choice["token_ids"] = r.token_ids
            return web.json_response({"id": r.rid, "object": obj, "created": created,
                                      "model": self.model_name, "choices": [choice],
                                      "usage": usage()})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        obj += ".chunk" if chat else ""
        sent_text, sent_n = "", 0
        try:
            await resp.prepare(request)
            while True:
                await r.event.wait()
                r.event.clear()
                if len(r.token_ids) > sent_n:
                    delta = r.text[len(sent_text):] if r.text.startswith(sent_text) else ""
                    if chat:
                        d = {"content": delta}
                        if sent_n == 0:
                            d["role"] = "assistant"
                        choice = {"index": 0, "delta": d, "finish_reason": None}
                    else:
                        choice = {"index": 0, "text": delta, "logprobs": None,
                                  "finish_reason": None}
                    if want_ids:
                        choice["token_ids"] = r.token_ids[sent_n:]
                    sent_text, sent_n = r.text, len(r.token_ids)
                    await self._sse(resp, {"id": r.rid, "object": obj, "created": created,
                                           "model": self.model_name, "choices": [choice]})
                if r.done:
                    break
            if r.error:
                await self._sse(resp, {"error": {"message": r.error, "type": "server_error",
                                                 "code": 500}})
            else:
                # text held back at the end (stop strings trim it) is settled here
                tail = r.text[len(sent_text):] if r.text.startswith(sent_text) else ""
                choice = ({"index": 0, "delta": {"content": tail} if tail else {},
                           "finish_reason": r.finish_reason} if chat else
                          {"index": 0, "text": tail, "logprobs": None,
                           "finish_reason": r.finish_reason})
                chunk = {"id": r.rid, "object": obj, "created": created,
                         "model": self.model_name, "choices": [choice]}
                if (data.get("stream_options") or {}).get("include_usage"):
                    chunk["usage"] = usage()
                await self._sse(resp, chunk)
            await resp.write(b"data: [DONE]\n\n")
        except (asyncio.CancelledError, ConnectionResetError, ConnectionError):
            self.abort(r)  # client disconnected mid-stream: free its blocks in both pools
            raise
        finally:
            if not r.done:
                self.abort(r)
        return resp

    @staticmethod
    async def _sse(resp, obj: dict) -> None:
        await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth_mw], client_max_size=self.args.max_body_bytes)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics_ep)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app


async def serve_frontend(args, units: list, tokenizer, model_name: str, ctrl_sock,
                         stop: asyncio.Event = None) -> None:
    """Run rank 0 until SIGINT/SIGTERM (or ``stop``)."""
    import signal

    fe = Frontend(args, units, tokenizer, model_name)
    ctrl = await asyncio.start_server(fe.handle_worker, sock=ctrl_sock, limit=MAX_LINE)
    runner = web.AppRunner(fe.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    log.info("serving on http://%s:%d (%s, %d units)", args.host, args.port, args.mode,
             len(units))
    print(f"[disagg.serve] listening on http://{args.host}:{args.port}", flush=True)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    wd = asyncio.create_task(fe.watchdog())
    try:
        await asyncio.wait_for(fe.ready.wait(), timeout=args.startup_timeout)
    except asyncio.TimeoutError:
        log.error("workers did not all connect within %s s", args.startup_timeout)
    await stop.wait()
    fe.shutting_down = True
    for u in units:
        fe.send(u.leader, {"op": "shutdown"})
    wd.cancel()
    await runner.cleanup()
    ctrl.close()
    await asyncio.sleep(0.2)
