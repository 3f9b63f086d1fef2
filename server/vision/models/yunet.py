"""YuNet face detector (OpenCV Zoo, 2023mar): box + 5 landmarks, fixed 640x640 input."""

from __future__ import annotations

import numpy as np

from server.vision.models.detection import GridFaceDetector, cell_grid
from server.vision.models.runtime import PixelInput


class YunetDetector(GridFaceDetector):
    """One anchor per cell; BGR raw 0-255; score = sqrt(cls * obj)."""

    pixels = PixelInput()  # BGR, 0-255, as floats

    def __init__(self, session, name: str, input_size: int = 640, score_threshold: float = 0.6, nms_threshold: float = 0.3):
        super().__init__(session, name, input_size, score_threshold, nms_threshold)
        self._grid = {s: cell_grid(input_size, input_size, s) for s in self.strides}
        self._output_names = [f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in self.strides]

    def _run(self, canvas: np.ndarray) -> dict[str, np.ndarray]:
        outputs = self.session.run(self._output_names, {self.input_name: canvas[None]})  # pixels in (`pixels`)
        return dict(zip(self._output_names, outputs))

    def _decode(self, outs, s: int, thr: float):
        scores = np.sqrt(np.clip(outs[f"cls_{s}"].reshape(-1), 0, 1) * np.clip(outs[f"obj_{s}"].reshape(-1), 0, 1))
        idx = np.nonzero(scores >= thr)[0]
        grid = self._grid[s][idx]
        bb = outs[f"bbox_{s}"].reshape(-1, 4)[idx]
        centers = (grid + bb[:, :2]) * s
        wh = np.exp(bb[:, 2:]) * s
        boxes = np.concatenate([centers - wh / 2, centers + wh / 2], axis=1)
        kps = (outs[f"kps_{s}"].reshape(-1, 5, 2)[idx] + grid[:, None, :]) * s
        return boxes, kps, scores[idx]
