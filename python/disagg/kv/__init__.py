"""Paged KV cache: the block manager the engine uses, on top of the ``kv_*`` ops."""
from .cache import OutOfBlocksError, PagedKVCache

__all__ = ["PagedKVCache", "OutOfBlocksError"]
