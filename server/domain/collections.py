"""Collections (tenants) and their API keys: create, read, list, delete.

Plain Python: a store, the staging cache and the index registry in; records
out. Deleting a collection removes its subjects, faces and keys in one
transaction, then forgets its index and its staged faces; revoking a key
tells the authenticator (`on_keys_revoked`) so this replica stops
accepting it at once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from server import errors
from server.records import DUPLICATE_REJECT, ApiKey, Collection, Thresholds
from server.storage.interfaces import CollectionStore, KeyStore
from server.storage.staging import StagingCache

log = logging.getLogger("facesvc.collections")


@dataclass(frozen=True)
class ServerThresholds:
    """The server's defaults and floors, which a collection's own thresholds stand in for when set."""

    match: float  # 1:1 default
    search: float  # 1:N default
    liveness: float  # default, and the floor of every collection's and request's liveness threshold
    floor: float  # match_threshold_floor: no similarity threshold below it

    def check(self, t: Thresholds, field: str = "thresholds") -> None:
        """A collection's thresholds: each 0 (the server's) or within the server's floors."""
        for name, value in (("match_threshold", t.match), ("search_threshold", t.search)):
            if value and not self.floor <= value < 1:
                raise errors.validation(
                    f"{field}.{name}",
                    f"must be 0 (the server's) or in [{self.floor}, 1) (match_threshold_floor), got {value}",
                    floor=self.floor,
                )
        if t.liveness and not self.liveness <= t.liveness < 1:
            raise errors.validation(
                f"{field}.liveness_threshold",
                f"must be 0 (the server's) or in [{self.liveness}, 1): a collection may raise the server's "
                f"liveness threshold, not lower it; got {t.liveness}",
                floor=self.liveness,
            )

    def effective(self, c: Collection) -> Thresholds:
        """The thresholds in force in a collection: its own where set (never below a floor raised since), else the server's."""
        t = c.thresholds
        return Thresholds(
            max(t.match, self.floor) if t.match else self.match,
            max(t.search, self.floor) if t.search else self.search,
            max(t.liveness, self.liveness),
        )


class CollectionService:
    def __init__(
        self,
        store: CollectionStore,
        keys: KeyStore,
        cache: StagingCache,
        indexes=None,
        on_keys_revoked: Callable[[], None] = lambda: None,
        thresholds: ServerThresholds | None = None,
    ):
        self.store, self.keys, self.cache, self.indexes = store, keys, cache, indexes
        self.on_keys_revoked = on_keys_revoked
        self.thresholds = thresholds

    # -- collections ---------------------------------------------------------
    def create(
        self,
        collection_id: str,
        display_name: str,
        liveness_policy: str,
        duplicate_policy: str = DUPLICATE_REJECT,
        thresholds: Thresholds = Thresholds(),
        retention_days: int = 0,
    ) -> Collection:
        if self.thresholds is not None:
            self.thresholds.check(thresholds)
        return self.store.create_collection(
            collection_id, display_name, liveness_policy, duplicate_policy, thresholds, retention_days
        )

    def update(self, collection_id: str, changes: dict) -> Collection:
        """Set the fields named in `changes` (display_name, liveness_policy, duplicate_policy,
        thresholds.match / .search / .liveness, retention_days); the thresholds are checked as they will be."""
        limits = {k.split(".", 1)[1]: v for k, v in changes.items() if k.startswith("thresholds.")}
        if limits and self.thresholds is not None:
            current = self.store.get_collection_settings(collection_id).thresholds
            self.thresholds.check(dataclasses.replace(current, **limits))
        return self.store.update_collection(collection_id, changes)

    def get(self, collection_id: str) -> Collection:
        return self.store.get_collection(collection_id)

    def created_ms(self, collection_id: str) -> int | None:
        """When the collection was created (None: it does not exist): one id, deleted and
        created again, is two collections."""
        return self.store.collection_created_ms(collection_id)

    def list(self, after: str, limit: int) -> list[Collection]:
        return self.store.list_collections(after, limit)

    def delete(self, collection_id: str) -> tuple[int, int]:
        """Returns (subjects, faces) removed."""
        counts = self.store.delete_collection(collection_id)
        self.on_keys_revoked()  # its keys went with it
        try:  # staged faces die with their collection (and Register checks the collection's creation time too)
            self.cache.drop_collection(collection_id)
        except errors.FaceServiceError as exc:
            log.warning("staged faces of deleted collection %s not dropped now (%s); they expire unused", collection_id, exc)
        if self.indexes is not None:  # last: it waits for the collection's lock (a build, a snapshot being written)
            self.indexes.collection_deleted(collection_id)
        return counts

    # -- keys ------------------------------------------------------------------
    def create_key(self, key_id: str, collection_id: str, key_hash: str, description: str) -> ApiKey:
        return self.keys.create_api_key(key_id, collection_id, key_hash, description)

    def list_keys(self, collection_id: str, after: str, limit: int) -> list[ApiKey]:
        return self.keys.list_api_keys(collection_id, after, limit)

    def delete_key(self, collection_id: str, key_id: str) -> None:
        self.keys.delete_api_key(collection_id, key_id)
        self.on_keys_revoked()
