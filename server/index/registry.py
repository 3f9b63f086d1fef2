"""One HnswIndex per collection, built lazily from the database and kept in step by the write path.

The database is the source of truth: an index is only ever a cache of the
faces table (for the current recognizer's model), rebuilt from it on first
use after start-up. Changes made through this server are applied right after
their database commit. A build and a change of the same collection are
serialised by the collection's lock, so a face deleted while its collection
is being built is not resurrected by the build.
"""
from __future__ import annotations

import logging
import threading
import time

from server.index.hnsw import HnswIndex, HnswParams

log = logging.getLogger("facesvc.index")


class IndexRegistry:
    def __init__(self, store, model_id: str, dim: int, params: HnswParams = HnswParams(), batch: int = 5000):
        self.store, self.model_id, self.dim, self.params, self.batch = store, model_id, dim, params, batch
        self._indexes: dict[str, HnswIndex] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, collection: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(collection, threading.Lock())

    def get(self, collection: str) -> HnswIndex:
        """The collection's index, built from the database if this server has not built it yet."""
        idx = self._indexes.get(collection)
        if idx is not None:
            return idx
        with self._lock(collection):
            idx = self._indexes.get(collection)
            if idx is None:
                idx = self._build(collection)
                self._indexes[collection] = idx
            return idx

    def _build(self, collection: str) -> HnswIndex:
        t0 = time.perf_counter()
        idx = HnswIndex(self.dim, self.model_id, self.params)
        after = ""
        while True:
            rows = self.store.collection_embeddings(collection, self.model_id, after, self.batch)
            if not rows:
                break
            idx.add([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
            after = rows[-1][0]
        log.info("index %s: built from the database with %d faces in %.2fs", collection, len(idx), time.perf_counter() - t0)
        return idx

    # -- the write path calls these after its database commit ---------------------
    def face_added(self, collection: str, face_id: str, subject_id: str, model_id: str, embedding) -> None:
        if model_id != self.model_id:
            return
        with self._lock(collection):
            idx = self._indexes.get(collection)
            if idx is not None:  # not built yet: the build will read the committed face
                idx.add([face_id], [subject_id], embedding)

    def face_deleted(self, collection: str, face_id: str) -> None:
        with self._lock(collection):
            idx = self._indexes.get(collection)
            if idx is not None:
                idx.remove_face(face_id)

    def subject_deleted(self, collection: str, subject_id: str) -> None:
        with self._lock(collection):
            idx = self._indexes.get(collection)
            if idx is not None:
                idx.remove_subject(subject_id)

    def collection_deleted(self, collection: str) -> None:
        with self._lock(collection):
            self._indexes.pop(collection, None)
