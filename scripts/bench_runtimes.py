#!/usr/bin/env python3
"""Each model on each runtime: onnxruntime (CPU) against OpenVINO (f32; bf16 where the CPU has it
natively; int8 for the models `make int8` quantizes), one inference at a time, the same input, in
the same run.

The runtimes take turns call by call, so the machine's noise falls on all of them. SCRFD is also
timed on OpenVINO's dynamic-shape graph against the graph compiled for the frame's own shape (what
the server uses for the shapes it meets most), with the memory each holds; fed a float blob made
with OpenCV against fed its 8-bit pixels, converted in the graph (PixelInput); and, two threads
each running a frame's preparation, SCRFD and the recognizer as the pipeline does, on the graphs
concurrent runs could take: the throughput hint's streams pinned to cores and not, and one thread
per run (what the server takes while no more runs are in flight than there are cores).

    .venv/bin/python scripts/bench_runtimes.py [--calls 300] [--threads 0]

Prints a table and writes JSON (default .bench/bench_runtimes.json).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from bench.common import pct, write_json
from server.vision.models.manifest import DEFAULT_MODEL_DIR, int8_path, load_manifest
from server.vision.models.runtime import OpenVinoSession, RuntimeOptions, create_session, native_bf16, ov_core, resolve_precision
from server.vision.models.scrfd import ScrfdDetector

ROOT = Path(__file__).resolve().parents[1]
# model name -> its input for one call: one face, one 640x480 frame, one liveness crop
INPUTS = {
    "w600k_mbf": (1, 3, 112, 112),
    "scrfd_500m": (1, 3, 480, 640),
    "minifasnet_v2": (1, 3, 80, 80),
    "minifasnet_se128": (1, 3, 128, 128),
    "age_dlib": (1, 3, 64, 64),
    "gender_dlib": (1, 3, 32, 32),
}


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e6


def openvino(precision: str, threads: int) -> RuntimeOptions:
    """OpenVINO at `precision` on its latency graph alone: one call at a time, as every row here runs."""
    return RuntimeOptions(runtime="openvino", precision=precision, intra_op_threads=threads, hint="latency")


def sessions(path: str, threads: int, int8: Path | None = None) -> dict:
    out = {
        "onnxruntime": create_session(
            path, RuntimeOptions(runtime="onnxruntime", intra_op_threads=threads), ["CPUExecutionProvider"]
        )
    }
    out["openvino f32"] = create_session(path, openvino("f32", threads), [])
    if native_bf16():
        out["openvino bf16"] = create_session(path, openvino("bf16", threads), [])
    if int8 is not None:
        out["openvino int8"] = create_session(str(int8), openvino("int8", threads), [], quantized=True)
    return out


def time_turns(runs: dict, x: np.ndarray, name: str, calls: int) -> dict[str, list[float]]:
    feed = {name: x}
    for run in runs.values():  # warm-up (and, for a shaped graph, its compilation)
        for _ in range(10):
            run(feed)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(calls):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run(feed)
            times[k].append(time.perf_counter() - t0)
    return times


def pixels_in_graph(path: str, threads: int, calls: int) -> dict:
    """SCRFD on a 640x480 frame at the default precision: a float blob made with OpenCV then the
    graph, against the 8-bit pixels into a graph that converts them itself."""
    frame = np.random.default_rng(1).integers(0, 256, (480, 640, 3), np.uint8)
    precision = "bf16" if native_bf16() else "f32"
    blob_session = create_session(path, openvino(precision, threads), [])
    pixel_session = create_session(path, openvino(precision, threads), [], pixels=ScrfdDetector.pixels)
    name = blob_session.get_inputs()[0].name
    pixels = ScrfdDetector.pixels

    def blob(_):
        blob_session.run(None, {name: pixels.blob(frame[None])})

    t = time_turns({"blob": blob, "pixels": lambda _: pixel_session.run(None, {name: frame[None]})}, frame, name, calls)
    return {"precision": precision, "blob_p50_ms": pct(t["blob"], 50), "pixels_p50_ms": pct(t["pixels"], 50)}


# the graphs two concurrent calls' runs could take: the throughput hint's streams pinned to cores (the
# plugin's default), not pinned, and one thread per run (what the server runs while no more runs are
# in flight than there are cores)
COMPANY = {
    "throughput, pinned": {"PERFORMANCE_HINT": "THROUGHPUT", "ENABLE_CPU_PINNING": True},
    "throughput, unpinned": {"PERFORMANCE_HINT": "THROUGHPUT", "ENABLE_CPU_PINNING": False},
    "one thread per run": {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1, "ENABLE_CPU_PINNING": False},
}


def company_graphs(det_path: str, rec_path: str, seconds: float) -> dict:
    """Two threads, each preparing a 1280x960 frame (downscale, blob) and running SCRFD then the
    recognizer, as two concurrent calls do: frames per second and the process's CPU use on each of
    the COMPANY graphs."""
    core = ov_core()
    precision = resolve_precision("auto")
    frame = np.random.default_rng(2).integers(0, 256, (960, 1280, 3), np.uint8)
    face = np.random.default_rng(3).random((1, 3, 112, 112), np.float32)
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for _ in range(2):  # twice each, alternating: the machine's drift falls on all
        for label, settings in COMPANY.items():
            config = settings | {"INFERENCE_PRECISION_HINT": precision}
            det_model, rec_model = core.read_model(det_path), core.read_model(rec_path)
            det_model.reshape({det_model.inputs[0].get_any_name(): [1, 3, 480, 640]})
            det, rec = core.compile_model(det_model, "CPU", config), core.compile_model(rec_model, "CPU", config)
            done, stop = [0, 0], threading.Event()

            def work(i, det=det, rec=rec, done=done, stop=stop):
                d, r = det.create_infer_request(), rec.create_infer_request()
                while not stop.is_set():
                    small = cv2.resize(frame, (640, 480), interpolation=cv2.INTER_LINEAR)
                    d.infer({0: ScrfdDetector.pixels.blob(small[None])})
                    r.infer({0: face})
                    done[i] += 1

            threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
            for th in threads:
                th.start()
            time.sleep(1.0)  # warm-up
            start, t0, c0 = sum(done), time.perf_counter(), time.process_time()
            time.sleep(seconds)
            wall = time.perf_counter() - t0
            rates.setdefault(label, []).append((sum(done) - start) / wall)
            cpu.setdefault(label, []).append((time.process_time() - c0) / wall)
            stop.set()
            for th in threads:
                th.join()
    return {
        "precision": precision,
        "frames_per_s": {k: float(np.median(v)) for k, v in rates.items()},
        "cpu_cores_busy": {k: float(np.median(v)) for k, v in cpu.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--threads", type=int, default=0, help="inference threads per model; 0 = one per core")
    ap.add_argument("--no-int8", dest="int8", action="store_false", help="leave out the int8 models (`make int8` makes them)")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "bench_runtimes.json"))
    args = ap.parse_args()
    manifest = load_manifest()
    rows = []
    for model, shape in INPUTS.items():
        spec = manifest[model]
        path = str(DEFAULT_MODEL_DIR / spec.file)
        ss = sessions(path, args.threads, int8_path(spec, DEFAULT_MODEL_DIR) if spec.int8 and args.int8 else None)
        name = ss["onnxruntime"].get_inputs()[0].name
        x = (np.random.default_rng(0).random(shape, np.float32) * 255).astype(np.float32)
        times = time_turns({k: (lambda feed, s=s: s.run(None, feed)) for k, s in ss.items()}, x, name, args.calls)
        row = {"model": model, "input": "x".join(map(str, shape[1:]))}
        row.update({k: pct(v, 50) for k, v in times.items()})
        rows.append(row)
    # SCRFD: dynamic-shape graph vs the graph compiled for 640x480, and what each holds in memory
    path = str(DEFAULT_MODEL_DIR / manifest["scrfd_500m"].file)
    x = np.zeros(INPUTS["scrfd_500m"], np.float32)
    before = rss_mb()
    dynamic = OpenVinoSession(path, openvino("f32", args.threads))
    dynamic._per_shape = False  # never specialise: the dynamic graph only
    dynamic.run(None, {"input.1": x})
    dynamic_mb = rss_mb() - before
    before = rss_mb()
    shaped = OpenVinoSession(path, openvino("f32", args.threads))
    shaped.run(None, {"input.1": x})
    while not shaped.specialised(((("input.1", x.shape),))):
        time.sleep(0.05)
    shaped.run(None, {"input.1": x})
    shaped_mb = rss_mb() - before  # the dynamic graph it falls back on, plus one shaped graph
    t = time_turns(
        {"dynamic": lambda f: dynamic.run(None, f), "per shape": lambda f: shaped.run(None, f)}, x, "input.1", args.calls
    )
    shapes = {"dynamic_p50_ms": pct(t["dynamic"], 50), "per_shape_p50_ms": pct(t["per shape"], 50)}
    shapes.update(dynamic_mb=dynamic_mb, dynamic_plus_one_shape_mb=shaped_mb)

    pixels = pixels_in_graph(path, args.threads, args.calls)
    company = company_graphs(path, str(DEFAULT_MODEL_DIR / manifest["w600k_mbf"].file), 5.0)

    cols = list(dict.fromkeys(k for r in rows for k in r if k not in ("model", "input")))
    print(f"\np50 ms per inference, one call at a time ({args.calls} calls each, runtimes taking turns)")
    print(f"{'model':18} {'input':10} " + " ".join(f"{c:>14}" for c in cols) + f" {'ort / ov f32':>13}")
    for r in rows:
        print(
            f"{r['model']:18} {r['input']:10} "
            + " ".join(f"{r[c]:14.2f}" if c in r else f"{'-':>14}" for c in cols)
            + f" {r['onnxruntime'] / r['openvino f32']:12.2f}x"
        )
    print(
        f"\nSCRFD 640x480 on OpenVINO: dynamic graph p50 {shapes['dynamic_p50_ms']:.2f} ms ({dynamic_mb:.0f} MB), "
        f"graph for the frame's shape p50 {shapes['per_shape_p50_ms']:.2f} ms "
        f"(dynamic + one shape: {shaped_mb:.0f} MB)"
    )
    print(
        f"SCRFD 640x480, {pixels['precision']}: float blob made with OpenCV + graph p50 {pixels['blob_p50_ms']:.2f} ms, "
        f"8-bit pixels converted in the graph p50 {pixels['pixels_p50_ms']:.2f} ms"
    )
    print(f"\ntwo threads, each a frame's preparation + SCRFD + recognizer ({company['precision']}):")
    for label, rate in company["frames_per_s"].items():
        print(f"  {label:22} {rate:6.1f} frames/s, {company['cpu_cores_busy'][label] * 100:4.0f} % CPU")
    out = write_json(
        args.out,
        {"models": rows, "scrfd_shapes": shapes, "scrfd_pixels": pixels, "company": company, "native_bf16": native_bf16()},
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
