"""The staging cache: faces that passed Process, waiting for Register (TTL, 10 min by default)."""

from __future__ import annotations

from server.storage.staging.base import StagedFace, StagingCache
from server.storage.staging.memory import MemoryStagingCache
from server.storage.staging.redis_cache import RedisStagingCache


def open_cache(
    redis_url: str, *, prefix: str = "facesvc:", max_entries: int = 10_000, per_collection: int = 1000
) -> StagingCache:
    """Redis when `redis_url` is set (shared by every replica), else in-process (one replica only)."""
    if redis_url:
        return RedisStagingCache(redis_url, prefix=prefix, per_collection=per_collection)
    return MemoryStagingCache(max_entries=max_entries, per_collection=per_collection)


__all__ = ["StagedFace", "StagingCache", "MemoryStagingCache", "RedisStagingCache", "open_cache"]
