"""On-disk snapshots of collection indexes, so a restart loads a graph instead of rebuilding it.

A snapshot of collection C is a .snapshot file and one graph file per segment in the
index directory:

    C.<generation>.<i>.graph  segment i's hnswlib graph, in hnswlib's own format
    C.<generation>.<i>.dense  a projected segment's projection and full vectors: three
                              .npy arrays one after the other (axes, energy kept, vectors)
    C.snapshot                first line: sha256 of the rest; the rest: JSON with the
                              format version, what the graphs were built for (model,
                              dimension, M, ef_construction, the collection's
                              created_ms), the change-log position it reflects, the
                              label -> (face id, subject id) map, the segments' layout
                              and the size and sha256 of each graph and dense file

The graphs are written and fsynced first, then C.snapshot goes to a temporary
name, is fsynced and renamed over the old one: a crash leaves the old snapshot
or the new one, never a mix. Reading checks every checksum before hnswlib sees
a byte (it trusts its input). Format 1 (one graph, C.<generation>.graph, before
segments) and format 2 (no projected segments) are still read. Any failed check raises SnapshotError and the
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

from server.index.base import IndexLoadError
from server.index.hnsw import HnswIndex, HnswParams

FORMAT = 3
READABLE = (1, 2, 3)


class SnapshotError(IndexLoadError):
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
        files: list[Path] = []
        tmp = self.dir / f".{collection}.snapshot.{gen}.tmp"

        def file_path(i: int, kind: str) -> Path:
            files.append(self.dir / f"{collection}.{gen}.{i}.{kind}")
            return files[-1]

        def described(kind: str) -> list[dict]:
            return [{"name": p.name, "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files if p.suffix == kind]

        try:
            state = index.save_graphs(file_path)
            for path in files:
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
            doc = {
                "format": FORMAT,
                "collection": collection,
                "model": index.model_id,
                "dimension": index.dim,
                "m": index.params.m,
                "ef_construction": index.params.ef_construction,
                **meta,
                "graphs": described(".graph"),
                "dense": described(".dense"),
                "written_ms": int(time.time() * 1000),
                **state,
            }
            body = json.dumps(doc, separators=(",", ":")).encode()
            with open(tmp, "wb") as f:
                f.write(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(collection))
            _fsync_dir(self.dir)
        except BaseException:
            for p in (tmp, *files):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            raise
        keep = {p.name for p in files}
        for old in self._files(collection):  # graphs of earlier snapshots
            if old.name not in keep:
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
        return self.path(collection)

    def collections(self) -> set[str]:
        """Every collection with anything in the directory: a snapshot, its files, or what a write
        left behind (a crash between writing a graph and renaming the snapshot over the old one)."""
        found = set()
        for p in self.dir.iterdir():
            parts = p.name.split(".")
            if p.name.startswith("."):  # a write's .C.snapshot.gen.tmp; other dot files (.DS_Store) are no one's
                name = parts[1] if len(parts) == 5 and parts[2] == "snapshot" and parts[4] == "tmp" else ""
            else:
                name = parts[0]
            if name:
                found.add(name)
        return found

    def made_for(self, collection: str) -> dict | None:
        """What the collection's snapshot was made for, from its document alone (the graphs' checksums
        are load's to check): {collection_created_ms, change_seq, written_ms, files}; None when there is no
        readable snapshot."""
        try:
            raw = self.path(collection).read_bytes()
            digest, _, body = raw.partition(b"\n")
            if hashlib.sha256(body).hexdigest().encode() != digest:
                return None
            doc = json.loads(body)
            files = {g["name"] for g in doc.get("graphs", []) + doc.get("dense", [])} | (
                {doc["graph"]} if "graph" in doc else set()
            )
            return {
                "collection_created_ms": int(doc["collection_created_ms"]),
                "change_seq": doc.get("change_seq"),
                "written_ms": int(doc["written_ms"]),
                "files": files,
            }
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def sweep(self, collection: str) -> int:
        """Removes the collection's files its snapshot does not list (a write killed after the rename, before
        it removed the previous snapshot's graphs: they hold faces deleted since). Returns how many."""
        doc = self.made_for(collection)
        if doc is None:
            return 0
        stale = [p for p in self._files(collection) if p.name not in doc["files"]] + self._unfinished(collection)
        for p in stale:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        return len(stale)

    def _files(self, collection: str) -> list[Path]:
        return [*self.dir.glob(f"{collection}.*.graph"), *self.dir.glob(f"{collection}.*.dense")]

    def _unfinished(self, collection: str) -> list[Path]:
        """Snapshot documents a write left under their temporary name (write()'s `tmp`)."""
        return list(self.dir.glob(f".{collection}.snapshot.*.tmp"))

    def read(self, collection: str) -> tuple[dict, list[Path], list[Path | None]] | None:
        """(document, graph paths, dense paths per segment or None) after every checksum passes;
        None when there is no snapshot. Format 1 and 2 documents come back in format 3's terms."""
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
        if doc.get("format") not in READABLE or doc.get("collection") != collection:
            raise SnapshotError(f"{path.name}: format {doc.get('format')} for {doc.get('collection')!r}")
        try:
            if doc["format"] == 1:
                doc["graphs"] = [{"name": doc["graph"], "bytes": doc["graph_bytes"], "sha256": doc["graph_sha256"]}]
                doc["segments"] = [{"start": 0, "nodes": doc["next_label"], "capacity": doc["capacity"]}]
            graphs = [(self.dir / g["name"], g["bytes"], g["sha256"]) for g in doc["graphs"]]
            dense = [(self.dir / g["name"], g["bytes"], g["sha256"]) for g in doc.get("dense", [])]
            projected = [bool(seg.get("projected")) for seg in doc["segments"]]
        except (KeyError, TypeError) as exc:
            raise SnapshotError(f"{path.name}: incomplete ({exc!r})") from None
        if len(dense) != sum(projected):
            raise SnapshotError(f"{path.name}: {len(dense)} dense files for {sum(projected)} projected segments")
        for file, size, digest in graphs + dense:
            if not file.is_file() or file.stat().st_size != size:
                raise SnapshotError(f"{file.name}: missing or of the wrong size")
            if _sha256(file) != digest:
                raise SnapshotError(f"{file.name}: checksum mismatch (corrupt)")
        dense_of = iter(d for d, _, _ in dense)
        return doc, [g for g, _, _ in graphs], [next(dense_of) if p else None for p in projected]

    def load(self, collection: str, params: HnswParams, expect: dict) -> tuple[HnswIndex, dict] | None:
        """The collection's index and snapshot document, or None when there is no snapshot.

        `expect`: model, dimension, collection_created_ms, min_written_ms; a snapshot made
        for another model, other HNSW build parameters, an earlier collection of the same
        name, or older than the change log reaches back, is refused.
        """
        found = self.read(collection)
        if found is None:
            return None
        doc, graphs, dense = found
        for key in ("model", "dimension", "collection_created_ms"):
            if doc.get(key) != expect[key]:
                raise SnapshotError(f"made for {key} {doc.get(key)!r}, now {expect[key]!r}")
        if (doc["m"], doc["ef_construction"]) != (params.m, params.ef_construction):
            raise SnapshotError(
                f"built with M={doc['m']} ef_construction={doc['ef_construction']}, "
                f"now M={params.m} ef_construction={params.ef_construction}"
            )
        if doc["written_ms"] < expect["min_written_ms"]:
            raise SnapshotError("older than the change log's retention")
        try:
            index = HnswIndex.from_saved(
                doc["dimension"],
                doc["model"],
                params,
                [str(g) for g in graphs],
                doc,
                [None if d is None else str(d) for d in dense],
            )
        except (RuntimeError, ValueError, KeyError, TypeError, EOFError) as exc:
            raise SnapshotError(f"{collection}.snapshot: {exc}") from None
        index.snapshot_at = doc["written_ms"] / 1000
        return index, doc

    def remove(self, collection: str) -> None:
        for p in [self.path(collection), *self._files(collection), *self._unfinished(collection)]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
