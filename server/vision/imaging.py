"""Turn an `Image` (encoded bytes or a raw frame) into a BGR uint8 array, safely.

The header is read first (Pillow parses only the header, lazily) so a tiny
file that claims 30 000 x 30 000 pixels is refused before any pixel buffer is
allocated; only then does OpenCV decode it (applying EXIF orientation).

Decoding is bounded in CPU as well as in pixels. A progressive JPEG is
decoded once per scan, so its scans are counted from its markers first and a
file with more than any encoder writes is refused; and every decode charges
its pixels to the request's `PixelBudget`, so a batch of small decompression
bombs cannot add up to seconds of work.
"""

from __future__ import annotations

import io
import re
import threading
import time
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image as PILImage

from server import errors

# We enforce our own pixel limit below; disable Pillow's bomb heuristics so
# its warning/exception do not pre-empt our clear error.
PILImage.MAX_IMAGE_PIXELS = None
# A file OpenCV cannot decode is answered INVALID_IMAGE and logged by the server's rules (a batch's
# failing items at DEBUG); OpenCV's own line for it went to stderr, one per bad image, unthrottled.
# This silences OpenCV's log in the whole process: its failures reach the server as exceptions or
# empty results, which the server answers and logs.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_FATAL)

SUPPORTED_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
CHANNELS = {"BGR": 3, "RGB": 3, "GRAY": 1}


# A scan costs about a millisecond per megapixel to decode: a large image gets fewer scans so that
# no JPEG's scans cost more than this many pixel-scans (40 Mpix keeps the 10 of libjpeg's progression).
JPEG_SCAN_WORK = 400_000_000
MIN_JPEG_SCANS = 10
PIXELS_PER_BYTE = 48  # a request's pixel budget grows with what it sent: real photos stay far below this
# Detector passes are the other cost: every image is detected at the detector's own size however
# small it was sent, so a request may run at least MIN_PASSES of them, and one more per
# BYTES_PER_PASS it sent (real photos are larger than that; a 60-byte blank WebP is not).
MIN_PASSES, BYTES_PER_PASS = 16, 25 * 1024
PASS_PIXELS = 1_500_000  # a detector pass also costs about as much CPU as decoding this many pixels
# A stream's budget refills by this many floors a second: 32 detector passes, one a frame for a 30 fps
# camera whose small frames (a 250 x 250 JPEG is 10 KB) pay for almost none with their bytes, and
# 96 M pixels. At two thirds of a floor, such a camera lost a third of its frames to IMAGE_TOO_LARGE.
# A stream runs its frames one at a time, so this bounds a trickle of bombs to about a tenth of a core.
STREAM_REFILL = 2.0
# Refill a stream has not used piles up to this many floors at most, so a stream kept open with a
# frame now and then cannot save an hour's refill for one burst.
REFILL_CAP = 2.0
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type
# An image of more than FREE_PIXELS may decode to at most this many pixels per byte of its file. A
# photo is a few to a few hundred (deflate cannot pack 8-bit RGB tighter than about 340); a lossless
# WebP or RLE bitmap of one colour packs tens of millions of pixels into under a kilobyte, and every
# such request would buy a full-size decode for nothing a face needs.
MAX_PIXELS_PER_IMAGE_BYTE = 2000
FREE_PIXELS = 4_000_000


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 16_384
    max_jpeg_scans: int = 32
    max_request_pixels: int = 48_000_000

    def budget(self, request_bytes: int = 0) -> "PixelBudget":
        """A unary request's: what it may decode and detect is fixed by what it sent."""
        return PixelBudget(self.max_request_pixels, MIN_PASSES).received(request_bytes)

    def stream_budget(self, clock=time.monotonic) -> "PixelBudget":
        """A StreamFrames call's, for its whole life: it grows with the bytes received and refills by
        STREAM_REFILL floors a second, so a camera's frames pass and a trickle of tiny bombs does not.
        (A batch item is a request of its own, with a request's budget.)"""
        return PixelBudget(self.max_request_pixels, MIN_PASSES, refill=STREAM_REFILL, clock=clock)


class PixelBudget:
    """What one request (or one stream) may still cost: decoded pixels and detector passes. Each
    decode is charged before it runs, with its first pass; extra passes are paid as they come."""

    def __init__(self, pixels: int, passes: int, refill: float = 0.0, clock=time.monotonic):
        self.floor_pixels, self.floor_passes = pixels, passes
        self.bytes = self.spent_pixels = self.spent_passes = 0
        self.refill = refill  # share of the floors given back each second
        self._clock, self._last = clock, clock()
        self._granted = 0.0  # floors of refill given so far (what is unused capped at REFILL_CAP)
        self._lock = threading.Lock()

    def received(self, nbytes: int) -> "PixelBudget":
        """A message arrived: the bytes it carried raise both limits."""
        with self._lock:
            self.bytes += nbytes
        return self

    def _fits(self, pixels: int, passes: int) -> bool:
        base_pixels = max(self.floor_pixels, PIXELS_PER_BYTE * self.bytes)
        base_passes = max(self.floor_passes, self.bytes // BYTES_PER_PASS)
        if self.refill:
            now = self._clock()
            self._granted += self.refill * (now - self._last)
            self._last = now
            used = max(
                0.0, (self.spent_pixels - base_pixels) / self.floor_pixels, (self.spent_passes - base_passes) / self.floor_passes
            )
            self._granted = min(self._granted, used + REFILL_CAP)
        pixel_limit = base_pixels + self._granted * self.floor_pixels
        pass_limit = base_passes + self._granted * self.floor_passes
        return self.spent_pixels + pixels <= pixel_limit and self.spent_passes + passes <= pass_limit

    def try_charge(self, pixels: int = 0, passes: int = 1) -> bool:
        """Charge optional work (an extra detector pass): False, and nothing charged, when it would overdraw."""
        pixels += passes * PASS_PIXELS
        with self._lock:
            if not self._fits(pixels, passes):
                return False
            self.spent_pixels += pixels
            self.spent_passes += passes
            return True

    def charge(self, pixels: int, field: str) -> None:
        """Charge a decode and its first detector pass, or refuse the image (IMAGE_TOO_LARGE)."""
        if not self.try_charge(pixels, 1):
            raise errors.image_too_large(
                f"{field}: the request's images need more decoding and detection than its bytes pay for "
                f"(at least {self.floor_pixels} pixels, {self.floor_passes} detector passes; max_request_pixels); "
                "send fewer or smaller images per request",
                field=field,
                max_request_pixels=self.floor_pixels,
            )


_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker, not stuffing, a restart or fill


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """Start-of-scan markers of the JPEG's main image, found by walking its segments (so a thumbnail
    inside an APP segment is skipped whole); counting stops past `stop_after`."""
    n, i, end = 0, 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:  # bytes between segments: on to the next marker
            m = _NEXT_MARKER.search(data, i)
            if m is None:
                break
            i = m.start()
            continue
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD7 or marker in (0x00, 0x01, 0xD8):  # FF 00 between segments is junk to libjpeg
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:
            n += 1
            if n > stop_after:
                break
            m = _NEXT_MARKER.search(data, i + 2 + length)  # skip the entropy-coded data
            if m is None:
                break
            i = m.start()
            continue
        i += 2 + max(length, 2)
    return n


def png_weight(data: bytes) -> float:
    """How much more a PNG's pixels cost to decode than 8-bit RGB ones: 16-bit samples, alpha and
    interlacing (seven passes) each add work that the pixel count alone does not show."""
    if len(data) < 29 or data[12:16] != b"IHDR":
        return 1.0
    depth, colour, interlace = data[24], data[25], data[28]
    per_pixel = PNG_CHANNELS.get(colour, 4) * max(depth, 8) / 8
    return max(1.0, per_pixel / 3) * (2.5 if interlace else 1.0)


# The PNG chunks the probe and the decoder see: the image itself (header, palette, transparency, data,
# end) and the EXIF orientation. libpng inflates every compressed text chunk (zTXt, iTXt) and ICC
# profile (iCCP) it meets, after the image data too, where a header probe never looks, and holds each
# (up to 8 MB) until the decode ends; Pillow's probe inflates those before the data. Nothing here
# reads them.
PNG_KEPT_CHUNKS = frozenset((b"IHDR", b"PLTE", b"tRNS", b"IDAT", b"IEND", b"eXIf"))
# No encoder splits a 20 MB PNG into more chunks than this (image data comes in pieces of 8 KB or
# more); walking millions of empty ones would cost seconds of Python.
MAX_PNG_CHUNKS = 100_000
# The EXIF block a JPEG can carry (one APP1 segment) and cameras fit theirs in. OpenCV copies every
# entry of a PNG's eXIf whatever its size: thousands of entries of a megabyte each cost as many copies.
MAX_EXIF_BYTES = 65_533
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _animated(fmt: str) -> errors.FaceServiceError:
    """An animation's refusal: a decoder sizes every frame's canvas; one still frame is what a face needs."""
    return errors.invalid_image(f"animated {fmt} is not supported: send one frame", format=fmt)


def png_essentials(data: bytes) -> bytes:
    """The PNG with only its PNG_KEPT_CHUNKS (the first eXIf, when it is no larger than MAX_EXIF_BYTES),
    each copied as it was (CRC included); INVALID_IMAGE for an animated PNG (refused as in decode_encoded),
    and for a file that does not begin with its header or ends before its end chunk, which the decoder
    would refuse after a line of its own to stderr."""
    kept, i, end, n = [_PNG_SIGNATURE], len(_PNG_SIGNATURE), len(data), 0
    exif = False
    while i + 8 <= end:
        n += 1
        if n > MAX_PNG_CHUNKS:
            raise errors.invalid_image(f"the PNG has more than {MAX_PNG_CHUNKS} chunks; no encoder writes that many")
        length, kind = int.from_bytes(data[i : i + 4], "big"), data[i + 4 : i + 8]
        stop = i + 12 + length
        if stop > end:
            break
        if n == 1 and kind != b"IHDR":
            raise errors.invalid_image("corrupt png data: the file does not begin with its header (IHDR)", format="PNG")
        if kind == b"acTL":  # an animation's control chunk, which the probe would no longer see
            raise _animated("PNG")
        if kind == b"eXIf":
            if not exif and length <= MAX_EXIF_BYTES:
                kept.append(data[i:stop])
            exif = True
        elif kind in PNG_KEPT_CHUNKS:
            kept.append(data[i:stop])
        if kind == b"IEND":
            return b"".join(kept)
        i = stop
    raise errors.invalid_image("corrupt png data: the file ends before its end chunk (IEND)", format="PNG")


def _check_jpeg_scans(data: bytes, width: int, height: int, limits: ImageLimits) -> None:
    allowed = max(MIN_JPEG_SCANS, min(limits.max_jpeg_scans, JPEG_SCAN_WORK // max(1, width * height)))
    scans = jpeg_scans(data, allowed)
    # Should the walk ever read a file otherwise than libjpeg does, scans hidden from it still show
    # as bytes: beside the main image's, only thumbnails and previews (a few scans each) hold any.
    if scans <= allowed and data.count(b"\xff\xda") > 2 * allowed + 16:
        scans = allowed + 1
    if scans > allowed:
        raise errors.invalid_image(
            f"the JPEG has more than {allowed} scans; no camera or encoder writes that many for a {width}x{height} image",
            max_scans=allowed,
        )


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


def decode_encoded(data: bytes, limits: ImageLimits, budget: PixelBudget | None = None, field: str = "image") -> np.ndarray:
    """Decode JPEG/PNG/WebP/BMP bytes into a BGR array, or raise a FaceServiceError."""
    if len(data) > limits.max_bytes:
        raise errors.image_too_large(
            f"encoded image is {len(data)} bytes; the limit is {limits.max_bytes}", size=len(data), max_bytes=limits.max_bytes
        )
    if data.startswith(_PNG_SIGNATURE):
        data = png_essentials(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PILImage.open(io.BytesIO(data)) as probe:
                fmt, (width, height) = probe.format, probe.size
                animated = fmt in ("PNG", "WEBP") and getattr(probe, "n_frames", 1) > 1
    except Exception as exc:  # Pillow raises many types for garbage input
        raise errors.invalid_image(f"not a decodable image ({type(exc).__name__})") from None
    if fmt not in SUPPORTED_FORMATS:
        raise errors.invalid_image(f"unsupported image format {fmt}; send JPEG, PNG, WebP or BMP", format=fmt)
    if animated:
        raise _animated(fmt)
    cost = width * height
    if fmt == "PNG":
        cost = int(cost * png_weight(data))
        if cost > limits.max_pixels:
            raise errors.image_too_large(
                f"a {width}x{height} PNG with 16-bit, alpha or interlaced pixels costs as much to decode as {cost} "
                f"pixels; the limit is {limits.max_pixels}",
                width=width,
                height=height,
                max_pixels=limits.max_pixels,
            )
    _check_dims(width, height, limits)
    if width * height > max(FREE_PIXELS, MAX_PIXELS_PER_IMAGE_BYTE * len(data)):
        raise errors.image_too_large(
            f"a {len(data)}-byte {SUPPORTED_FORMATS[fmt]} that decodes to {width}x{height} pixels; an image of more "
            f"than {FREE_PIXELS} pixels may hold at most {MAX_PIXELS_PER_IMAGE_BYTE} per byte of its file, which "
            "no photo comes near",
            width=width,
            height=height,
            size=len(data),
            max_pixels_per_byte=MAX_PIXELS_PER_IMAGE_BYTE,
        )
    if fmt in ("JPEG", "MPO"):
        _check_jpeg_scans(data, width, height, limits)
    if budget is not None:
        budget.charge(cost, field)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error:
        img = None
    if img is None or img.size == 0:
        raise errors.invalid_image(f"corrupt {SUPPORTED_FORMATS[fmt]} data: the decoder could not read the pixels", format=fmt)
    return img


def decode_raw(
    width: int,
    height: int,
    pixel_format: str,
    data: bytes,
    row_stride: int,
    limits: ImageLimits,
    field: str = "image",
    budget: PixelBudget | None = None,
) -> np.ndarray:
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
    if budget is not None:
        budget.charge(width * height, field)
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
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    # Area averaging keeps a large downscale free of aliasing, but OpenCV's INTER_AREA is fast only
    # for whole factors and costs several times more for any other. So: average by the whole factor
    # k (the frame trimmed by under k pixels to a multiple of it), then interpolate the remaining
    # factor, under 2, where linear interpolation does not alias. The detector finds the same faces
    # either way (boxes IoU >= 0.99 on the dev portraits and LFW pasted into 1080p and 4K frames).
    k = min(h // th, w // tw)
    if k >= 2:
        img = cv2.resize(img[: h - h % k, : w - w % k], ((w - w % k) // k, (h - h % k) // k), interpolation=cv2.INTER_AREA)
    return cv2.resize(img, (tw, th), interpolation=cv2.INTER_LINEAR), scale
