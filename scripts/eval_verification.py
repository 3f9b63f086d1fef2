#!/usr/bin/env python3
"""Measure verification accuracy of the pipeline on labelled pairs and calibrate the match threshold.

Runs detect -> align -> embed (the same code the server runs) over
  - ../shared/faces/lfw: the 963 listed pairs, and every pair of its 480 photos
    (same identity vs different identity: ~460 genuine, ~114 000 impostor), and
  - ../shared/faces/dev/master.csv: 300 pairs of large portraits,
for each configuration asked for (detector x flip TTA), and prints AUC,
best accuracy, and TAR at FAR 1e-2 / 1e-3 with the thresholds that give them.

The recommended threshold is the one at FAR 1e-3 on LFW's all-pairs set for
the default configuration. `--write-manifest` stores it with the recognizer in
models/manifest.json.

    .venv/bin/python scripts/eval_verification.py
    .venv/bin/python scripts/eval_verification.py --detectors scrfd_500m,yunet --flip both
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from scripts.bench_inputs import centre_crop
from server import config
from server.assembly import build_pipeline
from server.domain.calibration import roc_metrics
from server.vision.pipeline import DetectOptions

ROOT = Path(__file__).resolve().parents[1]

FACES = ROOT.parent / "shared" / "faces"


def embed_all(pipeline, paths: list[Path]) -> dict[str, np.ndarray | None]:
    opts = DetectOptions(min_face_size=10)
    out = {}
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        faces = pipeline.detect(img, opts)
        out[str(p)] = pipeline.embed(faces[:1])[0] if faces else None
    return out


def embed_crops(pipeline, paths: list[Path]) -> dict[str, np.ndarray | None]:
    """Each photo as the close-up other systems store: the square around its face (as wide as the
    face), upscaled to 720 px, so nothing of the head's outline or the background is left."""
    opts = DetectOptions(min_face_size=10)
    out = {}
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        faces = pipeline.detect(img, opts)
        if not faces:
            out[str(p)] = None
            continue
        crop = centre_crop(img, faces[0].box, 1.0)
        found = pipeline.detect(crop, opts)
        out[str(p)] = pipeline.embed(found[:1])[0] if found else None
    return out


def accuracy_at(genuine: np.ndarray, impostor: np.ndarray, threshold: float) -> float:
    return float(((genuine >= threshold).sum() + (impostor < threshold).sum()) / (len(genuine) + len(impostor)))


def score(emb: dict, a: str, b: str) -> float:
    ea, eb = emb.get(a), emb.get(b)
    return -1.0 if ea is None or eb is None else float(np.dot(ea, eb))


def evaluate(pipeline) -> dict:
    lfw = FACES / "lfw"
    lfw_paths = sorted(lfw.glob("*/*.jpg"))
    dev = FACES / "dev"
    dev_pairs = list(csv.DictReader(open(dev / "master.csv")))
    dev_paths = sorted({dev / r[k] for r in dev_pairs for k in ("file_x", "file_y")})
    t0 = time.perf_counter()
    emb = embed_all(pipeline, lfw_paths + dev_paths)
    elapsed = time.perf_counter() - t0
    missing = [k for k, v in emb.items() if v is None]

    listed = list(csv.DictReader(open(lfw / "pairs.csv")))
    g = np.array([score(emb, str(lfw / r["file_a"]), str(lfw / r["file_b"])) for r in listed if r["same"] == "1"])
    i = np.array([score(emb, str(lfw / r["file_a"]), str(lfw / r["file_b"])) for r in listed if r["same"] == "0"])
    res = {"lfw_pairs": roc_metrics(g, i)}
    threshold = pipeline.recognizer.match_threshold
    res["lfw_pairs"]["acc@calibrated"] = accuracy_at(g, i, threshold)
    # the same pairs with the second photo as a close-up crop: a stored crop against a full photo
    crops = embed_crops(pipeline, lfw_paths)
    both = {**{f"full:{k}": v for k, v in emb.items()}, **{f"crop:{k}": v for k, v in crops.items()}}
    g = np.array([score(both, f"full:{lfw / r['file_a']}", f"crop:{lfw / r['file_b']}") for r in listed if r["same"] == "1"])
    i = np.array([score(both, f"full:{lfw / r['file_a']}", f"crop:{lfw / r['file_b']}") for r in listed if r["same"] == "0"])
    res["lfw_pairs_crop"] = roc_metrics(g, i)
    res["lfw_pairs_crop"]["acc@calibrated"] = accuracy_at(g, i, threshold)
    res["crops_without_face"] = sum(v is None for v in crops.values())

    keys = [str(p) for p in lfw_paths]
    ids = np.array([p.parent.name for p in lfw_paths])
    mat = np.stack([emb[k] if emb[k] is not None else np.zeros(pipeline.recognizer.embedding_dim, np.float32) for k in keys])
    sims = mat @ mat.T
    iu = np.triu_indices(len(keys), k=1)
    same = ids[iu[0]] == ids[iu[1]]
    res["lfw_all_pairs"] = roc_metrics(sims[iu][same], sims[iu][~same])

    g = np.array([score(emb, str(dev / r["file_x"]), str(dev / r["file_y"])) for r in dev_pairs if r["Decision"] == "Yes"])
    i = np.array([score(emb, str(dev / r["file_x"]), str(dev / r["file_y"])) for r in dev_pairs if r["Decision"] == "No"])
    res["dev_master"] = roc_metrics(g, i)
    res["photos"] = len(emb)
    res["no_face"] = [str(Path(m).relative_to(FACES)) for m in missing]
    res["ms_per_photo"] = 1000 * elapsed / len(emb)
    return res


def fmt(x, pct=False):
    if x is None:
        return "   n/a"
    return f"{x:6.4f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detectors", default="scrfd_500m,yunet")
    ap.add_argument("--recognizer", default=None, help="recognizer model name (default: the server default)")
    ap.add_argument("--flip", choices=["off", "on", "both"], default="both")
    ap.add_argument(
        "--runtimes",
        default="auto",
        help="comma-separated runtimes to evaluate each configuration on (auto, openvino, onnxruntime): "
        "the stored threshold must hold for every runtime a replica may run",
    )
    ap.add_argument(
        "--precisions",
        default="auto",
        help="comma-separated OpenVINO precisions (auto, f32, bf16, int8: `make int8` first); onnxruntime runs f32 only",
    )
    ap.add_argument("--json", type=Path, default=ROOT / ".bench" / "eval_verification.json")
    ap.add_argument("--write-manifest", action="store_true", help="store the recommended threshold in models/manifest.json")
    args = ap.parse_args()

    base = config.load([], environ={})
    if args.recognizer:
        base = replace(base, recognizer=args.recognizer)
    flips = {"off": [False], "on": [True], "both": [False, True]}[args.flip]
    results = []
    runs = [
        (runtime, precision)
        for runtime in args.runtimes.split(",")
        for precision in args.precisions.split(",")
        if runtime != "onnxruntime" or precision in ("auto", "f32")
    ]
    for runtime, precision in runs:
        for det in args.detectors.split(","):
            for flip in flips:
                settings = replace(base, detector=det, recognizer_flip=flip, runtime=runtime, precision=precision)
                pipeline = build_pipeline(settings)
                r = evaluate(pipeline)
                rec = next(m for m in pipeline.runtimes if m["kind"] == "recognizer")
                r.update(detector=det, recognizer=settings.recognizer, flip=flip, runtime=f"{rec['runtime']} {rec['precision']}")
                results.append(r)
                print(
                    f"evaluated runtime={r['runtime']} detector={det} flip={flip}: {r['photos']} photos, "
                    f"{r['ms_per_photo']:.1f} ms/photo, no face in {len(r['no_face'])}",
                    file=sys.stderr,
                )

    hdr = (
        f"{'runtime':<18} {'detector':<11} {'flip':<5} {'set':<14} {'AUC':>6} {'acc':>6} {'thr_acc':>7} {'TAR@1e-2':>8} {'TAR@1e-3':>8} "
        f"{'thr@1e-3':>8} {'acc@cal':>7}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        for s in ("lfw_pairs", "lfw_pairs_crop", "lfw_all_pairs", "dev_master"):
            m = r[s]
            print(
                f"{r['runtime']:<18} {r['detector']:<11} {str(r['flip']):<5} {s:<14} {fmt(m['auc'])} {fmt(m['accuracy'])} {m['best_threshold']:7.4f} "
                f"{fmt(m['tar@far0.01']):>8} {fmt(m['tar@far0.001']):>8} {fmt(m['thr@far0.001']):>8} "
                f"{fmt(m['acc@calibrated']) if 'acc@calibrated' in m else '':>7}"
            )
    default = (
        next(r for r in results if r["detector"] == base.detector and r["flip"] == base.recognizer_flip)
        if any(r["detector"] == base.detector and r["flip"] == base.recognizer_flip for r in results)
        else results[0]
    )
    recommended = round(default["lfw_all_pairs"]["thr@far0.001"], 3)
    search_thr = round(default["lfw_all_pairs"]["thr@far0.0001"], 3)
    print(
        f"\nrecommended match threshold for {default['recognizer']} (detector={default['detector']}, flip={default['flip']}): "
        f"{recommended}  (FAR 1e-3 on LFW all-pairs)"
    )
    print(
        f"recommended 1:N search threshold: {search_thr}  (FAR 1e-4 on LFW all-pairs, TAR "
        f"{default['lfw_all_pairs']['tar@far0.0001']:.3f}: a gallery of N faces multiplies the per-pair FAR by ~N)"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"results": results, "recommended_threshold": recommended}, indent=2))
    print(f"wrote {args.json}")
    if args.write_manifest:
        path = ROOT / "models" / "manifest.json"
        manifest = json.loads(path.read_text())
        entry = manifest["models"][default["recognizer"]]
        entry["params"]["match_threshold"] = recommended
        entry["params"]["search_threshold"] = search_thr
        entry["threshold_source"] = (
            f"scripts/eval_verification.py: match at FAR 1e-3, search at FAR 1e-4 on LFW "
            f"all-pairs (detector={default['detector']}, flip={default['flip']})"
        )
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"stored match_threshold={recommended} for {default['recognizer']} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
