"""Everything a caller may hold an image as, turned into the proto Image message.

Accepted: a path (str or PathLike), encoded bytes (JPEG/PNG/WebP/BMP), a
base64 string or a data URL ("data:image/jpeg;base64,..." as browsers and the
older web clients send), a numpy array (H x W x 3 BGR as OpenCV gives, or
H x W gray; sent raw, no encoding), or an Image message as it is.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path

from facesvc.v1 import face_service_pb2 as pb

_B64 = re.compile(r"[A-Za-z0-9+/=\s_-]+")


def to_image(value, *, pixel_format: str = "bgr") -> pb.Image:
    if isinstance(value, pb.Image):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return pb.Image(encoded=bytes(value))
    if isinstance(value, os.PathLike):
        return pb.Image(encoded=Path(value).read_bytes())
    if isinstance(value, str):
        return pb.Image(encoded=_str_bytes(value))
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return _raw(value, pixel_format)
    raise TypeError(
        f"cannot send {type(value).__name__} as an image: pass a path, bytes, a base64 string, a data URL or a numpy array"
    )


def _str_bytes(s: str) -> bytes:
    if s.startswith("data:"):
        header, _, data = s.partition(",")
        if ";base64" not in header:
            raise ValueError("only base64 data URLs carry images")
        return base64.b64decode(data)
    if os.path.exists(s):
        return Path(s).read_bytes()
    if len(s) > 256 and _B64.fullmatch(s):
        try:
            return base64.b64decode(s.replace("-", "+").replace("_", "/"), validate=False)
        except binascii.Error as exc:
            raise ValueError(f"not valid base64: {exc}") from None
    raise FileNotFoundError(f"{s!r} is neither a file nor base64 image data")


def _raw(a, pixel_format: str) -> pb.Image:
    import numpy as np

    a = np.ascontiguousarray(a)
    if a.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {a.dtype}")
    if a.ndim == 2:
        fmt = pb.PIXEL_FORMAT_GRAY
    elif a.ndim == 3 and a.shape[2] == 3:
        fmt = {"bgr": pb.PIXEL_FORMAT_BGR, "rgb": pb.PIXEL_FORMAT_RGB}[pixel_format.lower()]
    else:
        raise ValueError(f"frames must be H x W x 3 or H x W, got shape {a.shape}")
    return pb.Image(raw=pb.RawFrame(width=a.shape[1], height=a.shape[0], format=fmt, data=a.tobytes()))
