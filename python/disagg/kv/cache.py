"""The paged KV cache manager: per-layer caches, a reference-counted block allocator and one
block table per request (copy-on-write ready for prefix sharing and forks)."""
from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Hashable, Optional, Sequence, Union

import torch

_LayerRange = Union[None, int, Sequence[int], range]


class OutOfBlocksError(RuntimeError):
    """Not enough free blocks for an allocation; the cache is left unchanged.

    A scheduler catches this to preempt, queue or swap out requests instead of crashing.

    Attributes
    ----------
    needed : int
        Free blocks the operation required.
    free : int
        Free blocks there were.
    """

    def __init__(self, needed: int, free: int, what: str = "allocation"):
        super().__init__(f"out of KV cache blocks: {what} needs {needed} free block(s), {free} free")
        self.needed = needed
        self.free = free


@dataclass
class _Request:
    blocks: list = field(default_factory=list)  # physical block ids in token order
    num_tokens: int = 0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class PagedKVCache:
    """Paged KV cache for one model: ``num_layers`` caches of ``num_blocks`` blocks each.

    A block holds the keys and values of ``block_size`` consecutive tokens of one request for
    every KV head. Blocks are reference counted so that a request can share another's blocks
    (``fork``, prefix sharing); the first write into a shared, partially filled block copies it
    (copy-on-write) so the other owners never see the change.

    Parameters
    ----------
    num_layers, num_blocks, block_size, num_kv_heads, head_dim : int
        Cache geometry; every layer has the same number of blocks and the same block ids.
    dtype : torch.dtype
        Storage dtype (float32, bfloat16 or float16).
    device : str or torch.device
    layout : {"NHD", "HND"}
        ``NHD``: each layer is ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``;
        ``HND``: ``[num_blocks, 2, num_kv_heads, block_size, head_dim]``. Index 0 of dim 1 is
        K, index 1 is V.

    Attributes
    ----------
    caches : list of Tensor
        One tensor per layer, in the layout above; the ops (``kv_pack`` etc.) and the attention
        read and write them directly.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.float32,
                 device: Union[str, torch.device] = "cpu", layout: str = "NHD"):
        for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks),
                        ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PagedKVCache: {name} must be a positive int, got {v!r}")
        if layout not in ("NHD", "HND"):
            raise ValueError(f"PagedKVCache: layout must be 'NHD' or 'HND', got {layout!r}")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.layout = layout
        if layout == "NHD":
            shape = (num_blocks, 2, block_size, num_kv_heads, head_dim)
        else:
            shape = (num_blocks, 2, num_kv_heads, block_size, head_dim)
        # zero-filled so that a read of a never-written slot is deterministic
        self.caches: list[torch.Tensor] = [
            torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        self._refcount = [0] * num_blocks
        # a min-heap keeps allocations low and dense, which keeps block tables near-contiguous
        self._free: list[int] = list(range(num_blocks))
        self._reqs: dict[Hashable, _Request] = {}

    # ---- queries -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks not owned by any request."""
        return len(self._free)

    def has(self, req_id: Hashable) -> bool:
        """Whether ``req_id`` holds an allocation."""
        return req_id in self._reqs

    def num_tokens(self, req_id: Hashable) -> int:
        """Tokens currently stored for ``req_id``."""
        return self._get(req_id).num_tokens

    def request_ids(self) -> list:
        """Ids of all requests holding an allocation."""
        return list(self._reqs)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks a request of ``num_tokens`` tokens occupies."""
        return _ceil_div(max(0, num_tokens), self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether ``allocate(_, num_tokens)`` would succeed now."""
        return self.blocks_needed(num_tokens) <= len(self._free)

    def can_append(self, req_id: Hashable, num_tokens: int = 1) -> bool:
        """Whether ``append(req_id, num_tokens)`` would succeed now."""
        return self._append_need(self._get(req_id), num_tokens) <= len(self._free)

    def block_table(self, req_id: Hashable) -> torch.Tensor:
        """The request's physical block ids in token order, int32 ``[num_blocks_of_request]``."""
        return torch.tensor(self._get(req_id).blocks, dtype=torch.int32, device=self.device)

    def block_ids(self, req_id: Hashable) -> list:
        """The request's block ids as a Python list (a copy)."""
        return list(self._get(req_id).blocks)

    def block_ids_view(self, req_id: Hashable) -> list:
        """The request's block ids without a copy: read it, never change it, and read it
        again after the next ``append``/``free`` (the engine's per-step hot path)."""
        return self._get(req_id).blocks

    def slot_mapping(self, req_id: Hashable, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
        """Flat slots ``block * block_size + offset`` of token positions ``[start, end)``.

        Returns int64 ``[end - start]``; ``end`` defaults to the request's token count.
        """
        r = self._get(req_id)
        end = r.num_tokens if end is None else end
        if not 0 <= start <= end <= r.num_tokens:
            raise IndexError(f"PagedKVCache.slot_mapping: need 0 <= start <= end <= num_tokens="
                             f"{r.num_tokens}, got start={start}, end={end}")
        pos = torch.arange(start, end, dtype=torch.int64)
        table = torch.tensor(r.blocks, dtype=torch.int64)
        slots = table[pos // self.block_size] * self.block_size + pos % self.block_size
        return slots.to(self.device)

    # ---- allocation --------------------------------------------------------------------------

    def allocate(self, req_id: Hashable, num_tokens: int) -> None:
        """Register a new request holding ``num_tokens`` tokens.

        Raises
        ------
        OutOfBlocksError
            Fewer than ``ceil(num_tokens / block_size)`` free blocks (nothing changes).
        ValueError
            ``req_id`` already exists or ``num_tokens < 0``.
        """
        if req_id in self._reqs:
            raise ValueError(f"PagedKVCache.allocate: request {req_id!r} already exists")
        if num_tokens < 0:
            raise ValueError(f"PagedKVCache.allocate: num_tokens must be >= 0, got {num_tokens}")
        need = self.blocks_needed(num_tokens)
        if need > len(self._free):
            raise OutOfBlocksError(need, len(self._free), f"allocate({req_id!r}, {num_tokens})")
        self._reqs[req_id] = _Request(self._take(need), num_tokens)

    def append(self, req_id: Hashable, num_tokens: int = 1) -> None:
        """Grow a request by ``num_tokens`` positions (to be written by the caller).

        New blocks are taken as needed; if the last block is shared and only partly filled it
        is first copied (copy-on-write), because the new tokens land in it.

        Raises
        ------
        OutOfBlocksError
            Not enough free blocks (nothing changes).
        """
        r = self._get(req_id)
        if num_tokens < 0:
            raise ValueError(f"PagedKVCache.append: num_tokens must be >= 0, got {num_tokens}")
        # Decode's common case: the tokens fit the partly filled, unshared last block.
        fill = r.num_tokens % self.block_size
        if fill and fill + num_tokens <= self.block_size and self._refcount[r.blocks[-1]] == 1:
            r.num_tokens += num_tokens
            return
        need = self._append_need(r, num_tokens)
        if need > len(self._free):
            raise OutOfBlocksError(need, len(self._free), f"append({req_id!r}, {num_tokens})")
        if num_tokens == 0:
            return
        if r.num_tokens % self.block_size and self._refcount[r.blocks[-1]] > 1:
            self._cow(r, len(r.blocks) - 1)
        total = r.num_tokens + num_tokens
        r.blocks.extend(self._take(self.blocks_needed(total) - len(r.blocks)))
        r.num_tokens = total

    def truncate(self, req_id: Hashable, num_tokens: int) -> None:
        """Shrink a request to its first ``num_tokens`` tokens (speculative rollback), returning
        blocks it no longer uses. The kept tokens' data is untouched."""
        r = self._get(req_id)
        if not 0 <= num_tokens <= r.num_tokens:
            raise ValueError(f"PagedKVCache.truncate: num_tokens must be in [0, {r.num_tokens}], "
                             f"got {num_tokens}")
        keep = self.blocks_needed(num_tokens)
        self._release(r.blocks[keep:])
        del r.blocks[keep:]
        r.num_tokens = num_tokens

    def free(self, req_id: Hashable) -> None:
        """Release a request: every block it holds loses one reference (shared blocks stay
        with their other owners)."""
        r = self._get(req_id)
        self._release(r.blocks)
        del self._reqs[req_id]

    def fork(self, src_id: Hashable, dst_id: Hashable) -> None:
        """Make ``dst_id`` a new request sharing all of ``src_id``'s blocks (no copy); a later
        write through either one into a shared block copies it first."""
        r = self._get(src_id)
        if dst_id in self._reqs:
            raise ValueError(f"PagedKVCache.fork: request {dst_id!r} already exists")
        for b in r.blocks:
            self._refcount[b] += 1
        self._reqs[dst_id] = _Request(list(r.blocks), r.num_tokens)

    def make_writable(self, req_id: Hashable, start: int = 0, end: Optional[int] = None) -> None:
        """Copy-on-write every shared block covering token positions ``[start, end)``, so the
        caller may overwrite them (e.g. before ``kv_compact`` or ``unpack``).

        Raises
        ------
        OutOfBlocksError
            Not enough free blocks for the copies (nothing changes).
        """
        r = self._get(req_id)
        end = r.num_tokens if end is None else end
        if not 0 <= start <= end <= r.num_tokens:
            raise IndexError(f"PagedKVCache.make_writable: need 0 <= start <= end <= "
                             f"{r.num_tokens}, got [{start}, {end})")
        if start == end:
            return
        idx = [i for i in range(start // self.block_size, self.blocks_needed(end))
               if self._refcount[r.blocks[i]] > 1]
        if len(idx) > len(self._free):
            raise OutOfBlocksError(len(idx), len(self._free), f"make_writable({req_id!r})")
        for i in idx:
            self._cow(r, i)

    # ---- data access -------------------------------------------------------------------------

    def write(self, layer: int, req_id: Hashable, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k, v [n, num_kv_heads, head_dim]`` at positions ``[start, start + n)`` of a
        request in one layer (positions must already be allocated; shared blocks are copied
        first)."""
        n = k.shape[0]
        self.make_writable(req_id, start, start + n)
        blk, off = self._positions(req_id, start, start + n)
        c = self.caches[layer]
        if self.layout == "NHD":
            c[blk, 0, off] = k.to(c.dtype)
            c[blk, 1, off] = v.to(c.dtype)
        else:
            c[blk, 0, :, off] = k.to(c.dtype)  # mixed indexing puts [n] first
            c[blk, 1, :, off] = v.to(c.dtype)

    def gather(self, layer: int, req_id: Hashable, start: int = 0, end: Optional[int] = None):
        """Keys and values of positions ``[start, end)`` of a request in one layer, each
        ``[n, num_kv_heads, head_dim]`` (a copy)."""
        end = self.num_tokens(req_id) if end is None else end
        blk, off = self._positions(req_id, start, end)
        c = self.caches[layer]
        if self.layout == "NHD":
            return c[blk, 0, off], c[blk, 1, off]
        return c[blk, 0, :, off], c[blk, 1, :, off]

    def pack(self, req_id: Hashable, layers: _LayerRange = None, heads: Optional[Sequence[int]] = None,
             quant: str = "none", out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pack a request's KV into one self-describing uint8 buffer (see ``disagg.ops.kv_pack``).

        Parameters
        ----------
        layers : None, int, (start, end) or range
            Layers to pack (default: all).
        heads : None or (start, end)
            KV heads to pack (default: all).
        quant : {"none", "int8", "fp8_e4m3"}
        out : Tensor, optional
            A uint8 buffer to pack into (e.g. memory registered with a transfer engine); the
            packed bytes are ``out[:n]``, which is returned. Without it a new tensor is returned.
        """
        from .. import ops

        l0, l1 = self._layer_range(layers)
        h0, h1 = (0, self.num_kv_heads) if heads is None else (int(heads[0]), int(heads[1]))
        kw = dict(layer_start=l0, layer_end=l1, head_start=h0, head_end=h1, quant=quant,
                  layout=self.layout)
        if out is not None:
            n = ops.kv_pack_into(self.caches, self.block_table(req_id), self.num_tokens(req_id),
                                 out, **kw)
            return out[:n]
        return ops.kv_pack(self.caches, self.block_table(req_id), self.num_tokens(req_id), **kw)

    def pack_nbytes(self, req_id: Hashable, layers: _LayerRange = None,
                    heads: Optional[Sequence[int]] = None, quant: str = "none") -> int:
        """Size of the buffer ``pack`` would produce with these arguments."""
        from .. import ops

        l0, l1 = self._layer_range(layers)
        h0, h1 = (0, self.num_kv_heads) if heads is None else (int(heads[0]), int(heads[1]))
        return ops.kv_pack_nbytes(l1 - l0, self.num_tokens(req_id), h1 - h0, self.head_dim,
                                  self.dtype, quant, self.block_size)

    def unpack(self, req_id: Hashable, buffer: torch.Tensor, layer_start: Optional[int] = None,
               head_start: int = 0) -> None:
        """Write a buffer from ``pack`` (possibly from a cache of another block size, dtype,
        layout or head count) into a request, allocating or growing it as needed.

        Parameters
        ----------
        layer_start : int, optional
            First destination layer; defaults to the sender's first layer (from the header).
        head_start : int
            First destination KV head of the buffer's head slice.

        Raises
        ------
        OutOfBlocksError
            Not enough blocks to hold the buffer's tokens (nothing changes).
        """
        from .. import ops

        info = ops.kv_buffer_info(buffer)
        if layer_start is None:
            layer_start = info.layer_start
        if self.has(req_id):
            r = self._reqs[req_id]
            extra = max(0, info.num_tokens - r.num_tokens)
            grow = max(0, self.blocks_needed(info.num_tokens) - len(r.blocks))
            # shared blocks among those the buffer overwrites (append's own copy of a shared
            # last block is one of them)
            cow = sum(1 for b in r.blocks[:self.blocks_needed(info.num_tokens)]
                      if self._refcount[b] > 1)
            if grow + cow > len(self._free):
                raise OutOfBlocksError(grow + cow, len(self._free), f"unpack({req_id!r})")
            self.append(req_id, extra)
            self.make_writable(req_id, 0, info.num_tokens)
        else:
            self.allocate(req_id, info.num_tokens)
        ops.kv_unpack(buffer, self.caches, self.block_table(req_id), layer_start=layer_start,
                      head_start=head_start, layout=self.layout)

    def compact(self, req_id: Hashable, src_positions: Union[torch.Tensor, Sequence[int]],
                dst_start: int, truncate: bool = True) -> None:
        """Move the KV of positions ``src_positions`` to ``dst_start, dst_start + 1, ...`` in
        every layer (accepted speculative tokens), then optionally truncate the request to
        ``dst_start + len(src_positions)`` tokens."""
        from .. import ops

        src = torch.as_tensor(src_positions, dtype=torch.int64)
        n = int(src.numel())
        r = self._get(req_id)
        if n and (int(src.min()) < 0 or int(src.max()) >= r.num_tokens):
            raise IndexError(f"PagedKVCache.compact: src_positions must be in [0, {r.num_tokens})")
        self.make_writable(req_id, dst_start, dst_start + n)
        ops.kv_compact(self.caches, self.block_table(req_id), src.to(self.device), dst_start,
                       layout=self.layout)
        if truncate:
            self.truncate(req_id, dst_start + n)

    # ---- debugging ---------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Verify the allocator's bookkeeping; raises AssertionError naming what is broken.

        Checked: each request holds exactly ``ceil(num_tokens / block_size)`` distinct, valid
        blocks; every block's reference count equals the number of requests holding it; the
        free list holds exactly the blocks with count 0, each once (none lost, none owned and
        free at once).
        """
        owners = [0] * self.num_blocks
        for rid, r in self._reqs.items():
            assert r.num_tokens >= 0, f"request {rid!r}: negative num_tokens {r.num_tokens}"
            assert len(r.blocks) == self.blocks_needed(r.num_tokens), (
                f"request {rid!r}: holds {len(r.blocks)} blocks for {r.num_tokens} tokens "
                f"(block_size {self.block_size})")
            assert len(set(r.blocks)) == len(r.blocks), f"request {rid!r}: a block appears twice"
            for b in r.blocks:
                assert 0 <= b < self.num_blocks, f"request {rid!r}: block id {b} out of range"
                owners[b] += 1
        for b in range(self.num_blocks):
            assert self._refcount[b] == owners[b], (
                f"block {b}: refcount {self._refcount[b]} but held by {owners[b]} request(s)")
        assert len(set(self._free)) == len(self._free), "free list: a block appears twice"
        free = set(self._free)
        for b in range(self.num_blocks):
            if owners[b] == 0:
                assert b in free, f"block {b}: lost (no owner and not free)"
            else:
                assert b not in free, f"block {b}: both owned and free"
        assert len(self._free) + sum(1 for c in owners if c) == self.num_blocks, "block count"

    def stats(self) -> dict:
        """Occupancy and fragmentation, for debugging and metrics.

        Returns
        -------
        dict with ``num_blocks``, ``free_blocks``, ``used_blocks``, ``shared_blocks`` (held by
        more than one request), ``occupancy`` (used / total blocks), ``tokens`` (sum over
        requests), ``filled_slots`` (distinct token slots holding data), ``internal_fragmentation``
        (share of the used blocks' slots holding no token), ``free_runs`` and
        ``largest_free_run`` (contiguous free block ranges: paged attention does not need
        contiguity, but bulk transfers and defragmentation do), ``sharing_saved_blocks``
        (blocks a fork/prefix share saves) and ``requests`` (request id -> blocks held).
        """
        bs = self.block_size
        fill = {}
        for r in self._reqs.values():
            for i, b in enumerate(r.blocks):
                f = min(bs, r.num_tokens - i * bs)
                fill[b] = max(fill.get(b, 0), f)
        used = len(fill)
        runs, largest, prev, run = 0, 0, None, 0
        for b in sorted(self._free):
            run = run + 1 if prev is not None and b == prev + 1 else 1
            runs += run == 1
            largest = max(largest, run)
            prev = b
        held = sum(len(r.blocks) for r in self._reqs.values())
        return {
            "num_blocks": self.num_blocks,
            "block_size": bs,
            "free_blocks": len(self._free),
            "used_blocks": used,
            "shared_blocks": sum(1 for c in self._refcount if c > 1),
            "occupancy": used / self.num_blocks,
            "tokens": sum(r.num_tokens for r in self._reqs.values()),
            "filled_slots": sum(fill.values()),
            "internal_fragmentation": (1.0 - sum(fill.values()) / (used * bs)) if used else 0.0,
            "free_runs": runs,
            "largest_free_run": largest,
            "sharing_saved_blocks": held - used,
            "requests": {rid: len(r.blocks) for rid, r in self._reqs.items()},
        }

    def __repr__(self) -> str:
        return (f"PagedKVCache(layers={self.num_layers}, blocks={self.num_blocks}x{self.block_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"layout={self.layout}, free={len(self._free)}, requests={len(self._reqs)})")

    # ---- internals ---------------------------------------------------------------------------

    def _get(self, req_id: Hashable) -> _Request:
        try:
            return self._reqs[req_id]
        except KeyError:
            raise KeyError(f"PagedKVCache: unknown request {req_id!r}") from None

    def _append_need(self, r: _Request, num_tokens: int) -> int:
        if num_tokens <= 0:
            return 0
        need = self.blocks_needed(r.num_tokens + num_tokens) - len(r.blocks)
        if r.num_tokens % self.block_size and self._refcount[r.blocks[-1]] > 1:
            need += 1  # copy of the shared, partly filled last block
        return need

    def _take(self, n: int) -> list:
        out = [heapq.heappop(self._free) for _ in range(n)]
        for b in out:
            self._refcount[b] = 1
        return out

    def _release(self, blocks) -> None:
        for b in blocks:
            self._refcount[b] -= 1
            if self._refcount[b] == 0:
                heapq.heappush(self._free, b)

    def _cow(self, r: _Request, i: int) -> None:
        old = r.blocks[i]
        (new,) = self._take(1)
        for c in self.caches:
            c[new].copy_(c[old])
        self._refcount[old] -= 1  # still >= 1: it was shared
        r.blocks[i] = new

    def _positions(self, req_id: Hashable, start: int, end: int):
        r = self._get(req_id)
        if not 0 <= start <= end <= r.num_tokens:
            raise IndexError(f"PagedKVCache: positions [{start}, {end}) outside the request's "
                             f"{r.num_tokens} tokens")
        pos = torch.arange(start, end, dtype=torch.int64, device=self.device)
        table = torch.tensor(r.blocks, dtype=torch.int64, device=self.device)
        return table[pos // self.block_size], pos % self.block_size

    def _layer_range(self, layers: _LayerRange):
        if layers is None:
            return 0, self.num_layers
        if isinstance(layers, int):
            return layers, layers + 1
        if isinstance(layers, range):
            if layers.step != 1:
                raise ValueError("PagedKVCache: layer ranges must be contiguous")
            return layers.start, layers.stop
        return int(layers[0]), int(layers[1])
