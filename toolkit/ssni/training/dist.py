"""Kept for imports that name it here: the distributed context lives in `ssni.dist` (a core module)."""
from ..dist import DistContext, join_shards, owner, shard_starts  # noqa: F401

__all__ = ["DistContext", "join_shards", "owner", "shard_starts"]
