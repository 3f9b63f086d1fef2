#!/usr/bin/env python3
"""facesvc against the peer pipeline, same models, same photos, same machine, same run.

A. detect + embed in process: facesvc's FacePipeline on each runtime (OpenVINO, the
   CPU default, OpenVINO with the int8 models of `make int8`, and onnxruntime, the baseline) vs insightface's FaceAnalysis loading
   the very same det_500m.onnx and w600k_mbf ONNX files from a local directory
   (offline). All get the same decoded BGR photos (the dev portraits): single-image
   latency p50/p95 (one thread; the engines take turns pass by pass), and throughput
   (images/s) with 1 and 2 threads sharing one instance (the median of `--repeat`
   rounds, the engines taking turns).
B. end to end through gRPC (a server subprocess per runtime, all running side by side,
   embedded storage, auth off): Verify of one 640x480 JPEG probe against a registered
   subject, p50/p95 over sequential calls (with and without liveness; the servers take
   turns call by call), then throughput and errors with 1, 8 and 64 concurrent clients
   (each server in turn, the others idle).

    .venv/bin/pip install -e '.[bench]'   # insightface (the peer) and faiss
    .venv/bin/python scripts/bench_compare.py [--repeat 3] [--seconds 10]
    .venv/bin/python scripts/bench_compare.py --servers openvino "openvino latency hint"   # part B only

Prints tables and writes JSON (default .bench/bench_compare.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import grpc
import numpy as np

from bench.common import machine, pct, write_json
from facesvc.v1 import face_service_pb2 as pb
from scripts.bench_stream import Server
from server import config
from server.assembly import build_pipeline
from server.context import serving
from server.rpc import convert
from server.vision.models.runtime import COMPILER

ROOT = Path(__file__).resolve().parents[1]

DEV = ROOT.parent / "shared" / "faces" / "dev"
WEIGHTS = ROOT / "models" / "weights"


def timed_runs(engines: dict, images, repeat: int) -> dict[str, list[float]]:
    """Per-image latency over `repeat` rounds; in each round every engine takes one pass over the
    images in turn, so a burst of noise from other tenants of the machine falls on both sides.
    The engines take turns by pass, not by image: the peer's sessions leave their threads
    spinning after a run, which would slow whichever engine ran next; a pause between passes
    lets them settle."""
    out: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(repeat):
        for name, fn in engines.items():
            time.sleep(0.3)
            for img in images:
                t0 = time.perf_counter()
                fn(img)
                out[name].append(time.perf_counter() - t0)
    return out


def throughput(fn, images, threads: int, repeat: int) -> float:
    work = images * repeat
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(fn, work))
    return len(work) / (time.perf_counter() - t0)


def peer_app(tmp: Path):
    from insightface.app import FaceAnalysis

    d = tmp / "peer"
    d.mkdir()
    for f in ("det_500m.onnx", "w600k_mbf_deq.onnx"):
        os.symlink((WEIGHTS / f).resolve(), d / f)
    app = FaceAnalysis(name=str(d), allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    return app


# part B's servers: the default (OpenVINO, the auto hint: a lone run on every core, concurrent runs a stream per core),
# its int8 models, the latency and throughput hints alone, concurrent calls' faces embedded in one batch, and the
# onnxruntime baseline
SERVERS = {
    "openvino": {"FACESVC_RUNTIME": "openvino"},
    "openvino int8": {"FACESVC_RUNTIME": "openvino", "FACESVC_PRECISION": "int8"},
    "openvino latency hint": {"FACESVC_RUNTIME": "openvino", "FACESVC_OPENVINO_HINT": "latency"},
    "openvino throughput hint": {"FACESVC_RUNTIME": "openvino", "FACESVC_OPENVINO_HINT": "throughput"},
    "openvino micro-batch": {"FACESVC_RUNTIME": "openvino", "FACESVC_EMBED_MICRO_BATCH": "true"},
    "onnxruntime": {"FACESVC_RUNTIME": "onnxruntime"},
}
# part A's facesvc rows, with the settings of part B's server of the same name: the CPU default, its
# int8 models (`make int8`), and the onnxruntime baseline
RUNTIMES = {"openvino": "facesvc (OpenVINO)", "openvino int8": "facesvc (OpenVINO int8)", "onnxruntime": "facesvc (onnxruntime)"}
PEER = "insightface FaceAnalysis (peer)"


def facesvc_engine(env: dict[str, str]):
    pipeline = build_pipeline(config.load([], environ=env))
    opts = convert.detect_options(pb.FaceOptions(), 20, 20)

    def facesvc(img):
        with serving():  # one request, as the server's interceptor counts it (see server/vision/models/runtime.py)
            faces = pipeline.detect(img, opts)
            return pipeline.embed(faces) if faces else []

    return facesvc


def part_a(repeat: int) -> list[dict]:
    images = [cv2.imread(str(p)) for p in sorted(DEV.glob("img*.jpg"))]
    with tempfile.TemporaryDirectory() as d:
        app = peer_app(Path(d))
        peer = lambda img: [f.normed_embedding for f in app.get(img)]  # noqa: E731
        engines = {label: facesvc_engine(SERVERS[rt]) for rt, label in RUNTIMES.items()} | {PEER: peer}
        # warm-up to the steady state of a server that has seen these photos: OpenVINO compiles a graph
        # per photo shape, and with the auto hint others for runs with company, on first need (in the
        # background, with each shape's first call waiting for its graph in bf16); a measured round
        # must not pay for that. Which shapes first meet company in a two-thread pass is chance: two
        # passes, and a second after the compiler has caught up
        for _ in range(2):
            for fn in engines.values():
                for threads in (1, 2, 2):
                    throughput(fn, images, threads, 1)
            COMPILER.wait_idle(120)
        if not COMPILER.wait_idle(120):
            print("warning: graphs still compiling after the warm-up; the first rounds may pay for them", file=sys.stderr)
        # same faces found? (a sanity check that both do the same work)
        counts = {name: sum(len(fn(img)) for img in images) for name, fn in engines.items()}
        lat = timed_runs(engines, images, repeat)
        # throughput: `repeat` alternating rounds of one pass each, the median round per engine
        rates: dict[tuple[str, int], list[float]] = {(name, t): [] for name in engines for t in (1, 2)}
        for _ in range(repeat):
            for threads in (1, 2):
                for name, fn in engines.items():
                    time.sleep(0.3)
                    rates[name, threads].append(throughput(fn, images, threads, 1))
        rows = []
        for name in engines:
            rows.append(
                {
                    "engine": name,
                    "faces": counts[name],
                    "p50_ms": pct(lat[name], 50),
                    "p95_ms": pct(lat[name], 95),
                    "imgs_per_s_1": float(np.median(rates[name, 1])),
                    "imgs_per_s_2": float(np.median(rates[name, 2])),
                    "rounds": {f"{t}_threads": rates[name, t] for t in (1, 2)},
                }
            )
    return rows


def probe_jpeg() -> bytes:
    img = cv2.imread(str(DEV / "img2.jpg"))
    h, w = img.shape[:2]
    s = min(640 / w, 480 / h)
    small = cv2.resize(img, (int(w * s), int(h * s)), interpolation=cv2.INTER_AREA)
    canvas = np.full((480, 640, 3), 127, np.uint8)
    y, x = (480 - small.shape[0]) // 2, (640 - small.shape[1]) // 2
    canvas[y : y + small.shape[0], x : x + small.shape[1]] = small
    return cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def start_server(workdir: Path, env: dict[str, str]) -> Server:
    """A server with a collection `bench` holding `person_01` (the first dev portrait)."""
    workdir.mkdir(parents=True)
    srv = Server(workdir, env=env)
    try:
        srv.face.CreateCollection(pb.CreateCollectionRequest(collection="bench", liveness_policy=pb.LIVENESS_POLICY_OPTIONAL))
        image = pb.Image(encoded=(DEV / "img1.jpg").read_bytes())
        srv.face.Register(pb.RegisterRequest(collection="bench", subject_id="person_01", image=image))
    except BaseException:
        srv.stop()
        raise
    return srv


def sequential(servers: dict[str, Server], calls: int) -> dict[str, dict]:
    """Verify p50/p95 of one call at a time, with and without liveness, the servers taking turns call
    by call (all running, the others idle): the machine's drift over the minutes a run takes falls
    on every server alike, where server after server it moved the ratios by a third."""
    probe = pb.Image(encoded=probe_jpeg())
    out: dict[str, dict] = {name: {} for name in servers}
    for label, skip in (("Verify (no liveness)", True), ("Verify + liveness", False)):
        req = pb.VerifyRequest(collection="bench", subject_id="person_01", image=probe, skip_liveness=skip)
        lat: dict[str, list[float]] = {name: [] for name in servers}
        for srv in servers.values():  # a first call per server: its graphs for this probe's shape
            assert srv.face.Verify(req, timeout=30).match
        for _ in range(calls):
            for name, srv in servers.items():
                t0 = time.perf_counter()
                srv.face.Verify(req, timeout=30)
                lat[name].append(time.perf_counter() - t0)
        for name in servers:
            out[name][label] = {"p50_ms": pct(lat[name], 50), "p95_ms": pct(lat[name], 95)}
    return out


def concurrent(srv: Server, seconds: float) -> list[dict]:
    """Calls/s, errors and latency with 1, 8 and 64 clients calling Verify without pause. A first,
    unmeasured round of 8 clients has the server compile its graphs for concurrent runs (on first
    need, in the background), which a measured round must not pay for."""
    req = pb.VerifyRequest(collection="bench", subject_id="person_01", image=pb.Image(encoded=probe_jpeg()), skip_liveness=True)
    conc = []
    for clients in (8, 1, 8, 64):
        lat, errors, stop = [], [], threading.Event()
        lock = threading.Lock()

        def client():
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    srv.face.Verify(req, timeout=60)
                    with lock:
                        lat.append(time.perf_counter() - t0)
                except grpc.RpcError as exc:
                    with lock:
                        errors.append(exc.code().name)

        threads = [threading.Thread(target=client) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        conc.append(
            {
                "clients": clients,
                "calls_per_s": len(lat) / elapsed,
                "errors": len(errors),
                "p50_ms": pct(lat, 50),
                "p95_ms": pct(lat, 95),
            }
        )
    return conc[1:]  # the warm-up round


def part_b(calls: int, seconds: float, names: list[str]) -> dict:
    """Every server in `names` started side by side; the sequential calls alternate between them,
    then each server in turn takes the concurrent clients alone (the others idle)."""
    with tempfile.TemporaryDirectory() as d:
        servers: dict[str, Server] = {}
        try:
            for i, name in enumerate(names):
                servers[name] = start_server(Path(d) / str(i), SERVERS[name])
            seq = sequential(servers, calls)
            return {name: {"sequential": seq[name], "concurrent": concurrent(srv, seconds)} for name, srv in servers.items()}
        finally:
            for srv in servers.values():
                srv.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="passes over the dev portraits (part A)")
    ap.add_argument("--calls", type=int, default=100, help="sequential Verify calls (part B)")
    ap.add_argument("--seconds", type=float, default=10.0, help="per concurrency level (part B)")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "bench_compare.json"))
    ap.add_argument("--servers", nargs="*", choices=list(SERVERS), help="part B only, on these servers (and onnxruntime)")
    args = ap.parse_args()
    if args.servers is not None:
        b = part_b(args.calls, args.seconds, list(dict.fromkeys([*args.servers, "onnxruntime"])))
        print_b(b)
        print(f"\nwrote {write_json(args.out, {'grpc': b})}")
        return 0
    try:
        import insightface  # noqa: F401
    except ImportError:
        print("the peer is not installed: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 2
    a = part_a(args.repeat)
    m = machine()
    print(f"\n{m['cpu']}, {m['cpus']} cores, {' '.join(m['cpu_features'])}; git {m['git']}")
    print(
        f"\nA. detect + embed in process, {len(list(DEV.glob('img*.jpg')))} dev portraits (decoded), "
        f"{os.cpu_count()} cores, same ONNX files"
    )
    print(f"{'engine':34} {'faces':>5} {'p50 ms':>8} {'p95 ms':>8} {'img/s 1 thr':>11} {'img/s 2 thr':>11}")
    for r in a:
        print(
            f"{r['engine']:34} {r['faces']:5d} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['imgs_per_s_1']:11.1f} {r['imgs_per_s_2']:11.1f}"
        )
    rows = {r["engine"]: r for r in a}
    p = rows[PEER]
    ratios = {}
    for rt, label in RUNTIMES.items():
        f = rows[label]
        ratios[rt] = {
            "p50": p["p50_ms"] / f["p50_ms"],
            "throughput_1": f["imgs_per_s_1"] / p["imgs_per_s_1"],
            "throughput_2": f["imgs_per_s_2"] / p["imgs_per_s_2"],
        }
        r = ratios[rt]
        print(
            f"{label} vs peer: p50 {r['p50']:.2f}x lower, throughput {r['throughput_1']:.2f}x (1 thread), "
            f"{r['throughput_2']:.2f}x (2 threads)"
        )
    b = part_b(args.calls, args.seconds, list(SERVERS))
    ratios.update(print_b(b))
    out = write_json(args.out, {"in_process": a, "ratios": ratios, "grpc": b})
    print(f"\nwrote {out}")
    return 0


def print_b(b: dict) -> dict:
    """Prints part B's tables; returns the Verify p50 ratios to onnxruntime."""
    ratios = {}
    print("\nB. gRPC end to end, one 640x480 JPEG probe")
    for rt, res in b.items():
        for label, r in res["sequential"].items():
            print(f"{rt:26} {label:24} p50 {r['p50_ms']:6.1f} ms   p95 {r['p95_ms']:6.1f} ms")
    print(f"{'server':26} {'clients':>8} {'calls/s':>8} {'errors':>7} {'p50 ms':>8} {'p95 ms':>8}")
    for rt, res in b.items():
        for r in res["concurrent"]:
            print(f"{rt:26} {r['clients']:8d} {r['calls_per_s']:8.1f} {r['errors']:7d} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f}")
    verify = "Verify (no liveness)"
    for rt in b:
        if rt == "onnxruntime":
            continue
        key = f"verify_p50_{rt.replace(' ', '_')}_vs_onnxruntime"
        ratios[key] = b[rt]["sequential"][verify]["p50_ms"] / b["onnxruntime"]["sequential"][verify]["p50_ms"]
        print(f"Verify p50, {rt} / onnxruntime: {ratios[key]:.2f}")
    return ratios


if __name__ == "__main__":
    sys.exit(main())
