"""YuNet face detector (OpenCV Zoo, 2023mar): box + 5 landmarks, fixed 640x640 input."""
from __future__ import annotations

import numpy as np

from server.models.detection import finalize, letterbox


class YunetDetector:
    strides = (8, 16, 32)

    def __init__(self, session, name: str, input_size: int = 640, score_threshold: float = 0.6, nms_threshold: float = 0.3):
        self.session = session
        self.name = name
        self.input_size = input_size
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.input_name = session.get_inputs()[0].name
        self._grid = {}
        for s in self.strides:
            n = input_size // s
            self._grid[s] = np.stack(np.mgrid[:n, :n][::-1], axis=-1).reshape(-1, 2).astype(np.float32)
        self._output_names = [f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in self.strides]

    def detect(self, img_bgr: np.ndarray, score_threshold: float | None = None):
        thr = self.score_threshold if score_threshold is None else score_threshold
        canvas, scale = letterbox(img_bgr, self.input_size)
        blob = np.ascontiguousarray(canvas.transpose(2, 0, 1)[None].astype(np.float32))  # BGR, raw 0-255
        outs = dict(zip(self._output_names, self.session.run(self._output_names, {self.input_name: blob})))
        all_boxes, all_kps, all_scores = [], [], []
        for s in self.strides:
            cls = outs[f"cls_{s}"].reshape(-1)
            obj = outs[f"obj_{s}"].reshape(-1)
            scores = np.sqrt(np.clip(cls, 0, 1) * np.clip(obj, 0, 1))
            idx = np.nonzero(scores >= thr)[0]
            if idx.size == 0:
                continue
            grid = self._grid[s][idx]
            bb = outs[f"bbox_{s}"].reshape(-1, 4)[idx]
            centers = (grid + bb[:, :2]) * s
            wh = np.exp(bb[:, 2:]) * s
            boxes = np.concatenate([centers - wh / 2, centers + wh / 2], axis=1)
            k = (outs[f"kps_{s}"].reshape(-1, 5, 2)[idx] + grid[:, None, :]) * s
            all_boxes.append(boxes)
            all_kps.append(k)
            all_scores.append(scores[idx])
        if not all_scores:
            return finalize(np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros((0,)), self.nms_threshold, scale)
        return finalize(np.concatenate(all_boxes), np.concatenate(all_kps), np.concatenate(all_scores), self.nms_threshold, scale)
