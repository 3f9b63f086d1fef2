#!/usr/bin/env python3
"""Derive the int8 OpenVINO models (FACESVC_PRECISION=int8) from the float ones, checked against them.

For each manifest model with an `int8` entry (the detector and the recognizer, which take most of a
request's time), NNCF's post-training quantization turns the float ONNX file into an OpenVINO IR
whose convolutions run on int8 (VNNI where the CPU has it). Its activation ranges are calibrated on
the inputs the model really gets: the float pipeline runs over real photos (../shared/faces: the dev
portraits and group photo, the liveness crops, frames of the videos) and every detector frame and
aligned face it sees is kept; LFW is left out, as it is what the result is checked on.

The result is checked before it is kept, on held-out LFW photos: the int8 detector must find the same
faces (largest face's box IoU against the float one), and the int8 recognizer's embeddings must point
where the float ones do (cosine), within the bounds below; otherwise nothing is written and the
command fails. Beside each `<name>.int8.xml/.bin` a `.json` records the float file's sha256 it was
made from, the sha256 of the files written, the versions and the agreement measured: the server loads
an int8 model only when that record matches the float file of the manifest and the files on disk.

    .venv/bin/python -m models.quantize          # `make int8`: every model with an int8 entry
    .venv/bin/python -m models.quantize --force  # again, even when up to date

Needs nncf (the `int8` extra) and the server's own code (the pipeline records the calibration inputs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FACES = Path(os.environ.get("FACESVC_FACES_DIR", ROOT.parent / "shared" / "faces"))
# What the int8 models must keep of the float ones' answers on the held-out photos. Quantization moves
# an embedding a little (cosine to the float one about 0.98), which matters only where it changes a
# decision: so the recognizer is held to the same/different decisions at the manifest's threshold.
MIN_BOX_IOU = 0.9  # the largest face's box against the float one, worst photo
MAX_COUNT_CHANGES = 0.05  # share of photos where a face at the score threshold's edge comes or goes
MIN_MEAN_COSINE = 0.97  # embeddings against the float ones, on average
MIN_SAME_DECISIONS = 0.995  # share of all pairs of held-out faces decided alike at the match threshold
HELD_OUT = 80  # LFW photos the result is checked on
VIDEO_EVERY = 12  # one frame in this many of each clip joins the calibration photos


def calibration_images() -> list[np.ndarray]:
    """Real photos of every kind the service gets: portraits, a group, face crops (real and spoof),
    camera frames. Never LFW: the result is checked on it."""
    paths = sorted((FACES / "dev").glob("*.jpg")) + sorted((FACES / "liveness-dev").glob("*/*"))
    images = [img for p in paths if (img := cv2.imread(str(p), cv2.IMREAD_COLOR)) is not None]
    for clip in sorted((FACES / "video").glob("*.mp4")):
        cap = cv2.VideoCapture(str(clip))
        n = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if n % VIDEO_EVERY == 0:
                images.append(frame)
            n += 1
        cap.release()
    if len(images) < 100:
        raise SystemExit(f"only {len(images)} calibration photos under {FACES}: the suite's photos (../shared/faces) are needed")
    return images


class Recorder:
    """A session that keeps (a copy of) every input it runs: what the model gets in service."""

    def __init__(self, inner):
        self.inner, self.inputs = inner, []

    def run(self, names, feed):
        self.inputs.append(next(iter(feed.values())).copy())
        return self.inner.run(names, feed)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def float_pipeline():
    from server import config
    from server.assembly import build_pipeline

    return build_pipeline(config.load([], environ={"FACESVC_PRECISION": "f32", "FACESVC_ATTRIBUTE_MODELS": ""}))


def record(pipeline, images: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The detector's and the recognizer's inputs over `images` (recognizer batches split into faces)."""
    from server.vision.pipeline import DetectOptions

    det, rec = Recorder(pipeline.detector.session), Recorder(pipeline.recognizer.session)
    pipeline.detector.session, pipeline.recognizer.session = det, rec
    try:
        for img in images:
            faces = pipeline.detect(img, DetectOptions(min_face_size=10))
            if faces:
                pipeline.embed(faces)
    finally:
        pipeline.detector.session, pipeline.recognizer.session = det.inner, rec.inner
    # what nncf runs is the network itself: the detector's float input, not the pixels its session takes
    pixels = pipeline.detector.session.pixels
    detector = [pixels.blob(x) for x in det.inputs] if pixels else det.inputs
    return {"detector": detector, "recognizer": [row[None] for batch in rec.inputs for row in batch]}


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def held_out_faces(pipeline, photos: list[Path]) -> list[tuple[np.ndarray, list]]:
    """Each held-out photo with the faces the float pipeline finds in it: what int8 is checked against."""
    from server.vision.pipeline import DetectOptions

    images = [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in photos]
    return [(img, pipeline.detect(img, DetectOptions(min_face_size=10))) for img in images]


def agreement(pipeline, kind: str, quantized, held_out: list[tuple[np.ndarray, list]]) -> dict:
    """How the int8 session agrees with the float one on the held-out photos."""
    from server.vision.pipeline import DetectOptions

    opts = DetectOptions(min_face_size=10)
    images, reference = [img for img, _ in held_out], [faces for _, faces in held_out]
    model = pipeline.detector if kind == "detector" else pipeline.recognizer
    original, model.session = model.session, quantized
    try:
        if kind == "detector":
            ious, counts_differ = [], 0
            for img, ref in zip(images, reference):
                got = pipeline.detect(img, opts)
                counts_differ += len(got) != len(ref)
                ious.append(box_iou(got[0].box, ref[0].box) if got and ref else float(bool(got) == bool(ref)))
            return {
                "photos": len(images),
                "min_box_iou": min(ious),
                "mean_box_iou": float(np.mean(ious)),
                "face_counts_differ": counts_differ,
            }
        faces = [ref[0] for ref in reference if ref]
        got = model.embed([f.aligned for f in faces])
    finally:
        model.session = original
    want = model.embed([f.aligned for f in faces])
    cos = np.sum(got * want, axis=1)
    pairs = np.triu_indices(len(faces), k=1)
    threshold = model.match_threshold
    same = ((got @ got.T)[pairs] >= threshold) == ((want @ want.T)[pairs] >= threshold)
    return {
        "faces": len(faces),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "pairs": int(same.size),
        "same_decisions": float(same.mean()),
    }


def acceptable(kind: str, agreed: dict) -> bool:
    if kind == "detector":
        return agreed["min_box_iou"] >= MIN_BOX_IOU and agreed["face_counts_differ"] <= MAX_COUNT_CHANGES * agreed["photos"]
    return agreed["mean_cosine"] >= MIN_MEAN_COSINE and agreed["same_decisions"] >= MIN_SAME_DECISIONS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--force", action="store_true", help="quantize again even where the int8 files are up to date")
    args = ap.parse_args(argv)

    import nncf
    import openvino as ov

    from server import config
    from server.vision.models.manifest import (
        DEFAULT_MODEL_DIR,
        ModelFileError,
        file_sha256,
        int8_path,
        load_manifest,
        verified_path,
    )
    from server.vision.models.runtime import OpenVinoSession, RuntimeOptions, TimedSession

    manifest = load_manifest()
    settings = config.load([], environ={})
    by_kind = {"detector": settings.detector, "recognizer": settings.recognizer}
    todo = []
    for kind, name in by_kind.items():
        spec = manifest[name]
        if not spec.int8:
            continue
        try:
            int8_path(spec, DEFAULT_MODEL_DIR)
            if not args.force:
                print(f"{name}: {spec.int8} up to date")
                continue
        except ModelFileError:
            pass
        todo.append((kind, spec))
    if not todo:
        return 0
    t0 = time.perf_counter()
    pipeline = float_pipeline()
    images = calibration_images()
    inputs = record(pipeline, images)
    print(
        f"calibration: {len(images)} photos -> {len(inputs['detector'])} detector frames, {len(inputs['recognizer'])} faces ({time.perf_counter() - t0:.0f} s)"
    )
    held_out = held_out_faces(pipeline, sorted((FACES / "lfw").glob("*/*.jpg"))[:HELD_OUT])
    failed = 0
    for kind, spec in todo:
        source = verified_path(spec, DEFAULT_MODEL_DIR)
        xml = DEFAULT_MODEL_DIR / spec.int8
        t0 = time.perf_counter()
        preset = nncf.QuantizationPreset.MIXED if kind == "detector" else nncf.QuantizationPreset.PERFORMANCE
        data = inputs[kind]
        quantized = nncf.quantize(ov.Core().read_model(str(source)), nncf.Dataset(data), subset_size=len(data), preset=preset)
        tmp = xml.with_name("." + xml.name)
        ov.save_model(quantized, str(tmp))
        pixels = pipeline.detector.session.pixels if kind == "detector" else None
        session = TimedSession(
            OpenVinoSession(str(tmp), RuntimeOptions(runtime="openvino", hint="latency"), pixels=pixels),
            spec.name,
            "openvino",
            "int8",
            pixels,
        )
        agreed = agreement(pipeline, kind, session, held_out)
        ok = acceptable(kind, agreed)
        print(f"{spec.name}: quantized in {time.perf_counter() - t0:.0f} s; against float on {HELD_OUT} LFW photos: {agreed}")
        if not ok:
            print(f"{spec.name}: int8 disagrees with float beyond the bounds at the top of models/quantize.py; not kept")
            failed += 1
            for p in (tmp, tmp.with_suffix(".bin")):
                p.unlink(missing_ok=True)
            continue
        written = {}
        for suffix in (".xml", ".bin"):
            os.replace(tmp.with_suffix(suffix), xml.with_suffix(suffix))
            written[xml.with_suffix(suffix).name] = file_sha256(xml.with_suffix(suffix))
        note = {
            "model": spec.name,
            "source": spec.file,
            "source_sha256": spec.sha256,
            "files": written,
            "openvino": ov.__version__,
            "nncf": nncf.__version__,
            "preset": preset.value,
            "calibration": {"photos": len(images), "inputs": len(data)},
            "agreement_on_lfw": agreed,
        }
        xml.with_suffix(".json").write_text(json.dumps(note, indent=1) + "\n")
        print(f"{spec.name}: wrote {xml.name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
