#!/usr/bin/env python3
"""1:N search engines side by side: facesvc's hnswlib index vs FAISS flat (exact) vs FAISS HNSW.

Corpora of 512-d unit vectors (the recognizer's embedding size):
  clustered  identities with several noisy faces each (face = normalise(centre + noise),
             same-identity cosine ~0.6 as with real ArcFace embeddings); probes are
             fresh noisy faces of enrolled identities; centres are isotropic in 512-d,
             harder for a graph index than real faces
  facelike   the same, but centres and noise follow the spectrum measured on the
             recognizer's LFW embeddings (different-person cosine spread 0.067, i.e.
             an effective dimension of ~220 rather than 512; same-person cosine 0.59)
  uniform    random directions on the sphere; probes are random directions too (the
             hardest case for a graph index: no structure at all)

Per corpus and engine, in the same run on the same vectors: build time, memory
(RSS growth while building), recall@1 and recall@10 against the exact top-10
(FAISS IndexFlatIP), single-query latency p50/p99 (one probe per call, as the
Search RPC does), and batch throughput (all probes in one call, all cores).
The facesvc rows go through `server.index.hnsw.HnswIndex` (the class the
server uses: read lock, segments of at most --segment-size faces searched side by
side, label map, one hit per subject) for latency; recall is taken on the same
segments and merge (HnswIndex.knn, faces rather than subjects). `--ef-sweep` adds
the recall/latency of other ef_search values on the same graphs (how the defaults
were chosen), and the facesvc index is snapshotted and loaded back (what a restart
costs instead of a rebuild). `--index-pca-dims 0,192` measures the facesvc index
both plain and with projected segments (the server's FACESVC_HNSW_PCA_DIMS), one
after the other in the same run. Engines measured beside it, not adopted: FAISS HNSW
on 8-bit codes (faiss-sq8) and raw hnswlib over a PCA projection with a float
re-rank (hnswlib-pca, what the projected segments grew from). `milvus-lite` measures the server's
Milvus engine (server.index.milvus.MilvusIndex: HNSW COSINE, grouped by subject) on Milvus Lite,
the embedded engine for development and tests, running in this process: its figures say what
Lite costs, not what a Milvus server or cluster does. Like the server, the benchmark runs on transparent huge
pages (`--huge-pages off` for 4 KB pages; scripts/bench_hugepages.py compares the two).

    .venv/bin/python scripts/bench_search.py                 # 100 k faces per corpus
    .venv/bin/python scripts/bench_search.py --size 1000000  # 1 M (about 10 GB RAM, ~30 min)

Prints a table and writes JSON (default .bench/bench_search.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import hnswlib
import numpy as np

from bench.common import percentiles
from server import hugepages
from server.index.hnsw import HnswIndex, HnswParams
from server.index.snapshot import SnapshotStore

ROOT = Path(__file__).resolve().parents[1]

DIM = 512
ENGINES = ("facesvc", "faiss-hnsw", "faiss-sq8", "hnswlib-pca", "milvus-lite")  # besides the exact flat scan, which always runs


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_corpus(kind: str, size: int, queries: int, faces_per_identity: int, noise: float, seed: int):
    """(corpus, probes), float32 unit rows, generated in chunks to keep the peak low."""
    rng = np.random.default_rng(seed)
    chunk = 100_000
    if kind == "uniform":
        corpus = np.empty((size, DIM), np.float32)
        for s in range(0, size, chunk):
            corpus[s : s + chunk] = normalise(rng.standard_normal((min(chunk, size - s), DIM), dtype=np.float32))
        return corpus, normalise(rng.standard_normal((queries, DIM), dtype=np.float32))
    identities = -(-size // faces_per_identity)
    if kind == "facelike":
        centres, faces_of = facelike_generator(rng, identities, FACELIKE)
    elif kind == "clustered":
        centres = normalise(rng.standard_normal((identities, DIM), dtype=np.float32))
        scale = noise / np.sqrt(DIM)

        def faces_of(ids: np.ndarray) -> np.ndarray:
            return normalise(centres[ids] + scale * rng.standard_normal((len(ids), DIM), dtype=np.float32))
    else:
        raise SystemExit(f"unknown corpus {kind!r} (clustered, facelike, uniform)")

    corpus = np.empty((size, DIM), np.float32)
    owner = np.arange(size) // faces_per_identity
    for s in range(0, size, chunk):
        corpus[s : s + chunk] = faces_of(owner[s : s + chunk])
    probes = faces_of(rng.integers(0, identities, queries))
    return corpus, probes


# Measured on the recognizer's embeddings of the 480 LFW photos (`--calibrate` measures them again):
# mean cosine of same-person pairs, std of the cosine of different-person pairs, and the power-law
# slopes of the eigenvalue spectra of identity centres (between) and of faces around their centre
# (within), fitted on ranks 5-100.
FACELIKE = {"genuine_cos": 0.588, "impostor_std": 0.067, "between_slope": 0.73, "within_slope": 0.53}


def _power_spectrum(slope: float) -> np.ndarray:
    s = np.arange(1, DIM + 1, dtype=np.float64) ** -slope
    return s / s.sum()


def facelike_spectra(cal: dict) -> tuple[np.ndarray, np.ndarray]:
    """Variances of the centre and of the per-face noise along DIM shared axes.

    Real embeddings are far from isotropic: the spread of different-person cosines (0.067 on
    LFW) says their effective dimension is ~1/0.067^2 = 220, not 512. The spectra keep the
    fitted slopes' ratio and are steepened together until a pair of different people has the
    measured cosine spread; the between/within split gives the measured same-person cosine."""
    b, w = cal["genuine_cos"], 1 - cal["genuine_cos"]

    def spread(k: float) -> float:
        total = b * _power_spectrum(cal["between_slope"] * k) + w * _power_spectrum(cal["within_slope"] * k)
        return float(np.sqrt((total**2).sum()))

    lo, hi = 0.0, 3.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if spread(mid) < cal["impostor_std"] else (lo, mid)
    return b * _power_spectrum(cal["between_slope"] * lo), w * _power_spectrum(cal["within_slope"] * lo)


def facelike_generator(rng: np.random.Generator, identities: int, cal: dict):
    between, within = facelike_spectra(cal)
    basis, _ = np.linalg.qr(rng.standard_normal((DIM, DIM)))
    basis = basis.astype(np.float32)
    sb, sw = np.sqrt(between).astype(np.float32), np.sqrt(within).astype(np.float32)
    centres = np.empty((identities, DIM), np.float32)
    for s in range(0, identities, 100_000):
        n = min(100_000, identities - s)
        centres[s : s + n] = (rng.standard_normal((n, DIM), dtype=np.float32) * sb) @ basis.T

    def faces_of(ids: np.ndarray) -> np.ndarray:
        noise = (rng.standard_normal((len(ids), DIM), dtype=np.float32) * sw) @ basis.T
        return normalise(centres[ids] + noise)

    return centres, faces_of


def calibrate() -> dict:
    """Embed ../shared/faces/lfw with the server's pipeline and measure what FACELIKE holds."""
    import cv2

    from server import config
    from server.assembly import build_pipeline
    from server.vision.pipeline import DetectOptions

    pipeline = build_pipeline(config.load([], environ={}))
    vecs, labels = [], []
    for path in sorted((ROOT.parent / "shared" / "faces" / "lfw").glob("*/*.jpg")):
        faces = pipeline.detect(cv2.imread(str(path), cv2.IMREAD_COLOR), DetectOptions(min_face_size=10))
        if faces:
            vecs.append(pipeline.embed(faces[:1])[0])
            labels.append(path.parent.name)
    emb, labels = normalise(np.stack(vecs).astype(np.float64)), np.array(labels)
    sims, same = emb @ emb.T, labels[:, None] == labels[None, :]
    upper = np.triu_indices(len(emb), 1)
    genuine, impostor = sims[upper][same[upper]], sims[upper][~same[upper]]
    multi = [p for p in sorted(set(labels)) if (labels == p).sum() > 1]
    means = np.stack([emb[labels == p].mean(0) for p in multi])
    resid = np.concatenate([emb[labels == p] - emb[labels == p].mean(0) for p in multi])

    def slope(x: np.ndarray) -> float:
        ev = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
        ranks = np.arange(1, len(ev) + 1)
        keep = (ranks >= 5) & (ranks <= 100)
        return float(-np.polyfit(np.log(ranks[keep]), np.log(ev[keep]), 1)[0])

    return {
        "photos": len(emb),
        "genuine_cos": float(genuine.mean()),
        "impostor_std": float(impostor.std()),
        "between_slope": slope(means),
        "within_slope": slope(resid),
    }


def recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / (len(truth) * k)


def latency(fn, probes: np.ndarray, n: int) -> dict:
    times = []
    for q in probes[:n]:
        t0 = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t0)
    return percentiles(times)


def batch_qps(fn, probes: np.ndarray) -> float:
    t0 = time.perf_counter()
    fn(probes)
    return len(probes) / (time.perf_counter() - t0)


def bench_flat(faiss, corpus, probes, single_n: int) -> tuple[dict, np.ndarray]:
    gc.collect()
    r0, t0 = rss_mb(), time.perf_counter()
    index = faiss.IndexFlatIP(DIM)
    index.add(corpus)
    build = time.perf_counter() - t0
    mem = rss_mb() - r0
    t0 = time.perf_counter()
    sims, truth = index.search(probes, 10)
    qps = len(probes) / (time.perf_counter() - t0)
    # how far apart the true neighbours are: on the uniform corpus they are all noise around 0.2
    row = {
        "engine": "faiss IndexFlatIP (exact)",
        "build_s": build,
        "memory_mb": mem,
        "recall@1": 1.0,
        "recall@10": 1.0,
        "exact_sim_top1_mean": float(sims[:, 0].mean()),
        "exact_sim_top10_mean": float(sims[:, 9].mean()),
        "single": latency(lambda q: index.search(q[None], 10), probes, single_n),
        "batch_qps": qps,
    }
    return row, truth


# what a benchmark index's snapshot claims, and what loading it expects
SNAPSHOT_META = {"collection_created_ms": 0, "change_seq": 0}
SNAPSHOT_EXPECT = {"model": "bench", "dimension": DIM, "collection_created_ms": 0, "min_written_ms": 0}


def build_index(corpus: np.ndarray, params: HnswParams) -> HnswIndex:
    """The server's index over the corpus, its faces added in order (label = row), 50 000 at a time,
    its graphs sized for them from the start as a build from the database does (IndexRegistry._build)."""
    idx = HnswIndex(DIM, "bench", params.sized_for(len(corpus)))
    ids = [f"{i:032x}" for i in range(len(corpus))]
    step = 50_000
    for s in range(0, len(corpus), step):
        idx.add(ids[s : s + step], ids[s : s + step], corpus[s : s + step])
    return idx


def bench_facesvc(corpus, probes, truth, params: HnswParams, single_n: int, ef_sweep: list[int]) -> list[dict]:
    gc.collect()
    r0, t0 = rss_mb(), time.perf_counter()
    idx = build_index(corpus, params)
    build = time.perf_counter() - t0
    mem = rss_mb() - r0
    stats = idx.stats()  # ef0: the ef the index chose for its graphs (the largest, if they differ)
    rows, segments, ef0 = [], stats.params["segments"], stats.params["ef_search"]
    projected = [s.projection for s in idx._segments if s.projection is not None]
    for ef in [ef0] + [e for e in ef_sweep if e != ef0]:
        idx.set_ef(None if ef == ef0 else max(ef, 10))
        t0 = time.perf_counter()
        found, _ = idx.knn(probes, 10)  # labels are the corpus rows: faces were added in order
        qps = len(probes) / (time.perf_counter() - t0)
        # the server's path: one probe, read lock, every segment, label -> (face, subject), one hit per subject
        single = latency(lambda q: idx.search(q, 10, -1.0, 1), probes, single_n)
        if ef == ef0:
            auto = "" if params.ef_search else " auto"
            split = f" {segments} seg" if segments > 1 else ""
            pca = f" PCA {params.pca_dims}-d ({np.mean([p.kept for p in projected]):.0%}) + re-rank" if projected else ""
            name = f"facesvc HnswIndex (hnswlib M={params.m} efC={params.ef_construction}{split}{pca} ef={ef}{auto})"
        else:
            name = f"  hnswlib ef={ef} (same graphs, sweep)"
        rows.append(
            {
                "engine": name,
                "build_s": build if ef == ef0 else None,
                "memory_mb": mem if ef == ef0 else None,
                "segments": segments,
                "projected_segments": len(projected),
                "pca_dims": params.pca_dims if projected else 0,
                "recall@1": recall(found, truth, 1),
                "recall@10": recall(found, truth, 10),
                "single": single,
                "batch_qps": qps,
                "ef_search": ef,
            }
        )
    idx.set_ef(None)
    rows[0]["tail"] = bench_tail(idx, probes, single_n)
    rows[0]["snapshot"] = bench_snapshot(idx, params, probes)
    return rows


def bench_tail(idx: HnswIndex, probes: np.ndarray, single_n: int) -> dict:
    """Where the single-query tail comes from, at the index's own ef: the same probe repeated
    (identical work every time, so its spread is the machine's, not the graph's), and with more
    than one segment, each probe's slowest segment searched alone, one after the other (what
    the side-by-side search would take with no hand-off and no second core competing for memory)."""
    tail = {"same_probe": latency(lambda q: idx.search(q, 10, -1.0, 1), np.repeat(probes[:1], single_n, 0), single_n)}
    segments = [s for s in idx._segments if s.live]
    if len(segments) > 1:
        times = []
        for q in probes[:single_n]:
            slowest = 0.0
            for seg in segments:
                t0 = time.perf_counter()
                seg.query(q[None], 10)
                slowest = max(slowest, time.perf_counter() - t0)
            times.append(slowest)
        tail["slowest_segment_alone"] = percentiles(times)
    return tail


def bench_snapshot(idx: HnswIndex, params: HnswParams, probes: np.ndarray) -> dict:
    """What a restart costs from a snapshot (write, then load with every checksum) vs a rebuild."""
    (ROOT / ".bench").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".bench") as d:
        snaps = SnapshotStore(d)
        t0 = time.perf_counter()
        path = snaps.write("bench", idx, SNAPSHOT_META)
        write = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(d).iterdir())
        t0 = time.perf_counter()
        loaded, _ = snaps.load("bench", params, SNAPSHOT_EXPECT)
        load = time.perf_counter() - t0
        same = all(loaded.search(q, 10, -1.0, 1) == idx.search(q, 10, -1.0, 1) for q in probes[:50])
        del loaded
    return {"write_s": write, "load_s": load, "bytes": size, "same_answers": same, "file": path.name}


def bench_faiss_hnsw(
    faiss, corpus, probes, truth, params: HnswParams, single_n: int, ef_sweep: list[int], sq8: bool = False
) -> list[dict]:
    """FAISS's HNSW on float vectors, or (sq8) on 8-bit scalar-quantised codes: 512 bytes a face
    instead of 2 KB, a quarter of the memory read per distance; each sq8 ef also runs with a float
    re-rank of twice the candidates (IndexRefineFlat: exact similarities, as Search returns).
    FAISS's HNSW cannot remove a vector (no remove_ids; a per-search IDSelector only hides it), one
    reason the server does not use it."""
    gc.collect()
    r0, t0 = rss_mb(), time.perf_counter()
    if sq8:
        index = faiss.IndexHNSWSQ(DIM, faiss.ScalarQuantizer.QT_8bit, params.m, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexHNSWFlat(DIM, params.m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = params.ef_construction
    index.train(corpus)  # learns the 8-bit ranges; a no-op for float vectors
    index.add(corpus)
    build = time.perf_counter() - t0
    mem = rss_mb() - r0
    kind = "IndexHNSWSQ 8-bit" if sq8 else "IndexHNSWFlat"
    refine = faiss.IndexRefineFlat(index, faiss.swig_ptr(corpus)) if sq8 else None
    ef0, rows = params.ef_for(len(corpus)), []  # the same ef as facesvc's row first
    for ef in [ef0] + [e for e in ef_sweep if e != ef0]:
        variants = [(index, faiss.SearchParametersHNSW(efSearch=ef), "")]
        if refine is not None:
            variants.append(
                (
                    refine,
                    faiss.IndexRefineSearchParameters(k_factor=2, base_index_params=faiss.SearchParametersHNSW(efSearch=ef)),
                    " + float re-rank",
                )
            )
        for engine, sp, suffix in variants:
            t0 = time.perf_counter()
            _, found = engine.search(probes, 10, params=sp)
            qps = len(probes) / (time.perf_counter() - t0)
            first = ef == ef0 and not suffix
            name = (
                f"faiss {kind} (M={params.m} efC={params.ef_construction} ef={ef})"
                if first
                else f"  faiss {kind} ef={ef}{suffix}"
            )
            rows.append(
                {
                    "engine": name,
                    "build_s": build if first else None,
                    "memory_mb": mem if first else None,
                    "recall@1": recall(found, truth, 1),
                    "recall@10": recall(found, truth, 10),
                    "ef_search": ef,
                    "single": latency(lambda q, e=engine, p=sp: e.search(q[None], 10, params=p), probes, single_n),
                    "batch_qps": qps,
                }
            )
    return rows


def bench_milvus_lite(corpus, probes, truth, params: HnswParams, single_n: int) -> list[dict]:
    """The server's Milvus engine on Milvus Lite in a temporary directory: the faces upserted in pages
    of 50 000 as a rebuild does, "build" lasting until Lite reports every row indexed. One face per
    subject, so its grouped answer is the plain top 10. Lite answers one query per call (no batch)."""
    from server.index.milvus import MilvusEngine, MilvusIndex, MilvusParams

    gc.collect()
    (ROOT / ".bench").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / ".bench") as d:
        engine = MilvusEngine(
            MilvusParams(uri=str(Path(d) / "milvus.db"), m=params.m, ef_construction=params.ef_construction, partitions=1),
            store=None,
        )
        r0, t0 = rss_mb(), time.perf_counter()
        name = engine.ensure("bench", DIM)
        idx = MilvusIndex(engine, name, "bench", 0, DIM, "bench")
        ids = [f"{i:032x}" for i in range(len(corpus))]
        for s in range(0, len(corpus), 50_000):
            idx.add(ids[s : s + 50_000], ids[s : s + 50_000], corpus[s : s + 50_000])
        while True:
            info = engine.client.describe_index(name, "embedding")
            if int(info.get("indexed_rows", 0)) >= len(corpus) and not int(info.get("pending_index_rows", 0)):
                break
            time.sleep(0.5)
        build = time.perf_counter() - t0
        mem = rss_mb() - r0
        found, times = [], []
        for q in probes:
            t0 = time.perf_counter()
            hits = idx.search(q, 10, -1.0, 1)
            times.append(time.perf_counter() - t0)
            found.append([int(h.face_id, 16) for h in hits] + [-1] * (10 - len(hits)))
        found = np.array(found)
        row = {
            "engine": f"milvus-lite (embedded; HNSW M={params.m} efC={params.ef_construction} ef=128, by subject)",
            "build_s": build,
            "memory_mb": mem,
            "recall@1": recall(found, truth, 1),
            "recall@10": recall(found, truth, 10),
            "single": percentiles(times[:single_n]),
            "batch_qps": len(times) / sum(times),  # no batch call: the single queries' rate
            "milvus_lite": __import__("milvus_lite").__version__,
        }
        engine.close()
    return [row]


def bench_pca(corpus, probes, truth, params: HnswParams, dims: int, single_n: int, ef_sweep: list[int]) -> list[dict]:
    """hnswlib over a PCA projection of the faces (fewer bytes and flops per distance), its ef
    candidates re-ranked with the full 512-d vectors (exact similarities, as Search returns).
    The projection keeps the top principal axes of 20 000 faces (uncentred: the inner product
    is what it must preserve). One graph, the server's M and efConstruction."""
    gc.collect()
    r0, t0 = rss_mb(), time.perf_counter()
    sample = corpus[np.random.default_rng(1).choice(len(corpus), min(20_000, len(corpus)), replace=False)]
    values, axes = np.linalg.eigh(sample.T.astype(np.float64) @ sample / len(sample))
    order = np.argsort(-values)
    proj = np.ascontiguousarray(axes[:, order[:dims]], dtype=np.float32)
    kept = float(values[order[:dims]].sum() / values.sum())
    graph = hnswlib.Index(space="ip", dim=dims)
    graph.init_index(max_elements=len(corpus), M=params.m, ef_construction=params.ef_construction)
    graph.set_num_threads(os.cpu_count() or 1)
    for s in range(0, len(corpus), 100_000):
        graph.add_items(corpus[s : s + 100_000] @ proj, np.arange(s, min(len(corpus), s + 100_000)))
    build = time.perf_counter() - t0
    mem = rss_mb() - r0  # the graph; the full vectors it re-ranks with are the corpus itself (+2 KB a face)

    def search(q: np.ndarray) -> np.ndarray:
        """Top 10 rows of corpus for each row of q: ef candidates from the graph, re-ranked exactly."""
        cand, _ = graph.knn_query(q @ proj, k=graph.ef)
        sims = np.einsum("qkd,qd->qk", corpus[cand], q)
        return np.take_along_axis(cand, np.argsort(-sims, axis=1)[:, :10], 1)

    ef0, rows = params.ef_for(len(corpus)), []
    for ef in [ef0] + [e for e in ef_sweep if e != ef0]:
        graph.set_ef(ef)
        graph.set_num_threads(os.cpu_count() or 1)
        t0 = time.perf_counter()
        found = search(probes)
        qps = len(probes) / (time.perf_counter() - t0)
        graph.set_num_threads(1)
        first = ef == ef0
        name = (
            f"hnswlib PCA {dims}-d ({kept:.0%} of variance) + re-rank (ef={ef})"
            if first
            else f"  hnswlib PCA {dims}-d ef={ef} + re-rank"
        )
        rows.append(
            {
                "engine": name,
                "build_s": build if first else None,
                "memory_mb": mem if first else None,
                "recall@1": recall(found, truth, 1),
                "recall@10": recall(found, truth, 10),
                "ef_search": ef,
                "pca_dims": dims,
                "variance_kept": kept,
                "single": latency(lambda q: search(q[None]), probes, single_n),
                "batch_qps": qps,
            }
        )
    return rows


def fmt(v, spec: str) -> str:
    return format("-", ">" + spec.split(".")[0]) if v is None else format(v, spec)


def print_table(corpus: str, size: int, rows: list[dict]) -> None:
    flat = rows[0]
    flat_p50 = flat["single"]["p50_ms"]
    print(
        f"\n{corpus} corpus, {size:,} x {DIM}-d (exact neighbours: mean cosine {flat['exact_sim_top1_mean']:.3f} "
        f"at rank 1, {flat['exact_sim_top10_mean']:.3f} at rank 10)"
    )
    head = f"{'engine':58} {'build s':>8} {'mem MB':>8} {'R@1':>6} {'R@10':>6} {'p50 ms':>8} {'p99 ms':>8} {'vs flat':>8} {'batch q/s':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        s = r["single"]
        print(
            f"{r['engine'][:58]:58} {fmt(r['build_s'], '8.1f')} {fmt(r['memory_mb'], '8.0f')} {r['recall@1']:6.3f} "
            f"{r['recall@10']:6.3f} {s['p50_ms']:8.3f} {s['p99_ms']:8.3f} {flat_p50 / s['p50_ms']:7.1f}x {r['batch_qps']:10.0f}"
        )


def print_tail(row: dict) -> None:
    def pp(lat: dict) -> str:
        return f"p50 {lat['p50_ms']:.3f} / p99 {lat['p99_ms']:.3f} ms (p99/p50 {lat['p99_ms'] / lat['p50_ms']:.2f})"

    tail, name = row["tail"], row["engine"].split(" (")[0]
    print(
        f"tail of {name} (PCA dims {row['pca_dims']}): as served {pp(row['single'])}; "
        f"one probe repeated {pp(tail['same_probe'])}",
        end="",
    )
    if "slowest_segment_alone" in tail:
        print(f"; slowest of its {row['segments']} segments searched alone {pp(tail['slowest_segment_alone'])}", end="")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=100_000, help="vectors per corpus (100000; 1000000 for the 1 M run)")
    ap.add_argument("--queries", type=int, default=1000, help="probes per corpus")
    ap.add_argument("--single", type=int, default=1000, help="probes timed one at a time (flat: at most 200)")
    ap.add_argument(
        "--corpora",
        default="clustered,facelike,uniform",
        help="clustered (isotropic identity centres), facelike (spectrum measured on LFW), uniform",
    )
    ap.add_argument("--calibrate", action="store_true", help="measure the facelike corpus's statistics on LFW and exit")
    ap.add_argument("--faces-per-identity", type=int, default=10)
    ap.add_argument("--noise", type=float, default=0.8, help="clustered: noise norm relative to the centre (0.8 -> cosine ~0.6)")
    ap.add_argument("--m", type=int, default=HnswParams.m)
    ap.add_argument("--ef-construction", type=int, default=HnswParams.ef_construction)
    ap.add_argument("--ef-search", type=int, default=HnswParams.ef_search, help="0 (default): the server's size-dependent ef")
    ap.add_argument(
        "--segment-size",
        type=int,
        default=HnswParams.segment_size,
        help="facesvc: most faces per graph (the server's FACESVC_HNSW_SEGMENT_SIZE)",
    )
    ap.add_argument(
        "--ef-sweep",
        default="32,64,256",
        help="other ef_search values to try on the same graphs (facesvc, FAISS, PCA; '' for none)",
    )
    ap.add_argument("--pca-dims", default="128,192", help="hnswlib-pca: the projections' dimensions")
    ap.add_argument(
        "--index-pca-dims",
        default=str(HnswParams.pca_dims),
        help="facesvc: the index's projected segments (the server's FACESVC_HNSW_PCA_DIMS); a list "
        "measures one index each in the same run, e.g. 0,128 (0: plain graphs)",
    )
    ap.add_argument(
        "--index-pca-min-faces",
        type=int,
        default=HnswParams.pca_min_faces,
        help="facesvc: the segment size from which segments are projected (FACESVC_HNSW_PCA_MIN_FACES)",
    )
    ap.add_argument(
        "--engines",
        default="facesvc,faiss-hnsw",
        help="besides the exact flat scan: facesvc (hnswlib, the server's class), faiss-hnsw, faiss-sq8 "
        "(FAISS HNSW on 8-bit codes, with and without a float re-rank), hnswlib-pca (hnswlib on a "
        "PCA projection, candidates re-ranked on the full vectors), milvus-lite (the server's Milvus "
        "engine on embedded Milvus Lite)",
    )
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--huge-pages",
        default="on",
        choices=("on", "off"),
        help="on: run as the server does, on transparent huge pages (re-executes itself with "
        "GLIBC_TUNABLES=glibc.malloc.hugetlb=1, server/hugepages.py); off: 4 KB pages",
    )
    ap.add_argument("--out", default=str(ROOT / ".bench" / "bench_search.json"))
    args = ap.parse_args()
    hugepages.ensure(args.huge_pages == "on")
    if args.calibrate:
        print(json.dumps({"measured": calibrate(), "used": FACELIKE}, indent=2))
        return 0
    try:
        import faiss
    except ImportError:
        print("faiss is not installed: .venv/bin/pip install -e '.[bench]' (or pip install faiss-cpu)", file=sys.stderr)
        return 2
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    params = HnswParams(m=args.m, ef_construction=args.ef_construction, ef_search=args.ef_search, segment_size=args.segment_size)
    sweep = [int(x) for x in args.ef_sweep.split(",") if x.strip()]
    engines = {e.strip() for e in args.engines.split(",") if e.strip()}
    if engines - set(ENGINES):
        raise SystemExit(f"unknown engines {sorted(engines - set(ENGINES))} (known: {', '.join(ENGINES)})")
    result = {
        "size": args.size,
        "dim": DIM,
        "queries": args.queries,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "faiss": faiss.__version__,
        "huge_pages": hugepages.status(),
        "params": vars(args),
        "corpora": {},
    }
    for kind in [c.strip() for c in args.corpora.split(",") if c.strip()]:
        t0 = time.perf_counter()
        corpus, probes = make_corpus(kind, args.size, args.queries, args.faces_per_identity, args.noise, args.seed)
        print(f"[{kind}] generated {len(corpus):,} vectors in {time.perf_counter() - t0:.1f}s", flush=True)
        flat, truth = bench_flat(faiss, corpus, probes, min(args.single, 200))
        print(f"[{kind}] flat done", flush=True)
        rows = [flat]
        if "facesvc" in engines:
            for dims in [int(x) for x in args.index_pca_dims.split(",") if x.strip()]:
                rows += bench_facesvc(
                    corpus,
                    probes,
                    truth,
                    dataclasses.replace(params, pca_dims=dims, pca_min_faces=args.index_pca_min_faces),
                    args.single,
                    sweep,
                )
                print(f"[{kind}] facesvc/hnswlib (index PCA dims {dims}) done", flush=True)
        if "faiss-hnsw" in engines:
            rows += bench_faiss_hnsw(faiss, corpus, probes, truth, params, args.single, sweep)
        if "faiss-sq8" in engines:
            rows += bench_faiss_hnsw(faiss, corpus, probes, truth, params, args.single, sweep, sq8=True)
        if "hnswlib-pca" in engines:
            for dims in [int(x) for x in args.pca_dims.split(",") if x.strip()]:
                rows += bench_pca(corpus, probes, truth, params, dims, args.single, sweep)
        if "milvus-lite" in engines:
            rows += bench_milvus_lite(corpus, probes, truth, params, args.single)
            print(f"[{kind}] milvus-lite done", flush=True)
        print_table(kind, args.size, rows)
        for row in rows:
            if "tail" in row:
                print_tail(row)
            if "snapshot" in row:
                snap = row["snapshot"]
                print(
                    f"snapshot of {row['engine'].split(' (')[0]} (PCA dims {row['pca_dims']}): "
                    f"{snap['bytes'] / 2**20:.0f} MB, written in {snap['write_s']:.1f}s, loaded + verified in "
                    f"{snap['load_s']:.1f}s (rebuild: {row['build_s']:.0f}s); same answers after loading: "
                    f"{snap['same_answers']}"
                )
        result["corpora"][kind] = rows
        del corpus, probes, truth
        gc.collect()
    print()
    write_result(args.out, result)
    return 0


def write_result(path: str, result: dict) -> None:
    """The benchmark's JSON, its directory made if need be."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
