"""Redis staging cache (production): SET with EX, values versioned, shared by every replica."""
from __future__ import annotations

import redis

from server import errors
from server.staging.base import StagedFace, StagingCache, token_key


class RedisStagingCache(StagingCache):
    backend = "redis"

    def __init__(self, url: str, prefix: str = "facesvc:", timeout_s: float = 2.0):
        self.prefix = prefix
        self._url = url
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def describe(self) -> str:
        return f"redis {self.client.connection_pool.connection_kwargs.get('host')}:" \
               f"{self.client.connection_pool.connection_kwargs.get('port')} prefix {self.prefix!r}"

    def _key(self, token: str) -> str:
        return f"{self.prefix}staging:{token_key(token)}"

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise errors.unavailable(errors.CACHE_UNAVAILABLE, f"staging cache (Redis) unavailable: {exc}") from exc

    def ping(self) -> None:
        self._call(self.client.ping)

    def put(self, token: str, staged: StagedFace, ttl_s: int) -> None:
        self._call(self.client.set, self._key(token), staged.to_bytes(), ex=max(1, int(ttl_s)))

    def get(self, token: str) -> StagedFace | None:
        raw = self._call(self.client.get, self._key(token))
        return None if raw is None else StagedFace.from_bytes(raw)

    def delete(self, token: str) -> None:
        self._call(self.client.delete, self._key(token))

    def close(self) -> None:
        self.client.close()
