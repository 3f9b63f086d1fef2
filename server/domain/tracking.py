"""Face tracks across the frames of one stream: greedy IoU matching, the way camera SDKs do it cheaply.

Each frame's boxes are matched to the live tracks by intersection-over-union
(best pairs first, at least `min_iou`); an unmatched box starts a new track,
and a track unseen for `max_missed` processed frames ends. A track carries
what the stream learned about its face (liveness, identity) so that those
run once per track, not once per frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from server.vision.models.detection import iou


@dataclass
class Track:
    track_id: int
    box: np.ndarray
    frames: int = 1
    missed: int = 0
    last_seen: float = 0.0
    evaluated_quality: float = -1.0  # face quality when liveness/identity last ran; -1 = never
    evaluated_at: float = 0.0  # when they last ran (clock of the tracker)
    liveness: object = None  # LivenessResult: the median of liveness_scores
    liveness_scores: list = field(default_factory=list)  # P(live) of the track's last few frames
    identity: object = None  # index Hit of the last check (None: nobody, or not live)


class FaceTracker:
    def __init__(self, min_iou: float = 0.3, max_missed: int = 10, max_age_s: float = 1.0, clock=time.monotonic):
        self.min_iou, self.max_missed, self.max_age_s, self.clock = min_iou, max_missed, max_age_s, clock
        self.tracks: list[Track] = []
        self._next_id = 1

    def update(self, boxes: list[np.ndarray]) -> list[Track]:
        """The track of each box, in the order of `boxes` (new tracks for new faces)."""
        now = self.clock()
        self.tracks = [t for t in self.tracks if now - t.last_seen <= self.max_age_s]
        assigned: list[Track | None] = [None] * len(boxes)
        if boxes and self.tracks:
            scores = iou(np.stack(boxes).astype(np.float64), np.stack([t.box for t in self.tracks]).astype(np.float64))
            used_b, used_t = set(), set()
            for flat in np.argsort(-scores, axis=None):
                b, t = divmod(int(flat), len(self.tracks))
                if scores[b, t] < self.min_iou:
                    break
                if b in used_b or t in used_t:
                    continue
                used_b.add(b)
                used_t.add(t)
                track = self.tracks[t]
                track.box, track.frames, track.missed, track.last_seen = np.asarray(boxes[b]), track.frames + 1, 0, now
                assigned[b] = track
        seen = {id(t) for t in assigned if t is not None}
        for t in self.tracks:
            if id(t) not in seen:
                t.missed += 1
        self.tracks = [t for t in self.tracks if t.missed <= self.max_missed]
        for b, box in enumerate(boxes):
            if assigned[b] is None:
                track = Track(self._next_id, np.asarray(box), last_seen=now)
                self._next_id += 1
                self.tracks.append(track)
                assigned[b] = track
        return assigned
