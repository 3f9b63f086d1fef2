"""The Milvus engine: every replica searches one index held by Milvus, none holds a graph itself.

Layout: one Milvus collection per recognizer model (`<prefix>_<model>_<dim>`),
holding every facesvc collection's faces, with the facesvc collection id as
its partition key. Milvus hashes the key into a fixed number of partitions
and a search filtered on it reads only that partition, so many small facesvc
collections cost nothing each (a Milvus collection per facesvc collection
would mean one set of segments, indexes and a load per tenant, and a
cluster-wide ceiling on their number); docs/milvus.md has the measurement.
Fields: face_id (primary key), collection (partition key), subject_id,
created_ms (the facesvc collection's creation time: rows left behind by a
deleted collection of the same name are never searched and are removed on
load) and embedding (HNSW, COSINE).

Writes (durability stays in the database; docs/milvus.md):
- the replica that committed a change writes it through right away
  (read-your-writes: searches use `consistency` "Session" by default, which
  waits for this client's own writes);
- every replica's change-log follower (server/index/sync.py) applies every
  change again. A write is idempotent and keyed by face id: the index reads
  what Milvus holds for those faces, writes only what differs from the
  database, then reads the database again and repeats for any face that
  changed meanwhile. So whichever replica writes last wrote a state the
  database still held after its write: a stale write (a face deleted while
  another replica was upserting it) is corrected by the writer that made it.

Milvus Lite (`uri` a file path) runs the same API inside this process, for
development and tests; it cannot be shared by two processes (its data
directory is locked), so replicas share a Milvus server (`milvus-lite server`
for tests, Milvus standalone or a cluster in production).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from server import errors
from server.index.base import Hit, IndexStats

log = logging.getLogger("facesvc.index")

CONSISTENCY_LEVELS = ("Strong", "Session", "Bounded", "Eventually")
MAX_LIMIT = 16384  # Milvus's largest topk
WRITE_BATCH = 1000  # rows per upsert: 1000 x 512 floats is a 2 MB message
VERIFY_ROUNDS = 5
LITE_FLUSH_ROWS = 1000
# Milvus's error codes for a collection that does not exist, and for one that is not loaded (a
# restarted Milvus holds its collections released until someone loads them)
NOT_FOUND, NOT_LOADED = 100, 101
ID_PAGE = MAX_LIMIT  # face ids read per query when a load compares them with the database
WATCH_S = 5.0  # how often IndexSync's thread asks Milvus whether a collection is still the one loaded


@dataclass(frozen=True)
class MilvusParams:
    uri: str  # a file path: Milvus Lite in this process; http(s)://host:port: a Milvus server or cluster
    token: str = ""  # "user:password" or an API key
    database: str = ""  # "" = the server's default database
    collection_prefix: str = "facesvc_faces"
    consistency: str = "Session"
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 0  # 0: 128, or top_k when larger
    partitions: int = 64  # partition-key buckets of the Milvus collection

    def __post_init__(self):
        if self.consistency not in CONSISTENCY_LEVELS:
            raise ValueError(f"milvus consistency must be one of {CONSISTENCY_LEVELS}, not {self.consistency!r}")

    @property
    def lite(self) -> bool:
        return "://" not in self.uri

    def where(self) -> str:
        """The URI for logs and stats: a server's address without credentials, or the Lite path."""
        return re.sub(r"//[^/@]*@", "//", self.uri)


def _unavailable(what: str, exc: Exception) -> errors.FaceServiceError:
    """What failed goes to the server log only: it names Milvus's address or collection, not the caller's to know."""
    return errors.unavailable(
        errors.STORE_UNAVAILABLE, "the search index (Milvus) is unavailable; retry", detail=f"{what}: {exc}"
    )


def _quoted(value: str) -> str:
    return json.dumps(value)  # a Milvus string literal: double quotes, backslash escapes


class MilvusIndex:
    """One facesvc collection's faces in the shared Milvus collection."""

    def __init__(self, engine: MilvusEngine, name: str, collection: str, created_ms: int, dim: int, model_id: str):
        self.engine, self.name, self.collection, self.created_ms = engine, name, collection, created_ms
        self.dim, self.model_id = dim, model_id
        self.filter = f"collection == {_quoted(collection)} and created_ms == {int(created_ms)}"
        self.built_at = time.time()
        self.loaded_from = "database"  # or "milvus": found there, checked against the database
        self.snapshot_at = 0.0
        self.generation = engine.generation(name)

    @property
    def stale(self) -> bool:
        """Milvus lost the collection this index writes to (or it was created anew) since the index was
        made: what it held is gone, and the registry loads the index anew (from the database)."""
        return self.engine.generation(self.name) != self.generation

    def __len__(self) -> int:
        return self.engine.count(self.name, self.filter)

    def _rows(self, face_ids, subject_ids, vectors) -> list[dict]:
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        return [
            {"face_id": f, "collection": self.collection, "subject_id": s, "created_ms": self.created_ms, "embedding": v}
            for f, s, v in zip(face_ids, subject_ids, vectors)
        ]

    def add(self, face_ids: list[str], subject_ids: list[str], vectors: np.ndarray) -> None:
        """A build's page: upserted (a face already there is written again with the same values)."""
        self.engine.upsert(self.name, self._rows(face_ids, subject_ids, vectors), page=True)

    def apply(self, present: dict[str, tuple[str, np.ndarray]], absent: list[str], replace: set[str] = frozenset()) -> None:
        """Make Milvus agree with the database about these faces: write what differs, then check the
        database again and repeat for the faces that changed meanwhile (module docstring). `replace`
        needs nothing of its own: an embedding that differs is written anyway."""
        want = dict(present)
        ids = list(dict.fromkeys(list(present) + list(absent)))
        for _ in range(VERIFY_ROUNDS):
            have = self.engine.fetch(self.name, ids)
            stale = [f for f in ids if f not in want and f in have]
            wrong = [
                f
                for f, (subject, vector) in want.items()
                if f not in have
                or have[f][0] != subject
                or have[f][1] != self.created_ms
                or not np.array_equal(have[f][2], np.asarray(vector, np.float32))
            ]
            if wrong:
                self.engine.upsert(self.name, self._rows(wrong, [want[f][0] for f in wrong], [want[f][1] for f in wrong]))
            if stale:
                self.engine.delete(self.name, stale)
            if not wrong and not stale:
                return
            now = self.engine.faces(self.collection, self.model_id, ids)
            changed = [f for f in ids if _state(now.get(f)) != _state(want.get(f))]
            if not changed:
                return
            ids, want = changed, {f: now[f] for f in changed if f in now}
        log.warning(
            "index %s: %d faces kept changing while being written; the change log applies them again", self.name, len(ids)
        )

    def reconcile(self, page: int = 10_000) -> None:
        """Make what Milvus holds for the collection the faces the database holds, compared by face id.
        The change log is replayed into a loaded index only as far back as LOOKBACK rows, and the count
        check after it passes changes that cancel out (a face replaced: one deletion, one addition), so
        changes that no replica could write (Milvus away, the replicas restarted meanwhile) would
        otherwise leave a deleted face searchable for good."""
        held = self.engine.face_ids(self.name, self.filter)
        listed, after = set(), ""
        while ids := self.engine.store.collection_face_ids(self.collection, self.model_id, after, page):
            listed.update(ids)
            after = ids[-1]
        missing, extra = sorted(listed - held), sorted(held - listed)
        if not missing and not extra:
            return
        log.warning(
            "index %s: Milvus held %d faces the database does not and lacked %d that it holds; put right",
            self.collection,
            len(extra),
            len(missing),
        )
        for s in range(0, max(len(missing), len(extra)), WRITE_BATCH):
            adding = missing[s : s + WRITE_BATCH]
            self.apply(self.engine.faces(self.collection, self.model_id, adding), extra[s : s + WRITE_BATCH])

    def search(self, vector: np.ndarray, top_k: int, min_similarity: float, max_faces_per_subject: int) -> list[Hit]:
        """One hit per subject (Milvus groups by subject_id: its best face), best first."""
        limit = min(top_k, MAX_LIMIT)
        q = np.asarray(vector, dtype=np.float32).reshape(self.dim)
        rows = self.engine.search(self.name, q, self.filter, limit)
        hits = [Hit(r["face_id"], r["entity"]["subject_id"], float(r["distance"])) for r in rows]
        return [h for h in hits if h.similarity >= min_similarity][:top_k]

    def stats(self) -> IndexStats:
        size = len(self)
        p = self.engine.params
        return IndexStats(
            engine="milvus",
            size=size,
            deleted=0,  # Milvus compacts deleted rows away itself
            dimension=self.dim,
            model=self.model_id,
            memory_bytes=0,  # nothing in this process: the graphs live in Milvus
            capacity=size,
            built_at=self.built_at,
            loaded_from=self.loaded_from,
            snapshot_at=0.0,
            params={
                "uri": p.where(),
                "lite": p.lite,
                "database": p.database or "default",
                "milvus_collection": self.name,
                "layout": "partition key",
                "consistency": p.consistency,
                "index": "HNSW",
                "metric": "COSINE",
                "m": p.m,
                "ef_construction": p.ef_construction,
                "ef_search": p.ef_search or 128,
            },
        )


MARK = "facesvc.mark"  # a collection property: which creation of the Milvus collection this is


def _mark(client, name: str) -> str:
    return (client.describe_collection(name).get("properties") or {}).get(MARK, "")


def _state(face) -> tuple | None:
    return None if face is None else (face[0], np.asarray(face[1], np.float32).tobytes())


class MilvusEngine:
    """Indexes held by Milvus (shared by every replica): load() attaches to what Milvus holds, a build
    writes into it, nothing is saved here. `store` (an IndexSource) is read for the creation time of a
    collection and to check writes against."""

    name = "milvus"
    saves_indexes = False
    shared = True

    def __init__(self, params: MilvusParams, store):
        self.params, self.store = params, store
        # pymilvus logs each failed call with its traceback, every second while Milvus is away; the
        # calls' failures are this module's to say (one line each, _unavailable)
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
        self._client = None
        self._lock = threading.Lock()
        self._ready: set[str] = set()
        self._unflushed = 0  # Lite: rows written since its last flush
        # per Milvus collection: how many times it was found lost (MilvusIndex.stale), the mark it was
        # created with (its `facesvc.mark` property: another one means it was created anew), when last asked
        self._generation: dict[str, int] = {}
        self._mark: dict[str, str] = {}
        self._watched: dict[str, float] = {}

    # -- the connection and the Milvus collection ---------------------------------------
    @property
    def client(self):
        with self._lock:
            if self._client is None:
                from pymilvus import MilvusClient  # the milvus extra: only servers on this engine need it

                p = self.params
                try:
                    self._client = MilvusClient(uri=self._server_uri(), token=p.token, db_name=p.database, timeout=30)
                except Exception as exc:  # noqa: BLE001 - pymilvus raises several kinds
                    raise _unavailable(f"cannot connect to {p.where()}", exc) from None
                log.info("milvus: connected to %s%s", p.where(), " (Milvus Lite, in this process)" if p.lite else "")
            return self._client

    def _server_uri(self) -> str:
        """Milvus Lite: its server in this process, started on the path (pymilvus would only do so for a
        path ending in .db); a server's URI as it is."""
        if not self.params.lite:
            return self.params.uri
        from milvus_lite import server_manager_instance

        uri = server_manager_instance.start_and_get_uri(self.params.uri)
        if uri is None:
            raise RuntimeError(f"Milvus Lite did not start on {self.params.uri} (is another process using it?)")
        return uri

    def collection_name(self, model_id: str, dim: int) -> str:
        return f"{self.params.collection_prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', model_id)}_{dim}"

    def ensure(self, model_id: str, dim: int) -> str:
        """The model's Milvus collection, created (schema, HNSW index) and loaded if it is not there."""
        name = self.collection_name(model_id, dim)
        if name in self._ready:
            return name
        from pymilvus import DataType, MilvusClient

        c, p = self.client, self.params
        try:
            if not c.has_collection(name):
                # a mark of this creation: a collection lost and created anew has another (watch)
                mark = f"facesvc faces {uuid.uuid4().hex}"
                schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
                schema.add_field("face_id", DataType.VARCHAR, max_length=64, is_primary=True)
                schema.add_field("collection", DataType.VARCHAR, max_length=64, is_partition_key=True)
                schema.add_field("subject_id", DataType.VARCHAR, max_length=128)
                schema.add_field("created_ms", DataType.INT64)
                schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
                index = c.prepare_index_params()
                index.add_index(
                    field_name="embedding",
                    index_type="HNSW",
                    metric_type="COSINE",
                    params={"M": p.m, "efConstruction": p.ef_construction},
                )
                try:
                    c.create_collection(
                        name,
                        schema=schema,
                        index_params=index,
                        consistency_level=p.consistency,
                        num_partitions=p.partitions,
                        properties={MARK: mark},
                    )
                    log.info("milvus: created collection %s (%d dimensions, HNSW M=%d, COSINE)", name, dim, p.m)
                except Exception:  # noqa: BLE001 - another replica created it first
                    if not c.has_collection(name):
                        raise
            c.load_collection(name)
            mark = _mark(c, name)
        except errors.FaceServiceError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise _unavailable(f"cannot prepare collection {name}", exc) from None
        with self._lock:
            self._mark[name], self._watched[name] = mark, time.monotonic()
            self._ready.add(name)
        return name

    def generation(self, name: str) -> int:
        return self._generation.get(name, 0)

    def _lost(self, name: str) -> None:
        """Milvus no longer holds the collection that was loaded as `name` (dropped, a wiped volume, a
        new Milvus; or created anew since): the next use creates it again, and every index made on
        the one lost is stale, loaded anew (from the database) on its next use."""
        with self._lock:
            if name not in self._ready:  # once per loss, not once per call that meets it
                return
            self._ready.discard(name)
            self._generation[name] = self._generation.get(name, 0) + 1
        log.warning(
            "milvus: collection %s was lost; its facesvc collections are rebuilt from the database on their next use", name
        )

    def watch(self) -> None:
        """Called by IndexSync's thread: every WATCH_S, whether each collection in use is still the one
        loaded. A replica that only searches would otherwise never learn that another replica, meeting
        the collection lost, created it anew: its searches would find nothing, with no error."""
        now = time.monotonic()
        for name in list(self._ready):
            if now - self._watched.get(name, 0.0) < WATCH_S:
                continue
            self._watched[name] = now
            try:
                mark = _mark(self.client, name)
            except Exception as exc:  # noqa: BLE001 - away: the calls that need it say so
                if getattr(exc, "code", None) == NOT_FOUND:
                    self._lost(name)
                continue
            if mark != self._mark.get(name):
                self._lost(name)

    # -- calls, each turning a Milvus failure into UNAVAILABLE / STORE_UNAVAILABLE ----------
    def _call(self, what: str, fn, name: str, *args, **kw):
        """fn(name, ...). A collection found released (a restarted Milvus) is loaded and the call tried
        once more; one found gone marks the indexes in it stale (_lost)."""
        for attempt in range(2):
            try:
                return fn(name, *args, **kw)
            except Exception as exc:  # noqa: BLE001 - pymilvus raises MilvusException and gRPC errors
                code = getattr(exc, "code", None)
                if code == NOT_LOADED and attempt == 0:
                    try:
                        self.client.load_collection(name)
                    except Exception as again:  # noqa: BLE001
                        raise _unavailable(f"load {name}", again) from None
                    log.info("milvus: collection %s was released (a restarted Milvus?); loaded it again", name)
                    continue
                if code == NOT_FOUND:
                    self._lost(name)
                raise _unavailable(what, exc) from None

    def count(self, name: str, where: str) -> int:
        rows = self._call("count", self.client.query, name, filter=where, output_fields=["count(*)"], consistency_level="Strong")
        return int(rows[0]["count(*)"]) if rows else 0

    def upsert(self, name: str, rows: list[dict], page: bool = False) -> None:
        """`page`: a build's page. Milvus Lite searches the rows it has not flushed by brute force in
        Python (seconds at tens of thousands of faces), so on Lite every page and every
        LITE_FLUSH_ROWS single writes are flushed into indexed segments; a Milvus server seals and
        indexes its segments itself (and rate-limits flushes)."""
        for s in range(0, len(rows), WRITE_BATCH):
            self._call("upsert", self.client.upsert, name, rows[s : s + WRITE_BATCH])
        if self.params.lite:
            self._unflushed += len(rows)
            if page or self._unflushed >= LITE_FLUSH_ROWS:
                self._unflushed = 0
                self._call("flush", self.client.flush, name)

    def delete(self, name: str, face_ids: list[str]) -> None:
        for s in range(0, len(face_ids), WRITE_BATCH):
            self._call("delete", self.client.delete, name, ids=face_ids[s : s + WRITE_BATCH])

    def delete_where(self, name: str, where: str) -> None:
        self._call("delete", self.client.delete, name, filter=where)

    def face_ids(self, name: str, where: str) -> set[str]:
        """The face ids of the rows matching `where` (Strong), read in pages after the last id seen. A
        query answers in primary key order only when it says it is an iterator's (else segment by
        segment, in storage order): the flags pymilvus's query_iterator sends, which is not used
        itself as Milvus Lite does not implement the timestamp call it makes first."""
        out, after = set(), None
        while True:
            page = where if after is None else f"{where} and face_id > {_quoted(after)}"
            rows = self._call(
                "query",
                self.client.query,
                name,
                filter=page,
                output_fields=["face_id"],
                limit=ID_PAGE,
                consistency_level="Strong",
                iterator="True",
                reduce_stop_for_best="True",
            )
            ids = [r["face_id"] for r in rows]
            out.update(ids)
            if len(ids) < ID_PAGE:
                return out
            after = max(ids)

    def fetch(self, name: str, face_ids: list[str]) -> dict[str, tuple[str, int, np.ndarray]]:
        """{face_id: (subject_id, created_ms, embedding)} of those faces Milvus holds now (Strong: the
        follower must see every earlier write, its own and the other replicas')."""
        out = {}
        for s in range(0, len(face_ids), WRITE_BATCH):
            rows = self._call(
                "query",
                self.client.query,
                name,
                ids=face_ids[s : s + WRITE_BATCH],
                output_fields=["subject_id", "created_ms", "embedding"],
                consistency_level="Strong",
            )
            for r in rows:
                out[r["face_id"]] = (r["subject_id"], int(r["created_ms"]), np.asarray(r["embedding"], np.float32))
        return out

    def faces(self, collection: str, model_id: str, face_ids: list[str]):
        return self.store.faces_by_id(collection, model_id, face_ids)

    def search(self, name: str, q: np.ndarray, where: str, limit: int) -> list[dict]:
        p = self.params
        res = self._call(
            "search",
            self.client.search,
            name,
            [q.tolist()],
            filter=where,
            limit=limit,
            output_fields=["subject_id"],
            group_by_field="subject_id",
            search_params={"metric_type": "COSINE", "params": {"ef": max(limit, p.ef_search or 128)}},
            consistency_level=p.consistency,
        )
        return list(res[0]) if res else []

    # -- IndexEngine -------------------------------------------------------------------------
    def _index(self, collection: str, dim: int, model_id: str) -> MilvusIndex | None:
        created = self.store.collection_created_ms(collection)
        if created is None:
            return None
        return MilvusIndex(self, self.ensure(model_id, dim), collection, created, dim, model_id)

    def _remove_older(self, name: str, collection: str, created: int | None) -> None:
        """Removes the rows of an earlier facesvc collection of this name (all of them when it is gone)."""
        where = f"collection == {_quoted(collection)}"
        self.delete_where(name, where if created is None else f"{where} and created_ms != {int(created)}")

    def create(self, collection: str, dim: int, model_id: str, expected_faces: int) -> MilvusIndex:
        """A build from the database starts from nothing: what Milvus held for the collection (it did not
        agree with the database) is removed first; searches on other replicas see the rebuild's progress."""
        idx = self._index(collection, dim, model_id)
        if idx is None:
            raise errors.not_found(
                errors.COLLECTION_NOT_FOUND, f"collection {collection!r} does not exist", collection=collection
            )
        self.delete_where(idx.name, f"collection == {_quoted(collection)}")
        return idx

    def first_batch(self, batch: int) -> int:
        return batch

    def load(self, collection: str, expect: dict):
        """What Milvus holds for the collection, put right by face id against the database (reconcile;
        the registry then replays the recent change log into it, for writes in flight, and checks its
        count); None when it holds nothing: a lost or new one is built."""
        idx = self._index(collection, expect["dimension"], expect["model"])
        if idx is None:
            return None
        self._remove_older(idx.name, collection, idx.created_ms)
        if len(idx) == 0:
            return None
        idx.reconcile()
        idx.loaded_from = "milvus"
        return idx, {"change_seq": None}

    def save(self, collection: str, index: MilvusIndex, meta: dict) -> None:
        """Nothing to save: Milvus keeps the index."""

    def forget(self, collection: str) -> None:
        """The collection was deleted (any replica may be the one that says so, at any time after):
        its rows go, unless they belong to a collection of the same name created since."""
        for name in list(self._ready):
            self._remove_older(name, collection, self.store.collection_created_ms(collection))

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                try:
                    self._client.close()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
                self._client = None
