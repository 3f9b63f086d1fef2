"""What differs between the two SQL backends: connecting, placeholders, DDL, error classes.

`SqliteDialect` is the embedded default (a file under the data dir, WAL mode);
`MySqlDialect` talks to MySQL/MariaDB through pymysql. Everything else (the
queries, the transactions, the migrations) lives in `sql_store.py` once.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pymysql

# Schema migrations, in order; the index + 1 is the version recorded in
# schema_version. Never edit a released step: append a new one.
_SQLITE_SCHEMA: list[list[str]] = [
    [
        """CREATE TABLE collections (
            collection_id   TEXT PRIMARY KEY,
            display_name    TEXT NOT NULL,
            liveness_policy TEXT NOT NULL,
            created_ms      INTEGER NOT NULL)""",
        """CREATE TABLE subjects (
            collection_id TEXT NOT NULL REFERENCES collections(collection_id) ON DELETE CASCADE,
            subject_id    TEXT NOT NULL,
            metadata      TEXT NOT NULL,
            created_ms    INTEGER NOT NULL,
            updated_ms    INTEGER NOT NULL,
            PRIMARY KEY (collection_id, subject_id))""",
        """CREATE TABLE faces (
            face_id       TEXT PRIMARY KEY,
            collection_id TEXT NOT NULL,
            subject_id    TEXT NOT NULL,
            model_id      TEXT NOT NULL,
            embedding     BLOB NOT NULL,
            quality       REAL NOT NULL,
            crop          BLOB,
            created_ms    INTEGER NOT NULL,
            FOREIGN KEY (collection_id, subject_id) REFERENCES subjects(collection_id, subject_id) ON DELETE CASCADE)""",
        "CREATE INDEX faces_by_subject ON faces(collection_id, subject_id)",
        """CREATE TABLE api_keys (
            key_id        TEXT PRIMARY KEY,
            collection_id TEXT NOT NULL REFERENCES collections(collection_id) ON DELETE CASCADE,
            key_hash      TEXT NOT NULL UNIQUE,
            description   TEXT NOT NULL,
            created_ms    INTEGER NOT NULL)""",
    ],
    [  # v2: the change log replicas follow to keep their search indexes current; an index for index builds
        """CREATE TABLE face_changes (
            seq           INTEGER PRIMARY KEY AUTOINCREMENT,
            collection_id TEXT NOT NULL,
            face_id       TEXT,
            op            TEXT NOT NULL,
            created_ms    INTEGER NOT NULL)""",
        "CREATE INDEX face_changes_by_time ON face_changes(created_ms)",
        "CREATE INDEX faces_for_index ON faces(collection_id, model_id, face_id)",
    ],
    [  # v3: per-collection duplicate policy, thresholds (0 = the server's default) and face retention
        # (0 = none); the audit log; an index for the retention job's scan
        "ALTER TABLE collections ADD COLUMN duplicate_policy TEXT NOT NULL DEFAULT 'reject'",
        "ALTER TABLE collections ADD COLUMN match_threshold REAL NOT NULL DEFAULT 0",
        "ALTER TABLE collections ADD COLUMN search_threshold REAL NOT NULL DEFAULT 0",
        "ALTER TABLE collections ADD COLUMN liveness_threshold REAL NOT NULL DEFAULT 0",
        "ALTER TABLE collections ADD COLUMN retention_days INTEGER NOT NULL DEFAULT 0",
        """CREATE TABLE audit_log (
            seq           INTEGER PRIMARY KEY AUTOINCREMENT,
            created_ms    INTEGER NOT NULL,
            key_id        TEXT NOT NULL,
            action        TEXT NOT NULL,
            collection_id TEXT NOT NULL,
            subject_id    TEXT NOT NULL,
            face_id       TEXT NOT NULL,
            outcome       TEXT NOT NULL)""",
        "CREATE INDEX audit_log_by_time ON audit_log(created_ms)",
        "CREATE INDEX audit_log_by_collection ON audit_log(collection_id, subject_id, seq)",
        "CREATE INDEX faces_by_age ON faces(collection_id, created_ms)",
    ],
]

_MYSQL_TABLE = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
_MYSQL_SCHEMA: list[list[str]] = [
    [
        f"""CREATE TABLE collections (
            collection_id   VARCHAR(64) NOT NULL PRIMARY KEY,
            display_name    VARCHAR(256) NOT NULL,
            liveness_policy VARCHAR(16) NOT NULL,
            created_ms      BIGINT NOT NULL) {_MYSQL_TABLE}""",
        f"""CREATE TABLE subjects (
            collection_id VARCHAR(64) NOT NULL,
            subject_id    VARCHAR(128) NOT NULL,
            metadata      TEXT NOT NULL,
            created_ms    BIGINT NOT NULL,
            updated_ms    BIGINT NOT NULL,
            PRIMARY KEY (collection_id, subject_id),
            FOREIGN KEY (collection_id) REFERENCES collections(collection_id) ON DELETE CASCADE) {_MYSQL_TABLE}""",
        f"""CREATE TABLE faces (
            face_id       CHAR(32) NOT NULL PRIMARY KEY,
            collection_id VARCHAR(64) NOT NULL,
            subject_id    VARCHAR(128) NOT NULL,
            model_id      VARCHAR(64) NOT NULL,
            embedding     BLOB NOT NULL,
            quality       DOUBLE NOT NULL,
            crop          MEDIUMBLOB NULL,
            created_ms    BIGINT NOT NULL,
            INDEX faces_by_subject (collection_id, subject_id),
            FOREIGN KEY (collection_id, subject_id) REFERENCES subjects(collection_id, subject_id) ON DELETE CASCADE
            ) {_MYSQL_TABLE}""",
        f"""CREATE TABLE api_keys (
            key_id        VARCHAR(32) NOT NULL PRIMARY KEY,
            collection_id VARCHAR(64) NOT NULL,
            key_hash      CHAR(64) NOT NULL UNIQUE,
            description   VARCHAR(256) NOT NULL,
            created_ms    BIGINT NOT NULL,
            FOREIGN KEY (collection_id) REFERENCES collections(collection_id) ON DELETE CASCADE) {_MYSQL_TABLE}""",
    ],
    [  # v2: see the SQLite schema
        f"""CREATE TABLE face_changes (
            seq           BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            collection_id VARCHAR(64) NOT NULL,
            face_id       CHAR(32) NULL,
            op            VARCHAR(8) NOT NULL,
            created_ms    BIGINT NOT NULL,
            INDEX face_changes_by_time (created_ms)) {_MYSQL_TABLE}""",
        "CREATE INDEX faces_for_index ON faces (collection_id, model_id, face_id)",
    ],
    [  # v3: see the SQLite schema
        "ALTER TABLE collections ADD COLUMN duplicate_policy VARCHAR(16) NOT NULL DEFAULT 'reject', "
        "ADD COLUMN match_threshold DOUBLE NOT NULL DEFAULT 0, ADD COLUMN search_threshold DOUBLE NOT NULL DEFAULT 0, "
        "ADD COLUMN liveness_threshold DOUBLE NOT NULL DEFAULT 0, ADD COLUMN retention_days INT NOT NULL DEFAULT 0",
        f"""CREATE TABLE audit_log (
            seq           BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            created_ms    BIGINT NOT NULL,
            key_id        VARCHAR(32) NOT NULL,
            action        VARCHAR(32) NOT NULL,
            collection_id VARCHAR(64) NOT NULL,
            subject_id    VARCHAR(128) NOT NULL,
            face_id       VARCHAR(32) NOT NULL,
            outcome       VARCHAR(64) NOT NULL,
            INDEX audit_log_by_time (created_ms),
            INDEX audit_log_by_collection (collection_id, subject_id, seq)) {_MYSQL_TABLE}""",
        "CREATE INDEX faces_by_age ON faces (collection_id, created_ms)",
    ],
]


class SqliteDialect:
    name = "sqlite"
    schema = _SQLITE_SCHEMA
    integrity_errors = (sqlite3.IntegrityError,)
    retry_errors = ()
    exists_errors = ()  # a schema step is one transaction: a step cut short leaves nothing behind
    for_update = ""  # BEGIN IMMEDIATE already holds the write lock

    @staticmethod
    def error_code(exc: Exception) -> int | None:
        return None

    @staticmethod
    def is_unavailable(exc: Exception) -> bool:
        """Busy/locked after the busy timeout, or the file went away: worth a retry, not a bug."""
        msg = str(exc).lower()
        return isinstance(exc, sqlite3.OperationalError) and any(
            w in msg for w in ("locked", "busy", "disk i/o", "unable to open", "readonly", "disk is full")
        )

    @staticmethod
    def is_timeout(exc: Exception) -> bool:
        return False  # a file: busy and locked are answers, not a server that stopped answering

    def __init__(self, path: str):
        self.path = path
        self._migrate_lock = threading.Lock()

    def describe(self) -> str:
        return f"sqlite:///{self.path}"

    def connect(self, wait_s: float | None = None):
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")  # an acknowledged commit survives power loss
        conn.execute("PRAGMA secure_delete = ON")  # a deleted row's bytes are overwritten, not left in a free page
        return conn

    def erase_freed(self) -> bool:
        """Checkpoints the write-ahead log into the database and truncates it, so that no frame keeps
        a deleted row's old page; False when a reader or writer held it back (try again later). It
        does not wait for them (no busy timeout): waiting, it held every writer back meanwhile."""
        conn = sqlite3.connect(self.path, timeout=0, isolation_level=None)
        try:
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return busy == 0
        except sqlite3.OperationalError as exc:  # locked or busy right now
            if "locked" in str(exc).lower() or "busy" in str(exc).lower():
                return False
            raise
        finally:
            conn.close()

    @staticmethod
    def checkout(conn, wait_s: float | None = None):
        return conn

    @staticmethod
    def bound(conn, wait_s: float | None) -> None:
        pass  # a file: its waits are the busy timeout's

    probe = None  # nothing to ask: the file answers or raises

    @staticmethod
    def lock_wait(conn, wait_s: float | None) -> None:
        pass  # the busy timeout: a file has no one else's session to leave waiting

    @staticmethod
    def execute(conn, sql: str, params: tuple = ()):
        return conn.execute(sql, params)

    @staticmethod
    def begin(conn, write: bool) -> None:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def migration_lock(self, conn):
        return self._migrate_lock

    @staticmethod
    def table_exists(conn, name: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None

    @staticmethod
    def create_version_table(conn) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL, applied_ms INTEGER NOT NULL)")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_begun (version INTEGER NOT NULL)")


class _MySqlLock:
    """A server-side named lock, so replicas starting together migrate one at a time."""

    def __init__(self, dialect: "MySqlDialect", conn):
        self.d, self.conn = dialect, conn

    def __enter__(self):
        row = self.d.execute(self.conn, "SELECT GET_LOCK(?, 60)", ("facesvc_migrate",)).fetchone()
        if not row or row[0] != 1:
            raise RuntimeError("could not take the facesvc_migrate lock within 60 s")

    def __exit__(self, *exc):
        self.d.execute(self.conn, "SELECT RELEASE_LOCK(?)", ("facesvc_migrate",))


class MySqlDialect:
    name = "mysql"
    schema = _MYSQL_SCHEMA
    integrity_errors = (pymysql.err.IntegrityError,)
    retry_errors = (1213, 1205)  # deadlock, lock wait timeout: the transaction is safe to run again
    # table, column, index exists: on an upgrade, a schema step cut short put it there (MySQL commits
    # each DDL statement by itself, and, unlike MariaDB, has no IF NOT EXISTS for columns and indexes:
    # the schema is written once for both)
    exists_errors = (1050, 1060, 1061)
    # can't connect, server gone away, lost connection, too many connections, disk or table full,
    # + the retryable ones
    _UNAVAILABLE_CODES = {1021, 1040, 1114, 1205, 1213, 2002, 2003, 2006, 2013, 2055}
    for_update = " FOR UPDATE"

    def __init__(self, url: str, connect_timeout: float = 5.0):
        u = urlsplit(url)
        if not u.path.strip("/"):
            raise ValueError(f"{url!r}: the MySQL URL needs a database name (mysql://user:pass@host:port/db)")
        self.params = dict(
            host=u.hostname or "127.0.0.1",
            port=u.port or 3306,
            user=unquote(u.username or "root"),
            password=unquote(u.password or ""),
            database=u.path.strip("/"),
        )
        self.connect_timeout = connect_timeout

    def describe(self) -> str:
        p = self.params
        return f"mysql://{p['user']}:***@{p['host']}:{p['port']}/{p['database']}"

    READ_TIMEOUT_S = 30
    # A lock wait ends (error 1205, retried) well before the connection's read timeout would cut it off
    # as a lost connection (2013: not retried, and STORE_UNAVAILABLE for a wait on another's lock);
    # the server's own default (50 s) is longer than the read timeout.
    LOCK_WAIT_S = 10

    def connect(self, wait_s: float | None = None):
        """wait_s: how long any one read or write may wait (the call's time left; READ_TIMEOUT_S without
        one). A server that accepts connections and answers nothing (stopped, or a network dropping
        packets) otherwise holds the handshake for the whole read timeout."""
        wait = self.READ_TIMEOUT_S if wait_s is None else min(wait_s, self.READ_TIMEOUT_S)
        conn = pymysql.connect(
            **self.params,
            charset="utf8mb4",
            autocommit=True,
            connect_timeout=min(self.connect_timeout, wait),
            read_timeout=wait,
            write_timeout=wait,
            # No gap locks: concurrent first registrations of one subject queue on its primary key
            # instead of deadlocking; every read sees the latest committed rows.
            init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        )
        try:
            conn.cursor().execute(f"SET SESSION innodb_lock_wait_timeout = {self.LOCK_WAIT_S}")
        except BaseException:
            conn.close()
            raise
        return conn

    def bound(self, conn, wait_s: float | None) -> None:
        """From now on each read and write of the connection waits at most wait_s (None: READ_TIMEOUT_S)."""
        # pymysql applies these before every read and write of the socket
        conn._read_timeout = conn._write_timeout = (
            self.READ_TIMEOUT_S if wait_s is None else max(0.05, min(wait_s, self.READ_TIMEOUT_S))
        )

    def checkout(self, conn, wait_s: float | None = None):
        """A pooled connection the server may have dropped (restart, wait_timeout): check, else replace.
        Its reads and writes wait at most wait_s from now on (see connect)."""
        self.bound(conn, wait_s)
        try:
            conn.ping(reconnect=False)
            return conn
        except pymysql.err.MySQLError as exc:
            with contextlib.suppress(Exception):
                conn.close()
            if self.is_timeout(exc):
                raise  # no answer (not a closed connection): a new one would wait as long again
            return self.connect(wait_s)

    def lock_wait(self, conn, wait_s: float | None) -> None:
        """The server ends a lock wait of the next statement before the caller would give it up: a
        statement cut short on our side (the socket's timeout, then closed) left its session waiting
        for the lock on the server, its transaction's locks held, for LOCK_WAIT_S or, on MariaDB,
        until the lock came free, however long; and a KILL from another connection did not always
        reach it. Whole seconds, below wait_s (0 on MariaDB: no wait); set only when it changes."""
        want = self.LOCK_WAIT_S if wait_s is None else max(0, min(self.LOCK_WAIT_S, math.ceil(wait_s) - 1))
        if getattr(conn, "facesvc_lock_wait", self.LOCK_WAIT_S) != want:
            conn.cursor().execute(f"SET SESSION innodb_lock_wait_timeout = {int(want)}")
            conn.facesvc_lock_wait = want

    def probe(self, wait_s: float, conn=None) -> None:
        """Raises unless the server answers within about wait_s: a ping on `conn` (an idle pooled
        connection), or SELECT 1 on a new connection."""
        if conn is not None:
            self.bound(conn, wait_s)
            conn.ping(reconnect=False)
            return
        conn = pymysql.connect(**self.params, connect_timeout=wait_s, read_timeout=wait_s, write_timeout=wait_s)
        try:
            conn.cursor().execute("SELECT 1")
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def is_timeout(self, exc: Exception) -> bool:
        """The server did not answer in time (no connection refused, no error of its own)."""
        return isinstance(exc, pymysql.err.OperationalError) and self.error_code(exc) in (2003, 2013) and "timed out" in str(exc)

    def is_answer(self, exc: Exception) -> bool:
        """An error the server sent (1xxx: too many connections, access denied...): it answers."""
        code = self.error_code(exc) if isinstance(exc, pymysql.err.MySQLError) else None
        return code is not None and code < 2000

    @staticmethod
    def execute(conn, sql: str, params: tuple = ()):
        cur = conn.cursor()
        cur.execute(sql.replace("?", "%s"), params)
        return cur

    @staticmethod
    def begin(conn, write: bool) -> None:
        conn.begin()

    def migration_lock(self, conn):
        return _MySqlLock(self, conn)

    def table_exists(self, conn, name: str) -> bool:
        sql = "SELECT 1 FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?"
        return self.execute(conn, sql, (name,)).fetchone() is not None

    def create_version_table(self, conn) -> None:
        self.execute(
            conn, f"CREATE TABLE IF NOT EXISTS schema_version (version INT NOT NULL, applied_ms BIGINT NOT NULL) {_MYSQL_TABLE}"
        )
        # the steps begun and not done (database.py, _migrate_step); a table of its own, which the
        # servers before it do not read: a marker among the versions would read as one to them
        self.execute(conn, f"CREATE TABLE IF NOT EXISTS schema_begun (version INT NOT NULL) {_MYSQL_TABLE}")

    @staticmethod
    def error_code(exc: Exception) -> int | None:
        return exc.args[0] if exc.args and isinstance(exc.args[0], int) else None

    def is_unavailable(self, exc: Exception) -> bool:
        if isinstance(exc, pymysql.err.InterfaceError):
            return True
        return isinstance(exc, pymysql.err.OperationalError) and self.error_code(exc) in self._UNAVAILABLE_CODES


def dialect_for(url: str, data_dir: str):
    """`sqlite:///path`, `mysql://user:pass@host:port/db`, or empty for data_dir/facesvc.db."""
    if not url:
        return SqliteDialect(str(Path(data_dir) / "facesvc.db"))
    scheme = url.split(":", 1)[0].lower()
    if scheme == "sqlite":
        # SQLAlchemy's convention: sqlite:///relative/path.db, sqlite:////absolute/path.db
        path = url[len("sqlite:///") :] if url.startswith("sqlite:///") else ""
        if not path:
            raise ValueError(f"{url!r}: no database path (sqlite:///data/facesvc.db)")
        return SqliteDialect(path)
    if scheme in ("mysql", "mysql+pymysql", "mariadb"):
        return MySqlDialect(url)
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///path or mysql://user:pass@host:port/db")
