"""Similarity-transform face alignment from the 5 detector landmarks."""

from __future__ import annotations

import cv2
import numpy as np

# ArcFace 112x112 template (insightface): eyes, nose, mouth corners.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

# dlib's mean face (get_face_chip_details) reduced to our 5 points, in [0, 1]:
# eye centres = mean of the 6 eye contour points, nose tip = point 30, mouth
# corners = points 48 and 54.
DLIB_5POINT_TEMPLATE = np.array(
    [[0.225492, 0.215990], [0.754761, 0.215990], [0.490127, 0.515625], [0.254149, 0.780233], [0.726104, 0.780233]],
    dtype=np.float32,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """2x3 similarity transform mapping `src` points onto `dst` (least median of squares)."""
    m, _ = cv2.estimateAffinePartial2D(src.astype(np.float32), dst, method=cv2.LMEDS)
    if m is None:  # degenerate landmarks (collinear/duplicated): fall back to least squares
        m, _ = cv2.estimateAffinePartial2D(src.astype(np.float32), dst, method=0)
    if m is None:
        raise ValueError("cannot align face: degenerate landmarks")
    return m


def warp(img: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(img, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def arcface_crop(img: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The ArcFace-aligned size x size crop used by the recognizers."""
    template = ARCFACE_TEMPLATE * (size / 112.0)
    return warp(img, similarity_transform(landmarks, template), size)


def dlib_chip(img: np.ndarray, landmarks: np.ndarray, size: int, padding: float) -> np.ndarray:
    """Approximates dlib's extract_image_chip(get_face_chip_details(shape, size, padding))."""
    template = (DLIB_5POINT_TEMPLATE + padding) / (1 + 2 * padding) * size
    return warp(img, similarity_transform(landmarks, template.astype(np.float32)), size)
