#!/usr/bin/env python3
"""The CUDA path (onnxruntime-gpu) against onnxruntime on the same machine's CPU, in one run.

For a machine with an NVIDIA GPU and `make install-gpu` (or onnxruntime-gpu on the path). It needs
only the pipeline's packages (server.assembly), not the server's, so it runs in a GPU image too.
Each section prints and saves its results as it ends, in this order:

  1. agreement: on the shared photos, CUDA's boxes and landmarks within 1 px of the CPU's,
     embeddings at cosine >= 0.999, liveness scores within 0.01 (tests/test_runtimes.py's bounds);
  2. the first and the later runs of input shapes a session has not seen (SCRFD frame sizes,
     recognizer batch sizes), with cuDNN's default exhaustive search and with its heuristic;
  3. per model: p50 of one inference on each, taking turns; the recognizer also in batches
     (faces/s), where a GPU should pay back FACESVC_EMBED_MICRO_BATCH;
  4. the pipeline: a Verify's work per photo (detect the one face, embed it) one at a time (p50)
     and from several threads (photos/s); on CUDA the models keep to a few input shapes
     (TimedSession.fixed_shapes);
  5. LFW pair accuracy at the stored threshold on the GPU (scripts/eval_verification.py);
  6. the pipeline again with micro-batching.

    python scripts/bench_cuda.py [--photos 100] [--calls 200] [--threads 1,8] [--no-eval]

`--device cpu` runs every row on the CPU (a dry run of the script on a machine without a GPU).
Prints tables and writes JSON (default .bench/bench_cuda.json).
"""

from __future__ import annotations

import argparse
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from bench.common import pct, write_json
from scripts.bench_runtimes import INPUTS, time_turns
from scripts.eval_verification import FACES, evaluate
from server import config
from server.assembly import build_pipeline
from server.vision.models.manifest import DEFAULT_MODEL_DIR, load_manifest
from server.vision.models.runtime import RuntimeOptions, choose_providers, create_session
from server.vision.pipeline import DetectOptions, upright

ROOT = Path(__file__).resolve().parents[1]
OPTS = DetectOptions(min_face_size=10)
BATCHES = (1, 8, 32, 128)
# frame shapes a camera or an upload may bring, each new to the session when first timed
NEW_SHAPES = ((480, 640), (720, 1280), (640, 480), (544, 960))


def pipeline_on(device: str, micro_batch: bool = False):
    env = {"FACESVC_DEVICE": device, "FACESVC_RUNTIME": "onnxruntime"}
    if micro_batch:
        env["FACESVC_EMBED_MICRO_BATCH"] = "true"
    return build_pipeline(config.load([], environ=env))


def photos(n: int) -> list[np.ndarray]:
    paths = sorted((FACES / "dev").glob("img*.jpg"))[:10] + sorted((FACES / "lfw").glob("*/*.jpg"))
    return [img for img in (cv2.imread(str(p)) for p in paths[:n]) if img is not None]


def agreement(gpu, cpu, images: list[np.ndarray]) -> dict:
    """The largest differences between the two pipelines on the same photos."""
    box = lm = live = 0.0
    cos = 1.0
    count_mismatch = 0
    for img in images:
        a, b = gpu.detect(img, OPTS), cpu.detect(img, OPTS)
        if len(a) != len(b):
            count_mismatch += 1
            continue
        if not a:
            continue
        for fa, fb in zip(a, b):
            box = max(box, float(np.abs(fa.box - fb.box).max()))
            lm = max(lm, float(np.abs(fa.landmarks - fb.landmarks).max()))
        crops = [f.aligned for f in b]  # the same crops into both recognizers
        cos = min(cos, float(np.sum(gpu.recognizer.embed(crops) * cpu.recognizer.embed(crops), axis=1).min()))
        turned, up = upright(img, b[0])
        for mg, mc in zip(gpu.liveness_models, cpu.liveness_models):
            live = max(live, abs(mg.score(turned, up.box) - mc.score(turned, up.box)))
    ok = count_mismatch == 0 and box <= 1.0 and lm <= 1.0 and cos >= 0.999 and live <= 0.01
    return {
        "photos": len(images),
        "face_count_mismatches": count_mismatch,
        "max_box_px": box,
        "max_landmark_px": lm,
        "min_embedding_cosine": cos,
        "max_liveness_diff": live,
        "within_bounds": ok,
    }


def per_model(device: str, calls: int) -> list[dict]:
    manifest = load_manifest()
    rows = []
    for model, shape in INPUTS.items():
        path = str(DEFAULT_MODEL_DIR / manifest[model].file)
        runs = {
            label: create_session(path, RuntimeOptions(runtime="onnxruntime", device=where), choose_providers(where))
            for label, where in (("cpu", "cpu"), ("gpu", device))
        }
        name = runs["cpu"].get_inputs()[0].name
        x = (np.random.default_rng(0).random(shape, np.float32) * 255).astype(np.float32)
        t = time_turns({k: (lambda feed, s=s: s.run(None, feed)) for k, s in runs.items()}, x, name, calls)
        rows.append(
            {"model": model, "input": "x".join(map(str, shape[1:])), "cpu_ms": pct(t["cpu"], 50), "gpu_ms": pct(t["gpu"], 50)}
        )
        if model == "w600k_mbf":
            for n in BATCHES:
                xb = np.repeat(x, n, axis=0)
                tb = time_turns(
                    {k: (lambda feed, s=s: s.run(None, feed)) for k, s in runs.items()}, xb, name, max(10, calls // 10)
                )
                rows.append(
                    {
                        "model": model,
                        "input": f"batch {n}",
                        "cpu_ms": pct(tb["cpu"], 50),
                        "gpu_ms": pct(tb["gpu"], 50),
                        "cpu_faces_s": n / (pct(tb["cpu"], 50) / 1000),
                        "gpu_faces_s": n / (pct(tb["gpu"], 50) / 1000),
                    }
                )
    return rows


def new_shapes(device: str) -> list[dict]:
    """First and steady calls on shapes a session has not seen, per cuDNN search mode: SCRFD on frame
    sizes, the recognizer on micro-batch sizes."""
    if device == "cpu":
        return []
    manifest = load_manifest()
    cases = {
        "scrfd_500m": [(1, 3, h, w) for h, w in NEW_SHAPES],
        "w600k_mbf": [(n, 3, 112, 112) for n in (3, 5, 12, 16)],
    }
    rows = []
    for search in ("EXHAUSTIVE", "HEURISTIC"):
        for model, shapes in cases.items():
            so = ort.SessionOptions()
            so.log_severity_level = 3
            s = ort.InferenceSession(
                str(DEFAULT_MODEL_DIR / manifest[model].file),
                sess_options=so,
                providers=[("CUDAExecutionProvider", {"cudnn_conv_algo_search": search}), "CPUExecutionProvider"],
            )
            name = s.get_inputs()[0].name
            for shape in shapes:
                x = np.random.default_rng(0).random(shape, np.float32)
                t0 = time.perf_counter()
                s.run(None, {name: x})
                first = time.perf_counter() - t0
                steady = []
                for _ in range(50):
                    t0 = time.perf_counter()
                    s.run(None, {name: x})
                    steady.append(time.perf_counter() - t0)
                label = f"{shape[3]}x{shape[2]}" if model == "scrfd_500m" else f"batch {shape[0]}"
                rows.append(
                    {"search": search, "model": model, "shape": label, "first_ms": first * 1000, "p50_ms": pct(steady, 50)}
                )
    return rows


def verify_work(pipeline, img: np.ndarray) -> None:
    """What Verify does per photo: its face, then its embedding."""
    faces = pipeline.detect(img, OPTS)
    if faces:
        pipeline.embed(faces[:1])


def pipeline_speed(pipelines: dict, images: list[np.ndarray], threads: list[int]) -> list[dict]:
    rows = []
    for label, p in pipelines.items():
        for img in images[:20]:  # warm-up: every shape's first call (and cuDNN's search) out of the timing
            verify_work(p, img)
        one = []
        for img in images:
            t0 = time.perf_counter()
            verify_work(p, img)
            one.append(time.perf_counter() - t0)
        row = {"pipeline": label, "p50_ms": pct(one, 50), "p95_ms": pct(one, 95)}
        for n in threads:
            with ThreadPoolExecutor(n) as pool:
                t0 = time.perf_counter()
                list(pool.map(lambda img, p=p: verify_work(p, img), images * 2))
                row[f"photos_s_{n}"] = 2 * len(images) / (time.perf_counter() - t0)
        rows.append(row)
        print(f"timed {label}", flush=True)
    return rows


def gpu_name() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def lfw_accuracy(pipeline) -> dict:
    r = evaluate(pipeline)
    return {
        "pairs_acc_at_threshold": r["lfw_pairs"]["acc@calibrated"],
        "crop_pairs_acc_at_threshold": r["lfw_pairs_crop"]["acc@calibrated"],
        "all_pairs_auc": r["lfw_all_pairs"]["auc"],
        "tar_at_far1e-3": r["lfw_all_pairs"]["tar@far0.001"],
        "no_face": len(r["no_face"]),
        "ms_per_photo": r["ms_per_photo"],
    }


def show_agreement(a: dict) -> None:
    print(
        f"agreement with the CPU on {a['photos']} photos: boxes {a['max_box_px']:.3f} px, landmarks {a['max_landmark_px']:.3f} px, "
        f"embedding cosine >= {a['min_embedding_cosine']:.5f}, liveness {a['max_liveness_diff']:.4f}, "
        f"face-count mismatches {a['face_count_mismatches']}: {'within' if a['within_bounds'] else 'OUTSIDE'} the bounds"
    )


def show_models(rows: list[dict]) -> None:
    print(f"\n{'model':18} {'input':10} {'cpu ms':>8} {'gpu ms':>8} {'cpu/gpu':>8} {'cpu faces/s':>12} {'gpu faces/s':>12}")
    for r in rows:
        fs = f"{r['cpu_faces_s']:12.0f} {r['gpu_faces_s']:12.0f}" if "gpu_faces_s" in r else ""
        print(f"{r['model']:18} {r['input']:10} {r['cpu_ms']:8.2f} {r['gpu_ms']:8.2f} {r['cpu_ms'] / r['gpu_ms']:7.2f}x {fs}")


def show_pipeline(rows: list[dict], threads: list[int], photos: int) -> None:
    print(f"\nVerify's work per photo on {photos} photos: one at a time, and photos/s from N threads")
    print(f"{'pipeline':22} {'p50 ms':>7} {'p95 ms':>7} " + " ".join(f"{f'{n} thr':>8}" for n in threads))
    for r in rows:
        print(
            f"{r['pipeline']:22} {r['p50_ms']:7.2f} {r['p95_ms']:7.2f} " + " ".join(f"{r[f'photos_s_{n}']:8.1f}" for n in threads)
        )


def show_shapes(rows: list[dict]) -> None:
    print(f"\n{'cuDNN search':12} {'model':11} {'shape':10} {'first ms':>9} {'p50 ms':>8}")
    for r in rows:
        print(f"{r['search']:12} {r['model']:11} {r['shape']:10} {r['first_ms']:9.1f} {r['p50_ms']:8.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run with every row on the CPU")
    ap.add_argument("--photos", type=int, default=100, help="photos for the pipeline rows (dev portraits, then LFW)")
    ap.add_argument("--calls", type=int, default=200, help="inferences per model and runtime")
    ap.add_argument("--threads", default="1,8")
    ap.add_argument("--no-eval", dest="eval", action="store_false", help="leave out the LFW accuracy (the slowest part on a CPU)")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "bench_cuda.json"))
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    ort.set_default_logger_severity(3)  # SCRFD's shape warnings would bury the tables
    t0 = time.perf_counter()

    gpu, cpu = pipeline_on(args.device), pipeline_on("cpu")
    used = sorted({r["device"] for r in gpu.runtimes})
    images = photos(args.photos)
    doc = {"device": args.device, "gpu": gpu_name(), "onnxruntime": ort.__version__, "gpu_pipeline_runs_on": used}
    print(
        f"GPU: {doc['gpu'] or 'none'}; onnxruntime {ort.__version__} {ort.get_available_providers()}; the '{args.device}' pipeline runs on {used}"
    )

    def done(section: str) -> None:
        """Each section is printed and saved as it ends: a run cut short keeps what it measured."""
        write_json(args.out, doc)
        print(f"[{section} done at {time.perf_counter() - t0:.0f} s]", flush=True)

    doc["agreement"] = agreement(gpu, cpu, images[:60])
    show_agreement(doc["agreement"])
    done("agreement")
    doc["new_shapes"] = new_shapes(args.device)
    show_shapes(doc["new_shapes"])
    done("new shapes")
    doc["models"] = per_model(args.device, args.calls)
    show_models(doc["models"])
    done("models")
    doc["pipeline"] = pipeline_speed({"gpu": gpu, "cpu": cpu}, images, threads)
    show_pipeline(doc["pipeline"], threads, len(images))
    done("pipeline")
    if args.eval:
        doc["lfw"] = {"gpu": lfw_accuracy(gpu)}
        r = doc["lfw"]["gpu"]
        print(
            f"LFW on the GPU: pairs acc@threshold {r['pairs_acc_at_threshold']:.4f}, crops {r['crop_pairs_acc_at_threshold']:.4f}, "
            f"all-pairs AUC {r['all_pairs_auc']:.4f}, TAR@1e-3 {r['tar_at_far1e-3']:.4f}, no face {r['no_face']}, "
            f"{r['ms_per_photo']:.1f} ms/photo"
        )
        done("lfw")
    doc["pipeline"] += pipeline_speed({"gpu micro-batch": pipeline_on(args.device, micro_batch=True)}, images, threads)
    show_pipeline(doc["pipeline"][-1:], threads, len(images))
    done("micro-batch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
