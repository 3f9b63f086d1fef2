#!/usr/bin/env python3
"""StreamFrames under a camera's load: a real video sent at 15 / 30 / 60 fps as 640x480 frames.

A server subprocess (embedded storage, auth off) gets one stream per row; each
row sends the clip (looped) for --seconds at the row's rate, paced like a
camera, as raw BGR frames (what camera clients send; --jpeg to encode).
Per row: frames sent, processed, dropped by the server (backpressure), processed
fps, end-to-end latency p50/p95 (client: send -> answer), the server's own
latency p50/p95 (receipt -> answer), and the server's RSS at the start, the end
and its maximum (sampled every 0.25 s). Rows: detection only at each rate, and
detection + identity (the person of the clip enrolled) at 30 fps; first, a fresh server's first
stream (2 s at 60 fps, before any other call), with its first answer's end-to-end time.

    .venv/bin/python scripts/bench_stream.py [--seconds 10] [--video ../shared/faces/video/single_closeup_720p.mp4] [--precision int8]

Prints a table and writes JSON (default .bench/bench_stream.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from bench.common import pct, write_json
from bench.launcher import ServerProcess
from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]

VIDEO = ROOT.parent / "shared" / "faces" / "video" / "single_closeup_720p.mp4"


def load_clip(path: Path, size=(640, 480)) -> list[np.ndarray]:
    """The clip's frames, centre-cropped to 4:3 and scaled to 640x480."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        h, w = f.shape[:2]
        cw = min(w, h * 4 // 3)
        x0 = (w - cw) // 2
        frames.append(cv2.resize(f[:, x0 : x0 + cw], size, interpolation=cv2.INTER_AREA))
    cap.release()
    if not frames:
        raise SystemExit(f"cannot read {path}")
    return frames


class Server(ServerProcess):
    """The server as the benchmarks run it: auth off, its data under `workdir`."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None):
        super().__init__(
            "--auth=false",
            log_path=workdir / "server.log",
            api_key=None,
            env={"FACESVC_DATA_DIR": str(workdir / "data"), **(env or {})},
        )
        self.face = pb_grpc.FaceServiceStub(self.channel)


def encode(frame: np.ndarray, jpeg: bool) -> pb.Image:
    if jpeg:
        return pb.Image(encoded=cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 85])[1].tobytes())
    h, w = frame.shape[:2]
    return pb.Image(raw=pb.RawFrame(width=w, height=h, format=pb.PIXEL_FORMAT_BGR, data=frame.tobytes()))


def run_row(srv: Server, clip, fps: float, seconds: float, config: pb.StreamConfig, jpeg: bool) -> dict:
    n = int(fps * seconds)
    images = [encode(f, jpeg) for f in clip]  # encoded once: the client's cost is not the server's
    sent_at: dict[int, float] = {}
    rss, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            rss.append(srv.rss_mb())
            stop.wait(0.25)

    def requests():
        yield pb.StreamFramesRequest(config=config)
        t0 = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, t0 + i / fps - time.monotonic()))
            sent_at[i + 1] = time.monotonic()
            yield pb.StreamFramesRequest(frame=pb.Frame(frame_id=i + 1, image=images[i % len(images)]))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    e2e, server_s, dropped, processed = [], [], 0, 0
    t_start = time.monotonic()
    for a in srv.face.StreamFrames(requests(), timeout=seconds * 4 + 60):
        now = time.monotonic()
        processed += 1
        dropped += len(a.skipped_frame_ids)
        e2e.append(now - sent_at[a.frame_id])
        server_s.append(a.latency_ms / 1000)
    elapsed = time.monotonic() - t_start
    stop.set()
    sampler.join()
    return {
        "fps_in": fps,
        "sent": n,
        "processed": processed,
        "dropped": dropped,
        "processed_fps": processed / elapsed,
        "first_e2e_ms": e2e[0] * 1000 if e2e else 0.0,
        "e2e_p50_ms": pct(e2e, 50),
        "e2e_p95_ms": pct(e2e, 95),
        "server_p50_ms": pct(server_s, 50),
        "server_p95_ms": pct(server_s, 95),
        "rss_start_mb": rss[0],
        "rss_end_mb": rss[-1],
        "rss_max_mb": max(rss),
        "rss_samples_mb": [round(r, 1) for r in rss],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", default=str(VIDEO))
    ap.add_argument("--seconds", type=float, default=10.0, help="per row")
    ap.add_argument("--rates", default="15,30,60")
    ap.add_argument("--jpeg", action="store_true", help="send JPEG frames instead of raw BGR")
    ap.add_argument("--precision", default="auto", help="FACESVC_PRECISION of the server (int8: `make int8` first)")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "bench_stream.json"))
    args = ap.parse_args()
    clip = load_clip(Path(args.video))
    with tempfile.TemporaryDirectory() as d:
        srv = Server(Path(d), env={"FACESVC_PRECISION": args.precision})
        try:
            # a fresh server's first call: what its start-up warm-up leaves to the first camera
            rows = [{"mode": "first stream", **run_row(srv, clip, 60.0, 2.0, pb.StreamConfig(), args.jpeg)}]
            srv.face.CreateCollection(pb.CreateCollectionRequest(collection="bench", liveness_policy=pb.LIVENESS_POLICY_OPTIONAL))
            srv.face.Register(
                pb.RegisterRequest(collection="bench", subject_id="clip-person", image=encode(clip[0], True), skip_liveness=True)
            )
            for fps in [float(r) for r in args.rates.split(",")]:
                rows.append({"mode": "detect", **run_row(srv, clip, fps, args.seconds, pb.StreamConfig(), args.jpeg)})
            rows.append(
                {
                    "mode": "detect+identify",
                    **run_row(srv, clip, 30.0, args.seconds, pb.StreamConfig(collection="bench", identify=True), args.jpeg),
                }
            )
        finally:
            srv.stop()
    head = (
        f"{'mode':16} {'fps in':>6} {'sent':>5} {'done':>5} {'dropped':>7} {'done fps':>8} {'e2e p50':>8} "
        f"{'e2e p95':>8} {'srv p50':>8} {'srv p95':>8} {'RSS start/end/max MB':>21}"
    )
    print(
        f"\n{Path(args.video).name}, 640x480 {'JPEG' if args.jpeg else 'raw BGR'} frames, {args.seconds:.0f} s per row, "
        f"{os.cpu_count()} cores, precision {args.precision}"
    )
    print(head)
    print("-" * len(head))
    print(f"(first stream: its first answer {rows[0]['first_e2e_ms']:.0f} ms after its frame was sent)")
    for r in rows:
        print(
            f"{r['mode']:16} {r['fps_in']:6.0f} {r['sent']:5d} {r['processed']:5d} {r['dropped']:7d} {r['processed_fps']:8.1f} "
            f"{r['e2e_p50_ms']:8.1f} {r['e2e_p95_ms']:8.1f} {r['server_p50_ms']:8.1f} {r['server_p95_ms']:8.1f} "
            f"{r['rss_start_mb']:7.0f}/{r['rss_end_mb']:.0f}/{r['rss_max_mb']:.0f}"
        )
    out = write_json(
        args.out, {"video": args.video, "seconds": args.seconds, "jpeg": args.jpeg, "precision": args.precision, "rows": rows}
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
