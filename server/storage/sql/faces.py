"""Subjects and faces in SQL: the SubjectStore role (and what re-embedding and index builds read)."""

from __future__ import annotations

import json

import numpy as np

from server import errors
from server.records import MAX_METADATA_ENTRIES, FaceRecord, NewFace, Subject
from server.storage.sql.database import SqlDatabase, _Duplicate, _emb_array, _emb_bytes, _Retry, now_ms


class SqlFaces(SqlDatabase):
    def subject_face_count(self, collection_id: str, subject_id: str) -> int | None:
        """Faces the subject holds, or None if there is no such subject (the collection must exist)."""
        with self._tx(write=False) as q:
            self._collection_row(q, collection_id)
            if (
                q("SELECT 1 FROM subjects WHERE collection_id = ? AND subject_id = ?", collection_id, subject_id).fetchone()
                is None
            ):
                return None
            return q(
                "SELECT COUNT(*) FROM faces WHERE collection_id = ? AND subject_id = ?", collection_id, subject_id
            ).fetchone()[0]

    def add_face(
        self,
        collection_id: str,
        subject_id: str,
        face: NewFace,
        *,
        allow_existing: bool,
        max_faces: int,
        metadata: dict[str, str] | None = None,
    ) -> tuple[FaceRecord, bool, Subject]:
        """Commit `face` to the subject, creating the subject if needed; returns (face, subject_created,
        the subject as the commit left it: read in the same transaction, so a database lost just after
        the commit cannot turn a stored face into an error that says nothing was written).

        - subject exists and not `allow_existing` -> ALREADY_REGISTERED (two concurrent first
          registrations of one subject: exactly one wins, by the primary key);
        - the subject already holds `max_faces` -> FACE_LIMIT_REACHED;
        - the same face id again (a retried Register) -> the committed face, nothing new.
        """
        try:
            return self._retrying(
                lambda: self._add_face_tx(collection_id, subject_id, face, allow_existing, max_faces, metadata or {})
            )
        except _Duplicate:
            existing = self.get_face(collection_id, face.face_id)
            if existing.subject_id != subject_id:
                raise errors.precondition(
                    errors.STAGING_MISMATCH, "this face is already registered to another subject", face_id=face.face_id
                ) from None
            return existing, False, self.get_subject(collection_id, subject_id)

    def _locked_subject(self, q, collection_id: str, subject_id: str):
        """The subject's row (its metadata), locked to the end of the transaction; None when there is none.
        Every write to a subject or its faces takes this lock first: one order, so they queue, not deadlock."""
        return q(
            f"SELECT metadata FROM subjects WHERE collection_id = ? AND subject_id = ?{self.d.for_update}",
            collection_id,
            subject_id,
        ).fetchone()

    def _add_face_tx(self, collection_id, subject_id, face: NewFace, allow_existing, max_faces, metadata):
        ts = now_ms()
        with self._tx() as q:
            self._collection_row(q, collection_id)
            if q("SELECT 1 FROM faces WHERE face_id = ?", face.face_id).fetchone():
                raise _Duplicate()
            # Lock the subject row first (one X lock per subject, so concurrent adds queue instead of deadlocking).
            row = self._locked_subject(q, collection_id, subject_id)
            created = row is None
            if created:
                try:
                    q(
                        "INSERT INTO subjects (collection_id, subject_id, metadata, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?)",
                        collection_id,
                        subject_id,
                        json.dumps(metadata, sort_keys=True),
                        ts,
                        ts,
                    )
                except self.d.integrity_errors:
                    if not self._exists(q, "subjects WHERE collection_id = ? AND subject_id = ?", collection_id, subject_id):
                        self._collection_row(q, collection_id)  # deleted meanwhile (MySQL): COLLECTION_NOT_FOUND
                        raise _Retry() from None  # the subject in the way was deleted meanwhile: start over
                    if allow_existing:
                        raise _Retry() from None  # created concurrently: start over and take its lock
                    if self._exists(q, "faces WHERE face_id = ?", face.face_id):
                        raise _Duplicate() from None  # a concurrent Register of the same token won the subject
                    raise self._already_registered(collection_id, subject_id) from None
            else:
                if self._exists(q, "faces WHERE face_id = ?", face.face_id):
                    # a concurrent Register of the same token (another replica's retry) committed it
                    # while this one waited for the lock: the same face, not a limit or a conflict
                    raise _Duplicate()
                if not allow_existing:
                    raise self._already_registered(collection_id, subject_id)
                count = q(
                    "SELECT COUNT(*) FROM faces WHERE collection_id = ? AND subject_id = ?", collection_id, subject_id
                ).fetchone()[0]
                if count >= max_faces:
                    raise errors.precondition(
                        errors.FACE_LIMIT_REACHED,
                        f"subject {subject_id!r} already holds {count} faces (limit {max_faces})",
                        limit=max_faces,
                    )
                _save_metadata(q, collection_id, subject_id, {**json.loads(row[0]), **metadata}, ts)
            try:
                q(
                    "INSERT INTO faces (face_id, collection_id, subject_id, model_id, embedding, quality, crop, created_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    face.face_id,
                    collection_id,
                    subject_id,
                    face.model_id,
                    _emb_bytes(face.embedding),
                    float(face.quality),
                    face.crop,
                    ts,
                )
            except self.d.integrity_errors:
                if not self._exists(q, "faces WHERE face_id = ?", face.face_id):
                    raise
                raise _Duplicate() from None  # a concurrent retry of the same Register committed first
            self._log(q, collection_id, face.face_id, "add")
            subject = self._subject(q, collection_id, subject_id)
        record = FaceRecord(
            face.face_id,
            collection_id,
            subject_id,
            face.model_id,
            float(face.quality),
            ts,
            embedding=face.embedding,
            crop=face.crop,
        )
        return record, created, subject

    @staticmethod
    def _no_subject(collection_id: str, subject_id: str) -> errors.FaceServiceError:
        return errors.not_found(
            errors.SUBJECT_NOT_FOUND,
            f"subject {subject_id!r} is not registered in {collection_id!r}",
            collection=collection_id,
            subject_id=subject_id,
        )

    @staticmethod
    def _already_registered(collection_id: str, subject_id: str) -> errors.FaceServiceError:
        return errors.already_exists(
            errors.ALREADY_REGISTERED,
            f"subject {subject_id!r} is already registered in {collection_id!r}; set add_face to add another face to it",
            collection=collection_id,
            subject_id=subject_id,
        )

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
            row = q(
                f"SELECT {self._FACE_COLUMNS} FROM faces WHERE collection_id = ? AND face_id = ?", collection_id, face_id
            ).fetchone()
        if row is None:
            raise errors.not_found(
                errors.FACE_NOT_FOUND, f"face {face_id!r} does not exist in {collection_id!r}", face_id=face_id
            )
        return self._face(row, True)

    def get_subject(self, collection_id: str, subject_id: str, with_embeddings: bool = False) -> Subject:
        with self._tx(write=False) as q:
            self._collection_row(q, collection_id)
            return self._subject(q, collection_id, subject_id, with_embeddings)

    def _subject(self, q, collection_id: str, subject_id: str, with_embeddings: bool = False) -> Subject:
        row = q(
            "SELECT metadata, created_ms, updated_ms FROM subjects WHERE collection_id = ? AND subject_id = ?",
            collection_id,
            subject_id,
        ).fetchone()
        if row is None:
            raise self._no_subject(collection_id, subject_id)
        faces = q(
            f"SELECT {self._FACE_COLUMNS} FROM faces WHERE collection_id = ? AND subject_id = ? ORDER BY created_ms, face_id",
            collection_id,
            subject_id,
        ).fetchall()
        recs = [self._face(f, with_embeddings) for f in faces]
        return Subject(collection_id, subject_id, json.loads(row[0]), row[1], row[2], recs, len(recs))

    def list_subjects(self, collection_id: str, after: str, limit: int) -> list[Subject]:
        """Subjects ordered by id, strictly after `after` (keyset pagination), with face counts."""
        with self._tx(write=False) as q:
            self._collection_row(q, collection_id)
            rows = q(
                "SELECT s.subject_id, s.metadata, s.created_ms, s.updated_ms, "
                "(SELECT COUNT(*) FROM faces f WHERE f.collection_id = s.collection_id AND f.subject_id = s.subject_id) "
                "FROM subjects s WHERE s.collection_id = ? AND s.subject_id > ? ORDER BY s.subject_id LIMIT ?",
                collection_id,
                after,
                limit,
            ).fetchall()
        return [Subject(collection_id, r[0], json.loads(r[1]), r[2], r[3], [], r[4]) for r in rows]

    def update_subject_metadata(
        self, collection_id: str, subject_id: str, metadata: dict[str, str], keys: list[str] | None = None
    ) -> Subject:
        """Replaces the subject's metadata, or with `keys` changes only those: each set from `metadata`,
        or removed when `metadata` lacks it. The entry limit holds on the result."""
        with self._tx() as q:
            self._collection_row(q, collection_id)
            row = self._locked_subject(q, collection_id, subject_id)
            if row is None:
                raise self._no_subject(collection_id, subject_id)
            merged = dict(metadata) if keys is None else json.loads(row[0])
            for k in keys or ():
                if k in metadata:
                    merged[k] = metadata[k]
                else:
                    merged.pop(k, None)
            _save_metadata(q, collection_id, subject_id, merged, now_ms())
            return self._subject(q, collection_id, subject_id)  # in the change's transaction, as add_face

    def delete_subject(self, collection_id: str, subject_id: str) -> list[str]:
        """Deletes the subject and all its faces; returns the ids of the faces that went."""
        return self._retrying(lambda: self._delete_subject_tx(collection_id, subject_id))

    def _delete_subject_tx(self, collection_id: str, subject_id: str) -> list[str]:
        with self._tx() as q:
            self._collection_row(q, collection_id)
            # the subject's lock first, as add_face takes it: a face being added commits before its
            # ids are read here (else the cascade would remove it unlogged, and indexes keep it)
            if self._locked_subject(q, collection_id, subject_id) is None:
                raise self._no_subject(collection_id, subject_id)
            faces = [
                r[0]
                for r in q(
                    f"SELECT face_id FROM faces WHERE collection_id = ? AND subject_id = ?{self.d.for_update}",
                    collection_id,
                    subject_id,
                ).fetchall()
            ]
            n = q("DELETE FROM subjects WHERE collection_id = ? AND subject_id = ?", collection_id, subject_id).rowcount
            if n == 0:
                raise self._no_subject(collection_id, subject_id)
            for face_id in faces:
                self._log(q, collection_id, face_id, "delete")
        return faces

    def delete_face(self, collection_id: str, face_id: str) -> FaceRecord:
        return self._retrying(lambda: self._delete_face_tx(collection_id, face_id))

    def _delete_face_tx(self, collection_id: str, face_id: str) -> FaceRecord:
        with self._tx() as q:
            self._collection_row(q, collection_id)
            face = f"SELECT {self._FACE_COLUMNS} FROM faces WHERE collection_id = ? AND face_id = ?"
            row = q(face, collection_id, face_id).fetchone()
            if row is not None:
                # the subject's lock before the face's, in the order add_face and delete_subject take
                # them (the other order deadlocked against a DeleteSubject on MySQL); then the face again
                self._locked_subject(q, collection_id, row[2])
                row = q(face, collection_id, face_id).fetchone()
            if row is None:
                raise errors.not_found(
                    errors.FACE_NOT_FOUND, f"face {face_id!r} does not exist in {collection_id!r}", face_id=face_id
                )
            q("DELETE FROM faces WHERE face_id = ?", face_id)
            self._log(q, collection_id, face_id, "delete")
            q("UPDATE subjects SET updated_ms = ? WHERE collection_id = ? AND subject_id = ?", now_ms(), collection_id, row[2])
        return self._face(row, False)

    def face_embeddings(self, collection_id: str, face_ids: list[str], model_id: str, limit: int) -> list[FaceRecord]:
        """Faces of the collection embedded by `model_id`, with their embeddings, in face id order: the
        listed ones (unknown ids are left out), or with no ids the first `limit` of all of them."""
        where, params = "collection_id = ? AND model_id = ?", [collection_id, model_id]
        if face_ids:
            where += f" AND face_id IN ({', '.join('?' * len(face_ids))})"
            params += face_ids
        with self._tx(write=False) as q:
            self._collection_row(q, collection_id)
            rows = q(f"SELECT {self._FACE_COLUMNS} FROM faces WHERE {where} ORDER BY face_id LIMIT ?", *params, limit).fetchall()
        return [self._face(r, True) for r in rows]

    def faces_created_before(self, collection_id: str, before_ms: int, limit: int) -> list[FaceRecord]:
        """The collection's oldest faces registered before `before_ms` (the retention job), without
        embeddings or crops (the job reads only which faces they are)."""
        columns = self._FACE_COLUMNS.replace("embedding, crop", "NULL, NULL")
        with self._tx(write=False) as q:
            rows = q(
                f"SELECT {columns} FROM faces WHERE collection_id = ? AND created_ms < ? ORDER BY created_ms LIMIT ?",
                collection_id,
                before_ms,
                limit,
            ).fetchall()
        return [self._face(r, False) for r in rows]

    # -- re-embedding (facesvc-reembed) --------------------------------------
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


def _save_metadata(q, collection_id: str, subject_id: str, merged: dict, ts: int) -> None:
    """Write a subject's merged metadata; the entry limit holds however the entries arrive (a
    Register's metadata merged into the stored map, an UpdateSubject's keys)."""
    if len(merged) > MAX_METADATA_ENTRIES:
        raise errors.validation(
            "metadata",
            f"the subject would hold {len(merged)} metadata entries; at most {MAX_METADATA_ENTRIES}",
            limit=MAX_METADATA_ENTRIES,
        )
    q(
        "UPDATE subjects SET metadata = ?, updated_ms = ? WHERE collection_id = ? AND subject_id = ?",
        json.dumps(merged, sort_keys=True),
        ts,
        collection_id,
        subject_id,
    )
