"""The background thread that keeps this replica's indexes current, and writes their snapshots.

Consistency (what a caller can rely on):
- On the replica that committed a Register/Delete, the change is in that
  replica's index before the RPC returns (read-your-writes).
- Every other replica applies it within `sync_interval_s` (default 1 s) plus
  the time to read the change, because each polls the face_changes log. With
  Redis configured, a commit also publishes a wake-up on a pub/sub channel, so
  the others usually apply it within milliseconds; the poll is the safety net
  when a message is lost or Redis is down.
- While the database is unreachable the indexes stay as they were, and the
  changes are applied once it is back. Search itself answers UNAVAILABLE
  meanwhile: it reads the collection's policy and thresholds from the database
  (an operator's change to them must hold at once, on every replica).
- A replica never serves a face the database has deleted once it has seen
  the delete's log row, and a restart never resurrects one: snapshots are
  replayed through the log and checked against the database's face count.

One thread owns the feed, so the change-log position written into a snapshot
is always one whose changes are all in the indexes.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

from server import errors
from server.index.changes import ChangeFeed
from server.index.registry import IndexRegistry

log = logging.getLogger("facesvc.index")


class ChangeNotifier:
    """Redis pub/sub wake-ups between replicas. Best effort: failures are logged and ignored."""

    def __init__(self, url: str, channel: str, timeout_s: float = 0.5):
        self.channel = channel
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._quiet_until = 0.0

    def publish(self) -> None:
        if time.monotonic() < self._quiet_until:
            return
        try:
            self.client.publish(self.channel, b"1")
        except redis.RedisError as exc:
            self._quiet_until = time.monotonic() + 5.0  # Redis is down: don't slow every commit
            log.warning("index change notification not published (%s); replicas will see it by polling", exc)

    def listen(self, wake, stop: threading.Event) -> None:
        """Calls wake() for each message until stop is set (run in its own thread)."""
        while not stop.is_set():
            pubsub = None
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                while not stop.is_set():
                    if pubsub.get_message(timeout=1.0) is not None:
                        wake()
            except (redis.RedisError, OSError) as exc:
                log.debug("index change subscription lost (%s); retrying", exc)
                stop.wait(2.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass

    def close(self) -> None:
        self.client.close()


_PAUSED: set[str] = set()  # background jobs whose last run met an outage: said once, not every second


def _background(running: threading.Thread | None, name: str, what: str, job, *args) -> threading.Thread:
    """`job(*args)` on a thread of its own, unless the last one (`running`) is still at it; the thread
    that now runs the job (or still does)."""
    if running is not None and running.is_alive():
        return running

    def run():
        try:
            job(*args)
        except errors.FaceServiceError as exc:
            if what in _PAUSED:
                log.debug("index %s paused (%s)", what, exc)
            else:
                _PAUSED.add(what)
                log.warning("index %s paused (%s); it runs again when that is back", what, exc)
            return
        except Exception:  # noqa: BLE001 - the thread must say what failed
            log.exception("index %s failed", what)
            return
        if what in _PAUSED:
            _PAUSED.discard(what)
            log.info("index %s runs again", what)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


class IndexSync:
    def __init__(
        self,
        registry: IndexRegistry,
        store,
        *,
        sync_interval_s: float = 1.0,
        snapshot_interval_s: float = 300.0,
        retention_s: float = 7 * 86400,
        warmup: bool = True,
        notifier: ChangeNotifier | None = None,
        compact_deleted_share: float = 0.2,
    ):
        self.registry, self.store = registry, store
        self.compact_deleted_share = compact_deleted_share
        self._compactor: threading.Thread | None = None
        self._snapshotter: threading.Thread | None = None
        self.sync_interval_s, self.snapshot_interval_s, self.retention_s = sync_interval_s, snapshot_interval_s, retention_s
        self.warmup, self.notifier = warmup, notifier
        registry.started_seq = store.last_change_seq()
        self.feed = ChangeFeed.from_now(store)
        registry.change_seq = self.feed.low_water()
        if notifier is not None:
            registry.on_local_change = notifier.publish
        self._wake, self._stop = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_snapshot = self._last_prune = time.monotonic()
        self._failing = False
        # called when the log says a collection was deleted (on any replica): what this replica has
        # cached about it goes, above all its API keys, which another tenant's collection created
        # anew under the same id must not inherit (app.py: the authenticator's forget)
        self.on_drop = None

    def start(self) -> None:
        # the warm-up on a thread of its own: the collections already loaded go on taking the change
        # log (other replicas' deletions among it) while a large one builds
        self._threads = [
            threading.Thread(target=self._run, name="index-sync", daemon=True),
            threading.Thread(target=self._prepare, name="index-warmup", daemon=True),
        ]
        if self.notifier is not None:
            self._threads.append(
                threading.Thread(target=self.notifier.listen, args=(self._wake.set, self._stop), name="index-notify", daemon=True)
            )
        for t in self._threads:
            t.start()

    def stop(self, final_snapshot: bool = True, timeout_s: float = 5.0) -> None:
        """Stops the threads (waiting at most `timeout_s` in all: they are daemons, and a step caught in
        a slow database call must not hold the shutdown), then writes the last snapshots."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for t in [*self._threads, *([self._snapshotter] if self._snapshotter else [])]:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        if final_snapshot:
            self.registry.write_snapshots(self.feed.low_water())
        if self.notifier is not None:
            self.notifier.close()

    # -- the thread ---------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.sync_interval_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            self.step()

    def _prepare(self) -> None:
        """What start-up owes the disk and the indexes: saved files that would outlive what they hold
        go (IndexRegistry.tidy_saved), then, with `warmup`, every collection loads."""
        try:
            self.registry.tidy_saved(loads_all=self.warmup)
        except (errors.FaceServiceError, OSError) as exc:
            log.warning("index snapshots of deleted collections not checked (%s); they are at the next start", exc)
        if self.warmup and not self._warm():
            # the collections it did not reach load on first use: their snapshots may hold what
            # was deleted while the server was down, and nothing rewrites them until then
            try:
                self.registry.tidy_saved(loads_all=False)
            except (errors.FaceServiceError, OSError) as exc:
                log.warning("index snapshots not checked after the warm-up (%s)", exc)

    def _warm(self) -> bool:
        """Load every collection's index now rather than on its first search; False when it stopped short."""
        after = ""
        try:
            while not self._stop.is_set():
                page = self.store.list_collections(after, 100)
                if not page:
                    return True
                for c in page:
                    if self._stop.is_set():
                        break
                    try:
                        self.registry.get(c.collection_id, c.created_ms)
                    except errors.FaceServiceError as exc:
                        if exc.reason != errors.COLLECTION_NOT_FOUND:  # deleted since the page was read: the next
                            raise
                after = page[-1].collection_id
        except errors.FaceServiceError as exc:
            log.warning("index warm-up stopped (%s); the remaining collections load on first use", exc)
        return False

    def _compact_in_background(self) -> None:
        """Compaction (a rebuild from the database) on a thread of its own, one at a time: a large
        collection's build takes minutes, and the change log must go on being applied meanwhile."""
        if self.compact_deleted_share:
            self._compactor = _background(
                self._compactor, "index-compact", "compaction", self.registry.compact, self.compact_deleted_share
            )

    def _snapshots_in_background(self, change_seq: int) -> None:
        """Snapshots on a thread of their own, one round at a time: hashing and syncing a large graph
        to disk takes seconds, and the change log must go on being applied meanwhile."""
        self._snapshotter = _background(
            self._snapshotter, "index-snapshot", "snapshots", self.registry.write_snapshots, change_seq, self.retention_s / 2
        )

    def step(self) -> None:
        """One poll of the change log (repeated while batches come back full), then housekeeping."""
        try:
            watch = getattr(self.registry.engine, "watch", None)  # Milvus: is its collection still the one loaded
            if watch is not None:
                watch()
            while True:
                batch = self.feed.poll()
                if self.on_drop is not None and any(op == "drop" for _, _, _, op in batch.rows):
                    self.on_drop()
                if batch.rows:
                    self.registry.apply_changes(batch.rows)
                self.feed.advance(batch)
                self.registry.change_seq = self.feed.low_water()
                if not batch.full:
                    break
            if self._failing:
                log.info("index sync: the database is reachable again")
                self._failing = False
            self._compact_in_background()
            now = time.monotonic()
            if now - self._last_snapshot >= self.snapshot_interval_s:
                running = self._snapshotter
                self._snapshots_in_background(self.feed.low_water())
                if self._snapshotter is not running:  # a round began (not one still at it): the next is due from now
                    self._last_snapshot = now
            if now - self._last_prune >= 3600:
                self._last_prune = now
                n = self.store.prune_changes(int((time.time() - self.retention_s) * 1000))
                if n:
                    log.info("change log: pruned %d rows older than %.0f h", n, self.retention_s / 3600)
        except errors.FaceServiceError as exc:
            if not self._failing:
                log.warning("index sync paused: %s (the indexes stay as they are until it is back)", exc)
                self._failing = True
        except Exception:  # noqa: BLE001 - the thread must survive anything, and say so
            log.exception("index sync step failed; retrying")
