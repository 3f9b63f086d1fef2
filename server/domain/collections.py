"""Collections (tenants) and their API keys: create, read, list, delete.

Plain Python: a store, the staging cache and the index registry in; records
out. Deleting a collection removes its subjects, faces and keys in one
transaction, then forgets its index and its staged faces; revoking a key
tells the authenticator (`on_keys_revoked`) so this replica stops
accepting it at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from server import errors
from server.records import ApiKey, Collection
from server.storage.interfaces import CollectionStore, KeyStore
from server.storage.staging import StagingCache

log = logging.getLogger("facesvc.collections")


class CollectionService:
    def __init__(
        self,
        store: CollectionStore,
        keys: KeyStore,
        cache: StagingCache,
        indexes=None,
        on_keys_revoked: Callable[[], None] = lambda: None,
    ):
        self.store, self.keys, self.cache, self.indexes = store, keys, cache, indexes
        self.on_keys_revoked = on_keys_revoked

    # -- collections ---------------------------------------------------------
    def create(self, collection_id: str, display_name: str, liveness_policy: str) -> Collection:
        return self.store.create_collection(collection_id, display_name, liveness_policy)

    def get(self, collection_id: str) -> Collection:
        return self.store.get_collection(collection_id)

    def policy(self, collection_id: str) -> str:
        """The liveness policy; COLLECTION_NOT_FOUND when there is no such collection."""
        return self.store.get_collection_policy(collection_id)

    def created_ms(self, collection_id: str) -> int | None:
        """When the collection was created (None: it does not exist): one id, deleted and
        created again, is two collections."""
        return self.store.collection_created_ms(collection_id)

    def list(self, after: str, limit: int) -> list[Collection]:
        return self.store.list_collections(after, limit)

    def delete(self, collection_id: str) -> tuple[int, int]:
        """Returns (subjects, faces) removed."""
        counts = self.store.delete_collection(collection_id)
        if self.indexes is not None:
            self.indexes.collection_deleted(collection_id)
        self.on_keys_revoked()  # its keys went with it
        try:  # staged faces die with their collection (and Register checks the collection's creation time too)
            self.cache.drop_collection(collection_id)
        except errors.FaceServiceError as exc:
            log.warning("staged faces of deleted collection %s not dropped now (%s); they expire unused", collection_id, exc)
        return counts

    # -- keys ------------------------------------------------------------------
    def create_key(self, key_id: str, collection_id: str, key_hash: str, description: str) -> ApiKey:
        return self.keys.create_api_key(key_id, collection_id, key_hash, description)

    def list_keys(self, collection_id: str, after: str, limit: int) -> list[ApiKey]:
        return self.keys.list_api_keys(collection_id, after, limit)

    def delete_key(self, collection_id: str, key_id: str) -> None:
        self.keys.delete_api_key(collection_id, key_id)
        self.on_keys_revoked()
