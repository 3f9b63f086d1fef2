"""API keys in SQL (stored as SHA-256 hashes): the KeyStore role."""

from __future__ import annotations

from server import errors
from server.records import ApiKey
from server.storage.sql.database import SqlDatabase, now_ms


class SqlKeys(SqlDatabase):
    def create_api_key(self, key_id: str, collection_id: str, key_hash: str, description: str) -> ApiKey:
        created = now_ms()
        with self._tx() as q:
            self._collection_row(q, collection_id)
            q(
                "INSERT INTO api_keys (key_id, collection_id, key_hash, description, created_ms) VALUES (?, ?, ?, ?, ?)",
                key_id,
                collection_id,
                key_hash,
                description,
                created,
            )
        return ApiKey(key_id, collection_id, description, created)

    def find_api_key(self, key_hash: str) -> ApiKey | None:
        with self._tx(write=False) as q:
            row = q("SELECT key_id, collection_id, description, created_ms FROM api_keys WHERE key_hash = ?", key_hash).fetchone()
        return None if row is None else ApiKey(*row)

    def list_api_keys(self, collection_id: str, after: str = "", limit: int = 1000) -> list[ApiKey]:
        """The collection's keys in key id order after `after` (a keyset page)."""
        with self._tx(write=False) as q:
            self._collection_row(q, collection_id)
            rows = q(
                "SELECT key_id, collection_id, description, created_ms FROM api_keys WHERE collection_id = ? "
                "AND key_id > ? ORDER BY key_id LIMIT ?",
                collection_id,
                after,
                limit,
            ).fetchall()
        return [ApiKey(*r) for r in rows]

    def delete_api_key(self, collection_id: str, key_id: str) -> None:
        with self._tx() as q:
            n = q("DELETE FROM api_keys WHERE collection_id = ? AND key_id = ?", collection_id, key_id).rowcount
        if n == 0:
            raise errors.not_found(errors.API_KEY_NOT_FOUND, f"no key {key_id!r} in collection {collection_id!r}", key_id=key_id)
