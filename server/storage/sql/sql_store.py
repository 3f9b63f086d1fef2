"""FaceStore: collections, subjects, faces and API keys in SQL (SQLite or MySQL).

The database is the source of truth. Every write is one transaction: a face
and the subject it creates are committed together or not at all. Identifier
columns compare byte-wise on both backends (utf8mb4_bin on MySQL), so
"Alice" and "alice" are two subjects everywhere.

Every write that changes which faces a search index should hold also appends
a row to `face_changes` in the same transaction (op add / delete / update,
or drop for a whole collection). Each server replica follows that log to keep
its in-memory indexes current (server/index/sync.py); rows older than the
retention period are pruned.
"""
from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time

import numpy as np

from server import errors
from server.records import ApiKey, Collection, FaceRecord, NewFace, Subject
from server.records import MAX_METADATA_ENTRIES

log = logging.getLogger("facesvc.store")


def now_ms() -> int:
    return int(time.time() * 1000)


def _emb_bytes(v: np.ndarray) -> bytes:
    return np.asarray(v, dtype="<f4").tobytes()


def _emb_array(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype="<f4").copy()


class _Duplicate(Exception):
    """A face id that is already committed (an idempotent retry)."""


class _Retry(Exception):
    """The transaction lost a race it can win by running again."""


class ConnectionPool:
    """At most `size` connections; a connection that failed mid-use is closed, not reused."""

    def __init__(self, dialect, size: int, wait_s: float = 10.0):
        self.d = dialect
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._wait_s = wait_s

    @contextlib.contextmanager
    def connection(self):
        if not self._slots.acquire(timeout=self._wait_s):
            raise errors.unavailable(errors.STORE_UNAVAILABLE, "all database connections are busy; retry")
        conn = None
        try:
            try:
                conn = self.d.checkout(self._idle.get_nowait())
            except queue.Empty:
                conn = self.d.connect()
            yield conn
            self._idle.put(conn)
        except BaseException:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            raise
        finally:
            self._slots.release()

    def close(self) -> None:
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                conn.close()


class SqlFaceStore:
    def __init__(self, dialect, pool_size: int = 8):
        self.d = dialect
        self.pool = ConnectionPool(dialect, pool_size)

    @property
    def backend(self) -> str:
        return self.d.name

    def describe(self) -> str:
        return self.d.describe()

    def close(self) -> None:
        self.pool.close()

    # -- plumbing ------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self, write: bool = True):
        """One transaction; `q(sql, *params)` runs a statement in it. DB outages become UNAVAILABLE."""
        try:
            with self.pool.connection() as conn:
                self.d.begin(conn, write)
                try:
                    yield lambda sql, *params: self.d.execute(conn, sql, params)
                    conn.commit()
                except BaseException:
                    with contextlib.suppress(Exception):
                        conn.rollback()
                    raise
        except Exception as exc:
            if isinstance(exc, errors.FaceServiceError) or not self.d.is_unavailable(exc):
                raise
            log.warning("database unavailable: %s", exc)
            # the driver's text names hosts, ports and users: it goes to the log, the caller gets the reason
            raise errors.unavailable(errors.STORE_UNAVAILABLE, "the database is unavailable; nothing was written; retry",
                                     detail=f"{type(exc).__name__}: {exc}") from exc

    def _retrying(self, fn, attempts: int = 3):
        """Run a write transaction again after a deadlock / lock timeout (MySQL)."""
        for attempt in range(attempts):
            try:
                return fn()
            except _Retry:
                if attempt == attempts - 1:
                    raise errors.unavailable(errors.STORE_UNAVAILABLE, "write conflict; retry") from None
            except errors.FaceServiceError as exc:
                cause = exc.__cause__
                code = self.d.error_code(cause) if cause is not None else None
                if code not in self.d.retry_errors or attempt == attempts - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))

    # -- schema --------------------------------------------------------------
    def migrate(self) -> int:
        """Create or upgrade the schema; returns the version now in place."""
        target = len(self.d.schema)
        try:
            with self.pool.connection() as conn:
                self.d.create_version_table(conn)
                with self.d.migration_lock(conn):
                    row = self.d.execute(conn, "SELECT MAX(version) FROM schema_version").fetchone()
                    current = row[0] or 0
                    if current > target:
                        raise RuntimeError(
                            f"database schema version {current} is newer than this server understands ({target}); upgrade the server")
                    for version in range(current + 1, target + 1):
                        log.info("migrating %s schema to version %d", self.d.name, version)
                        for stmt in self.d.schema[version - 1]:
                            self.d.execute(conn, stmt)
                        self.d.execute(conn, "INSERT INTO schema_version (version, applied_ms) VALUES (?, ?)", (version, now_ms()))
                        if self.d.name == "sqlite":
                            conn.commit()
        except RuntimeError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable, refused login, unknown database: one line, no traceback
            raise RuntimeError(f"cannot reach the database {self.describe()}: {type(exc).__name__}: {exc}") from exc
        return target

    # -- collections ---------------------------------------------------------
    _COLLECTION_COLUMNS = """c.collection_id, c.display_name, c.liveness_policy, c.created_ms,
        (SELECT COUNT(*) FROM subjects s WHERE s.collection_id = c.collection_id),
        (SELECT COUNT(*) FROM faces f WHERE f.collection_id = c.collection_id)"""

    def create_collection(self, collection_id: str, display_name: str, liveness_policy: str) -> Collection:
        created = now_ms()
        try:
            with self._tx() as q:
                q("INSERT INTO collections (collection_id, display_name, liveness_policy, created_ms) VALUES (?, ?, ?, ?)",
                  collection_id, display_name, liveness_policy, created)
        except self.d.integrity_errors:
            raise errors.already_exists(errors.COLLECTION_EXISTS, f"collection {collection_id!r} already exists",
                                        collection=collection_id) from None
        return Collection(collection_id, display_name, liveness_policy, created)

    def get_collection(self, collection_id: str) -> Collection:
        with self._tx(write=False) as q:
            row = q(f"SELECT {self._COLLECTION_COLUMNS} FROM collections c WHERE c.collection_id = ?", collection_id).fetchone()
        if row is None:
            raise errors.not_found(errors.COLLECTION_NOT_FOUND, f"collection {collection_id!r} does not exist",
                                   collection=collection_id)
        return Collection(*row)

    def get_collection_policy(self, collection_id: str) -> str:
        """The liveness policy alone (no counts): cheap enough for every request."""
        with self._tx(write=False) as q:
            return self._collection_row(q, collection_id)[1]

    def list_collections(self, after: str, limit: int) -> list[Collection]:
        with self._tx(write=False) as q:
            rows = q(f"SELECT {self._COLLECTION_COLUMNS} FROM collections c WHERE c.collection_id > ? "
                     "ORDER BY c.collection_id LIMIT ?", after, limit).fetchall()
        return [Collection(*r) for r in rows]

    def delete_collection(self, collection_id: str) -> tuple[int, int]:
        """Deletes the collection with its subjects, faces and keys; returns (subjects, faces) removed."""
        with self._tx() as q:
            c = self._collection_row(q, collection_id)
            subjects = q("SELECT COUNT(*) FROM subjects WHERE collection_id = ?", collection_id).fetchone()[0]
            faces = q("SELECT COUNT(*) FROM faces WHERE collection_id = ?", collection_id).fetchone()[0]
            q("DELETE FROM collections WHERE collection_id = ?", c[0])
            self._log(q, collection_id, None, "drop")
        return subjects, faces

    def _collection_row(self, q, collection_id: str):
        row = q("SELECT collection_id, liveness_policy FROM collections WHERE collection_id = ?", collection_id).fetchone()
        if row is None:
            raise errors.not_found(errors.COLLECTION_NOT_FOUND, f"collection {collection_id!r} does not exist",
                                   collection=collection_id)
        return row

    # -- subjects and faces --------------------------------------------------
    def subject_face_count(self, collection_id: str, subject_id: str) -> int | None:
        """Faces the subject holds, or None if there is no such subject (the collection must exist)."""
        with self._tx(write=False) as q:
            self._collection_row(q, collection_id)
            if q("SELECT 1 FROM subjects WHERE collection_id = ? AND subject_id = ?", collection_id, subject_id).fetchone() is None:
                return None
            return q("SELECT COUNT(*) FROM faces WHERE collection_id = ? AND subject_id = ?",
                     collection_id, subject_id).fetchone()[0]

    def add_face(self, collection_id: str, subject_id: str, face: NewFace, *, allow_existing: bool,
                 max_faces: int, metadata: dict[str, str] | None = None) -> tuple[FaceRecord, bool]:
        """Commit `face` to the subject, creating the subject if needed; returns (face, subject_created).

        - subject exists and not `allow_existing` -> ALREADY_REGISTERED (two concurrent first
          registrations of one subject: exactly one wins, by the primary key);
        - the subject already holds `max_faces` -> FACE_LIMIT_REACHED;
        - the same face id again (a retried Register) -> the committed face, nothing new.
        """
        try:
            return self._retrying(lambda: self._add_face_tx(collection_id, subject_id, face, allow_existing,
                                                            max_faces, metadata or {}))
        except _Duplicate:
            existing = self.get_face(collection_id, face.face_id)
            if existing.subject_id != subject_id:
                raise errors.precondition(errors.STAGING_MISMATCH, "this face is already registered to another subject",
                                          face_id=face.face_id) from None
            return existing, False

    def _add_face_tx(self, collection_id, subject_id, face: NewFace, allow_existing, max_faces, metadata):
        ts = now_ms()
        with self._tx() as q:
            self._collection_row(q, collection_id)
            if q("SELECT 1 FROM faces WHERE face_id = ?", face.face_id).fetchone():
                raise _Duplicate()
            # Lock the subject row first (one X lock per subject, so concurrent adds queue instead of deadlocking).
            row = q(f"SELECT metadata FROM subjects WHERE collection_id = ? AND subject_id = ?{self.d.for_update}",
                    collection_id, subject_id).fetchone()
            created = row is None
            if created:
                try:
                    q("INSERT INTO subjects (collection_id, subject_id, metadata, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?)",
                      collection_id, subject_id, json.dumps(metadata, sort_keys=True), ts, ts)
                except self.d.integrity_errors:
                    if not self._exists(q, "subjects WHERE collection_id = ? AND subject_id = ?", collection_id, subject_id):
                        raise  # some other constraint: not "already registered"
                    if allow_existing:
                        raise _Retry() from None  # created concurrently: start over and take its lock
                    raise self._already_registered(collection_id, subject_id) from None
            else:
                if not allow_existing:
                    raise self._already_registered(collection_id, subject_id)
                count = q("SELECT COUNT(*) FROM faces WHERE collection_id = ? AND subject_id = ?",
                          collection_id, subject_id).fetchone()[0]
                if count >= max_faces:
                    raise errors.precondition(
                        errors.FACE_LIMIT_REACHED, f"subject {subject_id!r} already holds {count} faces (limit {max_faces})",
                        limit=max_faces)
                merged = {**json.loads(row[0]), **metadata}
                if len(merged) > MAX_METADATA_ENTRIES:  # the limit holds however the entries arrive
                    raise errors.validation("metadata", f"the subject would hold {len(merged)} metadata entries; "
                                            f"at most {MAX_METADATA_ENTRIES}", limit=MAX_METADATA_ENTRIES)
                q("UPDATE subjects SET metadata = ?, updated_ms = ? WHERE collection_id = ? AND subject_id = ?",
                  json.dumps(merged, sort_keys=True), ts, collection_id, subject_id)
            try:
                q("INSERT INTO faces (face_id, collection_id, subject_id, model_id, embedding, quality, crop, created_ms) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", face.face_id, collection_id, subject_id, face.model_id,
                  _emb_bytes(face.embedding), float(face.quality), face.crop, ts)
            except self.d.integrity_errors:
                if not self._exists(q, "faces WHERE face_id = ?", face.face_id):
                    raise
                raise _Duplicate() from None  # a concurrent retry of the same Register committed first
            self._log(q, collection_id, face.face_id, "add")
        return FaceRecord(face.face_id, collection_id, subject_id, face.model_id, float(face.quality), ts,
                          embedding=face.embedding, crop=face.crop), created

    @staticmethod
    def _already_registered(collection_id: str, subject_id: str) -> errors.FaceServiceError:
        return errors.already_exists(
            errors.ALREADY_REGISTERED, f"subject {subject_id!r} is already registered in {collection_id!r}; "
            "set add_face to add another face to it", collection=collection_id, subject_id=subject_id)

    @staticmethod
    def _exists(q, where: str, *params) -> bool:
        """Sees rows other transactions just committed (READ COMMITTED on MySQL; SQLite serialises writers)."""
        return q(f"SELECT 1 FROM {where}", *params).fetchone() is not None

    _FACE_COLUMNS = "face_id, collection_id, subject_id, model_id, quality, created_ms, embedding, crop"

    @staticmethod
    def _face(row, with_embedding: bool) -> FaceRecord:
        f = FaceRecord(*row[:6])
        if with_embedding:
            f.embedding = _emb_array(row[6])
        f.crop = None if row[7] is None else bytes(row[7])
        return f

    def get_face(self, collection_id: str, face_id: str) -> FaceRecord:
        with self._tx(write=False) as q:
            row = q(f"SELECT {self._FACE_COLUMNS} FROM faces WHERE collection_id = ? AND face_id = ?",
                    collection_id, face_id).fetchone()
        if row is None:
            raise errors.not_found(errors.FACE_NOT_FOUND, f"face {face_id!r} does not exist in {collection_id!r}",
                                   face_id=face_id)
        return self._face(row, True)

    def get_subject(self, collection_id: str, subject_id: str, with_embeddings: bool = False) -> Subject:
        with self._tx(write=False) as q:
            self._collection_row(q, collection_id)
            row = q("SELECT metadata, created_ms, updated_ms FROM subjects WHERE collection_id = ? AND subject_id = ?",
                    collection_id, subject_id).fetchone()
            if row is None:
                raise errors.not_found(errors.SUBJECT_NOT_FOUND, f"subject {subject_id!r} is not registered in {collection_id!r}",
                                       collection=collection_id, subject_id=subject_id)
            faces = q(f"SELECT {self._FACE_COLUMNS} FROM faces WHERE collection_id = ? AND subject_id = ? "
                      "ORDER BY created_ms, face_id", collection_id, subject_id).fetchall()
        recs = [self._face(f, with_embeddings) for f in faces]
        return Subject(collection_id, subject_id, json.loads(row[0]), row[1], row[2], recs, len(recs))

    def list_subjects(self, collection_id: str, after: str, limit: int) -> list[Subject]:
        """Subjects ordered by id, strictly after `after` (keyset pagination), with face counts."""
        with self._tx(write=False) as q:
            self._collection_row(q, collection_id)
            rows = q("SELECT s.subject_id, s.metadata, s.created_ms, s.updated_ms, "
                     "(SELECT COUNT(*) FROM faces f WHERE f.collection_id = s.collection_id AND f.subject_id = s.subject_id) "
                     "FROM subjects s WHERE s.collection_id = ? AND s.subject_id > ? ORDER BY s.subject_id LIMIT ?",
                     collection_id, after, limit).fetchall()
        return [Subject(collection_id, r[0], json.loads(r[1]), r[2], r[3], [], r[4]) for r in rows]

    def update_subject_metadata(self, collection_id: str, subject_id: str, metadata: dict[str, str]) -> Subject:
        with self._tx() as q:
            self._collection_row(q, collection_id)
            n = q("UPDATE subjects SET metadata = ?, updated_ms = ? WHERE collection_id = ? AND subject_id = ?",
                  json.dumps(metadata, sort_keys=True), now_ms(), collection_id, subject_id).rowcount
        if n == 0:
            self.get_subject(collection_id, subject_id)  # raises SUBJECT_NOT_FOUND (MySQL counts unchanged rows as 0)
        return self.get_subject(collection_id, subject_id)

    def delete_subject(self, collection_id: str, subject_id: str) -> list[str]:
        """Deletes the subject and all its faces; returns the ids of the faces that went."""
        with self._tx() as q:
            self._collection_row(q, collection_id)
            faces = [r[0] for r in q(f"SELECT face_id FROM faces WHERE collection_id = ? AND subject_id = ?{self.d.for_update}",
                                     collection_id, subject_id).fetchall()]
            n = q("DELETE FROM subjects WHERE collection_id = ? AND subject_id = ?", collection_id, subject_id).rowcount
            if n == 0:
                raise errors.not_found(errors.SUBJECT_NOT_FOUND, f"subject {subject_id!r} is not registered in {collection_id!r}",
                                       collection=collection_id, subject_id=subject_id)
            for face_id in faces:
                self._log(q, collection_id, face_id, "delete")
        return faces

    def delete_face(self, collection_id: str, face_id: str) -> FaceRecord:
        with self._tx() as q:
            self._collection_row(q, collection_id)
            row = q(f"SELECT {self._FACE_COLUMNS} FROM faces WHERE collection_id = ? AND face_id = ?",
                    collection_id, face_id).fetchone()
            if row is None:
                raise errors.not_found(errors.FACE_NOT_FOUND, f"face {face_id!r} does not exist in {collection_id!r}",
                                       face_id=face_id)
            q("DELETE FROM faces WHERE face_id = ?", face_id)
            self._log(q, collection_id, face_id, "delete")
            q("UPDATE subjects SET updated_ms = ? WHERE collection_id = ? AND subject_id = ?", now_ms(), collection_id, row[2])
        return self._face(row, False)

    # -- search index (re)builds -----------------------------------------------
    def collection_embeddings(self, collection_id: str, model_id: str, after_face_id: str, limit: int):
        """[(face_id, subject_id, embedding)] of one model, in face id order after `after_face_id`."""
        with self._tx(write=False) as q:
            rows = q("SELECT face_id, subject_id, embedding FROM faces WHERE collection_id = ? AND model_id = ? "
                     "AND face_id > ? ORDER BY face_id LIMIT ?", collection_id, model_id, after_face_id, limit).fetchall()
        return [(r[0], r[1], _emb_array(r[2])) for r in rows]

    # -- re-embedding (scripts/reembed.py) -----------------------------------
    def faces_with_crops(self, after_face_id: str, limit: int, collection_id: str = "") -> list[FaceRecord]:
        """Faces that have a stored crop, in face id order (all collections when collection_id is empty)."""
        where = "crop IS NOT NULL AND face_id > ?" + (" AND collection_id = ?" if collection_id else "")
        params = (after_face_id, collection_id) if collection_id else (after_face_id,)
        with self._tx(write=False) as q:
            rows = q(f"SELECT {self._FACE_COLUMNS} FROM faces WHERE {where} ORDER BY face_id LIMIT ?", *params, limit).fetchall()
        return [self._face(r, True) for r in rows]

    def update_embedding(self, face_id: str, model_id: str, embedding: np.ndarray) -> None:
        with self._tx() as q:
            row = q("SELECT collection_id FROM faces WHERE face_id = ?", face_id).fetchone()
            if row is None:
                return  # deleted meanwhile
            q("UPDATE faces SET model_id = ?, embedding = ? WHERE face_id = ?", model_id, _emb_bytes(embedding), face_id)
            self._log(q, row[0], face_id, "update")

    def faces_by_id(self, collection_id: str, model_id: str, face_ids: list[str]):
        """{face_id: (subject_id, embedding)} of those faces that exist with embeddings of `model_id`."""
        out = {}
        with self._tx(write=False) as q:
            for s in range(0, len(face_ids), 500):
                part = face_ids[s:s + 500]
                rows = q(f"SELECT face_id, subject_id, embedding FROM faces WHERE collection_id = ? AND model_id = ? "
                         f"AND face_id IN ({', '.join('?' * len(part))})", collection_id, model_id, *part).fetchall()
                out.update({r[0]: (r[1], _emb_array(r[2])) for r in rows})
        return out

    def count_faces(self, collection_id: str, model_id: str) -> int:
        with self._tx(write=False) as q:
            return q("SELECT COUNT(*) FROM faces WHERE collection_id = ? AND model_id = ?", collection_id, model_id).fetchone()[0]

    def collection_created_ms(self, collection_id: str) -> int | None:
        """When the collection was created (tells a re-created collection from the old one), or None."""
        with self._tx(write=False) as q:
            row = q("SELECT created_ms FROM collections WHERE collection_id = ?", collection_id).fetchone()
        return None if row is None else row[0]

    # -- the change log --------------------------------------------------------
    @staticmethod
    def _log(q, collection_id: str, face_id: str | None, op: str) -> None:
        q("INSERT INTO face_changes (collection_id, face_id, op, created_ms) VALUES (?, ?, ?, ?)",
          collection_id, face_id, op, now_ms())

    def last_change_seq(self) -> int:
        with self._tx(write=False) as q:
            return q("SELECT MAX(seq) FROM face_changes").fetchone()[0] or 0

    def changes_after(self, seq: int, limit: int, collection_id: str = "") -> list[tuple[int, str, str | None, str]]:
        """[(seq, collection_id, face_id, op)] committed with a sequence number above `seq`, in order."""
        where, params = "seq > ?", (seq,)
        if collection_id:
            where, params = "seq > ? AND collection_id = ?", (seq, collection_id)
        with self._tx(write=False) as q:
            return [tuple(r) for r in q(f"SELECT seq, collection_id, face_id, op FROM face_changes WHERE {where} "
                                        "ORDER BY seq LIMIT ?", *params, limit).fetchall()]

    def changes_at(self, seqs: list[int]) -> list[tuple[int, str, str | None, str]]:
        """The rows of these sequence numbers that are committed now (late commits below the high-water mark)."""
        if not seqs:
            return []
        with self._tx(write=False) as q:
            return [tuple(r) for r in q(f"SELECT seq, collection_id, face_id, op FROM face_changes "
                                        f"WHERE seq IN ({', '.join('?' * len(seqs))}) ORDER BY seq", *seqs).fetchall()]

    def prune_changes(self, before_ms: int) -> int:
        with self._tx() as q:
            return q("DELETE FROM face_changes WHERE created_ms < ?", before_ms).rowcount

    # -- API keys ------------------------------------------------------------
    def create_api_key(self, key_id: str, collection_id: str, key_hash: str, description: str) -> ApiKey:
        created = now_ms()
        with self._tx() as q:
            self._collection_row(q, collection_id)
            q("INSERT INTO api_keys (key_id, collection_id, key_hash, description, created_ms) VALUES (?, ?, ?, ?, ?)",
              key_id, collection_id, key_hash, description, created)
        return ApiKey(key_id, collection_id, description, created)

    def find_api_key(self, key_hash: str) -> ApiKey | None:
        with self._tx(write=False) as q:
            row = q("SELECT key_id, collection_id, description, created_ms FROM api_keys WHERE key_hash = ?", key_hash).fetchone()
        return None if row is None else ApiKey(*row)

    def list_api_keys(self, collection_id: str) -> list[ApiKey]:
        with self._tx(write=False) as q:
            self._collection_row(q, collection_id)
            rows = q("SELECT key_id, collection_id, description, created_ms FROM api_keys WHERE collection_id = ? "
                     "ORDER BY created_ms, key_id", collection_id).fetchall()
        return [ApiKey(*r) for r in rows]

    def delete_api_key(self, collection_id: str, key_id: str) -> None:
        with self._tx() as q:
            n = q("DELETE FROM api_keys WHERE collection_id = ? AND key_id = ?", collection_id, key_id).rowcount
        if n == 0:
            raise errors.not_found(errors.API_KEY_NOT_FOUND, f"no key {key_id!r} in collection {collection_id!r}", key_id=key_id)
