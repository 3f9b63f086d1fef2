"""Turning request fields into checked values, shared by every handler group: images (with their
CPU budget), detection options, and thresholds that a request may raise but never lower."""

from __future__ import annotations

from dataclasses import dataclass

from facesvc.v1 import face_service_pb2 as pb
from server import errors
from server.context import ensure_call_alive, work_budget
from server.rpc import convert
from server.vision.imaging import ImageLimits, PixelBudget
from server.vision.pipeline import DetectOptions


@dataclass(frozen=True)
class Defaults:
    """The server's defaults and floors for what a request leaves at 0."""

    min_face_size: int
    max_faces: int
    match_threshold: float  # 1:1 (Compare, Verify)
    search_threshold: float  # 1:N (Search, SearchByEmbedding, StreamFrames identify)
    match_floor: float  # no request's match threshold or min_similarity below this
    liveness_threshold: float  # also the floor of every request's liveness threshold
    max_analyzed_faces: int = 20  # faces per request that per-face models (embedding, liveness, age) run on


class RequestParser:
    def __init__(self, limits: ImageLimits, defaults: Defaults):
        self.limits, self.defaults = limits, defaults

    def image(self, msg: pb.Image, field: str, budget: PixelBudget | None = None):
        ensure_call_alive()  # before each decode: a batch stops at its deadline, not after its last item
        if budget is None:  # a single image: a budget of its own, as large as its bytes allow
            budget = self.limits.budget(msg.ByteSize())
        work_budget.set(budget)  # the vision layer's extra passes are paid from it too
        return convert.image_from_proto(msg, field, self.limits, budget)

    def options(self, msg: pb.FaceOptions, field: str = "face_options", analyzed: bool = False) -> DetectOptions:
        """`analyzed`: every face found goes through per-face models, whose cost grows with the count,
        so the request may ask for at most max_analyzed_faces."""
        d = self.defaults
        if not analyzed:
            return convert.detect_options(msg, d.min_face_size, d.max_faces, field)
        if msg.max_faces > d.max_analyzed_faces:
            raise errors.validation(
                f"{field}.max_faces",
                f"at most {d.max_analyzed_faces} for RPCs that embed or analyze "
                f"every face (max_analyzed_faces), got {msg.max_faces}",
                limit=d.max_analyzed_faces,
            )
        return convert.detect_options(msg, d.min_face_size, min(d.max_faces, d.max_analyzed_faces), field)

    # A request may raise a threshold, never lower it below the server's (or its collection's): a
    # collection key must not be able to undo the policy its operator set (a spoof verifying at
    # liveness_threshold=1e-4).
    def liveness_threshold(self, requested: float, field: str = "liveness_threshold", floor: float = 0.0) -> float | None:
        """The request's liveness threshold, or with none the collection's (`floor`, when it raised the
        server's); None: the server's default."""
        t = convert.optional_threshold(requested, field, 0.0, 1.0)
        floor = max(floor, self.defaults.liveness_threshold)
        if t is not None and t < floor:
            raise errors.validation(
                field, f"may raise the liveness threshold in force ({floor}), not lower it; got {t}", floor=floor
            )
        if t is None and floor > self.defaults.liveness_threshold:
            return floor
        return t

    def _floored(self, requested: float, field: str) -> float | None:
        t = convert.optional_threshold(requested, field, -1.0, 1.0)
        floor = self.defaults.match_floor
        if t is not None and t < floor:
            raise errors.validation(field, f"must be at least {floor} (the server's match_threshold_floor), got {t}", floor=floor)
        return t

    def match_threshold(self, requested: float, field: str = "threshold", default: float = 0.0) -> float:
        """The request's 1:1 threshold, or `default` (the collection's), or the server's."""
        t = self._floored(requested, field)
        return (default or self.defaults.match_threshold) if t is None else t

    def min_similarity(self, requested: float, field: str = "min_similarity", default: float = 0.0) -> float:
        """The request's 1:N threshold, or `default` (the collection's), or the server's."""
        t = self._floored(requested, field)
        return (default or self.defaults.search_threshold) if t is None else t
