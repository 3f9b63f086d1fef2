"""Per-collection policies through a real server, on both backends (SQLite + in-process cache, MariaDB +
Redis): the duplicate check at enrolment, the collection's own thresholds and their calibration,
find-similar and face grouping. The faces are LFW's; which photos match is measured here with the
server's own embeddings against the thresholds it reports, never assumed."""

from __future__ import annotations

import base64
import itertools
import json
import time
import uuid

import cv2
import grpc
import numpy as np
import pytest
from google.protobuf import field_mask_pb2

from facesvc.v1 import face_service_pb2 as pb
from tests.conftest import expect_error, image
from tests.test_identity import Backend, backend  # noqa: F401  (the module-scoped server per backend)
from tests.test_search import CENTRED, lfw_people

INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
PEOPLE = 12  # LFW people (with several photos) these tests pick their faces from


@pytest.fixture(scope="module")
def faces(backend):  # noqa: F811
    """Embeddings of the first photos of PEOPLE LFW people, from the server under test, and its 1:N threshold."""
    b: Backend = backend
    multi, _ = lfw_people()
    emb = {}
    for person in list(multi)[:PEOPLE]:
        for photo in multi[person][:4]:
            r = b.stub.Embed(pb.EmbedRequest(image=image(photo), face_options=CENTRED), timeout=60)
            if r.faces:
                emb[photo] = (person, np.asarray(r.faces[0].embedding, np.float32))
    cid = new_collection(b)
    probe = next(iter(emb.values()))[1]
    search = b.stub.SearchByEmbedding(pb.SearchByEmbeddingRequest(collection=cid, embedding=probe), timeout=10)
    return emb, search.min_similarity


def new_collection(b: Backend, **kw) -> str:
    cid = "p-" + uuid.uuid4().hex[:12]
    b.stub.CreateCollection(
        pb.CreateCollectionRequest(collection=cid, liveness_policy=pb.LIVENESS_POLICY_OPTIONAL, **kw), timeout=10
    )
    return cid


def register(b: Backend, cid: str, subject: str, photo: str, **kw) -> pb.RegisterResponse:
    return b.stub.Register(
        pb.RegisterRequest(
            collection=cid, subject_id=subject, image=image(photo), skip_liveness=True, face_options=CENTRED, **kw
        ),
        timeout=60,
    )


def sim(faces, a: str, b: str) -> float:
    return float(faces[0][a][1] @ faces[0][b][1])


def same_person_pair(faces, above: float) -> tuple[str, str]:
    """Two photos of one person at or above `above` (margin kept off the threshold itself)."""
    emb = faces[0]
    for a, b in itertools.combinations(emb, 2):
        if emb[a][0] == emb[b][0] and sim(faces, a, b) >= above + 0.05:
            return a, b
    pytest.fail(f"no two photos of one person reach {above} among {len(emb)} LFW photos")


def stranger(faces, *photos: str) -> str:
    """A photo of someone else, well below the 1:N threshold against each of `photos`."""
    emb, thr = faces
    people = {emb[p][0] for p in photos}
    for c in emb:
        if emb[c][0] not in people and all(sim(faces, c, p) < thr - 0.1 for p in photos):
            return c
    pytest.fail("no stranger found")


# -- the duplicate check -------------------------------------------------------------------------
def test_a_second_subject_with_the_same_face_is_refused_someone_else_is_registered(backend, faces):  # noqa: F811
    b, (_, thr) = backend, faces
    a, same = same_person_pair(faces, thr)
    other = stranger(faces, a, same)
    cid = new_collection(b)
    first = register(b, cid, "s1", a)
    assert not first.HasField("duplicate")
    for call, req in (
        (b.stub.Register, pb.RegisterRequest(collection=cid, subject_id="s2", image=image(same), skip_liveness=True)),
        (b.stub.Process, pb.ProcessRequest(collection=cid, subject_id="s2", image=image(same), skip_liveness=True)),
    ):
        req.face_options.CopyFrom(CENTRED)
        info = expect_error(call, req, PRECONDITION, "DUPLICATE_FACE")
        assert info.metadata["subject_id"] == "s1" and info.metadata["face_id"] == first.face.face_id
        assert float(info.metadata["similarity"]) == pytest.approx(sim(faces, a, same), abs=2e-3)
        assert float(info.metadata["threshold"]) == pytest.approx(thr, abs=1e-4)
    assert b.sql("SELECT COUNT(*) FROM subjects WHERE collection_id = ?", cid)[0][0] == 1  # nothing written
    # someone else is registered; the same person's second photo added to their own subject is no duplicate
    assert register(b, cid, "s3", other).subject_created
    added = register(b, cid, "s1", same, add_face=True)
    assert added.subject.face_count == 2 and not added.HasField("duplicate")


def test_a_staged_face_is_checked_again_at_register(backend, faces):  # noqa: F811
    b, (_, thr) = backend, faces
    a, same = same_person_pair(faces, thr)
    cid = new_collection(b)
    staged = b.stub.Process(
        pb.ProcessRequest(collection=cid, subject_id="late", image=image(same), skip_liveness=True, face_options=CENTRED),
        timeout=60,
    )
    register(b, cid, "early", a)  # the same person, committed while "late" waited in staging
    info = expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=cid, subject_id="late", staging_token=staged.staging_token),
        PRECONDITION,
        "DUPLICATE_FACE",
    )
    assert info.metadata["subject_id"] == "early"


def test_a_staged_face_meets_the_liveness_policy_and_threshold_in_force_at_register(backend, faces):  # noqa: F811
    """The operator may require liveness, or raise the collection's liveness threshold, while a face
    waits in staging: Register holds it to the collection as it is then, not as it was at Process."""
    b, (emb, _) = backend, faces
    cid = new_collection(b)
    photo = next(iter(emb))
    unchecked = b.stub.Process(
        pb.ProcessRequest(collection=cid, subject_id="s1", image=image(photo), skip_liveness=True, face_options=CENTRED),
        timeout=60,
    )
    real = image("liveness/real_01_minivision_T1.jpg")
    checked = b.stub.Process(pb.ProcessRequest(collection=cid, subject_id="s2", image=real), timeout=60)
    assert checked.liveness.is_live
    b.stub.UpdateCollection(
        pb.UpdateCollectionRequest(
            collection=cid,
            liveness_policy=pb.LIVENESS_POLICY_REQUIRED,
            thresholds=pb.CollectionThresholds(liveness_threshold=min(1.0, checked.liveness.score + 0.001)),
            update_mask=field_mask_pb2.FieldMask(paths=["liveness_policy", "thresholds"]),
        ),
        timeout=10,
    )
    expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=cid, subject_id="s1", staging_token=unchecked.staging_token),
        PRECONDITION,
        "LIVENESS_REQUIRED",
    )
    expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=cid, subject_id="s2", staging_token=checked.staging_token),
        PRECONDITION,
        "SPOOF_DETECTED",
    )
    assert not b.stub.ListSubjects(pb.ListSubjectsRequest(collection=cid), timeout=10).subjects


def test_duplicates_inside_one_register_batch(backend, faces):  # noqa: F811
    b, (_, thr) = backend, faces
    a, same = same_person_pair(faces, thr)
    other = stranger(faces, a, same)
    cid = new_collection(b)
    items = [
        pb.RegisterBatchRequest(
            item_id=photo,
            register=pb.RegisterRequest(
                collection=cid, subject_id=subject, image=image(photo), skip_liveness=True, face_options=CENTRED
            ),
        )
        for subject, photo in (("x1", a), ("x2", same), ("y", other))
    ]
    answers = list(b.stub.RegisterBatch(iter(items), timeout=120))
    assert [r.item_id for r in answers] == [a, same, other]
    assert answers[0].result.subject_created and answers[2].result.subject_created
    assert answers[1].error.reason == "DUPLICATE_FACE" and answers[1].error.metadata["subject_id"] == "x1"
    assert answers[1].error.code == PRECONDITION.value[0]


def test_warn_registers_and_reports_off_does_not_look(backend, faces):  # noqa: F811
    b, (_, thr) = backend, faces
    a, same = same_person_pair(faces, thr)
    warn = new_collection(b, duplicate_policy=pb.DUPLICATE_POLICY_WARN)
    first = register(b, warn, "s1", a)
    staged = b.stub.Process(
        pb.ProcessRequest(collection=warn, subject_id="s2", image=image(same), skip_liveness=True, face_options=CENTRED),
        timeout=60,
    )
    assert staged.duplicate.subject_id == "s1" and staged.duplicate.threshold == pytest.approx(thr, abs=1e-4)
    second = b.stub.Register(pb.RegisterRequest(collection=warn, subject_id="s2", staging_token=staged.staging_token), timeout=30)
    assert second.subject_created and second.duplicate.subject_id == "s1"
    assert second.duplicate.face_id == first.face.face_id and second.duplicate.similarity >= thr

    off = new_collection(b, duplicate_policy=pb.DUPLICATE_POLICY_OFF)
    register(b, off, "s1", a)
    assert not register(b, off, "s2", same).HasField("duplicate")
    # the policy is the collection's: switched to REJECT, the next duplicate is refused
    b.stub.UpdateCollection(
        pb.UpdateCollectionRequest(
            collection=off,
            duplicate_policy=pb.DUPLICATE_POLICY_REJECT,
            update_mask=field_mask_pb2.FieldMask(paths=["duplicate_policy"]),
        ),
        timeout=10,
    )
    expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=off, subject_id="s3", image=image(same), skip_liveness=True, face_options=CENTRED),
        PRECONDITION,
        "DUPLICATE_FACE",
    )


# -- thresholds ------------------------------------------------------------------------------------
def test_collection_thresholds_are_stored_checked_and_used(backend, faces):  # noqa: F811
    b, (_, thr) = backend, faces
    a, same = same_person_pair(faces, thr)
    s = sim(faces, a, same)
    strict = pb.CollectionThresholds(match_threshold=min(0.99, s + 0.05), search_threshold=min(0.99, s + 0.05))
    cid = new_collection(b, thresholds=strict)
    got = b.stub.GetCollection(pb.GetCollectionRequest(collection=cid), timeout=10).collection
    assert got.thresholds.search_threshold == pytest.approx(strict.search_threshold)
    assert got.duplicate_policy == pb.DUPLICATE_POLICY_REJECT
    register(b, cid, "s1", a)
    # above the pair's similarity, the collection's 1:N threshold lets the second photo in as a new subject...
    assert not register(b, cid, "s2", same).HasField("duplicate")
    # ... and Search and Verify apply the collection's thresholds when the request leaves them at 0
    found = b.stub.Search(pb.SearchRequest(collection=cid, image=image(a), skip_liveness=True, face_options=CENTRED), timeout=60)
    assert found.min_similarity == pytest.approx(strict.search_threshold)
    assert [m.subject_id for m in found.results[0].matches] == ["s1"]
    v = b.stub.Verify(
        pb.VerifyRequest(collection=cid, subject_id="s1", image=image(same), skip_liveness=True, face_options=CENTRED),
        timeout=60,
    )
    assert v.threshold == pytest.approx(strict.match_threshold) and not v.match
    # back to the server's defaults (0) through the update mask: the pair is a duplicate again
    r = b.stub.UpdateCollection(
        pb.UpdateCollectionRequest(collection=cid, update_mask=field_mask_pb2.FieldMask(paths=["thresholds"])), timeout=10
    )
    assert r.collection.thresholds == pb.CollectionThresholds()
    expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=cid, subject_id="s3", image=image(same), skip_liveness=True, face_options=CENTRED),
        PRECONDITION,
        "DUPLICATE_FACE",
    )


def test_thresholds_below_the_server_floors_are_refused(backend):  # noqa: F811
    b = backend
    for thresholds, field in (
        (pb.CollectionThresholds(match_threshold=0.01), "thresholds.match_threshold"),
        (pb.CollectionThresholds(search_threshold=0.01), "thresholds.search_threshold"),
        (pb.CollectionThresholds(liveness_threshold=0.01), "thresholds.liveness_threshold"),
        (pb.CollectionThresholds(search_threshold=1.5), "thresholds.search_threshold"),
    ):
        info = expect_error(
            b.stub.CreateCollection,
            pb.CreateCollectionRequest(collection="p-" + uuid.uuid4().hex[:12], thresholds=thresholds),
            INVALID,
            "VALIDATION_FAILED",
        )
        assert info.metadata["field"] == field
    cid = new_collection(b)
    for mask, msg in ((["thresholds.liveness_threshold"], pb.CollectionThresholds(liveness_threshold=0.01)), (["nope"], None)):
        expect_error(
            b.stub.UpdateCollection,
            pb.UpdateCollectionRequest(collection=cid, thresholds=msg, update_mask=field_mask_pb2.FieldMask(paths=mask)),
            INVALID,
            "VALIDATION_FAILED",
        )
    expect_error(b.stub.UpdateCollection, pb.UpdateCollectionRequest(collection=cid), INVALID, "VALIDATION_FAILED")
    # a liveness threshold a collection raised is the floor of its requests
    b.stub.UpdateCollection(
        pb.UpdateCollectionRequest(
            collection=cid,
            thresholds=pb.CollectionThresholds(liveness_threshold=0.9),
            update_mask=field_mask_pb2.FieldMask(paths=["thresholds.liveness_threshold"]),
        ),
        timeout=10,
    )
    info = expect_error(
        b.stub.Verify,
        pb.VerifyRequest(collection=cid, subject_id="nobody", image=image("dev/img1.jpg"), liveness_threshold=0.6),
        INVALID,
        "VALIDATION_FAILED",
    )
    assert float(info.metadata["floor"]) == pytest.approx(0.9)


def test_calibration_on_embedding_pairs_and_photo_pairs(backend, faces):  # noqa: F811
    b, (emb, _) = backend, faces
    cid = new_collection(b)
    pairs, genuine, impostor = [], [], []
    for x, y in itertools.combinations(emb, 2):
        same = emb[x][0] == emb[y][0]
        pairs.append(
            pb.LabelledPair(first=pb.PairMember(embedding=emb[x][1]), second=pb.PairMember(embedding=emb[y][1]), same_person=same)
        )
        (genuine if same else impostor).append(sim(faces, x, y))
    genuine, impostor = np.array(genuine), np.array(impostor)
    r = b.stub.CalibrateThreshold(pb.CalibrateThresholdRequest(collection=cid, pairs=pairs, target_far=0.01), timeout=60)
    assert (r.genuine_pairs, r.impostor_pairs, r.skipped_pairs) == (len(genuine), len(impostor), 0)
    allowed = int(0.01 * len(impostor))
    # 1e-6: the server normalises each embedding again before its dot products, which moves a score by an ulp or two
    assert (impostor >= r.threshold + 1e-6).sum() <= allowed < (impostor >= np.sort(impostor)[::-1][allowed] - 1e-6).sum()
    assert r.far == pytest.approx((impostor >= r.threshold + 1e-6).mean(), abs=1e-3) and r.far <= 0.01
    assert r.tar == pytest.approx((genuine >= r.threshold).mean(), abs=1e-2) and 0.5 < r.auc <= 1
    # photos: one pair of one person, one of two people, one photo without a usable face (skipped)
    a, same = same_person_pair(faces, -1)
    other = stranger(faces, a)
    photo_pairs = [
        pb.LabelledPair(first=pb.PairMember(image=image(a)), second=pb.PairMember(image=image(same)), same_person=True),
        pb.LabelledPair(first=pb.PairMember(image=image(a)), second=pb.PairMember(image=image(other)), same_person=False),
        pb.LabelledPair(first=pb.PairMember(image=image(a)), second=pb.PairMember(image=image(other)), same_person=False),
        pb.LabelledPair(
            first=pb.PairMember(image=image(a)), second=pb.PairMember(image=image("dev/noface_rocket.jpg")), same_person=False
        ),
    ]
    r = b.stub.CalibrateThreshold(
        pb.CalibrateThresholdRequest(collection=cid, pairs=photo_pairs, target_far=0.5, face_options=CENTRED), timeout=120
    )
    assert (r.genuine_pairs, r.impostor_pairs, r.skipped_pairs) == (1, 2, 1) and r.tar == 1.0
    assert r.threshold > sim(faces, a, other) - 2e-3 and r.model == "w600k_mbf"
    for bad in (
        pb.CalibrateThresholdRequest(collection=cid, pairs=pairs, target_far=0.0001),  # too few impostors to tell
        pb.CalibrateThresholdRequest(collection=cid, pairs=pairs, target_far=1.5),
        # below one in the most pairs a request may hold (5e-324 overflowed when the error counted the pairs needed)
        pb.CalibrateThresholdRequest(collection=cid, pairs=pairs, target_far=5e-324),
        pb.CalibrateThresholdRequest(collection=cid, pairs=pairs, target_far=1e-300),
        pb.CalibrateThresholdRequest(collection=cid, pairs=pairs, target_far=1 / 20_000),  # 19 999 impostors at most
        pb.CalibrateThresholdRequest(collection=cid, pairs=pairs, target_far=float("nan")),
        pb.CalibrateThresholdRequest(collection=cid, pairs=[pb.LabelledPair(same_person=True)], target_far=0.1),
        # 33 pairs of photos: more photos than one request may decode (as DetectBatch), refused before any work
        pb.CalibrateThresholdRequest(collection=cid, pairs=[photo_pairs[0]] * 33, target_far=0.1),
    ):
        expect_error(b.stub.CalibrateThreshold, bad, INVALID, "VALIDATION_FAILED")


# -- find-similar and grouping ---------------------------------------------------------------------
def test_find_similar_leaves_out_the_probe_subject(backend, faces):  # noqa: F811
    b, (_, thr) = backend, faces
    a, same = same_person_pair(faces, thr)
    other = stranger(faces, a, same)
    cid = new_collection(b, duplicate_policy=pb.DUPLICATE_POLICY_OFF)
    probe = register(b, cid, "s1", a).face.face_id
    register(b, cid, "s2", same)
    register(b, cid, "s3", other)
    r = b.stub.FindSimilar(pb.FindSimilarRequest(collection=cid, face_id=probe), timeout=10)
    assert r.subject_id == "s1" and [m.subject_id for m in r.matches] == ["s2"]
    assert r.matches[0].similarity == pytest.approx(sim(faces, a, same), abs=2e-3) and r.min_similarity == pytest.approx(thr)
    low = b.stub.FindSimilar(pb.FindSimilarRequest(collection=cid, face_id=probe, min_similarity=0.16, top_k=5), timeout=10)
    assert "s1" not in {m.subject_id for m in low.matches}
    expect_error(
        b.stub.FindSimilar, pb.FindSimilarRequest(collection=cid, face_id="0" * 32), grpc.StatusCode.NOT_FOUND, "FACE_NOT_FOUND"
    )


def _linked_sets(x: np.ndarray, threshold: float) -> list[list[int]]:
    """The reference: connected sets of the full similarity graph, by breadth-first search."""
    adjacent = (x @ x.T) >= threshold
    seen, out = np.zeros(len(x), bool), []
    for i in range(len(x)):
        if seen[i]:
            continue
        members, todo = [], [i]
        seen[i] = True
        while todo:
            j = todo.pop()
            members.append(j)
            new = np.flatnonzero(adjacent[j] & ~seen)
            seen[new] = True
            todo.extend(new.tolist())
        out.append(sorted(members))
    return sorted(out, key=lambda g: (-len(g), g[0]))


def test_grouping_joins_exactly_the_linked_faces_at_the_cost_of_the_similarities():
    """group() against a breadth-first search of the whole similarity graph, on sets wider than its
    block of rows: people with many photos, a chain where each face resembles only the next, and
    faces that all resemble each other. That last set links every pair, which a Python union-find
    joined one by one at many times the CPU of computing the similarities: a GroupFaces call of a
    few bytes took seconds. It stays within a few times that cost."""
    from server.domain.grouping import BLOCK, group

    rng = np.random.default_rng(7)

    def unit(a):
        return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)

    people = unit(np.repeat(rng.standard_normal((30, 512)), 40, axis=0) + 0.8 * rng.standard_normal((1200, 512)))
    steps = np.cumsum(0.35 * rng.standard_normal((1200, 512)), axis=0)
    chain = unit(steps[rng.permutation(1200)])  # shuffled, so the links cross the blocks every way
    assert len(people) > BLOCK and len(chain) > BLOCK
    for x, threshold in ((people, 0.3), (people, 0.6), (chain, 0.3)):
        assert group(x, threshold) == _linked_sets(x, threshold)
    alike = unit(rng.standard_normal(512) + 0.3 * rng.standard_normal((5000, 512)))
    t0 = time.process_time()
    sims = alike @ alike.T
    np.nonzero(sims >= 0.3)
    peer = time.process_time() - t0
    t0 = time.process_time()
    assert group(alike, 0.3) == [list(range(5000))]
    assert time.process_time() - t0 < 4 * peer


def test_group_photos_and_stored_faces(backend, faces):  # noqa: F811
    b, (_, thr) = backend, faces
    a, same = same_person_pair(faces, thr)
    other = stranger(faces, a, same)
    photos = [a, other, same, "dev/noface_rocket.jpg"]
    cid = new_collection(b, duplicate_policy=pb.DUPLICATE_POLICY_OFF)
    r = b.stub.GroupFaces(
        pb.GroupFacesRequest(
            collection=cid, images=[pb.BatchImage(item_id=p, image=image(p)) for p in photos], face_options=CENTRED
        ),
        timeout=120,
    )
    assert [[m.item_id for m in g.members] for g in r.groups] == [[a, same]]
    assert [m.item_id for m in r.singletons] == [other]
    assert [(f.item_id, f.error.reason) for f in r.failed] == [("dev/noface_rocket.jpg", "NO_FACE_DETECTED")]
    # the collection's faces: two subjects that are one person come out as one group
    ids = {register(b, cid, s, p).face.face_id: s for s, p in (("s1", a), ("s2", same), ("s3", other))}
    r = b.stub.GroupFaces(pb.GroupFacesRequest(collection=cid), timeout=60)
    assert [sorted(m.subject_id for m in g.members) for g in r.groups] == [["s1", "s2"]]
    assert [m.subject_id for m in r.singletons] == ["s3"] and {m.face_id for m in r.singletons} <= set(ids)
    expect_error(
        b.stub.GroupFaces,
        pb.GroupFacesRequest(collection=cid, face_ids=["0" * 32]),
        grpc.StatusCode.NOT_FOUND,
        "FACE_NOT_FOUND",
    )


# -- privacy: export, retention, erasure, the audit log --------------------------------------------
def test_export_holds_the_subject_its_faces_and_their_crops(backend, faces):  # noqa: F811
    b, (_, thr) = backend, faces
    a, same = same_person_pair(faces, thr)
    cid = new_collection(b)
    first = register(b, cid, "s1", a, metadata={"employee": "17"})
    second = register(b, cid, "s1", same, add_face=True)
    r = b.stub.ExportSubject(pb.ExportSubjectRequest(collection=cid, subject_id="s1"), timeout=10)
    assert r.collection == cid and r.subject.metadata == {"employee": "17"} and r.export_time.seconds > 0
    assert [(f.face_id, f.model, f.has_crop) for f in r.subject.faces] == [
        (first.face.face_id, "w600k_mbf", True),
        (second.face.face_id, "w600k_mbf", True),
    ]
    assert all(f.quality > 0 and f.create_time.seconds > 0 for f in r.subject.faces)
    crops = {c.face_id: cv2.imdecode(np.frombuffer(c.png, np.uint8), cv2.IMREAD_COLOR) for c in r.crops}
    assert set(crops) == {first.face.face_id, second.face.face_id}
    assert all(c.shape == (112, 112, 3) for c in crops.values())
    expect_error(
        b.stub.ExportSubject,
        pb.ExportSubjectRequest(collection=cid, subject_id="nobody"),
        grpc.StatusCode.NOT_FOUND,
        "SUBJECT_NOT_FOUND",
    )


def test_faces_past_the_collection_retention_are_deleted_by_the_job(backend, faces):  # noqa: F811
    b, (_, thr) = backend, faces
    a, same = same_person_pair(faces, thr)
    other = stranger(faces, a, same)
    cid = new_collection(b, retention_days=30)
    old = register(b, cid, "old", a).face.face_id
    young = register(b, cid, "young", other).face.face_id
    day = 86_400_000
    b.sql("UPDATE faces SET created_ms = created_ms - ? WHERE face_id = ?", 31 * day, old)  # registered 31 days ago
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and b.sql("SELECT COUNT(*) FROM faces WHERE face_id = ?", old)[0][0]:
        time.sleep(0.2)
    assert not b.sql("SELECT COUNT(*) FROM faces WHERE face_id = ?", old)[0][0], "the retention job did not run"
    assert [tuple(r) for r in b.sql("SELECT face_id FROM faces WHERE collection_id = ?", cid)] == [(young,)]
    subject = b.stub.GetSubject(pb.GetSubjectRequest(collection=cid, subject_id="old"), timeout=10).subject
    assert subject.face_count == 0  # the subject stays, without the face
    # out of the index too: the same person can now be enrolled as a new subject without a duplicate
    assert register(b, cid, "new", same).subject_created
    events = b.stub.ListAuditEvents(pb.ListAuditEventsRequest(collection=cid, subject_id="old"), timeout=10).events
    assert ("retention", "DeleteFace", old, "OK") in [(e.key_id, e.action, e.face_id, e.outcome) for e in events]
    assert b.stub.GetCollection(pb.GetCollectionRequest(collection=cid), timeout=10).collection.retention_days == 30


def test_the_audit_log_lists_who_did_what_page_by_page(backend, faces):  # noqa: F811
    b, (_, thr) = backend, faces
    a, same = same_person_pair(faces, thr)
    cid = new_collection(b)
    register(b, cid, "s1", a)
    expect_error(
        b.stub.Register,
        pb.RegisterRequest(collection=cid, subject_id="s2", image=image(same), skip_liveness=True, face_options=CENTRED),
        PRECONDITION,
        "DUPLICATE_FACE",
    )
    secret = b.stub.CreateApiKey(pb.CreateApiKeyRequest(collection=cid), timeout=10)
    gate = b.server.stub(secret.secret)
    gate.Verify(
        pb.VerifyRequest(collection=cid, subject_id="s1", image=image(same), skip_liveness=True, face_options=CENTRED),
        timeout=60,
    )
    items = [
        pb.RegisterBatchRequest(
            item_id="x",
            register=pb.RegisterRequest(
                collection=cid, subject_id="s3", image=image(same), skip_liveness=True, face_options=CENTRED
            ),
        )
    ]
    assert list(gate.RegisterBatch(iter(items), timeout=60))[0].error.reason == "DUPLICATE_FACE"
    b.stub.DeleteSubject(pb.DeleteSubjectRequest(collection=cid, subject_id="s1"), timeout=10)
    expect_error(
        gate.ListAuditEvents, pb.ListAuditEventsRequest(collection=cid), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"
    )
    seen, token = [], ""
    for _ in range(10):
        page = b.stub.ListAuditEvents(pb.ListAuditEventsRequest(collection=cid, page_size=2, page_token=token), timeout=10)
        assert len(page.events) <= 2
        seen += page.events
        token = page.next_page_token
        if not token:
            break
    got = [(e.key_id, e.action, e.subject_id, e.outcome) for e in reversed(seen)]  # oldest first
    key = secret.key.key_id
    assert got == [
        ("admin", "CreateCollection", "", "OK"),
        ("admin", "Register", "s1", "OK"),
        ("admin", "Register", "s2", "FAILED_PRECONDITION DUPLICATE_FACE"),
        ("admin", "CreateApiKey", "", "OK"),
        (key, "Verify", "s1", "OK"),
        (key, "Register", "s3", "FAILED_PRECONDITION DUPLICATE_FACE"),
        ("admin", "DeleteSubject", "s1", "OK"),
    ]
    assert all(e.collection == cid for e in seen) and [e.seq for e in seen] == sorted((e.seq for e in seen), reverse=True)
    assert all(abs(e.time.seconds - time.time()) < 300 for e in seen)
    # a tampered token is refused, not an INTERNAL: '²' is a digit to str.isdigit() and not to int(),
    # and SQLite takes no integer of 2**63 or more
    for after in ("\u00b2", "9" * 20, "-1", "1e3", " 12"):
        raw = json.dumps({"a": after, "s": f"audit:{cid}:"}).encode()
        forged = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        request = pb.ListAuditEventsRequest(collection=cid, page_token=forged)
        expect_error(b.stub.ListAuditEvents, request, grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_FAILED")
