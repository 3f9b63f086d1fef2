"""One collection's faces in hnswlib graphs (cosine space on L2-normalised embeddings).

The faces live in segments: graphs of at most `segment_size` nodes each, filled
one after the other. A query asks every segment for its k best and merges them;
the segments are searched at the same time on the search pool's threads (hnswlib
releases the GIL), so a large collection answers in about the time of one
segment. Smaller graphs also need a shorter candidate list for the same recall
(scripts/bench_search.py; the figures are in docs/search.md).

hnswlib's add_items and mark_deleted are not safe against a concurrent
knn_query, so searches share a read lock and changes take the write lock.
Labels are small integers assigned here, in order, so a segment holds one
contiguous range of them; the face id / subject id of each label live beside
the graphs.

A segment made to hold many faces (`pca_dims`, `pca_min_faces`) is a graph
over a PCA projection of them (Projection: 128 numbers a face instead of 512,
so each distance the walk computes costs a quarter), and the candidates it
finds are re-ranked with the full vectors, kept beside the graph: the
similarities a search returns are the exact ones either way.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import hnswlib
import numpy as np

from server.cpus import cpu_cores
from server.index.base import Hit, IndexStats


@dataclass(frozen=True)
class HnswParams:
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 0  # 0: grow with the segment (ef_for); any other value is used at every size
    initial_capacity: int = 1024
    segment_size: int = 500_000  # nodes per graph; a collection past it gets another graph
    search_threads: int = 0  # threads searching segments side by side; 0: one per CPU
    pca_dims: int = 0  # a projected segment's dimensions; 0: every graph holds the full vectors
    pca_min_faces: int = 300_000  # a segment is projected when made for this many faces, or when the index holds them

    def __post_init__(self):
        if self.segment_size < 1 or self.search_threads < 0 or self.pca_dims < 0:
            raise ValueError(
                f"segment_size must be >= 1, search_threads and pca_dims >= 0, not {self.segment_size}, "
                f"{self.search_threads}, {self.pca_dims}"
            )

    def sized_for(self, faces: int) -> HnswParams:
        """These parameters with a first graph that has room for `faces` (up to a segment) from the
        start: one allocation rather than a chain of doublings, so a build's graph is on huge pages
        from its first write (server/hugepages.py) and a projected one is known to be large."""
        return dataclasses.replace(self, initial_capacity=max(self.initial_capacity, min(faces, self.segment_size)))

    def ef_for(self, nodes: int, projected: bool = False) -> int:
        """The query-time candidate list for a graph of `nodes` elements (deleted ones included).

        A graph needs a longer list as it grows to keep the same recall. AUTO_EF_POINTS are the
        (size, ef) pairs where scripts/bench_search.py found recall@10 of at least 0.99 with M 32
        (docs/search.md): the first point's ef up to its size, then linear through the points and
        on at the last slope, rounded up to a multiple of 16 and capped at AUTO_EF_MAX. With the
        default segment size no graph grows past the middle point.

        A projected graph (`projected`) loses some recall to its projection and wins it back with
        a longer list before its re-rank: PCA_EF_FACTOR times as many (docs/search.md, "Fewer
        dimensions")."""
        if self.ef_search:
            return self.ef_search
        if projected:
            return min(AUTO_EF_MAX, -(-math.ceil(self.ef_for(nodes) * PCA_EF_FACTOR) // 16) * 16)
        points = AUTO_EF_POINTS
        if nodes <= points[0][0]:
            return points[0][1]
        (n0, ef0), (n1, ef1) = next(((a, b) for a, b in itertools.pairwise(points) if nodes <= b[0]), points[-2:])
        ef = ef0 + (nodes - n0) * (ef1 - ef0) / (n1 - n0)
        return min(AUTO_EF_MAX, -(-math.ceil(ef) // 16) * 16)


# (graph size, ef) measured to give recall@10 >= 0.99
AUTO_EF_POINTS = ((200_000, 64), (500_000, 96), (1_000_000, 256))
AUTO_EF_MAX = 512
PCA_EF_FACTOR = 5 / 3
PCA_SAMPLE = 20_000  # faces a projection is fitted on


@dataclass(frozen=True)
class Projection:
    """An uncentred PCA: the top principal axes of a sample of unit vectors. Uncentred because the
    inner product, not the distance to the mean, is what the projected graph must preserve."""

    axes: np.ndarray  # (dim, dims) float32
    kept: float  # share of the sample's energy the axes keep

    @classmethod
    def fit(cls, sample: np.ndarray, dims: int) -> Projection:
        sample = np.asarray(sample, dtype=np.float64)
        values, axes = np.linalg.eigh(sample.T @ sample / len(sample))
        order = np.argsort(-values)[:dims]
        return cls(np.ascontiguousarray(axes[:, order], dtype=np.float32), float(values[order].sum() / values.sum()))

    @property
    def dims(self) -> int:
        return self.axes.shape[1]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.axes


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (what hnswlib's cosine space does to what it is given)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1)).astype(np.float32, copy=False)


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


class _Segment:
    """One hnswlib graph; it holds the labels [start, start + graph.element_count).

    Projected (projection set): the graph holds the projected faces in inner-product space and
    `vectors` their full unit vectors, row = label - start, for the re-rank."""

    def __init__(
        self,
        graph: hnswlib.Index,
        start: int,
        live: int = 0,
        projection: Projection | None = None,
        vectors: np.ndarray | None = None,
    ):
        self.graph, self.start, self.live = graph, start, live
        self.projection, self.vectors = projection, vectors

    @classmethod
    def new(cls, dim: int, params: HnswParams, start: int, capacity: int, projection: Projection | None = None) -> _Segment:
        graph = hnswlib.Index(space="cosine", dim=dim) if projection is None else hnswlib.Index(space="ip", dim=projection.dims)
        graph.init_index(max_elements=capacity, M=params.m, ef_construction=params.ef_construction)
        return cls(
            graph, start, projection=projection, vectors=None if projection is None else np.empty((capacity, dim), np.float32)
        )

    @property
    def nodes(self) -> int:
        return self.graph.element_count

    def add(self, vectors: np.ndarray, labels: np.ndarray) -> None:
        if self.projection is None:
            self.graph.add_items(vectors, labels)
            return
        vectors = unit(vectors)
        self.vectors[labels - self.start] = vectors
        self.graph.add_items(self.projection(vectors), labels)

    def erase(self, label: int) -> None:
        """Zero a deleted face's full vector in the re-rank copy. The graph keeps its own copy in memory
        until the index is compacted: hnswlib overwrites an element's vector only by re-linking it,
        which costs more than an insertion, under the write lock that searches wait for. Snapshots
        never hold it (erase_deleted_vectors)."""
        if self.vectors is not None:
            self.vectors[label - self.start] = 0.0

    def resize(self, capacity: int) -> None:
        self.graph.resize_index(capacity)
        if self.vectors is not None and len(self.vectors) < capacity:
            grown = np.empty((capacity, self.vectors.shape[1]), np.float32)
            grown[: self.nodes] = self.vectors[: self.nodes]
            self.vectors = grown

    def full_vectors(self, labels: np.ndarray) -> np.ndarray:
        """The unit vectors of some of this segment's labels (for fitting a projection)."""
        if self.vectors is not None:
            return self.vectors[np.asarray(labels, np.int64) - self.start]
        return unit(np.asarray(self.graph.get_items(labels), np.float32))

    def query(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """This segment's k best (labels, cosine distances) for the rows of q; k is capped by its live faces."""
        if self.projection is None:
            return self._knn(q, min(k, self.live))
        q = unit(q)
        labels, _ = self._knn(self.projection(q), min(max(k, self.graph.ef), self.live))
        rows = labels.astype(np.int64) - self.start
        sims = np.einsum("qkd,qd->qk", self.vectors[rows], q)
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(labels, order, 1), 1.0 - np.take_along_axis(sims, order, 1)

    def _knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        while k > 0:
            try:
                return self.graph.knn_query(q, k=k)
            except RuntimeError:  # the graph yielded fewer than k live elements (many deletions): ask for fewer
                k //= 2
        return no_neighbours(len(q))


# hnswlib's saveIndex header (0.8): offsetLevel0, max_elements, cur_element_count, size_data_per_element,
# label_offset, offsetData, maxlevel, enterpoint_node, maxM, maxM0, M, mult, ef_construction; then the
# level-0 block of each element: its link list (whose third byte holds the deleted mark), vector, label.
_HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
_DELETE_MARK = 0x01


def erase_deleted_vectors(path: str, elements: int) -> int:
    """Zero, in a graph file hnswlib just saved, the vector of every element marked deleted: mark_deleted
    keeps the embedding, and a snapshot must not. Returns how many were erased; ValueError when the
    file is not laid out as expected (an hnswlib with another format: the snapshot is not written)."""
    with open(path, "r+b") as f:
        fields = _HNSW_HEADER.unpack(f.read(_HNSW_HEADER.size))
        count, size, label_at, data_at = fields[2], fields[3], fields[4], fields[5]
        if count != elements or not 0 < data_at < label_at <= size - 8:
            raise ValueError(f"{path}: unexpected hnswlib layout ({count} elements of {size} bytes, data {data_at}-{label_at})")
        if not count:
            return 0
        blocks = np.memmap(f, dtype=np.uint8, mode="r+", offset=_HNSW_HEADER.size, shape=(count, size))
        deleted = np.flatnonzero(blocks[:, 2] & _DELETE_MARK)
        blocks[deleted, data_at:label_at] = 0
        blocks.flush()
        del blocks
    return len(deleted)


def no_neighbours(rows: int) -> tuple[np.ndarray, np.ndarray]:
    """knn_query's answer shape with no columns: (labels, distances) for `rows` probes."""
    return np.empty((rows, 0), np.uint64), np.empty((rows, 0), np.float32)


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def search_pool(threads: int) -> ThreadPoolExecutor:
    """The process-wide threads that search segments side by side (one pool per size asked for)."""
    threads = threads or cpu_cores()
    with _pool_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="hnsw-search")
        return _pools[threads]


class HnswIndex:
    def __init__(self, dim: int, model_id: str, params: HnswParams = HnswParams()):
        self.dim, self.model_id, self.params = dim, model_id, params
        self._segments: list[_Segment] = []  # the first comes with the first faces
        self._lock = RWLock()
        self._label_of: dict[str, int] = {}  # face id -> label (live faces)
        self._face_of: dict[int, tuple[str, str]] = {}  # label -> (face id, subject id), live faces
        self._next_label = 0
        self._tune_ef()
        self.deleted = 0
        self.built_at = time.time()  # when the graph was built from the database (kept by snapshots)
        self.loaded_from = "database"  # or "snapshot"
        self.snapshot_at = 0.0  # last snapshot written or loaded, epoch seconds

    # -- snapshots (server/index/snapshot.py owns the file format) ------------
    def save_graphs(self, path_of) -> dict:
        """Writes each segment's hnswlib graph to `path_of(i, "graph")` and a projected segment's
        projection and full vectors to `path_of(i, "dense")`; returns the label map, the segments'
        layout and the counters of that same moment.

        Searches go on meanwhile (read lock); changes wait until the graphs are written. The registry
        writes under the collection's lock, which changes take before this one: a change waiting here
        would hold back every new search (the lock lets a waiting writer go first).
        """
        with self._lock.read():
            segments = []
            for i, seg in enumerate(self._segments):
                graph_path = str(path_of(i, "graph"))
                seg.graph.save_index(graph_path)
                erased = erase_deleted_vectors(graph_path, seg.nodes)
                if erased != seg.nodes - seg.live:
                    raise ValueError(f"{graph_path}: {erased} deleted elements, the label map {seg.nodes - seg.live}")
                segments.append(
                    {
                        "start": seg.start,
                        "nodes": seg.nodes,
                        "capacity": seg.graph.get_max_elements(),
                        "projected": seg.projection is not None,
                    }
                )
                if seg.projection is not None:
                    with open(path_of(i, "dense"), "wb") as f:
                        np.save(f, seg.projection.axes)
                        np.save(f, np.float64(seg.projection.kept))
                        np.save(f, seg.vectors[: seg.nodes])
            return {
                "faces": [[label, f, s] for label, (f, s) in self._face_of.items()],
                "next_label": self._next_label,
                "deleted": self.deleted,
                "segments": segments,
                "built_at": self.built_at,
            }

    @classmethod
    def from_saved(
        cls,
        dim: int,
        model_id: str,
        params: HnswParams,
        graph_paths: list[str],
        state: dict,
        dense_paths: list[str | None] | None = None,
    ) -> HnswIndex:
        """The inverse of save_graphs. The caller has checked the files' checksums (hnswlib trusts its input).
        dense_paths: per segment, its projection and vectors file (None for a plain one).

        The segments come back as they were saved, whatever segment_size and pca_dims are now; new
        faces go to the last one while it has room under the current segment_size."""
        idx = cls(dim, model_id, params)
        layout = state["segments"]
        dense_paths = dense_paths or [None] * len(layout)
        if not len(layout) == len(graph_paths) == len(dense_paths):
            raise ValueError(f"{len(graph_paths)} graph files for {len(layout)} segments")
        expect_start = 0
        for path, dense, seg in zip(graph_paths, dense_paths, layout):
            if bool(seg.get("projected")) != (dense is not None):
                raise ValueError(f"segment from label {seg['start']}: projected {seg.get('projected')}, file {dense}")
            projection = vectors = None
            if dense is not None:
                with open(dense, "rb") as f:
                    axes, kept, vectors = (np.load(f, allow_pickle=False) for _ in range(3))
                projection = Projection(axes, float(kept))
                if axes.shape[0] != dim or vectors.shape != (seg["nodes"], dim):
                    raise ValueError(
                        f"{dense}: projection {axes.shape} and vectors {vectors.shape} for "
                        f"{seg['nodes']} faces of {dim} dimensions"
                    )
            graph = (
                hnswlib.Index(space="cosine", dim=dim) if projection is None else hnswlib.Index(space="ip", dim=projection.dims)
            )
            graph.load_index(str(path), max_elements=int(seg["capacity"]))
            if vectors is not None:  # saved as far as it was filled; new faces go in the rows after
                room = np.empty((graph.get_max_elements(), dim), np.float32)
                room[: len(vectors)] = vectors
                vectors = room
            if graph.element_count != seg["nodes"] or graph.M != params.m or seg["start"] != expect_start:
                raise ValueError(
                    f"graph holds {graph.element_count} elements with M={graph.M} from label "
                    f"{seg['start']}, the label map {seg['nodes']} with M={params.m} from {expect_start}"
                )
            idx._segments.append(_Segment(graph, expect_start, projection=projection, vectors=vectors))
            expect_start += graph.element_count
        if expect_start != state["next_label"]:
            raise ValueError(f"the graphs hold {expect_start} labels, the label map {state['next_label']}")
        for label, face_id, subject_id in state["faces"]:
            idx._remember(int(label), face_id, subject_id)
        starts = [seg.start for seg in idx._segments]
        live = np.bincount(np.searchsorted(starts, np.fromiter(idx._face_of, np.int64), side="right") - 1, minlength=len(starts))
        for seg, n in zip(idx._segments, live.tolist()):
            seg.live = n
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
        done = 0
        while done < len(new):
            room = self.params.segment_size - self._segments[-1].nodes if self._segments else 0
            if room <= 0:  # none yet, or full: the next faces start a new graph
                capacity = min(self.params.segment_size, max(self.params.initial_capacity, len(new) - done))
                incoming = [i for i, _ in new[done : done + PCA_SAMPLE]]
                self._segments.append(
                    _Segment.new(
                        self.dim, self.params, self._next_label, capacity, self._projection_for(capacity, vectors, incoming)
                    )
                )
                room = self.params.segment_size
            seg = self._segments[-1]
            part = new[done : done + room]
            need, cap = seg.nodes + len(part), seg.graph.get_max_elements()
            if need > cap:
                seg.resize(min(max(need, cap * 2), self.params.segment_size))
            labels = np.arange(self._next_label, self._next_label + len(part), dtype=np.int64)
            seg.add(vectors[[i for i, _ in part]], labels)
            for label, (i, face_id) in zip(labels.tolist(), part):
                self._remember(label, face_id, subject_ids[i])
            seg.live += len(part)
            self._next_label += len(part)
            done += len(part)
        if new:
            self._tune_ef()

    def _projection_for(self, capacity: int, vectors: np.ndarray, incoming: list[int]) -> Projection | None:
        """A new segment's projection, or None for a plain graph. Projected: with pca_dims set, a
        segment made to hold pca_min_faces (a build from the database knows its size) or one more
        segment of an index that already holds that many. Fitted on up to PCA_SAMPLE faces: the
        incoming ones (those rows of `vectors`), then a random sample of those indexed."""
        p = self.params
        if not p.pca_dims or p.pca_dims >= self.dim or max(capacity, len(self)) < p.pca_min_faces:
            return None
        sample = [unit(vectors[incoming])]
        want = PCA_SAMPLE - len(sample[0])
        if want > 0 and self._face_of:
            labels = np.random.default_rng(self._next_label).choice(
                np.fromiter(self._face_of, np.int64), min(want, len(self._face_of)), replace=False
            )
            labels.sort()
            for seg in self._segments:
                mine = labels[(labels >= seg.start) & (labels < seg.start + seg.nodes)]
                if len(mine):
                    sample.append(seg.full_vectors(mine))
        sample = np.concatenate(sample)
        return Projection.fit(sample, p.pca_dims) if len(sample) >= 4 * p.pca_dims else None

    def _tune_ef(self) -> None:
        """Each graph's ef for its size now (under the write lock, or before the index is shared)."""
        for seg in self._segments:
            ef = self.params.ef_for(seg.nodes, seg.projection is not None)
            if ef != seg.graph.ef:
                seg.graph.set_ef(ef)

    def _remember(self, label: int, face_id: str, subject_id: str) -> None:
        self._label_of[face_id] = label
        self._face_of[label] = (face_id, subject_id)

    def _segment_of(self, label: int) -> _Segment:
        return self._segments[bisect.bisect_right([s.start for s in self._segments], label) - 1]

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
        seg = self._segment_of(label)
        seg.graph.mark_deleted(label)
        seg.erase(label)
        seg.live -= 1
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
            labels, distances = self._query(q, k)
            faces = [self._face_of.get(int(lb)) for lb in labels[0]]
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

    def knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(labels, cosine distances) of the k nearest live faces of each row of q, best first.
        For tools (the benchmark); the service asks through search()."""
        with self._lock.read():
            return self._query(np.asarray(q, dtype=np.float32).reshape(-1, self.dim), k)

    def _query(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Every segment's k best, merged (under the caller's read lock).

        The segments other than the first go to the search pool while this thread searches the
        first; a segment the pool has not started by then is searched here too, so a busy pool
        (every core already serving another request) costs no waiting."""
        segs = [s for s in self._segments if s.live]
        if len(segs) <= 1:
            return segs[0].query(q, k) if segs else no_neighbours(len(q))
        pool = search_pool(self.params.search_threads)
        futures = [pool.submit(s.query, q, k) for s in segs[1:]]
        parts = [segs[0].query(q, k)]
        for seg, fut in zip(segs[1:], futures):
            parts.append(seg.query(q, k) if fut.cancel() else fut.result())
        labels = np.concatenate([p[0] for p in parts], axis=1)
        distances = np.concatenate([p[1] for p in parts], axis=1)
        order = np.argsort(distances, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(labels, order, 1), np.take_along_axis(distances, order, 1)

    def set_ef(self, ef: int | None) -> None:
        """Fixes every graph's ef until the next change re-tunes it (the benchmark's sweep);
        None: back to the parameters' ef."""
        with self._lock.write():
            if ef is None:
                self._tune_ef()
                return
            for seg in self._segments:
                seg.graph.set_ef(ef)

    def stats(self) -> IndexStats:
        with self._lock.read():
            return IndexStats(
                engine="hnsw",
                size=len(self._label_of),
                deleted=self.deleted,
                dimension=self.dim,
                model=self.model_id,
                memory_bytes=self._memory_estimate(),
                capacity=self._capacity(),
                built_at=self.built_at,
                loaded_from=self.loaded_from,
                snapshot_at=self.snapshot_at,
                params={
                    "m": self.params.m,
                    "ef_construction": self.params.ef_construction,
                    "ef_search": max((s.graph.ef for s in self._segments), default=self.params.ef_for(0)),
                    "segments": len(self._segments),
                    "projected_segments": sum(s.projection is not None for s in self._segments),
                    "projected_dimension": max((s.projection.dims for s in self._segments if s.projection), default=0),
                },
            )

    def _memory_estimate(self) -> int:
        # hnswlib's layout: per element, the vector + level-0 links (2M ints) + label; upper levels are ~1/M of that;
        # a projected segment holds the projected vector in its graph and the full one beside it
        total = 0
        for seg in self._segments:
            dims = self.dim if seg.projection is None else seg.projection.dims
            per = (dims * 4 + (2 * self.params.m + 1) * 4 + 8) * (1 + 1 / self.params.m)
            total += seg.graph.get_max_elements() * (per + (0 if seg.vectors is None else self.dim * 4))
        return int(total)

    def _capacity(self) -> int:
        return sum(s.graph.get_max_elements() for s in self._segments)


class HnswEngine:
    """The in-process hnswlib engine: every replica holds its own graphs and snapshots them to disk
    (snapshots=None: it rebuilds from the database at every start)."""

    name = "hnsw"
    shared = False

    def __init__(self, params: HnswParams = HnswParams(), snapshots=None):
        self.params, self.snapshots = params, snapshots  # snapshots: server.index.snapshot.SnapshotStore
        self.saves_indexes = snapshots is not None

    def create(self, collection: str, dim: int, model_id: str, expected_faces: int) -> "HnswIndex":
        return HnswIndex(dim, model_id, self.params.sized_for(expected_faces))

    def first_batch(self, batch: int) -> int:
        # a projected graph fits its projection on the first read (PCA_SAMPLE faces)
        return max(batch, PCA_SAMPLE) if self.params.pca_dims else batch

    def load(self, collection: str, expect: dict):
        return None if self.snapshots is None else self.snapshots.load(collection, self.params, expect)

    def save(self, collection: str, index: "HnswIndex", meta: dict) -> None:
        if self.snapshots is not None:
            self.snapshots.write(collection, index, meta)

    def forget(self, collection: str) -> None:
        if self.snapshots is not None:
            self.snapshots.remove(collection)

    def saved(self) -> dict[str, dict | None]:
        """{collection: what its snapshot was made for (SnapshotStore.made_for; None: files without a
        readable snapshot)} of every collection with files saved."""
        if self.snapshots is None:
            return {}
        return {c: self.snapshots.made_for(c) for c in self.snapshots.collections()}

    def made_for(self, collection: str) -> dict | None:
        """What the collection's snapshot was made for (SnapshotStore.made_for; None: none readable)."""
        return None if self.snapshots is None else self.snapshots.made_for(collection)

    def sweep(self, collection: str) -> int:
        """Removes the collection's saved files its snapshot does not list."""
        return 0 if self.snapshots is None else self.snapshots.sweep(collection)
