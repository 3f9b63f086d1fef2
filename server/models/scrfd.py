"""SCRFD face detector (insightface det_500m / det_2.5g): box + 5 landmarks."""
from __future__ import annotations

import numpy as np

from server.models.detection import GridFaceDetector, cell_grid


class ScrfdDetector(GridFaceDetector):
    """Anchor-free SCRFD with 3 strides and 2 anchors per cell; RGB, (x - 127.5) / 128.

    Outputs are identified by shape (last dim 1/4/10 = scores/boxes/landmarks;
    more rows = finer stride), so both published exports work regardless of
    output order.
    """

    num_anchors = 2

    def __init__(self, session, name: str, input_size: int = 640, score_threshold: float = 0.5, nms_threshold: float = 0.4):
        super().__init__(session, name, input_size, score_threshold, nms_threshold)
        self._centers = {s: np.repeat(cell_grid(input_size, s) * s, self.num_anchors, axis=0) for s in self.strides}
        self._output_names = [o.name for o in session.get_outputs()]

    def _run(self, canvas: np.ndarray) -> dict[int, dict[int, np.ndarray]]:
        blob = canvas[:, :, ::-1].astype(np.float32)
        blob -= 127.5
        blob /= 128.0
        blob = np.ascontiguousarray(blob.transpose(2, 0, 1)[None])
        by_dim: dict[int, list[np.ndarray]] = {1: [], 4: [], 10: []}
        for out in self.session.run(self._output_names, {self.input_name: blob}):
            by_dim[out.shape[-1]].append(out.reshape(-1, out.shape[-1]))
        # {last dim: {stride: array}}; the output with most rows is stride 8
        return {dim: dict(zip(self.strides, sorted(arrays, key=lambda a: -a.shape[0]))) for dim, arrays in by_dim.items()}

    def _decode(self, g, s: int, thr: float):
        scores = g[1][s][:, 0]
        idx = np.nonzero(scores >= thr)[0]
        centers = self._centers[s][idx]
        d = g[4][s][idx] * s
        boxes = np.concatenate([centers - d[:, :2], centers + d[:, 2:]], axis=1)
        kps = g[10][s][idx].reshape(-1, 5, 2) * s + centers[:, None, :]
        return boxes, kps, scores[idx]
