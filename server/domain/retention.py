"""Face retention: a background job deletes the faces older than their collection's retention_days.

Every replica runs it; the deletions are the ordinary DeleteFace path (the change log, the index
erasure, the audit log with key "retention"), and a face another replica deleted first is skipped.
A subject whose faces all age out stays, with its metadata, until it is deleted.
"""

from __future__ import annotations

import logging
import time

from server import errors
from server.domain.periodic import Periodic

log = logging.getLogger("facesvc.retention")

BATCH = 500


class RetentionJob:
    def __init__(self, store, identity, audit=None, interval_s: float = 3600.0):
        self.store, self.identity, self.audit = store, identity, audit
        self._thread = Periodic("retention", interval_s, self._step, log)

    def sweep(self, now_ms: int | None = None) -> int:
        """Delete every face past its collection's retention; returns how many went."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        deleted = 0
        for c in self.store.collections_with_retention():
            cutoff = now_ms - c.retention_days * 86_400_000
            while not self._thread.stopping.is_set():
                faces = self.store.faces_created_before(c.collection_id, cutoff, BATCH)
                for f in faces:
                    if self._thread.stopping.is_set():  # a stop waits for one deletion, not a batch of them
                        break
                    try:
                        self.identity.delete_face(c.collection_id, f.face_id)
                        deleted += 1
                    except errors.FaceServiceError as exc:
                        if exc.reason not in (errors.FACE_NOT_FOUND, errors.COLLECTION_NOT_FOUND):
                            raise
                        continue  # deleted meanwhile, by a call or another replica's job: its deletion is recorded
                    if self.audit is not None:
                        self.audit.record("retention", "DeleteFace", c.collection_id, f.subject_id, f.face_id, "OK")
                if len(faces) < BATCH:
                    break
        if deleted:
            log.info("retention: deleted %d faces past their collections' retention", deleted)
        return deleted

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._thread.stop(timeout_s)

    def _step(self) -> None:
        try:
            self.sweep()
        except errors.FaceServiceError as exc:
            log.warning("retention sweep paused (%s); retrying in %.0fs", exc, self._thread.interval_s)
