"""The audit log in SQL: the AuditStore role (append in batches, list newest first, prune by age)."""

from __future__ import annotations

from server.records import AuditEvent
from server.storage.sql.database import SqlDatabase

_COLUMNS = "key_id, action, collection_id, subject_id, face_id, outcome, created_ms, seq"


class SqlAudit(SqlDatabase):
    def append_audit(self, events: list[AuditEvent]) -> None:
        """One transaction for the batch (the audit writer flushes what gathered since its last flush)."""
        if not events:
            return
        with self._tx() as q:
            for e in events:
                q(
                    "INSERT INTO audit_log (created_ms, key_id, action, collection_id, subject_id, face_id, outcome) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    e.created_ms,
                    e.key_id,
                    e.action,
                    e.collection_id,
                    e.subject_id,
                    e.face_id,
                    e.outcome,
                )

    def list_audit(self, before_seq: int, limit: int, collection_id: str = "", subject_id: str = "") -> list[AuditEvent]:
        """Events with seq below `before_seq` (0: from the newest), newest first, optionally of one
        collection (and one subject of it)."""
        where, params = ["seq < ?"], [before_seq or 2**62]
        if collection_id:
            where.append("collection_id = ?")
            params.append(collection_id)
        if subject_id:
            where.append("subject_id = ?")
            params.append(subject_id)
        with self._tx(write=False) as q:
            rows = q(
                f"SELECT {_COLUMNS} FROM audit_log WHERE {' AND '.join(where)} ORDER BY seq DESC LIMIT ?", *params, limit
            ).fetchall()
        return [AuditEvent(*r) for r in rows]

    def prune_audit(self, before_ms: int) -> int:
        return self._prune("audit_log", before_ms)
