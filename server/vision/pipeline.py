"""The face pipeline: detect once, then each per-face model adds to the same Face.

No protobuf and no gRPC here: plain arrays and dataclasses in, results out.
Every model object is created once at start-up and shared by all threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import grpc
import numpy as np

from server import errors
from server.vision.alignment import arcface_crop
from server.vision.faces import Face, LivenessResult
from server.vision.finder import FaceFinder, quarter_turns, turn_points
from server.vision.models.runtime import keeps_few_shapes, row_counts
from server.vision.quality import assess

log = logging.getLogger(__name__)

LARGEST, MOST_CENTRAL, HIGHEST_SCORE, REQUIRE_SINGLE = "largest", "most_central", "highest_score", "require_single"
# Liveness needs context: the frame holding at least this share of the widest model's context crop
# (the Silent-Face pair judges from 4 face widths). The smallest judgeable face width is measured
# (scripts/eval_liveness.py) and comes from the manifest.
MIN_LIVENESS_CONTEXT = 0.4
DEFAULT = "default"  # the caller did not choose: ordered as LARGEST; enrolment also refuses ambiguous photos
# warm_up's stand-in face (eyes, nose, mouth corners in its box) and the most faces per photo whose
# attribute batch it warms: more in one photo are rare, and pay their batch shape's first run
WARM_LANDMARKS = np.array([[290.0, 230.0], [350.0, 230.0], [320.0, 265.0], [295.0, 300.0], [345.0, 300.0]], np.float32)
WARM_FACES = 32


@dataclass(frozen=True)
class DetectOptions:
    min_face_size: float = 20.0
    max_faces: int = 20
    selection: str = DEFAULT
    min_score: float | None = None  # None = the detector's own default


class FacePipeline:
    def __init__(
        self,
        detector,
        recognizer,
        liveness: list,
        attribute_models: list,
        *,
        detect_max_side: int = 640,
        liveness_threshold: float = 0.5,
        min_liveness_face: int = 32,
        runtimes: list[dict[str, str]] | None = None,
    ):
        """attribute_models: per-face models Analyze loops over; each has `annotate(img, faces)`, which puts
        its result in face.attributes[model.attribute] (insightface's FaceAnalysis pattern)."""
        self.detector = detector
        self.recognizer = recognizer
        self.liveness_models = liveness
        self.attribute_models = attribute_models
        self.detect_max_side = detect_max_side
        self.finder = FaceFinder(detector, detect_max_side)
        self.liveness_threshold = liveness_threshold
        self.min_liveness_face = min_liveness_face
        self.runtimes = runtimes or []  # where each model runs: model, kind, runtime, precision, device

    def warm_up(self) -> None:
        """Runs every model before the first caller does: a runtime's first run is slow (OpenVINO
        readies its graph; on CUDA each new input shape costs a kernel search), better paid while
        the server starts than by its first callers. Where the runtime keeps to a few input shapes
        (TimedSession.fixed_shapes), on each of them; elsewhere every pass the finder makes over
        an empty 640x480 frame (the commonest camera shape, upright and turned), and one face."""
        if keeps_few_shapes(self.detector.session):
            for side in self.finder.input_sides():
                self.detector.detect(np.zeros((side, side, 3), np.uint8), input_size=side)
        else:
            self.detect(np.zeros((480, 640, 3), np.uint8), DetectOptions())
        self.recognizer.warm_up()
        frame = np.full((480, 640, 3), 127, np.uint8)
        face = Face(box=np.array([240.0, 160.0, 400.0, 360.0]), landmarks=WARM_LANDMARKS, score=1.0)
        for model in self.liveness_models:
            model.score(frame, face.box)
        for model in self.attribute_models:  # a batch per face count up to WARM_FACES
            for rows in row_counts(model.session, WARM_FACES):
                model.annotate(frame, [replace(face, attributes={}) for _ in range(rows)])

    # -- detection ---------------------------------------------------------
    def detect(self, img: np.ndarray, opts: DetectOptions, turns: bool = True, prefer: int = 0) -> list[Face]:
        """All faces passing the filters, ordered by `opts.selection`, with quality and aligned crops.
        `turns` and `prefer`: see FaceFinder.find."""
        found = self.finder.find(img, opts.min_score, turns, prefer)
        h, w = img.shape[:2]
        faces = []
        for box, lm, score in zip(found.boxes, found.landmarks, found.scores):
            if min(box[2] - box[0], box[3] - box[1]) < opts.min_face_size:
                continue
            faces.append(
                Face(
                    box=box.astype(np.float32), landmarks=lm.astype(np.float32), score=float(score), orientation=found.orientation
                )
            )
        faces = self._order(faces, opts.selection, w, h)
        if opts.selection == REQUIRE_SINGLE and len(faces) > 1:
            raise errors.multiple_faces(len(faces))
        faces = faces[: opts.max_faces]
        for f in faces:
            f.aligned = arcface_crop(img, f.landmarks)
            f.quality = assess(f.box, f.landmarks, f.aligned)
        return faces

    @staticmethod
    def _order(faces: list[Face], selection: str, w: int, h: int) -> list[Face]:
        if selection == HIGHEST_SCORE:
            key = lambda f: -f.score  # noqa: E731
        elif selection == MOST_CENTRAL:
            cx, cy = w / 2, h / 2
            key = lambda f: ((f.box[0] + f.box[2]) / 2 - cx) ** 2 + ((f.box[1] + f.box[3]) / 2 - cy) ** 2  # noqa: E731
        else:  # largest (also the order for require_single)
            key = lambda f: -f.clipped_area(w, h)  # noqa: E731
        return sorted(faces, key=key)

    def detect_one(self, img: np.ndarray, opts: DetectOptions, **where: object) -> Face:
        """The face single-face operations use: the first by `selection`."""
        faces = self.detect(img, opts)
        if not faces:
            raise errors.no_face(**where)
        return faces[0]

    # -- per-face models ---------------------------------------------------
    def embed(self, faces: list[Face]) -> np.ndarray:
        """Embeds every face in one batch; also stores each on its Face."""
        emb = self.recognizer.embed([f.aligned for f in faces])
        for f, e in zip(faces, emb):
            f.embedding = e
        return emb

    def check_liveness(self, img: np.ndarray, face: Face, threshold: float | None = None) -> LivenessResult:
        thr = self.liveness_threshold if not threshold else threshold
        img, face = upright(img, face)  # the models were trained on upright faces
        unjudgeable = self._unjudgeable(img, face)
        if unjudgeable is not None:  # a confident score from a model without what it needs would be a guess
            reason, hint = unjudgeable
            return LivenessResult(is_live=False, score=0.0, threshold=thr, model_scores={}, reason=reason, hint=hint)
        scores = {m.name: m.score(img, face.box) for m in self.liveness_models}
        fused = float(np.mean(list(scores.values())))
        return LivenessResult(is_live=fused >= thr, score=fused, threshold=thr, model_scores=scores)

    def _unjudgeable(self, img: np.ndarray, face: Face) -> tuple[str, str] | None:
        """Why the liveness models cannot judge this face, or None. They judge from the face and its
        surroundings (a paper's edge, a screen's border, the scene): a face that fills the frame leaves
        them a fraction of the context they were trained on, and a tiny one too few pixels."""
        h, w = img.shape[:2]
        side = max(1.0, float(face.box[2] - face.box[0]))
        if side < self.min_liveness_face:
            return errors.FACE_TOO_SMALL, "move closer, or send a larger image of the face"
        widest = max(m.context_scale for m in self.liveness_models)
        # liveness boxes are squares of the face's width (models/liveness.py)
        context = min((h - 1) / side, (w - 1) / side, widest) / widest
        if context < MIN_LIVENESS_CONTEXT:
            return errors.FACE_TOO_CLOSE, "hold the camera further away, or send the whole photo rather than a face crop"
        return None

    def require_live(self, img: np.ndarray, face: Face, threshold: float | None = None, **where: object) -> LivenessResult:
        result = self.check_liveness(img, face, threshold)
        if result.reason:
            raise errors.FaceServiceError(
                grpc.StatusCode.INVALID_ARGUMENT,
                result.reason,
                f"liveness cannot be judged on this photo: {result.hint}",
                hint=result.hint,
                **where,
            )
        if not result.is_live:
            raise errors.spoof(result.score, result.threshold, **where)
        return result

    def analyze(self, img: np.ndarray, faces: list[Face]) -> list[Face]:
        """Every attribute model adds its result to every face; returns the faces."""
        for model in self.attribute_models:
            model.annotate(img, faces)
        return faces

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.dot(a, b))


def upright(img: np.ndarray, face: Face) -> tuple[np.ndarray, Face]:
    """The frame turned so `face` stands upright, and the face in it. The landmarks say which way is
    up, also for a face the detector found lying on its side without turning the frame. The frame is
    a view (np.rot90), not a copy: its readers copy the crops they read, where a copy of the whole
    frame per face made a large frame of sideways faces cost seconds a call."""
    k = quarter_turns(face.landmarks)
    if not k:
        return img, face
    turned = np.rot90(img, k)
    th, tw = turned.shape[:2]
    # the frame as sent is `turned` turned back (4 - k) quarter turns: map its points into `turned`
    corners = turn_points(face.box.reshape(2, 2), 4 - k, tw, th)
    box = np.concatenate([corners.min(axis=0), corners.max(axis=0)]).astype(np.float32)
    lm = turn_points(face.landmarks, 4 - k, tw, th).astype(np.float32)
    return turned, Face(box=box, landmarks=lm, score=face.score, orientation=0)
