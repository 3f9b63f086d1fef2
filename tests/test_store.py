"""The face store on both real backends: SQLite file and MySQL (MariaDB), same tests."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import threading
import time
import uuid

import grpc
import numpy as np
import pytest

from server import errors
from server.records import DUPLICATE_REJECT, DUPLICATE_WARN, LIVENESS_REQUIRED, NewFace, Thresholds
from server.storage.sql import SqlFaceStore, open_store
from server.storage.sql.dialects import dialect_for
from tests.conftest import race


@pytest.fixture
def store(db_url, tmp_path):
    s = open_store(db_url, str(tmp_path))
    yield s
    s.close()


def coll(store) -> str:
    cid = "c-" + uuid.uuid4().hex[:10]
    store.create_collection(cid, "test", LIVENESS_REQUIRED)
    return cid


def face(seed: int, crop: bytes | None = None) -> NewFace:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(512).astype(np.float32)
    return NewFace(face_id=uuid.uuid4().hex, model_id="w600k_mbf", embedding=v / np.linalg.norm(v), quality=0.9, crop=crop)


def reason(exc_info) -> str:
    return exc_info.value.reason


def test_migrate_is_idempotent_and_refuses_a_newer_schema(store):
    assert store.migrate() == len(store.d.schema)
    assert store.migrate() == len(store.d.schema)
    with store._tx() as q:
        q("INSERT INTO schema_version (version, applied_ms) VALUES (?, ?)", 999, 0)
    try:
        with pytest.raises(RuntimeError, match="newer than this server"):
            store.migrate()
    finally:
        with store._tx() as q:
            q("DELETE FROM schema_version WHERE version = ?", 999)


@pytest.fixture
def empty_db_url(db_url, tmp_path):
    """A database with no tables yet: a new SQLite file, or a scratch MySQL database dropped afterwards."""
    if db_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path}/upgrade.db"
        return
    import pymysql

    params = dialect_for(db_url, "").params
    name = params["database"] + "_up"
    conn = pymysql.connect(**{**params, "database": None}, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    yield db_url.rsplit("/", 1)[0] + "/" + name
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def test_a_version_2_database_upgrades_with_its_collections(empty_db_url, tmp_path):
    """A database of the previous release (schema 2) gains the collection settings, with the defaults."""
    old = SqlFaceStore(dialect_for(empty_db_url, str(tmp_path)))
    old.d.schema = old.d.schema[:2]  # what the previous release created
    try:
        assert old.migrate() == 2
        with old._tx() as q:
            q(
                "INSERT INTO collections (collection_id, display_name, liveness_policy, created_ms) VALUES ('v2', '', 'required', 1)"
            )
    finally:
        old.close()
    new = open_store(empty_db_url, str(tmp_path))
    try:
        got = new.get_collection("v2")
        assert (got.duplicate_policy, got.thresholds, got.liveness_policy) == (DUPLICATE_REJECT, Thresholds(), "required")
        changed = new.update_collection("v2", {"duplicate_policy": DUPLICATE_WARN, "thresholds.search": 0.5})
        assert changed.duplicate_policy == DUPLICATE_WARN and changed.thresholds == Thresholds(0.0, 0.5, 0.0)
        assert new.get_collection_settings("v2").thresholds.search == 0.5
    finally:
        new.close()


def test_a_migration_cut_short_is_finished_by_the_next_start(empty_db_url, tmp_path):
    """A step that failed (or was killed) halfway left some of its columns behind without its version
    row, and every later start failed on "duplicate column". SQLite now runs a step in one
    transaction; MySQL commits each DDL statement by itself, and the next start passes over what the
    cut-short step put in place."""
    url = empty_db_url
    old = SqlFaceStore(dialect_for(url, str(tmp_path)))
    full = old.d.schema
    old.d.schema = full[:2]
    assert old.migrate() == 2
    old.d.schema = [*full[:2], [*full[2], "THIS IS NOT SQL"], *full[3:]]  # step 3 fails after its statements
    if url.startswith("mysql"):  # and, MySQL's DDL being committed statement by statement, leaves them behind
        old.d.schema[2] = [*full[2][:2], "THIS IS NOT SQL"]
    try:
        with pytest.raises(RuntimeError, match="to version 3 failed"):
            old.migrate()
        with old._tx() as q:
            assert q("SELECT MAX(version) FROM schema_version").fetchone()[0] == 2
    finally:
        old.close()
    new = open_store(url, str(tmp_path))  # the next start redoes step 3 whole, and the rest
    try:
        assert new.migrate() == len(full)
        new.create_collection("after", "", LIVENESS_REQUIRED)
        assert new.get_collection("after").duplicate_policy == DUPLICATE_REJECT
        if url.startswith("mysql"):  # and the statement after the cut ran too
            with new._tx() as q:
                assert q("SHOW INDEX FROM faces WHERE Key_name = 'faces_by_age'").fetchone() is not None
    finally:
        new.close()


def test_a_first_migration_cut_short_is_finished_by_the_next_start(empty_db_url, tmp_path):
    """A kill during the first step on a new database left MySQL with some of its tables and no
    version row, and every later start refused them as someone else's ("Table 'collections' already
    exists"). The step's begun marker tells the next start they are its own."""
    old = SqlFaceStore(dialect_for(empty_db_url, str(tmp_path)))
    full = old.d.schema
    old.d.schema = [[*full[0][:1], "THIS IS NOT SQL"], *full[1:]]  # cut short after its first table
    try:
        with pytest.raises(RuntimeError, match="to version 1 failed"):
            old.migrate()
    finally:
        old.close()
    new = open_store(empty_db_url, str(tmp_path))
    try:
        assert new.migrate() == len(full)
        new.create_collection("after", "", LIVENESS_REQUIRED)
        with new._tx() as q:
            assert [r[0] for r in q("SELECT version FROM schema_version ORDER BY version").fetchall()] == list(
                range(1, len(full) + 1)
            )
            assert q("SELECT COUNT(*) FROM schema_begun").fetchone()[0] == 0  # every step's marker went with its version
    finally:
        new.close()


def test_a_table_of_the_same_name_stops_a_first_migration(empty_db_url, tmp_path):
    """Passing over what is in place is for a step cut short only: a table of ours that someone else
    already has in the database stops the migration, at every start, before anything is made. The
    steps before the one that made it ran, and the next start, taking its first step for one cut
    short, passed over the table as its own and came up serving on it."""
    for _ in range(2):
        other = SqlFaceStore(dialect_for(empty_db_url, str(tmp_path)))
        try:
            with other.pool.connection() as conn:
                other.d.execute(conn, "CREATE TABLE IF NOT EXISTS audit_log (x INT)")  # step 3 makes one
                if not empty_db_url.startswith("mysql"):
                    conn.commit()
            with pytest.raises(RuntimeError, match="already holds a table 'audit_log' that facesvc did not make"):
                other.migrate()
            with other.pool.connection() as conn:
                assert not other.d.table_exists(conn, "collections")
        finally:
            other.close()


def test_a_table_of_the_same_name_stops_every_start_on_a_new_database(empty_db_url, tmp_path):
    """Someone else's table met by the first step is named, at the first start and at every one after
    it, and nothing is made beside it: the step made its first tables before it met the third, every
    later start was refused naming one of ours, and a start killed after the step's begun marker
    let the next take the other's table for one of its own (and come up serving on it)."""
    for _ in range(2):
        other = SqlFaceStore(dialect_for(empty_db_url, str(tmp_path)))
        try:
            with other.pool.connection() as conn:
                other.d.execute(
                    conn,
                    "CREATE TABLE IF NOT EXISTS faces (face_id VARCHAR(64) PRIMARY KEY) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                    if empty_db_url.startswith("mysql")
                    else "CREATE TABLE IF NOT EXISTS faces (face_id TEXT PRIMARY KEY)",
                )  # step 1 makes one, after two others
                if not empty_db_url.startswith("mysql"):
                    conn.commit()
            with pytest.raises(RuntimeError, match="already holds a table 'faces' that facesvc did not make"):
                other.migrate()
            with other.pool.connection() as conn:
                assert not other.d.table_exists(conn, "collections") and not other.d.table_exists(conn, "subjects")
                assert other.d.execute(conn, "SELECT COUNT(*) FROM schema_begun").fetchone()[0] == 0
        finally:
            other.close()


def test_collections(store):
    cid = coll(store)
    with pytest.raises(errors.FaceServiceError) as e:
        store.create_collection(cid, "again", LIVENESS_REQUIRED)
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and reason(e) == errors.COLLECTION_EXISTS
    got = store.get_collection(cid)
    assert (got.collection_id, got.display_name, got.subject_count) == (cid, "test", 0)
    assert cid in [c.collection_id for c in store.list_collections("", 1000)]
    store.add_face(cid, "alice", face(1), allow_existing=False, max_faces=5)
    store.create_api_key(uuid.uuid4().hex[:16], cid, uuid.uuid4().hex * 2, "k")
    assert store.delete_collection(cid) == (1, 1)
    with pytest.raises(errors.FaceServiceError) as e:
        store.get_collection(cid)
    assert reason(e) == errors.COLLECTION_NOT_FOUND
    with store._tx() as q:  # the cascade left nothing behind
        for table in ("subjects", "faces", "api_keys"):
            assert q(f"SELECT COUNT(*) FROM {table} WHERE collection_id = ?", cid).fetchone()[0] == 0


def test_add_face_rules(store):
    cid = coll(store)
    f1 = face(1)
    rec, created, subject = store.add_face(cid, "alice", f1, allow_existing=False, max_faces=2, metadata={"dept": "r&d"})
    assert created and rec.face_id == f1.face_id
    # the subject as the commit left it, read in the commit's own transaction: no read after it,
    # which a database lost just after the commit would turn into "nothing was written"
    assert (subject.subject_id, subject.face_count, subject.metadata) == ("alice", 1, {"dept": "r&d"})

    def lost(*args, **kwargs):
        raise errors.unavailable(errors.STORE_UNAVAILABLE, "the database is unavailable; retry")

    read_back, store.get_subject = store.get_subject, lost
    try:
        _, _, bob = store.add_face(cid, "bob", face(7), allow_existing=False, max_faces=2)
    finally:
        store.get_subject = read_back
    assert bob.face_count == 1
    with pytest.raises(errors.FaceServiceError) as e:
        store.add_face(cid, "alice", face(2), allow_existing=False, max_faces=2)
    assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and reason(e) == errors.ALREADY_REGISTERED
    _, created, subject = store.add_face(cid, "alice", face(3), allow_existing=True, max_faces=2, metadata={"site": "b"})
    assert not created and subject.face_count == 2 and subject.metadata == {"dept": "r&d", "site": "b"}
    with pytest.raises(errors.FaceServiceError) as e:
        store.add_face(cid, "alice", face(4), allow_existing=True, max_faces=2)
    assert reason(e) == errors.FACE_LIMIT_REACHED
    # the same face id again (a retried Register) is idempotent: no new row
    again, created, _ = store.add_face(cid, "alice", f1, allow_existing=False, max_faces=2)
    assert again.face_id == f1.face_id and not created
    subj = store.get_subject(cid, "alice", with_embeddings=True)
    assert subj.metadata == {"dept": "r&d", "site": "b"}
    assert len(subj.faces) == 2
    np.testing.assert_array_equal(subj.faces[0].embedding, f1.embedding)  # stored bit-exact
    assert subj.faces[0].model_id == "w600k_mbf"


def test_ids_are_case_sensitive_on_both_backends(store):
    cid = coll(store)
    store.add_face(cid, "Alice", face(1), allow_existing=False, max_faces=5)
    store.add_face(cid, "alice", face(2), allow_existing=False, max_faces=5)
    assert [s.subject_id for s in store.list_subjects(cid, "", 10)] == ["Alice", "alice"]


def test_unknown_subject_and_face(store):
    cid = coll(store)
    assert store.subject_face_count(cid, "nobody") is None
    for call in (
        lambda: store.get_subject(cid, "nobody"),
        lambda: store.delete_subject(cid, "nobody"),
        lambda: store.update_subject_metadata(cid, "nobody", {}),
    ):
        with pytest.raises(errors.FaceServiceError) as e:
            call()
        assert e.value.code == grpc.StatusCode.NOT_FOUND and reason(e) == errors.SUBJECT_NOT_FOUND
    with pytest.raises(errors.FaceServiceError) as e:
        store.delete_face(cid, "f" * 32)
    assert reason(e) == errors.FACE_NOT_FOUND
    with pytest.raises(errors.FaceServiceError) as e:
        store.subject_face_count("no-such-collection", "x")
    assert reason(e) == errors.COLLECTION_NOT_FOUND


def test_delete_subject_removes_its_faces(store):
    cid = coll(store)
    for i in range(3):
        store.add_face(cid, "bob", face(i), allow_existing=True, max_faces=5)
    store.add_face(cid, "carol", face(9), allow_existing=False, max_faces=5)
    assert len(store.delete_subject(cid, "bob")) == 3
    with store._tx() as q:
        assert q("SELECT COUNT(*) FROM faces WHERE collection_id = ? AND subject_id = ?", cid, "bob").fetchone()[0] == 0
    assert store.subject_face_count(cid, "carol") == 1


def test_delete_face_keeps_the_subject(store):
    cid = coll(store)
    a, _, _ = store.add_face(cid, "dan", face(1), allow_existing=True, max_faces=5)
    store.add_face(cid, "dan", face(2), allow_existing=True, max_faces=5)
    assert store.delete_face(cid, a.face_id).subject_id == "dan"
    assert store.subject_face_count(cid, "dan") == 1
    with pytest.raises(errors.FaceServiceError):  # not visible through another collection
        store.delete_face(coll(store), store.get_subject(cid, "dan").faces[0].face_id)


def test_list_subjects_pages_with_keyset(store):
    cid = coll(store)
    ids = [f"s{i:03d}" for i in range(25)]
    for i, sid in enumerate(ids):
        store.add_face(cid, sid, face(i), allow_existing=False, max_faces=5)
    seen, after = [], ""
    while True:
        page = store.list_subjects(cid, after, 10)
        if not page:
            break
        seen += [s.subject_id for s in page]
        after = page[-1].subject_id
    assert seen == ids
    assert all(s.face_count == 1 for s in store.list_subjects(cid, "", 100))


def test_concurrent_first_registrations_exactly_one_wins(store):
    cid = coll(store)
    calls = [lambda i=i: store.add_face(cid, "eve", face(100 + i), allow_existing=False, max_faces=5) for i in range(8)]
    outcomes = [e.reason if e else "ok" for e in race(calls)]
    assert sorted(outcomes) == ["ALREADY_REGISTERED"] * 7 + ["ok"], outcomes
    with store._tx() as q:
        assert q("SELECT COUNT(*) FROM faces WHERE collection_id = ?", cid).fetchone()[0] == 1
        assert q("SELECT COUNT(*) FROM subjects WHERE collection_id = ?", cid).fetchone()[0] == 1


def test_concurrent_add_faces_respect_the_limit(store):
    cid = coll(store)
    store.add_face(cid, "fay", face(0), allow_existing=True, max_faces=3)
    calls = [lambda i=i: store.add_face(cid, "fay", face(200 + i), allow_existing=True, max_faces=3) for i in range(6)]
    outcomes = [e.reason if e else "ok" for e in race(calls)]
    assert sorted(outcomes) == ["FACE_LIMIT_REACHED"] * 4 + ["ok"] * 2, outcomes
    assert store.subject_face_count(cid, "fay") == 3


_TRIGGER = {
    "sqlite": "CREATE TRIGGER facesvc_test_fail BEFORE INSERT ON faces WHEN NEW.subject_id = 'doomed' "
    "BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
    "mysql": "CREATE TRIGGER facesvc_test_fail BEFORE INSERT ON faces FOR EACH ROW BEGIN "
    "IF NEW.subject_id = 'doomed' THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'; END IF; END",
}


def test_a_failed_face_write_leaves_nothing_half_written(store):
    """The face insert fails inside the database (a trigger): the subject row created in the same
    transaction must not survive."""
    cid = coll(store)
    with store._tx() as q:
        q(_TRIGGER[store.backend])
    try:
        with pytest.raises(Exception) as e:
            store.add_face(cid, "doomed", face(1), allow_existing=False, max_faces=5)
        assert "injected failure" in str(e.value)
        assert store.subject_face_count(cid, "doomed") is None
    finally:
        with store._tx() as q:
            q("DROP TRIGGER facesvc_test_fail")
    store.add_face(cid, "doomed", face(1), allow_existing=False, max_faces=5)
    assert store.subject_face_count(cid, "doomed") == 1


def test_a_face_added_while_its_subject_is_deleted_goes_logged(store):
    """On MySQL the delete read the subject's faces before taking the subject's lock: a face whose
    add held that lock committed in between, and the cascade removed it without a change-log row,
    so every index that had applied the add kept it (a ghost that Search still returned). The face
    insert is slowed in the database (a trigger) to hold the add's lock while the delete arrives."""
    cid = coll(store)
    first, second = face(1), face(2)
    store.add_face(cid, "alice", first, allow_existing=False, max_faces=5)
    if store.backend == "mysql":
        with store._tx() as q:
            q(
                "CREATE TRIGGER facesvc_test_slow BEFORE INSERT ON faces FOR EACH ROW BEGIN "
                f"IF NEW.collection_id = '{cid}' THEN DO SLEEP(1); END IF; END"
            )
    try:
        deleted: list[str] = []

        def delete():
            time.sleep(0.3)  # the add holds the subject's lock by now
            deleted.extend(store.delete_subject(cid, "alice"))

        remover = threading.Thread(target=delete)
        remover.start()
        store.add_face(cid, "alice", second, allow_existing=True, max_faces=5)
        remover.join()
    finally:
        if store.backend == "mysql":
            with store._tx() as q:
                q("DROP TRIGGER facesvc_test_slow")
    assert sorted(deleted) == sorted([first.face_id, second.face_id])
    with store._tx() as q:
        assert q("SELECT COUNT(*) FROM faces WHERE collection_id = ?", cid).fetchone()[0] == 0
        logged = {r[0] for r in q("SELECT face_id FROM face_changes WHERE collection_id = ? AND op = 'delete'", cid).fetchall()}
    assert logged == {first.face_id, second.face_id}


def test_two_commits_of_one_face_at_the_subjects_limit_both_answer_the_face(store):
    """A Register retried on another replica while the first is still committing: the second read
    "no such face" before the first committed, then waited for the subject's lock and counted the
    first's face against the limit (FACE_LIMIT_REACHED for a face that is registered). The face
    insert is slowed in the database so the second arrives while the first holds the lock."""
    cid = coll(store)
    store.add_face(cid, "bea", face(1), allow_existing=True, max_faces=2)
    again = face(2)
    if store.backend == "mysql":
        with store._tx() as q:
            q(
                "CREATE TRIGGER facesvc_test_slow BEFORE INSERT ON faces FOR EACH ROW BEGIN "
                f"IF NEW.collection_id = '{cid}' THEN DO SLEEP(1); END IF; END"
            )
    try:
        calls = [lambda: store.add_face(cid, "bea", again, allow_existing=True, max_faces=2)] * 2
        assert race(calls) == [None, None]
    finally:
        if store.backend == "mysql":
            with store._tx() as q:
                q("DROP TRIGGER facesvc_test_slow")
    assert store.subject_face_count(cid, "bea") == 2


def test_a_first_registration_racing_the_deletion_of_its_collection_is_not_found(mysql_url, tmp_path):
    """MySQL: the collection was there when the Register began and gone by its subject's insert: the
    foreign key refused it and the caller got INTERNAL. (SQLite serialises the two.)"""
    store = open_store(mysql_url, str(tmp_path))
    cid = coll(store)
    with store._tx() as q:
        q(
            "CREATE TRIGGER facesvc_test_slow BEFORE INSERT ON subjects FOR EACH ROW BEGIN "
            f"IF NEW.collection_id = '{cid}' THEN DO SLEEP(1); END IF; END"
        )
    try:

        def delete():
            time.sleep(0.3)
            store.delete_collection(cid)

        remover = threading.Thread(target=delete)
        remover.start()
        with pytest.raises(errors.FaceServiceError) as e:
            store.add_face(cid, "bob", face(1), allow_existing=False, max_faces=5)
        remover.join()
        assert (e.value.code, e.value.reason) == (grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND")
    finally:
        with store._tx() as q:
            q("DROP TRIGGER facesvc_test_slow")
        store.close()


def test_deleting_a_face_and_its_subject_at_once_both_answer(mysql_url, tmp_path):
    """MySQL: DeleteFace locked the face, then the subject; DeleteSubject the subject, then its faces. At
    once they deadlocked, and the one MySQL chose failed STORE_UNAVAILABLE. The face delete is slowed
    in the database (a trigger) to hold its lock while the subject's delete arrives."""
    store = open_store(mysql_url, str(tmp_path))
    cid = coll(store)
    kept, gone = face(1), face(2)
    store.add_face(cid, "cy", kept, allow_existing=True, max_faces=5)
    store.add_face(cid, "cy", gone, allow_existing=True, max_faces=5)
    with store._tx() as q:
        q(
            "CREATE TRIGGER facesvc_test_slow BEFORE DELETE ON faces FOR EACH ROW BEGIN "
            f"IF OLD.collection_id = '{cid}' THEN DO SLEEP(1); END IF; END"
        )
    try:
        outcomes = race(
            [lambda: store.delete_face(cid, gone.face_id), lambda: (time.sleep(0.3), store.delete_subject(cid, "cy"))]
        )
    finally:
        with store._tx() as q:
            q("DROP TRIGGER facesvc_test_slow")
        store.close()
    assert outcomes == [None, None], outcomes


def test_metadata_update_replaces(store):
    cid = coll(store)
    store.add_face(cid, "gil", face(1), allow_existing=False, max_faces=5, metadata={"a": "1", "b": "2"})
    assert store.update_subject_metadata(cid, "gil", {"c": "3"}).metadata == {"c": "3"}
    assert store.update_subject_metadata(cid, "gil", {"c": "3"}).metadata == {"c": "3"}  # unchanged is not "not found"


def test_merged_metadata_keeps_the_entry_limit(store):
    """add_face merges metadata into the subject's: 16 + 16 new entries must not make 32 (nor overflow MySQL's column)."""
    cid = coll(store)
    first = {f"a{i}": "v" * 256 for i in range(16)}
    store.add_face(cid, "max", face(1), allow_existing=False, max_faces=5, metadata=first)
    with pytest.raises(errors.FaceServiceError) as e:
        store.add_face(cid, "max", face(2), allow_existing=True, max_faces=5, metadata={f"b{i}": "w" * 256 for i in range(16)})
    assert reason(e) == "VALIDATION_FAILED"
    subject = store.get_subject(cid, "max")
    assert subject.metadata == first and subject.face_count == 1  # nothing half-written
    updated = {**{k: "x" for k in list(first)[:8]}}
    store.add_face(cid, "max", face(3), allow_existing=True, max_faces=5, metadata=updated)  # overwriting keys is fine
    assert len(store.get_subject(cid, "max").metadata) == 16


def test_api_keys(store):
    cid = coll(store)
    k = store.create_api_key("k1" + uuid.uuid4().hex[:8], cid, "ab" * 32, "camera gate 3")
    assert store.find_api_key("ab" * 32).collection_id == cid
    assert store.find_api_key("cd" * 32) is None
    assert [x.key_id for x in store.list_api_keys(cid)] == [k.key_id]
    store.delete_api_key(cid, k.key_id)
    assert store.find_api_key("ab" * 32) is None
    with pytest.raises(errors.FaceServiceError) as e:
        store.delete_api_key(cid, k.key_id)
    assert reason(e) == errors.API_KEY_NOT_FOUND


def test_database_urls(tmp_path):
    assert dialect_for("", str(tmp_path)).path == str(tmp_path / "facesvc.db")
    assert dialect_for("sqlite:///data/x.db", "").path == "data/x.db"
    assert dialect_for("sqlite:////abs/x.db", "").path == "/abs/x.db"
    d = dialect_for("mysql://u:p%40ss@db.example:3307/faces", "")
    assert d.params == dict(host="db.example", port=3307, user="u", password="p@ss", database="faces")
    assert "p@ss" not in d.describe()
    for bad in ("postgres://x/y", "mysql://h:3306", "sqlite://"):
        with pytest.raises(ValueError):
            dialect_for(bad, "")


def test_unreachable_mysql_is_unavailable_not_a_crash(tmp_path):
    # port 9 (discard) is closed: the connection is refused at once
    with pytest.raises(RuntimeError, match="cannot reach the database"):
        open_store("mysql://root@127.0.0.1:9/none", str(tmp_path))


def test_audit_events_are_listed_newest_first_by_collection_and_pruned_by_age(store):
    from server.records import AuditEvent

    a, b = coll(store), coll(store)
    store.append_audit(
        [
            AuditEvent("admin", "Register", a, "s1", "", "OK", 1_000),
            AuditEvent("k1", "Verify", a, "s1", "", "OK", 2_000),
            AuditEvent("k2", "Search", b, "", "", "FAILED_PRECONDITION SPOOF_DETECTED", 3_000),
            AuditEvent("admin", "DeleteFace", a, "s2", "f" * 32, "OK", 10**13),
        ]
    )
    mine = store.list_audit(0, 10, a)
    assert [(e.action, e.subject_id) for e in mine] == [("DeleteFace", "s2"), ("Verify", "s1"), ("Register", "s1")]
    assert [e.action for e in store.list_audit(mine[0].seq, 10, a)] == ["Verify", "Register"]  # the next page
    assert [e.action for e in store.list_audit(0, 10, a, "s1")] == ["Verify", "Register"]
    assert [e.outcome for e in store.list_audit(0, 10, b)] == ["FAILED_PRECONDITION SPOOF_DETECTED"]
    assert store.prune_audit(5_000) >= 3
    assert [e.action for e in store.list_audit(0, 10, a)] == ["DeleteFace"] and not store.list_audit(0, 10, b)


def test_pruning_by_age_goes_a_batch_per_transaction_and_stops_at_the_age(store):
    """One DELETE of a large backlog could outlast MySQL's read timeout and fail every hour after."""
    from server.records import AuditEvent

    a = coll(store)
    store.prune_audit(10**12)  # other tests' events
    store.append_audit(
        [AuditEvent("k", "Verify", a, "s", "", "OK", 1_000 + i // 2) for i in range(11)]
        + [AuditEvent("k", "Search", a, "", "", "OK", 10**13)]
    )
    store.PRUNE_BATCH = 3
    assert store.prune_audit(10**12) == 11
    assert [e.action for e in store.list_audit(0, 20, a)] == ["Search"]


def test_a_mysql_lock_wait_ends_before_the_connections_read_timeout(mysql_url, tmp_path):
    """Past the read timeout a lock wait ended as a lost connection (not retried, STORE_UNAVAILABLE);
    the server's default wait (50 s) is longer than the read timeout (30 s). (SQLite waits on its
    busy timeout.)"""
    store = open_store(mysql_url, str(tmp_path))
    try:
        with store._tx() as q:
            wait = q("SELECT @@SESSION.innodb_lock_wait_timeout").fetchone()[0]
    finally:
        store.close()
    assert wait == store.d.LOCK_WAIT_S < store.d.READ_TIMEOUT_S


def test_an_audited_request_with_overlong_ids_neither_is_lost_nor_holds_back_other_events(store):
    """A refused call is audited with what it named: a 200-character subject id (a VARCHAR(128) in
    MySQL) is recorded cut to fit. An event the database refuses anyway is dropped alone: before,
    the whole buffer was retried with it every second and no event was written again."""
    from server.domain.audit import AuditLog
    from server.records import AuditEvent

    a = coll(store)
    audit = AuditLog(store)
    audit.record("k1", "GetSubject", a, "x" * 200, "f" * 40, "INVALID_ARGUMENT VALIDATION_FAILED")
    audit.record("k2", "Verify", a, "s1", "", "OK")
    assert audit.flush() == 2
    got = store.list_audit(0, 10, a)
    assert [(e.action, e.subject_id, e.face_id) for e in got] == [("Verify", "s1", ""), ("GetSubject", "x" * 128, "f" * 32)]
    # an event that did not come through record() and that MySQL's columns cannot hold
    bad = AuditEvent("k1", "GetSubject", a, "y" * 300, "", "OK", 1)
    if store.d.name == "mysql":
        audit._buffer.append(bad)
        audit.record("k3", "Search", a, "s2", "", "OK")
        assert audit.flush() == 1  # the good one is written, the bad one dropped
        assert [e.action for e in store.list_audit(0, 10, a)][:1] == ["Search"]
        assert not audit._buffer and audit.flush() == 0


class RefusingAuditStore:
    """An audit store that refuses, as a database does, a batch holding an event it cannot take
    (`refuses(event)`), and writes the rest; `down` makes every write fail as a full disk does."""

    def __init__(self, refuses):
        self.refuses, self.rows, self.down = refuses, [], False

    def append_audit(self, events):
        if self.down or any(self.refuses(e) for e in events):
            raise sqlite3.OperationalError("database or disk is full" if self.down else "value too long")
        self.rows.extend(events)


def test_the_audit_log_drops_only_what_the_database_refuses_and_keeps_the_rest_through_a_failure():
    """An event the database cannot take is dropped once a later one is written (it is the event,
    not the store), so it does not hold back every event behind it; when the database refuses
    everything for a reason that is not an outage (a full disk, a read-only failover), the events
    are kept for the next try, not dropped one by one."""
    from server.domain.audit import AuditLog

    store = RefusingAuditStore(lambda e: e.subject_id == "bad")
    audit = AuditLog(store)
    audit.record("k", "GetSubject", "c", "bad", "", "OK")
    for i in range(4):
        audit.record("k", "Verify", "c", f"s{i}", "", "OK")
    assert audit.flush() == 4 and [e.subject_id for e in store.rows] == ["s0", "s1", "s2", "s3"]
    assert not audit._buffer
    store.down = True
    for i in range(10):
        audit.record("k", "Verify", "c", f"t{i}", "", "OK")
    assert audit.flush() == 0 and len(audit._buffer) == 10  # kept, not dropped
    store.down = False
    assert audit.flush() == 10 and not audit._buffer


def test_faces_past_a_retention_are_found_oldest_first(store):
    cid = coll(store)
    store.update_collection(cid, {"retention_days": 7})
    assert cid in [c.collection_id for c in store.collections_with_retention()]
    faces = [store.add_face(cid, f"s{i}", face(i), allow_existing=False, max_faces=5)[0] for i in range(3)]
    with store._tx() as q:
        for age, f in zip((3, 2), faces):
            q("UPDATE faces SET created_ms = ? WHERE face_id = ?", age, f.face_id)
    assert [f.face_id for f in store.faces_created_before(cid, 10, 10)] == [faces[1].face_id, faces[0].face_id]
    assert store.faces_created_before(cid, 10, 1)[0].face_id == faces[1].face_id


def test_an_answer_of_the_stores_own_keeps_its_connection_and_a_driver_error_does_not(store, monkeypatch):
    """Every error a transaction ended in closed its connection, also NOT_FOUND and the like, already
    rolled back: on MySQL each "no such subject" cost the next call a connect and a login. A
    connection goes back to the pool after such an answer; after a driver's error it is closed."""
    cid = coll(store)
    store.add_face(cid, "s1", face(1), allow_existing=False, max_faces=10)
    connects, connect = [], store.d.connect
    monkeypatch.setattr(store.d, "connect", lambda *wait: connects.append(1) or connect(*wait))
    store.get_collection(cid)  # one connection at hand
    connects.clear()
    for _ in range(20):
        with pytest.raises(errors.FaceServiceError) as e:
            store.get_subject(cid, "nobody")
        assert reason(e) == errors.SUBJECT_NOT_FOUND
        with pytest.raises(errors.FaceServiceError) as e:  # an add that loses to the subject's face limit
            store.add_face(cid, "s1", face(2), allow_existing=True, max_faces=1)
    assert connects == [] and store.get_subject(cid, "s1").subject_id == "s1"
    with pytest.raises(Exception):  # noqa: B017 - the driver's own error, whatever its class
        with store._tx(write=False) as q:
            q("SELECT no_such_column FROM faces")
    store.get_collection(cid)
    assert connects == [1]


def test_a_lock_wait_that_outlasts_its_caller_ends_in_time_on_both_ends_and_stops_no_one_else(mysql_url, tmp_path):
    """A statement waits no longer than the call it serves (a hung database held each call for the
    30 s read timeout), and the server ends its lock wait before that (none is left waiting on the
    server, its own locks held, after the caller has gone). A lock wait cut short that way is not a
    database that stopped answering: the probe after the timeout gets its answer, and the calls after
    it go on."""
    import pymysql

    from server import context

    store = open_store(mysql_url, str(tmp_path))
    cid = coll(store)
    store.add_face(cid, "s1", face(1), allow_existing=False, max_faces=10)
    p = store.d.params
    other = pymysql.connect(**p)
    try:
        other.begin()
        other.cursor().execute(
            "SELECT metadata FROM subjects WHERE collection_id = %s AND subject_id = %s FOR UPDATE", (cid, "s1")
        )

        class Call:  # the part of a servicer context the store reads: a call with 1.5 s left
            end = time.monotonic() + 1.5

            def time_remaining(self):
                return self.end - time.monotonic()

        token = context.current_call.set(Call())
        try:
            t0 = time.monotonic()
            with pytest.raises(errors.FaceServiceError) as e:
                store.add_face(cid, "s1", face(2), allow_existing=True, max_faces=10)
            assert reason(e) == errors.STORE_UNAVAILABLE and time.monotonic() - t0 < 1.5
        finally:
            context.current_call.reset(token)
        # the server ended the wait itself, before the call gave up on it: a session whose statement
        # was cut short on our side went on waiting for the lock on the server, its transaction's
        # locks held, until the lock came free (on MariaDB), however long
        waiting = "SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT' AND trx_mysql_thread_id <> %s"
        watcher = pymysql.connect(**p)
        try:
            cur = watcher.cursor()
            time.sleep(0.5)
            cur.execute(waiting, (other.thread_id(),))
            assert cur.fetchone()[0] == 0
        finally:
            watcher.close()
        deadline = time.monotonic() + 10
        while store.responsive._asking and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not store.responsive._asking and store.responsive._down_until is None
        other.rollback()
        assert len(store.add_face(cid, "s1", face(3), allow_existing=True, max_faces=10)[2].faces) == 2
    finally:
        other.close()
        store.close()


def test_audit_events_recorded_into_a_full_buffer_during_a_flush_are_not_lost(store, monkeypatch):
    """With the buffer full (after an outage), events recorded while a flush was writing pushed the
    batch's first events off the buffer's front; the flush then took as many again off the front,
    and those were the new events, never written, while the log counted the written ones as dropped."""
    from server.domain import audit as audit_module

    monkeypatch.setattr(audit_module, "MAX_BUFFER", 10)
    a = coll(store)
    log = audit_module.AuditLog(store)
    for i in range(10):
        log.record("k1", "Verify", a, f"old{i}", "", "OK")
    append = store.append_audit

    def while_writing(events):
        if len(events) == 10:  # the flush's batch: three calls end meanwhile
            for i in range(3):
                log.record("k1", "DeleteFace", a, f"new{i}", "", "OK")
        append(events)

    monkeypatch.setattr(store, "append_audit", while_writing)
    assert log.flush() == 10 and log._dropped == 0
    assert log.flush() == 3
    got = [e.subject_id for e in store.list_audit(0, 100, a)]
    assert sorted(got) == sorted([f"old{i}" for i in range(10)] + [f"new{i}" for i in range(3)])


def test_a_retention_sweep_records_the_deletions_it_made_and_no_others(store):
    """Every replica runs the retention job: a face another replica's job (or a call) deleted first
    was recorded again by each of the others, as NOT_FOUND under the key "retention"."""
    from server.domain.audit import AuditLog
    from server.domain.retention import RetentionJob

    cid = "c-" + uuid.uuid4().hex[:10]
    store.create_collection(cid, "test", LIVENESS_REQUIRED, retention_days=1)
    first, second = face(1), face(2)
    for f in (first, second):
        store.add_face(cid, "s1", f, allow_existing=True, max_faces=10)

    class Replica:  # the other replica's job deletes the first face between this one's read and its delete
        def delete_face(self, collection, face_id):
            if face_id == first.face_id:
                store.delete_face(collection, face_id)
            return store.delete_face(collection, face_id)

    audit = AuditLog(store)
    RetentionJob(store, Replica(), audit).sweep(now_ms=int(time.time() * 1000) + 2 * 86_400_000)  # (and other tests' collections)
    audit.flush()
    assert [(e.key_id, e.face_id, e.outcome) for e in store.list_audit(0, 10, cid)] == [("retention", second.face_id, "OK")]


class MySqlProxy:
    """A loopback TCP proxy to the test's MariaDB whose faults the test sets: `greeting_s` delays each
    new connection's first answer (reverse DNS, a slow TLS or proxy handshake); `frozen` stops every
    byte (a stopped server, a network dropping packets); `stall_open()` stops the connections open
    now and lets new ones through (a NAT's idle timeout dropping pooled connections)."""

    def __init__(self, mysql_url: str):
        from urllib.parse import urlsplit

        u = urlsplit(mysql_url)
        self.upstream, self.database = (u.hostname, u.port or 3306), u.path.strip("/")
        self.greeting_s, self.frozen = 0.0, threading.Event()
        self.opened, self.stalled = 0, set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"mysql://root@127.0.0.1:{self.listener.getsockname()[1]}/{self.database}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.opened += 1
            threading.Thread(target=self._pipe, args=(server, client, self.greeting_s, self.opened), daemon=True).start()
            threading.Thread(target=self._pipe, args=(client, server, 0.0, self.opened), daemon=True).start()

    def stall_open(self) -> None:
        self.stalled = set(range(1, self.opened + 1))

    def _pipe(self, src, dst, first_delay: float, number: int) -> None:
        try:
            while data := src.recv(65536):
                time.sleep(first_delay)
                first_delay = 0.0
                while self.frozen.is_set() or number in self.stalled:
                    time.sleep(0.02)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


class CallWithTimeLeft:  # the part of a servicer context the store reads
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def time_remaining(self) -> float:
        return self.end - time.monotonic()


def test_slow_new_connections_do_not_keep_the_store_refusing_calls(mysql_url, tmp_path):
    """The check after a statement timeout asked a NEW connection for SELECT 1 within 2 s: where new
    connections are slow but the database well (reverse DNS, say), one timeout refused every call
    from then on, each later check failing the same way. It asks an idle pooled connection first,
    and a refusing store lets one call through a second: the first that gets an answer ends it."""
    from server import context

    proxy = MySqlProxy(mysql_url)
    store = open_store(proxy.url, str(tmp_path))
    try:
        cid = coll(store)
        proxy.greeting_s = 2.5
        token = context.current_call.set(CallWithTimeLeft(1.5))
        try:
            with pytest.raises(errors.FaceServiceError) as e, store._tx(write=False) as q:
                q("SELECT SLEEP(3)")  # a slow statement: its connection is closed after the timeout
            assert reason(e) == errors.STORE_UNAVAILABLE
        finally:
            context.current_call.reset(token)
        deadline = time.monotonic() + 10
        while store.responsive._asking and time.monotonic() < deadline:
            time.sleep(0.05)
        # no idle connection was left to ask: the new one's greeting came too late, and calls are refused
        assert store.responsive._down_until is not None
        with pytest.raises(errors.FaceServiceError):
            store.get_collection(cid)
        time.sleep(store.responsive.RETRY_S)
        assert store.get_collection(cid).collection_id == cid  # the trial, on a slow new connection: answered
        assert store.responsive._down_until is None and store.get_collection(cid).collection_id == cid
        # with a connection idle in the pool, the check after a timeout asks it, and nothing is refused
        with store._tx(write=False) as q1, store._tx(write=False) as q2:  # two connections in the pool
            q1("SELECT 1"), q2("SELECT 1")
        token = context.current_call.set(CallWithTimeLeft(1.5))
        try:
            with pytest.raises(errors.FaceServiceError), store._tx(write=False) as q:
                q("SELECT SLEEP(3)")
        finally:
            context.current_call.reset(token)
        while store.responsive._asking and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        assert store.responsive._down_until is None
    finally:
        store.close()
        proxy.close()


def test_a_call_waiting_for_a_connection_spends_its_own_time_not_twice_it(mysql_url, tmp_path):
    """The wait for a free pooled connection came on top of the statement's own wait, both as long as
    the call's time left: behind a hung database, calls queued for the pool answered after twice their
    deadline, holding their worker threads all that time."""
    from server import context
    from server.storage.sql import SqlFaceStore
    from server.storage.sql.dialects import dialect_for

    proxy = MySqlProxy(mysql_url)
    store = SqlFaceStore(dialect_for(proxy.url, str(tmp_path)), pool_size=2)
    try:
        store.migrate()
        cid = coll(store)
        proxy.frozen.set()
        took = {}

        def call(i):
            token = context.current_call.set(CallWithTimeLeft(2.0))
            t0 = time.monotonic()
            with contextlib.suppress(errors.FaceServiceError):
                store.collection_created_ms(cid)
            took[i] = time.monotonic() - t0
            context.current_call.reset(token)

        callers = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for i, t in enumerate(callers):
            if i == 2:
                time.sleep(0.7)  # the two that come later find both connections taken
            t.start()
        for t in callers:
            t.join(20)
        assert len(took) == 4 and max(took.values()) < 2.0, took
    finally:
        proxy.frozen.clear()
        store.close()
        proxy.close()


def test_a_database_full_of_connections_is_one_that_answers(mysql_url, tmp_path, monkeypatch):
    """The check after a statement timeout counted any error of its new connection as silence: with
    MySQL at max_connections (another application's spike), error 1040 refused every call, though
    the pool's own connections worked. An error the server sends is an answer."""
    import pymysql

    store = open_store(mysql_url, str(tmp_path))
    try:

        def full(*args, **kw):
            raise pymysql.err.OperationalError(1040, "Too many connections")

        monkeypatch.setattr(store.d, "probe", full)
        assert store._answers(1.0)

        def silent(*args, **kw):
            raise pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query (timed out)")

        monkeypatch.setattr(store.d, "probe", silent)
        assert not store._answers(1.0)
    finally:
        store.close()


def test_a_trial_the_database_answers_with_an_error_of_its_own_ends_the_refusals(mysql_url, tmp_path):
    """A refusing store lets one transaction a second try the database. One that got BEGIN answered and
    then an error the server sent (a lock wait timeout, a deadlock) counted as silence: the refusals
    went on, and the retry of a deadlock was refused by them."""
    import pymysql

    store = open_store(mysql_url, str(tmp_path))
    other = pymysql.connect(**store.d.params)
    try:
        cid = coll(store)
        other.begin()
        other.cursor().execute("SELECT * FROM collections WHERE collection_id = %s FOR UPDATE", (cid,))
        store.responsive._down_until = time.monotonic() - 1  # refusing, and due to let a trial through
        with pytest.raises(errors.FaceServiceError) as e, store._tx() as q:
            q("SET SESSION innodb_lock_wait_timeout = 1")
            q("SELECT * FROM collections WHERE collection_id = ? FOR UPDATE", cid)
        assert reason(e) == errors.STORE_UNAVAILABLE  # error 1205, after a second
        assert store.responsive._down_until is None and not store.responsive._trial
    finally:
        other.rollback()
        other.close()
        store.close()


def test_a_commit_the_caller_has_no_time_left_for_is_rolled_back_not_left_in_doubt(mysql_url, tmp_path):
    """A commit sent after the call's deadline had only 50 ms to be answered: a commit slower than
    that was reported as "may have been made" (and its connection dropped) while it was made. With
    no time left the transaction is rolled back, and the caller learns that nothing was written."""
    from server import context

    store = open_store(mysql_url, str(tmp_path))
    try:
        cid = coll(store)
        token = context.current_call.set(CallWithTimeLeft(0.8))
        try:
            with pytest.raises(errors.FaceServiceError) as e, store._tx() as q:
                q("UPDATE collections SET display_name = ? WHERE collection_id = ?", "renamed", cid)
                time.sleep(0.8)  # the call's time runs out before the commit
        finally:
            context.current_call.reset(token)
        assert reason(e) == errors.CALL_ENDED and "nothing was written" in str(e.value)
        assert store.get_collection(cid).display_name == "test"
    finally:
        store.close()


def test_pooled_connections_gone_silent_do_not_make_a_database_that_answers_look_hung(mysql_url, tmp_path):
    """The check after a statement timeout took a silent idle connection's ping for the database's
    silence: behind a NAT whose idle timeout drops pooled connections (new ones get through), the
    store refused calls while the database answered. It asks on a new connection then."""
    proxy = MySqlProxy(mysql_url)
    store = open_store(proxy.url, str(tmp_path))
    try:
        coll(store)
        assert store.pool._idle.qsize() >= 1
        proxy.stall_open()
        assert store._answers(1.0)
        proxy.frozen.set()
        assert not store._answers(0.5)
    finally:
        proxy.frozen.clear()
        proxy.stalled = set()
        store.close()
        proxy.close()


def test_a_deleted_face_leaves_no_bytes_in_the_sqlite_files(tmp_path):
    """Erasure: SQLite in WAL mode kept a deleted face's embedding in facesvc.db-wal (the page before
    the deletion) until a checkpoint, and a free page of the database file may keep it after. Shortly
    after the deletion's commit neither holds it."""
    store = open_store(f"sqlite:///{tmp_path}/facesvc.db", str(tmp_path))
    try:
        cid = coll(store)
        kept, gone = face(1), face(2)
        for f in (kept, gone):
            store.add_face(cid, "s1", f, allow_existing=True, max_faces=10)
        vector = np.asarray(gone.embedding, "<f4").tobytes()

        def held() -> list[str]:
            return [p.name for p in tmp_path.iterdir() if p.is_file() and vector in p.read_bytes()]

        assert held()  # it is there to begin with
        store.delete_face(cid, gone.face_id)
        deadline = time.monotonic() + 5
        while held() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert held() == []
        assert np.asarray(kept.embedding, "<f4").tobytes() in b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    finally:
        store.close()


def test_erasing_the_sqlite_log_never_holds_writers_back_behind_a_reader(tmp_path):
    """The erasure's checkpoint waited up to 10 s for a reader (a backup tool, an operator's shell)
    holding the log, and every writer waited with it; some failed. It does not wait now: it tries
    again later, and erases once the reader is done. A close right after a deletion is prompt."""
    store = open_store(f"sqlite:///{tmp_path}/facesvc.db", str(tmp_path))
    reader = sqlite3.connect(str(tmp_path / "facesvc.db"), isolation_level=None)
    try:
        cid = coll(store)
        gone = face(1)
        store.add_face(cid, "s1", gone, allow_existing=True, max_faces=10)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM faces").fetchone()  # a read transaction that stays open
        store.delete_face(cid, gone.face_id)
        time.sleep(0.5)  # the eraser has tried
        t0 = time.monotonic()
        for i in range(3):
            store.add_face(cid, f"s{i + 2}", face(i + 2), allow_existing=True, max_faces=10)
        assert time.monotonic() - t0 < 1.0
        reader.execute("COMMIT")
        vector = np.asarray(gone.embedding, "<f4").tobytes()
        deadline = time.monotonic() + 10
        while any(vector in p.read_bytes() for p in tmp_path.iterdir() if p.is_file()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(vector in p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
        store.delete_face(cid, store.get_subject(cid, "s2").faces[0].face_id)
        t0 = time.monotonic()
        store.close()
        assert time.monotonic() - t0 < 1.0 and not store._eraser._thread.is_alive()
    finally:
        reader.close()


def test_a_trial_that_runs_out_of_its_own_time_is_unavailable_not_the_calls_end(mysql_url, tmp_path):
    """The trial of a database that did not answer is allowed TRIAL_S; running out of that (not of
    a call's deadline: there may be none) was answered DEADLINE_EXCEEDED / CALL_ENDED, a code clients
    do not retry, where it is the database that is in doubt."""
    store = open_store(mysql_url, str(tmp_path))
    try:
        store.responsive.TRIAL_S = 0.5
        store.responsive._down_until = time.monotonic() - 1
        with pytest.raises(errors.FaceServiceError) as e, store._tx(write=False) as q:
            q("SELECT 1")
            time.sleep(0.6)
            q("SELECT 1")
        assert reason(e) == errors.STORE_UNAVAILABLE and "nothing was written" in str(e.value)
    finally:
        store.close()


def test_a_retried_registration_is_not_told_its_token_expired_while_the_database_is_away(store, monkeypatch):
    """A Register retried after its staged face left the cache asks the database whether the face
    was committed; with the database away it was told STAGING_EXPIRED, and a client that then ran
    Process again could enrol the face a second time. It is told the database is unavailable."""
    from server.domain.identity import IdentityService
    from server.storage.staging import MemoryStagingCache
    from server.storage.staging.base import new_token

    identity = IdentityService(None, store, MemoryStagingCache())
    cid = coll(store)

    def away(*args):
        raise errors.unavailable(errors.STORE_UNAVAILABLE, "the database is unavailable; retry")

    monkeypatch.setattr(store, "get_face", away)
    with pytest.raises(errors.FaceServiceError) as e:
        identity.register_staged(cid, "s1", new_token(), {})
    assert reason(e) == errors.STORE_UNAVAILABLE
    monkeypatch.undo()
    with pytest.raises(errors.FaceServiceError) as e:
        identity.register_staged(cid, "s1", new_token(), {})
    assert reason(e) == errors.STAGING_EXPIRED


def test_a_call_waits_for_a_database_connection_no_longer_than_its_deadline(store):
    """With every pooled connection busy, a call on the embedded SQLite store waited 10 s for one
    whatever its deadline (MySQL's wait was already the call's): a worker thread held long after
    its caller had gone."""
    from server import context

    cid = coll(store)

    class Call:  # the part of a servicer context the store reads: a call with 1.5 s left
        end = time.monotonic() + 1.5

        def time_remaining(self):
            return self.end - time.monotonic()

    taken = 0
    while store.pool._slots.acquire(blocking=False):  # every connection busy
        taken += 1
    token = context.current_call.set(Call())
    try:
        t0 = time.monotonic()
        with pytest.raises(errors.FaceServiceError) as e:
            store.get_collection(cid)
        assert reason(e) == errors.STORE_UNAVAILABLE and time.monotonic() - t0 < 1.5
    finally:
        context.current_call.reset(token)
        for _ in range(taken):
            store.pool._slots.release()
    assert store.get_collection(cid).collection_id == cid
