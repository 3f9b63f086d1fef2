"""The SQL database the role stores share: the connection pool, one transaction per call
(outages become STORE_UNAVAILABLE), retries of lost races, and the schema migrations.

The database is the source of truth. Every write is one transaction: a face
and the subject it creates are committed together or not at all. Identifier
columns compare byte-wise on both backends (utf8mb4_bin on MySQL), so
"Alice" and "alice" are two subjects everywhere.

Every write that changes which faces a search index should hold also appends
a row to `face_changes` in the same transaction (`_log`: op add / delete /
update, or drop for a whole collection). Each server replica follows that log
to keep its in-memory indexes current (server/index/sync.py).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import time

import grpc
import numpy as np

from server import context, errors

log = logging.getLogger("facesvc.store")
_CREATES_TABLE = re.compile(r"\s*CREATE TABLE (?:IF NOT EXISTS )?(\w+)", re.IGNORECASE)


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


def _rolled_back(conn) -> bool:
    try:
        conn.rollback()
        return True
    except Exception:  # noqa: BLE001 - a connection that cannot roll back is closed by the pool
        return False


class ConnectionPool:
    """At most `size` connections; a connection whose use ended in an exception is closed, not reused
    (SqlDatabase._tx returns one whose transaction ended in an answer of its own, rolled back)."""

    def __init__(self, dialect, size: int, wait_s: float = 10.0):
        self.d = dialect
        self._idle: queue.LifoQueue = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)
        self._wait_s = wait_s

    @contextlib.contextmanager
    def connection(self, deadline: float | None = None):
        """deadline: the monotonic time by which the caller must have its answer (None: the dialect's
        read timeout per wait); the wait for a free connection counts against it."""
        left = None if deadline is None else deadline - time.monotonic()
        if (
            left is not None
            and left <= 0
            or not self._slots.acquire(timeout=self._wait_s if left is None else min(left, self._wait_s))
        ):
            raise errors.unavailable(errors.STORE_UNAVAILABLE, "all database connections are busy; retry")
        conn = None
        try:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise errors.unavailable(errors.STORE_UNAVAILABLE, "all database connections are busy; retry")
            try:
                conn = self.d.checkout(self._idle.get_nowait(), left)
            except queue.Empty:
                conn = self.d.connect(left)
            yield conn
            self._idle.put(conn)
        except BaseException:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.close()
            raise
        finally:
            self._slots.release()

    def probe_idle(self, wait_s: float) -> bool | None:
        """Whether an idle connection answers a ping within wait_s (None: none is idle, or no slot is
        free to take one with). One that does goes back to the pool; one that does not is closed, and
        its error raised."""
        if not self._slots.acquire(blocking=False):  # the pool's bound holds for the probe too
            return None
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return None
            try:
                self.d.probe(wait_s, conn)
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
            self._idle.put(conn)
            return True
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


class _Responsiveness:
    """Whether the database answers at all. One that hangs (a stopped server, a network that drops
    packets without a reset) held every call that touched it for the read timeout, and the worker
    threads with them, so that calls that need no database waited too. Once a statement has timed
    out and a probe gets no answer within PROBE_S either (an idle connection's ping, else SELECT 1 on
    a new one; a lock wait or a slow query does not end here), transactions are answered
    STORE_UNAVAILABLE at once. Every RETRY_S one transaction is let through to try: the first that
    gets an answer ends it, so a probe that misjudged (slow new connections) costs a second."""

    RETRY_S = 1.0
    PROBE_S = 2.0
    TRIAL_S = 5.0  # the longest a trial transaction may take

    def __init__(self, answers):
        self._answers = answers  # (wait_s) -> bool; None: a database that cannot hang (a file)
        self._lock = threading.Lock()
        self._down_until: float | None = None  # monotonic; None: answering
        self._trial = False  # a transaction is trying the database
        self._asking = False  # a probe after a timeout is under way

    def check(self) -> bool:
        """Before a transaction: raise STORE_UNAVAILABLE while the database does not answer. True:
        go ahead as the trial of a database that did not answer (tell settle() how it went)."""
        with self._lock:
            if self._down_until is None:
                return False
            if self._trial or time.monotonic() < self._down_until:
                raise errors.unavailable(errors.STORE_UNAVAILABLE, "the database does not answer; retry")
            self._trial = True
            return True

    def settle(self, answered: bool) -> None:
        """How the trial went."""
        with self._lock:
            self._trial = False
            was_down, self._down_until = self._down_until, None if answered else time.monotonic() + self.RETRY_S
        if answered and was_down is not None:
            log.info("the database answers again")

    def timed_out(self) -> None:
        """A statement timed out: a database that stopped answering, or only a long wait? Asked on a
        thread of its own: the caller's answer is due now."""
        with self._lock:
            if self._answers is None or self._down_until is not None or self._asking:
                return
            self._asking = True
        try:
            threading.Thread(target=self._ask, name="db-probe", daemon=True).start()
        except RuntimeError:  # no thread to be had: the next timeout asks
            with self._lock:
                self._asking = False

    def _ask(self) -> None:
        answers = self._answers(self.PROBE_S)
        with self._lock:
            self._asking = False
            if answers or self._down_until is not None:
                return
            self._down_until = time.monotonic() + self.RETRY_S
        log.warning("the database does not answer: transactions are answered STORE_UNAVAILABLE at once until it does")


class _Eraser:
    """Erases what a database file keeps of deleted rows (SQLite: the old pages in its write-ahead
    log, until a checkpoint truncates it), shortly after each commit that deleted a face: the
    erasure promise (docs/collections.md) covers the database's files as it does the index's. One
    thread; deletions that come together are erased together."""

    GATHER_S = 0.2  # deletions that come together (a retention sweep, DeleteSubject) share one pass
    RETRY_S = 0.5  # a reader or writer held the log: again, waiting twice as long each time...
    MAX_RETRY_S = 30.0  # ...up to this

    def __init__(self, dialect):
        self.d = dialect
        self._due, self._stopping = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="db-erase", daemon=True)
        self._thread.start()

    def due(self) -> None:
        self._due.set()

    def stop(self) -> None:
        self._stopping.set()
        self._due.set()
        self._thread.join(5)

    def _run(self) -> None:
        wait = self.RETRY_S
        while True:
            self._due.wait()
            self._due.clear()
            if self._stopping.wait(self.GATHER_S):
                return
            try:
                done = self.d.erase_freed()
            except Exception:  # noqa: BLE001 - the thread must survive; it tries again
                log.exception("erasing deleted rows from the database's files failed")
                done = False
            if done:
                wait = self.RETRY_S
                continue
            if wait >= self.MAX_RETRY_S / 2:
                log.warning("deleted rows wait to be erased from the database's write-ahead log: a reader holds it")
            if self._stopping.wait(wait):
                return
            wait = min(wait * 2, self.MAX_RETRY_S)
            self._due.set()


ANSWER_MARGIN_S = 0.5  # of a call's time left, kept to answer it in


def _call_out_of_time() -> errors.FaceServiceError:
    return errors.FaceServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        errors.CALL_ENDED,
        "the call's time ran out before the database answered; nothing was written",
    )


def _trial_out_of_time() -> errors.FaceServiceError:
    return errors.unavailable(
        errors.STORE_UNAVAILABLE, "the database is being tried again after it did not answer; nothing was written; retry"
    )


def _left(deadline: float, out_of_time, grace: float = 0.0) -> float:
    """How long a statement may wait, up to `deadline` (+ grace). None left: the transaction ends
    here, rolled back, with out_of_time(), so the caller learns for certain that nothing was written
    (a statement sent with no time to wait would time out, and a commit's outcome would be unknown)."""
    left = deadline + grace - time.monotonic()
    if left <= 0:
        raise out_of_time()
    return left


def _deadline() -> float | None:
    """The monotonic time by which the call this thread serves must have its answer, less a margin to
    answer in (None: no deadline, or no call): a statement waits no longer than its caller does."""
    ctx = context.current_call.get()
    remaining = None if ctx is None else ctx.time_remaining()
    return None if remaining is None else time.monotonic() + max(0.1, remaining - ANSWER_MARGIN_S)


class SqlDatabase:
    def __init__(self, dialect, pool_size: int = 8):
        self.d = dialect
        self.pool = ConnectionPool(dialect, pool_size)
        self.responsive = _Responsiveness(None if dialect.probe is None else self._answers)
        self._tls = threading.local()  # erasing: the transaction under way takes a vector out
        self._eraser = _Eraser(dialect) if getattr(dialect, "erase_freed", None) else None

    def _answers(self, wait_s: float) -> bool:
        """Whether the database answers within wait_s: an idle connection's ping, else a new connection."""
        try:
            if self.pool.probe_idle(wait_s):
                return True
        except Exception as exc:  # noqa: BLE001
            if self.d.is_answer(exc):
                return True
            # silent, or closed while it was idle (a server restart, a NAT's idle timeout that drops
            # pooled connections while new ones get through): ask on a new one
        try:
            self.d.probe(wait_s)
            return True
        except Exception as exc:  # noqa: BLE001 - whatever the driver raises; an error of the server's is an answer
            return self.d.is_answer(exc)

    @property
    def backend(self) -> str:
        return self.d.name

    def describe(self) -> str:
        return self.d.describe()

    def close(self) -> None:
        if self._eraser is not None:
            self._eraser.stop()
        self.pool.close()

    # -- plumbing ------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self, write: bool = True):
        """One transaction; `q(sql, *params)` runs a statement in it. DB outages become UNAVAILABLE."""
        committing, answer, reached = False, None, False
        self._tls.erasing = False
        # a file (SQLite) does not hang: its statements take no deadline, its wait for a connection does
        slot_deadline = _deadline()
        deadline = slot_deadline if self.d.probe is not None else None
        out_of_time = _call_out_of_time
        trial = self.responsive.check()
        if trial:  # a database that did not answer: the one call trying it does not wait it out for long
            trial_end = time.monotonic() + self.responsive.TRIAL_S
            if deadline is None or trial_end < deadline:
                deadline, out_of_time = trial_end, _trial_out_of_time

        def q(sql, *params):
            left = None
            if deadline is not None:  # what is left of the call's time, statement by statement
                left = _left(deadline, out_of_time)
                self.d.bound(conn, left)
            self.d.lock_wait(conn, left)
            return self.d.execute(conn, sql, params)

        try:
            with self.pool.connection(deadline if deadline is not None else slot_deadline) as conn:
                self.d.begin(conn, write)
                reached = True
                try:
                    yield q
                    if deadline is not None:  # the commit may use the margin kept to answer in, but for a moment
                        self.d.bound(conn, _left(deadline, out_of_time, ANSWER_MARGIN_S - 0.1))
                    committing = True
                    conn.commit()
                except (errors.FaceServiceError, _Retry, _Duplicate) as exc:
                    # the caller's own answer (not found, a limit, a race to run again): rolled back, the
                    # connection is sound and goes back to the pool; closing it cost the next call a connect
                    if not _rolled_back(conn):
                        raise
                    answer = exc
                except BaseException:
                    _rolled_back(conn)
                    raise
            if answer is not None:
                raise answer
        except BaseException as exc:
            unavailable = (
                not isinstance(exc, errors.FaceServiceError) and isinstance(exc, Exception) and self.d.is_unavailable(exc)
            )
            if trial:  # BEGIN was answered, or the server sent an error of its own: it answers
                self.responsive.settle(reached or isinstance(exc, Exception) and self.d.is_answer(exc))
            if not unavailable:
                raise
            log.warning("database unavailable: %s", exc)
            if self.d.is_timeout(exc) and not trial:
                self.responsive.timed_out()
            # the driver's text names hosts, ports and users: it goes to the log, the caller gets the reason
            if committing and write:  # the commit may have reached the database before the connection went
                message = "the database became unavailable during the commit: the change may have been made; read it back before retrying"
            else:
                message = (
                    "the database is unavailable; nothing was written; retry" if write else "the database is unavailable; retry"
                )
            raise errors.unavailable(errors.STORE_UNAVAILABLE, message, detail=f"{type(exc).__name__}: {exc}") from exc
        else:
            if trial:
                self.responsive.settle(True)
            if self._tls.erasing and self._eraser is not None:
                self._eraser.due()

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
        step = 0
        try:
            with self.pool.connection() as conn:
                had_markers = self.d.table_exists(conn, "schema_begun")
                self.d.create_version_table(conn)
                with self.d.migration_lock(conn):
                    row = self.d.execute(conn, "SELECT MAX(version) FROM schema_version").fetchone()
                    current = row[0] or 0
                    if current > target:
                        raise RuntimeError(
                            f"database schema version {current} is newer than this server understands ({target}); upgrade the server"
                        )
                    # a schema migrated by servers that wrote no begun markers: the first step this
                    # start runs may have been cut short by one of them
                    legacy = bool(current) and not had_markers
                    begun = {r[0] for r in self.d.execute(conn, "SELECT version FROM schema_begun").fetchall()}
                    for version in range(current + 1, target + 1):  # nothing is made beside a table not ours
                        if version not in begun and not (legacy and version == current + 1):
                            self._refuse_tables_not_ours(conn, version)
                    for version in range(current + 1, target + 1):
                        step = version
                        self._migrate_step(conn, version, resumed=legacy and version == current + 1)
        except RuntimeError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable, refused login, unknown database: one line, no traceback
            if step:
                raise RuntimeError(
                    f"migrating the schema of {self.describe()} to version {step} failed: {type(exc).__name__}: {exc}"
                ) from exc
            raise RuntimeError(f"cannot reach the database {self.describe()}: {type(exc).__name__}: {exc}") from exc
        return target

    def _refuse_tables_not_ours(self, conn, version: int) -> None:
        """A table a step not begun makes that is there already is someone else's: every start stops,
        naming it, before any step runs (else the steps before it were made, and a later start, taking
        the first step it runs for one cut short, passed over the table as its own)."""
        for stmt in self.d.schema[version - 1]:
            made = _CREATES_TABLE.match(stmt)
            if made and self.d.table_exists(conn, made.group(1)):
                raise RuntimeError(
                    f"the database already holds a table {made.group(1)!r} that facesvc did not make: "
                    "give facesvc a database of its own"
                )

    def _migrate_step(self, conn, version: int, resumed: bool = False) -> None:
        """One schema version's statements and its version row. On SQLite in one transaction (its DDL is
        transactional): a step cut short by a crash leaves the version before it, which the next start
        redoes whole, and a second process starting on the same file waits and finds it done. MySQL
        commits each DDL statement by itself; its replicas migrate one at a time (migration_lock), and
        a step cut short leaves some of its tables, columns or indexes behind: the next start redoes
        the step, passing over what is there already (the dialect's `exists_errors`). Only that step:
        one whose begun marker (its version in schema_begun, written before its first statement) is
        there, or (`resumed`) the first this start runs on a schema migrated by servers that wrote no
        markers; elsewhere a table of the same name is someone else's, and the migration stops (before
        any step runs, migrate() looks for the tables of the steps not begun: _refuse_tables_not_ours).
        This holds for additive steps (tables, columns, indexes); a step that drops, renames or moves
        data must be made safe to run twice by itself."""
        sqlite = self.d.name == "sqlite"
        if sqlite:
            self.d.execute(conn, "BEGIN IMMEDIATE")
        try:
            done = self.d.execute(conn, "SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
            if done < version:
                log.info("migrating %s schema to version %d", self.d.name, version)
                marker = ("DELETE FROM schema_begun WHERE version = ?", (version,))
                begun = self.d.execute(conn, "SELECT COUNT(*) FROM schema_begun WHERE version = ?", (version,)).fetchone()[0]
                resumed = resumed or bool(begun)
                if not begun:
                    self.d.execute(conn, "INSERT INTO schema_begun (version) VALUES (?)", (version,))
                for stmt in self.d.schema[version - 1]:
                    try:
                        self.d.execute(conn, stmt)
                    except Exception as exc:
                        exists = self.d.error_code(exc) in self.d.exists_errors
                        if not resumed or not exists:
                            if exists and not sqlite:  # made by someone else since the check: not ours at the next start either
                                with contextlib.suppress(Exception):
                                    self.d.execute(conn, *marker)
                            raise
                        log.info("schema version %d: %s is in place already", version, stmt.split("(")[0].strip())
                if not sqlite:  # the version and the marker's removal together (a kill between left the marker)
                    conn.begin()
                self.d.execute(conn, "INSERT INTO schema_version (version, applied_ms) VALUES (?, ?)", (version, now_ms()))
                self.d.execute(conn, *marker)
                if not sqlite:
                    conn.commit()
        except BaseException:
            if sqlite:
                with contextlib.suppress(Exception):  # SQLite may have rolled back by itself (a full disk)
                    self.d.execute(conn, "ROLLBACK")
            raise
        if sqlite:
            self.d.execute(conn, "COMMIT")

    # -- shared by the role stores ---------------------------------------------
    PRUNE_BATCH = 10_000  # rows per transaction when pruning by age

    def _prune(self, table: str, before_ms: int) -> int:
        """Deletes `table`'s rows created before `before_ms`, oldest first, a batch per transaction: one
        DELETE of a large backlog could outlast the connection's read timeout, be rolled back when
        the connection goes, and fail the same way every hour after. Returns how many went."""
        total = 0
        while True:
            with self._tx() as q:
                row = q(
                    f"SELECT created_ms FROM {table} WHERE created_ms < ? ORDER BY created_ms LIMIT 1 OFFSET ?",
                    before_ms,
                    self.PRUNE_BATCH - 1,
                ).fetchone()
                upto = before_ms if row is None else min(before_ms, row[0] + 1)
                total += q(f"DELETE FROM {table} WHERE created_ms < ?", upto).rowcount
            if row is None or upto >= before_ms:
                return total

    def _collection_row(self, q, collection_id: str):
        row = q("SELECT collection_id, liveness_policy FROM collections WHERE collection_id = ?", collection_id).fetchone()
        if row is None:
            raise errors.not_found(
                errors.COLLECTION_NOT_FOUND, f"collection {collection_id!r} does not exist", collection=collection_id
            )
        return row

    def _log(self, q, collection_id: str, face_id: str | None, op: str) -> None:
        if op != "add":  # a vector goes: once committed, what the database file keeps of it is erased
            self._tls.erasing = True
        q(
            "INSERT INTO face_changes (collection_id, face_id, op, created_ms) VALUES (?, ?, ?, ?)",
            collection_id,
            face_id,
            op,
            now_ms(),
        )
