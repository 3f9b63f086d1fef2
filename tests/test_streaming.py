"""StreamFrames and the batch RPCs against a real server, on real video frames and photos."""

from __future__ import annotations

import contextlib
import queue
import time
import uuid

import cv2
import grpc
import numpy as np
import pytest

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from server.domain.streaming import WAITING, FrameInbox
from tests.conftest import FACES, ServerProcess, error_info, expect_error, image

VIDEO = FACES / "video" / "single_closeup_720p.mp4"


def video_frames(path=VIDEO, n: int = 60, size=(640, 360)) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    frames = []
    while len(frames) < n:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(cv2.resize(frame, size, interpolation=cv2.INTER_AREA))
    cap.release()
    assert len(frames) == n, f"could not read {n} frames from {path}"
    return frames


def raw(frame: np.ndarray) -> pb.Image:
    h, w = frame.shape[:2]
    return pb.Image(raw=pb.RawFrame(width=w, height=h, format=pb.PIXEL_FORMAT_BGR, data=frame.tobytes()))


def jpeg(frame: np.ndarray) -> pb.Image:
    return pb.Image(encoded=cv2.imencode(".jpg", frame)[1].tobytes())


def requests(config: pb.StreamConfig, frames, *, pause: float = 0.0):
    """The config, then the frames (raw BGR) as fast as possible or `pause` seconds apart."""
    yield pb.StreamFramesRequest(config=config)
    for i, f in enumerate(frames, 1):
        yield pb.StreamFramesRequest(frame=pb.Frame(frame_id=i, image=raw(f)))
        if pause:
            time.sleep(pause)


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    s = ServerProcess(log_path=tmp_path_factory.mktemp("streaming") / "server.log", env={"FACESVC_MAX_STREAMS_PER_KEY": "2"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(srv):
    return pb_grpc.FaceServiceStub(srv.channel)


@pytest.fixture(scope="module")
def enrolled(stub):
    """A collection holding the woman of the close-up video, enrolled from its first frame."""
    coll = "stream-" + uuid.uuid4().hex[:6]
    stub.CreateCollection(pb.CreateCollectionRequest(collection=coll, liveness_policy=pb.LIVENESS_POLICY_OPTIONAL), timeout=10)
    first = video_frames(n=1, size=(1280, 720))[0]
    stub.Register(
        pb.RegisterRequest(collection=coll, subject_id="closeup-woman", image=jpeg(first), skip_liveness=True), timeout=60
    )
    return coll


def lockstep(stub, config: pb.StreamConfig, frames) -> list[pb.StreamFramesResponse]:
    """Each frame sent only after the previous one's answer: nothing dropped, whatever the machine's load."""
    q: queue.Queue = queue.Queue()
    q.put(pb.StreamFramesRequest(config=config))
    call = stub.StreamFrames(iter(q.get, None), timeout=300)
    answers = []
    for i, f in enumerate(frames, 1):
        q.put(pb.StreamFramesRequest(frame=pb.Frame(frame_id=i, image=raw(f))))
        answers.append(next(call))
    q.put(None)
    assert not list(call)
    return answers


def test_tracks_are_stable_and_identity_runs_once_per_track(stub, enrolled):
    frames = video_frames(n=90)[30:]  # later frames than the enrolment one
    blank = np.full_like(frames[0], 127)
    sequence = frames[:20] + [blank] * 11 + frames[20:40]  # the face leaves the view for 11 frames, then returns
    answers = lockstep(stub, pb.StreamConfig(collection=enrolled, identify=True), sequence)
    assert [a.frame_id for a in answers] == list(range(1, len(sequence) + 1))
    first, gap, second = answers[:20], answers[20:31], answers[31:]
    assert all(len(a.faces) == 1 for a in first + second) and not any(a.faces for a in gap)
    track1 = {a.faces[0].track_id for a in first}
    track2 = {a.faces[0].track_id for a in second}
    assert len(track1) == 1 and len(track2) == 1 and track1 != track2  # stable, and new after leaving the view
    for run in (first, second):
        assert sum(f.evaluated for a in run for f in a.faces) == 1  # one search per track
        assert run[0].faces[0].evaluated
        assert all(a.faces[0].identity.subject_id == "closeup-woman" for a in run)
        assert all(a.faces[0].identity.similarity >= 0.31 for a in run)
        assert [a.faces[0].frames_tracked for a in run] == list(range(1, 21))


def test_detection_only_with_jpeg_frames_and_capture_times_echoed(stub):
    frames = video_frames(n=10)

    def reqs():
        yield pb.StreamFramesRequest(config=pb.StreamConfig())
        for i, f in enumerate(frames):
            ts = pb.Frame(frame_id=100 + i, image=jpeg(f))
            ts.capture_time.FromMilliseconds(1_700_000_000_000 + 33 * i)
            yield pb.StreamFramesRequest(frame=ts)
            time.sleep(0.05)

    answers = list(stub.StreamFrames(reqs(), timeout=60))
    assert answers and all(a.faces and not a.faces[0].HasField("identity") for a in answers)
    assert all(a.capture_time.ToMilliseconds() == 1_700_000_000_000 + 33 * (a.frame_id - 100) for a in answers)
    assert all(a.image.width == 640 and a.image.height == 360 and a.latency_ms > 0 for a in answers)


def test_a_client_far_faster_than_real_time_gets_drops_in_order_and_bounded_memory(srv, stub):
    frames = video_frames(n=30)
    n = 300  # raw 640x360 BGR frames (0.7 MB each) as fast as the client can send them
    before = rss_kb(srv.proc.pid)
    answers = list(stub.StreamFrames(requests(pb.StreamConfig(), (frames[i % 30] for i in range(n))), timeout=120))
    after = rss_kb(srv.proc.pid)
    processed = [a.frame_id for a in answers]
    skipped = [s for a in answers for s in a.skipped_frame_ids]
    print(
        f"\nfast client: {n} frames sent, {len(processed)} processed, {len(skipped)} dropped; "
        f"server RSS {before / 1024:.0f} -> {after / 1024:.0f} MB"
    )
    assert processed == sorted(processed) and len(set(processed)) == len(processed)
    assert sorted(processed + skipped) == list(range(1, n + 1))
    assert len(skipped) > n // 3  # the server could not keep up, so it dropped
    assert processed[-1] == n  # the newest frame is always processed
    assert after - before < 80 * 1024  # 300 frames = 210 MB had they queued


def test_the_inbox_keeps_two_frames_oldest_first_and_under_max_fps_only_the_newest():
    """Two frames coming during a slow one are both processed, in order; a third pushes the oldest
    out (reported as skipped with the next answer); a server still behind after catching up one
    frame takes the newest; under max_fps only the newest frame is due."""
    box = FrameInbox()
    box.put(pb.Frame(frame_id=1))
    box.put(pb.Frame(frame_id=2))
    assert [(f.frame_id, skipped) for f, _, skipped in (box.take(0), box.take(0))] == [(1, []), (2, [])]
    for i in (3, 4, 5):
        box.put(pb.Frame(frame_id=i))
    assert [(f.frame_id, skipped) for f, _, skipped in (box.take(0), box.take(0))] == [(4, [3]), (5, [])]
    box.put(pb.Frame(frame_id=6))
    box.put(pb.Frame(frame_id=7))
    assert box.take(0)[0].frame_id == 6
    box.put(pb.Frame(frame_id=8))  # 7 still waits: behind twice running
    frame, _, skipped = box.take(0)
    assert (frame.frame_id, skipped) == (8, [7])
    assert box.take(0) is WAITING
    box.close()
    assert box.take(0) is None

    paced = FrameInbox(max_fps=1000)
    for i in (1, 2, 3):
        paced.put(pb.Frame(frame_id=i))
    frame, _, skipped = paced.take(0)
    assert (frame.frame_id, skipped) == (3, [1, 2])
    # a frame waiting for its max_fps slot when the client half-closes is answered at once, not
    # after the slot (at 0.01 fps, 100 s: the stream ended STREAM_IDLE and the frame was lost)
    slow = FrameInbox(max_fps=0.01)
    slow.put(pb.Frame(frame_id=1))
    assert slow.take(0)[0].frame_id == 1
    slow.put(pb.Frame(frame_id=2))
    assert slow.take(0) is WAITING
    slow.close()
    frame, _, skipped = slow.take(0)
    assert (frame.frame_id, skipped) == (2, [])
    assert slow.take(0) is None


def test_max_fps_paces_processing(stub):
    frames = video_frames(n=10)
    t0 = time.monotonic()
    answers = list(
        stub.StreamFrames(requests(pb.StreamConfig(max_fps=4), [frames[i % 10] for i in range(40)], pause=0.025), timeout=60)
    )
    elapsed = time.monotonic() - t0
    assert len(answers) <= 4 * elapsed + 2
    assert sum(len(a.skipped_frame_ids) for a in answers) + len(answers) == 40


def test_a_paced_stream_that_half_closes_answers_its_last_frame_and_ends_ok(stub):
    frames = video_frames(n=2)
    t0 = time.monotonic()
    answers = list(stub.StreamFrames(requests(pb.StreamConfig(max_fps=0.01), frames, pause=1.0), timeout=20))
    assert [a.frame_id for a in answers] == [1, 2] and time.monotonic() - t0 < 10


def test_stream_limit_and_cancel_frees_the_stream(stub):
    frames = video_frames(n=1)

    def open_stream():
        q: queue.Queue = queue.Queue()
        q.put(pb.StreamFramesRequest(config=pb.StreamConfig()))
        q.put(pb.StreamFramesRequest(frame=pb.Frame(frame_id=1, image=raw(frames[0]))))
        call = stub.StreamFrames(iter(q.get, None), timeout=60)
        next(call)  # the stream is open and answering
        return call, q

    a, qa = open_stream()
    b, qb = open_stream()
    with pytest.raises(grpc.RpcError) as e:
        open_stream()
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error_info(e.value).reason == "STREAM_LIMIT_REACHED"
    a.cancel()
    deadline = time.monotonic() + 5
    while True:  # the cancelled stream's slot comes back at once (the server's cancel callback)
        try:
            c, qc = open_stream()
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, "a cancelled stream kept its slot"
            time.sleep(0.1)
    for call, q in ((b, qb), (c, qc)):
        q.put(None)
        list(call)


def test_protocol_errors_and_a_corrupt_frame(stub):
    frame = pb.StreamFramesRequest(frame=pb.Frame(frame_id=1, image=pb.Image(encoded=b"\xff\xd8 not a jpeg")))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamFrames(iter([frame]), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(e.value).reason == "STREAM_PROTOCOL"
    with pytest.raises(grpc.RpcError) as e:
        list(
            stub.StreamFrames(
                iter([pb.StreamFramesRequest(config=pb.StreamConfig(identify=True, collection="nope"))]), timeout=30
            )
        )
    assert error_info(e.value).reason == "COLLECTION_NOT_FOUND"
    good = video_frames(n=1)[0]
    answers = list(
        stub.StreamFrames(
            iter(
                [
                    pb.StreamFramesRequest(config=pb.StreamConfig()),
                    frame,
                    pb.StreamFramesRequest(frame=pb.Frame(frame_id=2, image=raw(good))),
                ]
            ),
            timeout=30,
        )
    )
    by_id = {a.frame_id: a for a in answers}
    if 1 in by_id:  # (frame 1 may have been replaced by frame 2 before it was processed)
        assert by_id[1].error.reason == "INVALID_IMAGE" and not by_id[1].faces
    assert by_id[2].faces and not by_id[2].HasField("error")


def test_a_collection_key_streams_only_its_own_collection(srv, stub, enrolled):
    other = "other-" + uuid.uuid4().hex[:6]
    stub.CreateCollection(pb.CreateCollectionRequest(collection=other), timeout=10)
    key = stub.CreateApiKey(pb.CreateApiKeyRequest(collection=other), timeout=10).secret
    keyed = srv.stub(key)
    cfg = pb.StreamConfig(collection=enrolled, identify=True)
    with pytest.raises(grpc.RpcError) as e:
        list(keyed.StreamFrames(iter([pb.StreamFramesRequest(config=cfg)]), timeout=30))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as e:
        list(srv.stub(None).StreamFrames(iter([pb.StreamFramesRequest(config=pb.StreamConfig())]), timeout=30))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = list(
        keyed.StreamFrames(
            iter(
                [
                    pb.StreamFramesRequest(config=pb.StreamConfig(collection=other, identify=True)),
                    pb.StreamFramesRequest(frame=pb.Frame(frame_id=7, image=raw(video_frames(n=1)[0]))),
                ]
            ),
            timeout=60,
        )
    )
    assert ok[-1].frame_id == 7 and ok[-1].faces and not ok[-1].faces[0].HasField("identity")  # nobody enrolled there
    detect_only = list(
        keyed.StreamFrames(
            iter(
                [
                    pb.StreamFramesRequest(config=pb.StreamConfig(liveness=True)),
                    pb.StreamFramesRequest(frame=pb.Frame(frame_id=1, image=raw(video_frames(n=1)[0]))),
                ]
            ),
            timeout=60,
        )
    )
    assert detect_only[-1].faces[0].HasField("liveness")  # stateless streams need no collection


# -- batches ---------------------------------------------------------------------
def test_register_batch_enrols_the_good_items_and_reports_each_failure(stub):
    coll = "batch-" + uuid.uuid4().hex[:6]
    stub.CreateCollection(pb.CreateCollectionRequest(collection=coll), timeout=10)  # liveness REQUIRED
    items = {
        "person_01/img1.jpg": ("person_01", image("dev/img1.jpg")),
        "person_04/img13.jpg": ("person_04", image("dev/img13.jpg")),
        "person_07/img20.jpg": ("person_07", image("dev/img20.jpg")),
        "broken/file.jpg": ("broken", pb.Image(encoded=b"\x89PNG\r\n\x1a\n truncated")),
        "rocket/noface.jpg": ("rocket", image("dev/noface_rocket.jpg")),
        "poster/spoof.jpg": ("poster", image("liveness/spoof_print_01_minivision_F1.jpg")),
        "intruder/img1.jpg": ("person_01", image("dev/img2.jpg")),  # already registered by the first item
    }
    reqs = (
        pb.RegisterBatchRequest(item_id=k, register=pb.RegisterRequest(collection=coll, subject_id=s, image=img))
        for k, (s, img) in items.items()
    )
    results = {r.item_id: r for r in stub.RegisterBatch(reqs, timeout=300)}
    assert list(results) == list(items)  # one answer per item, in order
    ok = [k for k, r in results.items() if r.HasField("result")]
    assert ok == ["person_01/img1.jpg", "person_04/img13.jpg", "person_07/img20.jpg"]
    reasons = {k: r.error.reason for k, r in results.items() if r.HasField("error")}
    assert reasons == {
        "broken/file.jpg": "INVALID_IMAGE",
        "rocket/noface.jpg": "NO_FACE_DETECTED",
        "poster/spoof.jpg": "SPOOF_DETECTED",
        "intruder/img1.jpg": "ALREADY_REGISTERED",
    }
    assert results["broken/file.jpg"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    listed = stub.ListSubjects(pb.ListSubjectsRequest(collection=coll), timeout=10).subjects
    assert sorted(s.subject_id for s in listed) == ["person_01", "person_04", "person_07"]


def test_process_batch_and_detect_batch(stub, enrolled):
    reqs = [
        pb.ProcessBatchRequest(
            item_id="a",
            process=pb.ProcessRequest(collection=enrolled, subject_id="p1", image=image("dev/img6.jpg"), skip_liveness=True),
        ),
        pb.ProcessBatchRequest(
            item_id="b", process=pb.ProcessRequest(collection=enrolled, subject_id="bad id!", image=image("dev/img6.jpg"))
        ),
    ]
    out = list(stub.ProcessBatch(iter(reqs), timeout=60))
    assert out[0].result.staging_token and out[1].error.reason == "VALIDATION_FAILED"
    det = stub.DetectBatch(
        pb.DetectBatchRequest(
            items=[
                pb.BatchImage(item_id="group", image=image("dev/group_t1.jpg")),
                pb.BatchImage(item_id="junk", image=pb.Image(encoded=b"junk")),
                pb.BatchImage(item_id="empty", image=image("dev/noface_coffee.jpg")),
            ]
        ),
        timeout=60,
    )
    by = {r.item_id: r for r in det.results}
    assert len(by["group"].faces) == 6 and by["junk"].error.reason == "INVALID_IMAGE" and not by["empty"].faces
    expect_error(stub.DetectBatch, pb.DetectBatchRequest(), grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_FAILED")


def test_a_tracks_liveness_is_the_median_of_its_frames(stub):
    frames = video_frames(n=10)
    answers = list(stub.StreamFrames(requests(pb.StreamConfig(liveness=True), frames, pause=0.1), timeout=60))
    counts = [a.faces[0].liveness_frames for a in answers if a.faces and a.faces[0].track_id == answers[0].faces[0].track_id]
    assert counts == sorted(counts) and 3 <= counts[-1] <= 5, counts  # one check per frame, the last 5 kept
    assert all(a.faces[0].HasField("liveness") for a in answers if a.faces)


def detection_session(pipeline, now: list[float]):
    """A detection-only stream session (no liveness, no identity) on the clock `now[0]`."""
    from server.domain.streaming import StreamSession, StreamSettings
    from server.vision.pipeline import DetectOptions

    settings = StreamSettings(
        DetectOptions(),
        liveness=False,
        identify=False,
        collection="",
        min_similarity=0.0,
        liveness_threshold=None,
        max_faces_per_subject=1,
    )
    return StreamSession(pipeline, None, settings, clock=lambda: now[0])


@contextlib.contextmanager
def counting_passes(detector):
    """Counts the detector passes run inside the block: yields a one-item list holding the count."""
    runs, real = [0], detector.detect

    def counted(*a, **k):
        runs[0] += 1
        return real(*a, **k)

    detector.detect = counted
    try:
        yield runs
    finally:
        del detector.detect


def test_a_sideways_camera_is_found_every_frame_without_turning_every_frame(pipeline):
    """A stream remembers the orientation that found its faces and tries the turned passes at most
    once a second: a sideways camera's frames are found at one turned pass each, not seven."""
    now = [0.0]
    session = detection_session(pipeline, now)
    frame = np.ascontiguousarray(np.rot90(cv2.resize(cv2.imread(str(FACES / "dev" / "img1.jpg")), (480, 640)), 1))
    found = []
    with counting_passes(pipeline.detector) as runs:
        for _ in range(10):  # a third of a second of video
            found.append(session.process(frame))
            now[0] += 1 / 30
    assert all(len(r) == 1 for r in found)
    assert {r[0].face.orientation for r in found} == {270}
    assert runs[0] <= 10 + 9 + 9, runs[0]  # the first frame searches; the others take the remembered turn


def test_an_upright_close_up_stays_upright(pipeline):
    """A close-up's face scores about as well upside down as upright where the detector is unsure
    of it: a near tie must not turn the stream, and a stream on a wrong turn comes back upright
    (it used to stay on it, reporting the face upside down at two detector passes a frame). The
    turned passes check the face once, when its track starts, not again every second while it is
    tracked: a seven-pass frame would hold up the frames behind it."""
    from scripts.bench_stream import load_clip

    frames = load_clip(FACES / "video" / "single_closeup_720p.mp4")[:120]
    now = [0.0]
    session = detection_session(pipeline, now)
    orientations = []
    with counting_passes(pipeline.detector) as runs:
        for frame in frames:  # four seconds of video
            orientations += [r.face.orientation for r in session.process(frame)]
            now[0] += 1 / 30
    assert len(orientations) >= len(frames) - 2 and set(orientations) == {0}
    assert runs[0] <= len(frames) + 6, runs[0]  # one check of seven passes, then one pass a frame
    wrong = detection_session(pipeline, now)
    wrong.orientation = 180  # as if a turn had won
    for frame in frames[:3]:
        wrong.process(frame)
        now[0] += 1 / 30
    assert wrong.orientation == 0


@pytest.mark.parametrize("turn", [1, 2])
def test_a_camera_turned_under_a_tracked_face_is_followed(pipeline, turn):
    """A camera turned while its face stays in view: the stream does not keep the orientation its
    track started with. Turned by a quarter, the face's landmarks or box give it away and the next
    check comes within TURN_EVERY_S; upside down it can look upright, and RECHECK_TURNS_S bounds it."""
    from server.domain.streaming import RECHECK_TURNS_S, TURN_EVERY_S

    now = [0.0]
    session = detection_session(pipeline, now)
    upright = cv2.resize(cv2.imread(str(FACES / "dev" / "img1.jpg")), (480, 640))
    turned = np.ascontiguousarray(np.rot90(upright, turn))
    for _ in range(5):
        assert [r.face.orientation for r in session.process(upright)] == [0]
        now[0] += 1 / 30
    bound = (TURN_EVERY_S if turn == 1 else RECHECK_TURNS_S) + 0.5
    t_turned, seen = now[0], []
    while now[0] - t_turned < bound and seen[-1:] != [(4 - turn) * 90 % 360]:
        seen += [r.face.orientation for r in session.process(turned)]
        now[0] += 1 / 30
    assert seen[-1:] == [(4 - turn) * 90 % 360], (turn, seen[-5:], now[0] - t_turned)


def test_a_batch_stream_holds_a_bounded_number_of_bytes():
    """Batch items may be as large as a message (32 MB). The reader reads ahead up to a byte bound
    and a group stops growing at another, each letting one item past it: 16 items read ahead and 8
    at work held over a gigabyte for one stream."""
    from server.rpc.handlers.streams import RequestReader, _groups

    mb = 1024 * 1024
    pulled = []

    def items():
        for i in range(12):
            pulled.append(i)
            raw = pb.RawFrame(width=1, height=1, format=pb.PIXEL_FORMAT_BGR, data=bytes(6 * mb))
            yield pb.ProcessBatchRequest(item_id=str(i), process=pb.ProcessRequest(image=pb.Image(raw=raw)))

    reader = RequestReader(items(), maxsize=16, max_bytes=16 * mb)
    time.sleep(0.5)  # nothing taken yet: two items queued (12 MB), a third waits for room
    assert len(pulled) == 3 and reader.queued_bytes() <= 16 * mb
    groups = list(_groups(reader, 8, 5, 5, lambda: None, max_bytes=16 * mb))
    assert [item.item_id for group in groups for item in group] == [str(i) for i in range(12)]
    assert max(sum(item.ByteSize() for item in group) for group in groups) < 16 * mb + 6.1 * mb
    assert reader.queued_bytes() == 0


def test_a_camera_of_small_frames_fits_a_streams_budget_and_a_trickle_of_bombs_does_not():
    """A 30 fps camera of 250 x 250 JPEGs (10 KB each) pays for almost no detector pass with its
    bytes: at a refill of two thirds of a floor a second it lost a third of its frames to
    IMAGE_TOO_LARGE. Frames of tiny bytes that decode to the most pixels an image may have are
    still held to about two and a half a second, and a stream idle for long saves no more than two
    floors of refill for a burst."""
    from server import errors
    from server.vision.imaging import ImageLimits

    now = [0.0]
    limits = ImageLimits()
    camera = limits.stream_budget(clock=lambda: now[0])
    for i in range(30 * 60):  # a minute of frames, each with its one plain detector pass
        now[0] = i / 30
        camera.received(10_000)
        camera.charge(250 * 250, "frame.image")
    bombs, passed = limits.stream_budget(clock=lambda: now[0]), 0
    for i in range(600):  # ten a second for a minute, 100 bytes each
        now[0] = 60 + i / 10
        bombs.received(100)
        try:
            bombs.charge(limits.max_pixels, "frame.image")
            passed += 1
        except errors.FaceServiceError as exc:
            assert exc.reason == "IMAGE_TOO_LARGE"
    assert passed <= 2.5 * 60, passed  # each about 40 ms of decoding: a tenth of a core
    # an hour with nothing sent saves no more than two floors for the next burst
    now[0] += 3600
    burst = 0
    for i in range(100):  # ten a second for ten seconds
        now[0] += 0.1
        bombs.received(100)
        try:
            bombs.charge(limits.max_pixels, "frame.image")
            burst += 1
        except errors.FaceServiceError:
            pass
    assert burst <= (2 + 2 * 10) * limits.max_request_pixels // (limits.max_pixels + 1_500_000) + 1, burst


def test_an_identifying_stream_is_in_the_audit_log_with_whom_it_identified(srv, stub, enrolled):
    """Search is audited; a stream that identified people about once a second, and a listing of a
    collection's subjects with their metadata, left no trace under the key that made them."""
    key = stub.CreateApiKey(pb.CreateApiKeyRequest(collection=enrolled), timeout=10)
    keyed = srv.stub(key.secret)
    answers = lockstep(keyed, pb.StreamConfig(collection=enrolled, identify=True), video_frames(n=40)[30:34])
    assert all(a.faces[0].identity.subject_id == "closeup-woman" for a in answers)
    keyed.ListSubjects(pb.ListSubjectsRequest(collection=enrolled), timeout=10)
    events = stub.ListAuditEvents(pb.ListAuditEventsRequest(collection=enrolled, page_size=1000), timeout=10).events
    mine = [(e.action, e.subject_id, e.outcome) for e in reversed(events) if e.key_id == key.key.key_id]
    assert mine == [("StreamFrames", "", "OK"), ("StreamFrames", "closeup-woman", "OK"), ("ListSubjects", "", "OK")]
