#!/usr/bin/env python3
"""Per-stage latency of the face pipeline and end-to-end latency through gRPC.

Stages (in-process, on the dev portraits, each photo several times):
  decode   JPEG bytes -> BGR array (header check + OpenCV decode)
  detect   downscale to 640 px + detector (SCRFD-500M by default)
  align    ArcFace 112x112 warp + quality estimate
  liveness MiniFASNet pair on the face
  embed    recognizer on one aligned face
End to end (a real gRPC server on localhost, one client, sequential calls):
  Embed    one 640x480 JPEG: decode + detect + align + embed (one probe)
  Compare  two 640x480 JPEGs: the above twice + similarity
  Compare+liveness  the same with require_liveness

Prints a table (p50/p95/mean in ms) and writes JSON (default .bench/bench_pipeline.json).

    .venv/bin/python scripts/bench_pipeline.py [--repeat 3] [--e2e-calls 60]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2
import grpc
import numpy as np

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from server import config
from server.app import FaceServer
from server.vision.alignment import arcface_crop
from server.vision.imaging import ImageLimits, decode_encoded, resize_long_side
from server.vision.quality import assess

ROOT = Path(__file__).resolve().parents[1]

DEV = ROOT.parent / "shared" / "faces" / "dev"


def summarize(samples: list[float]) -> dict:
    a = np.array(samples) * 1000
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)), "mean_ms": float(a.mean())}


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def bench_stages(pipeline, photos: list[bytes], repeat: int) -> dict:
    stages = {k: [] for k in ("decode", "detect", "align", "liveness", "embed")}
    limits = ImageLimits()
    for _ in range(repeat):
        for data in photos:
            img, t = timed(decode_encoded, data, limits)
            stages["decode"].append(t)
            t0 = time.perf_counter()
            small, scale = resize_long_side(img, pipeline.detect_max_side)
            boxes, kps, scores = pipeline.detector.detect(small)
            stages["detect"].append(time.perf_counter() - t0)
            i = int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))
            box, lm = boxes[i] / scale, kps[i] / scale
            t0 = time.perf_counter()
            aligned = arcface_crop(img, lm)
            assess(box, lm, aligned)
            stages["align"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for m in pipeline.liveness_models:
                m.score(img, box)
            stages["liveness"].append(time.perf_counter() - t0)
            _, t = timed(pipeline.recognizer.embed, [aligned])
            stages["embed"].append(t)
    return {k: summarize(v) for k, v in stages.items()}


def to_640x480_jpeg(path: Path) -> bytes:
    img = cv2.imread(str(path))
    h, w = img.shape[:2]
    s = max(640 / w, 480 / h)  # cover 640x480, centre-crop
    img = cv2.resize(img, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    y0, x0 = (img.shape[0] - 480) // 2, (img.shape[1] - 640) // 2
    ok, buf = cv2.imencode(".jpg", img[y0 : y0 + 480, x0 : x0 + 640], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return buf.tobytes()


def bench_e2e(settings, probes: list[bytes], calls: int) -> dict:
    # stateless RPCs only: no keys, and the embedded database in a throw-away directory
    tmp = tempfile.mkdtemp(prefix="bench_pipeline_")
    srv = FaceServer(replace(settings, host="127.0.0.1", port=0, auth=False, data_dir=tmp))
    srv.start()
    srv.load_models()
    out = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.FaceServiceStub(ch)
            kinds = {
                "grpc Embed (1 probe)": lambda i: stub.Embed(
                    pb.EmbedRequest(image=pb.Image(encoded=probes[i % len(probes)]), face_options=pb.FaceOptions(max_faces=1)),
                    timeout=30,
                ),
                "grpc Compare (2 photos)": lambda i: stub.Compare(
                    pb.CompareRequest(
                        source=pb.Image(encoded=probes[i % len(probes)]), target=pb.Image(encoded=probes[(i + 1) % len(probes)])
                    ),
                    timeout=30,
                ),
                "grpc Compare+liveness": lambda i: stub.Compare(
                    pb.CompareRequest(
                        source=pb.Image(encoded=probes[i % len(probes)]),
                        target=pb.Image(encoded=probes[(i + 1) % len(probes)]),
                        require_liveness=True,
                    ),
                    timeout=30,
                ),
            }
            for name, call in kinds.items():
                for i in range(5):  # warm-up
                    _safe(call, i)
                samples = []
                for i in range(calls):
                    t0 = time.perf_counter()
                    _safe(call, i)
                    samples.append(time.perf_counter() - t0)
                out[name] = summarize(samples)
    finally:
        srv.stop(0)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _safe(call, i):
    try:
        call(i)
    except grpc.RpcError as err:  # a spoof verdict on a dev photo is still a full pipeline run
        if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
            raise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="passes over the dev portraits for the stage timings")
    ap.add_argument("--e2e-calls", type=int, default=60, help="timed calls per end-to-end row")
    ap.add_argument("--json", type=Path, default=ROOT / ".bench" / "bench_pipeline.json")
    args = ap.parse_args()

    settings = config.load([], environ={k: v for k, v in os.environ.items() if k.startswith("FACESVC_")})
    from server.assembly import build_pipeline

    pipeline = build_pipeline(settings)
    portraits = sorted(p for p in DEV.glob("img*.jpg"))
    photos = [p.read_bytes() for p in portraits]
    bench_stages(pipeline, photos[:3], 1)  # warm-up
    stages = bench_stages(pipeline, photos, args.repeat)
    probes = [to_640x480_jpeg(p) for p in portraits]
    e2e = bench_e2e(settings, probes, args.e2e_calls)

    print(
        f"facesvc pipeline benchmark — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"detector={settings.detector}, recognizer={settings.recognizer}, liveness={settings.liveness}"
    )
    print(f"{'stage':<26} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'mean ms':>8}")
    rows = {**{f"stage {k}": v for k, v in stages.items()}, **e2e}
    for name, r in rows.items():
        print(f"{name:<26} {r['n']:>5} {r['p50_ms']:>8.2f} {r['p95_ms']:>8.2f} {r['mean_ms']:>8.2f}")
    print(
        f"(stages: {len(photos)} dev portraits 330x512..2500x1728, x{args.repeat}; gRPC rows: 640x480 JPEG probes, "
        f"{args.e2e_calls} sequential calls)"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "settings": {
                    "detector": settings.detector,
                    "recognizer": settings.recognizer,
                    "liveness": settings.liveness,
                    "cpus": os.cpu_count(),
                },
                "stages": stages,
                "end_to_end": e2e,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
