"""Live frame streams: the latest-wins inbox, the per-stream session, and the re-checks of open streams.

Plain Python (the gRPC glue is in stream_rpcs.py). A stream holds at most one
unprocessed frame, one frame in processing, and its tracks: its memory does
not depend on how fast the client sends.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from server.domain.tracking import FaceTracker, Track
from server.vision.faces import LivenessResult
from server.vision.pipeline import DetectOptions, FacePipeline

MAX_LISTED_SKIPS = 4096  # skipped frame ids listed in one answer (they are dropped either way)
QUALITY_GAIN = 0.15  # a track is evaluated again when its face quality rises by this much
# ... and at least this often: a track follows a box, and the face in the box can change (a printed
# face held up where a live one was) or leave the index (its subject deleted) while the box stays.
REEVALUATE_S = 1.0
# A camera does not turn from frame to frame: a stream tries the turned detector passes (six more
# passes on a frame with no upright face) at most this often, and first tries the orientation that
# found its last faces. Every frame of an empty scene paying for every turn would cost a stream 7x.
TURN_EVERY_S = 1.0
LIVENESS_FRAMES = 5  # a track's liveness verdict is the median of its last this many frames' checks


WAITING = object()  # FrameInbox.take: nothing due yet (the caller's chance to run its periodic checks)


class Recheck:
    """Runs `checks` (callables that raise when the stream may not go on) at most every `interval_s`.

    An open stream outlives the checks made when it opened: its key can be revoked and its
    collection deleted while it runs. Each frame or batch item calls this, and so does an idle
    stream once per interval, so either ends the stream within about one interval."""

    def __init__(self, checks, interval_s: float = 1.0, clock=time.monotonic):
        self.checks, self.interval_s, self._clock = list(checks), interval_s, clock
        self._next = clock() + interval_s

    def __call__(self) -> None:
        now = self._clock()
        if now < self._next:
            return
        self._next = now + self.interval_s
        for check in self.checks:
            check()


class FrameInbox:
    """The newest frame not yet processed. A newer frame replaces it; the replaced id is reported as skipped."""

    def __init__(self, max_fps: float = 0.0, clock=time.monotonic):
        self._cond = threading.Condition()
        self._pending = None  # (frame, received_at)
        self._skipped: list[int] = []
        self._done = False  # the client half-closed: process what is pending, then stop
        self._cancelled = False  # the call ended: stop now
        self._error: BaseException | None = None
        self._interval = 1.0 / max_fps if max_fps > 0 else 0.0
        self._next_at = 0.0
        self._clock = clock
        self._last_put = clock()

    def put(self, frame) -> None:
        with self._cond:
            if self._pending is not None and len(self._skipped) < MAX_LISTED_SKIPS:
                self._skipped.append(self._pending[0].frame_id)
            self._pending = (frame, self._clock())
            self._last_put = self._pending[1]
            self._cond.notify_all()

    def idle_for(self) -> float:
        """Seconds since the client last sent a frame (or since the inbox was made)."""
        with self._cond:
            return self._clock() - self._last_put

    def pace(self, max_fps: float) -> None:
        """Process at most `max_fps` frames a second (0: as many as the server can)."""
        with self._cond:
            self._interval = 1.0 / max_fps if max_fps > 0 else 0.0

    @property
    def cancelled(self) -> bool:
        with self._cond:
            return self._cancelled

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

    def take(self, timeout: float | None = None):
        """(frame, received_at, skipped ids) when a frame is due; None when the stream is over;
        WAITING when `timeout` seconds passed with nothing due."""
        give_up = None if timeout is None else self._clock() + timeout
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
                if give_up is not None and now >= give_up:
                    return WAITING
                wait = None if self._pending is None else self._next_at - now
                if give_up is not None:
                    wait = give_up - now if wait is None else min(wait, give_up - now)
                self._cond.wait(wait)


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

    def __init__(self, pipeline: FacePipeline, indexes, settings: StreamSettings, clock=time.monotonic):
        self.pipeline, self.indexes, self.s, self.clock = pipeline, indexes, settings, clock
        self.tracker = FaceTracker(clock=clock)
        self.orientation, self._turned_at = 0, -TURN_EVERY_S

    def _check_live(self, img, face, track) -> None:
        """One more liveness check for the track; its verdict is the median of the last few, so a
        single odd frame (motion blur, a reflection) decides nothing."""
        r = self.pipeline.check_liveness(img, face, self.s.liveness_threshold)
        if r.reason:  # cannot be judged on this frame (too close, too small): say so, keep nothing
            track.liveness, track.liveness_scores = r, []
        else:
            track.liveness_scores = (track.liveness_scores + [r.score])[-LIVENESS_FRAMES:]
            median = float(np.median(track.liveness_scores))
            track.liveness = LivenessResult(
                is_live=median >= r.threshold, score=median, threshold=r.threshold, model_scores=r.model_scores
            )
        if not track.liveness.is_live:
            track.identity = None  # a spoof is nobody

    def process(self, img) -> list[TrackedFaceResult]:
        now = self.clock()
        turns = now - self._turned_at >= TURN_EVERY_S
        faces = self.pipeline.detect(img, self.s.detect, turns=turns, prefer=self.orientation)
        if turns:
            self._turned_at = now
        if faces:
            self.orientation = faces[0].orientation
        tracks = self.tracker.update([f.box for f in faces])
        due = [
            i
            for i, (f, t) in enumerate(zip(faces, tracks))
            if (self.s.liveness or self.s.identify)
            and (
                t.evaluated_quality < 0
                or f.quality.score >= t.evaluated_quality + QUALITY_GAIN
                or now - t.evaluated_at >= REEVALUATE_S
            )
        ]
        if self.s.liveness:
            for face, track in zip(faces, tracks):  # every frame: the verdict is a median over frames
                self._check_live(img, face, track)
        search = [i for i in due if self.s.identify and (not self.s.liveness or tracks[i].liveness.is_live)]
        if search:
            index = self.indexes.get(self.s.collection)
            for i, emb in zip(search, self.pipeline.embed([faces[i] for i in search])):  # one batch for all due tracks
                hits = index.search(emb, 1, self.s.min_similarity, self.s.max_faces_per_subject)
                tracks[i].identity = hits[0] if hits else None  # what the face in the box is now
        for i in due:
            tracks[i].evaluated_quality, tracks[i].evaluated_at = faces[i].quality.score, now
        due_set = set(due)
        return [TrackedFaceResult(f, t, i in due_set) for i, (f, t) in enumerate(zip(faces, tracks))]
