"""The search index's contract, durability and replication, on both real databases and both engines.

Unit level: a real SqlFaceStore (SQLite file / this run's MySQL database), real
hnswlib indexes and snapshot files, and real Milvus (Milvus Lite in a temporary
directory: the same client API as a Milvus server). The vectors are random
unit vectors: what is under test is that the index holds exactly the faces the
database holds, across snapshots, restarts, corruption and replicas
(recognition itself is tested on the LFW photos in test_search.py).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid

import numpy as np
import pymysql
import pytest

from server import errors
from server.index import registry as registry_module
from server.index.changes import ChangeFeed
from server.index.hnsw import HnswEngine, HnswParams
from server.index.milvus import MilvusEngine, MilvusParams
from server.index.registry import IndexRegistry
from server.index.snapshot import SnapshotStore
from server.index.sync import IndexSync
from server.records import LIVENESS_OPTIONAL, NewFace
from server.storage.sql import open_store

MODEL, DIM = "w600k_mbf", 512
# ef_search above the collection sizes used here: the graph search is exhaustive, so a snapshot-loaded and a
# freshly built graph must give identical answers (with a small ef two different graphs may differ on noise)
PARAMS = HnswParams(m=16, ef_construction=100, ef_search=400)


@pytest.fixture
def store(db_url, tmp_path):
    s = open_store(db_url, str(tmp_path))
    yield s
    s.close()


@pytest.fixture
def mysql_store(mysql_url, tmp_path):
    """For what only MySQL does: SQLite serialises writers and rolls its sequence back, so its
    sequence numbers always commit in order and without gaps."""
    s = open_store(mysql_url, str(tmp_path))
    yield s
    s.close()


def unit(rng) -> np.ndarray:
    v = rng.standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def new_collection(store) -> str:
    cid = "ix-" + uuid.uuid4().hex[:10]
    store.create_collection(cid, "index test", LIVENESS_OPTIONAL)
    return cid


def enrol(store, cid: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """n subjects with one face each; {face_id: embedding}."""
    rng = np.random.default_rng(seed)
    faces = {}
    for i in range(n):
        f = NewFace(uuid.uuid4().hex, MODEL, unit(rng), 0.9, None)
        store.add_face(cid, f"s{seed}-{i}", f, allow_existing=False, max_faces=10)
        faces[f.face_id] = f.embedding
    return faces


def registry(store, tmp_path, name="a", engine="hnsw", **kw) -> IndexRegistry:
    """Replica `name`'s registry. hnsw: its own snapshot directory; milvus: every replica of a test
    shares one Milvus (Milvus Lite in the test's directory), as replicas share a Milvus server."""
    if engine == "milvus":
        return IndexRegistry(store, MODEL, DIM, milvus_engine(store, tmp_path), **kw)
    return IndexRegistry(store, MODEL, DIM, HnswEngine(PARAMS, SnapshotStore(tmp_path / f"index-{name}")), **kw)


def milvus_engine(store, tmp_path) -> MilvusEngine:
    # ef_search above the collection sizes used here, as PARAMS: the answers must be the exact ones
    params = MilvusParams(uri=str(tmp_path / "milvus.db"), m=16, ef_construction=100, ef_search=400, partitions=4)
    return MilvusEngine(params, store)


ENGINES = ["hnsw", "milvus"]


def snapshotted(store, tmp_path, n: int) -> tuple[str, dict[str, np.ndarray], IndexRegistry]:
    """A collection of n faces whose index replica "a" has built and snapshotted."""
    cid = new_collection(store)
    faces = enrol(store, cid, n)
    a = registry(store, tmp_path)
    a.get(cid)
    assert a.write_snapshots(store.last_change_seq()) == 1
    return cid, faces, a


def answers(reg: IndexRegistry, cid: str, probes) -> list[list[tuple[str, float]]]:
    idx = reg.get(cid)
    return [[(h.face_id, round(h.similarity, 5)) for h in idx.search(p, 5, -1.0, 1)] for p in probes]


def test_snapshot_restart_gives_the_same_answers_and_replays_later_changes(store, tmp_path):
    cid = new_collection(store)
    faces = enrol(store, cid, 300)
    probes = list(faces.values())[:20] + [unit(np.random.default_rng(99)) for _ in range(5)]
    a = registry(store, tmp_path)
    before = answers(a, cid, probes)
    assert a.get(cid).loaded_from == "database"
    assert a.write_snapshots(store.last_change_seq()) == 1
    # changes after the snapshot: one face deleted, one subject deleted, one face added
    gone = list(faces)[0]
    store.delete_face(cid, gone)
    gone_subject_faces = store.delete_subject(cid, "s0-1")
    added = enrol(store, cid, 1, seed=5)
    b = registry(store, tmp_path)  # a restart: same snapshot directory, nothing in memory
    idx = b.get(cid)
    assert idx.loaded_from == "snapshot" and len(idx) == 300 - 2 + 1
    # no snapshots at all: built from the database, in pages of 50 faces, into one graph sized for all of them
    rebuilt = IndexRegistry(store, MODEL, DIM, HnswEngine(dataclasses.replace(PARAMS, initial_capacity=16)), batch=50)
    assert rebuilt.get(cid).loaded_from == "database" and rebuilt.get(cid).stats().capacity == 300 - 2 + 1
    after_snapshot, after_rebuild = answers(b, cid, probes), answers(rebuilt, cid, probes)
    assert after_snapshot == after_rebuild
    returned = {f for hits in after_snapshot for f, _ in hits}
    assert gone not in returned and not set(gone_subject_faces) & returned
    assert b.get(cid).search(next(iter(added.values())), 1, 0.9, 1)[0].face_id == next(iter(added))
    # the probes whose faces were not touched answer exactly as before the restart
    untouched = [i for i, p in enumerate(before) if not {f for f, _ in p} & ({gone} | set(gone_subject_faces))]
    assert len(untouched) >= 15 and all(before[i][:1] == after_snapshot[i][:1] for i in untouched)


@pytest.mark.parametrize("damage", ["graph-bytes", "graph-missing", "snapshot-truncated", "snapshot-garbage"])
def test_a_damaged_snapshot_is_refused_and_the_index_rebuilt(store, tmp_path, damage, caplog):
    cid, faces, a = snapshotted(store, tmp_path, 120)
    expected = answers(a, cid, list(faces.values())[:10])
    d = tmp_path / "index-a"
    graph = next(d.glob(f"{cid}.*.graph"))
    snap = d / f"{cid}.snapshot"
    if damage == "graph-bytes":
        raw = bytearray(graph.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        graph.write_bytes(bytes(raw))
    elif damage == "graph-missing":
        graph.unlink()
    elif damage == "snapshot-truncated":
        snap.write_bytes(snap.read_bytes()[:-100])
    else:
        snap.write_bytes(b"not a snapshot")
    b = registry(store, tmp_path)
    with caplog.at_level("WARNING", logger="facesvc.index"):
        idx = b.get(cid)
    assert idx.loaded_from == "database" and len(idx) == 120
    assert "snapshot refused" in caplog.text
    assert answers(b, cid, list(faces.values())[:10]) == expected


def test_a_snapshot_for_other_parameters_or_an_earlier_collection_is_refused(store, tmp_path):
    cid, _, _ = snapshotted(store, tmp_path, 50)
    other_m = IndexRegistry(
        store, MODEL, DIM, HnswEngine(HnswParams(m=8, ef_construction=100), SnapshotStore(tmp_path / "index-a"))
    )
    assert other_m.get(cid).loaded_from == "database"
    # the collection deleted and created again under the same id while this server was down
    store.delete_collection(cid)
    store.create_collection(cid, "again", LIVENESS_OPTIONAL)
    enrol(store, cid, 7, seed=3)
    again = registry(store, tmp_path)
    assert again.get(cid).loaded_from == "database" and len(again.get(cid)) == 7


def test_a_change_the_log_did_not_record_is_caught_by_the_count_check(store, tmp_path):
    cid, faces, _ = snapshotted(store, tmp_path, 40)
    with store._tx() as q:  # behind the service's back: no change-log row
        q("DELETE FROM faces WHERE face_id = ?", next(iter(faces)))
    b = registry(store, tmp_path)
    assert b.get(cid).loaded_from == "database" and len(b.get(cid)) == 39


def test_a_crash_while_writing_leaves_the_previous_snapshot(store, tmp_path):
    cid, _, _ = snapshotted(store, tmp_path, 30)
    d = tmp_path / "index-a"
    # what a kill -9 in the middle of the next write leaves: a new graph and a half temp file
    (d / f"{cid}.ffff.graph").write_bytes(b"\0" * 1000)
    (d / f".{cid}.snapshot.ffff.tmp").write_bytes(b"half")
    b = registry(store, tmp_path)
    assert b.get(cid).loaded_from == "snapshot" and len(b.get(cid)) == 30


@pytest.mark.parametrize("engine", ENGINES)
def test_replicas_follow_each_other_through_the_change_log(store, tmp_path, engine):
    """Two registries on one database, each with its own IndexSync (as two server processes have).
    On Milvus they share the one index, and B's poll finds A's write-through already there."""
    cid = new_collection(store)
    enrol(store, cid, 20)
    a, b = registry(store, tmp_path, "a", engine), registry(store, tmp_path, "b", engine)
    sync_b = IndexSync(b, store, warmup=False)
    assert len(a.get(cid)) == len(b.get(cid)) == 20
    # replica A registers (and applies it itself at once: read-your-writes)
    added = enrol(store, cid, 3, seed=8)
    for f in added:
        a.local_change(cid, [f])
    assert len(a.get(cid)) == 23 and len(b.get(cid)) == (20 if engine == "hnsw" else 23)
    sync_b.step()  # one poll of the change log
    assert len(b.get(cid)) == 23
    f, v = next(iter(added.items()))
    assert b.get(cid).search(v, 1, 0.9, 1)[0].face_id == f
    # replica A deletes a subject: B stops returning it after its next poll
    deleted = store.delete_subject(cid, "s8-0")
    a.local_change(cid, deleted)
    sync_b.step()
    assert not b.get(cid).search(v, 1, 0.9, 1) and len(b.get(cid)) == 22
    assert b.change_seq == store.last_change_seq()
    # the collection deleted on A: B forgets its index and its snapshot (on Milvus: its rows)
    b.write_snapshots(b.change_seq)
    name = b.get(cid).name if engine == "milvus" else ""
    store.delete_collection(cid)
    sync_b.step()
    assert cid not in b.loaded() and not (tmp_path / "index-b" / f"{cid}.snapshot").exists()
    if engine == "milvus":
        assert b.engine.count(name, f'collection == "{cid}"') == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_applying_a_change_twice_or_out_of_order_converges(store, tmp_path, engine):
    cid = new_collection(store)
    faces = enrol(store, cid, 5)
    a = registry(store, tmp_path, engine=engine)
    a.get(cid)
    f = next(iter(faces))
    store.delete_face(cid, f)
    a.sync(cid, [f])
    a.sync(cid, [f])  # again: still gone
    a.apply_changes([(1, cid, f, "add")])  # the add's log row arriving after the delete: reads the database, stays gone
    assert len(a.get(cid)) == 4 and f not in {h.face_id for h in a.get(cid).search(faces[f], 5, -1, 1)}


def test_the_feed_waits_for_a_late_commit_below_its_high_water_mark(mysql_store):
    """MySQL gives out AUTO_INCREMENT values at insert, so seq N can commit after N+1."""
    store = mysql_store
    feed = ChangeFeed(store, store.last_change_seq())
    slow = pymysql.connect(**store.d.params, autocommit=False)
    try:
        with slow.cursor() as cur:  # takes seq N, does not commit yet
            cur.execute("INSERT INTO face_changes (collection_id, face_id, op, created_ms) VALUES ('late', 'a', 'add', 0)")
        with store._tx() as q:  # seq N+1 commits first
            q("INSERT INTO face_changes (collection_id, face_id, op, created_ms) VALUES ('late', 'b', 'add', 0)")
        first = feed.poll()
        feed.advance(first)
        assert [r[2] for r in first.rows] == ["b"] and len(first.gaps) == 1
        assert feed.low_water() < first.high  # a snapshot now must not claim N
        slow.commit()
        second = feed.poll()
        feed.advance(second)
        assert [r[2] for r in second.rows] == ["a"] and not feed.gaps and feed.low_water() == first.high
    finally:
        slow.close()


def test_the_feed_gives_up_on_a_rolled_back_sequence_number(mysql_store):
    store = mysql_store
    now = [0.0]
    feed = ChangeFeed(store, store.last_change_seq(), gap_timeout_s=60, clock=lambda: now[0])
    with store._tx() as q:
        q("INSERT INTO face_changes (collection_id, face_id, op, created_ms) VALUES ('rb', 'x', 'add', 0)")
    feed.advance(feed.poll())
    rolled = pymysql.connect(**store.d.params, autocommit=False)
    try:
        with rolled.cursor() as cur:
            cur.execute("INSERT INTO face_changes (collection_id, face_id, op, created_ms) VALUES ('rb', 'y', 'add', 0)")
        rolled.rollback()
    finally:
        rolled.close()
    with store._tx() as q:
        q("INSERT INTO face_changes (collection_id, face_id, op, created_ms) VALUES ('rb', 'z', 'add', 0)")
    feed.advance(feed.poll())
    assert len(feed.gaps) == 1
    now[0] = 61.0
    feed.advance(feed.poll())
    assert not feed.gaps and feed.low_water() == store.last_change_seq()


def test_a_projected_index_is_built_from_the_database_and_restarts_from_its_snapshot(store, tmp_path):
    """With pca_dims set and a collection past pca_min_faces, the build projects its graph (fitted on the
    first read) and re-ranks on the full vectors: the answers are the exact ones (ef covers every face),
    before and after a restart from the snapshot, whose dense file is checked like the graphs."""
    params = dataclasses.replace(PARAMS, pca_dims=32, pca_min_faces=200)
    cid = new_collection(store)
    faces = enrol(store, cid, 260)
    ids, vecs = list(faces), np.stack(list(faces.values()))
    probes = list(vecs[:15]) + [unit(np.random.default_rng(98)) for _ in range(5)]

    def reg(name):
        return IndexRegistry(store, MODEL, DIM, HnswEngine(params, SnapshotStore(tmp_path / f"index-{name}")), batch=50)

    a = reg("a")
    idx = a.get(cid)
    assert idx.loaded_from == "database" and idx.stats().params["projected_segments"] == 1 and len(idx) == 260
    before = answers(a, cid, probes)
    exact = [[(ids[i], round(float(vecs[i] @ p), 5)) for i in np.argsort(-(vecs @ p))[:5]] for p in probes]
    assert [[f for f, _ in hits] for hits in before] == [[f for f, _ in hits] for hits in exact]
    assert all(abs(x[1] - y[1]) <= 2e-5 for hb, he in zip(before, exact) for x, y in zip(hb, he))
    assert a.write_snapshots(store.last_change_seq()) == 1
    assert len(list((tmp_path / "index-a").glob(f"{cid}.*.dense"))) == 1
    b = IndexRegistry(store, MODEL, DIM, HnswEngine(params, SnapshotStore(tmp_path / "index-a")))
    assert b.get(cid).loaded_from == "snapshot" and answers(b, cid, probes) == before
    # a damaged dense file: refused, rebuilt from the database, same answers
    dense = next((tmp_path / "index-a").glob(f"{cid}.*.dense"))
    dense.write_bytes(dense.read_bytes()[:-10])
    c = IndexRegistry(store, MODEL, DIM, HnswEngine(params, SnapshotStore(tmp_path / "index-a")))
    assert c.get(cid).loaded_from == "database" and answers(c, cid, probes) == before


# -- the contract, on both engines, and what only a shared engine (Milvus) does -------------------
@pytest.mark.parametrize("engine", ENGINES)
def test_search_returns_each_subjects_best_face_within_top_k_and_the_floor(store, tmp_path, engine):
    """Several faces per subject: one hit per subject (its best face), best first, at most top_k,
    none under min_similarity, equal to the exact scan; a deleted face is never served, a
    re-embedded one answers with its new vector."""
    cid = new_collection(store)
    rng = np.random.default_rng(7)
    faces = {}  # face id -> (subject, vector)
    for i in range(40):
        for _ in range(1 + i % 3):
            f = NewFace(uuid.uuid4().hex, MODEL, unit(rng), 0.9, None)
            store.add_face(cid, f"p{i}", f, allow_existing=True, max_faces=10)
            faces[f.face_id] = (f"p{i}", f.embedding)
    reg = registry(store, tmp_path, engine=engine)
    idx = reg.get(cid)
    assert len(idx) == len(faces) == 79 and idx.stats().engine == engine

    def exact(q, k, floor):
        best = {}
        for f, (s, v) in faces.items():
            sim = float(v @ q)
            if sim >= floor and (s not in best or sim > best[s][1]):
                best[s] = (f, sim)
        return [f for f, _ in sorted(best.values(), key=lambda x: -x[1])[:k]]

    probes = [faces[f][1] + 0.3 * unit(rng) for f in list(faces)[:12]]
    for q in probes:
        q = q / np.linalg.norm(q)
        for k, floor in ((5, -1.0), (40, -1.0), (10, 0.2)):
            hits = idx.search(q, k, floor, 10)
            assert [h.face_id for h in hits] == exact(q, k, floor)
            assert len({h.subject_id for h in hits}) == len(hits) and all(h.similarity >= floor for h in hits)
            assert all(abs(h.similarity - float(faces[h.face_id][1] @ q)) < 1e-4 for h in hits)
    # a deleted subject's faces are never served; a re-embedded face answers with its new vector
    gone = store.delete_subject(cid, "p1")
    reg.local_change(cid, gone)
    for f in gone:
        assert all(h.subject_id != "p1" for h in idx.search(faces[f][1], 40, -1.0, 10))
    f = next(f for f, (s, _) in faces.items() if s == "p5")
    new = unit(rng)
    with store._tx() as q:  # what facesvc-reembed does: the same face id, a new embedding
        q("UPDATE faces SET embedding = ? WHERE face_id = ?", new.astype("<f4").tobytes(), f)
    reg.sync(cid, [f], replace=True)
    top = idx.search(new, 1, -1.0, 10)[0]
    assert top.face_id == f and top.similarity > 0.999


def test_milvus_a_restarted_replica_attaches_to_what_milvus_holds_and_replays_the_log(store, tmp_path):
    cid = new_collection(store)
    faces = enrol(store, cid, 50)
    a = registry(store, tmp_path, engine="milvus")
    assert a.get(cid).loaded_from == "database" and len(a.get(cid)) == 50
    # while no replica runs: a face deleted whose delete never reached Milvus (a crash after the commit)
    gone = next(iter(faces))
    store.delete_face(cid, gone)
    b = registry(store, tmp_path, engine="milvus")  # a restart: nothing built, the change log replayed
    idx = b.get(cid)
    assert idx.loaded_from == "milvus" and len(idx) == 49
    assert gone not in {h.face_id for h in idx.search(faces[gone], 5, -1.0, 1)}
    st = idx.stats()
    assert st.engine == "milvus" and st.memory_bytes == 0 and st.params["layout"] == "partition key" and st.size == 49


def test_milvus_a_lost_collection_is_rebuilt_from_the_database_in_pages(store, tmp_path, caplog, monkeypatch):
    cid = new_collection(store)
    faces = enrol(store, cid, 120)
    a = registry(store, tmp_path, engine="milvus")
    name = a.get(cid).name
    a.engine.client.drop_collection(name)  # Milvus lost it (a dropped collection, a wiped volume)
    monkeypatch.setattr(registry_module, "PROGRESS_S", 0.0)
    b = registry(store, tmp_path, engine="milvus", batch=50)
    with caplog.at_level("INFO", logger="facesvc.index"):
        idx = b.get(cid)
    assert idx.loaded_from == "database" and len(idx) == 120
    assert "building from the database: 50 of 120 faces" in caplog.text and "built from the database with 120" in caplog.text
    f, v = next(iter(faces.items()))
    assert idx.search(v, 1, 0.9, 1)[0].face_id == f
    # Milvus holding a face the database does not: put right at the load
    intruder = unit(np.random.default_rng(3))
    idx.add(["f" * 32], ["intruder"], [intruder])
    c = registry(store, tmp_path, engine="milvus")
    with caplog.at_level("WARNING", logger="facesvc.index"):
        assert c.get(cid).loaded_from == "milvus" and len(c.get(cid)) == 120
    assert "Milvus held 1 faces the database does not and lacked 0" in caplog.text
    assert "f" * 32 not in {h.face_id for h in c.get(cid).search(intruder, 5, -1.0, 1)}


def test_milvus_changes_no_replica_wrote_are_put_right_at_the_next_load(store, tmp_path, monkeypatch):
    """A face replaced (deleted, and a new one added) while no replica could write to Milvus, and the
    replicas restarted meanwhile: the change log's last rows, which a load replays, were other
    collections' by then, and the count matched. The deleted face was served, the new one never
    found. A load now compares face ids with the database (in pages: ID_PAGE)."""
    from server.index import milvus as milvus_module

    monkeypatch.setattr(milvus_module, "ID_PAGE", 7)
    cid = new_collection(store)
    faces = enrol(store, cid, 20)
    a = registry(store, tmp_path, engine="milvus")
    assert len(a.get(cid)) == 20
    old = next(iter(faces))
    store.delete_face(cid, old)  # neither reached Milvus: no replica ran
    new = NewFace(uuid.uuid4().hex, MODEL, unit(np.random.default_rng(99)), 0.9, None)
    store.add_face(cid, "s0-0", new, allow_existing=True, max_faces=10)
    enrol(store, new_collection(store), registry_module.LOOKBACK + 5, seed=5)  # other tenants' traffic
    b = registry(store, tmp_path, engine="milvus")
    idx = b.get(cid)
    assert idx.loaded_from == "milvus" and len(idx) == 20
    assert old not in {h.face_id for h in idx.search(faces[old], 5, -1.0, 1)}
    assert idx.search(new.embedding, 1, 0.9, 1)[0].face_id == new.face_id


def test_milvus_face_ids_are_read_whole_in_pages_across_segments(store, tmp_path, monkeypatch):
    """Pages after the last id seen need the rows in primary key order, which a plain query does not
    give across segments (each segment's rows in storage order): pages of 7 found 13 of 30 faces."""
    from server.index import milvus as milvus_module

    monkeypatch.setattr(milvus_module, "ID_PAGE", 7)
    cid = new_collection(store)
    a = registry(store, tmp_path, engine="milvus")
    idx = a.get(cid)
    faces = {}
    for seed in range(3):  # three flushed segments
        batch = enrol(store, cid, 10, seed=seed)
        faces |= batch
        idx.add(list(batch), [f"s{seed}"] * 10, list(batch.values()))
    assert idx.engine.face_ids(idx.name, idx.filter) == set(faces)


def test_milvus_a_released_collection_is_loaded_again(store, tmp_path):
    """A restarted Milvus holds its collections released: every search and write answered UNAVAILABLE
    until facesvc was restarted. The call that meets it loads it and goes on."""
    cid = new_collection(store)
    faces = enrol(store, cid, 5)
    a = registry(store, tmp_path, engine="milvus")
    idx = a.get(cid)
    idx.engine.client.release_collection(idx.name)
    f, v = next(iter(faces.items()))
    assert idx.search(v, 1, 0.9, 1)[0].face_id == f


def test_milvus_a_collection_lost_while_replicas_run_is_rebuilt_on_each(store, tmp_path, monkeypatch):
    """Milvus lost its collection (a wiped volume, a new Milvus) under running replicas: they answered
    UNAVAILABLE until restarted, and their change-log followers stood still. The replica that meets
    the loss rebuilds on the next use; one that only searched learns of the collection created anew
    from its watch (IndexSync's thread) instead of finding nothing for good."""
    from server.index import milvus as milvus_module

    monkeypatch.setattr(milvus_module, "WATCH_S", 0.0)
    cid, other = new_collection(store), new_collection(store)
    faces, others = enrol(store, cid, 10), enrol(store, other, 3, seed=4)
    a = registry(store, tmp_path, engine="milvus")
    b = registry(store, tmp_path, engine="milvus")
    f, v = next(iter(faces.items()))
    assert a.get(cid).search(v, 1, 0.9, 1)[0].face_id == f and b.get(cid).search(v, 1, 0.9, 1)[0].face_id == f
    g, w = next(iter(others.items()))
    assert b.get(other).search(w, 1, 0.9, 1)[0].face_id == g  # a collection only B uses
    a.engine.client.drop_collection(a.get(cid).name)
    with pytest.raises(errors.FaceServiceError) as e:
        a.get(cid).search(v, 1, 0.9, 1)
    assert e.value.reason == errors.STORE_UNAVAILABLE
    added = enrol(store, cid, 1, seed=7)
    a.local_change(cid, list(added))  # a change meeting the stale index: it goes, no error
    rebuilt = a.get(cid)
    assert rebuilt.loaded_from == "database" and len(rebuilt) == 11
    assert rebuilt.search(v, 1, 0.9, 1)[0].face_id == f
    # B never met the loss, and A's rebuild of its own collection created the Milvus collection anew,
    # without the one only B uses: the collection's mark tells B
    b.engine.watch()
    again = b.get(other)
    assert len(again) == 3 and again.search(w, 1, 0.9, 1)[0].face_id == g
    assert b.get(cid).search(v, 1, 0.9, 1)[0].face_id == f
    b.apply_changes([(10**9, cid, next(iter(added)), "add")])  # the follower goes on


def test_milvus_a_stale_write_is_undone_by_the_writer_that_made_it(store, tmp_path):
    """Replica A read a face before replica B deleted it and writes it after B's delete reached
    Milvus: A's check of the database after its write finds the face gone and deletes it again."""
    cid = new_collection(store)
    faces = enrol(store, cid, 3)
    a = registry(store, tmp_path, engine="milvus")
    idx = a.get(cid)
    f = next(iter(faces))
    read_before = store.faces_by_id(cid, MODEL, [f])
    store.delete_face(cid, f)
    a.local_change(cid, [f])  # B's delete, applied
    idx.apply(read_before, [], set())  # A's late write of what it had read
    assert len(idx) == 2 and not idx.engine.fetch(idx.name, [f])


def test_milvus_rows_of_a_deleted_collection_recreated_under_its_name_are_never_served(store, tmp_path):
    cid = new_collection(store)
    old = enrol(store, cid, 10)
    a = registry(store, tmp_path, engine="milvus")
    a.get(cid)
    # deleted and created again while no replica ran: the old rows are still in Milvus
    store.delete_collection(cid)
    store.create_collection(cid, "again", LIVENESS_OPTIONAL)
    new = enrol(store, cid, 4, seed=2)
    b = registry(store, tmp_path, engine="milvus")
    idx = b.get(cid)
    assert len(idx) == 4 and idx.engine.count(idx.name, f'collection == "{cid}"') == 4
    served = {h.face_id for v in old.values() for h in idx.search(v, 10, -1.0, 1)}
    assert served <= set(new)


def test_a_deleted_face_leaves_the_graph_and_the_snapshot_and_compaction_reclaims_its_slot(store, tmp_path):
    """Erasure: hnswlib's mark_deleted keeps a deleted face's vector; the snapshot written after the
    deletion holds it no more (and loads and answers as the index does); past the deleted share,
    compaction rebuilds the index without the slots."""
    cid, faces, a = snapshotted(store, tmp_path, 50)
    idx = a.get(cid)
    gone = list(faces)[:12]
    stored = {}  # the bytes hnswlib holds for each face to delete (its own normalisation of the vector)
    for f in gone:
        label = idx._label_of[f]
        stored[f] = np.asarray(idx._segment_of(label).graph.get_items([label]), np.float32)[0].tobytes()

    def snapshot_bytes() -> bytes:
        return b"".join(p.read_bytes() for p in (tmp_path / "index-a").glob(f"{cid}.*.graph"))

    assert all(v in snapshot_bytes() for v in stored.values())  # the snapshot before the deletions holds them
    store.delete_subject(cid, "s0-0")  # the first face's subject, then single faces
    for f in gone[1:]:
        store.delete_face(cid, f)
    a.sync(cid, gone)
    assert a.write_snapshots(store.last_change_seq()) == 1
    after = snapshot_bytes()
    assert not any(v in after for v in stored.values())
    assert idx.stats().deleted == 12 and len(idx) == 38
    kept = [f for f in faces if f not in gone]
    reloaded = registry(store, tmp_path).get(cid)  # a restart from the erased snapshot
    assert reloaded.loaded_from == "snapshot" and (len(reloaded), reloaded.stats().deleted) == (38, 12)
    assert [reloaded.search(faces[f], 1, 0.99, 1)[0].face_id for f in kept] == kept
    assert a.compact(0.5) == []  # 12 of 50 slots: below that share
    build, late = a._build, {}

    def build_then_register(collection):  # a Register committed while the rebuild reads the database
        fresh = build(collection)
        late.update(enrol(store, cid, 1, seed=7))
        return fresh

    a._build = build_then_register
    assert a.compact(0.2) == [cid]
    compacted = a.get(cid)
    assert compacted is not idx and compacted.stats().deleted == 0 and len(compacted) == 39
    kept += list(late)
    assert [compacted.search({**faces, **late}[f], 1, 0.99, 1)[0].face_id for f in kept] == kept
    assert a.write_snapshots(store.last_change_seq()) == 1
    restarted = registry(store, tmp_path).get(cid)  # the rewritten snapshot: 39 faces, no deleted slots
    assert restarted.loaded_from == "snapshot" and (len(restarted), restarted.stats().deleted) == (39, 0)


def stored_vectors(idx, face_ids) -> dict[str, bytes]:
    """The bytes hnswlib holds for each face (its own normalisation of the vector)."""
    out = {}
    for f in face_ids:
        label = idx._label_of[f]
        out[f] = np.asarray(idx._segment_of(label).graph.get_items([label]), np.float32)[0].tobytes()
    return out


def test_no_snapshot_keeps_what_was_deleted_while_its_server_was_down(store, tmp_path):
    """Erasure across restarts: faces deleted while a replica was down were replayed into its index
    but its old snapshot stayed on disk; a collection deleted meanwhile (its drop may be older than
    the change log a start reads) left its files for good, also when created anew under its name."""
    d = tmp_path / "index-a"
    cid, faces, a = snapshotted(store, tmp_path, 20)
    gone = list(faces)[:3]
    held = stored_vectors(a.get(cid), gone)
    other, _, _ = snapshotted(store, tmp_path, 5)
    again, _, _ = snapshotted(store, tmp_path, 5)
    # the replica is down: faces of one collection go, another collection goes, a third is made anew
    for f in gone:
        store.delete_face(cid, f)
    store.delete_collection(other)
    store.delete_collection(again)
    store.create_collection(again, "made anew", LIVENESS_OPTIONAL)
    b = registry(store, tmp_path)  # the restart
    assert sorted(b.tidy_saved()) == sorted([other, again])
    assert not list(d.glob(f"{other}.*")) and not list(d.glob(f"{again}.*"))
    idx = b.get(cid)
    assert idx.loaded_from == "snapshot" and len(idx) == 17
    assert b.write_snapshots(store.last_change_seq()) == 1  # the replayed deletions made it stale
    on_disk = b"".join(p.read_bytes() for p in d.glob(f"{cid}.*.graph"))
    assert not any(v in on_disk for v in held.values())
    assert b.tidy_saved() == []  # nothing else to remove: a live collection's files stay


def test_a_snapshot_write_killed_before_it_removed_the_old_graphs_leaves_them_for_the_next_start(store, tmp_path):
    """kill -9 after the new snapshot's rename and before the old graphs' removal: the old graph (with a
    face deleted since) stayed as long as the collection did not change again."""
    d = tmp_path / "index-a"
    cid, faces, a = snapshotted(store, tmp_path, 10)
    gone = next(iter(faces))
    held = stored_vectors(a.get(cid), [gone])[gone]
    old = {p.name: p.read_bytes() for p in d.glob(f"{cid}.*.graph")}
    store.delete_face(cid, gone)
    a.sync(cid, [gone])
    assert a.write_snapshots(store.last_change_seq()) == 1
    for name, data in old.items():  # what the killed write left
        (d / name).write_bytes(data)
    b = registry(store, tmp_path)  # the restart
    assert b.tidy_saved() == []  # the snapshot stays: it is the collection's own
    assert not any(held in p.read_bytes() for p in d.glob(f"{cid}.*"))
    assert b.get(cid).loaded_from == "snapshot" and len(b.get(cid)) == 9


def test_without_the_warm_up_a_snapshot_holding_deleted_faces_goes_at_the_start(store, tmp_path):
    """No warm-up: a collection loads on its first search, and only a load rewrites a stale snapshot,
    so one holding faces deleted while the server was down stayed on disk until then."""
    d = tmp_path / "index-a"
    cid, faces, _ = snapshotted(store, tmp_path, 5)
    grown, _, _ = snapshotted(store, tmp_path, 5)
    store.delete_face(cid, next(iter(faces)))
    enrol(store, grown, 2, seed=4)  # only additions: nothing to erase, the snapshot stays
    b = registry(store, tmp_path)
    assert b.tidy_saved(loads_all=False) == [cid]
    assert not list(d.glob(f"{cid}.*")) and list(d.glob(f"{grown}.*"))
    assert len(b.get(cid)) == 4 and b.get(grown).loaded_from == "snapshot"


def test_a_restart_keeps_the_snapshot_of_a_collection_created_anew_before_it(store, tmp_path):
    """A start re-reads the recent change log: the drop of an earlier collection of the id dropped the
    new one's index and removed its snapshot, and a large collection was rebuilt at every start."""
    d = tmp_path / "index-a"
    cid = new_collection(store)
    enrol(store, cid, 3)
    store.delete_collection(cid)
    store.create_collection(cid, "anew", LIVENESS_OPTIONAL)
    enrol(store, cid, 4, seed=2)
    a = registry(store, tmp_path)
    a.get(cid)
    assert a.write_snapshots(store.last_change_seq()) == 1
    b = registry(store, tmp_path)  # the restart
    idx = b.get(cid)
    assert idx.loaded_from == "snapshot"
    b.apply_changes(store.changes_after(0, 10_000, cid))  # the recent log, the old drop among it
    assert b.get(cid) is idx and len(idx) == 4 and list(d.glob(f"{cid}.snapshot"))
    c = registry(store, tmp_path)  # not loaded when the log is read: the files stay too
    c.apply_changes(store.changes_after(0, 10_000, cid))
    assert list(d.glob(f"{cid}.snapshot")) and c.get(cid).loaded_from == "snapshot"


def test_a_snapshot_written_while_compaction_replaces_its_index_is_kept(store, tmp_path):
    """Compaction's new index of the same collection is marked for the next round; the files written
    meanwhile (and the previous snapshot with them) were removed as if the collection had gone."""
    d = tmp_path / "index-a"
    cid, _, a = snapshotted(store, tmp_path, 5)
    idx = a.get(cid)
    a._mark_dirty(cid)
    save = a.engine.save

    def compacted_meanwhile(collection, index, meta):
        fresh = a._build(collection)
        fresh.collection_created_ms = idx.collection_created_ms
        a._indexes[collection] = fresh
        a._mark_dirty(collection)  # as compact() does
        save(collection, index, meta)

    a.engine.save = compacted_meanwhile
    a.write_snapshots(store.last_change_seq())
    a.engine.save = save
    assert list(d.glob(f"{cid}.snapshot")) and cid in a._dirty


def test_a_snapshot_this_server_does_not_load_goes_when_its_faces_do_or_it_outlives_the_log(store, tmp_path):
    """Without the warm-up, a collection no one searches here is not loaded: deletions of its faces
    (from the change log) could not reach its snapshot, and one older than the change log's retention
    cannot say what changed since it was made."""
    d = tmp_path / "index-a"
    cid, faces, _ = snapshotted(store, tmp_path, 5)
    b = registry(store, tmp_path)  # running, the collection not loaded
    gone = next(iter(faces))
    store.delete_face(cid, gone)
    b.apply_changes(store.changes_after(store.last_change_seq() - 1, 10, cid))
    assert not list(d.glob(f"{cid}.*"))
    other, _, _ = snapshotted(store, tmp_path, 3)
    aged = registry(store, tmp_path, retention_s=0.001)
    time.sleep(0.01)
    assert aged.tidy_saved() == [other] and not list(d.glob(f"{other}.*"))


def test_the_warm_up_goes_past_a_collection_deleted_under_it(store, tmp_path):
    """A collection deleted between the warm-up's listing and its load stopped the warm-up: the rest
    loaded on first use, their snapshots unchecked."""
    first, second, third = (snapshotted(store, tmp_path, 2)[0] for _ in range(3))
    order = sorted([first, second, third])
    b = registry(store, tmp_path)
    get = b.get

    def deleted_meanwhile(collection, created_ms=None):
        if collection == order[0]:
            store.delete_collection(order[1])  # another replica, while the page is being loaded
        return get(collection, created_ms)

    b.get = deleted_meanwhile
    assert IndexSync(b, store)._warm() is True
    loaded = b.loaded()  # (the database may hold other tests' collections too)
    assert order[0] in loaded and order[2] in loaded and order[1] not in loaded


def test_a_collection_marked_while_it_loads_stays_marked(store, tmp_path):
    """A load marks its index before it is in place: a snapshot round in between dropped the mark."""
    cid, _, a = snapshotted(store, tmp_path, 2)
    b = registry(store, tmp_path)
    b._mark_dirty(cid)  # as a load does, before get() puts the index in place
    assert b.write_snapshots(store.last_change_seq()) == 0 and cid in b._dirty
    b.get(cid)
    assert b.write_snapshots(store.last_change_seq()) == 1


def test_a_snapshot_written_while_its_collection_is_deleted_does_not_outlive_it(store, tmp_path):
    cid, _, a = snapshotted(store, tmp_path, 5)
    enrol(store, cid, 1, seed=3)
    a.sync(cid, [])
    a._mark_dirty(cid)
    save, deleting = a.engine.save, []

    def deleted_meanwhile(collection, index, meta):  # DeleteCollection lands while the files are written
        store.delete_collection(collection)
        deleting.append(threading.Thread(target=a.collection_deleted, args=(collection,)))
        deleting[0].start()
        deleting[0].join(0.3)  # it waits for the write (the collection's lock)
        save(collection, index, meta)

    a.engine.save = deleted_meanwhile
    a.write_snapshots(store.last_change_seq())
    deleting[0].join(20)
    assert not deleting[0].is_alive() and not list((tmp_path / "index-a").glob(f"*{cid}*"))


def test_a_collection_created_anew_elsewhere_is_never_served_the_old_ones_index(store, tmp_path):
    """Until a replica applied the drop, a collection deleted and created anew under its id on another
    replica was searched in the old one's index: the old tenant's subjects in its answers."""
    cid = new_collection(store)
    old_faces = enrol(store, cid, 5)
    a = registry(store, tmp_path)
    old = a.get(cid)
    assert len(old) == 5
    earlier = store.collection_created_ms(cid)
    store.delete_collection(cid)  # on another replica; this one has not polled the change log yet
    store.create_collection(cid, "anew", LIVENESS_OPTIONAL)
    new_faces = enrol(store, cid, 2, seed=9)
    created = store.collection_created_ms(cid)
    idx = a.get(cid, created)
    assert idx is not old and len(idx) == 2 and a.get(cid, created) is idx
    assert a.get(cid, earlier) is idx  # a caller's read from before: the store says this one is current
    probe = next(iter(old_faces.values()))
    assert all(h.face_id in new_faces for h in idx.search(probe, 5, -1.0, 1))
    gone = next(iter(new_faces))
    store.delete_face(cid, gone)
    a.sync(cid, [gone])
    assert a.compact(0.1) == [cid]  # a compacted index keeps what it was loaded for
    assert a.get(cid, created).collection_created_ms == created and len(a.get(cid, created)) == 1


def found(reg: IndexRegistry, cid: str, vector) -> set[str]:
    return {h.face_id for h in reg.get(cid).search(vector, 5, 0.9, 1)}


def settled(reg: IndexRegistry, seconds: float = 20) -> bool:
    """Whether the changes that waited for a collection's lock have been applied (within `seconds`)."""
    end = time.monotonic() + seconds
    while reg._deferred and time.monotonic() < end:
        time.sleep(0.02)
    return not reg._deferred


def test_a_collection_being_built_holds_back_no_other_collections_changes(store, tmp_path):
    """The change-log poll waited for the lock of a collection whose index was being built (minutes for
    a large one), and every other collection's deletions waited with it: their searches went on
    returning deleted faces. The built collection's own rows are applied once its build is done."""
    busy, other = new_collection(store), new_collection(store)
    busy_faces, other_faces = enrol(store, busy, 5), enrol(store, other, 5, seed=1)
    a = registry(store, tmp_path)
    sync = IndexSync(a, store, warmup=False, compact_deleted_share=0)  # (compaction would mark indexes to write)
    a.get(other)
    read, go_on = threading.Event(), threading.Event()
    pages = store.collection_embeddings

    def slow_pages(collection, *args):  # the build has read its faces and goes on slowly
        rows = pages(collection, *args)
        if collection == busy and rows:
            read.set()
            go_on.wait(30)
        return rows

    store.collection_embeddings = slow_pages
    loading = threading.Thread(target=a.get, args=(busy,))
    loading.start()
    polling = threading.Thread(target=sync.step)
    try:
        assert read.wait(30)
        gone_busy, gone_other = next(iter(busy_faces)), next(iter(other_faces))
        store.delete_face(busy, gone_busy)  # after the build read it
        store.delete_face(other, gone_other)
        polling.start()
        polling.join(10)
        assert not polling.is_alive(), "the poll waited for the build"
        assert gone_other not in found(a, other, other_faces[gone_other]) and len(a.get(other)) == 4
    finally:
        go_on.set()
        loading.join(30)
        polling.join(30)
    assert settled(a)
    assert gone_busy not in found(a, busy, busy_faces[gone_busy]) and len(a.get(busy)) == 4

    # rows waiting for the lock keep the index out of a snapshot round, whose change_seq claims them
    assert a.write_snapshots(store.last_change_seq()) == 2
    second = list(busy_faces)[1]
    holding, release = threading.Event(), threading.Event()

    def hold():  # as a load or a compaction's swap holds it (for at most 15 s)
        with a._lock(busy):
            holding.set()
            release.wait(15)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        store.delete_face(busy, second)
        sync.step()
        assert busy in a._deferred
        a._mark_dirty(busy)
        assert a.write_snapshots(store.last_change_seq()) == 0 and busy in a._dirty
    finally:
        release.set()
        holder.join(30)
    assert settled(a) and second not in found(a, busy, busy_faces[second])
    assert a.write_snapshots(store.last_change_seq()) == 1


def test_changes_that_waited_for_a_build_wait_out_a_database_outage(store, tmp_path, monkeypatch):
    """The poll has moved past rows that waited for a collection's lock: when the database cannot be
    read as they are applied, they are tried again, not dropped (the deleted face stayed searchable)."""
    cid = new_collection(store)
    faces = enrol(store, cid, 4)
    a = registry(store, tmp_path)
    monkeypatch.setattr(a, "RETRY_S", 0.05)
    a.get(cid)
    gone = next(iter(faces))
    store.delete_face(cid, gone)
    rows = store.changes_after(store.last_change_seq() - 1, 10, cid)
    read, outages = store.faces_by_id, [2]

    def out_of_reach(*args):  # the database down for the first two tries
        if outages[0]:
            outages[0] -= 1
            raise errors.unavailable(errors.STORE_UNAVAILABLE, "the database is unavailable; retry")
        return read(*args)

    store.faces_by_id = out_of_reach
    with a._lock(cid):  # a load or a compaction's swap holds it as the rows come
        a.apply_changes(rows)
        assert cid in a._deferred
    assert settled(a) and outages == [0]
    assert gone not in found(a, cid, faces[gone]) and len(a.get(cid)) == 3


def test_changes_that_waited_for_a_build_and_failed_leave_nothing_behind(store, tmp_path):
    """A failure other than an outage while applying rows that waited for the lock ended their thread
    and left the rows queued: every later row of the collection queued behind them, with no thread to
    apply it, and a deleted face stayed searchable. The index is unloaded now, and what comes later
    is applied."""
    cid = new_collection(store)
    faces = enrol(store, cid, 4)
    a = registry(store, tmp_path)
    a.get(cid)
    first, second = list(faces)[:2]
    store.delete_face(cid, first)
    read = store.faces_by_id

    def broken(*args):
        raise RuntimeError("a bug")

    def unremovable(collection):  # and the snapshot's files cannot be removed (a read-only disk)
        raise OSError("read-only file system")

    store.faces_by_id, forget, a.engine.forget = broken, a.engine.forget, unremovable
    with a._lock(cid):
        a.apply_changes(store.changes_after(store.last_change_seq() - 1, 10, cid))
    assert settled(a) and cid not in a.loaded()  # unloaded: the next search loads the database's faces
    store.faces_by_id, a.engine.forget = read, forget
    assert first not in found(a, cid, faces[first]) and len(a.get(cid)) == 3
    store.delete_face(cid, second)
    a.apply_changes(store.changes_after(store.last_change_seq() - 1, 10, cid))
    assert not a._deferred and second not in found(a, cid, faces[second]) and len(a.get(cid)) == 2


def test_deleted_collections_leave_no_lock_behind(store, tmp_path):
    """Every replica applies every collection's drop: a lock kept per id ever seen grew without end."""
    a = registry(store, tmp_path)
    for _ in range(20):
        cid = new_collection(store)
        enrol(store, cid, 1)
        a.get(cid)
        store.delete_collection(cid)
        a.apply_changes([(0, cid, "", "drop")])
    assert len(a._locks) == 0 and a.loaded() == []


def test_milvus_out_of_reach_is_unavailable_without_its_address():
    """The address (and what failed) go to the server log; the caller, who may be any tenant, gets the
    reason. The message named the Milvus host and port."""
    from server import errors

    engine = MilvusEngine(MilvusParams(uri="http://127.0.0.1:9"), None)  # the discard port: nothing listens
    with pytest.raises(errors.FaceServiceError) as down:
        engine.client
    assert down.value.reason == errors.STORE_UNAVAILABLE and "127.0.0.1" not in down.value.message
    assert "127.0.0.1:9" in down.value.detail


def test_a_collection_whose_changes_fail_holds_back_no_other_collections_changes(store, tmp_path):
    """A failure other than an outage while the poll applied one collection's rows went up to the
    sync step, which tried the same batch again without end: no later row of any collection was
    applied on that replica (a face deleted elsewhere stayed searchable here). That collection's
    index is unloaded now, and the others' rows are applied."""
    broken_cid, ok_cid = new_collection(store), new_collection(store)
    broken_faces, ok_faces = enrol(store, broken_cid, 4), enrol(store, ok_cid, 4, seed=1)
    a = registry(store, tmp_path)
    a.get(broken_cid), a.get(ok_cid)
    since = store.last_change_seq()
    for faces, cid in ((broken_faces, broken_cid), (ok_faces, ok_cid)):
        store.delete_face(cid, next(iter(faces)))
    read = store.faces_by_id

    def broken_for_one(collection, *args):
        if collection == broken_cid:
            raise RuntimeError("a bug")
        return read(collection, *args)

    store.faces_by_id = broken_for_one
    a.apply_changes(store.changes_after(since, 10))
    assert broken_cid not in a.loaded() and ok_cid in a.loaded()
    gone = next(iter(ok_faces))
    assert gone not in found(a, ok_cid, ok_faces[gone]) and len(a.get(ok_cid)) == 3
    store.faces_by_id = read
    gone = next(iter(broken_faces))
    assert gone not in found(a, broken_cid, broken_faces[gone]) and len(a.get(broken_cid)) == 3
    # an outage is still the poll's to wait out: the batch is tried again as a whole

    def away(*args):
        raise errors.unavailable("DATABASE_UNAVAILABLE", "the database is out of reach")

    store.delete_face(ok_cid, list(ok_faces)[1])
    store.faces_by_id = away
    with pytest.raises(errors.FaceServiceError):
        a.apply_changes(store.changes_after(store.last_change_seq() - 1, 10))
    store.faces_by_id = read
    assert ok_cid in a.loaded()


def test_a_start_keeps_the_snapshots_that_hold_the_changes_it_reads_again(store, tmp_path):
    """A start re-reads the last rows of the change log; a deletion among them forgot the snapshot of
    a collection not loaded yet, also when the snapshot was written after it: every restart rebuilt
    such collections from the database. A snapshot goes only for a deletion it does not hold."""
    d = tmp_path / "index-a"
    held_cid, held_faces, a = snapshotted(store, tmp_path, 10)
    stale_cid, stale_faces, _ = snapshotted(store, tmp_path, 10)
    store.delete_face(held_cid, next(iter(held_faces)))
    a.apply_changes(store.changes_after(store.last_change_seq() - 1, 10))
    a.get(stale_cid)
    assert a.write_snapshots(store.last_change_seq()) == 1  # held_cid's snapshot now holds the deletion
    store.delete_face(stale_cid, next(iter(stale_faces)))  # while the replica is down
    b = registry(store, tmp_path)  # the restart
    assert b.tidy_saved() == []  # the warm-up would load both (and replay the log into the stale one)
    sync = IndexSync(b, store, warmup=False)
    sync.step()  # the first poll re-reads the rows before the start
    assert list(d.glob(f"{held_cid}.*")) and not list(d.glob(f"{stale_cid}.*"))
    assert b.get(held_cid).loaded_from == "snapshot" and len(b.get(held_cid)) == 9
    assert b.get(stale_cid).loaded_from == "database" and len(b.get(stale_cid)) == 9


def test_searches_go_on_while_a_snapshot_is_written_and_a_change_waits(store, tmp_path, monkeypatch):
    """A snapshot holds the index's read lock while its graphs go to disk (seconds for a large
    collection); a change arriving meanwhile waited for the write lock, and the lock lets a waiting
    writer go first: every search of the collection stood still until the write was done. Changes
    now wait on the collection's lock instead, and searches go on."""
    from server.index import hnsw as hnsw_module

    cid = new_collection(store)
    faces = enrol(store, cid, 20)
    a = registry(store, tmp_path)
    a.get(cid)
    a._mark_dirty(cid)
    writing, go_on = threading.Event(), threading.Event()
    erase = hnsw_module.erase_deleted_vectors

    def slow_disk(*args):
        writing.set()
        go_on.wait(20)
        return erase(*args)

    monkeypatch.setattr(hnsw_module, "erase_deleted_vectors", slow_disk)
    snapshot = threading.Thread(target=a.write_snapshots, args=(store.last_change_seq(),))
    snapshot.start()
    try:
        assert writing.wait(20)
        new = enrol(store, cid, 1, seed=9)
        change = threading.Thread(target=a.local_change, args=(cid, list(new)))  # a Register's own commit
        change.start()
        time.sleep(0.2)  # the change is waiting
        probe = next(iter(faces.values()))
        done = []
        search = threading.Thread(target=lambda: done.append(found(a, cid, probe)))
        search.start()
        search.join(5)
        assert done and next(iter(faces)) in done[0]  # answered while the graphs are still being written
        assert change.is_alive()  # the change waits for the write
    finally:
        go_on.set()
        snapshot.join(20)
    change.join(20)
    f = next(iter(new))
    assert f in found(a, cid, new[f]) and len(a.get(cid)) == 21


def test_index_stats_never_report_an_earlier_collections_index(store, tmp_path):
    """GetIndexStats read the loaded index whatever collection it was loaded for: on a replica that
    had not applied the drop of a collection deleted and created anew elsewhere, it reported (and
    kept serving) the earlier collection's faces."""
    from types import SimpleNamespace

    from server.domain.search import SearchService

    cid = new_collection(store)
    enrol(store, cid, 6)
    b = registry(store, tmp_path, name="b")
    assert len(b.get(cid)) == 6
    store.delete_collection(cid)  # on another replica, whose drop b has not applied yet
    store.create_collection(cid, "made anew", LIVENESS_OPTIONAL)
    enrol(store, cid, 2, seed=5)
    stats = SearchService(SimpleNamespace(pipeline=None, store=store), b, 10).stats(cid)
    assert stats.size == 2
    store.delete_collection(cid)
    with pytest.raises(errors.FaceServiceError) as e:
        SearchService(SimpleNamespace(pipeline=None, store=store), b, 10).stats(cid)
    assert e.value.reason == errors.COLLECTION_NOT_FOUND


def test_deleting_a_collection_revokes_its_keys_before_it_waits_for_its_index(store, tmp_path):
    """DeleteCollection dropped the index first, which waits for the collection's lock (a build of
    minutes, a snapshot being written): its keys stayed usable from the key cache, and its staged
    faces stayed, until then, and a caller's deadline could pass on a delete already committed."""
    from server.domain.collections import CollectionService
    from server.storage.staging import MemoryStagingCache

    cid = new_collection(store)
    enrol(store, cid, 2)
    a = registry(store, tmp_path)
    a.get(cid)
    revoked = threading.Event()
    service = CollectionService(store, store, MemoryStagingCache(), a, on_keys_revoked=revoked.set)
    lock = a._lock(cid)
    with lock:  # a build or a snapshot of the collection under way
        deleting = threading.Thread(target=service.delete, args=(cid,))
        deleting.start()
        assert revoked.wait(10) and deleting.is_alive()  # keys gone at once; the index waits
    deleting.join(20)
    assert not deleting.is_alive() and cid not in a.loaded()


def test_a_file_of_no_snapshot_in_the_index_directory_is_left_alone(store, tmp_path):
    """A dot file in the index directory (.DS_Store, an editor's) was taken for a collection's
    unfinished snapshot: every start logged it as a collection whose snapshot went."""
    cid, _, _ = snapshotted(store, tmp_path, 3)
    d = tmp_path / "index-a"
    for name in (".DS_Store", ".nfs0001", ".x.y"):
        (d / name).write_bytes(b"someone's")
    assert registry(store, tmp_path).tidy_saved() == []
    assert all((d / name).exists() for name in (".DS_Store", ".nfs0001", ".x.y"))


def test_an_index_whose_changes_fail_leaves_no_snapshot_holding_what_they_deleted(store, tmp_path, monkeypatch):
    """Erasure: the index unloaded after its change-log rows failed kept its snapshot on disk, and no
    round rewrites the snapshot of an index that is not loaded: a face deleted by those rows stayed
    in a graph file until the collection was next searched."""
    cid, faces, a = snapshotted(store, tmp_path, 10)
    since = store.last_change_seq()
    gone = next(iter(faces))
    held = stored_vectors(a.get(cid), [gone])[gone]
    store.delete_face(cid, gone)  # on another replica

    def broken(*args, **kw):
        raise RuntimeError("a fault of the index")

    monkeypatch.setattr(a.get(cid), "apply", broken)
    a.apply_changes(store.changes_after(since, 10))
    assert cid not in a.loaded()
    d = tmp_path / "index-a"
    assert not any(held in p.read_bytes() for p in d.glob(f"{cid}.*"))
    monkeypatch.undo()
    assert len(a.get(cid)) == 9 and a.get(cid).loaded_from == "database"


def test_a_snapshot_that_fails_in_an_unexpected_way_holds_back_no_other(store, tmp_path):
    """A snapshot failing with anything but OSError or an outage ended the round, whose marks were
    already taken: the other changed collections were not written until the refresh, days later."""
    first, _, a = snapshotted(store, tmp_path, 3)
    second, _, _ = snapshotted(store, tmp_path, 3)
    a.get(second)
    for cid in (first, second):
        enrol(store, cid, 1, seed=7)
        a.apply_changes(store.changes_after(store.last_change_seq() - 1, 10))
    save = a.engine.save

    def broken_for_first(collection, index, meta):
        if collection == first:
            raise ValueError("graph and label map disagree")
        save(collection, index, meta)

    a.engine.save = broken_for_first
    assert a.write_snapshots(store.last_change_seq()) == 1
    a.engine.save = save
    assert a.write_snapshots(store.last_change_seq()) == 1  # the failed one was marked to be written again
