"""HnswIndex on its own: the size-dependent ef and large-k queries (no database).

The recall these parameters buy at 200 k and 1 M faces is measured by scripts/bench_search.py;
here the rule itself is checked, and that the index applies it as it grows and after a restart.
"""
from __future__ import annotations

import numpy as np
import pytest

from server.index import hnsw
from server.index.hnsw import HnswIndex, HnswParams
from server.index.snapshot import SnapshotStore

DIM = 64


def units(rng, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def filled(params: HnswParams, n: int, seed: int = 0) -> tuple[HnswIndex, np.ndarray, list[str]]:
    vecs = units(np.random.default_rng(seed), n)
    ids = [f"f{i:05d}" for i in range(n)]
    idx = HnswIndex(DIM, "test", params)
    for s in range(0, n, 100):
        idx.add(ids[s:s + 100], [f"s{i:05d}" for i in range(s, min(n, s + 100))], vecs[s:s + 100])
    return idx, vecs, ids


def test_auto_ef_follows_the_measured_points_and_grows_monotonically():
    p = HnswParams()
    assert p.ef_search == 0
    assert p.ef_for(0) == p.ef_for(1_000) == p.ef_for(500_000) == 64
    assert p.ef_for(1_000_000) == 256
    assert p.ef_for(750_000) == 160          # halfway, linearly
    sizes = [0, 10_000, 500_001, 600_000, 750_000, 1_000_000, 1_200_000, 2_000_000, 10**9]
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
    assert idx.stats()["ef_search"] == 64 == idx._index.ef
    more = units(np.random.default_rng(1), 800)
    idx.add([f"g{i}" for i in range(800)], [f"t{i}" for i in range(800)], more)
    assert idx.stats()["ef_search"] == 256 == idx._index.ef
    # deleted nodes stay in the graph and still count
    idx.apply({}, [f"g{i}" for i in range(400)])
    assert len(idx) == 600 and idx._index.ef == 256

    snaps = SnapshotStore(tmp_path)
    snaps.write("c", idx, {"collection_created_ms": 0, "change_seq": 0})
    loaded, _ = snaps.load("c", params, {"model": "test", "dimension": DIM, "collection_created_ms": 0,
                                         "min_written_ms": 0})
    assert loaded._index.ef == 256 and loaded.stats()["ef_search"] == 256
    for q in vecs[:20]:
        assert loaded.search(q, 5, -1.0, 1) == idx.search(q, 5, -1.0, 1)


def test_a_query_for_more_faces_than_ef_returns_them_all_under_the_read_lock():
    # top 20 subjects with up to 10 faces each: 200 faces asked of an index whose ef is 64. hnswlib
    # searches with max(ef, k), so the answer is exact on this small graph without touching the shared ef
    params = HnswParams(m=16, ef_construction=100)
    idx, vecs, ids = filled(params, 500)
    assert idx._index.ef == 64
    q = vecs[7]
    hits = idx.search(q, 20, -1.0, 10)
    exact = np.argsort(-(vecs @ q))[:20]
    assert [h.face_id for h in hits] == [ids[i] for i in exact]
    assert idx._index.ef == 64


@pytest.mark.parametrize("ef", [16, 300])
def test_an_explicit_ef_is_used_at_every_size(ef):
    idx, _, _ = filled(HnswParams(m=16, ef_construction=100, ef_search=ef), 300)
    assert idx._index.ef == ef and idx.stats()["ef_search"] == ef
