"""Passive liveness (anti-spoofing) models. Each returns P(live) for a face box."""

from __future__ import annotations

import cv2
import numpy as np


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class MiniFasNet:
    """Silent-Face MiniFASNet (80x80): context crop of `scale` x the box; class 1 = real."""

    def __init__(self, session, name: str, scale: float, input_size: int = 80):
        self.session = session
        self.name = name
        self.scale = scale
        self.context_scale = scale  # how many face widths of the frame the model judges from
        self.input_size = input_size
        self.input_name = session.get_inputs()[0].name

    def crop(self, img: np.ndarray, box: np.ndarray) -> np.ndarray:
        """Upstream's CropImage: scale the box around its centre, capped to fit, shifted inside."""
        src_h, src_w = img.shape[:2]
        x, y = float(box[0]), float(box[1])
        bw, bh = max(1.0, float(box[2] - box[0])), max(1.0, float(box[3] - box[1]))
        scale = min((src_h - 1) / bh, (src_w - 1) / bw, self.scale)
        nw, nh = bw * scale, bh * scale
        cx, cy = x + bw / 2, y + bh / 2
        x1, y1, x2, y2 = cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2
        if x1 < 0:
            x2 -= x1
            x1 = 0
        if y1 < 0:
            y2 -= y1
            y1 = 0
        if x2 > src_w - 1:
            x1 -= x2 - src_w + 1
            x2 = src_w - 1
        if y2 > src_h - 1:
            y1 -= y2 - src_h + 1
            y2 = src_h - 1
        x1, y1, x2, y2 = (max(0, int(v)) for v in (x1, y1, x2, y2))
        patch = np.ascontiguousarray(img[y1 : y2 + 1, x1 : x2 + 1])  # `img` may be a turned view (pipeline.upright)
        return cv2.resize(patch, (self.input_size, self.input_size), interpolation=cv2.INTER_LINEAR)

    def score(self, img_bgr: np.ndarray, box: np.ndarray) -> float:
        patch = self.crop(img_bgr, box)
        x = np.ascontiguousarray(patch.transpose(2, 0, 1)[None].astype(np.float32))  # BGR, raw 0-255
        logits = self.session.run(None, {self.input_name: x})[0]
        return float(_softmax(logits)[0, 1])


class MiniFasNetSE128:
    """MiniFASNetV2-SE at 128 px (CelebA-Spoof): square 1.5x crop, reflect-padded; logits [real, spoof]."""

    def __init__(self, session, name: str, input_size: int = 128, crop_scale: float = 1.5):
        self.session = session
        self.name = name
        self.input_size = input_size
        self.crop_scale = crop_scale
        self.context_scale = crop_scale
        self.input_name = session.get_inputs()[0].name

    def crop(self, img: np.ndarray, box: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        side = max(float(box[2] - box[0]), float(box[3] - box[1])) * self.crop_scale
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        x1, y1 = int(round(cx - side / 2)), int(round(cy - side / 2))
        x2, y2 = x1 + int(round(side)), y1 + int(round(side))
        pad = [max(0, -y1), max(0, y2 - h), max(0, -x1), max(0, x2 - w)]
        patch = np.ascontiguousarray(img[max(0, y1) : min(h, y2), max(0, x1) : min(w, x2)])  # maybe a turned view
        if any(pad):
            patch = cv2.copyMakeBorder(patch, *pad, cv2.BORDER_REFLECT_101)
        ph, pw = patch.shape[:2]
        s = self.input_size / max(ph, pw)
        interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LANCZOS4
        patch = cv2.resize(patch, (max(1, round(pw * s)), max(1, round(ph * s))), interpolation=interp)
        ph, pw = patch.shape[:2]
        dy, dx = self.input_size - ph, self.input_size - pw
        if dy or dx:
            patch = cv2.copyMakeBorder(patch, dy // 2, dy - dy // 2, dx // 2, dx - dx // 2, cv2.BORDER_REFLECT_101)
        return patch

    def score(self, img_bgr: np.ndarray, box: np.ndarray) -> float:
        patch = self.crop(img_bgr, box)[:, :, ::-1]  # RGB
        x = np.ascontiguousarray(patch.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)
        logits = self.session.run(None, {self.input_name: x})[0]
        return float(_softmax(logits)[0, 0])


def liveness_box(box: np.ndarray) -> np.ndarray:
    """SCRFD/YuNet boxes reach further down the chin than the RetinaFace boxes the
    Silent-Face models were trained with; a square of the face's width with the
    top edge kept matches them best. On ../shared/faces/liveness this widens the
    real/spoof margin for every detector (SCRFD-500M: lowest real 0.85 -> 0.98,
    highest spoof 0.57 -> 0.36)."""
    x1, y1, x2, _ = (float(v) for v in box)
    return np.array([x1, y1, x2, y1 + (x2 - x1)], dtype=np.float32)


class MiniFasNetPair:
    """The Silent-Face pair (V2 at 2.7x, V1SE at 4.0x): mean of the two P(real)."""

    def __init__(self, v2: MiniFasNet, v1se: MiniFasNet, name: str = "minifasnet_pair"):
        self.models = (v2, v1se)
        self.name = name
        self.context_scale = max(v2.context_scale, v1se.context_scale)

    def member_scores(self, img_bgr: np.ndarray, box: np.ndarray) -> dict[str, float]:
        """Each member's P(real), on the liveness box."""
        b = liveness_box(box)
        return {m.name: m.score(img_bgr, b) for m in self.models}

    def score(self, img_bgr: np.ndarray, box: np.ndarray) -> float:
        return float(np.mean(list(self.member_scores(img_bgr, box).values())))
