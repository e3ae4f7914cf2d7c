"""KV connectors: move a prefilled request's packed KV (one ``kv_pack`` buffer) from a prefill
worker to a decode worker.

The control plane (who sends what to whom, and how many bytes) travels separately, as JSON
through the server's rank 0; a connector only moves the bytes. Transfers run on one background
thread per worker so that the engine keeps stepping while bytes are in flight; every wait has a
timeout, and a failed or timed-out transfer is reported for that request alone.

Fault injection (tests): ``DISAGG_KV_FAIL_SENDS=N`` in a sender's environment makes its first
``N`` sends fail without sending anything, as a broken link would.
"""
from __future__ import annotations

import datetime
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

log = logging.getLogger(__name__)


@dataclass
class TransferResult:
    """The outcome of one send or receive.

    ``buffer`` is the received bytes (receives that succeeded), ``error`` the reason when
    ``ok`` is False; ``seconds`` is the time from the transfer's start to its end on this side.
    """

    key: str
    kind: str  # "send" or "recv"
    ok: bool
    nbytes: int
    seconds: float
    buffer: Optional[torch.Tensor] = None
    error: Optional[str] = None
    meta: dict = field(default_factory=dict)


class KVConnector:
    """Interface: queue sends and receives, collect their results without blocking.

    Subclasses implement ``_send(buffer, peer, tag, timeout)`` and
    ``_recv(nbytes, peer, tag, timeout) -> Tensor``; both raise on failure or timeout.
    """

    name = "base"

    def __init__(self, timeout_s: float = 30.0):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self._jobs: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._closed = False
        self._fail_sends = int(os.environ.get("DISAGG_KV_FAIL_SENDS", "0") or 0)
        self._fail_lock = threading.Lock()
        #: optional callable run (on the transfer's thread) after each result is queued, e.g.
        #: to wake a worker loop waiting for work
        self.on_done = None
        self._thread = threading.Thread(target=self._run, name=f"kv-{self.name}", daemon=True)
        self._thread.start()

    # ---- public --------------------------------------------------------------------------

    def send(self, key: str, buffer: torch.Tensor, peer: int, tag: int, meta: dict = None) -> None:
        """Queue ``buffer`` (1-D uint8, from ``kv_pack``) for ``peer``; the connector owns it
        until the result comes back from :meth:`poll`."""
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError("KVConnector.send: buffer must be a contiguous 1-D uint8 tensor")
        self._jobs.put(("send", key, buffer, peer, int(tag), meta or {}, time.perf_counter()))

    def recv(self, key: str, nbytes: int, peer: int, tag: int, meta: dict = None) -> None:
        """Queue a receive of ``nbytes`` from ``peer`` under ``tag``."""
        if nbytes <= 0:
            raise ValueError(f"KVConnector.recv: nbytes must be > 0, got {nbytes}")
        self._jobs.put(("recv", key, int(nbytes), peer, int(tag), meta or {}, time.perf_counter()))

    def poll(self) -> list:
        """Results of the transfers finished since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._closed = True
        self._jobs.put(None)
        self._thread.join(timeout=self.timeout_s)

    # ---- worker thread ---------------------------------------------------------------------

    def _run(self) -> None:
        # Each transfer waits on its own thread: one that waits for a late peer must not hold
        # up the others (receives may be posted in another order than the sends).
        while not self._closed:
            job = self._jobs.get()
            if job is None:
                return
            threading.Thread(target=self._one, args=job, daemon=True).start()

    def _one(self, kind, key, arg, peer, tag, meta, queued) -> None:
        t0 = time.perf_counter()
        try:
            if kind == "send":
                if self._fail_sends:
                    with self._fail_lock:
                        inject = self._fail_sends > 0
                        self._fail_sends -= inject
                    if inject:
                        raise ConnectionError("injected send failure (DISAGG_KV_FAIL_SENDS)")
                self._send(arg, peer, tag, self.timeout_s)
                res = TransferResult(key, kind, True, arg.numel(), time.perf_counter() - t0,
                                     meta=meta)
            else:
                buf = self._recv(arg, peer, tag, self.timeout_s)
                res = TransferResult(key, kind, True, arg, time.perf_counter() - t0, buf,
                                     meta=meta)
        except Exception as e:  # a failed transfer fails its request, never the worker
            log.warning("KV %s %s (peer %d) failed: %s", kind, key, peer, e)
            n = arg.numel() if kind == "send" else arg
            res = TransferResult(key, kind, False, n, time.perf_counter() - t0,
                                 error=f"KV {kind} failed: {type(e).__name__}: {e}", meta=meta)
        res.meta.setdefault("queued_s", t0 - queued)
        res.meta["t_queued"], res.meta["t_end"] = queued, time.perf_counter()
        self._done.put(res)
        cb = self.on_done
        if cb is not None:
            cb()

    def _send(self, buffer: torch.Tensor, peer: int, tag: int, timeout: float) -> None:
        raise NotImplementedError

    def _recv(self, nbytes: int, peer: int, tag: int, timeout: float) -> torch.Tensor:
        raise NotImplementedError


class TorchKVConnector(KVConnector):
    """Point-to-point ``torch.distributed`` send/recv over a dedicated group (gloo on CPU, so
    KV bytes never share a queue with other collectives).

    Parameters
    ----------
    group : ProcessGroup
        A group holding every prefill and decode rank (``dist.new_group(backend="gloo")``).
    timeout_s : float
        Limit for each send and receive.
    """

    name = "torch"

    def __init__(self, group, timeout_s: float = 30.0):
        self.group = group
        super().__init__(timeout_s)

    def _send(self, buffer, peer, tag, timeout):
        import torch.distributed as dist

        work = dist.isend(buffer, peer, group=self.group, tag=tag)
        work.wait(timeout=datetime.timedelta(seconds=timeout))

    def _recv(self, nbytes, peer, tag, timeout):
        import torch.distributed as dist

        buf = torch.empty(nbytes, dtype=torch.uint8)
        work = dist.irecv(buf, peer, group=self.group, tag=tag)
        work.wait(timeout=datetime.timedelta(seconds=timeout))
        return buf


def make_connector(kind: str, group=None, timeout_s: float = 30.0, store=None,
                   rank: Optional[int] = None, **nixl_options) -> KVConnector:
    """The connector named ``kind``.

    ``"torch"`` needs ``group`` (a ``torch.distributed`` group of the worker ranks); ``"nixl"``
    needs ``store`` (a ``torch.distributed`` store shared by those ranks, for the agents'
    metadata and the per-transfer state) and this process's ``rank``; ``nixl_options`` go to
    :class:`disagg.kv.nixl.NixlKVConnector`.
    """
    if kind == "torch":
        if group is None:
            raise ValueError("the torch KV connector needs a torch.distributed group")
        return TorchKVConnector(group, timeout_s)
    if kind == "nixl":
        if store is None or rank is None:
            raise ValueError("the nixl KV connector needs a torch.distributed store and the rank")
        from .nixl import NixlKVConnector

        return NixlKVConnector(store, rank, timeout_s, **nixl_options)
    raise ValueError(f"unknown KV transport {kind!r} (choose torch or nixl)")
