"""1:N search on the hnswlib index, end to end: the 150 LFW identities registered through a real
server, then searched with other photos of them and with the 50 never-registered people."""
from __future__ import annotations

import sqlite3
import threading
from contextlib import closing

import grpc
import numpy as np
import pytest

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from tests.conftest import FACES, ServerProcess, expect_error, image

COLL = "lfw"
# LFW photos are centred crops, some with a partial second face: say which face is meant
CENTRED = pb.FaceOptions(selection=pb.FACE_SELECTION_MOST_CENTRAL)


def lfw_people() -> tuple[dict[str, list[str]], list[str]]:
    """{person: [photos]} for the 150 with several photos, and the 50 single-photo people."""
    multi, single = {}, []
    for d in sorted(p for p in (FACES / "lfw").iterdir() if p.is_dir()):
        photos = sorted(f"lfw/{d.name}/{f.name}" for f in d.glob("*.jpg"))
        if len(photos) > 1:
            multi[d.name] = photos
        else:
            single.append(photos[0])
    assert len(multi) == 150 and len(single) == 50, "../shared/faces/lfw is not the expected set"
    return multi, single


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A server whose collection holds one photo of each of the 150 people; {person: probe photos}."""
    tmp = tmp_path_factory.mktemp("search")
    srv = ServerProcess(log_path=tmp / "server.log")
    stub = pb_grpc.FaceServiceStub(srv.channel)
    stub.CreateCollection(pb.CreateCollectionRequest(collection_id=COLL, liveness_policy=pb.LIVENESS_POLICY_OPTIONAL),
                          timeout=10)
    multi, single = lfw_people()
    probes, refused = {}, []
    for person, photos in multi.items():
        for i, photo in enumerate(photos):  # the first photo that passes the enrolment gate; the others probe
            try:
                stub.Register(pb.RegisterRequest(collection=COLL, subject_id=person, image=image(photo),
                                                 skip_liveness=True, face_options=CENTRED), timeout=60)
                probes[person] = [p for j, p in enumerate(photos) if j != i]
                break
            except grpc.RpcError as exc:
                refused.append((photo, exc.code().name))
    print(f"\nregistered {len(probes)}/150 people; enrolment photos refused by the gate: {len(refused)} {refused[:5]}")
    assert len(probes) >= 149
    yield srv, stub, probes, single, tmp
    srv.stop()


def search(stub, photo, **kw) -> pb.SearchResponse:
    return stub.Search(pb.SearchRequest(collection=COLL, image=image(photo), skip_liveness=True, **kw), timeout=60)


def test_rank1_identification_matches_exact_search(gallery):
    srv, stub, probes, _, tmp = gallery
    # the exact answer: every stored embedding against every probe's embedding (from Embed, same face choice)
    with closing(sqlite3.connect(tmp / "data" / "facesvc.db")) as conn:
        rows = conn.execute("SELECT subject_id, embedding FROM faces WHERE collection_id = ?", (COLL,)).fetchall()
    names = [r[0] for r in rows]
    matrix = np.stack([np.frombuffer(r[1], "<f4") for r in rows])
    hnsw_right = exact_right = agree = total = 0
    for person, photos in probes.items():
        photo = photos[0]
        resp = search(stub, photo, min_similarity=-0.99, top_k=5)
        top = resp.results[0].matches[0].subject_id
        emb = np.asarray(stub.Embed(pb.EmbedRequest(image=image(photo)), timeout=60).faces[0].embedding, np.float32)
        exact = names[int(np.argmax(matrix @ emb))]
        total += 1
        hnsw_right += top == person
        exact_right += exact == person
        agree += top == exact
    print(f"\nrank-1: hnsw {hnsw_right}/{total}, exact {exact_right}/{total}, hnsw == exact {agree}/{total}")
    assert agree == total  # 150 faces: the graph search is exact here
    assert hnsw_right >= 0.95 * total


def test_unregistered_people_get_no_match(gallery):
    _, stub, _, single, _ = gallery
    matched = [photo for photo in single if search(stub, photo).results[0].matches]
    print(f"\nnever-registered people with a match above the threshold: {len(matched)}/{len(single)} {matched}")
    assert len(matched) <= 2


def test_matches_are_one_per_subject_best_first(gallery):
    _, stub, probes, _, _ = gallery
    person = next(iter(probes))
    resp = search(stub, probes[person][0], top_k=10, min_similarity=-0.99)
    matches = resp.results[0].matches
    assert len(matches) == 10 and len({m.subject_id for m in matches}) == 10
    assert [m.similarity for m in matches] == sorted((m.similarity for m in matches), reverse=True)
    assert resp.min_similarity == pytest.approx(-0.99)
    default = search(stub, probes[person][0])
    assert default.min_similarity == pytest.approx(0.31) and all(m.similarity >= 0.31 for m in default.results[0].matches)


def test_search_by_embedding_and_its_validation(gallery):
    _, stub, probes, _, _ = gallery
    person, photos = next(iter(probes.items()))
    emb = stub.Embed(pb.EmbedRequest(image=image(photos[0])), timeout=60)
    resp = stub.SearchByEmbedding(pb.SearchByEmbeddingRequest(collection=COLL, embedding=list(emb.faces[0].embedding),
                                                              model=emb.model), timeout=10)
    assert resp.matches[0].subject_id == person
    bad = [pb.SearchByEmbeddingRequest(collection=COLL, embedding=[0.1] * 128),
           pb.SearchByEmbeddingRequest(collection=COLL, embedding=list(emb.faces[0].embedding), model="mobilefacenet_128"),
           pb.SearchByEmbeddingRequest(collection=COLL, embedding=[0.0] * 512),
           pb.SearchByEmbeddingRequest(collection=COLL, embedding=[0.1] * 512, top_k=1000)]
    for req in bad:
        expect_error(stub.SearchByEmbedding, req, grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_FAILED")
    expect_error(stub.SearchByEmbedding, pb.SearchByEmbeddingRequest(collection="nope", embedding=[0.1] * 512),
                 grpc.StatusCode.NOT_FOUND, "COLLECTION_NOT_FOUND")


def test_all_faces_and_spoofs(gallery):
    _, stub, _, _, _ = gallery
    group = stub.Search(pb.SearchRequest(collection=COLL, image=image("dev/group_t1.jpg"), all_faces=True,
                                         skip_liveness=True), timeout=60)
    assert len(group.results) == 6
    spoof = "liveness/spoof_replay_01_minivision_F2.jpg"
    expect_error(stub.Search, pb.SearchRequest(collection=COLL, image=image(spoof)),
                 grpc.StatusCode.FAILED_PRECONDITION, "SPOOF_DETECTED")
    many = stub.Search(pb.SearchRequest(collection=COLL, image=image(spoof), all_faces=True), timeout=60)
    assert not many.results[0].liveness.is_live and not many.results[0].matches


def test_concurrent_search_and_register_lose_nothing(gallery):
    _, stub, probes, _, _ = gallery
    people = list(probes)[:6]
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher():
        while not stop.is_set():
            try:
                search(stub, probes[people[0]][0], top_k=3)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i, person in enumerate(people):  # a second face for six people while searches run
            stub.Register(pb.RegisterRequest(collection=COLL, subject_id=person, image=image(probes[person][-1]),
                                             add_face=True, skip_liveness=True, face_options=CENTRED), timeout=60)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    stats = stub.GetIndexStats(pb.GetIndexStatsRequest(collection=COLL), timeout=10)
    subjects = stub.GetCollection(pb.GetCollectionRequest(collection=COLL), timeout=10).collection
    assert stats.size == subjects.face_count  # no face lost between the database and the index
    assert stats.dimension == 512 and stats.model == "w600k_mbf" and stats.m == 16 and stats.memory_bytes > 0


def test_deleted_subject_is_never_returned_also_after_restart(gallery):
    srv, stub, probes, _, tmp = gallery
    def top(stub_, p):
        m = search(stub_, probes[p][0]).results[0].matches
        return m[0].subject_id if m else None

    person = next(p for p in reversed(list(probes)) if top(stub, p) == p)
    stub.DeleteSubject(pb.DeleteSubjectRequest(collection=COLL, subject_id=person), timeout=10)
    assert person not in [m.subject_id for m in search(stub, probes[person][0], min_similarity=-0.99,
                                                       top_k=100).results[0].matches]
    # a second server on the same database rebuilds its index from it
    other = ServerProcess(log_path=tmp / "restart.log", env={"FACESVC_DATA_DIR": str(tmp / "data")})
    try:
        stub2 = pb_grpc.FaceServiceStub(other.channel)
        hits = search(stub2, probes[person][0], min_similarity=-0.99, top_k=100).results[0].matches
        assert hits and person not in [m.subject_id for m in hits]
        kept = [p for p in list(probes)[:20] if top(stub, p) == p]
        assert kept and all(top(stub2, p) == p for p in kept)  # the rebuilt index answers as the old one
    finally:
        other.stop()
