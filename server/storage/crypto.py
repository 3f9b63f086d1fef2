"""Sealing aligned face crops with AES-256-GCM, so faces can be re-embedded when the recognizer changes.

A crop is stored only when a key is configured (FACESVC_CROP_KEY, 32 random
bytes in base64); without one no image is kept at all. A sealed crop is
`b"FC1" + key fingerprint (4 bytes) + nonce (12) + ciphertext+tag`, and the
face id is the associated data, so a ciphertext copied onto another face row
does not decrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os

import cv2
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"FC1"


def generate_key() -> str:
    """A new key in the form FACESVC_CROP_KEY expects."""
    return base64.b64encode(os.urandom(32)).decode()


class CropCipher:
    def __init__(self, key_b64: str):
        try:
            key = base64.b64decode(key_b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                "crop key must be base64 (python -c 'from server.storage.crypto import generate_key; print(generate_key())')"
            ) from None
        if len(key) != 32:
            raise ValueError(f"crop key must be 32 bytes (AES-256), got {len(key)}")
        self._aead = AESGCM(key)
        self.fingerprint = hashlib.sha256(b"facesvc-crop-key:" + key).digest()[:4]

    def seal(self, crop_bgr: np.ndarray, face_id: str) -> bytes:
        ok, png = cv2.imencode(".png", crop_bgr)  # lossless: re-embedding sees exactly these pixels
        if not ok:
            raise ValueError("could not encode the face crop")
        nonce = os.urandom(12)
        return MAGIC + self.fingerprint + nonce + self._aead.encrypt(nonce, png.tobytes(), face_id.encode())

    def open(self, sealed: bytes, face_id: str) -> np.ndarray:
        if sealed[:3] != MAGIC:
            raise ValueError("not a sealed face crop")
        if sealed[3:7] != self.fingerprint:
            raise ValueError("the crop was sealed with a different key")
        nonce, ct = sealed[7:19], sealed[19:]
        try:
            png = self._aead.decrypt(nonce, ct, face_id.encode())
        except InvalidTag:
            raise ValueError(f"crop of face {face_id} failed authentication (tampered or wrong face id)") from None
        img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError("decrypted crop is not an image")
        return img
