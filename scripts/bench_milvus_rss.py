#!/usr/bin/env python3
"""A replica's memory with the search index in it (hnsw) and outside it (milvus), at --faces faces.

One SQLite database with one collection of --faces synthetic faces (unit vectors, one per
subject, written straight into the tables: what is measured is the server, not enrolment).
Then, one after the other, on that database:
  hnsw    a server process (snapshots off) builds its graphs from the database;
  milvus  `milvus-lite server` in its own process, and a server process on
          FACESVC_INDEX_ENGINE=milvus pointing at it, which writes the faces into it.
Each server's resident memory (VmRSS) is read once GetIndexStats answers with every face,
and, for milvus, the Milvus Lite process's too. Both servers load the models as usual, so
the difference between the two server rows is what the index costs a replica.

    .venv/bin/python scripts/bench_milvus_rss.py               # 100 000 faces
    .venv/bin/python scripts/bench_milvus_rss.py --faces 20000

Prints a table and writes JSON (default .bench/bench_milvus_rss.json).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_json  # noqa: E402
from bench.launcher import MilvusLiteServer, ServerProcess  # noqa: E402
from facesvc.v1 import face_service_pb2 as pb  # noqa: E402
from facesvc.v1 import face_service_pb2_grpc as pb_grpc  # noqa: E402
from server.records import LIVENESS_OPTIONAL  # noqa: E402
from server.storage.sql import open_store  # noqa: E402

MODEL, DIM, COLL = "w600k_mbf", 512, "rss"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def fill(data: Path, faces: int) -> None:
    """The server's schema (open_store migrates it), then the faces in bulk."""
    store = open_store("", str(data))
    store.create_collection(COLL, "rss", LIVENESS_OPTIONAL)
    store.close()
    rng = np.random.default_rng(1)
    now = int(time.time() * 1000)
    with sqlite3.connect(data / "facesvc.db") as conn:
        for s in range(0, faces, 10_000):
            n = min(10_000, faces - s)
            v = rng.standard_normal((n, DIM), dtype=np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            subjects = [f"s{i:07d}" for i in range(s, s + n)]
            conn.executemany(
                "INSERT INTO subjects (collection_id, subject_id, metadata, created_ms, updated_ms) VALUES (?, ?, '{}', ?, ?)",
                [(COLL, sid, now, now) for sid in subjects],
            )
            conn.executemany(
                "INSERT INTO faces (face_id, collection_id, subject_id, model_id, embedding, quality, crop, created_ms) "
                "VALUES (?, ?, ?, ?, ?, 0.9, NULL, ?)",
                [
                    (f"{i:032x}", COLL, sid, MODEL, v[j].astype("<f4").tobytes(), now)
                    for j, (i, sid) in enumerate(zip(range(s, s + n), subjects))
                ],
            )


def measure(name: str, env: dict, tmp: Path, faces: int) -> dict:
    t0 = time.perf_counter()
    srv = ServerProcess(log_path=tmp / f"{name}.log", env=env)
    try:
        stub = pb_grpc.FaceServiceStub(srv.channel)
        stats = stub.GetIndexStats(pb.GetIndexStatsRequest(collection=COLL), timeout=3600)  # waits for the build
        assert stats.size == faces, f"{name}: {stats.size} faces indexed, {faces} in the database"
        ready = time.perf_counter() - t0
        return {
            "engine": name,
            "server_rss_mb": srv.rss_mb(),
            "index_memory_bytes": stats.memory_bytes,
            "start_to_indexed_s": ready,
            "loaded_from": stats.loaded_from,
        }
    finally:
        srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=100_000)
    ap.add_argument("--out", default=str(ROOT / ".bench" / "bench_milvus_rss.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT / ".bench" if (ROOT / ".bench").is_dir() else None) as d:
        tmp = Path(d)
        data = tmp / "data"
        data.mkdir()
        t0 = time.perf_counter()
        fill(data, args.faces)
        print(f"{args.faces:,} faces written in {time.perf_counter() - t0:.0f}s", flush=True)
        base = {"FACESVC_DATA_DIR": str(data), "FACESVC_INDEX_SNAPSHOTS": "false"}
        rows = [measure("hnsw", {**base, "FACESVC_INDEX_ENGINE": "hnsw"}, tmp, args.faces)]
        print("hnsw done", flush=True)
        milvus = MilvusLiteServer(tmp / "milvus", tmp / "milvus-lite.log")
        try:
            row = measure("milvus", {**base, "FACESVC_INDEX_ENGINE": "milvus", "FACESVC_MILVUS_URI": milvus.uri}, tmp, args.faces)
            row["milvus_lite_rss_mb"] = rss_mb(milvus.proc.pid)
            rows.append(row)
        finally:
            milvus.stop()
    print(f"\n{args.faces:,} faces x {DIM}-d, one collection")
    print(f"{'engine':8} {'server RSS MB':>14} {'index in server MB':>19} {'Milvus Lite RSS MB':>19} {'start to indexed s':>19}")
    for r in rows:
        lite = f"{r['milvus_lite_rss_mb']:19.0f}" if "milvus_lite_rss_mb" in r else f"{'-':>19}"
        print(
            f"{r['engine']:8} {r['server_rss_mb']:14.0f} {r['index_memory_bytes'] / 2**20:19.0f} {lite} {r['start_to_indexed_s']:19.0f}"
        )
    out = write_json(args.out, {"faces": args.faces, "dim": DIM, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
