"""Collections (tenants) in SQL: the CollectionStore role."""

from __future__ import annotations

from server import errors
from server.records import Collection
from server.storage.sql.database import SqlDatabase, now_ms


class SqlCollections(SqlDatabase):
    _COLLECTION_COLUMNS = """c.collection_id, c.display_name, c.liveness_policy, c.created_ms,
        (SELECT COUNT(*) FROM subjects s WHERE s.collection_id = c.collection_id),
        (SELECT COUNT(*) FROM faces f WHERE f.collection_id = c.collection_id)"""

    def create_collection(self, collection_id: str, display_name: str, liveness_policy: str) -> Collection:
        created = now_ms()
        try:
            with self._tx() as q:
                q(
                    "INSERT INTO collections (collection_id, display_name, liveness_policy, created_ms) VALUES (?, ?, ?, ?)",
                    collection_id,
                    display_name,
                    liveness_policy,
                    created,
                )
        except self.d.integrity_errors:
            raise errors.already_exists(
                errors.COLLECTION_EXISTS, f"collection {collection_id!r} already exists", collection=collection_id
            ) from None
        return Collection(collection_id, display_name, liveness_policy, created)

    def get_collection(self, collection_id: str) -> Collection:
        with self._tx(write=False) as q:
            row = q(f"SELECT {self._COLLECTION_COLUMNS} FROM collections c WHERE c.collection_id = ?", collection_id).fetchone()
        if row is None:
            raise errors.not_found(
                errors.COLLECTION_NOT_FOUND, f"collection {collection_id!r} does not exist", collection=collection_id
            )
        return Collection(*row)

    def get_collection_policy(self, collection_id: str) -> str:
        """The liveness policy alone (no counts): cheap enough for every request."""
        with self._tx(write=False) as q:
            return self._collection_row(q, collection_id)[1]

    def list_collections(self, after: str, limit: int) -> list[Collection]:
        with self._tx(write=False) as q:
            rows = q(
                f"SELECT {self._COLLECTION_COLUMNS} FROM collections c WHERE c.collection_id > ? "
                "ORDER BY c.collection_id LIMIT ?",
                after,
                limit,
            ).fetchall()
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

    def collection_created_ms(self, collection_id: str) -> int | None:
        """When the collection was created (tells a re-created collection from the old one), or None."""
        with self._tx(write=False) as q:
            row = q("SELECT created_ms FROM collections WHERE collection_id = ?", collection_id).fetchone()
        return None if row is None else row[0]
