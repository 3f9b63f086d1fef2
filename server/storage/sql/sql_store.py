"""SqlFaceStore: every role store over one connection pool (SQLite or MySQL).

The services never see this class: each takes the role it needs
(server/storage/interfaces.py), and this one object plays them all.
"""

from __future__ import annotations

from server.storage.sql.audit import SqlAudit
from server.storage.sql.changes import SqlChangeFeed
from server.storage.sql.collections import SqlCollections
from server.storage.sql.faces import SqlFaces
from server.storage.sql.keys import SqlKeys


class SqlFaceStore(SqlCollections, SqlFaces, SqlKeys, SqlChangeFeed, SqlAudit):
    """Collections, subjects and faces, API keys, the change log and the audit log in one database."""
