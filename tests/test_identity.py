"""Process -> Register -> Verify and management, end to end through a real server, on both backends:
SQLite + in-process cache (embedded) and MySQL (MariaDB) + Redis (production)."""

from __future__ import annotations

import sqlite3
import subprocess
import time
import uuid
from contextlib import closing

import cv2
import grpc
import numpy as np
import pytest
from google.protobuf import field_mask_pb2

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from server.storage.crypto import CropCipher, generate_key
from server.storage.sql.dialects import dialect_for
from tests.conftest import PYTHON, REDIS_URL, ROOT, ServerProcess, expect_error, face_path, image, race

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
PRECONDITION, EXISTS = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS
DENIED, UNAUTH = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
TTL = 4  # staging TTL of these servers, seconds
CROP_KEY = generate_key()

# person_01: img1, img2 (both pass liveness); person_04: img13; person_07: img20, img21
ALICE, ALICE_2, OTHER = "dev/img1.jpg", "dev/img2.jpg", "dev/img13.jpg"
SPOOF = "liveness/spoof_replay_01_minivision_F2.jpg"


class Backend:
    def __init__(self, name: str, server: ServerProcess, db_url: str):
        self.name, self.server, self.db_url = name, server, db_url
        self.stub = pb_grpc.FaceServiceStub(server.channel)

    def sql(self, statement: str, *params):
        """Read or change the server's database directly (fault injection, checking what is stored)."""
        if self.db_url.startswith("sqlite:///"):
            with closing(sqlite3.connect(self.db_url[len("sqlite:///") :], timeout=10)) as conn:
                rows = conn.execute(statement, params).fetchall()
                conn.commit()
                return rows
        import pymysql

        connect = dialect_for(self.db_url, "").params  # the server's own URL parsing
        with closing(pymysql.connect(**connect, autocommit=True)) as conn, conn.cursor() as cur:
            cur.execute(statement.replace("?", "%s"), params)
            return cur.fetchall()


@pytest.fixture(scope="module", params=["sqlite+memory", "mysql+redis"])
def backend(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param.replace("+", "_"))
    env = {
        "FACESVC_STAGING_TTL_SECONDS": str(TTL),
        "FACESVC_CROP_KEY": CROP_KEY,
        "FACESVC_AUTH_CACHE_SECONDS": "0",
        "FACESVC_RETENTION_SWEEP_SECONDS": "1",  # test_collection_policies ages faces out
    }
    if request.param == "sqlite+memory":
        db_url = f"sqlite:///{tmp}/facesvc.db"
    else:
        db_url = request.getfixturevalue("mysql_url")
        env.update(FACESVC_REDIS_URL=REDIS_URL, FACESVC_REDIS_PREFIX=request.getfixturevalue("redis_prefix"))
    env["FACESVC_DB_URL"] = db_url
    srv = ServerProcess(env=env, log_path=tmp / "server.log")
    yield Backend(request.param, srv, db_url)
    assert srv.stop() == 0, srv.output()[-3000:]


def new_collection(b: Backend, policy=pb.LIVENESS_POLICY_REQUIRED, **kw) -> str:
    cid = "t-" + uuid.uuid4().hex[:12]
    b.stub.CreateCollection(pb.CreateCollectionRequest(collection=cid, liveness_policy=policy, **kw), timeout=10)
    return cid


def process(stub, cid, subject, photo=ALICE, **kw) -> pb.ProcessResponse:
    return stub.Process(pb.ProcessRequest(collection=cid, subject_id=subject, image=image(photo), **kw), timeout=60)


def enrol(stub, cid, subject, photo=ALICE, **kw) -> pb.RegisterResponse:
    token = process(stub, cid, subject, photo).staging_token
    return stub.Register(pb.RegisterRequest(collection=cid, subject_id=subject, staging_token=token, **kw), timeout=30)


def verify(stub, cid, subject, photo, **kw) -> pb.VerifyResponse:
    return stub.Verify(pb.VerifyRequest(collection=cid, subject_id=subject, image=image(photo), **kw), timeout=60)


def test_enrol_then_verify_same_and_different_person(backend):
    b, cid = backend, new_collection(backend)
    p = process(b.stub, cid, "alice")
    assert p.staging_token and p.liveness.is_live and p.faces_detected == 1 and p.model == "w600k_mbf"
    assert p.face.quality.score > 0.5
    assert 0 < p.expire_time.ToMilliseconds() - time.time() * 1000 <= TTL * 1000 + 1000
    r = b.stub.Register(
        pb.RegisterRequest(collection=cid, subject_id="alice", staging_token=p.staging_token, metadata={"employee": "4711"}),
        timeout=30,
    )
    assert r.subject_created and r.subject.face_count == 1 and r.subject.metadata == {"employee": "4711"}
    assert r.face.has_crop and r.face.model == "w600k_mbf"

    same = verify(b.stub, cid, "alice", ALICE_2)
    assert same.match and same.similarity > same.threshold and same.liveness.is_live
    assert same.matched_face_id == r.face.face_id and same.threshold == pytest.approx(0.242)
    other = verify(b.stub, cid, "alice", OTHER)
    assert not other.match and other.similarity < other.threshold
    # a per-request threshold within bounds is honoured
    assert not verify(b.stub, cid, "alice", ALICE_2, threshold=0.95).match
    expect_error(
        b.stub.Verify,
        pb.VerifyRequest(collection=cid, subject_id="alice", image=image(ALICE_2), threshold=0.05),
        INVALID,
        "VALIDATION_FAILED",
    )


def test_spoofs_and_faceless_photos_are_refused(backend):
    b, cid = backend, new_collection(backend)
    info = expect_error(
        b.stub.Process,
        pb.ProcessRequest(collection=cid, subject_id="mallory", image=image(SPOOF)),
        PRECONDITION,
        "SPOOF_DETECTED",
    )
    assert float(info.metadata["liveness_score"]) < 0.5
    expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=cid, subject_id="mallory", image=image(SPOOF)),
        PRECONDITION,
        "SPOOF_DETECTED",
    )
    expect_error(
        b.stub.Process,
        pb.ProcessRequest(collection=cid, subject_id="x", image=image("dev/noface_rocket.jpg")),
        INVALID,
        "NO_FACE_DETECTED",
    )
    enrol(b.stub, cid, "alice")
    expect_error(
        b.stub.Verify, pb.VerifyRequest(collection=cid, subject_id="alice", image=image(SPOOF)), PRECONDITION, "SPOOF_DETECTED"
    )
    expect_error(
        b.stub.Verify,
        pb.VerifyRequest(collection=cid, subject_id="alice", image=image("dev/noface_coffee.jpg")),
        INVALID,
        "NO_FACE_DETECTED",
    )
    expect_error(b.stub.GetSubject, pb.GetSubjectRequest(collection=cid, subject_id="mallory"), NOT_FOUND, "SUBJECT_NOT_FOUND")


def test_enrolment_quality_gate(backend):
    b, cid = backend, new_collection(backend)
    expect_error(
        b.stub.Process,
        pb.ProcessRequest(collection=cid, subject_id="g", image=image("dev/group_t1.jpg")),
        INVALID,
        "MULTIPLE_FACES",
    )
    small = cv2.resize(cv2.imread(str(face_path(ALICE))), None, fx=0.07, fy=0.07, interpolation=cv2.INTER_AREA)
    tiny = pb.Image(encoded=cv2.imencode(".png", small)[1].tobytes())
    info = expect_error(
        b.stub.Process, pb.ProcessRequest(collection=cid, subject_id="t", image=tiny), INVALID, "LOW_QUALITY_FACE"
    )
    assert int(info.metadata["face_size"]) < 48


def test_double_registration_and_add_face(backend):
    b, cid = backend, new_collection(backend)
    first = enrol(b.stub, cid, "alice")
    expect_error(
        b.stub.Process, pb.ProcessRequest(collection=cid, subject_id="alice", image=image(ALICE_2)), EXISTS, "ALREADY_REGISTERED"
    )
    expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=cid, subject_id="alice", image=image(ALICE_2)),
        EXISTS,
        "ALREADY_REGISTERED",
    )
    p = process(b.stub, cid, "alice", ALICE_2, add_face=True)
    req = pb.RegisterRequest(collection=cid, subject_id="alice", staging_token=p.staging_token)
    second = b.stub.Register(req, timeout=30)
    assert not second.subject_created and second.subject.face_count == 2
    assert {f.face_id for f in second.subject.faces} == {first.face.face_id, second.face.face_id}
    # a retried Register (say the response was lost) answers the same face; nothing new is written
    again = b.stub.Register(req, timeout=30)
    assert again.face.face_id == second.face.face_id and again.subject.face_count == 2
    assert b.sql("SELECT COUNT(*) FROM faces WHERE collection_id = ?", cid)[0][0] == 2


def test_staging_token_rules(backend):
    b, cid = backend, new_collection(backend)
    other_cid = new_collection(backend)
    p = process(b.stub, cid, "bob", "dev/img20.jpg")
    info = expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=cid, subject_id="carol", staging_token=p.staging_token),
        PRECONDITION,
        "STAGING_MISMATCH",
    )
    assert not info.metadata, "a token tells nothing to whoever holds it"
    # another collection's token is answered exactly as an unknown one
    info = expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=other_cid, subject_id="bob", staging_token=p.staging_token),
        NOT_FOUND,
        "STAGING_EXPIRED",
    )
    assert cid not in str(info) and "bob" not in str(info)
    expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=cid, subject_id="bob", staging_token="no-such-token"),
        NOT_FOUND,
        "STAGING_EXPIRED",
    )
    time.sleep(TTL + 0.5)
    expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=cid, subject_id="bob", staging_token=p.staging_token),
        NOT_FOUND,
        "STAGING_EXPIRED",
    )
    expect_error(b.stub.GetSubject, pb.GetSubjectRequest(collection=cid, subject_id="bob"), NOT_FOUND, "SUBJECT_NOT_FOUND")


def test_a_staging_token_dies_with_its_collection(backend):
    """Deleted and re-created under the same id, a collection is a new tenant: the old token registers nothing."""
    b, cid = backend, new_collection(backend)
    token = process(b.stub, cid, "alice").staging_token
    b.stub.DeleteCollection(pb.DeleteCollectionRequest(collection=cid), timeout=10)
    b.stub.CreateCollection(pb.CreateCollectionRequest(collection=cid, liveness_policy=pb.LIVENESS_POLICY_REQUIRED), timeout=10)
    expect_error(
        b.stub.Register, pb.RegisterRequest(collection=cid, subject_id="alice", staging_token=token), NOT_FOUND, "STAGING_EXPIRED"
    )
    assert b.sql("SELECT COUNT(*) FROM faces WHERE collection_id = ?", cid)[0][0] == 0


def test_add_face_cannot_grow_metadata_past_the_limit(backend):
    b, cid = backend, new_collection(backend)
    enrol(b.stub, cid, "alice", metadata={f"a{i}": "v" * 256 for i in range(16)})
    expect_error(
        b.stub.Register,
        pb.RegisterRequest(
            collection=cid,
            subject_id="alice",
            image=image(ALICE_2),
            add_face=True,
            metadata={f"b{i}": "w" * 256 for i in range(16)},
        ),
        INVALID,
        "VALIDATION_FAILED",
    )
    subject = b.stub.GetSubject(pb.GetSubjectRequest(collection=cid, subject_id="alice"), timeout=10).subject
    assert len(subject.metadata) == 16 and subject.face_count == 1


def test_update_subject_with_a_field_mask(backend):
    b, cid = backend, new_collection(backend)
    enrol(b.stub, cid, "alice", metadata={"team": "red", "floor": "3"})

    def update(metadata, paths=None):
        mask = field_mask_pb2.FieldMask(paths=paths) if paths is not None else None
        return b.stub.UpdateSubject(
            pb.UpdateSubjectRequest(collection=cid, subject_id="alice", metadata=metadata, update_mask=mask), timeout=10
        ).subject.metadata

    assert update({"team": "blue"}, ["metadata.team"]) == {"team": "blue", "floor": "3"}  # one key set
    assert update({}, ["metadata.floor"]) == {"team": "blue"}  # one key removed
    assert update({"badge": "7"}, ["metadata"]) == {"badge": "7"}  # the whole map
    assert update({"x": "1"}) == {"x": "1"}  # no mask: the whole map
    for metadata, paths in (({"x": "2"}, ["display_name"]), ({"y": "2"}, ["metadata.x"]), ({}, ["metadata."])):
        expect_error(
            b.stub.UpdateSubject,
            pb.UpdateSubjectRequest(
                collection=cid, subject_id="alice", metadata=metadata, update_mask=field_mask_pb2.FieldMask(paths=paths)
            ),
            INVALID,
            "VALIDATION_FAILED",
        )
    full = {f"k{i}": "v" for i in range(16)}
    update(full)
    expect_error(
        b.stub.UpdateSubject,
        pb.UpdateSubjectRequest(
            collection=cid,
            subject_id="alice",
            metadata={"k16": "v"},
            update_mask=field_mask_pb2.FieldMask(paths=["metadata.k16"]),
        ),
        INVALID,
        "VALIDATION_FAILED",
    )


def test_api_keys_are_listed_page_by_page(backend):
    b, cid = backend, new_collection(backend)
    made = {b.stub.CreateApiKey(pb.CreateApiKeyRequest(collection=cid), timeout=10).key.key_id for _ in range(5)}
    seen, token = [], ""
    while True:
        page = b.stub.ListApiKeys(pb.ListApiKeysRequest(collection=cid, page_size=2, page_token=token), timeout=10)
        assert len(page.keys) <= 2
        seen += [k.key_id for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(made)


def test_concurrent_registers_of_one_token_all_answer_the_same_face(backend):
    """A client retrying a Register of one token on several connections at once: every call gets the
    face, as a sequential retry would, and one face is stored."""
    b, cid = backend, new_collection(backend)
    token = process(b.stub, cid, "dana").staging_token
    answers = []

    def register():
        answers.append(
            b.stub.Register(pb.RegisterRequest(collection=cid, subject_id="dana", staging_token=token), timeout=30).face.face_id
        )

    failures = race([register] * 4)
    assert failures == [None] * 4, failures
    assert len(set(answers)) == 1
    assert b.sql("SELECT COUNT(*) FROM faces WHERE collection_id = ?", cid)[0][0] == 1


def test_concurrent_registers_of_one_subject_exactly_one_wins(backend):
    b, cid = backend, new_collection(backend)
    tokens = [process(b.stub, cid, "dave", photo).staging_token for photo in (ALICE, ALICE_2, "dev/img6.jpg", "dev/img7.jpg")]
    calls = [
        lambda t=t: b.stub.Register(pb.RegisterRequest(collection=cid, subject_id="dave", staging_token=t), timeout=30)
        for t in tokens
    ]
    outcomes = [e.code().name if e else "ok" for e in race(calls)]
    assert sorted(outcomes) == ["ALREADY_EXISTS"] * 3 + ["ok"], outcomes
    assert b.sql("SELECT COUNT(*) FROM subjects WHERE collection_id = ?", cid)[0][0] == 1
    assert b.sql("SELECT COUNT(*) FROM faces WHERE collection_id = ?", cid)[0][0] == 1


def test_delete_subject_and_face(backend):
    b, cid = backend, new_collection(backend)
    r = enrol(b.stub, cid, "erin", "dev/img20.jpg")
    two = (
        enrol(
            b.stub,
            cid,
            "erin",
            "dev/img21.jpg",
        )
        if False
        else b.stub.Register(
            pb.RegisterRequest(collection=cid, subject_id="erin", image=image("dev/img21.jpg"), add_face=True), timeout=60
        )
    )
    assert two.subject.face_count == 2 and two.detected_face.quality.score > 0
    d = b.stub.DeleteFace(pb.DeleteFaceRequest(collection=cid, face_id=r.face.face_id), timeout=10)
    assert d.face.face_id == r.face.face_id
    assert b.stub.GetSubject(pb.GetSubjectRequest(collection=cid, subject_id="erin"), timeout=10).subject.face_count == 1
    assert b.stub.DeleteSubject(pb.DeleteSubjectRequest(collection=cid, subject_id="erin"), timeout=10).deleted_faces == 1
    assert b.sql("SELECT COUNT(*) FROM faces WHERE collection_id = ?", cid)[0][0] == 0
    expect_error(b.stub.GetSubject, pb.GetSubjectRequest(collection=cid, subject_id="erin"), NOT_FOUND, "SUBJECT_NOT_FOUND")
    expect_error(
        b.stub.Verify,
        pb.VerifyRequest(collection=cid, subject_id="erin", image=image("dev/img20.jpg")),
        NOT_FOUND,
        "SUBJECT_NOT_FOUND",
    )
    expect_error(b.stub.DeleteSubject, pb.DeleteSubjectRequest(collection=cid, subject_id="erin"), NOT_FOUND, "SUBJECT_NOT_FOUND")


def test_failed_database_write_keeps_the_staging_entry(backend):
    """The face insert fails inside the database: nothing is half-written and the same token
    registers once the database accepts writes again."""
    b, cid = backend, new_collection(backend)
    p = process(b.stub, cid, "doomed")
    trigger = {
        "sqlite+memory": "CREATE TRIGGER facesvc_fail BEFORE INSERT ON faces WHEN NEW.subject_id = 'doomed' "
        "BEGIN SELECT RAISE(ABORT, 'injected failure'); END",
        "mysql+redis": "CREATE TRIGGER facesvc_fail BEFORE INSERT ON faces FOR EACH ROW BEGIN IF NEW.subject_id = 'doomed' "
        "THEN SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'injected failure'; END IF; END",
    }[b.name]
    b.sql(trigger)
    try:
        expect_error(
            b.stub.Register,
            pb.RegisterRequest(collection=cid, subject_id="doomed", staging_token=p.staging_token),
            grpc.StatusCode.INTERNAL,
            "INTERNAL",
        )
        assert b.sql("SELECT COUNT(*) FROM subjects WHERE collection_id = ?", cid)[0][0] == 0
    finally:
        b.sql("DROP TRIGGER facesvc_fail")
    r = b.stub.Register(pb.RegisterRequest(collection=cid, subject_id="doomed", staging_token=p.staging_token), timeout=30)
    assert r.subject_created and r.subject.face_count == 1


def reembed_check(b, cid: str) -> subprocess.CompletedProcess:
    """facesvc-reembed --check on the collection, with the server's crop key."""
    return subprocess.run(
        [PYTHON, "-m", "server.reembed", "--db-url", b.db_url, "--collection", cid, "--check"],
        cwd=ROOT,
        env={"FACESVC_CROP_KEY": CROP_KEY, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_stored_crops_are_encrypted_and_reembed_reproduces_embeddings(backend):
    b, cid = backend, new_collection(backend)
    r = enrol(b.stub, cid, "frank", "dev/img13.jpg")
    (crop,) = b.sql("SELECT crop FROM faces WHERE face_id = ?", r.face.face_id)[0]
    crop = bytes(crop)
    assert cv2.imdecode(np.frombuffer(crop, np.uint8), cv2.IMREAD_COLOR) is None  # not a decodable image
    assert CropCipher(CROP_KEY).open(crop, r.face.face_id).shape == (112, 112, 3)
    out = reembed_check(b, cid)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "faces checked: 1" in out.stdout and "min cosine to stored: 1.0000" in out.stdout, out.stdout
    # a crop sealed under another key (the crop key changed since): the export and the re-embedding
    # went INTERNAL and aborted on it; both go on with the others and say which they could not open
    second = b.stub.Register(
        pb.RegisterRequest(collection=cid, subject_id="frank", image=image("dev/img14.jpg"), add_face=True), timeout=60
    )
    other_key = CropCipher(generate_key()).seal(CropCipher(CROP_KEY).open(crop, r.face.face_id), second.face.face_id)
    b.sql("UPDATE faces SET crop = ? WHERE face_id = ?", other_key, second.face.face_id)
    export = b.stub.ExportSubject(pb.ExportSubjectRequest(collection=cid, subject_id="frank"), timeout=10)
    assert [c.face_id for c in export.crops] == [r.face.face_id]
    assert list(export.unreadable_crops) == [second.face.face_id] and len(export.subject.faces) == 2
    out = reembed_check(b, cid)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "faces checked: 1" in out.stdout and "crops not opened" in out.stdout and second.face.face_id in out.stderr


def test_subject_listing_pages_and_metadata(backend):
    # one photo stands in for five people here: the duplicate check would (rightly) refuse four
    b, cid = backend, new_collection(backend, pb.LIVENESS_POLICY_OPTIONAL, duplicate_policy=pb.DUPLICATE_POLICY_OFF)
    ids = ["p1", "p2", "p3", "p4", "p5"]
    for sid in ids:  # bulk import of trusted photos: liveness skipped, allowed by the collection's policy
        r = b.stub.Register(
            pb.RegisterRequest(collection=cid, subject_id=sid, image=image("dev/img5.jpg"), skip_liveness=True), timeout=60
        )
        assert not r.HasField("liveness")
    seen, token = [], ""
    for _ in range(5):
        page = b.stub.ListSubjects(pb.ListSubjectsRequest(collection=cid, page_size=2, page_token=token), timeout=10)
        seen += [s.subject_id for s in page.subjects]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    expect_error(b.stub.ListSubjects, pb.ListSubjectsRequest(collection=cid, page_token="garbage!"), INVALID, "VALIDATION_FAILED")
    other = new_collection(backend)
    page = b.stub.ListSubjects(pb.ListSubjectsRequest(collection=cid, page_size=2), timeout=10)
    expect_error(
        b.stub.ListSubjects,
        pb.ListSubjectsRequest(collection=other, page_token=page.next_page_token),
        INVALID,
        "VALIDATION_FAILED",
    )  # a token from another listing
    up = b.stub.UpdateSubject(pb.UpdateSubjectRequest(collection=cid, subject_id="p1", metadata={"team": "blue"}), timeout=10)
    assert up.subject.metadata == {"team": "blue"}
    coll = b.stub.GetCollection(pb.GetCollectionRequest(collection=cid), timeout=10).collection
    assert (coll.subject_count, coll.face_count, coll.liveness_policy) == (5, 5, pb.LIVENESS_POLICY_OPTIONAL)


def test_liveness_policy_required_refuses_skip(backend):
    b, cid = backend, new_collection(backend)
    expect_error(
        b.stub.Process,
        pb.ProcessRequest(collection=cid, subject_id="s", image=image(ALICE), skip_liveness=True),
        PRECONDITION,
        "LIVENESS_REQUIRED",
    )


def test_validation_and_missing_resources(backend):
    b, cid = backend, new_collection(backend)
    for req in (
        pb.ProcessRequest(collection=cid, subject_id="", image=image(ALICE)),
        pb.ProcessRequest(collection="Bad Id!", subject_id="a", image=image(ALICE)),
        pb.ProcessRequest(collection=cid, subject_id="a b", image=image(ALICE)),
        pb.ProcessRequest(collection=cid, subject_id="a"),
    ):
        expect_error(b.stub.Process, req, INVALID, "VALIDATION_FAILED")
    expect_error(b.stub.Register, pb.RegisterRequest(collection=cid, subject_id="a"), INVALID, "VALIDATION_FAILED")
    expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=cid, subject_id="a", image=image(ALICE), metadata={f"k{i}": "v" for i in range(17)}),
        INVALID,
        "VALIDATION_FAILED",
    )
    expect_error(
        b.stub.Process,
        pb.ProcessRequest(collection="no-such-collection", subject_id="a", image=image(ALICE)),
        NOT_FOUND,
        "COLLECTION_NOT_FOUND",
    )
    expect_error(b.stub.CreateCollection, pb.CreateCollectionRequest(collection=cid), EXISTS, "COLLECTION_EXISTS")
    expect_error(b.stub.DeleteFace, pb.DeleteFaceRequest(collection=cid, face_id="0" * 32), NOT_FOUND, "FACE_NOT_FOUND")


def test_collection_keys_are_isolated(backend):
    b = backend
    a, other = new_collection(b), new_collection(b)
    enrol(b.stub, other, "victim", "dev/img20.jpg")
    secret = b.stub.CreateApiKey(pb.CreateApiKeyRequest(collection=a, description="gate 3"), timeout=10).secret
    stub_a = b.server.stub(secret)
    enrol(stub_a, a, "alice")  # its own collection: everything works
    assert verify(stub_a, a, "alice", ALICE_2).match
    assert len(stub_a.Detect(pb.DetectRequest(image=image(ALICE)), timeout=30).faces) == 1  # stateless RPCs too
    for call, req in (
        (stub_a.Verify, pb.VerifyRequest(collection=other, subject_id="victim", image=image("dev/img21.jpg"))),
        (stub_a.GetSubject, pb.GetSubjectRequest(collection=other, subject_id="victim")),
        (stub_a.ListSubjects, pb.ListSubjectsRequest(collection=other)),
        (stub_a.DeleteSubject, pb.DeleteSubjectRequest(collection=other, subject_id="victim")),
        (stub_a.Process, pb.ProcessRequest(collection=other, subject_id="x", image=image(ALICE))),
        (stub_a.CreateCollection, pb.CreateCollectionRequest(collection="mine-now")),
        (stub_a.ListCollections, pb.ListCollectionsRequest()),
        (stub_a.DeleteCollection, pb.DeleteCollectionRequest(collection=a)),
        (stub_a.CreateApiKey, pb.CreateApiKeyRequest(collection=a)),
    ):
        expect_error(call, req, DENIED, "PERMISSION_DENIED")
    assert b.stub.GetSubject(pb.GetSubjectRequest(collection=other, subject_id="victim"), timeout=10).subject.face_count == 1
    expect_error(
        b.server.stub(None).GetSubject, pb.GetSubjectRequest(collection=a, subject_id="alice"), UNAUTH, "API_KEY_MISSING"
    )
    expect_error(
        b.server.stub("fsk_0_wrong").GetSubject, pb.GetSubjectRequest(collection=a, subject_id="alice"), UNAUTH, "API_KEY_INVALID"
    )
    keys = b.stub.ListApiKeys(pb.ListApiKeysRequest(collection=a), timeout=10).keys
    assert [k.description for k in keys] == ["gate 3"] and secret not in str(keys)
    b.stub.DeleteApiKey(pb.DeleteApiKeyRequest(collection=a, key_id=keys[0].key_id), timeout=10)
    expect_error(stub_a.GetSubject, pb.GetSubjectRequest(collection=a, subject_id="alice"), UNAUTH, "API_KEY_INVALID")
    # keys are stored hashed
    assert not b.sql("SELECT key_id FROM api_keys WHERE key_hash = ?", secret)


def test_delete_collection_removes_everything(backend):
    b, cid = backend, new_collection(backend)
    enrol(b.stub, cid, "gina")
    b.stub.CreateApiKey(pb.CreateApiKeyRequest(collection=cid), timeout=10)
    d = b.stub.DeleteCollection(pb.DeleteCollectionRequest(collection=cid), timeout=10)
    assert (d.deleted_subjects, d.deleted_faces) == (1, 1)
    for table in ("subjects", "faces", "api_keys"):
        assert b.sql(f"SELECT COUNT(*) FROM {table} WHERE collection_id = ?", cid)[0][0] == 0
    assert cid not in [
        c.collection for c in b.stub.ListCollections(pb.ListCollectionsRequest(page_size=1000), timeout=10).collections
    ]


def test_without_a_crop_key_no_image_is_stored(server, stub):
    """The session server runs without FACESVC_CROP_KEY: only the embedding is kept."""
    cid = "nokey-" + uuid.uuid4().hex[:8]
    stub.CreateCollection(pb.CreateCollectionRequest(collection=cid), timeout=10)
    r = enrol(stub, cid, "hank", "dev/img20.jpg")
    assert not r.face.has_crop
    with closing(sqlite3.connect(server.log_path.parent / "data" / "facesvc.db")) as conn:
        assert conn.execute("SELECT crop, length(embedding) FROM faces WHERE face_id = ?", (r.face.face_id,)).fetchall() == [
            (None, 512 * 4)
        ]


def test_a_registered_face_is_answered_as_registered_when_its_token_cannot_be_deleted(pipeline, tmp_path):
    """The staging cache failed after the commit (Redis going away): the caller was told
    CACHE_UNAVAILABLE, retry, for a face that was registered. It is answered as registered, and a
    retry with the token answers the same face."""
    from server import errors
    from server.domain.identity import IdentityService
    from server.records import LIVENESS_OPTIONAL
    from server.storage.sql import open_store
    from server.storage.staging.memory import MemoryStagingCache
    from server.vision.pipeline import DetectOptions

    class GoneAtDelete(MemoryStagingCache):
        def delete(self, token, collection=""):
            raise errors.unavailable(errors.CACHE_UNAVAILABLE, "the staging cache is unavailable; retry")

    store = open_store(f"sqlite:///{tmp_path}/f.db", str(tmp_path))
    try:
        store.create_collection("c", "", LIVENESS_OPTIONAL)
        identity = IdentityService(pipeline, store, GoneAtDelete())
        screened = identity.screen("c", "ann", cv2.imread(str(face_path("dev/img1.jpg"))), DetectOptions(), skip_liveness=True)
        (embedding,) = pipeline.embed([screened.face])
        token = identity.process_screened(screened, embedding).token
        first = identity.register_staged("c", "ann", token, {})
        assert first.created and store.subject_face_count("c", "ann") == 1
        again = identity.register_staged("c", "ann", token, {})
        assert again.face.face_id == first.face.face_id and store.subject_face_count("c", "ann") == 1
    finally:
        store.close()
