#!/usr/bin/env python3
"""Soak: mixed traffic at a fixed rate for a long time; the server's RSS and open fds must stay flat.

A server subprocess (embedded storage, auth off) gets, every second, `--rate`
calls spread over Verify, Search, Register (add_face on a rotating set of
subjects, deleting old faces so the face limit never bites) and one live
StreamFrames call that sends frames continuously. Every `--sample` seconds the
server's RSS and fd count are read from /proc. At the end: a table per
interval (calls, errors, p50/p95 latency, RSS, fds), the drift of RSS and fds
between the first and last quarter, and the error count. JSON goes to
.bench/soak.json; exit status 1 if any call failed.

    .venv/bin/python scripts/soak.py [--minutes 10] [--rate 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from facesvc.v1 import face_service_pb2 as pb
from scripts.bench_stream import VIDEO, Server, encode, load_clip

ROOT = Path(__file__).resolve().parents[1]

DEV = ROOT.parent / "shared" / "faces" / "dev"
PEOPLE = {
    "person_01": ["img1.jpg", "img2.jpg", "img6.jpg", "img7.jpg"],
    "person_04": ["img13.jpg", "img14.jpg", "img15.jpg"],
    "person_07": ["img20.jpg", "img21.jpg"],
    "person_09": ["img24.jpg", "img25.jpg"],
}


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=8.0, help="unary calls per second")
    ap.add_argument("--stream-fps", type=float, default=10.0)
    ap.add_argument("--sample", type=float, default=30.0, help="seconds per table row")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "soak.json"))
    args = ap.parse_args()
    photos = {p: [pb.Image(encoded=(DEV / f).read_bytes()) for f in fs] for p, fs in PEOPLE.items()}
    clip = [encode(f, False) for f in load_clip(VIDEO)[:60]]
    lock = threading.Lock()
    calls: list[tuple[float, str, float, str]] = []  # (t, rpc, seconds, error or "")
    stop = threading.Event()
    with tempfile.TemporaryDirectory() as d:
        srv = Server(Path(d))
        stub = srv.stub
        stub.CreateCollection(pb.CreateCollectionRequest(collection="soak", liveness_policy=pb.LIVENESS_POLICY_OPTIONAL))
        for p, imgs in photos.items():
            stub.Register(pb.RegisterRequest(collection="soak", subject_id=p, image=imgs[0], skip_liveness=True))

        def record(rpc: str, fn):
            t0 = time.monotonic()
            err = ""
            try:
                fn()
            except grpc.RpcError as exc:
                err = f"{exc.code().name}: {exc.details()}"
            with lock:
                calls.append((t0, rpc, time.monotonic() - t0, err))

        def register(p: str):
            r = stub.Register(
                pb.RegisterRequest(
                    collection="soak", subject_id=p, image=random.choice(photos[p]), add_face=True, skip_liveness=True
                ),
                timeout=30,
            )
            faces = stub.GetSubject(pb.GetSubjectRequest(collection="soak", subject_id=p), timeout=10).subject.faces
            for f in faces[1:-1]:  # keep the first and the newest: the face limit never bites
                stub.DeleteFace(pb.DeleteFaceRequest(collection="soak", face_id=f.face_id), timeout=10)
            assert r.face.face_id

        mix = [
            (
                "Verify",
                lambda p: stub.Verify(
                    pb.VerifyRequest(collection="soak", subject_id=p, image=random.choice(photos[p]), skip_liveness=True),
                    timeout=30,
                ),
            ),
            (
                "Search",
                lambda p: stub.Search(
                    pb.SearchRequest(collection="soak", image=random.choice(photos[p]), skip_liveness=True), timeout=30
                ),
            ),
            ("Register", register),
        ]

        def unary_load():
            n, t0 = 0, time.monotonic()
            pool: list[threading.Thread] = []
            while not stop.is_set():
                time.sleep(max(0.0, t0 + n / args.rate - time.monotonic()))
                name, fn = mix[n % len(mix)]
                p = random.choice(list(photos))
                t = threading.Thread(target=record, args=(name, lambda: fn(p)))
                t.start()
                pool = [x for x in pool if x.is_alive()] + [t]
                n += 1
            for t in pool:
                t.join()

        def stream_load():
            while not stop.is_set():

                def frames():
                    yield pb.StreamFramesRequest(config=pb.StreamConfig(collection="soak", identify=True))
                    for i in range(int(args.stream_fps * 20)):  # a new stream every 20 s
                        if stop.is_set():
                            return
                        time.sleep(1 / args.stream_fps)
                        yield pb.StreamFramesRequest(frame=pb.Frame(frame_id=i + 1, image=clip[i % len(clip)]))

                record("StreamFrames", lambda: list(stub.StreamFrames(frames(), timeout=60)))

        threads = [threading.Thread(target=unary_load), threading.Thread(target=stream_load)]
        for t in threads:
            t.start()
        samples = []
        start = time.monotonic()
        end = start + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(min(args.sample, max(0.0, end - time.monotonic())))
            samples.append((time.monotonic() - start, srv.rss_mb(), fds(srv.proc.pid)))
        stop.set()
        for t in threads:
            t.join()
        srv.stop()
    rows, prev = [], 0.0
    for t, rss, nfd in samples:
        window = [c for c in calls if prev <= c[0] - start < t]
        lat = np.array([c[2] for c in window]) * 1000 if window else np.zeros(1)
        rows.append(
            {
                "t_s": round(t),
                "calls": len(window),
                "errors": sum(1 for c in window if c[3]),
                "p50_ms": float(np.percentile(lat, 50)),
                "p95_ms": float(np.percentile(lat, 95)),
                "rss_mb": rss,
                "fds": nfd,
            }
        )
        prev = t
    q = max(1, len(rows) // 4)
    drift = {
        "rss_mb": np.mean([r["rss_mb"] for r in rows[-q:]]) - np.mean([r["rss_mb"] for r in rows[:q]]),
        "fds": np.mean([r["fds"] for r in rows[-q:]]) - np.mean([r["fds"] for r in rows[:q]]),
    }
    errors = [c for c in calls if c[3]]
    print(
        f"\nsoak: {args.minutes:g} min, {args.rate:g} unary calls/s (Verify/Search/Register) + a {args.stream_fps:g} fps stream"
    )
    print(f"{'t s':>6} {'calls':>6} {'errors':>6} {'p50 ms':>8} {'p95 ms':>8} {'RSS MB':>8} {'fds':>5}")
    for r in rows:
        print(
            f"{r['t_s']:6d} {r['calls']:6d} {r['errors']:6d} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['rss_mb']:8.1f} {r['fds']:5d}"
        )
    print(
        f"drift (last quarter - first quarter): RSS {drift['rss_mb']:+.1f} MB, fds {drift['fds']:+.1f}; "
        f"calls {len(calls)}, errors {len(errors)}" + (f" (first: {errors[0][1]} {errors[0][3]})" if errors else "")
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "args": vars(args),
                "rows": rows,
                "drift": drift,
                "calls": len(calls),
                "errors": len(errors),
                "by_rpc": {k: sum(1 for c in calls if c[1] == k) for k in ("Verify", "Search", "Register", "StreamFrames")},
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
