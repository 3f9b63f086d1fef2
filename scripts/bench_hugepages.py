#!/usr/bin/env python3
"""The search index on 4 KB pages vs on transparent huge pages: same graph, same probes, same run.

Builds one collection's index (server.index.hnsw.HnswIndex, the server's defaults) over a
facelike corpus (see bench_search.py), writes its snapshot, then loads that snapshot in fresh
processes, alternately without and with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (what the server
sets for itself, server/hugepages.py), several rounds. Each child reports how long the load
took, how much of its memory sits on huge pages, recall@10 against the exact top 10, and the
single-query latency of HnswIndex.search (the Search RPC's path: one probe, read lock, every
segment, one hit per subject). Prints a table and the on/off ratios, writes JSON.

    .venv/bin/python scripts/bench_hugepages.py                   # 200 k faces, 5 rounds
    .venv/bin/python scripts/bench_hugepages.py --size 1000000    # two 500 k segments (~30 min build)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scripts.bench_search import (
    SNAPSHOT_EXPECT,
    SNAPSHOT_META,
    build_index,
    latency,
    make_corpus,
    recall,
    write_result,
)
from server import hugepages
from server.index.hnsw import HnswParams
from server.index.snapshot import SnapshotStore

ROOT = Path(__file__).resolve().parents[1]


def exact_top10(corpus: np.ndarray, probes: np.ndarray) -> np.ndarray:
    """Row numbers of each probe's 10 most similar faces, by brute force in chunks."""
    best_sims = np.full((len(probes), 0), -np.inf, np.float32)
    best_rows = np.empty((len(probes), 0), np.int64)
    for s in range(0, len(corpus), 100_000):
        sims = probes @ corpus[s : s + 100_000].T
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        best_sims = np.concatenate([best_sims, np.take_along_axis(sims, top, 1)], axis=1)
        best_rows = np.concatenate([best_rows, top + s], axis=1)
        keep = np.argsort(-best_sims, axis=1)[:, :10]
        best_sims, best_rows = np.take_along_axis(best_sims, keep, 1), np.take_along_axis(best_rows, keep, 1)
    return best_rows


def child(work: Path, params: HnswParams) -> dict:
    """One fresh process: load the snapshot, then time searches."""
    probes, truth = np.load(work / "probes.npy"), np.load(work / "truth.npy")
    t0 = time.perf_counter()
    idx, _ = SnapshotStore(work / "snap").load("bench", params, SNAPSHOT_EXPECT)
    load = time.perf_counter() - t0
    for q in probes[:200]:  # warm the caches and the search pool
        idx.search(q, 10, -1.0, 1)
    found, _ = idx.knn(probes, 10)  # labels are corpus rows: faces were added in order
    return {
        "huge_pages": hugepages.status(),
        "anon_huge_mb": hugepages.anon_huge_kb() / 1024,
        "load_s": load,
        "recall@10": recall(found.astype(np.int64), truth, 10),
        "segments": idx.stats().params["segments"],
        "single": latency(lambda q: idx.search(q, 10, -1.0, 1), probes, len(probes)),
    }


def build_snapshot(work: Path, args) -> float:
    """The corpus's probes and exact answers, and a snapshot of its index, in `work`; the build's seconds."""
    work.mkdir(parents=True, exist_ok=True)
    corpus, probes = make_corpus("facelike", args.size, args.queries, 10, 0.8, args.seed)
    np.save(work / "probes.npy", probes)
    np.save(work / "truth.npy", exact_top10(corpus, probes))
    t0 = time.perf_counter()
    idx = build_index(corpus, HnswParams())
    build = time.perf_counter() - t0
    print(
        f"built {args.size:,} faces in {build:.0f}s: {idx.stats().params['segments']} segment(s), "
        f"ef {idx.stats().params['ef_search']}",
        flush=True,
    )
    SnapshotStore(work / "snap").write("bench", idx, SNAPSHOT_META)
    return build


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=200_000, help="faces in the collection")
    ap.add_argument("--queries", type=int, default=1000, help="probes (fresh faces of enrolled identities)")
    ap.add_argument("--rounds", type=int, default=5, help="off/on pairs of fresh processes")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--work",
        help="keep the corpus's probes, exact answers and snapshot in this directory, "
        "and reuse them when they are there (a 1 M build takes ~30 min)",
    )
    ap.add_argument("--out", default=str(ROOT / ".bench" / "bench_hugepages.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # the snapshot directory, in a child process
    args = ap.parse_args()
    params = HnswParams()
    if args.child:
        print(json.dumps(child(Path(args.child), params)))
        return 0
    if hugepages.thp_mode() != "madvise":
        print(f"the kernel's THP mode is {hugepages.thp_mode()}: only 'madvise' lets a process choose", file=sys.stderr)
        return 2
    (ROOT / ".bench").mkdir(exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = Path(args.work) if args.work else Path(stack.enter_context(tempfile.TemporaryDirectory(dir=ROOT / ".bench")))
        build = None
        if (work / "snap" / "bench.snapshot").exists():
            print(f"reusing the snapshot in {work}", flush=True)
        else:
            build = build_snapshot(work, args)
        runs = []
        for r in range(args.rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):  # alternate which goes first
                env = hugepages.with_tunable(os.environ) if mode == "on" else hugepages.without_tunable(os.environ)
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(work)], env=env, check=True, capture_output=True, text=True
                ).stdout
                run = {"round": r, "mode": mode, **json.loads(out.splitlines()[-1])}
                runs.append(run)
                s = run["single"]
                print(
                    f"round {r} {mode:3}  huge {run['anon_huge_mb']:7.0f} MB  load {run['load_s']:5.1f}s  "
                    f"R@10 {run['recall@10']:.4f}  p50 {s['p50_ms']:.3f}  p99 {s['p99_ms']:.3f} ms",
                    flush=True,
                )
    summary = {}
    for mode in ("off", "on"):
        mine = [x["single"] for x in runs if x["mode"] == mode]
        summary[mode] = {q: float(np.median([s[q] for s in mine])) for q in ("p50_ms", "p99_ms", "mean_ms")}
    ratio = {q: summary["off"][q] / summary["on"][q] for q in summary["on"]}
    print(f"\n{'pages':8} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}   (median over {args.rounds} rounds)")
    for mode, label in (("off", "4 KB"), ("on", "2 MB THP")):
        print(f"{label:8} {summary[mode]['p50_ms']:8.3f} {summary[mode]['p99_ms']:8.3f} {summary[mode]['mean_ms']:8.3f}")
    print(f"{'off / on':8} {ratio['p50_ms']:7.2f}x {ratio['p99_ms']:7.2f}x {ratio['mean_ms']:7.2f}x")
    result = {
        "size": args.size,
        "queries": args.queries,
        "build_s": build,
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "params": vars(args),
        "runs": runs,
        "median": summary,
        "off_over_on": ratio,
    }
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
