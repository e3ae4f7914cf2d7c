"""Transports that move expert-parallel tokens between ranks for ``EPDispatcher``.

A transport only moves bytes: exchanging per-expert counts and the variable-size all-to-all of
token rows. Layout, permutation and the weighted combine stay in ``EPDispatcher`` (and in the
ops it calls), so every transport gives the same results.
"""
from __future__ import annotations

from typing import List, Optional, Protocol

import torch
import torch.distributed as dist


class EPTransport(Protocol):
    rank: int
    world_size: int

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        """``send [R, n]`` int: row r goes to rank r. Returns ``[R, n]``: row s came from rank s."""

    def all_to_all(self, x: torch.Tensor, send_splits: List[int], recv_splits: List[int]) -> torch.Tensor:
        """Rows ``x[sum(send_splits[:r]) : ...]`` go to rank r; returns the received rows grouped
        by source rank."""


class LocalTransport:
    """One rank, no communication (the single-process case)."""

    rank, world_size = 0, 1

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        return send.clone()

    def all_to_all(self, x, send_splits, recv_splits):
        return x


class TorchDistributedTransport:
    """``torch.distributed`` all-to-all (gloo on CPU, NCCL on GPU) over a process group.

    Counts travel first so that every rank knows its receive sizes; the payload then moves in
    one ``all_to_all_single`` with uneven splits. Byte counts are kept for reporting.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        if not dist.is_initialized():
            raise RuntimeError("TorchDistributedTransport needs torch.distributed to be initialized "
                               "(e.g. launch with torchrun and call init_process_group)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.bytes_sent = 0
        self.bytes_received = 0

    def exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        send = send.contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        return recv

    def all_to_all(self, x, send_splits, recv_splits):
        x = x.contiguous()
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x, output_split_sizes=list(recv_splits),
                               input_split_sizes=list(send_splits), group=self.group)
        row = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
        self.bytes_sent += (sum(send_splits) - send_splits[self.rank]) * row
        self.bytes_received += (sum(recv_splits) - recv_splits[self.rank]) * row
        return out
