"""Server processes on the Milvus engine (FACESVC_INDEX_ENGINE=milvus), end to end.

Two replicas on one MySQL share one Milvus: a Milvus Lite file is locked by the
process that opens it, so they share `milvus-lite server` (the same Milvus API
over gRPC on a loopback port), as production replicas share Milvus standalone
or a cluster (docs/milvus.md). And a single server on a Milvus Lite file: a
folder enrolled with the `facesvc` CLI is searchable, the right person first.
The index contract and the LFW search tests on this engine are in
test_index.py and test_search.py.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from tests.conftest import FACES, ServerProcess, image
from tests.test_client import cli
from tests.test_search import CENTRED


def test_two_replicas_on_mysql_share_one_milvus(mysql_url, tmp_path):
    """Registered on A, searchable on B at once: B polls the change log only every 30 s and there is
    no Redis, so B finds the face because A wrote it through to the Milvus they share."""
    from bench.launcher import MilvusLiteServer

    milvus = MilvusLiteServer(tmp_path / "milvus", tmp_path / "milvus.log")
    base = {
        "FACESVC_DB_URL": mysql_url,
        "FACESVC_INDEX_ENGINE": "milvus",
        "FACESVC_MILVUS_URI": milvus.uri,
        "FACESVC_MILVUS_COLLECTION_PREFIX": "replicas_" + uuid.uuid4().hex[:6],
        "FACESVC_INDEX_SYNC_SECONDS": "30",
    }
    a = b = None
    try:
        a = ServerProcess(log_path=tmp_path / "a.log", env={**base, "FACESVC_DATA_DIR": str(tmp_path / "a")})
        b = ServerProcess(log_path=tmp_path / "b.log", env={**base, "FACESVC_DATA_DIR": str(tmp_path / "b")})
        stub_a, stub_b = pb_grpc.FaceServiceStub(a.channel), pb_grpc.FaceServiceStub(b.channel)
        coll = "milvus-" + uuid.uuid4().hex[:6]
        stub_a.CreateCollection(
            pb.CreateCollectionRequest(collection=coll, liveness_policy=pb.LIVENESS_POLICY_OPTIONAL), timeout=10
        )
        probe = pb.SearchRequest(collection=coll, image=image("dev/img2.jpg"), skip_liveness=True)
        assert not stub_b.Search(probe, timeout=30).results[0].matches
        stub_a.Register(
            pb.RegisterRequest(collection=coll, subject_id="person_01", image=image("dev/img1.jpg"), skip_liveness=True),
            timeout=60,
        )
        assert stub_a.Search(probe, timeout=30).results[0].matches[0].subject_id == "person_01"  # read-your-writes
        t0 = time.monotonic()
        assert stub_b.Search(probe, timeout=30).results[0].matches[0].subject_id == "person_01"
        seen = time.monotonic() - t0
        stub_b.DeleteSubject(pb.DeleteSubjectRequest(collection=coll, subject_id="person_01"), timeout=10)
        assert not stub_a.Search(probe, timeout=30).results[0].matches
        stats = [s.GetIndexStats(pb.GetIndexStatsRequest(collection=coll), timeout=10) for s in (stub_a, stub_b)]
        assert all(st.engine == "milvus" and st.memory_bytes == 0 and st.size == 0 for st in stats)
        assert stats[0].engine_params["milvus_collection"] == stats[1].engine_params["milvus_collection"]
        assert stats[0].engine_params["uri"] == milvus.uri and stats[0].engine_params["lite"] == "False"
        # where the index lives is the operator's to know, not a tenant's
        key = stub_a.CreateApiKey(pb.CreateApiKeyRequest(collection=coll), timeout=10).secret
        tenant = a.stub(key).GetIndexStats(pb.GetIndexStatsRequest(collection=coll), timeout=10)
        assert "uri" not in tenant.engine_params and tenant.engine_params["lite"] == "False"
        print(f"\nregistered on A -> searchable on B: first search answered in {seen:.2f}s")
    finally:
        for s in (a, b):
            if s is not None:
                assert s.stop() == 0, s.output()[-2000:]
        milvus.stop()


def test_a_folder_enrolled_with_the_cli_is_searchable_on_milvus_lite(tmp_path):
    """FACESVC_INDEX_ENGINE=milvus with a Milvus Lite file: `facesvc enroll` a folder of 12 LFW people
    (one photo each), then search another photo of each (its most central face, liveness skipped as
    for the LFW gallery in test_search.py): that person comes first."""
    srv = ServerProcess(
        log_path=tmp_path / "server.log",
        env={"FACESVC_INDEX_ENGINE": "milvus", "FACESVC_MILVUS_URI": str(tmp_path / "faces.milvus")},
    )
    try:
        people = sorted(d for d in (FACES / "lfw").iterdir() if d.is_dir() and len(list(d.glob("*.jpg"))) > 1)[:12]
        tree = tmp_path / "people"
        probes = {}
        for d in people:
            photos = sorted(d.glob("*.jpg"))
            (tree / d.name).mkdir(parents=True)
            shutil.copy(photos[0], tree / d.name / photos[0].name)
            probes[d.name] = photos[1]
        coll = "cli-milvus"
        cli(srv, "collections", "create", coll, "--liveness-optional")
        p = cli(srv, "enroll", coll, str(tree), "--skip-liveness", check=False)
        enrolled = {s["subjectId"] for s in json.loads(cli(srv, "subjects", "list", coll).stdout)}
        assert len(enrolled) >= 11, p.stdout + p.stderr  # the enrolment gate may refuse one photo
        stub = pb_grpc.FaceServiceStub(srv.channel)
        right = 0
        for person in sorted(enrolled):
            req = pb.SearchRequest(
                collection=coll, image=image(str(probes[person])), skip_liveness=True, face_options=CENTRED, top_k=3
            )
            matches = stub.Search(req, timeout=60).results[0].matches
            right += bool(matches) and matches[0].subject_id == person
        print(f"\nmilvus lite: {right}/{len(enrolled)} people found first")
        assert right >= len(enrolled) - 1
        stats = stub.GetIndexStats(pb.GetIndexStatsRequest(collection=coll), timeout=10)
        assert stats.engine == "milvus" and stats.size == len(enrolled) and stats.engine_params["lite"] == "True"
        assert (tmp_path / "faces.milvus").is_dir()  # Milvus Lite's data directory
    finally:
        assert srv.stop() == 0
