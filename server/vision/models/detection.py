"""What every face detector shares: letterboxing into the network input and NMS."""

from __future__ import annotations

import cv2
import numpy as np

from server.vision.models.runtime import keeps_few_shapes


def letterbox(img: np.ndarray, size: int, tight: bool = False) -> tuple[np.ndarray, float]:
    """Resize keeping aspect ratio (long side = size) and paste top-left into a zero canvas:
    size x size, or (tight) the resized image rounded up to multiples of 32 per side, for
    networks that take any such shape (a 640x480 frame then costs 3/4 of a 640x640 square)."""
    h, w = img.shape[:2]
    scale = min(size / h, size / w)
    nw, nh = max(1, int(round(w * scale))), max(1, int(round(h * scale)))
    ch, cw = (-(-nh // 32) * 32, -(-nw // 32) * 32) if tight else (size, size)
    canvas = np.zeros((ch, cw, 3), dtype=np.uint8)
    canvas[:nh, :nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nw, nh) != (w, h) else img
    return canvas, scale


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4) with every box in b (M, 4), as (N, M)."""
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; returns kept indices, best score first."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        iou = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


# Candidates that go into NMS, the best first (what mmdetection calls nms_pre).
# Greedy NMS costs up to candidates squared: at a caller's score threshold near 0 every anchor
# (16 800 at 640 x 640) is a candidate, and one detector pass took most of a second.
MAX_CANDIDATES = 1000


def finalize(boxes: np.ndarray, kps: np.ndarray, scores: np.ndarray, nms_threshold: float, scale: float):
    """NMS over the best MAX_CANDIDATES, then map from network-input pixels back to the caller's image pixels."""
    if scores.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros((0,), np.float32)
    if scores.size > MAX_CANDIDATES:
        best = np.argpartition(-scores, MAX_CANDIDATES)[:MAX_CANDIDATES]
        boxes, kps, scores = boxes[best], kps[best], scores[best]
    keep = nms(boxes, scores, nms_threshold)
    return boxes[keep] / scale, kps[keep] / scale, scores[keep]


def cell_grid(height: int, width: int, stride: int) -> np.ndarray:
    """(col, row) of every cell of a stride-`stride` feature map over a height x width input, row-major."""
    return np.stack(np.mgrid[: height // stride, : width // stride][::-1], axis=-1).reshape(-1, 2).astype(np.float32)


class GridFaceDetector:
    """Single-shot detectors with a 3-stride grid head (SCRFD, YuNet).

    Subclasses implement `_run(canvas)` (preprocess + session.run) and
    `_decode(outputs, stride, threshold)` returning that stride's
    (boxes [K,4], landmarks [K,5,2], scores [K]) in network-input pixels.
    """

    strides = (8, 16, 32)
    tight_input = False  # True when the network takes any H x W in multiples of 32

    def __init__(self, session, name: str, input_size: int, score_threshold: float, nms_threshold: float):
        self.session = session
        self.name = name
        self.input_size = input_size
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.input_name = session.get_inputs()[0].name

    def detect(self, img_bgr: np.ndarray, score_threshold: float | None = None, input_size: int | None = None):
        """Return (boxes [N,4] x1y1x2y2, landmarks [N,5,2], scores [N]) in `img_bgr` pixels.
        `input_size`: the network's input side for this call (default: the model's own)."""
        thr = self.score_threshold if score_threshold is None else score_threshold
        # a square canvas per input side where the runtime keeps to few shapes (TimedSession.fixed_shapes)
        tight = self.tight_input and not keeps_few_shapes(self.session)
        canvas, scale = letterbox(img_bgr, input_size or self.input_size, tight)
        outputs = self._run(canvas)
        parts = [p for p in (self._decode(outputs, s, thr) for s in self.strides) if p[2].size]
        if not parts:
            return finalize(np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros((0,)), self.nms_threshold, scale)
        boxes, kps, scores = (np.concatenate(x) for x in zip(*parts))
        return finalize(boxes, kps, scores, self.nms_threshold, scale)

    def _run(self, canvas: np.ndarray):
        raise NotImplementedError

    def _decode(self, outputs, stride: int, threshold: float):
        raise NotImplementedError
