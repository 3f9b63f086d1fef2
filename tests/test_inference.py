"""Micro-batching of embeddings: concurrent callers share recognizer calls and each gets its own rows back."""

from __future__ import annotations

import threading
import time

import cv2
import grpc
import numpy as np

from server import errors
from server.context import current_call
from server.vision.models.batching import MicroBatcher
from server.vision.models.recognizer import ArcFaceRecognizer
from server.vision.pipeline import DetectOptions
from tests.conftest import FACES, face_path


class Ended:
    """What a gRPC servicer context of an ended call answers (is_active / time_remaining)."""

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0


def slow_double(log: list[int]):
    def fn(rows: np.ndarray) -> np.ndarray:
        log.append(len(rows))
        time.sleep(0.05)
        return rows * 2

    return fn


def run_threads(batcher, inputs, before=None):
    out: dict[int, object] = {}

    def call(i):
        if before:
            before(i)
        try:
            out[i] = batcher(inputs[i])
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            out[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
        time.sleep(0.002)
    for t in threads:
        t.join(10)
    return out


def test_concurrent_callers_share_calls_and_get_their_own_rows():
    log: list[int] = []
    batcher = MicroBatcher(slow_double(log), max_batch=8)
    inputs = [np.full((1 + i % 2, 3), i, np.float32) for i in range(12)]
    out = run_threads(batcher, inputs)
    for i, x in enumerate(inputs):
        assert np.array_equal(out[i], x * 2), i
    assert sum(log) == sum(len(x) for x in inputs)
    assert len(log) < len(inputs) and max(log) <= 8
    assert batcher.calls == len(log)


def test_idle_caller_runs_at_once():
    log: list[int] = []
    batcher = MicroBatcher(slow_double(log), max_batch=8)
    t0 = time.perf_counter()
    assert np.array_equal(batcher(np.ones((2, 3))), np.full((2, 3), 2.0))
    assert time.perf_counter() - t0 < 0.5 and log == [2]


def test_dead_call_is_dropped_and_the_others_still_answered():
    log: list[int] = []
    batcher = MicroBatcher(slow_double(log), max_batch=8)
    inputs = [np.full((1, 3), i, np.float32) for i in range(6)]
    out = run_threads(batcher, inputs, before=lambda i: current_call.set(Ended() if i == 3 else None))
    assert isinstance(out[3], errors.FaceServiceError) and out[3].reason == errors.CALL_ENDED
    assert out[3].code == grpc.StatusCode.DEADLINE_EXCEEDED
    for i in (0, 1, 2, 4, 5):
        assert np.array_equal(out[i], inputs[i] * 2)
    assert sum(log) == 5  # the dead call's row never reached the model


def test_a_failing_batch_fails_each_member_and_the_batcher_recovers():
    calls = []

    def flaky(rows):
        calls.append(len(rows))
        time.sleep(0.03)
        if len(calls) == 1:
            raise RuntimeError("model failed")
        return rows + 1

    batcher = MicroBatcher(flaky, max_batch=4)
    out = run_threads(batcher, [np.zeros((1, 2))] * 5)
    failed = [i for i, r in out.items() if isinstance(r, RuntimeError)]
    assert failed == [0]  # the first caller ran alone and failed; the four queued behind it share a good call
    assert all(np.array_equal(r, np.ones((1, 2))) for i, r in out.items() if i not in failed)
    assert np.array_equal(batcher(np.zeros((1, 2))), np.ones((1, 2)))  # not stuck busy


def test_real_recognizer_batched_under_threads_equals_one_by_one(pipeline):
    base = pipeline.recognizer
    rec = ArcFaceRecognizer(base.session, base.name, base.embedding_dim, base.match_threshold, micro_batch=True)
    files = sorted((FACES / "lfw").glob("*/*.jpg"))[:8] + [face_path("dev/img1.jpg"), face_path("dev/img13.jpg")]
    faces = [f for p in files for f in pipeline.detect(cv2.imread(str(p)), DetectOptions())[:1]]
    assert len(faces) == len(files)
    crops = [f.aligned for f in faces]
    alone = np.concatenate([rec.embed([c]) for c in crops])
    before = rec.batcher.calls
    out = run_threads(lambda c: rec.embed([c]), crops * 4)
    got = np.stack([out[i][0] for i in range(len(crops) * 4)])
    np.testing.assert_allclose(got, np.tile(alone, (4, 1)), atol=2e-5)
    assert rec.batcher.calls - before < len(crops) * 4  # some calls were shared


def test_cpu_models_run_spinning_alone_and_quiet_beside_others(ort_pipeline):
    """On onnxruntime each CPU model has a spinning session for a run that has the CPU alone, a quiet
    one otherwise; both give the same answer."""
    from server.context import IN_FLIGHT, serving
    from server.vision.models.runtime import RUNS, CpuSessionPair

    pipeline = ort_pipeline
    pair = pipeline.recognizer.session._session
    assert isinstance(pair, CpuSessionPair) and pair.spinning is not pair.quiet
    used = []

    class Spy:  # records which of the two real sessions served the run
        def __init__(self, name, sess):
            self.name, self.sess = name, sess

        def run(self, *a, **k):
            used.append(self.name)
            return self.sess.run(*a, **k)

        def __getattr__(self, attr):
            return getattr(self.sess, attr)

    spinning, quiet = pair.spinning, pair.quiet
    pair.spinning, pair.quiet = Spy("spinning", spinning), Spy("quiet", quiet)
    try:
        crop = np.zeros((1, 3, 112, 112), np.float32)
        inp, out = pair.get_inputs()[0].name, pair.get_outputs()[0].name
        with serving():
            alone = pair.run([out], {inp: crop})[0]
        with serving(), serving():  # another call in flight
            beside = pair.run([out], {inp: crop})[0]
        RUNS.enter()  # another model run in flight
        try:
            pair.run([out], {inp: crop})
        finally:
            RUNS.leave()
    finally:
        pair.spinning, pair.quiet = spinning, quiet
    assert used == ["spinning", "quiet", "quiet"]
    np.testing.assert_allclose(alone, beside, atol=1e-5)
    assert IN_FLIGHT.value == 0 and RUNS.active == 0
