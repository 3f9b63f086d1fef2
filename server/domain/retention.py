"""Face retention: a background job deletes the faces older than their collection's retention_days.

Every replica runs it; the deletions are the ordinary DeleteFace path (the change log, the index
erasure, the audit log with key "retention"), and a face another replica deleted first is skipped.
A subject whose faces all age out stays, with its metadata, until it is deleted.
"""

from __future__ import annotations

import logging
import threading
import time

from server import errors

log = logging.getLogger("facesvc.retention")

BATCH = 500


class RetentionJob:
    def __init__(self, store, identity, audit=None, interval_s: float = 3600.0):
        self.store, self.identity, self.audit, self.interval_s = store, identity, audit, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self, now_ms: int | None = None) -> int:
        """Delete every face past its collection's retention; returns how many went."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        deleted = 0
        for c in self.store.collections_with_retention():
            cutoff = now_ms - c.retention_days * 86_400_000
            while not self._stop.is_set():
                faces = self.store.faces_created_before(c.collection_id, cutoff, BATCH)
                for f in faces:
                    outcome = "OK"
                    try:
                        self.identity.delete_face(c.collection_id, f.face_id)
                        deleted += 1
                    except errors.FaceServiceError as exc:
                        if exc.reason not in (errors.FACE_NOT_FOUND, errors.COLLECTION_NOT_FOUND):
                            raise
                        outcome = f"{exc.code.name} {exc.reason}"
                    if self.audit is not None:
                        self.audit.record("retention", "DeleteFace", c.collection_id, f.subject_id, f.face_id, outcome)
                if len(faces) < BATCH:
                    break
        if deleted:
            log.info("retention: deleted %d faces past their collections' retention", deleted)
        return deleted

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except errors.FaceServiceError as exc:
                log.warning("retention sweep paused (%s); retrying in %.0fs", exc, self.interval_s)
            except Exception:  # noqa: BLE001 - the thread must survive anything, and say so
                log.exception("retention sweep failed; retrying")
