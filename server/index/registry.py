"""One index (a FaceIndex, made by the IndexEngine) per collection: loaded from what the engine saved or built from the database, then kept in step.

The database is the source of truth: an index is only ever a cache of the
faces table (for the current recognizer's model). The one way a change
reaches an index is `sync(collection, face_ids)`: under the collection's
lock, read those faces from the database and make the index agree. That is
idempotent and order-free, so this server's own writes (right after their
commit: read-your-writes) and the change log (other replicas' writes, see
server/index/sync.py) can both apply the same change, in any order, any
number of times, and the last one to run reads the newest state.

Loading a collection (first use, or the start-up warm-up): a valid snapshot
plus the change-log rows after it, checked against the database's face
count; otherwise a build from the faces table. A build and a change of the
same collection are serialised by the collection's lock.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref

import grpc

from server import errors
from server.index.base import FaceIndex, IndexEngine, IndexLoadError
from server.index.changes import LOOKBACK
from server.storage.interfaces import IndexSource

log = logging.getLogger("facesvc.index")

PROGRESS_S = 10.0  # a build logs its progress this often


def _earlier(idx: FaceIndex, created_ms: int | None) -> bool:
    """Whether `idx` was loaded for an earlier collection of its id than the one created at `created_ms`."""
    loaded_for = getattr(idx, "collection_created_ms", None)
    return created_ms is not None and loaded_for is not None and loaded_for != created_ms


def _stale(idx: FaceIndex) -> bool:
    """Whether the engine lost what `idx` held (Milvus lost its collection): it is loaded anew."""
    return getattr(idx, "stale", False)


def _takes_out(rows) -> bool:
    """Whether change-log rows take a vector out of an index: a deletion, a re-embedding, a drop."""
    return any(op != "add" for _, _, _, op in rows)


class _CollectionLock:
    """A lock that a weak reference can point to (threading.Lock cannot be)."""

    __slots__ = ("_lock", "__weakref__")

    def __init__(self):
        self._lock = threading.Lock()

    def __enter__(self):
        self.acquire()
        return self

    def acquire(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def try_acquire(self) -> bool:
        return self._lock.acquire(blocking=False)

    def release(self) -> None:
        self._lock.release()


class IndexRegistry:
    RETRY_S = 1.0  # between tries of changes that wait for the database (_apply_deferred)

    def __init__(
        self, store: IndexSource, model_id: str, dim: int, engine: IndexEngine, retention_s: float = 7 * 86400, batch: int = 5000
    ):
        self.store, self.model_id, self.dim, self.engine, self.batch = store, model_id, dim, engine, batch
        self.retention_s = retention_s
        self._indexes: dict[str, FaceIndex] = {}
        # a collection's lock lives while someone holds or waits for it: the ids of deleted collections
        # (every replica sees every drop) leave nothing behind
        self._locks: weakref.WeakValueDictionary[str, _CollectionLock] = weakref.WeakValueDictionary()
        self._guard = threading.Lock()
        self._dirty: set[str] = set()  # changed since their last snapshot
        # change-log rows of collections whose lock was held when they came (a load, a build): applied
        # by a thread of their own once it is free, so that one large collection's build does not hold
        # back every other collection's changes (see apply_changes)
        self._deferred: dict[str, list] = {}
        self._writing = threading.Lock()  # one round of snapshots at a time (the sync thread's, the last one's at stop)
        self.change_seq = 0  # the change log position applied (set by IndexSync)
        self.started_seq = 0  # the change log's last seq when this server started (set by IndexSync)
        self.on_local_change = None  # called after this server's own commits (e.g. a Redis publish)

    def _lock(self, collection: str) -> "_CollectionLock":
        with self._guard:
            lock = self._locks.get(collection)
            if lock is None:
                lock = self._locks[collection] = _CollectionLock()
            return lock

    def loaded(self) -> list[str]:
        return list(self._indexes)

    def sizes(self) -> dict[str, int]:
        """{collection: searchable faces} of the indexes this server has loaded (those an engine out of
        reach, Milvus down, cannot count are left out rather than failing the metrics scrape)."""
        out = {}
        for c, idx in list(self._indexes.items()):
            try:
                out[c] = len(idx)
            except errors.FaceServiceError:
                pass
        return out

    def get(self, collection: str, created_ms: int | None = None) -> FaceIndex:
        """The collection's index, loaded if this server has not loaded it yet. `created_ms`: the
        collection's creation time as the caller just read it. An index loaded for an earlier
        collection of the same id (deleted and created anew by another replica, whose drop this one
        has not applied yet) is never served for it: it is dropped and the new one loaded."""
        idx = self._indexes.get(collection)
        if idx is not None and not _earlier(idx, created_ms) and not _stale(idx):
            return idx
        with self._lock(collection):
            idx = self._indexes.get(collection)
            if idx is not None and _stale(idx):
                log.info("index %s: the engine lost what it held; loading it anew", collection)
                self._indexes.pop(collection, None)
                idx = None
            if idx is not None and _earlier(idx, created_ms) and _earlier(idx, self.store.collection_created_ms(collection)):
                # (the store's word too: a caller's read may be older than the index loaded since)
                log.info("index %s: the collection was created anew; loading the new one", collection)
                self._forget(collection)
                idx = None
            if idx is None:
                idx = self._load(collection)
                self._indexes[collection] = idx
            return idx

    def _load(self, collection: str) -> FaceIndex:
        created = self.store.collection_created_ms(collection)
        if created is None:  # deleted (by anyone): build nothing for it
            raise errors.not_found(
                errors.COLLECTION_NOT_FOUND, f"collection {collection!r} does not exist", collection=collection
            )
        idx = self._load_index(collection, created)
        idx.collection_created_ms = created  # what get() tells an earlier collection of this id by
        return idx

    def _load_index(self, collection: str, created: int) -> FaceIndex:
        shared = getattr(self.engine, "shared", False)
        if self.engine.saves_indexes or shared:
            t0 = time.perf_counter()
            saved = f"{self.engine.name} index" if shared else "snapshot"
            try:
                idx = self._from_snapshot(collection, created)
                if idx is not None:
                    log.info(
                        "index %s: loaded from its %s with %d faces in %.2fs",
                        collection,
                        saved,
                        len(idx),
                        time.perf_counter() - t0,
                    )
                    return idx
            except IndexLoadError as exc:
                log.warning("index %s: %s refused (%s); rebuilding from the database", collection, saved, exc)
        idx = self._build(collection)
        self._mark_dirty(collection)
        return idx

    def _build(self, collection: str) -> FaceIndex:
        """The index from the faces table, read in pages (progress logged every PROGRESS_S).

        An engine shared by the replicas (Milvus) goes on taking their changes during the build, and a
        page read before a face was deleted may be written after the delete was applied: the change-log
        rows committed since the build began are applied once more at its end."""
        t0 = last = time.perf_counter()
        since = self.store.last_change_seq() if getattr(self.engine, "shared", False) else None
        total = self.store.count_faces(collection, self.model_id)
        idx = self.engine.create(collection, self.dim, self.model_id, total)
        after, done = "", 0
        batch = self.engine.first_batch(self.batch)
        while True:
            rows = self.store.collection_embeddings(collection, self.model_id, after, batch)
            batch = self.batch
            if not rows:
                break
            idx.add([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
            after, done = rows[-1][0], done + len(rows)
            if time.perf_counter() - last >= PROGRESS_S:
                last = time.perf_counter()
                log.info("index %s: building from the database: %d of %d faces in %.0fs", collection, done, total, last - t0)
        if since is not None:
            self._replay(collection, idx, max(0, since - LOOKBACK), recent=True)
        log.info("index %s: built from the database with %d faces in %.2fs", collection, len(idx), time.perf_counter() - t0)
        return idx

    def _from_snapshot(self, collection: str, created: int) -> FaceIndex | None:
        expect = {
            "model": self.model_id,
            "dimension": self.dim,
            "collection_created_ms": created,
            "min_written_ms": int((time.time() - self.retention_s) * 1000),
        }
        loaded = self.engine.load(collection, expect)
        if loaded is None:
            return None
        idx, doc = loaded
        seq, recent = doc["change_seq"], doc["change_seq"] is None
        if recent:  # an engine kept current by every replica: the recent log covers a crash between commit and write
            seq = max(0, self.store.last_change_seq() - LOOKBACK)
        start = seq
        for attempt in range(3):  # a write landing between replay and count gets one more replay
            seq = self._replay(collection, idx, seq, recent)
            have, want = len(idx), self.store.count_faces(collection, self.model_id)
            if have == want:
                if seq != start and not recent:
                    # changes made while this server was down (deletions among them): the snapshot
                    # on disk still holds what they removed, until the next one replaces it
                    self._mark_dirty(collection)
                return idx
            if recent:
                time.sleep(0.2 * attempt)  # other replicas' writes to the shared engine in flight
        raise IndexLoadError(f"{have} faces after replaying the change log, the database holds {want}")

    def _replay(self, collection: str, idx: FaceIndex, seq: int, recent: bool = False) -> int:
        """Applies the collection's change-log rows after `seq`; returns the last seq seen.
        `recent`: the rows are the log's last ones, not those after a snapshot of this collection, so
        a drop among them ended an earlier collection of this name: only the rows after it are applied."""
        while True:
            rows = self.store.changes_after(seq, self.batch, collection)
            if not rows:
                return seq
            drops = [i for i, (_, _, _, op) in enumerate(rows) if op == "drop"]
            if drops and not recent:
                raise IndexLoadError("the collection was deleted after the snapshot")
            live = rows[drops[-1] + 1 :] if drops else rows
            if live:
                self._apply(collection, idx, live)
            seq = rows[-1][0]

    def _apply(self, collection: str, idx: FaceIndex, rows) -> None:
        face_ids = list(dict.fromkeys(f for _, _, f, _ in rows))
        present = self.store.faces_by_id(collection, self.model_id, face_ids)
        replace = {f for _, _, f, op in rows if op == "update"}
        idx.apply(present, [f for f in face_ids if f not in present], replace)

    # -- changes ----------------------------------------------------------------
    def sync(self, collection: str, face_ids: list[str], replace: bool = False) -> None:
        """Make the loaded index (if any) agree with the database about these faces."""
        if not face_ids:
            return
        with self._lock(collection):
            idx = self._indexes.get(collection)
            if idx is not None and _stale(idx):  # its next use loads it anew, with this change
                self._indexes.pop(collection, None)
                return
            if idx is None:  # not loaded: the load will read the committed state
                return
            self._apply(collection, idx, [(0, collection, f, "update" if replace else "sync") for f in face_ids])
        self._mark_dirty(collection)

    def local_change(self, collection: str, face_ids: list[str]) -> None:
        """After this server's own commit. Never fails the committed request: if the database
        cannot be read right now, the change log brings the change in on a later poll."""
        try:
            self.sync(collection, face_ids)
        except errors.FaceServiceError as exc:
            log.warning("index %s: could not apply a committed change now (%s); the change log will", collection, exc)
        if self.on_local_change is not None:
            self.on_local_change()

    def collection_deleted(self, collection: str) -> None:
        """After this server deleted the collection."""
        self.drop(collection)
        if self.on_local_change is not None:
            self.on_local_change()

    def drop(self, collection: str) -> None:
        """The collection was deleted (or must be reloaded): forget its index and its snapshot."""
        with self._lock(collection):
            self._forget(collection)

    def _forget(self, collection: str) -> None:
        """Under the collection's lock: its index, its mark and what the engine saved for it go."""
        self._indexes.pop(collection, None)
        with self._guard:
            self._dirty.discard(collection)
        self.engine.forget(collection)  # Milvus keeps the rows of a collection created since

    def _drop_earlier(self, collection: str, current: int) -> None:
        """Under the collection's lock: forget the index and the saved files of an earlier collection
        of this id than the one created at `current`; keep the current one's."""
        idx = self._indexes.get(collection)
        if idx is not None and not _earlier(idx, current):
            return
        if idx is None and (self._made_for(collection) or {}).get("collection_created_ms") == current:
            return
        self._forget(collection)

    def apply_changes(self, rows) -> None:
        """Change-log rows from IndexSync, in seq order. A collection whose lock is held (its index
        being loaded or built, which can take minutes) does not hold back the others: its rows wait
        for it on a thread of their own, and later rows of it queue behind them, in order."""
        by_collection: dict[str, list] = {}
        for row in rows:
            by_collection.setdefault(row[1], []).append(row)
        for collection, crows in by_collection.items():
            lock = self._lock(collection)
            with self._guard:
                queued = self._deferred.get(collection)
                if queued is not None:
                    queued.extend(crows)
                    continue
                held = lock.try_acquire()
                if not held:
                    self._deferred[collection] = list(crows)
            if not held:
                name = f"index-changes-{collection}"
                try:
                    threading.Thread(target=self._apply_deferred, args=(collection, lock), name=name, daemon=True).start()
                    continue
                except RuntimeError:  # no thread to be had: wait for the lock here, as the poll did before
                    with self._guard:
                        crows = self._deferred.pop(collection)
                    lock.acquire()
            try:
                dirty = self._apply_locked(collection, crows)
            except errors.FaceServiceError as exc:
                if exc.code == grpc.StatusCode.UNAVAILABLE:
                    raise  # the database is out of reach: the poll tries the batch again
                dirty = self._unload_failed(collection)
            except Exception:  # noqa: BLE001 - one collection's failure must not hold back the others' changes
                dirty = self._unload_failed(collection)
            finally:
                lock.release()
            if dirty:
                self._mark_dirty(collection)

    def _apply_deferred(self, collection: str, lock: _CollectionLock) -> None:
        """A collection's rows that came while its lock was held, and those queued behind them. Until
        they are applied its index is not snapshotted (the round's change_seq would claim them). The
        poll has moved past them, so none may be dropped: while the database is out of reach they are
        tried again every RETRY_S (searches answer UNAVAILABLE meanwhile, as they read the collection
        from the database). Any other failure unloads the index (the next search loads what the
        database holds) and leaves no rows behind for a thread that is gone."""
        outage = False
        try:
            while True:
                with lock:
                    with self._guard:
                        crows, self._deferred[collection] = self._deferred[collection], []
                    try:
                        dirty = self._apply_locked(collection, crows)
                    except errors.FaceServiceError as exc:
                        if exc.code != grpc.StatusCode.UNAVAILABLE:
                            raise
                        if not outage:
                            log.warning("index %s: %d changes wait for the database (%s)", collection, len(crows), exc.reason)
                        outage, dirty = True, False
                        with self._guard:
                            self._deferred[collection][:0] = crows
                    else:
                        if outage:
                            log.info("index %s: the changes that waited for the database are applied", collection)
                        outage = False
                    with self._guard:
                        done = not self._deferred[collection]
                        if done:
                            del self._deferred[collection]
                if dirty:
                    self._mark_dirty(collection)
                if done:
                    return
                if outage:
                    time.sleep(self.RETRY_S)
        except Exception:  # noqa: BLE001 - the thread must not leave the collection behind the log
            with lock:
                self._unload_failed(collection)

    def _unload_failed(self, collection: str) -> bool:
        """Under the collection's lock, in an exception handler: its change-log rows could not be
        applied (a fault of the index, not an outage); the loaded index goes, with the rows queued for
        it and its snapshot (which may hold a face these rows deleted, and which no round rewrites for
        an index not loaded), and the next search builds it from the database. The poll goes on with
        the other collections."""
        log.exception("index %s: changes not applied; the index is built anew on its next use", collection)
        with self._guard:
            self._deferred.pop(collection, None)
            self._dirty.discard(collection)
        self._indexes.pop(collection, None)
        try:
            self.engine.forget(collection)
        except Exception:  # noqa: BLE001 - a read-only disk, Milvus away: tidy_saved or the next load's rewrite removes it
            log.exception("index %s: its snapshot could not be removed", collection)
        return False

    def _apply_locked(self, collection: str, crows) -> bool:
        """Under the collection's lock: its change-log rows (seq order); whether its index changed."""
        drops = [i for i, (_, _, _, op) in enumerate(crows) if op == "drop"]
        if drops:
            current = self.store.collection_created_ms(collection)
            if current is None:
                self._forget(collection)
                return False
            # the collection exists: the drop ended an earlier one of its id (a start re-reads the
            # recent log). What was loaded or saved for that one goes; the new one's stays
            self._drop_earlier(collection, current)
            crows = crows[drops[-1] + 1 :]
            if not crows:
                return False
        idx = self._indexes.get(collection)
        if idx is not None and _stale(idx):  # its next use loads it anew, with these rows
            self._indexes.pop(collection, None)
            return False
        if idx is None:
            if self.engine.saves_indexes and _takes_out(crows) and not self._saved_with(collection, crows):
                # a snapshot no one loads here would keep what these rows took out: the next load
                # builds from the database instead
                self.engine.forget(collection)
            return False
        self._apply(collection, idx, crows)
        return True

    def _made_for(self, collection: str) -> dict | None:
        made_for = getattr(self.engine, "made_for", None)  # engines that save snapshots
        return None if made_for is None else made_for(collection)

    def _saved_with(self, collection: str, crows) -> bool:
        """Whether the collection's snapshot already has what these rows take out. A start re-reads
        the last rows of the change log, and a snapshot written before it has those up to its
        change_seq applied: forgetting it for them would rebuild the collection from the database.
        Only rows from before this start are looked up (a snapshot's document holds its label map)."""
        last = max(row[0] for row in crows if row[3] != "add")
        if last > self.started_seq:
            return False
        seq = (self._made_for(collection) or {}).get("change_seq")
        return seq is not None and last <= seq

    def compact(self, min_deleted_share: float) -> list[str]:
        """Rebuild from the database every loaded index whose deleted faces are at least this share of
        its slots (their room, and the vectors an engine keeps of them, go); returns the collections
        rebuilt. The build runs outside the collection's lock (searches and changes go on with the
        old index); the changes logged meanwhile are replayed into the new one under the lock, and it
        replaces the old one only when it holds what the database holds. Its next snapshot is
        written without the deleted faces."""
        done = []
        for collection, idx in list(self._indexes.items()):
            st = idx.stats()
            if not st.deleted or st.deleted < min_deleted_share * (st.size + st.deleted):
                continue
            if self.store.collection_created_ms(collection) is None:
                continue  # deleted: the change log drops it
            seq = self.store.last_change_seq()
            fresh = self._build(collection)
            with self._lock(collection):
                if self._indexes.get(collection) is not idx:  # dropped or replaced meanwhile
                    continue
                # from LOOKBACK rows back: a MySQL transaction holding a seq below `seq` may commit
                # after it was read (and during the build); replaying a row twice changes nothing,
                # and a drop among those rows ended an earlier collection of this id (recent). A drop
                # of this one since would have taken the index out (the check above)
                self._replay(collection, fresh, max(0, seq - LOOKBACK), recent=True)
                have, want = len(fresh), self.store.count_faces(collection, self.model_id)
                if have != want:  # a late commit the replay missed: keep the old index, try again later
                    log.info("index %s: compaction skipped (%d faces built, the database holds %d)", collection, have, want)
                    continue
                fresh.collection_created_ms = getattr(idx, "collection_created_ms", None)
                self._indexes[collection] = fresh
            self._mark_dirty(collection)
            log.info("index %s: compacted (%d deleted of %d slots)", collection, st.deleted, st.size + st.deleted)
            done.append(collection)
        return done

    # -- snapshots ----------------------------------------------------------------
    def tidy_saved(self, loads_all: bool = True) -> list[str]:
        """At start-up, what this server saved that nothing would ever replace, so that no file keeps
        a face deleted while it was down (docs/collections.md, Erasure); returns the collections
        whose snapshots went:
          - the files of collections deleted meanwhile, or deleted and created anew: the change log
            it reads from start-up on may no longer hold their drop;
          - files a snapshot does not list (a write killed after its rename, before it removed the
            previous snapshot's graphs);
          - unless `loads_all` (the warm-up loads every collection, and a load that replays past
            deletions rewrites the snapshot), a snapshot whose collection changed since it was
            made: nothing loads it until its first search."""
        saved = getattr(self.engine, "saved", None)
        gone = []
        oldest = (time.time() - self.retention_s) * 1000  # older: the log may not say what changed since
        for collection, made_for in (saved() if saved else {}).items():
            with self._writing, self._lock(collection):
                created = self.store.collection_created_ms(collection)
                if collection in self._indexes and created is not None:
                    continue  # loaded meanwhile (and so built anew where these were stale): its next snapshot replaces them
                keep = created is not None and made_for is not None and made_for["collection_created_ms"] == created
                keep = keep and made_for["written_ms"] >= oldest
                if keep and not loads_all:  # an index no one loads is never rewritten
                    keep = not self._changed_since(collection, made_for["change_seq"])
                if keep:
                    self.engine.sweep(collection)
                    continue
                self.engine.forget(collection)
            gone.append(collection)
        if gone:
            log.info("index snapshots of %d collections removed: deleted, or changed since", len(gone))
        return gone

    def _changed_since(self, collection: str, seq: int | None) -> bool:
        """Whether the change log holds a change of the collection after `seq` that takes a vector out
        (a deletion, a re-embedding, a drop); True when it cannot tell."""
        if seq is None:
            return True
        while rows := self.store.changes_after(seq, self.batch, collection):
            if _takes_out(rows):
                return True
            seq = rows[-1][0]
        return False

    def _mark_dirty(self, collection: str) -> None:
        with self._guard:
            self._dirty.add(collection)

    def write_snapshots(self, change_seq: int, refresh_older_than_s: float | None = None) -> int:
        """Snapshots of the indexes changed since their last one (and of those older than
        `refresh_older_than_s`, so none outlives the change log). `change_seq`: every change
        at or below it is in the indexes. Returns how many were written."""
        if not self.engine.saves_indexes:
            return 0
        with self._writing:
            return self._write_snapshots(change_seq, refresh_older_than_s)

    def _write_snapshots(self, change_seq: int, refresh_older_than_s: float | None) -> int:
        with self._guard:
            todo, self._dirty = set(self._dirty), set()
        if refresh_older_than_s is not None:
            cutoff = time.time() - refresh_older_than_s
            todo |= {c for c, i in list(self._indexes.items()) if i.snapshot_at < cutoff}
        written = 0
        for collection in sorted(todo):
            idx = self._indexes.get(collection)
            with self._guard:
                waiting = collection in self._deferred
            # being loaded (a load marks before it is in place), or dropped (which unmarks); or changes
            # at or below change_seq still wait to be applied (apply_changes)
            if idx is None or waiting:
                self._mark_dirty(collection)
                continue
            t0 = time.perf_counter()
            # Under the collection's lock, which every change to its index takes first: they wait for
            # the write here (the change log's on a thread of their own, apply_changes), and none waits
            # on the index's own lock, where a waiting writer would hold back every search until the
            # graphs were on disk. Nor can a drop or compaction's swap come between.
            with self._lock(collection):
                now = self._indexes.get(collection)
                if now is not idx:
                    if now is not None:  # compaction's index replaced it meanwhile: the next round writes that
                        self._mark_dirty(collection)
                    continue
                try:
                    created = self.store.collection_created_ms(collection)
                    if created is None or _earlier(idx, created):
                        continue  # deleted, or created anew: this index is an earlier collection's, to be dropped
                    self.engine.save(collection, idx, {"collection_created_ms": created, "change_seq": change_seq})
                except (OSError, errors.FaceServiceError) as exc:
                    log.warning("index %s: snapshot not written (%s)", collection, exc)
                    self._mark_dirty(collection)
                    continue
                except Exception:  # noqa: BLE001 - the round's other collections are still to be written
                    log.exception("index %s: snapshot not written", collection)
                    self._mark_dirty(collection)
                    continue
            idx.snapshot_at = time.time()
            written += 1
            log.info("index %s: snapshot of %d faces written in %.2fs", collection, len(idx), time.perf_counter() - t0)
        return written
