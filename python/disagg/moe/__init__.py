"""Mixture-of-Experts routing and expert-parallel dispatch."""
from .dispatcher import DispatchHandle, EPDispatcher, expert_range
from .nvshmem import NvshmemTransport
from .router import MoERouter
from .transport import EPTransport, LocalTransport, TorchDistributedTransport

__all__ = ["MoERouter", "EPDispatcher", "DispatchHandle", "EPTransport", "LocalTransport",
           "TorchDistributedTransport", "NvshmemTransport", "expert_range"]
