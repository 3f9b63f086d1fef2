"""Finding faces at every scale and orientation, with extra detector passes only where the first fails.

The detector runs on a copy of the frame downscaled to `max_side` (640 px). That one pass finds
the faces of ordinary photos, and it is all an ordinary photo costs. Three kinds of input need
more, and each gets one bounded extra pass only when the first pass shows the need:

- **A face that fills the frame** (a selfie, an ID crop, the face crops other systems store).
  SCRFD was trained on faces with context around them and misses these; on a copy with a border
  as wide as the frame on every side, the face is a third as large, has context, and is found. Run
  when the first pass finds nothing, or its largest face is large and touches the frame's edge. A
  face cut off by the frame (a tight crop) may still score weakly there: it counts when a second
  view, on a different border, sees it too.
- **A small face in a large frame** (a 4K camera). Downscaled to 640 px, a 100 px face becomes
  17 px, below what the detector sees. Run when the first passes find nothing in a frame over
  twice `max_side`: one pass at twice `max_side` (where the detector takes any input size, as
  SCRFD does; YuNet's graph is fixed at 640).
- **A sideways or upside-down photo** without EXIF orientation (scans, stripped metadata). Run when
  nothing is found upright: the frame turned by 90, 180 and 270 degrees, each with its padded
  pass (which also confirms a weak detection); the turn whose face scores best wins. A face the
  first pass finds lying on its side (by its landmarks, or by a box wider than tall), or weak
  enough to be upside down, gets the same. The close-up pass sees upside-down faces too, weakly
  and as if upright: a face only it found, weakly, is checked against the three turned frames'
  plain passes, and a turn that sees the same face better wins. Landmarks are mapped back to the
  frame as sent, so alignment turns the face upright; the turn is reported so clients can fix
  their pipeline.

Worst case (nothing anywhere, a large frame): 1 + 3 + 1 + 3 x 2 = 11 detector runs on small copies
(an upright close-up pass that sees only a weak face, or a trace of one, takes up to two more views); a
weak close-up face that no turned plain pass sees better, then doubtful, 1 + 3 + 3 + 3 = 10 (a call
runs each turned pass once: a stream's remembered turn, tried first, is one of the three).
Every pass after the first is paid from the call's budget of detector passes (server/context.py
`spend`); a call that cannot pay gets the first pass only, so a batch of blank images costs what
its bytes allow, not eleven passes each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from server.context import spend
from server.vision.imaging import resize_long_side
from server.vision.models.detection import iou, nms

PAD = 1.0  # border added on every side for the close-up pass, as a share of the frame's side
EDGE = 0.02  # a box this close to the frame's edge (share of the side) touches it
LARGE = 0.5  # a face this large (share of the shorter side) that touches the edge may be cut off
FINE = 2  # the small-face pass runs at FINE x max_side
SURE = 0.7  # a turned frame's detection at least this sure needs no second view
# An upright face the detector is unsure of turns only for a turn that scores clearly better. On
# the photos of ../shared/faces a real upside-down face scores 0.12-0.36 better turned, while an
# upright close-up of a video scored up to 0.05 better upside down: a near tie must not turn it.
TURN_MARGIN = 0.08
# A face cut off by the frame's edge scores low even on the close-up pass (on tight LFW crops, 0.35-0.5
# where the threshold is 0.5): down to this share of the threshold it counts when two views see it
# (at 0.6, two magnified hands of 515 background close-ups cut from LFW passed as faces; at 0.7 none).
WEAK = 0.7
# The views that may confirm such a face, tried in turn until one does: the frame on grey borders
# half and three quarters as wide as the close-up pass's. With only the first, 112 of 120 LFW
# crops at 0.6 x the face's width were found; with both, 117, and no more false faces among 607
# close-ups of the photos' backgrounds, hands and clothes.
CONFIRM = ((PAD / 2, 127), (3 * PAD / 4, 127))
# A trace of a face on the close-up pass, under WEAK: a tight crop's remains may score there on the
# black border and well above WEAK on a grey one, so the other views still run; under HINT they do
# not (an empty background costs no more passes).
HINT = 0.5
# The close-up pass also sees an upside-down or sideways face, weakly and with its landmarks laid out
# upright: on the 120 LFW photos turned by 90, 180 or 270 degrees, at most 0.754. A face only the
# close-up pass found, scoring under this, is checked against the turned frames (three more passes).
# Most real close-ups score above it (crops of those photos 1.1 or 1.0 x the face's width: all but
# one in 120), though a crop with much forehead and neck often does not (1.5 x: 47 in 118).
CLOSE_UP_SURE = 0.76
# A face box this much less tall than wide (height / width) lies on its side. Upright faces' boxes
# are taller than wide; tilted by 25 to 45 degrees, 6 of 239 LFW faces fall under 0.9 (all at 45
# degrees, where up and sideways are a tie anyway); the sideways LFW faces that the detector gives
# upright landmarks, 0.58 to 0.82.
LYING = 0.9


@dataclass
class Found:
    boxes: np.ndarray  # (N, 4) x1 y1 x2 y2 in the frame as sent
    landmarks: np.ndarray  # (N, 5, 2)
    scores: np.ndarray  # (N,)
    orientation: int = 0  # degrees the frame was turned counter-clockwise for these faces to stand upright

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class _Turns:
    """One call's passes over the turned frames (by quarter turns k), so that none runs twice."""

    plain: dict[int, Found] = field(default_factory=dict)  # the plain pass, in the turned frame's pixels
    confirmed: dict[int, Found] = field(default_factory=dict)  # _turn's answer, in the frame's

    def cost(self, k: int, confirm: bool = True) -> int:
        """The passes _turn(k, confirm) still runs: its plain pass, and with `confirm` its close-up
        pass; what is not done yet."""
        if confirm and k in self.confirmed:
            return 0
        return (0 if k in self.plain else 1) + (1 if confirm else 0)


def _empty() -> Found:
    return Found(np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros((0,), np.float32))


def seen_by(a: Found, b: Found) -> np.ndarray:
    """Which of `a`'s faces `b` sees too (a box of `b` overlaps it, IoU > 0.3), as a bool per face."""
    return (iou(a.boxes, b.boxes) > 0.3).any(axis=1)


def turn_points(pts: np.ndarray, k: int, w: int, h: int) -> np.ndarray:
    """Points of np.rot90(frame, k) (a w x h frame turned k x 90 degrees counter-clockwise) back
    in the frame's own coordinates."""
    x, y = pts[..., 0], pts[..., 1]
    if k == 1:  # the turned frame is h wide: (x', y') = (y, w - 1 - x)
        back = (w - 1 - y, x)
    elif k == 2:
        back = (w - 1 - x, h - 1 - y)
    elif k == 3:  # (x', y') = (h - 1 - y, x)
        back = (y, h - 1 - x)
    else:
        back = (x, y)
    return np.stack(back, axis=-1)


def quarter_turns(landmarks: np.ndarray) -> int:
    """How many quarter turns counter-clockwise would stand a face upright (0: it is), from the
    direction its mouth-to-eyes line points (up, in an upright face)."""
    up = landmarks[:2].mean(axis=0) - landmarks[3:].mean(axis=0)
    tilt = np.degrees(np.arctan2(up[1], up[0])) + 90  # 0 when the eyes are straight above the mouth
    return int(round(tilt / 90)) % 4


def lies_on_its_side(box: np.ndarray, k: int = 0) -> bool:
    """A face box clearly less tall than wide (LYING) once its frame is turned k quarter turns
    counter-clockwise: upright faces' boxes are taller than wide."""
    w, h = box[2] - box[0], box[3] - box[1]
    return bool(h < LYING * w if k % 2 == 0 else w < LYING * h)


def looks_turned(face, width: int, height: int) -> bool:
    """A face (box, landmarks, orientation in the frame) whose landmarks or box disagree with the
    orientation it was found under (upright in its turned frame: eyes above the mouth, a box taller
    than wide): its camera may have turned. The box counts only clear of the frame's edges (`width`
    x `height`): a close-up's is cut."""
    k = (face.orientation // 90) % 4
    x1, y1, x2, y2 = face.box
    inside = x1 > 1 and y1 > 1 and x2 < width - 1 and y2 < height - 1
    return (inside and lies_on_its_side(face.box, k)) or quarter_turns(face.landmarks) != k


class FaceFinder:
    def __init__(self, detector, max_side: int = 640):
        self.detector, self.max_side = detector, max_side

    def input_sides(self) -> tuple[int, ...]:
        """The detector input sides the passes use: the detector's own, and the small-face pass's
        where the detector takes other sizes (SCRFD; YuNet's graph is fixed at its own)."""
        return (self.detector.input_size, FINE * self.max_side) if self.detector.tight_input else (self.detector.input_size,)

    def find(self, img: np.ndarray, min_score: float | None = None, turns: bool = True, prefer: int = 0) -> Found:
        """`turns`: whether the turned passes may search for a turn (a stream allows them now and then:
        its camera does not turn from frame to frame). `prefer`: an orientation (degrees) to try
        first, the one that found the faces of this stream's previous frames; it is tried whatever
        `turns` says."""
        h, w = img.shape[:2]
        small, scale = resize_long_side(img, self.max_side)
        seen = _Turns()  # the turned frames' passes, run at most once per call
        if prefer % 360 and spend(2):
            remembered = self._turn(small, (prefer // 90) % 4, min_score, seen)
            if len(remembered) and remembered.scores.max() >= SURE:
                return self._scaled(remembered, scale)
            if len(remembered):
                # a weak face under the remembered turn: the camera may stand upright again (or the turn
                # was a near tie), so one upright pass decides; a stream never stays on a wrong turn
                upright = self._run(small, min_score)
                if not len(upright) or upright.scores.max() <= remembered.scores.max():
                    return self._scaled(remembered, scale)
                return self._scaled(upright, scale)
        plain = self._run(small, min_score)
        found = self._scaled(plain, scale)
        if self._cut_off(found, w, h) and spend(1):
            found = self._merge(found, self._scaled(self._padded(small, min_score, weak=True), scale))
        close_up_only = not len(plain) and bool(len(found))
        fine_pass = self.detector.tight_input and max(h, w) > 2 * self.max_side
        if not len(found) and fine_pass and spend(FINE * FINE, h * w):
            fine, fine_scale = resize_long_side(img, FINE * self.max_side)
            found = self._scaled(self._run(fine, min_score, FINE * self.max_side), fine_scale)
        if not turns:
            return found
        if len(found):
            if close_up_only and found.scores.max() < CLOSE_UP_SURE:
                turned = self._seen_turned(small, found, scale, min_score, seen)
                if turned is not None:
                    return turned
            sideways = self._quarter_turns(found) or self._lying(plain)
            if sideways or self._doubtful(found, w, h):
                # lying on its side, or weak and perhaps upside down: its landmarks are the detector's
                # guesses; the turn under which the face scores best stands it upright
                turned = self._best_turn(small, min_score, seen)
                margin = 0.0 if sideways else TURN_MARGIN
                if len(turned) and turned.scores.max() > found.scores.max() + margin:
                    return self._scaled(turned, scale)
            return found
        return self._scaled(self._best_turn(small, min_score, seen), scale)

    def _best_turn(self, small: np.ndarray, min_score, seen: _Turns) -> Found:
        """Of the three turns, the one whose best face scores highest (empty when none finds one):
        a face also passes, more weakly, for one lying on its side or upside down. `seen`: the
        turned passes already run (see _turn)."""
        best = _empty()
        for k in (1, 2, 3):
            if not spend(seen.cost(k)):
                break
            f = self._turn(small, k, min_score, seen)
            if len(f) and (not len(best) or f.scores.max() > best.scores.max()):
                best = f
        return best

    def _seen_turned(self, small: np.ndarray, found: Found, scale: float, min_score, seen: _Turns) -> Found | None:
        """Faces that only the close-up pass found (`found`, in the frame) seen better by a turned
        frame's plain pass, with their context: stronger evidence than the close-up's, and where the
        close-up took an upside-down or sideways face for an upright one, the turn that stands it
        upright. The same face (the boxes overlap), scoring higher; None when no turn does. (At half
        the size the turned passes would cost less, but there they see close-ups too, upside-down
        ones as well: only the full-size pass tells a face in context from a close-up.)"""
        best, best_score = None, found.scores.max()
        for k in (1, 2, 3):
            if not spend(seen.cost(k, confirm=False)):
                break
            f = self._scaled(self._turn(small, k, min_score, seen, confirm=False), scale)
            same = seen_by(f, found)
            if same.any() and f.scores[same].max() > best_score:
                # that face, and any other the turned frame is sure of (SURE, as _turned keeps): a weak
                # one beside it has no second view and may be a false face
                keep = np.flatnonzero(same | (f.scores >= SURE))
                best = Found(f.boxes[keep], f.landmarks[keep], f.scores[keep], f.orientation)
                best_score = f.scores[same].max()
        return best

    def _turn(self, small: np.ndarray, k: int, min_score, seen: _Turns, confirm: bool = True) -> Found:
        """The faces of `small` turned k quarter turns counter-clockwise, mapped back into `small`:
        confirmed by the close-up pass (see _turned), or the plain pass's alone. Both are kept in `seen`
        for a later call to reuse (the plain pass in the turned frame's pixels)."""
        if confirm and k in seen.confirmed:
            return seen.confirmed[k]
        sh, sw = small.shape[:2]
        turned = np.ascontiguousarray(np.rot90(small, k))
        if k not in seen.plain:
            seen.plain[k] = self._run(turned, min_score)
        f = self._turned(turned, seen.plain[k], min_score) if confirm else seen.plain[k]
        corners = turn_points(f.boxes.reshape(-1, 2, 2), k, sw, sh)
        boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1).reshape(-1, 4)
        found = Found(boxes, turn_points(f.landmarks, k, sw, sh), f.scores, orientation=90 * k if len(f) else 0)
        if confirm:
            seen.confirmed[k] = found
        return found

    @staticmethod
    def _quarter_turns(f: Found) -> int:
        """quarter_turns of the largest face."""
        sizes = (f.boxes[:, 2] - f.boxes[:, 0]) * (f.boxes[:, 3] - f.boxes[:, 1])
        return quarter_turns(f.landmarks[int(np.argmax(sizes))])

    # -- passes ----------------------------------------------------------------------
    def _turned(self, turned: np.ndarray, plain: Found, min_score) -> Found:
        """Faces of a turned frame, from its plain pass (`plain`) and its close-up pass. Turning gives
        the detector three more chances at a photo with no face, so a weak detection counts only when
        the close-up pass sees it too (a false one rarely survives the change of scale); a close-up
        pass alone counts when the plain one saw nothing."""
        close = self._padded(turned, min_score)
        if not len(plain):
            return close
        seen_twice = seen_by(plain, close)
        keep = np.flatnonzero((plain.scores >= SURE) | seen_twice)
        return Found(plain.boxes[keep], plain.landmarks[keep], plain.scores[keep])

    def _run(self, frame: np.ndarray, min_score, input_size: int | None = None) -> Found:
        boxes, kps, scores = self.detector.detect(frame, min_score, input_size=input_size)
        return Found(boxes.astype(np.float32), kps.astype(np.float32), scores.astype(np.float32))

    def _padded(self, small: np.ndarray, min_score, weak: bool = False) -> Found:
        """The close-up pass: the frame at a third of the size in the middle of a black border. A face
        cut off by the frame's edge (a tight crop: no chin, no forehead) often scores under the
        detector's threshold even there. With `weak` (the upright frame's rescue; turned frames have
        three chances already) and the detector's own threshold (the caller set none), the other
        views (CONFIRM: grey borders, narrower) run while no face is settled: a face scoring down to
        WEAK x the threshold counts when another view sees it too (a false face rarely survives the
        change of scale and border), and one at the threshold counts alone, whichever view saw it.
        The views answer with the first one that found a face: the black border's where it did. A
        tight crop's remains may score just under WEAK on the black border and well above it on a
        grey one: the grey views run when the black border shows at least a trace of a face (HINT)."""
        if min_score is not None or not weak:  # the caller's threshold is the caller's
            return self._bordered(small, min_score, PAD, 0)
        strict = self.detector.score_threshold
        black = self._bordered(small, HINT * strict, PAD, 0)
        if not len(black):  # not a trace of a face: the other views would not find one either
            return black
        fair = black.scores >= WEAK * strict
        views = [Found(black.boxes[fair], black.landmarks[fair], black.scores[fair])]
        for view in (None, *CONFIRM):
            if view is not None:  # a grey view, paid from the call's budget
                if not spend(1):
                    break
                views.append(self._bordered(small, WEAK * strict, *view))
            first = next((f for f in views if len(f)), None)
            if first is None:
                continue
            settled = first.scores >= strict
            for other in views:
                if other is not first:
                    settled |= seen_by(first, other)
            if settled.all():
                break
        if first is None:
            return _empty()
        keep = np.flatnonzero(settled)
        return Found(first.boxes[keep], first.landmarks[keep], first.scores[keep])

    def _bordered(self, small: np.ndarray, min_score, pad: float, grey: int) -> Found:
        """Faces of `small` shrunk into the middle of a border `pad` x its size wide on every side,
        mapped back into `small`."""
        half, s = resize_long_side(small, max(1, int(self.max_side / (1 + 2 * pad))))
        hh, hw = half.shape[:2]
        py, px = int(pad * hh), int(pad * hw)
        canvas = cv2.copyMakeBorder(half, py, py, px, px, cv2.BORDER_CONSTANT, value=(grey, grey, grey))
        f = self._run(canvas, min_score)
        offset = np.array([px, py], np.float32)
        boxes = (f.boxes.reshape(-1, 2, 2) - offset).reshape(-1, 4) / s
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, small.shape[1] - 1)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, small.shape[0] - 1)
        return Found(boxes, (f.landmarks - offset) / s, f.scores)

    @staticmethod
    def _scaled(f: Found, scale: float) -> Found:
        return Found(f.boxes / scale, f.landmarks / scale, f.scores, f.orientation)

    @staticmethod
    def _lying(f: Found) -> bool:
        """The plain pass's best face has a box clearly wider than tall (LYING): a face lies on its side,
        whatever its landmarks say (the detector lays them out upright on some sideways faces). Only
        the plain pass's: a close-up's box is cut to the frame."""
        return bool(len(f)) and lies_on_its_side(f.boxes[int(np.argmax(f.scores))])

    @staticmethod
    def _doubtful(f: Found, w: int, h: int) -> bool:
        """One weak, large face: what an upside-down portrait looks like to an upright detector."""
        size = min(f.boxes[0, 2] - f.boxes[0, 0], f.boxes[0, 3] - f.boxes[0, 1])
        return len(f) == 1 and f.scores[0] < SURE and size >= 0.2 * min(w, h)

    @staticmethod
    def _cut_off(f: Found, w: int, h: int) -> bool:
        """Nothing found, or the largest face is large and runs into the frame's edge."""
        if not len(f):
            return True
        sizes = np.minimum(f.boxes[:, 2] - f.boxes[:, 0], f.boxes[:, 3] - f.boxes[:, 1])
        x1, y1, x2, y2 = f.boxes[int(np.argmax(sizes))]
        touches = x1 <= EDGE * w or y1 <= EDGE * h or x2 >= (1 - EDGE) * w or y2 >= (1 - EDGE) * h
        return bool(touches and sizes.max() >= LARGE * min(w, h))

    def _merge(self, a: Found, b: Found) -> Found:
        if not len(b):
            return a
        boxes, kps, scores = (np.concatenate(x) for x in ((a.boxes, b.boxes), (a.landmarks, b.landmarks), (a.scores, b.scores)))
        keep = nms(boxes, scores, self.detector.nms_threshold)
        return Found(boxes[keep], kps[keep], scores[keep])
