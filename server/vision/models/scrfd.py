"""SCRFD face detector (insightface det_500m / det_2.5g): box + 5 landmarks."""

from __future__ import annotations

import threading

import numpy as np

from server.vision.models.detection import GridFaceDetector, cell_grid
from server.vision.models.runtime import PixelInput

MAX_GRIDS = 192  # anchor grids kept: 64 frame shapes' three strides


class ScrfdDetector(GridFaceDetector):
    """Anchor-free SCRFD with 3 strides and 2 anchors per cell; RGB, (x - 127.5) / 128.

    Outputs are identified by shape (last dim 1/4/10 = scores/boxes/landmarks;
    more rows = finer stride), so both published exports work regardless of
    output order.
    """

    num_anchors = 2
    pixels = PixelInput(mean=127.5, scale=1.0 / 128.0, rgb=True)
    tight_input = True  # fully convolutional: the input need not be square

    def __init__(self, session, name: str, input_size: int = 640, score_threshold: float = 0.5, nms_threshold: float = 0.4):
        super().__init__(session, name, input_size, score_threshold, nms_threshold)
        self._centers: dict[tuple[int, int, int], np.ndarray] = {}  # (h, w, stride) -> anchor centres, oldest first
        self._centers_lock = threading.Lock()
        self._output_names = [o.name for o in session.get_outputs()]

    def _anchor_centers(self, h: int, w: int, s: int) -> np.ndarray:
        key = (h, w, s)
        centers = self._centers.get(key)  # read once: another thread may drop the entry meanwhile
        if centers is None:
            centers = np.repeat(cell_grid(h, w, s) * s, self.num_anchors, axis=0)
            with self._centers_lock:
                # a few frame shapes in practice; callers choose theirs, so the oldest go (not all at once)
                while len(self._centers) >= MAX_GRIDS:
                    self._centers.pop(next(iter(self._centers)))
                self._centers[key] = centers
        return centers

    def _run(self, canvas: np.ndarray) -> dict:
        blob = canvas[None]  # the session makes the network's input from the pixels (`pixels`)
        by_dim: dict[int, list[np.ndarray]] = {1: [], 4: [], 10: []}
        for out in self.session.run(self._output_names, {self.input_name: blob}):
            by_dim[out.shape[-1]].append(out.reshape(-1, out.shape[-1]))
        # {last dim: {stride: array}}; the output with most rows is stride 8
        out = {dim: dict(zip(self.strides, sorted(arrays, key=lambda a: -a.shape[0]))) for dim, arrays in by_dim.items()}
        out["shape"] = canvas.shape[:2]
        return out

    def _decode(self, g, s: int, thr: float):
        scores = g[1][s][:, 0]
        idx = np.nonzero(scores >= thr)[0]
        centers = self._anchor_centers(*g["shape"], s)[idx]
        d = g[4][s][idx] * s
        boxes = np.concatenate([centers - d[:, :2], centers + d[:, 2:]], axis=1)
        kps = g[10][s][idx].reshape(-1, 5, 2) * s + centers[:, None, :]
        return boxes, kps, scores[idx]
