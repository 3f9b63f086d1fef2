"""Measure the liveness models on the labelled sets and choose the default ensemble and threshold.

Runs the server's own detection and liveness code over
  - ../shared/faces/liveness: 10 photos (4 real, 6 print / replay attacks), whole scenes, and
  - ../shared/faces/liveness-dev: 183 photos from 18 sources, mostly face crops (MANIFEST.tsv).
On the photos the models can judge (vision/pipeline.py answers FACE_TOO_CLOSE / FACE_TOO_SMALL for
the others; they are counted apart), for each model and each ensemble (the mean of its members'
P(live), as the pipeline fuses them) it prints APCER (attacks accepted), BPCER (real faces refused)
and ACER (their mean) at 0.5 and at the threshold that minimises ACER, per set and pooled.

The default is the ensemble with the lowest pooled ACER, at the middle of its best threshold range
(the widest margin on both sides). A sweep then shrinks every judged photo so the face is 16-96 px
wide and finds the smallest width at which that choice still judges as well as at full size: below
it the pipeline answers FACE_TOO_SMALL. `--write-manifest` stores all three in models/manifest.json
("liveness"), which the server reads as its defaults, as it reads the recognizer's thresholds.

    .venv/bin/python scripts/eval_liveness.py [--runtime R] [--precision P] [--out .bench/eval_liveness.json] [--write-manifest]
"""

from __future__ import annotations

import argparse
import csv
import json
from datetime import date
from pathlib import Path

import cv2
import numpy as np

from bench.common import write_json
from server import config
from server.assembly import build_pipeline, model_loader
from server.vision.models.manifest import DEFAULT_MANIFEST
from server.vision.pipeline import DetectOptions

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "faces"
TABLE = np.round(np.arange(0.05, 1.0, 0.05), 2)  # printed
FINE = np.round(np.arange(0.01, 1.0, 0.01), 2)  # searched
ENSEMBLES = {
    "minifasnet_pair": ("minifasnet_pair",),
    "minifasnet_se128": ("minifasnet_se128",),
    "minifasnet_pair,minifasnet_se128": ("minifasnet_pair", "minifasnet_se128"),
}
# the pair's two members, reported alone though the server runs them only as the pair
MEMBERS = {"minifasnet_v2 (pair member)": ("minifasnet_v2",), "minifasnet_v1se (pair member)": ("minifasnet_v1se",)}
SIZES = (16, 24, 32, 48, 64, 96)
SIZE_SLACK = 0.05  # a face width is judgeable while its ACER stays within this of the full-size ACER


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


def best_threshold(s: np.ndarray, y: np.ndarray) -> dict:
    """The middle of the range of thresholds with the lowest ACER."""
    over = [rates(s[y], s[~y], t) for t in FINE]
    low = min(r["acer"] for r in over)
    tied = [r["threshold"] for r in over if r["acer"] == low]
    return rates(s[y], s[~y], float(np.round(np.median(tied), 2)))


class Scorer:
    """Every model's P(live) for a face, as the pipeline computes it (the pair's members too)."""

    def __init__(self, settings):
        loader = model_loader(settings)
        self.pair, self.se128 = loader.build_liveness("minifasnet_pair"), loader.build_liveness("minifasnet_se128")

    def __call__(self, img: np.ndarray, box: np.ndarray) -> dict[str, float]:
        members = self.pair.member_scores(img, box)
        return members | {
            "minifasnet_pair": float(np.mean(list(members.values()))),
            "minifasnet_se128": self.se128.score(img, box),
        }


def fused(scores: list[dict[str, float]], members: tuple[str, ...]) -> np.ndarray:
    return np.array([np.mean([s[m] for m in members]) for s in scores])


def size_sweep(judged, score, members, threshold) -> dict[int, dict]:
    """ACER of the chosen ensemble with every judged photo shrunk so its face is `px` wide."""
    out = {}
    for px in SIZES:
        scores, labels = [], []
        for img, box, real in judged:
            f = px / max(1.0, float(box[2] - box[0]))
            if f >= 1:
                continue  # already that small: the photo says nothing about shrinking
            small = cv2.resize(img, None, fx=f, fy=f, interpolation=cv2.INTER_AREA)
            scores.append(score(small, box * f))
            labels.append(real)
        y, s = np.array(labels, bool), fused(scores, members)
        out[px] = rates(s[y], s[~y], threshold) | {"photos": len(y)}
    return out


def write_manifest(path: Path, choice: dict) -> None:
    doc = json.loads(path.read_text())
    doc["liveness"] = choice
    path.write_text(json.dumps(doc, indent=2) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".bench/eval_liveness.json")
    ap.add_argument("--write-manifest", action="store_true", help="store the chosen ensemble, threshold and minimum face width")
    ap.add_argument("--manifest", default=str(DEFAULT_MANIFEST), help="the manifest --write-manifest updates")
    ap.add_argument("--runtime", default="auto", help="auto, openvino or onnxruntime: what runs the models")
    ap.add_argument("--precision", default="auto", help="auto, f32, bf16 or int8 (OpenVINO): moves the detector's boxes")
    args = ap.parse_args()
    settings = config.load([], environ={"FACESVC_RUNTIME": args.runtime, "FACESVC_PRECISION": args.precision})
    pipeline = build_pipeline(settings)
    score = Scorer(settings)
    results, pooled_scores, pooled_labels, judged = {}, [], [], []
    for name, photos in labelled().items():
        scores, labels, unjudged, no_face = [], [], {"real": 0, "spoof": 0}, 0
        for path, real in photos:
            img = cv2.imread(str(path))
            faces = pipeline.detect(img, DetectOptions(min_face_size=10)) if img is not None else []
            if not faces:
                no_face += 1
                continue
            if pipeline._unjudgeable(img, faces[0]) is not None:
                unjudged["real" if real else "spoof"] += 1
                continue
            scores.append(score(img, faces[0].box))
            labels.append(real)
            judged.append((img, faces[0].box, real))
        pooled_scores += scores
        pooled_labels += labels
        results[name] = report(name, scores, labels) | {"unjudged": unjudged, "no_face": no_face}
    results["pooled"] = report("pooled (both sets)", pooled_scores, pooled_labels)
    rows = results["pooled"]["ensembles"]
    # lowest pooled ACER; ties go to the larger ensemble: two model families fail on different attacks
    ensemble = min(ENSEMBLES, key=lambda e: (rows[e]["best"]["acer"], -len(ENSEMBLES[e])))
    threshold = rows[ensemble]["best"]["threshold"]
    sweep = size_sweep(judged, score, ENSEMBLES[ensemble], threshold)
    full = rows[ensemble]["best"]["acer"]
    ok = [px for px in SIZES if round(sweep[px]["acer"], 3) <= round(full + SIZE_SLACK, 3)]
    # the smallest width from which every larger width also judges well
    min_face = next(px for i, px in enumerate(SIZES) if all(p in ok for p in SIZES[i:])) if SIZES[-1] in ok else SIZES[-1]
    print(f"\nface width sweep ({ensemble} at {threshold}; full size ACER {full:.3f}):")
    for px, r in sweep.items():
        print(f"  {px:3d} px  ACER {r['acer']:.3f}  (APCER {r['apcer']:.3f}, BPCER {r['bpcer']:.3f}, {r['photos']} photos)")
    choice = {
        "ensemble": ensemble,
        "threshold": threshold,
        "min_face_px": min_face,
        "source": f"scripts/eval_liveness.py on {date.today().isoformat()}: lowest pooled ACER on the judgeable photos "
        f"of ../shared/faces/liveness and liveness-dev ({len(pooled_labels)} photos, ACER {full:.3f}); "
        f"min_face_px: the smallest face width whose ACER stays within {SIZE_SLACK} of full size",
    }
    where = {f"{m['runtime']} {m['precision']}" for m in pipeline.runtimes}
    print(f"\nmodels ran on: {', '.join(sorted(where))}")
    print(f"chosen: {choice['ensemble']} at P(live) >= {threshold}; faces narrower than {min_face} px cannot be judged")
    out = write_json(args.out, {"sets": results, "size_sweep": sweep, "choice": choice})
    print(f"wrote {out}")
    if args.write_manifest:
        write_manifest(Path(args.manifest), choice)
        print(f"wrote the choice to {args.manifest}")
    return 0


def report(name: str, scores: list[dict[str, float]], labels: list[bool]) -> dict:
    y = np.array(labels, bool)
    rows = {}
    for e, members in (MEMBERS | ENSEMBLES).items():
        s = fused(scores, members)
        rows[e] = {
            "at_0.5": rates(s[y], s[~y], 0.5),
            "best": best_threshold(s, y),
            "over_thresholds": [rates(s[y], s[~y], t) for t in TABLE],
        }
    print(f"\n{name}: judged {int(y.sum())} real, {int((~y).sum())} attacks")
    print(f"{'ensemble':34} {'APCER@.5':>9} {'BPCER@.5':>9} {'ACER@.5':>8} {'best thr':>9} {'APCER':>6} {'BPCER':>6} {'ACER':>6}")
    for e, r in rows.items():
        a, b = r["at_0.5"], r["best"]
        print(
            f"{e:34} {a['apcer']:9.3f} {a['bpcer']:9.3f} {a['acer']:8.3f} {b['threshold']:9.2f} "
            f"{b['apcer']:6.3f} {b['bpcer']:6.3f} {b['acer']:6.3f}"
        )
    return {"judged_real": int(y.sum()), "judged_spoof": int((~y).sum()), "ensembles": rows}


if __name__ == "__main__":
    raise SystemExit(main())
