"""SCRFD face detector (insightface det_500m / det_2.5g): box + 5 landmarks."""
from __future__ import annotations

import numpy as np

from server.models.detection import finalize, letterbox


class ScrfdDetector:
    """Anchor-free SCRFD with 3 strides and 2 anchors per cell.

    Outputs are identified by shape (last dim 1/4/10 = scores/boxes/landmarks;
    more rows = finer stride), so both published exports work regardless of
    output order.
    """

    strides = (8, 16, 32)
    num_anchors = 2

    def __init__(self, session, name: str, input_size: int = 640, score_threshold: float = 0.5, nms_threshold: float = 0.4):
        self.session = session
        self.name = name
        self.input_size = input_size
        self.score_threshold = score_threshold
        self.nms_threshold = nms_threshold
        self.input_name = session.get_inputs()[0].name
        self._centers = {}
        for s in self.strides:
            n = input_size // s
            grid = np.stack(np.mgrid[:n, :n][::-1], axis=-1).reshape(-1, 2).astype(np.float32) * s
            self._centers[s] = np.repeat(grid, self.num_anchors, axis=0)
        outs = session.get_outputs()
        self._output_names = [o.name for o in outs]

    def _group_outputs(self, outputs: list[np.ndarray]) -> dict[int, dict[int, np.ndarray]]:
        by_dim: dict[int, list[np.ndarray]] = {1: [], 4: [], 10: []}
        for out in outputs:
            out = out.reshape(-1, out.shape[-1])
            by_dim[out.shape[-1]].append(out)
        grouped = {}
        for dim, arrays in by_dim.items():
            arrays.sort(key=lambda a: -a.shape[0])  # most rows = stride 8
            grouped[dim] = dict(zip(self.strides, arrays))
        return grouped

    def detect(self, img_bgr: np.ndarray, score_threshold: float | None = None):
        """Return (boxes [N,4] x1y1x2y2, landmarks [N,5,2], scores [N]) in `img_bgr` pixels."""
        thr = self.score_threshold if score_threshold is None else score_threshold
        canvas, scale = letterbox(img_bgr, self.input_size)
        blob = canvas[:, :, ::-1].astype(np.float32)
        blob -= 127.5
        blob /= 128.0
        blob = blob.transpose(2, 0, 1)[None]
        outputs = self.session.run(self._output_names, {self.input_name: np.ascontiguousarray(blob)})
        g = self._group_outputs(outputs)
        all_boxes, all_kps, all_scores = [], [], []
        for s in self.strides:
            scores = g[1][s][:, 0]
            idx = np.nonzero(scores >= thr)[0]
            if idx.size == 0:
                continue
            centers = self._centers[s][idx]
            d = g[4][s][idx] * s
            boxes = np.concatenate([centers - d[:, :2], centers + d[:, 2:]], axis=1)
            k = g[10][s][idx].reshape(-1, 5, 2) * s + centers[:, None, :]
            all_boxes.append(boxes)
            all_kps.append(k)
            all_scores.append(scores[idx])
        if not all_scores:
            return finalize(np.zeros((0, 4)), np.zeros((0, 5, 2)), np.zeros((0,)), self.nms_threshold, scale)
        return finalize(np.concatenate(all_boxes), np.concatenate(all_kps), np.concatenate(all_scores), self.nms_threshold, scale)
