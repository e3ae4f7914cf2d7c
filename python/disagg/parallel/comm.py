"""Accounted collectives: every byte a parallel layout moves goes through here, so the layout
report can say per step what each collective moved and how long the rank waited on it; a
watchdog ends the process when one collective outlives the configured timeout."""
from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict
from typing import List, Optional

import torch
import torch.distributed as dist


class CollectiveTimeout(RuntimeError):
    pass


class Comm:
    """Wrappers over ``torch.distributed`` that count bytes and seconds per (kind, tag).

    Bytes are the payload this rank hands to the collective: the tensor for an all-reduce or
    broadcast, its own contribution for an all-gather, all rows it sends for an all-to-all
    (its own share included, so the count is exactly tokens x hidden x top-k), the tensor for a
    send or recv. Groups of one rank are skipped and count nothing.

    Parameters
    ----------
    timeout_s : float
        A collective still running after this long makes the watchdog print which one and on
        which rank, then exit the process (status 3): peers then fail fast on a closed
        connection instead of waiting on a rank that will never answer.
    """

    def __init__(self, timeout_s: float = 60.0):
        self.timeout_s = timeout_s
        self.stats = defaultdict(lambda: [0, 0, 0.0])  # (kind, tag) -> [calls, bytes, seconds]
        self._inflight: Optional[tuple] = None
        self._lock = threading.Lock()
        self._watchdog: Optional[threading.Thread] = None
        self._stop = threading.Event()

    # ---- watchdog ---------------------------------------------------------------------------

    def start_watchdog(self) -> None:
        if self._watchdog is None and self.timeout_s > 0:
            self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                              name="disagg-comm-watchdog")
            self._watchdog.start()

    def stop_watchdog(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            with self._lock:
                cur = self._inflight
            if cur is not None and time.monotonic() - cur[2] > self.timeout_s:
                rank = dist.get_rank() if dist.is_initialized() else 0
                print(f"[disagg.parallel] rank {rank}: collective {cur[0]} ({cur[1]}) did not "
                      f"complete within {self.timeout_s:.0f} s: a peer rank died or hangs; "
                      f"exiting", file=sys.stderr, flush=True)
                os._exit(3)

    # ---- accounting -------------------------------------------------------------------------

    def _run(self, kind: str, tag: str, nbytes: int, fn):
        t0 = time.monotonic()
        with self._lock:
            self._inflight = (kind, tag, t0)
        try:
            out = fn()
        except Exception as e:
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise CollectiveTimeout(f"rank {rank}: collective {kind} ({tag}) failed after "
                                    f"{time.monotonic() - t0:.1f} s: {e}") from e
        finally:
            with self._lock:
                self._inflight = None
        s = self.stats[(kind, tag)]
        s[0] += 1
        s[1] += nbytes
        s[2] += time.monotonic() - t0
        return out

    def reset(self) -> None:
        self.stats.clear()

    def snapshot(self) -> dict:
        return {k: list(v) for k, v in self.stats.items()}

    def totals(self) -> dict:
        """``{kind: {"calls", "bytes", "seconds"}}`` summed over tags, plus ``"all"``."""
        out = {}
        for (kind, _), (c, b, t) in self.stats.items():
            for key in (kind, "all"):
                d = out.setdefault(key, {"calls": 0, "bytes": 0, "seconds": 0.0})
                d["calls"] += c
                d["bytes"] += b
                d["seconds"] += t
        return out

    # ---- collectives ------------------------------------------------------------------------

    @staticmethod
    def _size(group) -> int:
        return 1 if group is None else dist.get_world_size(group)

    def all_reduce(self, t: torch.Tensor, group, tag: str, op=dist.ReduceOp.SUM) -> torch.Tensor:
        # Every rank of a group holds the same shape, so all of them skip an empty tensor.
        if group is None or t.numel() == 0 or self._size(group) == 1:
            return t
        self._run("all_reduce", tag, t.numel() * t.element_size(),
                  lambda: dist.all_reduce(t, op=op, group=group))
        return t

    def all_gather_rows(self, t: torch.Tensor, counts: List[int], group, tag: str) -> torch.Tensor:
        """Concatenate each rank's ``t [counts[r], ...]`` in rank order (padded internally:
        gloo's all-gather needs equal sizes)."""
        n = len(counts)
        m = max(counts)
        if group is None or n == 1 or m == 0:
            return t
        pad = t.new_zeros((m,) + tuple(t.shape[1:]))
        pad[:t.shape[0]] = t
        parts = [torch.empty_like(pad) for _ in range(n)]
        self._run("all_gather", tag, pad.numel() * pad.element_size(),
                  lambda: dist.all_gather(parts, pad, group=group))
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, group,
                   tag: str) -> torch.Tensor:
        row = inp[0].numel() * inp.element_size() if inp.shape[0] else 0
        self._run("all_to_all", tag, sum(in_splits) * row if in_splits is not None
                  else inp.numel() * inp.element_size(),
                  lambda: dist.all_to_all_single(out, inp, output_split_sizes=out_splits,
                                                 input_split_sizes=in_splits, group=group))
        return out

    def broadcast(self, t: torch.Tensor, src: int, group, tag: str) -> torch.Tensor:
        if group is None or self._size(group) == 1:
            return t
        self._run("broadcast", tag, t.numel() * t.element_size(),
                  lambda: dist.broadcast(t, src=src, group=group))
        return t

    # Point-to-point: both sides know the row count (same schedule), so empty tensors are
    # skipped on both.
    def send(self, t: torch.Tensor, dst: int, tag: str) -> None:
        t = t.contiguous()
        if t.numel():
            self._run("send", tag, t.numel() * t.element_size(), lambda: dist.send(t, dst=dst))

    def isend(self, t: torch.Tensor, dst: int, tag: str):
        """Start a send; pass the handle to :meth:`wait` (bytes count now, seconds there)."""
        t = t.contiguous()
        if not t.numel():
            return None
        self.stats[("send", tag)][1] += t.numel() * t.element_size()
        return dist.isend(t, dst=dst), t

    def wait(self, handle, tag: str) -> None:
        if handle is not None:
            self._run("send", tag, 0, handle[0].wait)

    def recv(self, t: torch.Tensor, src: int, tag: str) -> torch.Tensor:
        if t.numel():
            self._run("recv", tag, t.numel() * t.element_size(), lambda: dist.recv(t, src=src))
        return t

    def gather_object(self, obj, tag: str = "results"):
        """Every rank's ``obj`` on global rank 0 (``None`` elsewhere)."""
        world = dist.get_world_size()
        out = [None] * world if dist.get_rank() == 0 else None
        self._run("gather_object", tag, 0, lambda: dist.gather_object(obj, out, dst=0))
        return out


class CountingTransport:
    """An ``EPTransport`` for :class:`disagg.moe.EPDispatcher` whose all-to-alls go through
    :class:`Comm` (so expert-parallel bytes show up in the layout report)."""

    def __init__(self, comm: Comm, group, tag: str = "ep"):
        self.comm, self.group, self.tag = comm, group, tag
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        send = send.contiguous()
        recv = torch.empty_like(send)
        self.comm._run("all_to_all", self.tag + ".counts", send.numel() * send.element_size(),
                       lambda: dist.all_to_all_single(recv, send, group=self.group))
        return recv

    def all_to_all(self, x, send_splits, recv_splits):
        x = x.contiguous()
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        return self.comm.all_to_all(out, x, list(recv_splits), list(send_splits), self.group,
                                    self.tag)
