"""Measure the liveness models on the labelled sets: per model and fused, APCER / BPCER / ACER.

Runs the server's own detection and liveness code over
  - ../shared/faces/liveness: 10 photos (4 real, 6 print / replay attacks), whole scenes, and
  - ../shared/faces/liveness-dev: 183 photos from 18 sources, mostly face crops (MANIFEST.tsv),
and for each model (and each fusion, the mean of its models' P(live)) prints, on the photos the
models can judge (vision/pipeline.py's FACE_TOO_CLOSE / FACE_TOO_SMALL are counted apart):
APCER (attacks accepted), BPCER (real faces refused) and ACER (their mean) at 0.5 and at the
threshold that minimises ACER, with an ACER table over thresholds.

    .venv/bin/python scripts/eval_liveness.py [--out .bench/eval_liveness.json]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np

from bench.common import write_json
from server import config
from server.app import build_pipeline, model_loader
from server.vision.models.liveness import liveness_box
from server.vision.pipeline import DetectOptions

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "faces"
THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def labelled() -> dict[str, list[tuple[Path, bool]]]:
    """{set: [(photo, is_real)]}"""
    classic = sorted((FACES / "liveness").glob("*.jpg"))
    dev = FACES / "liveness-dev"
    rows = list(csv.DictReader(open(dev / "MANIFEST.tsv"), delimiter="\t"))
    return {
        "liveness": [(p, p.name.startswith("real")) for p in classic],
        "liveness-dev": [(dev / r["local_name"], r["label"] == "real") for r in rows],
    }


def rates(real: np.ndarray, spoof: np.ndarray, threshold: float) -> dict:
    apcer = float((spoof >= threshold).mean()) if len(spoof) else 0.0
    bpcer = float((real < threshold).mean()) if len(real) else 0.0
    return {"threshold": float(threshold), "apcer": apcer, "bpcer": bpcer, "acer": (apcer + bpcer) / 2}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".bench/eval_liveness.json")
    args = ap.parse_args()
    settings = config.load([], environ={})
    pipeline = build_pipeline(settings)
    loader = model_loader(settings)
    models = {n: loader.build_liveness(n) for n in ("minifasnet_v2", "minifasnet_v1se", "minifasnet_se128")}
    fusions = {
        "minifasnet_pair (default)": ("minifasnet_v2", "minifasnet_v1se"),
        "pair + se128": ("minifasnet_v2", "minifasnet_v1se", "minifasnet_se128"),
    }
    results = {}
    for name, photos in labelled().items():
        scores: dict[str, list[float]] = {m: [] for m in models}
        labels, unjudged, no_face = [], {"real": 0, "spoof": 0}, 0
        for path, real in photos:
            img = cv2.imread(str(path))
            faces = pipeline.detect(img, DetectOptions(min_face_size=10)) if img is not None else []
            if not faces:
                no_face += 1
                continue
            if pipeline._unjudgeable(img, faces[0]) is not None:
                unjudged["real" if real else "spoof"] += 1
                continue
            box = liveness_box(faces[0].box)
            for m, model in models.items():
                # the pair's members are scored on the liveness box, as the pair scores them
                scores[m].append(model.score(img, box if m.startswith("minifasnet_v") else faces[0].box))
            labels.append(real)
        y = np.array(labels, bool)
        table = {m: np.array(s) for m, s in scores.items()}
        table.update({f: np.mean([table[m] for m in members], axis=0) for f, members in fusions.items()})
        rows = {}
        for m, s in table.items():
            over = [rates(s[y], s[~y], t) for t in THRESHOLDS]
            best = min(over, key=lambda r: (r["acer"], abs(r["threshold"] - 0.5)))
            rows[m] = {"at_0.5": rates(s[y], s[~y], 0.5), "best": best, "over_thresholds": over}
        results[name] = {
            "judged_real": int(y.sum()),
            "judged_spoof": int((~y).sum()),
            "unjudged": unjudged,
            "no_face": no_face,
            "models": rows,
        }
        print(f"\n{name}: judged {int(y.sum())} real, {int((~y).sum())} attacks; cannot judge {unjudged}; no face {no_face}")
        print(f"{'model':28} {'APCER@.5':>9} {'BPCER@.5':>9} {'ACER@.5':>8} {'best thr':>9} {'ACER':>6}")
        for m, r in rows.items():
            a, b = r["at_0.5"], r["best"]
            print(f"{m:28} {a['apcer']:9.3f} {a['bpcer']:9.3f} {a['acer']:8.3f} {b['threshold']:9.2f} {b['acer']:6.3f}")
    out = write_json(args.out, {"sets": results})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
