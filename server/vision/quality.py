"""Heuristic face quality: size, sharpness, brightness and pose from the 5 landmarks.

Cheap (a few hundred microseconds on the aligned crop) and explainable; not a
learned quality model. The overall score is the product of a size factor, a
sharpness factor and a pose factor, each in [0, 1].
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from server.vision.faces import Quality

FULL_QUALITY_SIZE = 80.0  # px: faces at least this large get size factor 1
SHARPNESS_HALF = 100.0  # Laplacian variance that maps to sharpness 0.5
_TEMPLATE_NOSE_T = 0.494  # nose position between eye line (0) and mouth line (1) on a frontal face


def estimate_pose(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from eye, nose and mouth positions."""
    le, re, nose, ml, mr = landmarks.astype(np.float64)
    roll = math.degrees(math.atan2(re[1] - le[1], re[0] - le[0]))
    # De-rotate so the eye line is horizontal, then compare the nose with the
    # eye/mouth midpoints.
    c, s = math.cos(-math.radians(roll)), math.sin(-math.radians(roll))
    rot = np.array([[c, -s], [s, c]])
    le, re, nose, ml, mr = (rot @ p for p in (le, re, nose, ml, mr))
    eye_mid = (le + re) / 2
    mouth_mid = (ml + mr) / 2
    iod = max(np.linalg.norm(re - le), 1e-6)
    yaw = math.degrees(math.asin(float(np.clip(2.0 * (nose[0] - eye_mid[0]) / iod, -1, 1))))
    span = mouth_mid[1] - eye_mid[1]
    t = (nose[1] - eye_mid[1]) / span if abs(span) > 1e-6 else _TEMPLATE_NOSE_T
    pitch = math.degrees(math.asin(float(np.clip(2.5 * (t - _TEMPLATE_NOSE_T), -1, 1))))
    return yaw, pitch, roll


def assess(box: np.ndarray, landmarks: np.ndarray, aligned_bgr: np.ndarray) -> Quality:
    face_size = float(min(box[2] - box[0], box[3] - box[1]))
    gray = cv2.cvtColor(aligned_bgr, cv2.COLOR_BGR2GRAY)
    lap_var = float(cv2.Laplacian(gray, cv2.CV_32F).var())
    sharpness = lap_var / (lap_var + SHARPNESS_HALF)
    brightness = float(gray.mean()) / 255.0
    yaw, pitch, roll = estimate_pose(landmarks)
    size_factor = min(1.0, max(0.0, face_size / FULL_QUALITY_SIZE))
    sharp_factor = min(1.0, sharpness / 0.5)
    pose_factor = max(0.0, math.cos(math.radians(yaw))) * max(0.0, math.cos(math.radians(pitch)))
    return Quality(
        score=size_factor * sharp_factor * pose_factor,
        face_size=face_size,
        sharpness=sharpness,
        brightness=brightness,
        yaw=yaw,
        pitch=pitch,
        roll=roll,
    )
