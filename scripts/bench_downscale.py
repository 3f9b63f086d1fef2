#!/usr/bin/env python3
"""The detector's downscale: OpenCV's INTER_AREA in one step against the whole-factor area average
plus a linear remainder that `server.vision.imaging.resize_long_side` uses, in the same process.

Both run inside facesvc's pipeline (detect + embed, the dev portraits, 1-5 MP), taking turns pass
by pass, so the machine's noise falls on both; each row is the median of `--repeat` passes, after
one pass that lets the shape-specialised detector graphs compile. A second table times the
downscale alone, and a third checks that the detector finds the same faces on both copies.

    .venv/bin/python scripts/bench_downscale.py [--repeat 5] [--precisions f32,int8]

Prints tables and writes JSON (default .bench/bench_downscale.json).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

import server.vision.finder as finder
from bench.common import write_json
from scripts.bench_compare import facesvc_engine
from server import config
from server.assembly import build_pipeline
from server.vision.imaging import resize_long_side
from server.vision.models.detection import iou
from server.vision.models.runtime import COMPILER

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT.parent / "shared" / "faces" / "dev"


def inter_area(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The one-step downscale resize_long_side used before."""
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img, 1.0
    s = max_side / max(h, w)
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA), s


WAYS = {"INTER_AREA": inter_area, "whole factor + linear": resize_long_side}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--precisions", default="f32,int8", help="FACESVC_PRECISION values (int8: `make int8` first)")
    ap.add_argument("--out", default=str(ROOT / ".bench" / "bench_downscale.json"))
    args = ap.parse_args()
    images = [cv2.imread(str(p)) for p in sorted(DEV.glob("img*.jpg"))]
    rows = []
    for precision in args.precisions.split(","):
        pipeline = facesvc_engine({"FACESVC_RUNTIME": "openvino", "FACESVC_PRECISION": precision})
        for img in images:
            pipeline(img)
        rates: dict[str, list[float]] = {name: [] for name in WAYS}
        for _ in range(args.repeat + 1):
            for name, way in WAYS.items():
                finder.resize_long_side = way  # what FaceFinder calls
                time.sleep(0.2)
                t0 = time.perf_counter()
                for img in images:
                    pipeline(img)
                rates[name].append(len(images) / (time.perf_counter() - t0))
        finder.resize_long_side = resize_long_side
        for name in WAYS:
            rows.append({"precision": precision, "downscale": name, "imgs_per_s": float(np.median(rates[name][1:]))})
    alone = {name: [] for name in WAYS}
    for _ in range(args.repeat):
        for name, way in WAYS.items():
            for img in images:
                t0 = time.perf_counter()
                way(img, 640)
                alone[name].append(time.perf_counter() - t0)
    # the same faces? every face found on one copy has its match on the other
    pipeline = build_pipeline(config.load([], environ={"FACESVC_RUNTIME": "openvino"}))
    found = {}
    for name, way in WAYS.items():
        finder.resize_long_side = way
        found[name] = [pipeline.finder.find(img) for img in images]
    finder.resize_long_side = resize_long_side
    a, b = found.values()
    same_count = sum(len(x) == len(y) for x, y in zip(a, b))
    ious = [float(iou(x.boxes, y.boxes).max(axis=1).min()) for x, y in zip(a, b) if len(x) and len(y)]
    print(f"\ndetect + embed, {len(images)} dev portraits, median of {args.repeat} passes")
    print(f"{'precision':10} {'downscale':24} {'img/s':>7}")
    for r in rows:
        print(f"{r['precision']:10} {r['downscale']:24} {r['imgs_per_s']:7.1f}")
    print("\nthe downscale alone, mean ms per portrait: " + ", ".join(f"{n} {np.mean(v) * 1000:.2f}" for n, v in alone.items()))
    print(f"same number of faces on {same_count}/{len(images)} portraits; worst box IoU {min(ious):.3f}")
    out = write_json(
        args.out,
        {
            "rows": rows,
            "downscale_ms": {n: float(np.mean(v) * 1000) for n, v in alone.items()},
            "same_count": same_count,
            "worst_iou": min(ious),
        },
    )
    print(f"wrote {out}")
    COMPILER.wait_idle(60)  # the shape graphs the last pipeline asked for
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
