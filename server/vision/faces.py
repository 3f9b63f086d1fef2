"""Plain data types shared by the models, the pipeline and the servicer."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Quality:
    """Heuristic usability of a face for recognition (see quality.py)."""

    score: float
    face_size: float
    sharpness: float
    brightness: float
    yaw: float
    pitch: float
    roll: float


@dataclass
class Face:
    """One detected face in original-image pixel coordinates.

    `box` is (x1, y1, x2, y2); `landmarks` is a (5, 2) array ordered left eye,
    right eye, nose, left mouth corner, right mouth corner (as seen in the
    image). Per-face models attach their results to the same object.
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float
    quality: Quality | None = None
    aligned: np.ndarray | None = field(default=None, repr=False)  # 112x112 BGR crop
    embedding: np.ndarray | None = field(default=None, repr=False)
    attributes: dict = field(default_factory=dict)
    orientation: int = 0  # degrees the image was turned counter-clockwise for this face to be found upright  # per-face models' results by attribute name (age, gender, ...)

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    def clipped_area(self, image_w: int, image_h: int) -> float:
        x1, y1, x2, y2 = self.box
        w = max(0.0, min(x2, image_w) - max(x1, 0.0))
        h = max(0.0, min(y2, image_h) - max(y1, 0.0))
        return float(w * h)


@dataclass
class LivenessResult:
    is_live: bool
    score: float
    threshold: float
    model_scores: dict[str, float]
    reason: str = ""  # FACE_TOO_CLOSE / FACE_TOO_SMALL when the models could not judge (then is_live is False)
    hint: str = ""
