"""Live frame streams: the latest-wins inbox, the per-stream session, and the stream limits.

Plain Python (the gRPC glue is in stream_rpcs.py). A stream holds at most one
unprocessed frame, one frame in processing, and its tracks: its memory does
not depend on how fast the client sends.
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import grpc

from server import errors
from server.pipeline import DetectOptions, FacePipeline
from server.tracking import FaceTracker, Track

MAX_LISTED_SKIPS = 4096  # skipped frame ids listed in one answer (they are dropped either way)
QUALITY_GAIN = 0.15      # a track is evaluated again when its face quality rises by this much


class FrameInbox:
    """The newest frame not yet processed. A newer frame replaces it; the replaced id is reported as skipped."""

    def __init__(self, max_fps: float = 0.0, clock=time.monotonic):
        self._cond = threading.Condition()
        self._pending = None          # (frame, received_at)
        self._skipped: list[int] = []
        self._done = False            # the client half-closed: process what is pending, then stop
        self._cancelled = False       # the call ended: stop now
        self._error: BaseException | None = None
        self._interval = 1.0 / max_fps if max_fps > 0 else 0.0
        self._next_at = 0.0
        self._clock = clock

    def put(self, frame) -> None:
        with self._cond:
            if self._pending is not None and len(self._skipped) < MAX_LISTED_SKIPS:
                self._skipped.append(self._pending[0].frame_id)
            self._pending = (frame, self._clock())
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled, self._pending = True, None
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    def take(self):
        """(frame, received_at, skipped ids) when a frame is due; None when the stream is over."""
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._cancelled:
                    return None
                now = self._clock()
                if self._pending is not None and now >= self._next_at:
                    (frame, received), skipped = self._pending, self._skipped
                    self._pending, self._skipped = None, []
                    self._next_at = now + self._interval
                    return frame, received, skipped
                if self._pending is None and self._done:
                    return None
                self._cond.wait(None if self._pending is None else self._next_at - now)


@dataclass(frozen=True)
class StreamSettings:
    detect: DetectOptions
    liveness: bool
    identify: bool
    collection: str
    min_similarity: float
    liveness_threshold: float | None
    max_faces_per_subject: int


@dataclass
class TrackedFaceResult:
    face: object
    track: Track
    evaluated: bool


class StreamSession:
    """One stream's tracks; runs detection per frame and liveness/identity once per track."""

    def __init__(self, pipeline: FacePipeline, indexes, settings: StreamSettings):
        self.pipeline, self.indexes, self.s = pipeline, indexes, settings
        self.tracker = FaceTracker()

    def process(self, img) -> list[TrackedFaceResult]:
        faces = self.pipeline.detect(img, self.s.detect)
        tracks = self.tracker.update([f.box for f in faces])
        due = [i for i, (f, t) in enumerate(zip(faces, tracks))
               if (self.s.liveness or self.s.identify)
               and (t.evaluated_quality < 0 or f.quality.score >= t.evaluated_quality + QUALITY_GAIN)]
        if self.s.liveness:
            for i in due:
                tracks[i].liveness = self.pipeline.check_liveness(img, faces[i], self.s.liveness_threshold)
                if not tracks[i].liveness.is_live:
                    tracks[i].identity = None  # a spoof is nobody
        search = [i for i in due if self.s.identify and (not self.s.liveness or tracks[i].liveness.is_live)]
        if search:
            index = self.indexes.get(self.s.collection)
            for i, emb in zip(search, self.pipeline.embed([faces[i] for i in search])):  # one batch for all new tracks
                hits = index.search(emb, 1, self.s.min_similarity, self.s.max_faces_per_subject)
                t = tracks[i]
                if hits and (t.identity is None or hits[0].similarity > t.identity.similarity):
                    t.identity = hits[0]
        for i in due:
            tracks[i].evaluated_quality = faces[i].quality.score
        due_set = set(due)
        return [TrackedFaceResult(f, t, i in due_set) for i, (f, t) in enumerate(zip(faces, tracks))]


class StreamLimiter:
    """Concurrent StreamFrames calls: at most `per_key` for one API key (or peer) and `total` in all."""

    def __init__(self, per_key: int, total: int):
        self.per_key, self.total = per_key, total
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def active(self) -> int:
        with self._lock:
            return sum(self._open.values())

    @contextlib.contextmanager
    def slot(self, who: str):
        with self._lock:
            if self._open.get(who, 0) >= self.per_key:
                raise errors.FaceServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, errors.STREAM_LIMIT_REACHED,
                                              f"this key already holds {self.per_key} streams (max_streams_per_key)",
                                              limit=self.per_key)
            if sum(self._open.values()) >= self.total:
                raise errors.FaceServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, errors.STREAM_LIMIT_REACHED,
                                              f"the server already holds {self.total} streams (max_streams)", limit=self.total)
            self._open[who] = self._open.get(who, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                self._open[who] -= 1
                if not self._open[who]:
                    del self._open[who]
