"""A worker rank of the server: one engine driven by control messages from rank 0.

Roles
-----
``prefill``  computes prompts only (``max_tokens=1``), packs the finished request's KV with
             ``kv_pack`` while its blocks are still held, frees them, and ships the buffer to
             the decode rank that rank 0 chose, through the KV connector.
``decode``   receives buffers, unpacks them into its own cache (its own block size) and
             decodes from there.
``both``     colocated mode: a plain engine doing both phases with chunked prefill.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

from ..engine import Engine, SamplingParams
from ..kv import OutOfBlocksError
from . import spec_options
from .protocol import LineConn

log = logging.getLogger(__name__)

_PARAM_KEYS = ("temperature", "top_k", "top_p", "seed", "max_tokens", "stop", "stop_token_ids",
               "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty",
               "include_stop_str_in_output", "skip_special_tokens")


def params_from_json(d: dict, engine=None) -> SamplingParams:
    return SamplingParams(**{k: d[k] for k in _PARAM_KEYS if k in d},
                          **spec_options.params_kwargs(d, engine))


def _queue_s(req) -> float:
    st = getattr(req, "scheduled_time", None)
    return 0.0 if st is None else st - req.arrival_time


class Worker:
    def __init__(self, rank: int, role: str, engine: Engine, conn: LineConn, connector,
                 kv_timeout_s: float = 30.0, stats_interval_s: float = 0.25):
        self.rank = rank
        self.role = role
        self.engine = engine
        self.conn = conn
        self.connector = connector
        self.kv_timeout_s = kv_timeout_s
        self.stats_interval_s = stats_interval_s
        self.inbox: queue.Queue = queue.Queue()
        self.handoff: dict = {}  # prefill: rid -> (decode rank, tag, max_tokens wanted)
        self.pending_kv: list = []  # decode: received buffers waiting for free blocks
        self.wanted: dict = {}  # decode: rid -> message of an expected buffer
        self.discard: set = set()
        self.running = True
        self.kv_sent_bytes = 0
        if role == "prefill":
            engine.on_finish_kv = self._pack_and_send

    # ---- control -----------------------------------------------------------------------------

    def _reader(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except Exception as e:
                log.error("rank %d: bad control message: %s", self.rank, e)
                msg = None
            self.inbox.put(msg)
            if msg is None or msg.get("op") == "shutdown":
                return

    def _handle(self, msg: dict) -> None:
        op = msg["op"]
        rid = msg.get("rid")
        if op == "add":
            params = params_from_json(msg.get("params", {}), self.engine)
            if self.role == "prefill":
                self.handoff[rid] = (msg["decode_rank"], msg["tag"], params.max_tokens)
                params.max_tokens = 1
                params.speculative = None  # the decode rank speculates
            try:
                self.engine.add_request({"prompt_token_ids": msg["prompt_token_ids"]}, params,
                                        request_id=rid, callback=lambda out: None)
            except ValueError as e:
                self.handoff.pop(rid, None)
                self.conn.send({"op": "out", "rid": rid, "token_ids": [], "text": "",
                                "finished": True, "finish_reason": "error", "error": str(e)})
        elif op == "recv_kv":
            if msg.get("discard"):
                self.discard.add(rid)
            self.wanted[rid] = msg
            self.connector.recv(rid, msg["nbytes"], msg["src"], msg["tag"])
        elif op == "abort":
            if rid in self.wanted:
                self.discard.add(rid)  # the bytes still arrive (the sender is waiting on them)
            self.pending_kv = [p for p in self.pending_kv if p[0]["rid"] != rid]
            self.engine.abort(rid)
        elif op == "shutdown":
            self.running = False
        else:
            log.warning("rank %d: unknown control op %r", self.rank, op)

    # ---- prefill side ------------------------------------------------------------------------

    def _pack_and_send(self, req, reason: str) -> None:
        h = self.handoff.get(req.request_id)
        if h is None:
            return
        dst, tag, want = h
        continues = (reason == "length" and len(req.output_token_ids) < want
                     and req.num_tokens < self.engine.max_model_len)
        if not continues:  # finished at its first token: nothing to hand over
            self.handoff.pop(req.request_id)
            return
        t0 = time.perf_counter()
        buf = self.engine.kv.pack(req.request_id)
        pack_s = time.perf_counter() - t0
        self.connector.send(req.request_id, buf, dst, tag, {"pack_s": pack_s})
        self.kv_sent_bytes += buf.numel()
        self.conn.send({"op": "prefilled", "rid": req.request_id,
                        "first_token": req.output_token_ids[0], "nbytes": buf.numel(),
                        "tag": tag, "src": self.rank, "pack_s": pack_s,
                        "decode_rank": dst, "queue_s": _queue_s(req),
                        "text": self.engine._detok(req)})

    # ---- decode side -------------------------------------------------------------------------

    def _start_decode(self, msg: dict, buf) -> bool:
        """Add a received request to the engine; False while it has no room for it."""
        rid = msg["rid"]
        try:
            t0 = time.perf_counter()
            self.engine.add_request_from_kv(msg["prompt_token_ids"], msg["first_token"], buf,
                                            params_from_json(msg.get("params", {}), self.engine),
                                            request_id=rid, callback=lambda out: None)
            self.conn.send({"op": "kv_in", "rid": rid, "unpack_s": time.perf_counter() - t0})
            return True
        except OutOfBlocksError:
            return False
        except ValueError as e:
            self.conn.send({"op": "out", "rid": rid, "token_ids": [], "text": "",
                            "finished": True, "finish_reason": "error", "error": str(e)})
            return True

    def _transfers(self) -> None:
        for res in self.connector.poll():
            if res.kind == "send":
                self.handoff.pop(res.key, None)
                self.conn.send({"op": "kv_sent", "rid": res.key, "ok": res.ok, "error": res.error,
                                "seconds": res.seconds, "nbytes": res.nbytes,
                                "pack_s": res.meta.get("pack_s", 0.0)})
                continue
            msg = self.wanted.pop(res.key, None)
            if res.key in self.discard or msg is None:
                self.discard.discard(res.key)
                continue
            self.conn.send({"op": "kv_recv", "rid": res.key, "ok": res.ok, "error": res.error,
                            "seconds": res.seconds, "nbytes": res.nbytes})
            if not res.ok:
                self.conn.send({"op": "out", "rid": res.key, "token_ids": [], "text": "",
                                "finished": True, "finish_reason": "error", "error": res.error})
                continue
            self.pending_kv.append((msg, res.buffer, time.monotonic()))
        keep = []
        for msg, buf, t in self.pending_kv:
            if self._start_decode(msg, buf):
                continue
            if time.monotonic() - t > self.kv_timeout_s:
                self.conn.send({"op": "out", "rid": msg["rid"], "token_ids": [], "text": "",
                                "finished": True, "finish_reason": "error",
                                "error": "decode pool out of KV blocks (timed out)"})
                continue
            keep.append((msg, buf, t))
        self.pending_kv = keep

    # ---- loop --------------------------------------------------------------------------------

    def _stats(self) -> dict:
        kv = self.engine.kv
        sch = self.engine.scheduler
        return {"op": "stats", "rank": self.rank, "running": len(sch.running),
                "waiting": len(sch.waiting) + len(self.pending_kv), "num_blocks": kv.num_blocks,
                "free_blocks": kv.num_free_blocks, "requests_with_kv": len(kv.request_ids()),
                **spec_options.worker_stats(self.engine, self.role)}

    def run(self) -> None:
        threading.Thread(target=self._reader, daemon=True, name="ctrl-reader").start()
        last_stats = 0.0
        while self.running:
            busy = self.engine.has_unfinished() or bool(self.pending_kv)
            try:
                msg = self.inbox.get(timeout=0 if busy else 0.002)
                while True:
                    if msg is None:
                        log.error("rank %d: lost the control connection; exiting", self.rank)
                        self.running = False
                        break
                    self._handle(msg)
                    msg = self.inbox.get_nowait()
            except queue.Empty:
                pass
            if not self.running:
                break
            if self.connector is not None:
                self._transfers()
            for out in self.engine.step():
                rid = out.request_id
                if rid in self.handoff and out.finished and out.outputs[0].finish_reason != "error" \
                        and out.error is None:
                    continue  # handed to a decode rank ("prefilled" already sent)
                self.handoff.pop(rid, None) if out.finished else None
                o = out.outputs[0]
                m = {"op": "out", "rid": rid, "token_ids": o.token_ids, "text": o.text,
                     "finished": out.finished, "finish_reason": o.finish_reason,
                     "error": out.error}
                st, at = out.metrics.get("scheduled_time"), out.metrics.get("arrival_time")
                if len(o.token_ids) == 1 and st is not None and self.role != "decode":
                    m["queue_s"] = st - at
                self.conn.send(m)
            now = time.monotonic()
            if now - last_stats > self.stats_interval_s:
                last_stats = now
                self.conn.send(self._stats())
        for rid in list(self.engine.requests):
            self.engine.abort(rid)
        self.engine.step()
