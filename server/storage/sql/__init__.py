"""The face store: subjects, faces and API keys in SQLite (embedded default) or MySQL."""

from __future__ import annotations

from server.storage.sql.dialects import dialect_for
from server.storage.sql.sql_store import SqlFaceStore


def open_store(db_url: str, data_dir: str, pool_size: int = 8) -> SqlFaceStore:
    """Connect and migrate: `sqlite:///path`, `mysql://user:pass@host:port/db`, or "" for data_dir/facesvc.db."""
    store = SqlFaceStore(dialect_for(db_url, data_dir), pool_size)
    store.migrate()
    return store


__all__ = ["SqlFaceStore", "open_store"]
