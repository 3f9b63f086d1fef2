"""Redis staging cache (production): SET with EX, values versioned, shared by every replica."""

from __future__ import annotations

import time

import redis

from server import errors
from server.storage.staging.base import StagedFace, StagingCache, staging_full, token_key

# KEYS: entry, members. ARGV: now ms, expires ms, ttl s, per-collection bound, value. 1 = stored, 0 = full.
_PUT = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return 0 end
redis.call('SET', KEYS[1], ARGV[5], 'EX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[2], KEYS[1])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""
# KEYS: entry[, members]
_DELETE = """
redis.call('DEL', KEYS[1])
if KEYS[2] then redis.call('ZREM', KEYS[2], KEYS[1]) end
return 1
"""
# KEYS: members. Deletes every entry it lists, then the set; returns how many entries were live.
_DROP = """
local keys = redis.call('ZRANGE', KEYS[1], 0, -1)
local n = 0
for i = 1, #keys, 500 do
  n = n + redis.call('DEL', unpack(keys, i, math.min(i + 499, #keys)))
end
redis.call('DEL', KEYS[1])
return n
"""


# Redis away, or answering that it cannot serve now: a replica after a failover (READONLY), full
# under noeviction (OOM), loading its data (LOADING), a replica without its master (MASTERDOWN),
# unable to persist (MISCONF), short of replicas (NOREPLICAS), running another client's script
# (BUSY), a cluster resharding (TRYAGAIN, CLUSTERDOWN). Its other errors (WRONGTYPE, a script's)
# are bugs, not outages, and are not answered as "retry".
_AWAY = tuple(
    getattr(redis.exceptions, name)
    for name in (
        "ConnectionError",
        "TimeoutError",
        "ReadOnlyError",
        "OutOfMemoryError",
        "BusyLoadingError",
        "MasterDownError",
        "TryAgainError",
        "ClusterDownError",
    )
    if hasattr(redis.exceptions, name)
)
_AWAY_CODES = {"READONLY", "OOM", "LOADING", "MASTERDOWN", "MISCONF", "NOREPLICAS", "BUSY", "TRYAGAIN", "CLUSTERDOWN"}


def _away(exc: Exception) -> bool:
    code = str(exc).split(" ", 1)[0]
    return isinstance(exc, _AWAY) or isinstance(exc, redis.ResponseError) and code in _AWAY_CODES


class RedisStagingCache(StagingCache):
    backend = "redis"

    def __init__(self, url: str, prefix: str = "facesvc:", timeout_s: float = 2.0, per_collection: int = 1000):
        self.prefix = prefix
        self.per_collection = per_collection
        self._url = url
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        # Scripts run atomically, so concurrent puts cannot both pass the bound with one slot left.
        self._put = self.client.register_script(_PUT)
        self._delete = self.client.register_script(_DELETE)
        self._drop = self.client.register_script(_DROP)

    def describe(self) -> str:
        return (
            f"redis {self.client.connection_pool.connection_kwargs.get('host')}:"
            f"{self.client.connection_pool.connection_kwargs.get('port')} prefix {self.prefix!r}"
        )

    def _key(self, token: str) -> str:
        return f"{self.prefix}staging:{token_key(token)}"

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except redis.RedisError as exc:
            if not _away(exc):
                raise
            raise errors.unavailable(
                errors.CACHE_UNAVAILABLE,
                "the staging cache is unavailable; retry",
                detail=f"staging cache (Redis) unavailable: {type(exc).__name__}: {exc}",
            ) from exc

    def ping(self) -> None:
        self._call(self.client.ping)

    def _members(self, collection: str) -> str:
        """A sorted set per collection: its entries' keys, scored by when they expire (ms)."""
        return f"{self.prefix}staging-of:{collection}"

    def put(self, token: str, staged: StagedFace, ttl_s: int) -> None:
        ttl = max(1, int(ttl_s))
        now_ms = int(time.time() * 1000)
        ok = self._call(
            self._put,
            keys=[self._key(token), self._members(staged.collection_id)],
            args=[now_ms, now_ms + ttl * 1000, ttl, self.per_collection, staged.to_bytes()],
        )
        if not ok:
            raise staging_full(self.per_collection)

    def get(self, token: str) -> StagedFace | None:
        raw = self._call(self.client.get, self._key(token))
        return None if raw is None else StagedFace.from_bytes(raw)

    def delete(self, token: str, collection: str = "") -> None:
        keys = [self._key(token)] + ([self._members(collection)] if collection else [])
        self._call(self._delete, keys=keys, args=[])

    def drop_collection(self, collection: str) -> int:
        return int(self._call(self._drop, keys=[self._members(collection)], args=[]))

    def close(self) -> None:
        self.client.close()
