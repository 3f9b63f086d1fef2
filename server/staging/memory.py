"""In-process staging cache: TTL and a bound on entries. For a single replica (the embedded default)."""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

from server.staging.base import StagedFace, StagingCache, token_key

log = logging.getLogger("facesvc.staging")


class MemoryStagingCache(StagingCache):
    backend = "memory"

    def __init__(self, max_entries: int = 10_000, clock=time.monotonic):
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # insertion order = expiry order (one TTL per server); get() checks expiry itself
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"memory (max {self.max_entries} entries)"

    def _purge(self, now: float) -> None:
        while self._entries:
            key, (expires, _) = next(iter(self._entries.items()))
            if expires > now:
                return
            del self._entries[key]

    def put(self, token: str, staged: StagedFace, ttl_s: int) -> None:
        raw = staged.to_bytes()  # the same serialisation as Redis, so both paths run the same code
        now = self._clock()
        with self._lock:
            self._purge(now)
            if len(self._entries) >= self.max_entries:
                self._entries.popitem(last=False)
                log.warning("staging cache full (%d entries): evicted the oldest staged face", self.max_entries)
            self._entries[token_key(token)] = (now + ttl_s, raw)

    def get(self, token: str) -> StagedFace | None:
        with self._lock:
            entry = self._entries.get(token_key(token))
            if entry is None or entry[0] <= self._clock():
                return None
            raw = entry[1]
        return StagedFace.from_bytes(raw)

    def delete(self, token: str) -> None:
        with self._lock:
            self._entries.pop(token_key(token), None)

    def __len__(self) -> int:
        with self._lock:
            self._purge(self._clock())
            return len(self._entries)
