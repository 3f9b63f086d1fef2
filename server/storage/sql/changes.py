"""What the search indexes read in SQL: the change log they follow and the faces they are built from (IndexSource)."""

from __future__ import annotations

from server.storage.sql.database import SqlDatabase, _emb_array


class SqlChangeFeed(SqlDatabase):
    def last_change_seq(self) -> int:
        with self._tx(write=False) as q:
            return q("SELECT MAX(seq) FROM face_changes").fetchone()[0] or 0

    def changes_after(self, seq: int, limit: int, collection_id: str = "") -> list[tuple[int, str, str | None, str]]:
        """[(seq, collection_id, face_id, op)] committed with a sequence number above `seq`, in order."""
        where, params = "seq > ?", (seq,)
        if collection_id:
            where, params = "seq > ? AND collection_id = ?", (seq, collection_id)
        with self._tx(write=False) as q:
            return [
                tuple(r)
                for r in q(
                    f"SELECT seq, collection_id, face_id, op FROM face_changes WHERE {where} ORDER BY seq LIMIT ?", *params, limit
                ).fetchall()
            ]

    def changes_at(self, seqs: list[int]) -> list[tuple[int, str, str | None, str]]:
        """The rows of these sequence numbers that are committed now (late commits below the high-water mark)."""
        if not seqs:
            return []
        with self._tx(write=False) as q:
            return [
                tuple(r)
                for r in q(
                    f"SELECT seq, collection_id, face_id, op FROM face_changes "
                    f"WHERE seq IN ({', '.join('?' * len(seqs))}) ORDER BY seq",
                    *seqs,
                ).fetchall()
            ]

    def prune_changes(self, before_ms: int) -> int:
        return self._prune("face_changes", before_ms)

    # -- the faces an index is built and kept from -----------------------------
    def collection_embeddings(self, collection_id: str, model_id: str, after_face_id: str, limit: int):
        """[(face_id, subject_id, embedding)] of one model, in face id order after `after_face_id`."""
        with self._tx(write=False) as q:
            rows = q(
                "SELECT face_id, subject_id, embedding FROM faces WHERE collection_id = ? AND model_id = ? "
                "AND face_id > ? ORDER BY face_id LIMIT ?",
                collection_id,
                model_id,
                after_face_id,
                limit,
            ).fetchall()
        return [(r[0], r[1], _emb_array(r[2])) for r in rows]

    def collection_face_ids(self, collection_id: str, model_id: str, after_face_id: str, limit: int) -> list[str]:
        """The face ids of one model, in order after `after_face_id` (collection_embeddings without the vectors)."""
        with self._tx(write=False) as q:
            return [
                r[0]
                for r in q(
                    "SELECT face_id FROM faces WHERE collection_id = ? AND model_id = ? AND face_id > ? ORDER BY face_id LIMIT ?",
                    collection_id,
                    model_id,
                    after_face_id,
                    limit,
                ).fetchall()
            ]

    def faces_by_id(self, collection_id: str, model_id: str, face_ids: list[str]):
        """{face_id: (subject_id, embedding)} of those faces that exist with embeddings of `model_id`."""
        out = {}
        with self._tx(write=False) as q:
            for s in range(0, len(face_ids), 500):
                part = face_ids[s : s + 500]
                rows = q(
                    f"SELECT face_id, subject_id, embedding FROM faces WHERE collection_id = ? AND model_id = ? "
                    f"AND face_id IN ({', '.join('?' * len(part))})",
                    collection_id,
                    model_id,
                    *part,
                ).fetchall()
                out.update({r[0]: (r[1], _emb_array(r[2])) for r in rows})
        return out

    def count_faces(self, collection_id: str, model_id: str) -> int:
        with self._tx(write=False) as q:
            return q("SELECT COUNT(*) FROM faces WHERE collection_id = ? AND model_id = ?", collection_id, model_id).fetchone()[0]
