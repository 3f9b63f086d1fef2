"""Fuzzing the image decode and request validation paths with hypothesis (10 000+ generated cases).

In process: every generated Image (random bytes, mutated real JPEG/PNG files,
lying PNG headers, random raw frames) either decodes to a sane BGR array or
fails with INVALID_ARGUMENT and one of the documented reasons; same for ids,
metadata, page tokens and face options. Over gRPC: generated junk requests to
a live server all get INVALID_ARGUMENT with a reason, and the server keeps
answering real requests. A hang fails the example (per-example deadline).
"""

from __future__ import annotations

import struct
import zlib

import cv2
import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from server import errors
from server.rpc import convert, validate
from server.vision.imaging import ImageLimits
from tests.conftest import error_info, face_path

LIMITS = ImageLimits(max_bytes=2 * 1024 * 1024, max_pixels=4_000_000)
IMAGE_REASONS = {errors.INVALID_IMAGE, errors.IMAGE_TOO_LARGE, errors.VALIDATION_FAILED}
# No per-example deadline: these tests look for crashes and wrong errors, not for speed, and on a
# loaded 2-core machine a 4 MP decode once passed 2 s and failed the run. What decoding may cost
# is bounded by ImageLimits and measured in CPU seconds by tests/test_hardening.py.
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], database=None)

_small = cv2.resize(cv2.imread(str(face_path("dev/img1.jpg"))), (96, 128))
SEEDS = [cv2.imencode(ext, _small)[1].tobytes() for ext in (".jpg", ".png", ".webp", ".bmp")]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=64))
        elif data:
            data[i : i + 16] = bytes(len(data[i : i + 16]))
    return bytes(data)


encoded_images = st.one_of(
    st.binary(max_size=4096),
    mutated(),
    st.builds(png_claiming, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.sampled_from(
        [b"", b"\xff\xd8", b"\xff\xd8\xff\xe0" + b"\0" * 32, b"GIF89a", b"RIFF\0\0\0\0WEBPVP8 ", b"BM" + b"\xff" * 60]
    ),
).map(lambda b: pb.Image(encoded=b))

raw_images = st.builds(
    lambda w, h, fmt, stride, n: pb.Image(raw=pb.RawFrame(width=w, height=h, format=fmt, row_stride=stride, data=b"\x80" * n)),
    st.integers(0, 3000),
    st.integers(0, 3000),
    st.integers(0, 6),
    st.integers(0, 10000),
    st.one_of(st.integers(0, 4096), st.sampled_from([0, 1, 12, 300, 3 * 16 * 16, 16 * 16])),
)


def check_image(msg: pb.Image) -> None:
    try:
        img = convert.image_from_proto(msg, "image", LIMITS)
    except errors.FaceServiceError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT and exc.reason in IMAGE_REASONS, exc
        assert exc.message
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.size > 0
    assert img.shape[0] * img.shape[1] <= LIMITS.max_pixels


@given(encoded_images)
@settings(FAST, max_examples=4000)
def test_fuzz_encoded_image_decoding(msg):
    check_image(msg)


@given(raw_images)
@settings(FAST, max_examples=2500)
def test_fuzz_raw_frames(msg):
    check_image(msg)


def expect_validation(fn, *args) -> None:
    try:
        fn(*args)
    except errors.FaceServiceError as exc:
        assert exc.code == grpc.StatusCode.INVALID_ARGUMENT and exc.reason == errors.VALIDATION_FAILED, exc
        assert exc.metadata.get("field")


@given(
    st.text(max_size=300),
    st.dictionaries(st.text(max_size=80), st.text(max_size=600), max_size=24),
    st.text(max_size=200),
    st.integers(-10, 10**6),
)
@settings(FAST, max_examples=2500)
def test_fuzz_request_validation(text, meta, token, size):
    for fn in (validate.collection_id, validate.subject_id, validate.face_id, validate.key_id):
        expect_validation(fn, text)
    expect_validation(validate.metadata, meta)
    expect_validation(validate.decode_page_token, token, "scope")
    expect_validation(validate.page_size, size)


@given(
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-5, 10),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
)
@settings(FAST, max_examples=1500)
def test_fuzz_face_options(min_size, max_faces, selection, score):
    try:
        msg = pb.FaceOptions(
            min_face_size=max(0, min_size), max_faces=max(0, max_faces), selection=selection, min_detection_score=score
        )
    except ValueError:
        return  # the message itself refuses the value (e.g. a negative uint)
    expect_validation(convert.detect_options, msg, 20, 20)


# -- the same over gRPC, against a live server ---------------------------------------------------
@pytest.fixture(scope="module")
def stub(server):
    return pb_grpc.FaceServiceStub(server.channel)


def test_fuzz_over_grpc_every_failure_is_invalid_argument_with_a_reason(stub):
    seen: dict[str, int] = {}

    @settings(max_examples=600, deadline=10000, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(encoded_images, raw_images))
    def one(msg):
        try:
            stub.Detect(pb.DetectRequest(image=msg), timeout=10)
            seen["ok"] = seen.get("ok", 0) + 1
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
            reason = error_info(err).reason
            assert reason in IMAGE_REASONS
            seen[reason] = seen.get(reason, 0) + 1

    one()
    print(f"\nfuzzed Detect over gRPC: {seen}")
    assert len(stub.Detect(pb.DetectRequest(image=pb.Image(encoded=SEEDS[0])), timeout=10).faces) == 1  # still serving
