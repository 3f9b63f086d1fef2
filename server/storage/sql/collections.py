"""Collections (tenants) in SQL: the CollectionStore role."""

from __future__ import annotations

from server import errors
from server.records import DUPLICATE_REJECT, Collection, Thresholds
from server.storage.sql.database import SqlDatabase, now_ms

# The settings a collection carries, in the order _collection() reads them after the counts.
_SETTINGS = "c.duplicate_policy, c.match_threshold, c.search_threshold, c.liveness_threshold, c.retention_days"
# UpdateCollection's fields: record attribute -> column.
_COLUMNS = {
    "display_name": "display_name",
    "liveness_policy": "liveness_policy",
    "duplicate_policy": "duplicate_policy",
    "thresholds.match": "match_threshold",
    "thresholds.search": "search_threshold",
    "thresholds.liveness": "liveness_threshold",
    "retention_days": "retention_days",
}


def _collection(row, counts: bool = True) -> Collection:
    """A row of (id, name, liveness policy, created, [subjects, faces,] duplicate policy, 3 thresholds, retention)."""
    head, rest = (row[:6], row[6:]) if counts else ((*row[:4], 0, 0), row[4:])
    return Collection(
        *head, duplicate_policy=rest[0], thresholds=Thresholds(*(float(x) for x in rest[1:4])), retention_days=int(rest[4])
    )


class SqlCollections(SqlDatabase):
    _COLLECTION_COLUMNS = f"""c.collection_id, c.display_name, c.liveness_policy, c.created_ms,
        (SELECT COUNT(*) FROM subjects s WHERE s.collection_id = c.collection_id),
        (SELECT COUNT(*) FROM faces f WHERE f.collection_id = c.collection_id), {_SETTINGS}"""

    def create_collection(
        self,
        collection_id: str,
        display_name: str,
        liveness_policy: str,
        duplicate_policy: str = DUPLICATE_REJECT,
        thresholds: Thresholds = Thresholds(),
        retention_days: int = 0,
    ) -> Collection:
        created = now_ms()
        try:
            with self._tx() as q:
                q(
                    "INSERT INTO collections (collection_id, display_name, liveness_policy, created_ms, duplicate_policy, "
                    "match_threshold, search_threshold, liveness_threshold, retention_days) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    collection_id,
                    display_name,
                    liveness_policy,
                    created,
                    duplicate_policy,
                    thresholds.match,
                    thresholds.search,
                    thresholds.liveness,
                    retention_days,
                )
        except self.d.integrity_errors:
            raise errors.already_exists(
                errors.COLLECTION_EXISTS, f"collection {collection_id!r} already exists", collection=collection_id
            ) from None
        return Collection(
            collection_id,
            display_name,
            liveness_policy,
            created,
            duplicate_policy=duplicate_policy,
            thresholds=thresholds,
            retention_days=retention_days,
        )

    def get_collection(self, collection_id: str) -> Collection:
        with self._tx(write=False) as q:
            return self._collection(q, collection_id)

    def _collection(self, q, collection_id: str) -> Collection:
        row = q(f"SELECT {self._COLLECTION_COLUMNS} FROM collections c WHERE c.collection_id = ?", collection_id).fetchone()
        if row is None:
            raise self._no_collection(collection_id)
        return _collection(row)

    def get_collection_settings(self, collection_id: str) -> Collection:
        """The collection's policies and thresholds without its counts: cheap enough for every request."""
        with self._tx(write=False) as q:
            row = q(
                f"SELECT c.collection_id, c.display_name, c.liveness_policy, c.created_ms, {_SETTINGS} "
                "FROM collections c WHERE c.collection_id = ?",
                collection_id,
            ).fetchone()
        if row is None:
            raise self._no_collection(collection_id)
        return _collection(row, counts=False)

    def update_collection(self, collection_id: str, changes: dict) -> Collection:
        """Sets the fields named in `changes` (keys of _COLUMNS: display_name, liveness_policy,
        duplicate_policy, thresholds.match / .search / .liveness, retention_days)."""
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown collection fields {sorted(unknown)}")
        if not changes:
            return self.get_collection(collection_id)
        with self._tx() as q:  # the answer read in the change's transaction: no read after the commit to fail
            self._collection_row(q, collection_id)
            q(
                f"UPDATE collections SET {', '.join(f'{_COLUMNS[k]} = ?' for k in changes)} WHERE collection_id = ?",
                *changes.values(),
                collection_id,
            )
            return self._collection(q, collection_id)

    @staticmethod
    def _no_collection(collection_id: str) -> errors.FaceServiceError:
        return errors.not_found(
            errors.COLLECTION_NOT_FOUND, f"collection {collection_id!r} does not exist", collection=collection_id
        )

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
        return [_collection(r) for r in rows]

    def delete_collection(self, collection_id: str) -> tuple[int, int]:
        """Deletes the collection with its subjects, faces and keys; returns (subjects, faces) removed."""
        with self._tx() as q:
            c = self._collection_row(q, collection_id)
            subjects = q("SELECT COUNT(*) FROM subjects WHERE collection_id = ?", collection_id).fetchone()[0]
            faces = q("SELECT COUNT(*) FROM faces WHERE collection_id = ?", collection_id).fetchone()[0]
            q("DELETE FROM collections WHERE collection_id = ?", c[0])
            self._log(q, collection_id, None, "drop")
        return subjects, faces

    def collections_with_retention(self) -> list[Collection]:
        """The collections whose faces age out (retention_days > 0), for the retention job."""
        with self._tx(write=False) as q:
            rows = q(
                f"SELECT c.collection_id, c.display_name, c.liveness_policy, c.created_ms, {_SETTINGS} "
                "FROM collections c WHERE c.retention_days > 0 ORDER BY c.collection_id"
            ).fetchall()
        return [_collection(r, counts=False) for r in rows]

    def collection_created_ms(self, collection_id: str) -> int | None:
        """When the collection was created (tells a re-created collection from the old one), or None."""
        with self._tx(write=False) as q:
            row = q("SELECT created_ms FROM collections WHERE collection_id = ?", collection_id).fetchone()
        return None if row is None else row[0]
