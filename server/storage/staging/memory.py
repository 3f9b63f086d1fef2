"""In-process staging cache: TTL, a bound per collection and one in all. For a single replica (the embedded default)."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from server.storage.staging.base import StagedFace, StagingCache, staging_full, token_key

log = logging.getLogger("facesvc.staging")


class MemoryStagingCache(StagingCache):
    backend = "memory"

    def __init__(self, max_entries: int = 10_000, per_collection: int = 1000, clock=time.monotonic):
        self.max_entries, self.per_collection = max_entries, per_collection
        self._clock = clock
        # insertion order = expiry order (one TTL per server); get() checks expiry itself
        self._entries: OrderedDict[str, tuple[float, str, bytes]] = OrderedDict()
        self._by_collection: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"memory (max {self.max_entries} entries, {self.per_collection} per collection)"

    def _remove(self, key: str) -> None:
        _, collection, _ = self._entries.pop(key)
        keys = self._by_collection[collection]
        keys.discard(key)
        if not keys:
            del self._by_collection[collection]

    def _purge(self, now: float) -> None:
        while self._entries:
            key, (expires, _, _) = next(iter(self._entries.items()))
            if expires > now:
                return
            self._remove(key)

    def put(self, token: str, staged: StagedFace, ttl_s: int) -> None:
        raw = staged.to_bytes()  # the same serialisation as Redis, so both paths run the same code
        now = self._clock()
        collection = staged.collection_id
        with self._lock:
            self._purge(now)
            if len(self._by_collection.get(collection, ())) >= self.per_collection:
                raise staging_full(self.per_collection)
            if len(self._entries) >= self.max_entries:
                # the memory bound of last resort: it takes many collections at their own bound to reach it
                self._remove(next(iter(self._entries)))
                log.warning("staging cache full (%d entries): evicted the oldest staged face", self.max_entries)
            key = token_key(token)
            self._entries[key] = (now + ttl_s, collection, raw)
            self._by_collection.setdefault(collection, set()).add(key)

    def get(self, token: str) -> StagedFace | None:
        with self._lock:
            entry = self._entries.get(token_key(token))
            if entry is None or entry[0] <= self._clock():
                return None
            raw = entry[2]
        return StagedFace.from_bytes(raw)

    def delete(self, token: str, collection: str = "") -> None:
        with self._lock:
            key = token_key(token)
            if key in self._entries:
                self._remove(key)

    def drop_collection(self, collection: str) -> int:
        with self._lock:
            keys = list(self._by_collection.get(collection, ()))
            for key in keys:
                self._remove(key)
            return len(keys)

    def __len__(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._entries)
