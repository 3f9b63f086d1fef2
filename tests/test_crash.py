"""kill -9 in the middle of a stream of Registers: after a restart every acknowledged Register is in the
database and in search results, and nothing is half-written. On both stores (SQLite file, MySQL + Redis)."""

from __future__ import annotations

import threading
import time
import uuid

import grpc

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from tests.conftest import REDIS_URL, ServerProcess, image
from tests.test_search import CENTRED, lfw_people


def test_kill_9_mid_registration_loses_nothing_acknowledged(db_url, redis_prefix, tmp_path):
    env = {
        "FACESVC_DB_URL": db_url,
        "FACESVC_DATA_DIR": str(tmp_path / "data"),
        "FACESVC_INDEX_SNAPSHOT_SECONDS": "1",
    }  # snapshots being written while we kill, too
    if db_url.startswith("mysql"):
        env |= {"FACESVC_REDIS_URL": REDIS_URL, "FACESVC_REDIS_PREFIX": redis_prefix + "crash:"}
    coll = "crash-" + uuid.uuid4().hex[:6]
    srv = ServerProcess(log_path=tmp_path / "before.log", env=env)
    stub = pb_grpc.FaceServiceStub(srv.channel)
    stub.CreateCollection(pb.CreateCollectionRequest(collection=coll, liveness_policy=pb.LIVENESS_POLICY_OPTIONAL), timeout=10)
    people = list(lfw_people()[0].items())[:60]
    acked: dict[str, str] = {}  # subject -> face id, for every Register the server answered OK
    failures: list[str] = []

    def register_all():
        for person, photos in people:
            try:
                r = stub.Register(
                    pb.RegisterRequest(
                        collection=coll, subject_id=person, image=image(photos[0]), skip_liveness=True, face_options=CENTRED
                    ),
                    timeout=30,
                )
                acked[person] = r.face.face_id
            except grpc.RpcError as exc:
                failures.append(f"{person}: {exc.code().name}")
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    return  # the server is gone

    t = threading.Thread(target=register_all)
    t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.proc.kill()  # SIGKILL, mid-stream: no graceful stop, no last snapshot
    t.join(60)
    srv.stop()
    assert len(acked) >= 12 and len(acked) < len(people), (len(acked), failures)

    again = ServerProcess(log_path=tmp_path / "after.log", env=env)
    try:
        stub = pb_grpc.FaceServiceStub(again.channel)
        subjects = {}
        token = ""
        while True:
            page = stub.ListSubjects(pb.ListSubjectsRequest(collection=coll, page_size=50, page_token=token), timeout=10)
            subjects.update({s.subject_id: s.face_count for s in page.subjects})
            token = page.next_page_token
            if not token:
                break
        missing = [p for p in acked if p not in subjects]
        assert not missing, f"acknowledged but lost: {missing}"
        assert all(n == 1 for n in subjects.values()), subjects  # no subject without its face, none doubled
        assert len(subjects) - len(acked) <= 1  # at most the one in flight at the kill, and then whole
        for person, face_id in acked.items():
            got = stub.GetSubject(pb.GetSubjectRequest(collection=coll, subject_id=person), timeout=10).subject
            assert [f.face_id for f in got.faces] == [face_id]
        stats = stub.GetIndexStats(pb.GetIndexStatsRequest(collection=coll), timeout=10)
        assert stats.size == len(subjects)  # the index holds exactly what the database holds
        photos = dict(people)
        for person in list(acked)[:: max(1, len(acked) // 6)]:  # and finds them
            hits = (
                stub.Search(
                    pb.SearchRequest(collection=coll, image=image(photos[person][0]), skip_liveness=True, face_options=CENTRED),
                    timeout=30,
                )
                .results[0]
                .matches
            )
            assert hits and hits[0].subject_id == person and hits[0].face_id == acked[person]
        print(
            f"\nkill -9 after {len(acked)} acknowledged Registers: all {len(acked)} present after restart "
            f"({len(subjects)} subjects, index {stats.size}, loaded from {stats.loaded_from})"
        )
        stub.DeleteCollection(pb.DeleteCollectionRequest(collection=coll), timeout=30)
    finally:
        again.stop()
