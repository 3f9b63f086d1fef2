"""The audit log: which key did what, on which collection and subject, when, with what outcome.

Calls are recorded as they finish (`record`, from the RPC layer) into a bounded buffer that a
background thread writes to the store in one transaction a second, so an audited Verify does not
wait for a database commit of its own. A crash loses at most the last second's events; a store
outage keeps them buffered (up to MAX_BUFFER, then the oldest are dropped and counted in the log).
The same thread prunes events older than the audit retention once an hour.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from server import errors
from server.domain.periodic import Periodic
from server.records import AuditEvent
from server.storage.interfaces import AuditStore

log = logging.getLogger("facesvc.audit")

MAX_BUFFER = 100_000
ONE_BY_ONE = 256  # events a flush writes one at a time after the store refused its batch
MAX_REFUSED_IN_A_ROW = 3  # then it is the store, not the events: keep them
# The widest value each field of an event may hold (the MySQL columns, server/storage/sql/dialects.py).
# An event records what a request named, before or whatever its validation said: a refused call's
# 200-character subject id is recorded cut to fit, not lost with the events buffered beside it.
WIDTHS = {"key_id": 32, "action": 32, "collection_id": 64, "subject_id": 128, "face_id": 32, "outcome": 64}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _fit(value: str, width: int) -> str:
    """`value` cut to `width` characters, and encodable as UTF-8 (a lone surrogate becomes "?")."""
    value = value[:width]
    try:
        value.encode()
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode()
    return value


class AuditLog:
    def __init__(self, store: AuditStore, retention_days: float = 365, flush_s: float = 1.0):
        self.store, self.retention_days, self.flush_s = store, retention_days, flush_s
        self._buffer: deque[AuditEvent] = deque()
        self._lock = threading.Lock()
        self._flushing = threading.Lock()  # one flush at a time: the thread's, or flush() called by a test or stop()
        self._dropped = 0
        self._evicted = 0  # events record() took off the front of a full buffer, ever (a flush may be writing them)
        self._last_prune = 0.0
        self._thread = Periodic("audit-log", flush_s, self._step, log)

    def record(self, key_id: str, action: str, collection: str, subject_id: str, face_id: str, outcome: str) -> None:
        fields = zip(WIDTHS.values(), (key_id, action, collection, subject_id, face_id, outcome))
        event = AuditEvent(*(_fit(value, width) for width, value in fields), _now_ms())
        with self._lock:
            if len(self._buffer) >= MAX_BUFFER:
                self._buffer.popleft()
                self._dropped += 1
                self._evicted += 1
            self._buffer.append(event)

    def flush(self) -> int:
        """Write what is buffered; on a store outage it stays buffered for the next try. Returns events written."""
        with self._flushing:
            with self._lock:
                batch, dropped, evicted = list(self._buffer), self._dropped, self._evicted
                self._dropped = 0
            if dropped:
                log.warning("audit log: %d events dropped (buffer full while the database was unreachable)", dropped)
            if not batch:
                return 0
            try:
                self.store.append_audit(batch)
                done = written = len(batch)
            except errors.FaceServiceError as exc:
                log.warning("audit log: %d events not written yet (%s); retrying", len(batch), exc)
                return 0
            except Exception:  # noqa: BLE001 - the store refused an event: not an outage
                done, written = self._one_by_one(batch)
            with self._lock:
                # events recorded meanwhile into a full buffer took the batch's first ones off its front:
                # those of them written are not lost, and are not to be taken off again (newer ones are there)
                gone = min(self._evicted - evicted, len(batch), done)
                self._dropped -= gone
                for _ in range(done - gone):
                    self._buffer.popleft()
            return written

    def _one_by_one(self, batch: list[AuditEvent]) -> tuple[int, int]:
        """Writes the front of `batch` event by event, after the store refused the batch for a reason
        that is not an outage. An event is dropped only once a later one is written: then the store
        works and that event is what it cannot take, and it must not hold back every event behind it.
        Several failing in a row, or an outage, stop the pass with the rest kept for the next try (a
        full disk or a read-only failover refuses every event: those are kept, not dropped).
        Returns (events done from the front of the batch, events written)."""
        written, failing, dropped = 0, 0, 0
        for i, event in enumerate(batch[:ONE_BY_ONE]):
            try:
                self.store.append_audit([event])
            except errors.FaceServiceError as exc:
                log.warning("audit log: %d events not written yet (%s); retrying", len(batch) - i + failing, exc)
                return i - failing, written
            except Exception as exc:  # noqa: BLE001
                failing += 1
                if failing == MAX_REFUSED_IN_A_ROW:
                    log.warning("audit log: the database refuses events (%s); keeping them for the next try", exc)
                    return i + 1 - failing, written
                continue
            written += 1
            dropped, failing = dropped + failing, 0
        if dropped:
            log.warning("audit log: %d events the database refused were dropped", dropped)
        done = min(len(batch), ONE_BY_ONE)
        return done - failing, written

    def list(self, before_seq: int, limit: int, collection: str = "", subject_id: str = "") -> list[AuditEvent]:
        self.flush()  # what was recorded before the listing is in it
        return self.store.list_audit(before_seq, limit, collection, subject_id)

    def prune(self) -> int:
        return self.store.prune_audit(_now_ms() - int(self.retention_days * 86_400_000))

    # -- the thread ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._thread.stop(timeout_s)
        self.flush()

    def _step(self) -> None:
        self.flush()
        if time.monotonic() - self._last_prune >= 3600:
            self._last_prune = time.monotonic()
            n = self.prune()
            if n:
                log.info("audit log: pruned %d events older than %g days", n, self.retention_days)
