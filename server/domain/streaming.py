"""Live frame streams: the frame inbox, the per-stream session, and the re-checks of open streams.

Plain Python (the gRPC glue is in server/rpc/handlers/streams.py). A stream holds at most two
unprocessed frames, one frame in processing, and its tracks: its memory does not depend on how
fast the client sends.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from server.domain.tracking import FaceTracker, Track
from server.vision.faces import LivenessResult
from server.vision.finder import looks_turned
from server.vision.pipeline import DetectOptions, FacePipeline

MAX_LISTED_SKIPS = 4096  # skipped frame ids listed in one answer (they are dropped either way)
QUALITY_GAIN = 0.15  # a track is evaluated again when its face quality rises by this much
# ... and at least this often: a track follows a box, and the face in the box can change (a printed
# face held up where a live one was) or leave the index (its subject deleted) while the box stays.
REEVALUATE_S = 1.0
# A camera does not turn from frame to frame: a stream tries the turned detector passes (six more
# passes on a frame with no upright face, or to check a weak or sideways one) at most this often,
# and first tries the orientation that found its last faces. Every frame of an empty scene paying
# for every turn would cost a stream 7x. A face tracked since such a check is not checked again
# soon: an empty scene, a new track, or a face that looks turned (its landmarks or box disagree
# with the orientation it was found under) opens the next check, and otherwise only RECHECK_TURNS_S
# does (a camera turned upside down under a face can still look upright to the detector). So a
# steady stream seldom pays for a seven-pass frame, which holds up the frames behind it.
TURN_EVERY_S = 1.0
RECHECK_TURNS_S = 10.0
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
    """The newest unprocessed frames, oldest first: at most `depth` of them, and under max_fps pacing
    only the newest. A newer frame pushes the oldest out; its id is reported as skipped.

    Two rather than one: a camera's frames come with jitter, and now and then one frame costs more
    than a frame's interval (a recheck, a new track's turned-pass check). Keeping only the newest
    would drop the next frame although the server keeps up on average; a second slot lets it catch
    up. A server that stays behind (two frames waiting at two takes running) takes the newest, so
    a stream it cannot keep up with does not also wait a frame longer for every answer."""

    def __init__(self, max_fps: float = 0.0, clock=time.monotonic, depth: int = 2):
        self._cond = threading.Condition()
        self._pending: deque = deque()  # (frame, received_at), oldest first
        self._depth = depth
        self._skipped: list[int] = []
        self._behind = False  # the last take left a frame waiting
        self._done = False  # the client half-closed: process what is pending, then stop
        self._cancelled = False  # the call ended: stop now
        self._error: BaseException | None = None
        self._interval = 1.0 / max_fps if max_fps > 0 else 0.0
        self._next_at = 0.0
        self._clock = clock
        self._last_put = clock()

    def _drop_to(self, keep: int) -> None:
        while len(self._pending) > keep:
            frame, _ = self._pending.popleft()
            if len(self._skipped) < MAX_LISTED_SKIPS:
                self._skipped.append(frame.frame_id)

    def put(self, frame) -> None:
        with self._cond:
            self._drop_to((1 if self._interval else self._depth) - 1)
            self._last_put = self._clock()
            self._pending.append((frame, self._last_put))
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
            self._cancelled = True
            self._pending.clear()
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
                # once the client has half-closed no frame comes after the pending one: it is due at
                # once (waiting out a slow max_fps slot would outlast the stream idle time)
                if self._pending and (now >= self._next_at or self._done):
                    backlog = len(self._pending) > 1
                    if self._interval or (backlog and self._behind):
                        self._drop_to(1)  # paced: only the newest is due; behind: catch up at once
                    self._behind = backlog
                    frame, received = self._pending.popleft()
                    skipped, self._skipped = self._skipped, []
                    self._next_at = now + self._interval
                    return frame, received, skipped
                if not self._pending and self._done:
                    return None
                if give_up is not None and now >= give_up:
                    return WAITING
                wait = None if not self._pending else self._next_at - now
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
    collection_created_ms: int | None = None  # the identify collection's, as the stream opened


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
        self._checked: set[int] = set()  # tracks seen by the last frame that tried the turns
        self._unchecked = True  # the last frame had no face, or a track no turned check has seen

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
        since = now - self._turned_at
        turns = since >= TURN_EVERY_S and (self._unchecked or since >= RECHECK_TURNS_S)
        faces = self.pipeline.detect(img, self.s.detect, turns=turns, prefer=self.orientation)
        if faces:
            self.orientation = faces[0].orientation
        tracks = self.tracker.update([f.box for f in faces])
        if turns:
            self._turned_at, self._checked = now, {t.track_id for t in tracks}
        self._unchecked = (
            not tracks
            or any(t.track_id not in self._checked for t in tracks)
            or any(looks_turned(f, img.shape[1], img.shape[0]) for f in faces)
        )
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
            index = self.indexes.get(self.s.collection, self.s.collection_created_ms)  # not an earlier collection's
            for i, emb in zip(search, self.pipeline.embed([faces[i] for i in search])):  # one batch for all due tracks
                hits = index.search(emb, 1, self.s.min_similarity, self.s.max_faces_per_subject)
                tracks[i].identity = hits[0] if hits else None  # what the face in the box is now
        for i in due:
            tracks[i].evaluated_quality, tracks[i].evaluated_at = faces[i].quality.score, now
        due_set = set(due)
        return [TrackedFaceResult(f, t, i in due_set) for i, (f, t) in enumerate(zip(faces, tracks))]
