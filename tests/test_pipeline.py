"""The model pipeline in-process: every detector, the recognizer, liveness and age/gender on real photos."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest

from server import config, errors
from server.assembly import build_pipeline
from server.vision.pipeline import REQUIRE_SINGLE, DetectOptions
from tests.conftest import FACES, face_path

PORTRAITS = ["dev/img1.jpg", "dev/img5.jpg", "dev/img13.jpg", "dev/img22.jpg", "lfw/Anthony_Fauci/Anthony_Fauci_0002.jpg"]
OPTS = DetectOptions()


def read(rel: str) -> np.ndarray:
    return cv2.imread(str(face_path(rel)), cv2.IMREAD_COLOR)


@pytest.fixture(scope="module", params=["scrfd_500m", "scrfd_2.5g", "yunet"])
def detector_pipeline(request):
    return build_pipeline(replace(config.load([], environ={}), detector=request.param))


@pytest.mark.parametrize("rel", PORTRAITS)
def test_portrait_has_one_face_with_landmarks_inside_box(detector_pipeline, rel):
    img = read(rel)
    faces = detector_pipeline.detect(img, OPTS)
    assert len(faces) == 1, [f.box for f in faces]
    f = faces[0]
    x1, y1, x2, y2 = f.box
    assert 0 <= x1 < x2 <= img.shape[1] + 1 and 0 <= y1 < y2 <= img.shape[0] + 1
    for x, y in f.landmarks:
        assert x1 <= x <= x2 and y1 <= y <= y2, (f.box, f.landmarks)
    le, re, nose, ml, mr = f.landmarks
    assert le[0] < re[0] and ml[0] < mr[0], "left/right are as seen in the image"
    assert max(le[1], re[1]) < nose[1] < min(ml[1], mr[1]), "eyes above nose above mouth on an upright portrait"
    assert f.score > 0.5 and f.quality.score > 0.3


def test_group_photo_has_six_faces(detector_pipeline):
    faces = detector_pipeline.detect(read("dev/group_t1.jpg"), OPTS)
    assert len(faces) == 6
    areas = [f.width * f.height for f in faces]
    assert areas == sorted(areas, reverse=True), "largest first by default"


@pytest.mark.parametrize("rel", ["dev/noface_rocket.jpg", "dev/noface_coffee.jpg"])
def test_no_face_photos_have_zero_faces(detector_pipeline, rel):
    assert detector_pipeline.detect(read(rel), OPTS) == []


def test_detection_maps_back_to_full_resolution(pipeline):
    """A 5 MP portrait is detected on a 640 px copy; the box must land on the full-size face."""
    img = read("dev/img4.jpg")  # 2500 x 1728
    assert max(img.shape[:2]) > 2000
    big = pipeline.detect(img, OPTS)[0]
    small_img = cv2.resize(img, (img.shape[1] // 4, img.shape[0] // 4), interpolation=cv2.INTER_AREA)
    small = pipeline.detect(small_img, OPTS)[0]
    np.testing.assert_allclose(big.box / 4, small.box, atol=8)


def test_require_single_and_max_faces(pipeline):
    img = read("dev/group_t1.jpg")
    with pytest.raises(errors.FaceServiceError) as exc:
        pipeline.detect(img, DetectOptions(selection=REQUIRE_SINGLE))
    assert exc.value.reason == errors.MULTIPLE_FACES
    assert len(pipeline.detect(img, DetectOptions(max_faces=2))) == 2
    assert pipeline.detect(img, DetectOptions(min_face_size=10_000)) == []


def test_quality_drops_for_blurred_and_tiny_faces(pipeline):
    img = read("dev/img5.jpg")
    sharp = pipeline.detect(img, OPTS)[0].quality
    blurred = pipeline.detect(cv2.GaussianBlur(img, (0, 0), 4), OPTS)[0].quality
    assert blurred.sharpness < sharp.sharpness - 0.3
    tiny_img = cv2.resize(img, (img.shape[1] // 6, img.shape[0] // 6), interpolation=cv2.INTER_AREA)
    tiny = pipeline.detect(tiny_img, DetectOptions(min_face_size=5))[0].quality
    assert tiny.face_size < 40 and tiny.score < sharp.score
    assert abs(sharp.yaw) < 20 and abs(sharp.roll) < 15


def test_profile_turn_shows_in_yaw(pipeline):
    """Mirroring a portrait flips the sign of the estimated yaw and roll."""
    img = read("dev/img11.jpg")
    q = pipeline.detect(img, OPTS)[0].quality
    qm = pipeline.detect(cv2.flip(img, 1), OPTS)[0].quality
    assert np.sign(q.yaw) == -np.sign(qm.yaw) or abs(q.yaw) < 2
    assert abs(q.yaw + qm.yaw) < 5


def test_embeddings_are_unit_length_and_batch_independent(pipeline):
    faces = [pipeline.detect(read(r), OPTS)[0] for r in PORTRAITS]
    batched = pipeline.recognizer.embed([f.aligned for f in faces])
    single = np.concatenate([pipeline.recognizer.embed([f.aligned]) for f in faces])
    assert batched.shape == (len(PORTRAITS), 512)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-4)
    assert (np.sum(batched * single, axis=1) > 0.9999).all()


def test_same_person_is_closer_than_different_people(pipeline):
    a1, a2, b = (pipeline.embed(pipeline.detect(read(r), OPTS)[:1])[0] for r in ("dev/img1.jpg", "dev/img2.jpg", "dev/img3.jpg"))
    thr = pipeline.recognizer.match_threshold
    assert float(a1 @ a2) > thr > float(a1 @ b)


@pytest.mark.parametrize("path", sorted((FACES / "liveness").glob("*.jpg")), ids=lambda p: p.stem)
def test_liveness_samples(pipeline, path):
    img = cv2.imread(str(path))
    face = pipeline.detect_one(img, OPTS)
    result = pipeline.check_liveness(img, face)
    assert result.is_live == path.name.startswith("real_"), result


def test_liveness_fusion_with_second_model_agrees():
    fused = build_pipeline(replace(config.load([], environ={}), liveness="minifasnet_pair,minifasnet_se128"))
    for path in sorted((FACES / "liveness").glob("*.jpg")):
        img = cv2.imread(str(path))
        r = fused.check_liveness(img, fused.detect_one(img, OPTS))
        assert set(r.model_scores) == {"minifasnet_pair", "minifasnet_se128"}
        assert r.is_live == path.name.startswith("real_"), (path.name, r)


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_liveness_judges_a_turned_photo_upright(pipeline, turns):
    """The liveness models were trained on upright faces: a sideways or upside-down photo is judged
    as the upright one is, not on a face lying on its side."""
    for path in sorted((FACES / "liveness").glob("*.jpg")):
        img = np.ascontiguousarray(np.rot90(cv2.imread(str(path)), turns))
        result = pipeline.check_liveness(img, pipeline.detect_one(img, OPTS))
        assert result.is_live == path.name.startswith("real_"), (path.name, turns, result)


def test_liveness_turns_only_what_it_reads_of_a_turned_face(pipeline):
    """Liveness turned the whole frame for each sideways face: a 149 KB photo of twenty sideways faces
    in a 6300 px frame cost seconds of CPU per call, and every frame of a stream the same. Only the
    crops the models read are copied now, and they judge exactly what the upright frame shows."""
    import tracemalloc

    from server.vision.faces import Face
    from server.vision.finder import turn_points

    photo = read("liveness/real_01_minivision_T1.jpg")
    found = pipeline.detect_one(photo, OPTS)
    canvas = np.full((5000, 5000, 3), 127, np.uint8)  # 75 MB
    y, x = 2000, 2500
    canvas[y : y + photo.shape[0], x : x + photo.shape[1]] = photo
    offset = np.array([x, y], np.float32)
    face = Face(box=found.box + np.tile(offset, 2), landmarks=found.landmarks + offset, score=found.score)
    expected = pipeline.check_liveness(canvas, face)
    for k in (1, 2, 3):
        turned = np.ascontiguousarray(np.rot90(canvas, k))
        th, tw = turned.shape[:2]
        corners = turn_points(face.box.reshape(2, 2), 4 - k, tw, th)  # the face in the turned frame
        box = np.concatenate([corners.min(axis=0), corners.max(axis=0)]).astype(np.float32)
        sideways = Face(box=box, landmarks=turn_points(face.landmarks, 4 - k, tw, th).astype(np.float32), score=face.score)
        tracemalloc.start()
        try:
            got = pipeline.check_liveness(turned, sideways)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert got.model_scores == pytest.approx(expected.model_scores, abs=1e-5), k
        assert peak < canvas.nbytes / 8, (k, peak)  # the crops, not a turned copy of the frame


@pytest.mark.parametrize(
    "rel,male",
    [
        ("lfw/Anthony_Fauci/Anthony_Fauci_0002.jpg", True),
        ("lfw/Antonio_Banderas/Antonio_Banderas_0001.jpg", True),
        ("lfw/Ann_Godbehere/Ann_Godbehere_0001.jpg", False),
        ("dev/img1.jpg", False),
    ],
)
def test_age_gender_plausible(pipeline, rel, male):
    img = read(rel)
    faces = pipeline.detect(img, OPTS)[:1]  # LFW crops can hold a second, partial face: use the main one
    (face,) = pipeline.analyze(img, faces)
    age, p_male = face.attributes["age"], face.attributes["gender"]
    assert (p_male >= 0.5) == male and max(p_male, 1 - p_male) > 0.8
    assert 20 <= age.age <= 75 and age.low <= age.age <= age.high


# -- real-world inputs: close-ups, small faces in large frames, sideways photos ---------------------------
def lfw_sample(n: int = 12) -> list:
    files = sorted((FACES / "lfw").rglob("*.jpg"))
    return [cv2.imread(str(f)) for f in files[:: max(1, len(files) // n)][:n]]


def test_faces_that_fill_or_overflow_the_frame_are_found(pipeline):
    from scripts.bench_inputs import centre_crop

    found, total = {}, 0
    for img in lfw_sample():
        upright = pipeline.detect(img, OPTS)
        if not upright:
            continue
        total += 1
        for ratio in (1.0, 0.9, 0.8, 0.7, 0.6):  # from 0.8 on, chin and forehead are cut off
            crop = centre_crop(img, upright[0].box, ratio)
            faces = pipeline.detect(crop, OPTS)
            found[ratio] = found.get(ratio, 0) + bool(faces)
            # landmarks map back into the crop, eyes above the mouth; at 0.7 too little face is left
            # for that to hold every time (a turned view can explain the remains as well)
            if faces and ratio >= 0.8:
                lm = faces[0].landmarks
                assert lm[:2, 1].max() < lm[3:, 1].min() and faces[0].orientation == 0
    assert total >= 10 and all(v >= total - 1 for v in found.values()), (found, total)


def test_a_cut_off_face_the_detector_is_unsure_of_needs_two_views(pipeline):
    """A tight crop's face scores under the detector's threshold even on the close-up pass; it counts
    only when a second view confirms it, and never below a threshold the caller chose."""
    from scripts.bench_inputs import centre_crop
    from server.vision.finder import WEAK

    img = read("dev/img1.jpg")
    crop = centre_crop(img, pipeline.detect(img, OPTS)[0].box, 0.6)
    (face,) = pipeline.detect(crop, OPTS)
    strict = pipeline.detector.score_threshold
    assert WEAK * strict <= face.score < strict  # found as a weak face, confirmed by the second view
    assert pipeline.detect(crop, DetectOptions(min_face_size=8, min_score=strict)) == []


def test_a_tight_crop_seen_better_on_a_grey_border_is_found(pipeline):
    """Cut to 0.6 of the face's width, these LFW faces score just under WEAK on the black-bordered
    close-up view (0.26-0.34) and 0.41-0.68 on the grey ones, which ran only to confirm a face the
    black view had found: they were missed. The grey views now run on a trace of a face (HINT) too."""
    from scripts.bench_inputs import centre_crop, photos

    lfw = photos(120)
    for i in (23, 24, 79, 115):
        crop = centre_crop(lfw[i], pipeline.detect(lfw[i], OPTS)[0].box, 0.6)
        assert pipeline.detect(crop, OPTS), i


def test_close_ups_of_photos_without_a_face_stay_without_one(pipeline):
    """The rescue of weak close-up faces (two views, WEAK) must not find faces in magnified
    backgrounds: patches of the no-face photos, blown up as a tight face crop would be."""
    rng = np.random.default_rng(7)
    found = []
    for rel in ("dev/noface_coffee.jpg", "dev/noface_rocket.jpg"):
        img = read(rel)
        h, w = img.shape[:2]
        for _ in range(30):
            side = int(rng.integers(min(h, w) // 6, min(h, w) // 2))
            x0, y0 = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
            patch = cv2.resize(img[y0 : y0 + side, x0 : x0 + side], (720, 720), interpolation=cv2.INTER_CUBIC)
            if pipeline.detect(patch, OPTS):
                found.append((rel, x0, y0, side))
    assert not found, found


def test_a_small_face_in_a_4k_frame_is_found(pipeline):
    from scripts.bench_inputs import pasted

    hits = 0
    imgs = [i for i in lfw_sample(8) if pipeline.detect(i, OPTS)]
    for img in imgs:
        frame = pasted(img, pipeline.detect(img, OPTS)[0].box, 3840, 2160)
        faces = pipeline.detect(frame, OPTS)
        hits += bool(faces) and faces[0].box[0] > 1800  # where it was pasted, in 4K pixels
    assert hits == len(imgs)


@pytest.mark.parametrize("turns", [1, 2, 3])
def test_sideways_and_upside_down_photos_are_found_and_say_how_they_were_turned(pipeline, turns):
    img = read("dev/img1.jpg")
    upright = pipeline.detect(img, OPTS)[0]
    turned = np.ascontiguousarray(np.rot90(img, turns))
    faces = pipeline.detect(turned, OPTS)
    # turned `turns` quarter turns counter-clockwise: found as sent (the detector sees some sideways
    # faces), or after (4 - turns) more quarter turns, which the answer then says
    assert faces and faces[0].orientation in (0, 90 * ((4 - turns) % 4))
    # the embedding of the turned photo's face is the upright one's: alignment turns it upright
    (a, b) = pipeline.embed([upright, faces[0]])
    assert float(a @ b) > 0.9


def test_orientation_is_reported_when_a_turn_found_the_face(pipeline):
    turned_found = 0
    for img in lfw_sample(12):
        for turns in (1, 2, 3):
            faces = pipeline.detect(np.ascontiguousarray(np.rot90(img, turns)), OPTS)
            assert faces, "a turned photo without a face found"
            if faces[0].orientation:
                assert faces[0].orientation == 90 * ((4 - turns) % 4)
                turned_found += 1
    assert turned_found >= 12  # most turned LFW photos need the turn: the rescue is what finds them


def test_an_upside_down_face_only_the_close_up_pass_sees_is_stood_upright(pipeline):
    """Upside down, many LFW photos' faces are missed by the plain pass and seen by the close-up pass,
    weakly and as if upright (eyes where the mouth is). A turned frame's plain pass sees the face
    better: the answer says the photo was turned by 180 degrees, and its embedding is the upright one's."""
    files = sorted((FACES / "lfw").rglob("*.jpg"))[:60]
    wrong = []
    for f in files:
        img = cv2.imread(str(f))
        upright = pipeline.detect(img, OPTS)
        faces = pipeline.detect(np.ascontiguousarray(np.rot90(img, 2)), OPTS)
        assert faces, f.name
        if faces[0].orientation != 180:
            wrong.append(f.name)
            continue
        # the same face as upright (of the photo's faces, the one it matches: LFW photos can hold two)
        *ups, turned = pipeline.embed([*upright, faces[0]])
        assert max(float(u @ turned) for u in ups) > 0.9, f.name
    assert len(wrong) <= 2, wrong  # before the turned check: 6 of these 60


def test_a_sideways_face_with_upright_landmarks_is_stood_upright_by_its_box(pipeline):
    """On some sideways faces the detector lays its landmarks out upright, sure enough (over 0.7) not
    to be doubted. Its box gives it away: wider than tall, where an upright face's is taller than
    wide. Every such face of 120 LFW photos turned by 90 or 270 degrees is checked against the turns."""
    from server.vision.imaging import resize_long_side

    finder = pipeline.finder
    files = sorted((FACES / "lfw").rglob("*.jpg"))[:120]
    seen, wrong = 0, []
    for f in files:
        img = cv2.imread(str(f))
        for turns in (1, 3):
            turned = np.ascontiguousarray(np.rot90(img, turns))
            plain = finder._run(resize_long_side(turned, finder.max_side)[0], None)
            if not (finder._lying(plain) and finder._quarter_turns(plain) == 0):
                continue
            seen += 1
            faces = pipeline.detect(turned, OPTS)
            assert faces, (f.name, turns)
            if faces[0].orientation != 90 * (4 - turns):
                wrong.append((f.name, turns))
    # before the box was looked at: 6 of the 29 wrong; 2 still are, near ties between two turns
    # whose order another CPU's rounding may flip
    assert seen >= 20 and len(wrong) <= 3, (seen, wrong)


def test_turning_back_maps_points_exactly():
    from server.vision.finder import turn_points

    h, w = 30, 50
    img = np.zeros((h, w), np.uint8)
    img[7, 11] = 255  # (x=11, y=7)
    for k in (1, 2, 3):
        turned = np.rot90(img, k)
        y, x = np.argwhere(turned == 255)[0]
        assert tuple(turn_points(np.array([[x, y]], np.float32), k, w, h)[0]) == (11, 7)


class CountingDetector:
    """The pipeline's detector, counting the frames it runs on."""

    def __init__(self, detector):
        self.detector, self.runs = detector, 0

    def __getattr__(self, name):
        return getattr(self.detector, name)

    def detect(self, *args, **kw):
        self.runs += 1
        return self.detector.detect(*args, **kw)


def test_a_streams_remembered_turn_runs_no_pass_twice(pipeline):
    """A stream tries the turn that found its last faces first; when nothing is found there, the search
    over the turns that follows ran that turn's passes again, and charged them again. A blank large
    frame costs the same passes whichever turn is remembered, within the documented worst case."""
    from server.context import work_budget
    from server.vision.finder import FaceFinder
    from server.vision.imaging import ImageLimits

    counted = CountingDetector(pipeline.detector)
    finder = FaceFinder(counted, pipeline.detect_max_side)
    cost = {}
    for prefer in (0, 90, 180, 270):
        budget = ImageLimits().budget(10_000_000)  # room for every pass: count what runs
        token = work_budget.set(budget)
        try:
            counted.runs = 0
            assert not len(finder.find(np.zeros((3000, 4000, 3), np.uint8), prefer=prefer))
        finally:
            work_budget.reset(token)
        cost[prefer] = (counted.runs, budget.spent_passes)
    assert len(set(cost.values())) == 1 and cost[0][0] <= 11, cost


def test_the_detectors_anchor_grids_are_bounded_and_the_oldest_go_first(pipeline):
    """Grids are kept per frame shape, which callers choose: at the bound the oldest goes, where all of
    them were dropped at once (every shape then paid its grid again)."""
    from server.vision.models.scrfd import MAX_GRIDS

    det = pipeline.detector
    shapes = [(32 * (1 + i // 20), 32 * (1 + i % 20)) for i in range(MAX_GRIDS // 3 + 10)]
    for h, w in shapes:
        for s in det.strides:
            grid = det._anchor_centers(h, w, s)
            assert len(grid) == (h // s) * (w // s) * det.num_anchors
    assert len(det._centers) == MAX_GRIDS
    assert (*shapes[-1], 32) in det._centers and (*shapes[0], 8) not in det._centers
