"""On-disk snapshots of collection indexes, so a restart loads a graph instead of rebuilding it.

A snapshot of collection C is two files in the index directory:

    C.<generation>.graph   the hnswlib graph, in hnswlib's own format
    C.snapshot             first line: sha256 of the rest; the rest: JSON with the
                           format version, what the graph was built for (model,
                           dimension, M, ef_construction, the collection's
                           created_ms), the change-log position it reflects, the
                           label -> (face id, subject id) map and the sha256 of the graph

The graph is written and fsynced first, then C.snapshot goes to a temporary
name, is fsynced and renamed over the old one: a crash leaves the old snapshot
or the new one, never a mix. Reading checks both checksums before hnswlib sees
a byte (it trusts its input). Any failed check raises SnapshotError and the
caller rebuilds from the database; a snapshot is never the only copy of
anything. One index directory belongs to one server process.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
from pathlib import Path

from server.index.hnsw import HnswIndex, HnswParams

FORMAT = 1


class SnapshotError(Exception):
    """The snapshot is missing a piece, corrupt, or was made for something else."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, collection: str) -> Path:
        return self.dir / f"{collection}.snapshot"

    def write(self, collection: str, index: HnswIndex, meta: dict) -> Path:
        """Atomically replaces the collection's snapshot; `meta` carries collection_created_ms and change_seq."""
        gen = f"{time.time_ns():x}{uuid.uuid4().hex[:6]}"
        graph = self.dir / f"{collection}.{gen}.graph"
        tmp = self.dir / f".{collection}.snapshot.{gen}.tmp"
        try:
            state = index.save_graph(str(graph))
            with open(graph, "rb+") as f:
                os.fsync(f.fileno())
            doc = {"format": FORMAT, "collection": collection, "model": index.model_id, "dimension": index.dim,
                   "m": index.params.m, "ef_construction": index.params.ef_construction, **meta,
                   "graph": graph.name, "graph_bytes": graph.stat().st_size, "graph_sha256": _sha256(graph),
                   "written_ms": int(time.time() * 1000), **state}
            body = json.dumps(doc, separators=(",", ":")).encode()
            with open(tmp, "wb") as f:
                f.write(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(collection))
            _fsync_dir(self.dir)
        except BaseException:
            for p in (tmp, graph):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            raise
        for old in self.dir.glob(f"{collection}.*.graph"):  # graphs of earlier snapshots
            if old.name != graph.name:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
        return self.path(collection)

    def read(self, collection: str) -> tuple[dict, Path] | None:
        """(document, graph path) after both checksums pass; None when there is no snapshot."""
        path = self.path(collection)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        digest, _, body = raw.partition(b"\n")
        if hashlib.sha256(body).hexdigest().encode() != digest:
            raise SnapshotError(f"{path.name}: checksum mismatch (truncated or corrupt)")
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise SnapshotError(f"{path.name}: not JSON ({exc})") from None
        if doc.get("format") != FORMAT or doc.get("collection") != collection:
            raise SnapshotError(f"{path.name}: format {doc.get('format')} for {doc.get('collection')!r}")
        graph = self.dir / doc["graph"]
        if not graph.is_file() or graph.stat().st_size != doc["graph_bytes"]:
            raise SnapshotError(f"{graph.name}: missing or of the wrong size")
        if _sha256(graph) != doc["graph_sha256"]:
            raise SnapshotError(f"{graph.name}: checksum mismatch (corrupt)")
        return doc, graph

    def load(self, collection: str, params: HnswParams, expect: dict) -> tuple[HnswIndex, dict] | None:
        """The collection's index and snapshot document, or None when there is no snapshot.

        `expect`: model, dimension, collection_created_ms, min_written_ms; a snapshot made
        for another model, other HNSW build parameters, an earlier collection of the same
        name, or older than the change log reaches back, is refused.
        """
        found = self.read(collection)
        if found is None:
            return None
        doc, graph = found
        for key in ("model", "dimension", "collection_created_ms"):
            if doc.get(key) != expect[key]:
                raise SnapshotError(f"made for {key} {doc.get(key)!r}, now {expect[key]!r}")
        if (doc["m"], doc["ef_construction"]) != (params.m, params.ef_construction):
            raise SnapshotError(f"built with M={doc['m']} ef_construction={doc['ef_construction']}, "
                                f"now M={params.m} ef_construction={params.ef_construction}")
        if doc["written_ms"] < expect["min_written_ms"]:
            raise SnapshotError("older than the change log's retention")
        try:
            index = HnswIndex.from_saved(doc["dimension"], doc["model"], params, str(graph), doc)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise SnapshotError(f"{graph.name}: {exc}") from None
        index.snapshot_at = doc["written_ms"] / 1000
        return index, doc

    def remove(self, collection: str) -> None:
        for p in [self.path(collection), *self.dir.glob(f"{collection}.*.graph")]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
