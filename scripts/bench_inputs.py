"""Real-world inputs: faces that fill the frame, small faces in 1080p and 4K frames, sideways photos.

Every LFW photo of `../shared/faces/lfw` (or --limit of them) is transformed in memory and given
to facesvc's pipeline and, with --peer, to insightface's FaceAnalysis on the very same detector
file (det_500m.onnx), in one run; each transform's row says in how many of the photos a face was
found (and in how many the face was reported the right way up: the orientation that stands it
upright), and what the transform cost facesvc in detector time.

    .venv/bin/python scripts/bench_inputs.py [--limit 120] [--peer] [--precision int8] [--out .bench/bench_inputs.json]

Transforms:
- crop P: the centre square whose side is P x the face's width (from the upright detection of the
  original), upscaled to 720 px: at 1.0 the face fills the frame, at 0.8 and below it is cut off;
- 1080p / 4K: the face crop scaled to about 110 px and pasted into a grey frame of that size;
- rot 90 / 180 / 270: the photo turned counter-clockwise;
- what cameras and pipelines do to photos: JPEG at quality 10, the photo shrunk to 64 px, grey,
  dark (gamma 2.5), blurred (Gaussian, 7 px), tilted by 30 degrees.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from bench.common import write_json
from server import config
from server.assembly import build_pipeline
from server.vision.pipeline import DetectOptions

ROOT = Path(__file__).resolve().parents[1]
LFW = ROOT.parent / "shared" / "faces" / "lfw"
OPTS = DetectOptions(min_face_size=8)


def photos(limit: int) -> list[np.ndarray]:
    files = sorted(LFW.rglob("*.jpg"))[:limit]
    return [cv2.imread(str(f)) for f in files]


def centre_crop(img: np.ndarray, box: np.ndarray, ratio: float, out: int = 720) -> np.ndarray:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = max(8, int(ratio * (box[2] - box[0])))
    x0, y0 = int(cx - side / 2), int(cy - side / 2)
    pad = side
    padded = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REFLECT)
    crop = padded[y0 + pad : y0 + pad + side, x0 + pad : x0 + pad + side]
    return cv2.resize(crop, (out, out), interpolation=cv2.INTER_CUBIC)


def pasted(img: np.ndarray, box: np.ndarray, frame_w: int, frame_h: int, face_px: int = 110) -> np.ndarray:
    face = centre_crop(img, box, 1.6, out=int(face_px * 1.6))
    frame = np.full((frame_h, frame_w, 3), 110, np.uint8)
    y, x = frame_h // 3, frame_w // 2
    frame[y : y + face.shape[0], x : x + face.shape[1]] = face
    return frame


def transforms(img: np.ndarray, box: np.ndarray) -> dict[str, np.ndarray]:
    out = {f"crop {r:.2f}": centre_crop(img, box, r) for r in (1.5, 1.1, 1.0, 0.9, 0.8, 0.7, 0.6)}
    out["1080p frame"] = pasted(img, box, 1920, 1080)
    out["4K frame"] = pasted(img, box, 3840, 2160)
    for k in (1, 2, 3):
        out[f"rot {90 * k}"] = np.ascontiguousarray(np.rot90(img, k))
    h, w = img.shape[:2]
    out["jpeg q10"] = cv2.imdecode(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 10])[1], cv2.IMREAD_COLOR)
    out["64 px"] = cv2.resize(img, (64, 64 * h // w), interpolation=cv2.INTER_AREA)
    out["grey"] = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    out["dark"] = (255 * (img / 255.0) ** 2.5).astype(np.uint8)
    out["blur"] = cv2.GaussianBlur(img, (7, 7), 0)
    out["tilt 30"] = cv2.warpAffine(img, cv2.getRotationMatrix2D((w / 2, h / 2), 30, 1.0), (w, h), borderMode=cv2.BORDER_REFLECT)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=120)
    ap.add_argument("--peer", action="store_true", help="also run insightface's FaceAnalysis (pip install -e '.[bench]')")
    ap.add_argument("--precision", default="auto", help="FACESVC_PRECISION (int8: `make int8` first)")
    ap.add_argument("--out", default=".bench/bench_inputs.json")
    args = ap.parse_args()
    pipeline = build_pipeline(config.load([], environ={"FACESVC_PRECISION": args.precision}))
    peer = None
    if args.peer:
        from insightface.app import FaceAnalysis

        d = Path(tempfile.mkdtemp()) / "peer"
        d.mkdir()
        os.symlink((ROOT / "models" / "weights" / "det_500m.onnx").resolve(), d / "det_500m.onnx")
        peer = FaceAnalysis(name=str(d), allowed_modules=["detection"], providers=["CPUExecutionProvider"])
        peer.prepare(ctx_id=-1, det_size=(640, 640))
    rows: dict[str, dict] = {}
    for img in photos(args.limit):
        upright = pipeline.detect(img, OPTS)
        if not upright:
            continue
        for name, x in transforms(img, upright[0].box).items():
            r = rows.setdefault(name, {"transform": name, "total": 0, "facesvc": 0, "upright": 0, "peer": 0, "facesvc_ms": []})
            r["total"] += 1
            t0 = time.perf_counter()
            faces = pipeline.detect(x, OPTS)
            r["facesvc_ms"].append((time.perf_counter() - t0) * 1000)
            r["facesvc"] += bool(faces)
            # the orientation reported is the one that stands the photo's face upright again
            turned = int(name.split()[1]) // 90 if name.startswith("rot") else 0
            r["upright"] += bool(faces) and faces[0].orientation == 90 * ((4 - turned) % 4)
            if peer is not None:
                r["peer"] += bool(peer.get(x))
    print(f"{'transform':14} {'facesvc':>12} {'right way up':>12} {'peer':>12} {'facesvc p50 ms':>15}")
    for r in rows.values():
        r["facesvc_p50_ms"] = float(np.median(r.pop("facesvc_ms")))
        peer_col = f"{r['peer']}/{r['total']}" if peer is not None else "-"
        print(
            f"{r['transform']:14} {r['facesvc']:>5}/{r['total']:<6} {r['upright']:>5}/{r['total']:<6} {peer_col:>12} "
            f"{r['facesvc_p50_ms']:15.1f}"
        )
    out = write_json(args.out, {"limit": args.limit, "rows": list(rows.values())})
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
