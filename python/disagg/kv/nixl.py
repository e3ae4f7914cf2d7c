"""The ``nixl`` KV transport: one NIXL agent (UCX backend) per rank; the sender WRITEs its
``kv_pack`` buffer straight into memory the receiver registered.

Protocol for one transfer (key ``"{src}>{dst}#{tag}"``)
------------------------------------------------------
1. Start-up: every rank publishes its agent metadata (NIXL's own byte format, never pickle) in
   the ``torch.distributed`` store; peers load it on first use. A rank's receive arena is
   registered on its first receive and grows by segments, each published as partial metadata
   under a version number.
2. The receiver takes a slot of ``nbytes`` from its arena, marks the transfer ``posted`` in the
   store (``compare_set``) and sends the sender a NIXL notification holding the slot's
   descriptor as JSON (address, length, device, arena version).
3. The sender claims the transfer (``posted`` -> ``writing``), WRITEs its buffer with a
   completion notification, and waits for ``DONE``.
4. The receiver wakes on that notification and returns the slot as a tensor; the slot goes back
   to the arena when the last reference to that tensor dies (zero-copy for DRAM).

The per-transfer state key settles every race with one atomic ``compare_set``: a receiver that
times out cancels (``posted`` -> ``cancelled``) unless the sender already claimed, in which case
it waits for the write's outcome for one more timeout; a sender that times out before the
receiver posted marks the key ``abandoned``, and a late peer finds the tombstone, removes it and
fails at once instead of waiting out its own timeout.

Why an arena rather than registering each receive buffer: NIXL keeps every remote region it
was told about and matches later descriptors by (address, length), so per-transfer
registrations would grow the sender's tables forever and could reuse a stale remote key when an
allocation lands at an old address. The arena is registered once (and grows by whole segments,
published as partial metadata), so descriptors stay valid for the connector's life.

Waiting never blocks on the store (a blocking ``store.wait`` holds the client's lock and would
serialize all concurrent transfers): wake-ups are NIXL notifications, collected by one progress
thread together with the state of outstanding writes. Every wait has a deadline.
"""
from __future__ import annotations

import ctypes
import itertools
import json
import logging
import threading
import time
import weakref
from typing import Optional

import torch

from .connector import KVConnector

log = logging.getLogger(__name__)

_MAGIC = b"disagg-kv1|"
_ALIGN = 256


def _import_nixl():
    """The NIXL python API: ``nixl`` (meta package) or a CUDA-variant wheel (``nixl_cu13``...)."""
    import os

    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs every agent start at INFO
    errors = []
    for mod in ("nixl._api", "nixl_cu13", "nixl_cu12"):
        try:
            m = __import__(mod, fromlist=["nixl_agent"])
            return m.nixl_agent, m.nixl_agent_config, m.nixl_thread_sync_t
        except ImportError as e:
            errors.append(f"{mod}: {e}")
    raise ImportError("the nixl KV transport needs NIXL: pip install nixl-cu13 (or nixl-cu12); "
                      + "; ".join(errors))


def nixl_available() -> bool:
    try:
        _import_nixl()
        return True
    except ImportError:
        return False


class _Segment:
    def __init__(self, tensor: torch.Tensor, reg):
        self.tensor = tensor
        self.reg = reg
        self.free = [(0, tensor.numel())]  # sorted (offset, size)


class _Arena:
    """Registered receive memory in segments; first-fit slots; grows up to ``max_bytes``."""

    def __init__(self, agent, device: torch.device, segment_bytes: int, max_bytes: int,
                 on_grow):
        self.agent = agent
        self.device = device
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.on_grow = on_grow  # callback(version, partial metadata bytes): publish it
        self.cond = threading.Condition()
        self.segments: list = []  # none until the first receive: senders never allocate
        self.version = 0  # metadata version that covers every segment
        self.in_use = 0  # bytes in live slots
        self.quarantined = 0  # bytes never reused: a write into them may still be in flight

    @property
    def total(self) -> int:
        return sum(s.tensor.numel() for s in self.segments)

    def _add_segment(self, nbytes: int) -> None:
        t = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        reg = self.agent.register_memory(t)
        self.segments.append(_Segment(t, reg))
        # senders load this partial metadata (the new region's remote key) before writing
        self.on_grow(self.version + 1, self.agent.get_partial_agent_metadata(reg, False))
        self.version += 1

    def alloc(self, nbytes: int, deadline: float):
        """(segment index, offset, size) of a free slot; waits for one until ``deadline``."""
        size = -(-nbytes // _ALIGN) * _ALIGN
        if size > self.max_bytes:
            raise ValueError(f"a KV transfer of {nbytes} bytes exceeds the nixl receive arena "
                             f"limit ({self.max_bytes} bytes)")
        with self.cond:
            while True:
                for i, seg in enumerate(self.segments):
                    for j, (off, sz) in enumerate(seg.free):
                        if sz >= size:
                            seg.free[j] = (off + size, sz - size)
                            if sz == size:
                                del seg.free[j]
                            self.in_use += size
                            return i, off, size
                if self.total + max(size, self.segment_bytes) <= self.max_bytes:
                    self._add_segment(max(size, self.segment_bytes))
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"nixl receive arena full ({self.in_use} of "
                                       f"{self.total} bytes in use) for {nbytes} bytes")
                self.cond.wait(left)

    def release(self, seg_i: int, off: int, size: int) -> None:
        with self.cond:
            free = self.segments[seg_i].free
            free.append((off, size))
            free.sort()
            merged = [free[0]]
            for o, s in free[1:]:
                po, ps = merged[-1]
                if po + ps == o:
                    merged[-1] = (po, ps + s)
                else:
                    merged.append((o, s))
            self.segments[seg_i].free = merged
            self.in_use -= size
            self.cond.notify_all()

    def quarantine(self, size: int) -> None:
        with self.cond:
            self.in_use -= size
            self.quarantined += size

    def addr(self, seg_i: int, off: int) -> int:
        return self.segments[seg_i].tensor.data_ptr() + off

    def view(self, seg_i: int, off: int, nbytes: int, size: int) -> torch.Tensor:
        """The slot as a uint8 tensor; the slot returns to the arena when the tensor (and every
        view of it) is gone. CUDA slots are copied out at once (a device copy is cheap)."""
        seg = self.segments[seg_i]
        if seg.tensor.device.type != "cpu":
            out = seg.tensor[off:off + nbytes].clone()
            self.release(seg_i, off, size)
            return out
        raw = (ctypes.c_uint8 * nbytes).from_address(seg.tensor.data_ptr() + off)
        # the finalizer holds the segment tensor, so the memory outlives every view of it
        weakref.finalize(raw, _release_slot, self, seg.tensor, seg_i, off, size)
        return torch.frombuffer(raw, dtype=torch.uint8)

    def close(self) -> None:
        with self.cond:
            for seg in self.segments:
                try:
                    self.agent.deregister_memory(seg.reg)
                except Exception as e:  # the agent may already be torn down
                    log.warning("nixl: deregistering a receive segment failed: %s", e)


def _release_slot(arena: _Arena, _keepalive, seg_i, off, size) -> None:
    arena.release(seg_i, off, size)


class _Waiter:
    __slots__ = ("event", "value")

    def __init__(self):
        self.event = threading.Event()
        self.value = None


class NixlKVConnector(KVConnector):
    """KV transfers through NIXL (UCX backend): the receiver's arena is the WRITE target.

    Parameters
    ----------
    store : torch.distributed.Store
        Shared by every rank that transfers (the default store of the process group).
    rank : int
        This rank's id; ``peer`` arguments of :meth:`send` / :meth:`recv` are such ids.
    timeout_s : float
        Limit for each send and receive.
    device : str
        Where the receive arena lives (``"cpu"``, or ``"cuda"`` for VRAM on GPU hosts).
    arena_mb, max_arena_mb : int
        Size of an arena segment (a larger transfer gets a segment of its own size) and the
        most the arena may grow to (MiB).
    namespace : str
        Store key prefix; ranks of one server share it.
    """

    name = "nixl"

    def __init__(self, store, rank: int, timeout_s: float = 30.0, device: str = "cpu",
                 arena_mb: int = 64, max_arena_mb: int = 4096, namespace: str = "disagg-kv-nixl",
                 poll_s: float = 0.0005):
        import torch.distributed as dist

        nixl_agent, nixl_agent_config, sync_t = _import_nixl()
        if arena_mb <= 0 or max_arena_mb < arena_mb:
            raise ValueError(f"need 0 < arena_mb ({arena_mb}) <= max_arena_mb ({max_arena_mb})")
        self.rank = int(rank)
        self.store = dist.PrefixStore(namespace, store)
        self.poll_s = poll_s
        self.agent_name = f"{namespace}-{self.rank}"
        cfg = nixl_agent_config(backends=["UCX"], sync_mode=sync_t.NIXL_THREAD_SYNC_STRICT)
        self.agent = nixl_agent(self.agent_name, cfg)
        if "UCX" not in self.agent.backends:
            raise RuntimeError("nixl: the UCX backend is not available in this NIXL build")
        self._lock = threading.Lock()
        self._md_lock = threading.Lock()  # loading peer metadata
        self._peers: dict = {}  # rank -> (agent name, metadata version loaded)
        self._waiters: dict = {}  # (kind, key) -> _Waiter
        self._early: dict = {}  # (kind, key) -> (payload, arrival time): nobody waiting yet
        self._xfers: dict = {}  # id -> (handle, _Waiter)
        self._xfer_ids = itertools.count()
        self._wake = threading.Condition(self._lock)
        self._send_regs = 0  # send buffers registered right now
        self._stuck: list = []  # writes that could not be aborted (buffer, registration, handle)
        self._stopped = False
        self.arena = _Arena(self.agent, torch.device(device), arena_mb << 20, max_arena_mb << 20,
                            self._publish_segment)
        self.store.set(f"md/{self.rank}", self.agent.get_agent_metadata())
        self._progress = threading.Thread(target=self._progress_loop, daemon=True,
                                          name="kv-nixl-progress")
        self._progress.start()
        super().__init__(timeout_s)

    # ---- introspection (tests, metrics) --------------------------------------------------------

    def debug_state(self) -> dict:
        with self._lock:
            return {"arena_bytes": self.arena.total, "arena_in_use": self.arena.in_use,
                    "arena_quarantined": self.arena.quarantined,
                    "send_registrations": self._send_regs, "waiters": len(self._waiters),
                    "xfers": len(self._xfers), "early_notifs": len(self._early)}

    def close(self) -> None:
        super().close()
        with self._lock:
            self._stopped = True
            self._wake.notify_all()
        self._progress.join(timeout=5)
        self.arena.close()
        for name, _ in list(self._peers.values()):
            try:
                self.agent.remove_remote_agent(name)
            except Exception:
                pass

    # ---- metadata -------------------------------------------------------------------------------

    def _publish_segment(self, version: int, partial_md: bytes) -> None:
        self.store.set(f"md/{self.rank}/{version}", partial_md)

    def _store_get(self, key: str, deadline: float) -> bytes:
        # poll: a blocking store.wait would hold the store client's lock for every other thread
        delay = 0.001
        while not self.store.check([key]):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nixl: no {key!r} in the store before the deadline")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self.store.get(key)

    def _peer(self, rank: int, deadline: float, version: int = 0) -> str:
        """Name of ``rank``'s agent, with its metadata loaded up to arena ``version``."""
        with self._md_lock:
            return self._peer_locked(rank, deadline, version)

    def _peer_locked(self, rank: int, deadline: float, version: int) -> str:
        name, have = self._peers.get(rank, (None, -1))
        if name is None:
            name = self.agent.add_remote_agent(self._store_get(f"md/{rank}", deadline))
            name = name.decode() if isinstance(name, bytes) else name
            have = 0
        for v in range(have + 1, version + 1):
            self.agent.add_remote_agent(self._store_get(f"md/{rank}/{v}", deadline))
        self._peers[rank] = (name, max(have, version))
        return name

    # ---- notifications and write completion: one progress thread --------------------------------

    def _notify(self, peer_name: str, kind: str, key: str, **payload) -> None:
        msg = _MAGIC + json.dumps(dict(payload, kind=kind, key=key)).encode()
        self.agent.send_notif(peer_name, msg)

    def _progress_loop(self) -> None:
        idle = 0
        while True:
            with self._lock:
                while not self._stopped and not self._waiters and not self._xfers:
                    self._wake.wait(0.5)
                if self._stopped:
                    return
                xfers = bool(self._xfers)
            busy = False
            try:
                notifs = self.agent.get_new_notifs()
            except Exception as e:
                log.error("nixl: reading notifications failed: %s", e)
                notifs = {}
            for msgs in notifs.values():
                for m in msgs:
                    busy = True
                    self._deliver(m)
            if xfers:
                # under the lock: a sender that gave up removes its handle (under the lock)
                # before releasing it, so a released handle is never polled
                with self._lock:
                    for xid, (handle, w) in list(self._xfers.items()):
                        try:
                            st = self.agent.check_xfer_state(handle)
                        except Exception as e:
                            st = f"ERR ({e})"
                        if st != "PROC":
                            busy = True
                            del self._xfers[xid]
                            w.value = st
                            w.event.set()
            idle = 0 if busy else idle + 1
            # spin briefly after activity, then back off to at most 2 ms between polls
            time.sleep(self.poll_s if idle < 200 else 0.002)

    def _deliver(self, raw: bytes) -> None:
        if not raw.startswith(_MAGIC):
            log.warning("nixl: ignoring a foreign notification (%d bytes)", len(raw))
            return
        try:
            msg = json.loads(raw[len(_MAGIC):])
            k = (str(msg["kind"]), str(msg["key"]))
        except (ValueError, KeyError, TypeError) as e:
            log.warning("nixl: ignoring a malformed notification: %s", e)
            return
        with self._lock:
            w = self._waiters.pop(k, None)
            if w is None:
                now = time.monotonic()
                self._early[k] = (msg, now)
                # drop unclaimed notifications of transfers long settled
                old = [e for e, (_, t) in self._early.items() if now - t > 10 * self.timeout_s]
                for e in old:
                    del self._early[e]
                return
        w.value = msg
        w.event.set()

    def _wait_notif(self, kinds, key: str, deadline: float) -> Optional[dict]:
        """The first notification of one of ``kinds`` for ``key``, or None at the deadline."""
        w = _Waiter()
        with self._lock:
            for kind in kinds:
                hit = self._early.pop((kind, key), None)
                if hit is not None:
                    return hit[0]
            for kind in kinds:
                self._waiters[(kind, key)] = w
            self._wake.notify_all()
        try:
            w.event.wait(max(0.0, deadline - time.monotonic()))
            return w.value
        finally:
            with self._lock:
                for kind in kinds:
                    if self._waiters.get((kind, key)) is w:
                        del self._waiters[(kind, key)]

    def _wait_xfer(self, handle, deadline: float) -> str:
        w = _Waiter()
        with self._lock:
            xid = next(self._xfer_ids)
            self._xfers[xid] = (handle, w)
            self._wake.notify_all()
        w.event.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._xfers.pop(xid, None)
            return w.value or "TIMEOUT"

    # ---- the two sides --------------------------------------------------------------------------

    @staticmethod
    def _key(src: int, dst: int, tag: int) -> str:
        return f"{src}>{dst}#{tag}"

    def _recv(self, nbytes, peer, tag, timeout):
        deadline = time.monotonic() + timeout
        key = self._key(peer, self.rank, tag)
        state = f"st/{key}"
        peer_name = self._peer(peer, deadline)
        seg_i, off, size = self.arena.alloc(nbytes, deadline)
        handed_out = False
        try:
            got = self.store.compare_set(state, "", "posted")
            if got != b"posted":
                self.store.delete_key(state)  # the sender's tombstone
                raise TimeoutError(f"the sender gave up on {key} before it was posted "
                                   f"({got.decode(errors='replace')})")
            seg = self.arena.segments[seg_i]
            self._notify(peer_name, "post", key, addr=self.arena.addr(seg_i, off),
                         nbytes=int(nbytes), dev=max(seg.tensor.get_device(), 0),
                         mem="DRAM" if seg.tensor.device.type == "cpu" else "VRAM",
                         version=self.arena.version)
            msg = self._wait_notif(("done", "failed"), key, deadline)
            if msg is None:
                got = self.store.compare_set(state, "posted", "cancelled")
                if got == b"cancelled":  # the sender never claimed it: nothing can land
                    raise TimeoutError(f"KV receive {key} timed out after {timeout:.1f}s")
                # the sender is writing: its own deadline bounds the write; wait that long
                msg = self._wait_notif(("done", "failed"), key, time.monotonic() + timeout)
                if msg is None:
                    self.store.delete_key(state)
                    self.arena.quarantine(size)
                    size = 0
                    log.error("nixl: %s: no outcome from a claimed write; %d bytes of the "
                              "receive arena are retired", key, nbytes)
                    raise TimeoutError(f"KV receive {key}: the sender's write never finished")
            self.store.delete_key(state)
            if msg["kind"] != "done":
                if msg.get("in_flight"):  # a write that could not be aborted may still land
                    self.arena.quarantine(size)
                    size = 0
                raise RuntimeError(f"the sender's write for {key} failed: {msg.get('error')}")
            out = self.arena.view(seg_i, off, nbytes, size)
            handed_out = True
            return out
        finally:
            if not handed_out and size:
                self.arena.release(seg_i, off, size)

    def _send(self, buffer, peer, tag, timeout):
        deadline = time.monotonic() + timeout
        key = self._key(self.rank, peer, tag)
        state = f"st/{key}"
        peer_name = self._peer(peer, deadline)
        post = self._wait_notif(("post",), key, deadline)
        if post is None:
            got = self.store.compare_set(state, "", "abandoned")
            if got == b"abandoned":
                raise TimeoutError(f"KV send {key}: the receiver did not post within "
                                   f"{timeout:.1f}s")
            # posted just now: its notification is on the way
            post = self._wait_notif(("post",), key, time.monotonic() + min(timeout, 5.0))
            if post is None:
                raise TimeoutError(f"KV send {key}: posted but no descriptor arrived")
        got = self.store.compare_set(state, "posted", "writing")
        if got != b"writing":
            if got == b"cancelled":
                self.store.delete_key(state)  # the receiver's tombstone
            why = got.decode(errors="replace")
            raise TimeoutError(f"KV send {key}: the receiver gave up ({why})")
        info: dict = {}
        try:
            if int(post["nbytes"]) != buffer.numel():
                raise ValueError(f"KV send {key}: the receiver expects {post['nbytes']} bytes, "
                                 f"the buffer has {buffer.numel()}")
            self._peer(peer, deadline, int(post["version"]))
            self._write(buffer, peer_name, key, post, deadline, info)
        except BaseException as e:
            # tell the receiver at once instead of letting it wait out the write
            try:
                self.store.compare_set(state, "writing", "failed")
                self._notify(peer_name, "failed", key, error=f"{type(e).__name__}: {e}",
                             in_flight=bool(info.get("in_flight")))
            except Exception as e2:
                log.warning("nixl: could not report the failed write %s: %s", key, e2)
            raise

    def _write(self, buffer, peer_name, key, post, deadline, info: dict) -> None:
        """WRITE ``buffer`` into the posted slot; ``info["in_flight"]`` is set when a failed
        write could not be aborted (its registration is then kept, as UCX may still read it)."""
        reg = self.agent.register_memory(buffer)
        with self._lock:
            self._send_regs += 1
        handle = None
        try:
            local = self.agent.get_xfer_descs(buffer)
            remote = self.agent.get_xfer_descs(
                [(int(post["addr"]), int(post["nbytes"]), int(post["dev"]))], str(post["mem"]))
            done = _MAGIC + json.dumps({"kind": "done", "key": key}).encode()
            handle = self.agent.initialize_xfer("WRITE", local, remote, peer_name, done)
            st = self.agent.transfer(handle)
            if st == "PROC":
                st = self._wait_xfer(handle, deadline)
            if st != "DONE":
                raise RuntimeError(f"KV send {key}: NIXL write ended in {st}")
        finally:
            if handle is not None:
                try:
                    self.agent.release_xfer_handle(handle)  # aborts a write still in flight
                except Exception as e:
                    info["in_flight"] = True
                    log.error("nixl: the write of %s could not be aborted (%s); its buffer "
                              "stays registered", key, e)
            if info.get("in_flight"):
                self._stuck.append((buffer, reg, handle))  # keep the memory alive: never freed
            else:
                self.agent.deregister_memory(reg)
                with self._lock:
                    self._send_regs -= 1
