"""Turn an `Image` (encoded bytes or a raw frame) into a BGR uint8 array, safely.

The header is read first (Pillow parses only the header, lazily) so a tiny
file that claims 30 000 x 30 000 pixels is refused before any pixel buffer is
allocated; only then does OpenCV decode it (applying EXIF orientation).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image as PILImage

from server import errors

# We enforce our own pixel limit below; disable Pillow's bomb heuristics so
# its warning/exception do not pre-empt our clear error.
PILImage.MAX_IMAGE_PIXELS = None

SUPPORTED_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
CHANNELS = {"BGR": 3, "RGB": 3, "GRAY": 1}


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 16_384


def _check_dims(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise errors.invalid_image(f"image has no pixels ({width}x{height})")
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise errors.image_too_large(
            f"image is {width}x{height}; the limit is {limits.max_pixels} pixels and {limits.max_side} px per side",
            width=width,
            height=height,
            max_pixels=limits.max_pixels,
            max_side=limits.max_side,
        )


def decode_encoded(data: bytes, limits: ImageLimits) -> np.ndarray:
    """Decode JPEG/PNG/WebP/BMP bytes into a BGR array, or raise a FaceServiceError."""
    if len(data) > limits.max_bytes:
        raise errors.image_too_large(
            f"encoded image is {len(data)} bytes; the limit is {limits.max_bytes}", size=len(data), max_bytes=limits.max_bytes
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PILImage.open(io.BytesIO(data)) as probe:
                fmt, (width, height) = probe.format, probe.size
    except Exception as exc:  # Pillow raises many types for garbage input
        raise errors.invalid_image(f"not a decodable image ({type(exc).__name__})") from None
    if fmt not in SUPPORTED_FORMATS:
        raise errors.invalid_image(f"unsupported image format {fmt}; send JPEG, PNG, WebP or BMP", format=fmt)
    _check_dims(width, height, limits)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise errors.invalid_image(f"corrupt {SUPPORTED_FORMATS[fmt]} data: the decoder could not read the pixels", format=fmt)
    return img


def decode_raw(width: int, height: int, pixel_format: str, data: bytes, row_stride: int, limits: ImageLimits,
               field: str = "image") -> np.ndarray:
    """Wrap a raw frame's bytes as a BGR array (copying only when needed)."""
    if pixel_format not in CHANNELS:
        raise errors.validation(f"{field}.raw.format", f"pixel format must be BGR, RGB or GRAY, not {pixel_format}")
    if width == 0 or height == 0:
        raise errors.validation(f"{field}.raw", "width and height must be > 0", width=width, height=height)
    _check_dims(width, height, limits)
    channels = CHANNELS[pixel_format]
    packed = width * channels
    stride = row_stride or packed
    if stride < packed:
        raise errors.validation(f"{field}.raw.row_stride", f"row_stride {stride} is less than width x channels = {packed}")
    expected = stride * height
    if len(data) != expected:
        raise errors.invalid_image(
            f"raw frame buffer is {len(data)} bytes; {width}x{height} {pixel_format} with row stride {stride} needs {expected}",
            expected_bytes=expected,
            actual_bytes=len(data),
        )
    arr = np.frombuffer(data, dtype=np.uint8).reshape(height, stride)[:, :packed]
    if pixel_format == "GRAY":
        return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_GRAY2BGR)
    arr = arr.reshape(height, width, 3)
    if pixel_format == "RGB":
        return cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    return np.ascontiguousarray(arr)


def resize_long_side(img: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Downscale so the long side is at most `max_side`; return (image, scale)."""
    h, w = img.shape[:2]
    long_side = max(h, w)
    if long_side <= max_side:
        return img, 1.0
    scale = max_side / long_side
    resized = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return resized, scale
