"""HnswIndex on its own: the size-dependent ef, large-k queries and segments (no database).

The recall these parameters buy at 200 k and 1 M faces is measured by scripts/bench_search.py;
here the rules themselves are checked, and that the index applies them as it grows and after a
restart. Segments are tested small (a few hundred faces per graph), with ef high enough that
each graph's answer is exact, so the merged answer must equal a brute-force one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading

import numpy as np
import pytest

from server.index import hnsw
from server.index.hnsw import HnswIndex, HnswParams
from server.index.snapshot import SnapshotError, SnapshotStore

DIM = 64


def units(rng, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def filled(params: HnswParams, n: int, seed: int = 0) -> tuple[HnswIndex, np.ndarray, list[str]]:
    vecs = units(np.random.default_rng(seed), n)
    ids = [f"f{i:05d}" for i in range(n)]
    idx = HnswIndex(DIM, "test", params)
    for s in range(0, n, 100):
        idx.add(ids[s : s + 100], [f"s{i:05d}" for i in range(s, min(n, s + 100))], vecs[s : s + 100])
    return idx, vecs, ids


def ef_of(idx: HnswIndex) -> int:
    """The ef of the index's one graph."""
    (seg,) = idx._segments
    return seg.graph.ef


def test_auto_ef_follows_the_measured_points_and_grows_monotonically():
    p = HnswParams()
    assert p.ef_search == 0
    assert p.ef_for(0) == p.ef_for(1_000) == p.ef_for(200_000) == 64
    assert p.ef_for(500_000) == 96 and p.ef_for(1_000_000) == 256  # the measured points
    assert p.ef_for(350_000) == 80  # halfway between the first two, linearly
    assert p.ef_for(750_000) == 176  # halfway between the last two
    assert p.ef_for(1_500_000) == 416  # on at the last slope
    assert p.ef_for(p.segment_size) == 96  # the most any graph of the default segment size gets
    sizes = [0, 10_000, 200_001, 350_000, 500_001, 600_000, 750_000, 1_000_000, 1_200_000, 2_000_000, 10**9]
    efs = [p.ef_for(n) for n in sizes]
    assert efs == sorted(efs) and all(e % 16 == 0 for e in efs)
    assert max(efs) == hnsw.AUTO_EF_MAX
    fixed = HnswParams(ef_search=100)
    assert {fixed.ef_for(n) for n in sizes} == {100}


def test_the_index_raises_ef_as_it_grows_and_keeps_it_across_a_snapshot(monkeypatch, tmp_path):
    # the same rule on a small scale: ef 64 up to 200 nodes, 256 at 1 000
    monkeypatch.setattr(hnsw, "AUTO_EF_POINTS", ((200, 64), (1_000, 256)))
    params = HnswParams(m=16, ef_construction=100)
    idx, vecs, _ = filled(params, 200)
    assert idx.stats().params["ef_search"] == 64 == ef_of(idx)
    more = units(np.random.default_rng(1), 800)
    idx.add([f"g{i}" for i in range(800)], [f"t{i}" for i in range(800)], more)
    assert idx.stats().params["ef_search"] == 256 == ef_of(idx)
    # deleted nodes stay in the graph and still count
    idx.apply({}, [f"g{i}" for i in range(400)])
    assert len(idx) == 600 and ef_of(idx) == 256

    snaps = SnapshotStore(tmp_path)
    snaps.write("c", idx, {"collection_created_ms": 0, "change_seq": 0})
    loaded, _ = snaps.load("c", params, {"model": "test", "dimension": DIM, "collection_created_ms": 0, "min_written_ms": 0})
    assert ef_of(loaded) == 256 and loaded.stats().params["ef_search"] == 256
    for q in vecs[:20]:
        assert loaded.search(q, 5, -1.0, 1) == idx.search(q, 5, -1.0, 1)


def test_a_query_for_more_faces_than_ef_returns_them_all_under_the_read_lock():
    # top 20 subjects with up to 10 faces each: 200 faces asked of an index whose ef is 64. hnswlib
    # searches with max(ef, k), so the answer is exact on this small graph without touching the shared ef
    params = HnswParams(m=16, ef_construction=100)
    idx, vecs, ids = filled(params, 500)
    assert ef_of(idx) == 64
    q = vecs[7]
    hits = idx.search(q, 20, -1.0, 10)
    exact = np.argsort(-(vecs @ q))[:20]
    assert [h.face_id for h in hits] == [ids[i] for i in exact]
    assert ef_of(idx) == 64


@pytest.mark.parametrize("ef", [16, 300])
def test_an_explicit_ef_is_used_at_every_size(ef):
    idx, _, _ = filled(HnswParams(m=16, ef_construction=100, ef_search=ef), 300)
    assert ef_of(idx) == ef and idx.stats().params["ef_search"] == ef


SEGMENTED = HnswParams(m=16, ef_construction=100, ef_search=200, initial_capacity=16, segment_size=100)


def exact_subjects(vecs: np.ndarray, subjects: list[str], live: list[bool], q: np.ndarray, top_k: int) -> list[str]:
    order = [i for i in np.argsort(-(vecs @ q), kind="stable") if live[i]]
    out: list[str] = []
    for i in order:
        if subjects[i] not in out:
            out.append(subjects[i])
        if len(out) == top_k:
            break
    return out


def test_a_large_collection_is_split_into_segments_and_answers_as_one_graph():
    rng = np.random.default_rng(3)
    vecs = units(rng, 350)
    ids = [f"f{i:04d}" for i in range(350)]
    subjects = [f"s{i % 120:03d}" for i in range(350)]  # most subjects have faces in two or three segments
    idx = HnswIndex(DIM, "test", SEGMENTED)
    idx.add(ids[:30], subjects[:30], vecs[:30])  # grows the first graph by doubling
    idx.add(ids[30:350], subjects[30:350], vecs[30:350])  # fills it and opens three more in one call
    st = idx.stats()
    assert st.params["segments"] == 4 and [s.nodes for s in idx._segments] == [100, 100, 100, 50]
    assert [s.start for s in idx._segments] == [0, 100, 200, 300] and st.capacity <= 400
    live = [True] * 350
    gone = [5, 150, 151, 260, 349]  # in every segment
    idx.apply({}, [ids[i] for i in gone])
    for i in gone:
        live[i] = False
    assert len(idx) == 345 and idx.stats().deleted == 5 and [s.live for s in idx._segments] == [99, 98, 99, 49]
    for q in units(rng, 40):
        hits = idx.search(q, 10, -1.0, 3)
        assert [h.subject_id for h in hits] == exact_subjects(vecs, subjects, live, q, 10)
        sims = [h.similarity for h in hits]
        assert sims == sorted(sims, reverse=True)
        assert all(abs(h.similarity - float(vecs[ids.index(h.face_id)] @ q)) < 1e-5 for h in hits)
    labels, dist = idx.knn(units(rng, 5), 7)
    assert labels.shape == dist.shape == (5, 7) and (np.diff(dist, axis=1) >= 0).all()
    assert not set(labels.ravel().tolist()) & set(gone)


def test_a_segment_whose_faces_are_all_deleted_is_skipped_and_new_faces_open_a_new_one():
    vecs = units(np.random.default_rng(4), 260)
    ids = [f"f{i}" for i in range(260)]
    idx = HnswIndex(DIM, "test", SEGMENTED)
    idx.add(ids[:200], ids[:200], vecs[:200])
    idx.apply({}, ids[:100])  # the first graph is all deleted
    assert idx._segments[0].live == 0 and len(idx) == 100
    assert idx.search(vecs[3], 1, -1.0, 1)[0].face_id not in ids[:100]
    idx.apply({f: (f, v) for f, v in zip(ids[200:], vecs[200:])}, [])  # the last graph is full: a third
    assert idx.stats().params["segments"] == 3 and idx.search(vecs[230], 1, 0.99, 1)[0].face_id == ids[230]
    idx.apply({}, ids[100:260])
    assert len(idx) == 0 and idx.search(vecs[0], 5, -1.0, 1) == []


def test_segments_survive_a_snapshot_and_grow_on_after_it(tmp_path):
    vecs = units(np.random.default_rng(5), 300)
    ids = [f"f{i}" for i in range(300)]
    idx = HnswIndex(DIM, "test", SEGMENTED)
    idx.add(ids[:250], ids[:250], vecs[:250])
    idx.apply({}, [ids[7], ids[120]])
    snaps = SnapshotStore(tmp_path)
    snaps.write("c", idx, {"collection_created_ms": 0, "change_seq": 0})
    assert len(list(tmp_path.glob("c.*.graph"))) == 3
    loaded, doc = snaps.load("c", SEGMENTED, {"model": "test", "dimension": DIM, "collection_created_ms": 0, "min_written_ms": 0})
    assert doc["format"] == 3 and [s.live for s in loaded._segments] == [99, 99, 50]
    for q in vecs[:30]:
        assert loaded.search(q, 5, -1.0, 1) == idx.search(q, 5, -1.0, 1)
    loaded.add(ids[250:], ids[250:], vecs[250:])  # fills the half-full last graph first
    assert [s.nodes for s in loaded._segments] == [100, 100, 100]
    assert loaded.search(vecs[299], 1, 0.99, 1)[0].face_id == ids[299]
    # a later snapshot replaces every graph file of the earlier one
    snaps.write("c", loaded, {"collection_created_ms": 0, "change_seq": 1})
    assert len(list(tmp_path.glob("c.*.graph"))) == 3


def test_a_snapshot_of_format_1_loads_as_one_segment(tmp_path):
    """What servers before segments wrote: one graph, C.<generation>.graph, and its fields at the top level."""
    idx, vecs, _ = filled(HnswParams(m=16, ef_construction=100), 150)
    snaps = SnapshotStore(tmp_path)
    path = snaps.write("c", idx, {"collection_created_ms": 0, "change_seq": 0})
    doc = json.loads(path.read_bytes().partition(b"\n")[2])
    (graph,) = doc.pop("graphs")
    (seg,) = doc.pop("segments")
    old_name = graph["name"].replace(".0.graph", ".graph")
    (tmp_path / graph["name"]).rename(tmp_path / old_name)
    doc.update(format=1, graph=old_name, graph_bytes=graph["bytes"], graph_sha256=graph["sha256"], capacity=seg["capacity"])
    body = json.dumps(doc).encode()
    path.write_bytes(hashlib.sha256(body).hexdigest().encode() + b"\n" + body)
    # a server with a smaller segment size: the old graph stays whole, new faces go to a new one
    params = HnswParams(m=16, ef_construction=100, segment_size=100)
    loaded, _ = snaps.load("c", params, {"model": "test", "dimension": DIM, "collection_created_ms": 0, "min_written_ms": 0})
    assert loaded.stats().params["segments"] == 1 and len(loaded) == 150
    for q in vecs[:20]:
        assert loaded.search(q, 5, -1.0, 1) == idx.search(q, 5, -1.0, 1)
    loaded.add(["new"], ["s-new"], vecs[:1] * -1)
    assert loaded.stats().params["segments"] == 2 and loaded.search(-vecs[0], 1, 0.99, 1)[0].face_id == "new"


def test_a_busy_search_pool_costs_no_waiting():
    """Every pool thread is taken (by another request, say): the caller searches the segments itself."""
    params = HnswParams(m=16, ef_construction=100, ef_search=200, segment_size=50, search_threads=1)
    vecs = units(np.random.default_rng(6), 200)
    ids = [f"f{i}" for i in range(200)]
    idx = HnswIndex(DIM, "test", params)
    idx.add(ids, ids, vecs)
    release = threading.Event()
    blocker = hnsw.search_pool(1).submit(release.wait, 30)
    try:
        done = []
        t = threading.Thread(target=lambda: done.append(idx.search(vecs[123], 3, -1.0, 1)))
        t.start()
        t.join(10)
        assert done and done[0][0].face_id == ids[123]
    finally:
        release.set()
        blocker.result(10)


def test_searches_run_while_faces_are_added_across_segment_boundaries():
    params = HnswParams(m=16, ef_construction=100, ef_search=100, initial_capacity=8, segment_size=64)
    rng = np.random.default_rng(7)
    vecs = units(rng, 1200)
    ids = [f"f{i}" for i in range(1200)]
    idx = HnswIndex(DIM, "test", params)
    idx.add(ids[:64], ids[:64], vecs[:64])
    errors, stop = [], threading.Event()

    def searcher():
        while not stop.is_set():
            try:
                hits = idx.search(vecs[int(rng.integers(0, 64))], 5, -1.0, 1)
                assert len(hits) == 5
            except Exception as exc:  # noqa: BLE001 - collected for the assertion below
                errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(4)]
    for t in threads:
        t.start()
    for s in range(64, 1200, 37):
        idx.add(ids[s : s + 37], ids[s : s + 37], vecs[s : s + 37])
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors and len(idx) == 1200 and idx.stats().params["segments"] == -(-1200 // 64)
    assert all(idx.search(vecs[i], 1, 0.99, 1)[0].face_id == ids[i] for i in range(0, 1200, 50))


# projected segments: 16 of the 64 dimensions. ef 200 covers a whole segment, so the re-rank sees every
# live face of it and the merged answer must equal a brute-force one, as for the plain graphs above
PROJECTED = HnswParams(
    m=16, ef_construction=100, ef_search=200, initial_capacity=16, segment_size=200, pca_dims=16, pca_min_faces=150
)


def low_rank(rng, n: int, rank: int = 12, noise: float = 0.15) -> np.ndarray:
    """Unit vectors near a rank-`rank` subspace: most of their energy on a few axes, as face embeddings'."""
    basis = np.linalg.qr(rng.standard_normal((DIM, rank)))[0].T
    v = rng.standard_normal((n, rank)) @ basis + noise * rng.standard_normal((n, DIM))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_a_projection_keeps_the_energy_of_the_axes_the_faces_use():
    rng = np.random.default_rng(11)
    faces = low_rank(rng, 2000)
    proj = hnsw.Projection.fit(faces[:1000], 16)
    assert proj.axes.shape == (DIM, 16) and proj.dims == 16 and 0.85 < proj.kept < 1
    assert np.allclose(proj.axes.T @ proj.axes, np.eye(16), atol=1e-5)
    # inner products of faces it was not fitted on survive the projection, to within what it drops
    a, b = faces[1000:1500], faces[1500:]
    err = np.abs(np.sum(proj(a) * proj(b), axis=1) - np.sum(a * b, axis=1))
    assert err.mean() < 1 - proj.kept
    assert hnsw.Projection.fit(units(rng, 1000), 16).kept < 0.45  # isotropic noise has no such axes


def test_projected_segments_are_made_for_large_collections_and_answer_exactly():
    rng = np.random.default_rng(12)
    vecs = low_rank(rng, 520)
    ids = [f"f{i:04d}" for i in range(520)]
    subjects = [f"s{i % 170:03d}" for i in range(520)]
    idx = HnswIndex(DIM, "test", PROJECTED)
    idx.add(ids[:40], subjects[:40], vecs[:40])  # a small collection: a plain graph, grown by doubling
    assert [s.projection for s in idx._segments] == [None]
    for s in range(40, 520, 60):  # past pca_min_faces the next segments are projected
        idx.add(ids[s : s + 60], subjects[s : s + 60], vecs[s : s + 60])
    segs = idx._segments
    assert [s.projection is not None for s in segs] == [False, True, True] and [s.nodes for s in segs] == [200, 200, 120]
    assert segs[1].graph.dim == 16 and segs[1].vectors.shape[1] == DIM
    st = idx.stats()
    assert st.params["projected_segments"] == 2 and st.size == 520
    # a projected face costs its 16-d graph node plus its full vector beside the graph
    graph_node = ((16 + 2 * 16 + 1) * 4 + 8) * (1 + 1 / 16)
    assert st.memory_bytes >= sum(s.graph.get_max_elements() for s in segs[1:]) * (graph_node + DIM * 4)
    live = [True] * 520
    gone = [3, 250, 251, 460, 519]  # in every segment
    idx.apply({}, [ids[i] for i in gone])
    for i in gone:
        live[i] = False
    assert [s.live for s in segs] == [199, 198, 118]
    for q in np.concatenate([low_rank(rng, 30), vecs[:10]]):
        hits = idx.search(q, 10, -1.0, 3)
        assert [h.subject_id for h in hits] == exact_subjects(vecs, subjects, live, q, 10)
        # the similarities are the full vectors' cosines, not the projection's inner products
        assert all(abs(h.similarity - float(vecs[ids.index(h.face_id)] @ q)) < 1e-5 for h in hits)
    labels, dist = idx.knn(low_rank(rng, 4), 7)
    assert labels.shape == dist.shape == (4, 7) and (np.diff(dist, axis=1) >= 0).all()
    assert not set(labels.ravel().tolist()) & set(gone)
    # a probe that is not of unit length gets the same answer (cosine, as the plain graphs)
    assert idx.search(vecs[300] * 3.5, 1, 0.99, 1)[0].face_id == ids[300]


def test_a_build_from_the_database_projects_its_first_segment_and_plain_parameters_never_do():
    rng = np.random.default_rng(13)
    vecs = low_rank(rng, 300)
    ids = [f"f{i}" for i in range(300)]
    # the registry sizes a build's graph for the faces it will hold (initial_capacity): the first is projected
    built = HnswIndex(DIM, "test", dataclasses.replace(PROJECTED, initial_capacity=200))
    built.add(ids, ids, vecs)
    assert [s.projection is not None for s in built._segments] == [True, True]
    assert built._segments[0].projection.kept > 0.8
    for p in (
        HnswParams(m=16, segment_size=200),
        dataclasses.replace(PROJECTED, pca_dims=0),
        dataclasses.replace(PROJECTED, pca_min_faces=10**6),
    ):
        idx = HnswIndex(DIM, "test", dataclasses.replace(p, initial_capacity=200))
        idx.add(ids, ids, vecs)
        assert [s.projection for s in idx._segments] == [None, None]


def test_a_projected_graph_gets_more_candidates_for_its_re_rank():
    p = HnswParams()
    assert p.ef_for(500_000, projected=True) == 160 and p.ef_for(200_000, projected=True) == 112
    assert HnswParams(ef_search=100).ef_for(500_000, projected=True) == 100


def test_projected_segments_survive_a_snapshot_and_a_damaged_dense_file_is_refused(tmp_path):
    rng = np.random.default_rng(14)
    vecs = low_rank(rng, 450)
    ids = [f"f{i}" for i in range(450)]
    idx = HnswIndex(DIM, "test", PROJECTED)
    for s in range(0, 400, 50):
        idx.add(ids[s : s + 50], ids[s : s + 50], vecs[s : s + 50])
    idx.apply({}, [ids[7], ids[260]])
    snaps = SnapshotStore(tmp_path)
    path = snaps.write("c", idx, {"collection_created_ms": 0, "change_seq": 0})
    assert len(list(tmp_path.glob("c.*.graph"))) == 2 and len(list(tmp_path.glob("c.*.dense"))) == 1
    expect = {"model": "test", "dimension": DIM, "collection_created_ms": 0, "min_written_ms": 0}
    loaded, doc = snaps.load("c", PROJECTED, expect)
    assert [s["projected"] for s in doc["segments"]] == [False, True]
    seg = loaded._segments[1]
    assert np.array_equal(seg.projection.axes, idx._segments[1].projection.axes)
    assert np.array_equal(seg.vectors[:200], idx._segments[1].vectors[:200]) and seg.live == 199
    for q in vecs[:30:3]:
        assert loaded.search(q, 5, -1.0, 1) == idx.search(q, 5, -1.0, 1)
    loaded.add(ids[400:], ids[400:], vecs[400:])  # grows the projected segment's vectors with its graph
    assert [s.nodes for s in loaded._segments] == [200, 200, 50] and loaded._segments[2].projection is not None
    assert all(loaded.search(vecs[i], 1, 0.99, 1)[0].face_id == ids[i] for i in (230, 399, 449))
    # the same server with projection off still reads the projected segments it saved
    plain, _ = snaps.load("c", dataclasses.replace(PROJECTED, pca_dims=0), expect)
    assert plain._segments[1].projection is not None
    # one flipped byte in the dense file: refused before numpy or hnswlib read it
    dense = next(tmp_path.glob("c.*.dense"))
    raw = bytearray(dense.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    dense.write_bytes(bytes(raw))
    with pytest.raises(SnapshotError, match="dense: checksum mismatch"):
        snaps.load("c", PROJECTED, expect)
    dense.unlink()
    with pytest.raises(SnapshotError, match="missing"):
        snaps.load("c", PROJECTED, expect)
    # a later snapshot replaces the dense files too; remove() takes them all
    snaps.write("c", loaded, {"collection_created_ms": 0, "change_seq": 1})
    assert len(list(tmp_path.glob("c.*.dense"))) == 2 and path.exists()
    snaps.remove("c")
    assert not list(tmp_path.iterdir())


def test_a_projected_segment_saved_with_room_takes_new_faces_after_a_load(tmp_path):
    """A snapshot saves a projected segment's vectors as far as it was filled; the graph comes back
    with its room, and so must they: the first face added after a start went past their end."""
    rng = np.random.default_rng(15)
    vecs = low_rank(rng, 170)
    ids = [f"f{i}" for i in range(170)]
    idx = HnswIndex(DIM, "test", PROJECTED.sized_for(160))  # a build from the database: room for what it holds
    idx.add(ids[:160], ids[:160], vecs[:160])
    idx.apply({ids[160]: (ids[160], vecs[160])}, [])  # one Register: the graph doubles its room
    seg = idx._segments[0]
    assert seg.projection is not None and seg.nodes < seg.graph.get_max_elements()
    snaps = SnapshotStore(tmp_path)
    snaps.write("c", idx, {"collection_created_ms": 0, "change_seq": 0})
    expect = {"model": "test", "dimension": DIM, "collection_created_ms": 0, "min_written_ms": 0}
    loaded, _ = snaps.load("c", PROJECTED, expect)
    loaded.apply({f: (f, v) for f, v in zip(ids[161:], vecs[161:])}, [])
    assert len(loaded) == 170
    assert all(loaded.search(vecs[i], 1, 0.99, 1)[0].face_id == ids[i] for i in (0, 160, 161, 169))


def test_a_saved_graph_keeps_no_deleted_vector_and_a_projected_one_no_deleted_row(tmp_path):
    """mark_deleted keeps the vector in hnswlib's memory; the saved graph (and a projected segment's
    dense file) must not hold it: erase_deleted_vectors zeroes it in the file hnswlib wrote."""
    from server.index.hnsw import erase_deleted_vectors

    for params in (HnswParams(m=16, ef_construction=64), HnswParams(m=16, ef_construction=64, pca_dims=16, pca_min_faces=1)):
        idx, vectors, ids = filled(params, 300)
        seg = idx._segments[0]
        assert (seg.projection is not None) == bool(params.pca_dims)
        stored = np.asarray(seg.graph.get_items([7]), np.float32)[0].tobytes()
        idx.apply({}, [ids[7], ids[8]])
        files = {}
        state = idx.save_graphs(lambda i, kind: files.setdefault(kind, tmp_path / f"{params.pca_dims}.{i}.{kind}"))
        saved = b"".join(p.read_bytes() for p in files.values())
        assert stored not in saved and vectors[7].tobytes() not in saved
        assert np.asarray(seg.graph.get_items([9]), np.float32)[0].tobytes() in files["graph"].read_bytes()
        assert erase_deleted_vectors(str(files["graph"]), 300) == 2  # already zero: the same two, again
        loaded = HnswIndex.from_saved(
            DIM, "test", params, [str(files["graph"])], state, [str(files["dense"]) if "dense" in files else None]
        )
        assert [loaded.search(vectors[i], 1, 0.99, 1)[0].face_id for i in (0, 9, 299)] == [ids[0], ids[9], ids[299]]
        assert not loaded.search(vectors[7], 1, 0.99, 1)
