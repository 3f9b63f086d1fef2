"""Protobuf <-> domain conversions, so the servicer reads as orchestration."""

from __future__ import annotations

import math

import numpy as np
from google.protobuf import timestamp_pb2

from facesvc.v1 import face_service_pb2 as pb
from server import errors
from server.domain.identity import Duplicate
from server.records import (
    DUPLICATE_OFF,
    DUPLICATE_REJECT,
    DUPLICATE_WARN,
    LIVENESS_OPTIONAL,
    LIVENESS_REQUIRED,
    ApiKey,
    AuditEvent,
    Collection,
    FaceRecord,
    Subject,
    Thresholds,
)
from server.vision import pipeline
from server.vision.faces import Face, LivenessResult
from server.vision.imaging import ImageLimits, PixelBudget, decode_encoded, decode_raw

MAX_FACES_LIMIT = 100

_SELECTION = {
    pb.FACE_SELECTION_UNSPECIFIED: pipeline.DEFAULT,
    pb.FACE_SELECTION_LARGEST: pipeline.LARGEST,
    pb.FACE_SELECTION_MOST_CENTRAL: pipeline.MOST_CENTRAL,
    pb.FACE_SELECTION_HIGHEST_SCORE: pipeline.HIGHEST_SCORE,
    pb.FACE_SELECTION_REQUIRE_SINGLE: pipeline.REQUIRE_SINGLE,
}
_PIXEL_FORMAT = {pb.PIXEL_FORMAT_BGR: "BGR", pb.PIXEL_FORMAT_RGB: "RGB", pb.PIXEL_FORMAT_GRAY: "GRAY"}


def image_from_proto(msg: pb.Image, field: str, limits: ImageLimits, budget: PixelBudget | None = None) -> np.ndarray:
    which = msg.WhichOneof("source")
    if which is None:
        raise errors.validation(field, "required: set `encoded` (JPEG/PNG/WebP/BMP bytes) or `raw`")
    if which == "encoded":
        if not msg.encoded:
            raise errors.validation(f"{field}.encoded", "empty image")
        return decode_encoded(msg.encoded, limits, budget, field)
    raw = msg.raw
    return decode_raw(
        raw.width,
        raw.height,
        _PIXEL_FORMAT.get(raw.format) or _format_name(raw.format),
        raw.data,
        raw.row_stride,
        limits,
        field,
        budget,
    )


def _format_name(value: int) -> str:
    """A pixel format the server does not take, as the refusal names it: the enum's name, or the number
    a newer (or hostile) client sent."""
    try:
        return pb.PixelFormat.Name(value).removeprefix("PIXEL_FORMAT_")
    except ValueError:
        return str(value)


def _finite(value: float, field: str, low: float, high: float) -> float:
    if not math.isfinite(value) or not (low < value < high):
        raise errors.validation(field, f"must be in ({low}, {high}), got {value}")
    return value


def detect_options(
    msg: pb.FaceOptions, default_min_size: int, default_max_faces: int, field: str = "face_options"
) -> pipeline.DetectOptions:
    if msg.max_faces > MAX_FACES_LIMIT:
        raise errors.validation(f"{field}.max_faces", f"at most {MAX_FACES_LIMIT}, got {msg.max_faces}")
    if msg.selection not in _SELECTION:
        raise errors.validation(f"{field}.selection", f"unknown value {msg.selection}")
    min_score = None
    if msg.min_detection_score != 0:
        min_score = _finite(msg.min_detection_score, f"{field}.min_detection_score", 0.0, 1.0)
    return pipeline.DetectOptions(
        min_face_size=float(msg.min_face_size or default_min_size),
        max_faces=int(msg.max_faces or default_max_faces),
        selection=_SELECTION[msg.selection],
        min_score=min_score,
    )


def optional_threshold(value: float, field: str, low: float, high: float) -> float | None:
    """0 means "server default" (None); anything else must lie strictly inside (low, high)."""
    return None if value == 0 else _finite(value, field, low, high)


def image_info(img: np.ndarray, faces) -> pb.ImageInfo:
    """Size of the image as sent, and the turn under which its faces were found."""
    h, w = img.shape[:2]
    return pb.ImageInfo(width=w, height=h, orientation=faces[0].orientation if faces else 0)


def _point(p: np.ndarray) -> pb.Point:
    return pb.Point(x=float(p[0]), y=float(p[1]))


def face_to_proto(f: Face) -> pb.Face:
    x1, y1, x2, y2 = (float(v) for v in f.box)
    lm = f.landmarks
    q = f.quality
    return pb.Face(
        box=pb.BoundingBox(x=x1, y=y1, width=x2 - x1, height=y2 - y1),
        landmarks=pb.Landmarks(
            left_eye=_point(lm[0]),
            right_eye=_point(lm[1]),
            nose=_point(lm[2]),
            mouth_left=_point(lm[3]),
            mouth_right=_point(lm[4]),
        ),
        detection_score=f.score,
        quality=pb.Quality(
            score=q.score,
            face_size=q.face_size,
            sharpness=q.sharpness,
            brightness=q.brightness,
            yaw=q.yaw,
            pitch=q.pitch,
            roll=q.roll,
        )
        if q
        else None,
    )


def liveness_to_proto(r: LivenessResult) -> pb.Liveness:
    return pb.Liveness(
        is_live=r.is_live,
        score=r.score,
        threshold=r.threshold,
        model_scores=[pb.ModelScore(model=k, score=v) for k, v in r.model_scores.items()],
        reason=r.reason,
        hint=r.hint,
    )


def analysis_to_proto(f: Face) -> pb.FaceAnalysis:
    """The attributes the pipeline's per-face models added (those configured)."""
    out = pb.FaceAnalysis(face=face_to_proto(f))
    age = f.attributes.get("age")
    if age is not None:
        out.age, out.age_range.low, out.age_range.high = age.age, age.low, age.high
    p_male = f.attributes.get("gender")
    if p_male is not None:
        out.gender = pb.GENDER_MALE if p_male >= 0.5 else pb.GENDER_FEMALE
        out.gender_confidence = max(p_male, 1 - p_male)
    return out


# -- identity records ----------------------------------------------------------
_POLICY_FROM_PROTO = {
    pb.LIVENESS_POLICY_UNSPECIFIED: LIVENESS_REQUIRED,
    pb.LIVENESS_POLICY_REQUIRED: LIVENESS_REQUIRED,
    pb.LIVENESS_POLICY_OPTIONAL: LIVENESS_OPTIONAL,
}
_POLICY_TO_PROTO = {LIVENESS_REQUIRED: pb.LIVENESS_POLICY_REQUIRED, LIVENESS_OPTIONAL: pb.LIVENESS_POLICY_OPTIONAL}


def liveness_policy(value: int, field: str = "liveness_policy") -> str:
    if value not in _POLICY_FROM_PROTO:
        raise errors.validation(field, f"unknown value {value}")
    return _POLICY_FROM_PROTO[value]


def timestamp(ms: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMilliseconds(int(ms))
    return ts


_DUPLICATE_FROM_PROTO = {
    pb.DUPLICATE_POLICY_UNSPECIFIED: DUPLICATE_REJECT,
    pb.DUPLICATE_POLICY_REJECT: DUPLICATE_REJECT,
    pb.DUPLICATE_POLICY_WARN: DUPLICATE_WARN,
    pb.DUPLICATE_POLICY_OFF: DUPLICATE_OFF,
}
_DUPLICATE_TO_PROTO = {
    DUPLICATE_REJECT: pb.DUPLICATE_POLICY_REJECT,
    DUPLICATE_WARN: pb.DUPLICATE_POLICY_WARN,
    DUPLICATE_OFF: pb.DUPLICATE_POLICY_OFF,
}


def duplicate_policy(value: int, field: str = "duplicate_policy") -> str:
    if value not in _DUPLICATE_FROM_PROTO:
        raise errors.validation(field, f"unknown value {value}")
    return _DUPLICATE_FROM_PROTO[value]


def thresholds(msg: pb.CollectionThresholds, field: str = "thresholds") -> Thresholds:
    """A collection's thresholds as sent (0 = the server's); their floors are the domain's to check."""
    return Thresholds(
        optional_threshold(msg.match_threshold, f"{field}.match_threshold", -1.0, 1.0) or 0.0,
        optional_threshold(msg.search_threshold, f"{field}.search_threshold", -1.0, 1.0) or 0.0,
        optional_threshold(msg.liveness_threshold, f"{field}.liveness_threshold", 0.0, 1.0) or 0.0,
    )


def duplicate_to_proto(d: Duplicate | None) -> pb.DuplicateMatch | None:
    if d is None:
        return None
    return pb.DuplicateMatch(subject_id=d.subject_id, face_id=d.face_id, similarity=d.similarity, threshold=d.threshold)


def collection_to_proto(c: Collection) -> pb.Collection:
    t = c.thresholds
    return pb.Collection(
        collection=c.collection_id,
        display_name=c.display_name,
        liveness_policy=_POLICY_TO_PROTO[c.liveness_policy],
        create_time=timestamp(c.created_ms),
        subject_count=c.subject_count,
        face_count=c.face_count,
        duplicate_policy=_DUPLICATE_TO_PROTO[c.duplicate_policy],
        thresholds=pb.CollectionThresholds(match_threshold=t.match, search_threshold=t.search, liveness_threshold=t.liveness),
        retention_days=c.retention_days,
    )


def audit_event_to_proto(e: AuditEvent) -> pb.AuditEvent:
    return pb.AuditEvent(
        seq=e.seq,
        time=timestamp(e.created_ms),
        key_id=e.key_id,
        action=e.action,
        collection=e.collection_id,
        subject_id=e.subject_id,
        face_id=e.face_id,
        outcome=e.outcome,
    )


def stored_face_to_proto(f: FaceRecord) -> pb.StoredFace:
    return pb.StoredFace(
        face_id=f.face_id,
        subject_id=f.subject_id,
        model=f.model_id,
        quality=f.quality,
        has_crop=f.has_crop,
        create_time=timestamp(f.created_ms),
    )


def subject_to_proto(s: Subject) -> pb.Subject:
    return pb.Subject(
        subject_id=s.subject_id,
        metadata=s.metadata,
        faces=[stored_face_to_proto(f) for f in s.faces],
        face_count=s.face_count,
        create_time=timestamp(s.created_ms),
        update_time=timestamp(s.updated_ms),
    )


def api_key_to_proto(k: ApiKey) -> pb.ApiKey:
    return pb.ApiKey(key_id=k.key_id, collection=k.collection_id, description=k.description, create_time=timestamp(k.created_ms))
