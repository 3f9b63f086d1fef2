"""dlib age (81-class distribution) and gender (2-class) models on dlib-style face chips."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.vision.alignment import dlib_chip
from server.vision.models.runtime import padded_rows

_MEAN_RGB = np.array([122.782, 117.001, 104.298], dtype=np.float32)
AGE_BINS = np.array([0.25] + list(range(1, 81)), dtype=np.float32)  # 81 classes


@dataclass(frozen=True)
class AgeEstimate:
    age: float  # expected value, years
    low: float  # 10th percentile
    high: float  # 90th percentile


def _chips(img_bgr: np.ndarray, landmarks: list[np.ndarray], size: int, padding: float) -> np.ndarray:
    chips = [dlib_chip(img_bgr, lm, size, padding)[:, :, ::-1] for lm in landmarks]  # RGB
    x = (np.stack(chips).astype(np.float32) - _MEAN_RGB) / 256.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class AgeEstimator:
    attribute = "age"  # what annotate() adds to each Face: AgeEstimate

    def annotate(self, img_bgr: np.ndarray, faces: list) -> None:
        """The pipeline's per-face model call: each face gets its age estimate."""
        for face, (age, low, high) in zip(faces, self.estimate(img_bgr, [f.landmarks for f in faces])):
            face.attributes[self.attribute] = AgeEstimate(age, low, high)

    def __init__(self, session, name: str, input_size: int = 64, chip_padding: float = 0.2):
        self.session, self.name, self.input_size, self.padding = session, name, input_size, chip_padding
        self.input_name = session.get_inputs()[0].name

    def estimate(self, img_bgr: np.ndarray, landmarks: list[np.ndarray]) -> list[tuple[float, float, float]]:
        """Per face: (expected age, 10th percentile, 90th percentile) in years."""
        if not landmarks:
            return []
        chips = padded_rows(self.session, _chips(img_bgr, landmarks, self.input_size, self.padding))
        probs = self.session.run(None, {self.input_name: chips})[0][: len(landmarks)]
        out = []
        for p in probs:
            p = p / p.sum()
            cdf = np.cumsum(p)
            low = float(AGE_BINS[min(np.searchsorted(cdf, 0.1), len(AGE_BINS) - 1)])
            high = float(AGE_BINS[min(np.searchsorted(cdf, 0.9), len(AGE_BINS) - 1)])
            age = float(p @ AGE_BINS)
            out.append((age, min(low, age), max(high, age)))
        return out


class GenderClassifier:
    # Output columns of the dlib gender network are [female, male] (checked on labelled photos; see tests).
    MALE_INDEX = 1
    attribute = "gender"  # what annotate() adds to each Face: P(male)

    def annotate(self, img_bgr: np.ndarray, faces: list) -> None:
        """The pipeline's per-face model call: each face gets P(male)."""
        for face, p_male in zip(faces, self.classify(img_bgr, [f.landmarks for f in faces])):
            face.attributes[self.attribute] = p_male

    def __init__(self, session, name: str, input_size: int = 32, chip_padding: float = 0.2):
        self.session, self.name, self.input_size, self.padding = session, name, input_size, chip_padding
        self.input_name = session.get_inputs()[0].name

    def classify(self, img_bgr: np.ndarray, landmarks: list[np.ndarray]) -> list[float]:
        """Per face: P(male)."""
        if not landmarks:
            return []
        chips = padded_rows(self.session, _chips(img_bgr, landmarks, self.input_size, self.padding))
        probs = self.session.run(None, {self.input_name: chips})[0][: len(landmarks)]
        return [float(p[self.MALE_INDEX] / p.sum()) for p in probs]
