"""Mixture-of-Experts routing and expert-parallel dispatch."""
from .dispatcher import DispatchHandle, EPDispatcher, expert_range
from .router import MoERouter
from .transport import EPTransport, LocalTransport, TorchDistributedTransport

__all__ = ["MoERouter", "EPDispatcher", "DispatchHandle", "EPTransport", "LocalTransport",
           "TorchDistributedTransport", "expert_range"]
