"""FaceService over gRPC against `python -m server`: real models, real photos, real errors."""

from __future__ import annotations

import csv
import struct
import zlib

import cv2
import grpc
import numpy as np
import pytest

from facesvc.v1 import face_service_pb2 as pb
from server.vision.models.manifest import load_liveness_defaults
from tests.conftest import FACES, expect_error, face_path, image

INVALID = grpc.StatusCode.INVALID_ARGUMENT


# -- Detect ----------------------------------------------------------------
def test_detect_portrait(stub):
    resp = stub.Detect(pb.DetectRequest(image=image("dev/img5.jpg")), timeout=30)
    assert resp.image.width == 330 and resp.image.height == 512
    assert resp.detector == "scrfd_500m"
    (face,) = resp.faces
    b = face.box
    for p in (
        face.landmarks.left_eye,
        face.landmarks.right_eye,
        face.landmarks.nose,
        face.landmarks.mouth_left,
        face.landmarks.mouth_right,
    ):
        assert b.x <= p.x <= b.x + b.width and b.y <= p.y <= b.y + b.height
    assert face.detection_score > 0.5
    assert 0 < face.quality.score <= 1 and face.quality.face_size == pytest.approx(min(b.width, b.height), rel=1e-3)


def test_detect_group_and_no_face(stub):
    assert len(stub.Detect(pb.DetectRequest(image=image("dev/group_t1.jpg")), timeout=30).faces) == 6
    resp = stub.Detect(pb.DetectRequest(image=image("dev/noface_rocket.jpg")), timeout=30)
    assert len(resp.faces) == 0 and resp.image.width == 640


def test_detect_face_options(stub):
    group = image("dev/group_t1.jpg")
    two = stub.Detect(pb.DetectRequest(image=group, face_options=pb.FaceOptions(max_faces=2)), timeout=30).faces
    assert len(two) == 2
    by_score = stub.Detect(
        pb.DetectRequest(image=group, face_options=pb.FaceOptions(selection=pb.FACE_SELECTION_HIGHEST_SCORE)), timeout=30
    ).faces
    scores = [f.detection_score for f in by_score]
    assert scores == sorted(scores, reverse=True)
    expect_error(
        stub.Detect,
        pb.DetectRequest(image=group, face_options=pb.FaceOptions(selection=pb.FACE_SELECTION_REQUIRE_SINGLE)),
        INVALID,
        "MULTIPLE_FACES",
    )
    none = stub.Detect(pb.DetectRequest(image=group, face_options=pb.FaceOptions(min_face_size=5000)), timeout=30)
    assert len(none.faces) == 0


@pytest.mark.parametrize("fmt", ["BGR", "RGB", "GRAY"])
def test_raw_frames_match_encoded(stub, fmt):
    bgr = cv2.imread(str(face_path("dev/img11.jpg")))
    h, w = bgr.shape[:2]
    if fmt == "BGR":
        data, pf = bgr.tobytes(), pb.PIXEL_FORMAT_BGR
    elif fmt == "RGB":
        data, pf = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).tobytes(), pb.PIXEL_FORMAT_RGB
    else:
        data, pf = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY).tobytes(), pb.PIXEL_FORMAT_GRAY
    raw = stub.Detect(pb.DetectRequest(image=pb.Image(raw=pb.RawFrame(width=w, height=h, format=pf, data=data))), timeout=30)
    enc = stub.Detect(pb.DetectRequest(image=image("dev/img11.jpg")), timeout=30)
    assert len(raw.faces) == len(enc.faces) == 1
    assert raw.faces[0].box.x == pytest.approx(enc.faces[0].box.x, abs=6)
    assert raw.faces[0].box.width == pytest.approx(enc.faces[0].box.width, abs=8)


def test_raw_frame_with_row_padding(stub):
    bgr = cv2.imread(str(face_path("dev/img11.jpg")))
    h, w = bgr.shape[:2]
    stride = w * 3 + 64
    padded = np.zeros((h, stride), np.uint8)
    padded[:, : w * 3] = bgr.reshape(h, w * 3)
    frame = pb.RawFrame(width=w, height=h, format=pb.PIXEL_FORMAT_BGR, data=padded.tobytes(), row_stride=stride)
    assert len(stub.Detect(pb.DetectRequest(image=pb.Image(raw=frame)), timeout=30).faces) == 1


# -- Compare / Embed -------------------------------------------------------
def _dev_pairs():
    rows = list(csv.DictReader(open(FACES / "dev" / "master.csv")))
    same = [r for r in rows if r["Decision"] == "Yes"][:4]
    diff = [r for r in rows if r["Decision"] == "No"][:4]
    return [(r["file_x"], r["file_y"], r["Decision"] == "Yes") for r in same + diff]


@pytest.mark.parametrize("a,b,same", _dev_pairs())
def test_compare_dev_pairs(stub, a, b, same):
    resp = stub.Compare(pb.CompareRequest(source=image(f"dev/{a}"), target=image(f"dev/{b}")), timeout=60)
    assert resp.threshold == pytest.approx(0.242)
    assert resp.model == "w600k_mbf"
    assert resp.match is same, f"{a} vs {b}: similarity {resp.similarity:.3f}"
    assert (resp.similarity >= resp.threshold) is same


def test_compare_threshold_override_and_errors(stub):
    req = pb.CompareRequest(source=image("dev/img1.jpg"), target=image("dev/img2.jpg"))
    sim = stub.Compare(req, timeout=60).similarity
    req.threshold = min(0.99, sim + 0.05)
    assert stub.Compare(req, timeout=60).match is False
    req.threshold = 1.5
    info = expect_error(stub.Compare, req, INVALID, "VALIDATION_FAILED")
    assert info.metadata["field"] == "threshold"
    info = expect_error(
        stub.Compare,
        pb.CompareRequest(source=image("dev/img1.jpg"), target=image("dev/noface_coffee.jpg")),
        INVALID,
        "NO_FACE_DETECTED",
    )
    assert info.metadata["image"] == "target"
    info = expect_error(stub.Compare, pb.CompareRequest(source=image("dev/img1.jpg")), INVALID, "VALIDATION_FAILED")
    assert info.metadata["field"] == "target"


def test_compare_requiring_liveness(stub):
    real = image("liveness/real_01_minivision_T1.jpg")
    ok = stub.Compare(pb.CompareRequest(source=real, target=real, require_liveness=True), timeout=60)
    assert ok.match and ok.source_liveness.is_live and ok.target_liveness.is_live
    spoof = image("liveness/spoof_replay_01_minivision_F2.jpg")
    info = expect_error(
        stub.Compare,
        pb.CompareRequest(source=real, target=spoof, require_liveness=True),
        grpc.StatusCode.FAILED_PRECONDITION,
        "SPOOF_DETECTED",
    )
    assert info.metadata["image"] == "target" and float(info.metadata["liveness_score"]) < 0.5
    # Without require_liveness the same photos are compared as data.
    assert stub.Compare(pb.CompareRequest(source=real, target=spoof), timeout=60).similarity > -1


def test_embed(stub):
    resp = stub.Embed(pb.EmbedRequest(image=image("dev/group_t1.jpg")), timeout=30)
    assert resp.model == "w600k_mbf" and resp.dimension == 512 and len(resp.faces) == 6
    embs = np.array([f.embedding for f in resp.faces])
    np.testing.assert_allclose(np.linalg.norm(embs, axis=1), 1.0, atol=1e-4)
    sims = embs @ embs.T
    # Six different people: all clearly apart. (One pair of these ~100 px faces scores 0.25, just over the
    # FAR-1e-3 threshold: small group-photo faces are why enrolment has a quality gate.)
    assert (sims[~np.eye(6, dtype=bool)] < 0.4).all(), sims
    assert len(stub.Embed(pb.EmbedRequest(image=image("dev/noface_coffee.jpg")), timeout=30).faces) == 0


# -- CheckLiveness / Analyze -----------------------------------------------
@pytest.mark.parametrize("path", sorted((FACES / "liveness").glob("*.jpg")), ids=lambda p: p.stem)
def test_check_liveness(stub, path):
    resp = stub.CheckLiveness(pb.CheckLivenessRequest(image=pb.Image(encoded=path.read_bytes())), timeout=30)
    live = path.name.startswith("real_")
    assert resp.liveness.is_live is live, resp.liveness
    # the defaults chosen from data (scripts/eval_liveness.py) and stored in the manifest
    chosen = load_liveness_defaults()
    assert resp.liveness.threshold == pytest.approx(chosen.threshold)
    assert [s.model for s in resp.liveness.model_scores] == chosen.ensemble.split(",")


def test_check_liveness_errors(stub):
    expect_error(stub.CheckLiveness, pb.CheckLivenessRequest(image=image("dev/noface_rocket.jpg")), INVALID, "NO_FACE_DETECTED")
    expect_error(
        stub.CheckLiveness, pb.CheckLivenessRequest(image=image("dev/img5.jpg"), threshold=2.0), INVALID, "VALIDATION_FAILED"
    )


def test_analyze(stub):
    resp = stub.Analyze(pb.AnalyzeRequest(image=image("lfw/Anthony_Fauci/Anthony_Fauci_0002.jpg")), timeout=30)
    a = resp.faces[0]
    assert a.gender == pb.GENDER_MALE and a.gender_confidence > 0.8
    assert 20 <= a.age <= 75 and a.age_range.low <= a.age <= a.age_range.high
    resp = stub.Analyze(pb.AnalyzeRequest(image=image("lfw/Ann_Godbehere/Ann_Godbehere_0001.jpg")), timeout=30)
    assert resp.faces[0].gender == pb.GENDER_FEMALE
    assert len(stub.Analyze(pb.AnalyzeRequest(image=image("dev/group_t1.jpg")), timeout=30).faces) == 6


# -- hostile input ---------------------------------------------------------
def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header(width: int, height: int) -> bytes:
    """A well-formed, tiny PNG whose header claims width x height (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(bytes(1024), 9))
        + _png_chunk(b"IEND", b"")
    )


def _bmp_header(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


BAD_IMAGES = {
    "garbage": (b"this is not an image at all" * 10, "INVALID_IMAGE"),
    "random_bytes": (np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "INVALID_IMAGE"),
    "truncated_jpeg": (None, "INVALID_IMAGE"),
    "jpeg_header_only": (None, "INVALID_IMAGE"),
    "png_30000x30000": (_png_header(30_000, 30_000), "IMAGE_TOO_LARGE"),
    "bmp_30000x30000": (_bmp_header(30_000, 30_000), "IMAGE_TOO_LARGE"),
    "png_1x70000": (_png_header(1, 70_000), "IMAGE_TOO_LARGE"),
    "gif": (
        b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00\x00\x00,"
        b"\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;",
        "INVALID_IMAGE",
    ),
    "empty": (b"", "VALIDATION_FAILED"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_images_are_invalid_argument(stub, name):
    data, reason = BAD_IMAGES[name]
    jpeg = face_path("dev/img5.jpg").read_bytes()
    if name == "truncated_jpeg":
        data = jpeg[:600]
    elif name == "jpeg_header_only":
        data = jpeg[:2]
    for call, req in (
        (stub.Detect, pb.DetectRequest(image=pb.Image(encoded=data))),
        (stub.Analyze, pb.AnalyzeRequest(image=pb.Image(encoded=data))),
    ):
        expect_error(call, req, INVALID, reason)


def test_missing_image_and_bad_options(stub):
    info = expect_error(stub.Detect, pb.DetectRequest(), INVALID, "VALIDATION_FAILED")
    assert info.metadata["field"] == "image"
    info = expect_error(
        stub.Detect,
        pb.DetectRequest(image=image("dev/img5.jpg"), face_options=pb.FaceOptions(max_faces=1000)),
        INVALID,
        "VALIDATION_FAILED",
    )
    assert info.metadata["field"] == "face_options.max_faces"
    expect_error(
        stub.Detect,
        pb.DetectRequest(image=image("dev/img5.jpg"), face_options=pb.FaceOptions(selection=99)),
        INVALID,
        "VALIDATION_FAILED",
    )
    expect_error(
        stub.Detect,
        pb.DetectRequest(image=image("dev/img5.jpg"), face_options=pb.FaceOptions(min_detection_score=float("nan"))),
        INVALID,
        "VALIDATION_FAILED",
    )


@pytest.mark.parametrize(
    "width,height,fmt,length,reason",
    [
        (100, 100, pb.PIXEL_FORMAT_BGR, 100 * 100 * 3 - 1, "INVALID_IMAGE"),
        (100, 100, pb.PIXEL_FORMAT_GRAY, 100 * 100 * 3, "INVALID_IMAGE"),
        (100, 100, pb.PIXEL_FORMAT_UNSPECIFIED, 100 * 100 * 3, "VALIDATION_FAILED"),
        (0, 100, pb.PIXEL_FORMAT_BGR, 0, "VALIDATION_FAILED"),
        (30_000, 30_000, pb.PIXEL_FORMAT_GRAY, 16, "IMAGE_TOO_LARGE"),
    ],
)
def test_bad_raw_frames(stub, width, height, fmt, length, reason):
    frame = pb.RawFrame(width=width, height=height, format=fmt, data=bytes(length))
    expect_error(stub.Detect, pb.DetectRequest(image=pb.Image(raw=frame)), INVALID, reason)


def test_raw_frame_errors_name_the_field(stub):
    bad = pb.Image(raw=pb.RawFrame(width=10, height=10, data=bytes(300)))
    info = expect_error(stub.Compare, pb.CompareRequest(source=image("dev/img5.jpg"), target=bad), INVALID, "VALIDATION_FAILED")
    assert info.metadata["field"] == "target.raw.format"
    # a format number this contract does not have is named as sent, not as "UNSPECIFIED"
    future = pb.Image(raw=pb.RawFrame(width=10, height=10, format=99, data=bytes(300)))
    with pytest.raises(grpc.RpcError) as e:
        stub.Detect(pb.DetectRequest(image=future), timeout=30)
    assert e.value.code() == INVALID and "not 99" in e.value.details()


def test_oversized_encoded_image(stub):
    data = face_path("dev/img5.jpg").read_bytes() + bytes(21 * 1024 * 1024)
    info = expect_error(stub.Detect, pb.DetectRequest(image=pb.Image(encoded=data)), INVALID, "IMAGE_TOO_LARGE")
    assert int(info.metadata["max_bytes"]) == 20 * 1024 * 1024


def test_message_over_grpc_limit_is_refused_by_transport(stub):
    with pytest.raises(grpc.RpcError) as exc:
        stub.Detect(pb.DetectRequest(image=pb.Image(encoded=bytes(33 * 1024 * 1024))), timeout=60)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_keeps_serving_after_hostile_input(stub, server):
    for data, _ in BAD_IMAGES.values():
        try:
            stub.Detect(pb.DetectRequest(image=pb.Image(encoded=data or b"x")), timeout=30)
        except grpc.RpcError as err:
            assert err.code() == INVALID
    assert server.proc.poll() is None
    assert server.health() == 1  # SERVING
    assert len(stub.Detect(pb.DetectRequest(image=image("dev/img5.jpg")), timeout=30).faces) == 1


def test_deadline_exceeded_is_reported(stub):
    with pytest.raises(grpc.RpcError) as exc:
        stub.Analyze(pb.AnalyzeRequest(image=image("dev/img4.jpg")), timeout=0.001)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_exif_orientation_is_applied(stub):
    """Phones store portraits sideways with an EXIF Orientation tag; the face must be found upright."""
    import io

    from PIL import Image as PILImage

    src = PILImage.open(face_path("dev/img5.jpg"))  # 330 x 512 upright
    sideways = src.transpose(PILImage.Transpose.ROTATE_90)  # stored 512 x 330, face lying on its side
    exif = PILImage.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    sideways.save(buf, format="JPEG", quality=92, exif=exif)
    resp = stub.Detect(pb.DetectRequest(image=pb.Image(encoded=buf.getvalue())), timeout=30)
    assert (resp.image.width, resp.image.height) == (330, 512)
    (face,) = resp.faces
    lm = face.landmarks
    assert lm.left_eye.y < lm.nose.y < lm.mouth_left.y, "upright after orientation"
    upright = stub.Detect(pb.DetectRequest(image=image("dev/img5.jpg")), timeout=30).faces[0]
    assert face.box.x == pytest.approx(upright.box.x, abs=6) and face.box.y == pytest.approx(upright.box.y, abs=6)


def test_an_upside_down_scan_is_found_and_the_answer_says_how_it_was_turned(stub):
    """A photo without its EXIF orientation: the face is found, its box and landmarks are in the image
    as sent, and `image.orientation` says the turn that stood it upright."""
    import cv2
    import numpy as np

    from tests.conftest import face_path

    photo = cv2.imread(str(face_path("lfw/Abel_Aguilar/Abel_Aguilar_0001.jpg")))
    upright = stub.Detect(pb.DetectRequest(image=pb.Image(encoded=cv2.imencode(".png", photo)[1].tobytes())), timeout=30)
    assert upright.image.orientation == 0
    turned = np.ascontiguousarray(np.rot90(photo, 2))
    resp = stub.Detect(pb.DetectRequest(image=pb.Image(encoded=cv2.imencode(".png", turned)[1].tobytes())), timeout=30)
    assert resp.faces and resp.image.orientation == 180
    b, ub = resp.faces[0].box, upright.faces[0].box
    # the same face, its box mirrored through the centre of the 250 x 250 photo
    assert abs((b.x + b.width / 2) - (250 - (ub.x + ub.width / 2))) < 8
    assert resp.faces[0].landmarks.left_eye.y > resp.faces[0].landmarks.mouth_left.y  # upside down, as sent


def test_liveness_says_when_it_cannot_judge_a_face_that_fills_the_frame(stub):
    """A face crop leaves the models none of the context they judge from: no confident score, a reason."""
    import cv2

    from scripts.bench_inputs import centre_crop
    from tests.conftest import face_path

    photo = cv2.imread(str(face_path("dev/img1.jpg")))
    whole = stub.CheckLiveness(
        pb.CheckLivenessRequest(image=pb.Image(encoded=cv2.imencode(".jpg", photo)[1].tobytes())), timeout=30
    )
    assert whole.liveness.is_live and whole.liveness.reason == ""
    box = whole.face.box
    crop = centre_crop(photo, np.array([box.x, box.y, box.x + box.width, box.y + box.height]), 1.0)
    close = pb.Image(encoded=cv2.imencode(".jpg", crop)[1].tobytes())
    resp = stub.CheckLiveness(pb.CheckLivenessRequest(image=close), timeout=30)
    assert not resp.liveness.is_live and resp.liveness.reason == "FACE_TOO_CLOSE" and resp.liveness.hint
    assert resp.liveness.score == 0 and not resp.liveness.model_scores
    info = expect_error(
        stub.Compare,
        pb.CompareRequest(source=close, target=image("dev/img2.jpg"), require_liveness=True),
        INVALID,
        "FACE_TOO_CLOSE",
    )
    assert info.metadata["hint"]
