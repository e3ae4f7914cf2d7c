"""``EPDispatcher``: expert-parallel dispatch and combine over a pluggable transport."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch
import torch.distributed as dist

from .. import ops
from .transport import EPTransport, LocalTransport, TorchDistributedTransport


@dataclass
class DispatchHandle:
    """What ``combine`` needs to send results back and weigh them."""

    dest: torch.Tensor  # [T*k] compact row of each local assignment (-1 dropped)
    weights: torch.Tensor  # [T, k]
    send_splits: List[int]
    recv_splits: List[int]
    unsort: torch.Tensor  # [N_recv] row in expert order of each received row (source order)
    num_tokens: int


def expert_range(rank: int, world_size: int, num_experts: int) -> range:
    """Experts owned by ``rank``: a contiguous, balanced split (as ``moe_layout`` uses)."""
    return range(rank * num_experts // world_size, (rank + 1) * num_experts // world_size)


class EPDispatcher:
    """Sends each token to the ranks owning its experts, and brings the results back.

    Parameters
    ----------
    num_experts : int
        Global number of experts, split contiguously over the ranks of the group.
    group : ProcessGroup, optional
        The expert-parallel group (default: the world when torch.distributed is initialized,
        otherwise a single local rank).
    transport : "torch", "local", "nvshmem" or an :class:`EPTransport`
        How rows move. ``"torch"`` uses ``torch.distributed.all_to_all_single``; ``"nvshmem"``
        puts rows into the peers' GPU buffers (:class:`~disagg.moe.nvshmem.NvshmemTransport`,
        needs a CUDA build with ``DISAGG_NVSHMEM=ON`` and ``transport_options``).
    transport_options : dict, optional
        Keyword arguments of the ``"nvshmem"`` transport: ``max_tokens`` and ``hidden``
        (required), ``top_k``, ``dtype``, ``fp8_dispatch``.

    Examples
    --------
    >>> disp = EPDispatcher(num_experts=8)          # one process: local transport
    >>> x = torch.randn(16, 32); r = disagg.ops.route(torch.randn(16, 8), 2)
    >>> recv, per_expert, handle = disp.dispatch(x, r.ids, r.weights)
    >>> out = disp.combine(recv, handle)             # == x * r.weights.sum(1, keepdim=True)
    """

    def __init__(self, num_experts: int, group: Optional[dist.ProcessGroup] = None,
                 transport: Union[str, EPTransport] = "torch",
                 transport_options: Optional[dict] = None):
        if isinstance(transport, str):
            if transport not in ("torch", "local", "nvshmem"):
                raise ValueError("transport must be 'torch', 'local', 'nvshmem' or an EPTransport, "
                                 f"got {transport!r}")
            if transport == "nvshmem":
                from .nvshmem import NvshmemTransport

                opts = dict(transport_options or {})
                if "max_tokens" not in opts or "hidden" not in opts:
                    raise ValueError("transport='nvshmem' needs transport_options with max_tokens "
                                     "and hidden (they size the symmetric receive buffers)")
                transport = NvshmemTransport(group=group, **opts)
            elif transport == "local" or not dist.is_initialized():
                transport = LocalTransport()
            else:
                transport = TorchDistributedTransport(group)
        self.transport = transport
        self.rank, self.world_size = transport.rank, transport.world_size
        if num_experts < self.world_size:
            raise ValueError(f"num_experts={num_experts} must be >= the EP world size {self.world_size}")
        self.num_experts = num_experts
        self.local_experts = expert_range(self.rank, self.world_size, num_experts)
        self._max_local = max(len(expert_range(r, self.world_size, num_experts))
                              for r in range(self.world_size))

    def dispatch(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        """Send tokens ``x [T, H]`` to the owners of ``ids [T, k]`` (−1 = dropped).

        Returns ``(recv_x, tokens_per_local_expert, handle)``: ``recv_x [N, H]`` holds the rows
        this rank's experts must process, grouped by local expert (expert ``i`` owns rows
        ``offsets[i]:offsets[i+1]`` with ``offsets = cumsum(tokens_per_local_expert)``).
        """
        if x.dim() != 2 or ids.dim() != 2 or ids.shape[0] != x.shape[0]:
            raise ValueError(f"x must be [T, H] and ids [T, k] with the same T, got {tuple(x.shape)} "
                             f"and {tuple(ids.shape)}")
        if weights.shape != ids.shape:
            raise ValueError(f"weights must have the shape of ids {tuple(ids.shape)}, got {tuple(weights.shape)}")
        T, k = ids.shape
        R, E = self.world_size, self.num_experts
        lay = ops.moe_layout(ids, E, ep_size=R)
        eoff = lay.expert_offsets.tolist()
        n = eoff[-1]
        send = ops.moe_permute(x, lay.src[:n], k)
        # counts per (destination rank, its local expert), padded to the largest expert share
        counts = torch.tensor(eoff[1:]) - torch.tensor(eoff[:-1])
        send_counts = torch.zeros(R, self._max_local, dtype=torch.long)
        for r in range(R):
            er = expert_range(r, R, E)
            send_counts[r, :len(er)] = counts[er.start:er.stop]
        recv_counts = self.transport.exchange_counts(send_counts)  # [R src, local experts]
        L = len(self.local_experts)
        recv_counts = recv_counts[:, :L]
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        # a transport may send the dispatch direction differently (NVSHMEM: optional FP8 rows)
        move = getattr(self.transport, "all_to_all_dispatch", self.transport.all_to_all)
        recv = move(send, send_splits, recv_splits)
        # Received rows are grouped by source rank, then local expert; regroup by local expert.
        src_start = torch.cumsum(recv_counts.reshape(-1), 0) - recv_counts.reshape(-1)
        src_start = src_start.view(R, L)
        per_expert = recv_counts.sum(0)
        order = [torch.arange(int(src_start[s, e]), int(src_start[s, e] + recv_counts[s, e]))
                 for e in range(L) for s in range(R)]
        gather = torch.cat(order) if order else torch.zeros(0, dtype=torch.long)
        gather = gather.to(torch.int32)
        unsort = torch.empty_like(gather)
        unsort[gather.long()] = torch.arange(gather.numel(), dtype=torch.int32)
        gather, unsort = gather.to(recv.device), unsort.to(recv.device)  # GPU transports
        recv_x = ops.moe_permute(recv, gather, 1)
        handle = DispatchHandle(lay.dest, weights, send_splits, recv_splits, unsort, T)
        return recv_x, per_expert, handle

    def combine(self, y: torch.Tensor, handle: DispatchHandle,
                out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Send expert outputs ``y`` (rows as returned by ``dispatch``) back and return the
        weighted sum per token, ``[T, H]``, accumulated in float32."""
        if y.dim() != 2 or y.shape[0] != handle.unsort.numel():
            raise ValueError(f"y must be [{handle.unsort.numel()}, H] (the rows dispatch returned), "
                             f"got {tuple(y.shape)}")
        back = ops.moe_permute(y, handle.unsort, 1)  # expert order -> source order
        rows = self.transport.all_to_all(back, handle.recv_splits, handle.send_splits)
        return ops.moe_combine(rows, handle.dest, handle.weights, out_dtype=out_dtype)
