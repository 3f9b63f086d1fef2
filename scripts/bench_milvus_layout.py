#!/usr/bin/env python3
"""Milvus layout for many facesvc collections: one Milvus collection with the facesvc collection as
partition key (what server/index/milvus.py does) vs one Milvus collection per facesvc collection.

--tenants facesvc collections of --faces faces each (random unit vectors), written both ways into
Milvus Lite (or --uri, a Milvus server), then --queries searches per layout, each in one random
tenant, grouped by subject as the server searches. Reports the time to set up and fill each
layout, search latency p50/p99, and the Milvus collections each needs.

    .venv/bin/python scripts/bench_milvus_layout.py --tenants 20 --faces 1000

Prints a table and writes JSON (default .bench/bench_milvus_layout.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import percentiles, write_json  # noqa: E402
from server.index.milvus import MilvusEngine, MilvusIndex, MilvusParams  # noqa: E402

DIM = 512


def run(layout: str, uri: str, tenants: int, faces: int, queries: int, rng) -> dict:
    t0 = time.perf_counter()
    indexes = []
    for t in range(tenants):
        # partition key: one engine, one Milvus collection; per collection: a prefix per tenant
        prefix = "layout_pk" if layout == "partition key" else f"layout_t{t}"
        engine = MilvusEngine(MilvusParams(uri=uri, collection_prefix=prefix, partitions=16), store=None)
        name = engine.ensure("bench", DIM)
        indexes.append(MilvusIndex(engine, name, f"tenant-{t}", 0, DIM, "bench"))
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t, idx in enumerate(indexes):
        v = rng.standard_normal((faces, DIM), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        ids = [f"{t:04d}{i:028x}" for i in range(faces)]
        idx.add(ids, ids, v)
    fill = time.perf_counter() - t0
    times = []
    for _ in range(queries):
        idx = indexes[int(rng.integers(tenants))]
        q = rng.standard_normal(DIM).astype(np.float32)
        t0 = time.perf_counter()
        idx.search(q / np.linalg.norm(q), 10, -1.0, 1)
        times.append(time.perf_counter() - t0)
    return {
        "layout": layout,
        "milvus_collections": len({i.name for i in indexes}),
        "setup_s": setup,
        "fill_s": fill,
        "search": percentiles(times),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=20)
    ap.add_argument("--faces", type=int, default=1000, help="faces per tenant")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--uri", default="", help="a Milvus server; empty: Milvus Lite in a temporary directory")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "bench_milvus_layout.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        uri = args.uri or str(Path(d) / "layout.db")
        for layout in ("partition key", "collection per tenant"):
            rows.append(run(layout, uri, args.tenants, args.faces, args.queries, np.random.default_rng(3)))
            print(f"{layout} done", flush=True)
    print(f"\n{args.tenants} facesvc collections x {args.faces} faces, {'Milvus Lite' if not args.uri else args.uri}")
    print(f"{'layout':24} {'Milvus colls':>12} {'setup s':>8} {'fill s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        s = r["search"]
        print(
            f"{r['layout']:24} {r['milvus_collections']:12d} {r['setup_s']:8.1f} {r['fill_s']:8.1f} {s['p50_ms']:8.1f} {s['p99_ms']:8.1f}"
        )
    out = write_json(args.out, {"tenants": args.tenants, "faces": args.faces, "uri": args.uri or "milvus-lite", "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
