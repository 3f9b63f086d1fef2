"""One collection's faces in an hnswlib graph (cosine space on L2-normalised embeddings).

hnswlib's add_items and mark_deleted are not safe against a concurrent
knn_query, so searches share a read lock and changes take the write lock.
Labels are small integers assigned here; the face id / subject id of each
label live beside the graph.
"""
from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
import dataclasses
from dataclasses import dataclass

import hnswlib
import numpy as np


@dataclass(frozen=True)
class HnswParams:
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 0   # 0: grow with the graph (ef_for); any other value is used at every size
    initial_capacity: int = 1024

    def ef_for(self, nodes: int) -> int:
        """The query-time candidate list for a graph of `nodes` elements (deleted ones included).

        A graph needs a longer list as it grows to keep the same recall. Measured on the facelike
        corpus with M 32 (scripts/bench_search.py, README "Search (1:N)"), recall@10 is 0.995 at
        200 k faces and 0.990 at 500 k with ef 64, and 0.992 at 1 M with ef 256 (0.980 with 128).
        So: ef 64 up to AUTO_EF_POINTS' first size, then linear through the measured points and on
        at the last slope, rounded up to a multiple of 16 and capped at AUTO_EF_MAX."""
        if self.ef_search:
            return self.ef_search
        (n0, ef0), (n1, ef1) = AUTO_EF_POINTS
        if nodes <= n0:
            return ef0
        ef = ef0 + (nodes - n0) * (ef1 - ef0) / (n1 - n0)
        return min(AUTO_EF_MAX, -(-math.ceil(ef) // 16) * 16)


AUTO_EF_POINTS = ((500_000, 64), (1_000_000, 256))  # (graph size, ef) measured to give recall@10 >= 0.99
AUTO_EF_MAX = 512


class RWLock:
    """Many readers or one writer; a waiting writer holds back new readers."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class Hit:
    face_id: str
    subject_id: str
    similarity: float


class HnswIndex:
    def __init__(self, dim: int, model_id: str, params: HnswParams = HnswParams()):
        self.dim, self.model_id, self.params = dim, model_id, params
        self._index = hnswlib.Index(space="cosine", dim=dim)
        self._index.init_index(max_elements=params.initial_capacity, M=params.m, ef_construction=params.ef_construction)
        self._lock = RWLock()
        self._label_of: dict[str, int] = {}          # face id -> label (live faces)
        self._face_of: dict[int, tuple[str, str]] = {}  # label -> (face id, subject id), live faces
        self._next_label = 0
        self._tune_ef()
        self.deleted = 0
        self.built_at = time.time()   # when the graph was built from the database (kept by snapshots)
        self.loaded_from = "database"  # or "snapshot"
        self.snapshot_at = 0.0         # last snapshot written or loaded, epoch seconds

    # -- snapshots (server/index/snapshot.py owns the file format) ------------
    def save_graph(self, path: str) -> dict:
        """Writes hnswlib's graph to `path`; returns the label map and counters of that same moment.

        Searches go on meanwhile (read lock); changes wait until the graph is written.
        """
        with self._lock.read():
            self._index.save_index(path)
            return {"faces": [[label, f, s] for label, (f, s) in self._face_of.items()], "next_label": self._next_label,
                    "deleted": self.deleted, "capacity": self._index.get_max_elements(), "built_at": self.built_at}

    @classmethod
    def from_saved(cls, dim: int, model_id: str, params: HnswParams, graph_path: str, state: dict) -> "HnswIndex":
        """The inverse of save_graph. The caller has checked the file's checksum (hnswlib trusts its input)."""
        idx = cls(dim, model_id, dataclasses.replace(params, initial_capacity=1))
        graph = hnswlib.Index(space="cosine", dim=dim)
        graph.load_index(graph_path, max_elements=int(state["capacity"]))
        if graph.element_count != state["next_label"] or graph.M != params.m:
            raise ValueError(f"graph holds {graph.element_count} elements with M={graph.M}, "
                             f"the label map {state['next_label']} with M={params.m}")
        idx._index = graph
        for label, face_id, subject_id in state["faces"]:
            idx._remember(int(label), face_id, subject_id)
        idx._next_label, idx.deleted, idx.built_at = int(state["next_label"]), int(state["deleted"]), float(state["built_at"])
        idx._tune_ef()
        idx.loaded_from = "snapshot"
        return idx

    # -- changes -------------------------------------------------------------
    def add(self, face_ids: list[str], subject_ids: list[str], vectors: np.ndarray) -> None:
        with self._lock.write():
            self._add_locked(face_ids, subject_ids, vectors)

    def _add_locked(self, face_ids: list[str], subject_ids: list[str], vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        new = [(i, f) for i, f in enumerate(face_ids) if f not in self._label_of]
        if new:
            need = self._next_label + len(new)
            cap = self._index.get_max_elements()
            if need > cap:
                self._index.resize_index(max(need, cap * 2))
            labels = np.arange(self._next_label, need, dtype=np.int64)
            self._index.add_items(vectors[[i for i, _ in new]], labels)
            for label, (i, face_id) in zip(labels.tolist(), new):
                self._remember(label, face_id, subject_ids[i])
            self._next_label = need
            self._tune_ef()

    def _tune_ef(self) -> None:
        """ef for the graph's size now (under the write lock, or before the index is shared)."""
        ef = self.params.ef_for(self._next_label)
        if ef != self._index.ef:
            self._index.set_ef(ef)

    def _remember(self, label: int, face_id: str, subject_id: str) -> None:
        self._label_of[face_id] = label
        self._face_of[label] = (face_id, subject_id)

    def apply(self, present: dict[str, tuple[str, np.ndarray]], absent: list[str], replace: set[str] = frozenset()) -> None:
        """Make the index agree with the database about some faces, in one write-locked step.

        present: face id -> (subject id, embedding) as the database holds them now;
        absent: face ids the database no longer holds (for this model);
        replace: faces whose embedding changed (re-embedded): re-added even if indexed.
        Idempotent, so the same change may be applied any number of times.
        """
        with self._lock.write():
            for face_id in list(absent) + [f for f in replace if f in present]:
                label = self._label_of.get(face_id)
                if label is not None:
                    self._drop(label)
            new = [f for f in present if f not in self._label_of]
            if new:
                self._add_locked(new, [present[f][0] for f in new], np.stack([present[f][1] for f in new]))

    def _drop(self, label: int) -> None:
        face_id, _ = self._face_of.pop(label)
        del self._label_of[face_id]
        self._index.mark_deleted(label)
        self.deleted += 1

    # -- queries -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._label_of)

    def search(self, vector: np.ndarray, top_k: int, min_similarity: float, max_faces_per_subject: int) -> list[Hit]:
        """The best `top_k` subjects (one hit each: their best face) at or above `min_similarity`."""
        q = np.asarray(vector, dtype=np.float32).reshape(1, self.dim)
        # enough faces to cover top_k distinct subjects
        # (hnswlib searches with max(ef, k), so a large k needs no change of the index-wide ef)
        k = top_k * max(1, max_faces_per_subject)
        with self._lock.read():
            _, distances, faces = self._query(q, k)
        hits, seen = [], set()
        for face, dist in zip(faces, distances[0]):
            sim = 1.0 - float(dist)
            if face is None or sim < min_similarity:
                continue
            if face[1] in seen:
                continue
            seen.add(face[1])
            hits.append(Hit(face[0], face[1], sim))
            if len(hits) == top_k:
                break
        return hits

    def _query(self, q: np.ndarray, k: int):
        """(labels, distances, faces) under the caller's lock; k is capped by the live faces."""
        k = min(k, len(self._label_of))
        while k > 0:
            try:
                labels, distances = self._index.knn_query(q, k=k)
                return labels, distances, [self._face_of.get(int(lb)) for lb in labels[0]]
            except RuntimeError:  # the graph yielded fewer than k live elements (many deletions): ask for fewer
                k //= 2
        return np.empty((1, 0)), np.empty((1, 0)), []

    def stats(self) -> dict:
        with self._lock.read():
            return {
                "size": len(self._label_of), "deleted": self.deleted, "dimension": self.dim, "model": self.model_id,
                "capacity": self._index.get_max_elements(), "m": self.params.m,
                "ef_construction": self.params.ef_construction, "ef_search": self._index.ef,
                "memory_bytes": self._memory_estimate(), "built_at": self.built_at,
                "loaded_from": self.loaded_from, "snapshot_at": self.snapshot_at,
            }

    def _memory_estimate(self) -> int:
        # hnswlib's layout: per element, the vector + level-0 links (2M ints) + label; upper levels are ~1/M of that
        per = self.dim * 4 + (2 * self.params.m + 1) * 4 + 8
        return int(self._index.get_max_elements() * per * (1 + 1 / self.params.m))
