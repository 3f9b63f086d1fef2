"""The runtimes agree: every model gives the same answers on OpenVINO (the CPU default) and on
onnxruntime (the fallback), so the thresholds calibrated on one hold for the other."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import cv2
import numpy as np
import pytest

from server import config
from server.assembly import model_loader
from server.vision.alignment import arcface_crop
from server.vision.models.detection import iou
from server.vision.models.runtime import RuntimeOptions, choose_runtime, native_bf16, resolve_precision
from server.vision.pipeline import DetectOptions, FacePipeline, upright
from tests.conftest import FACES, face_path

OPTS = DetectOptions(min_face_size=10)
PHOTOS = [
    "dev/img1.jpg",
    "dev/img3.jpg",
    "dev/group_t1.jpg",
    "lfw/Anthony_Fauci/Anthony_Fauci_0002.jpg",
    "lfw/Ann_Godbehere/Ann_Godbehere_0001.jpg",
    *(str(p.relative_to(FACES)) for p in sorted((FACES / "liveness").glob("*.jpg"))),
]


def read(rel: str) -> np.ndarray:
    img = cv2.imread(str(face_path(rel)))
    assert img is not None, rel
    return img


def test_the_cpu_default_is_openvino_and_cuda_stays_with_onnxruntime(pipeline, ort_pipeline):
    assert {r["runtime"] for r in pipeline.runtimes} == {"openvino"}
    assert {r["runtime"] for r in ort_pipeline.runtimes} == {"onnxruntime"}
    cpu, cuda = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_runtime(RuntimeOptions(), cpu) == "openvino"
    assert choose_runtime(RuntimeOptions(), cuda) == "onnxruntime"
    assert choose_runtime(RuntimeOptions(runtime="onnxruntime"), cpu) == "onnxruntime"
    with pytest.raises(ValueError):
        choose_runtime(RuntimeOptions(runtime="tensorrt"), cpu)


def test_bf16_only_where_the_cpu_has_it():
    native = native_bf16()
    assert resolve_precision("auto") == ("bf16" if native else "f32")
    assert resolve_precision("bf16") == ("bf16" if native else "f32")  # never emulated
    assert resolve_precision("f32") == "f32"


@pytest.fixture(scope="module")
def f32_pipeline(pipeline):
    """OpenVINO in f32: the default pipeline itself where the CPU has no native bf16."""
    from server.assembly import build_pipeline

    return build_pipeline(config.load([], environ={"FACESVC_PRECISION": "f32"})) if native_bf16() else pipeline


@pytest.mark.parametrize("precision", ["f32", "auto"])
@pytest.mark.parametrize("rel", PHOTOS)
def test_boxes_landmarks_embeddings_liveness_and_attributes_agree(pipeline, f32_pipeline, ort_pipeline, rel, precision):
    """OpenVINO f32 and onnxruntime agree within a pixel. The default (auto) runs the detector and
    recognizer in bf16 where the CPU has it: bf16 keeps 8 bits of mantissa, which moves a box by up
    to about 2 pixels of the detector's input; every other model stays f32 (registry.py)."""
    if precision == "auto" and not native_bf16():
        pytest.skip("auto is f32 on this CPU: the f32 case covers it")
    pipeline = f32_pipeline if precision == "f32" else pipeline
    img = read(rel)
    ov_faces, ort_faces = pipeline.detect(img, OPTS), ort_pipeline.detect(img, OPTS)
    assert len(ov_faces) == len(ort_faces) > 0
    # in pixels of the photo: the detector sees it downscaled to its side
    px = 1.0 if precision == "f32" else 2.0 * max(1.0, max(img.shape[:2]) / pipeline.detect_max_side)
    for a, b in zip(ov_faces, ort_faces):
        assert np.abs(a.box - b.box).max() <= px, (a.box, b.box)
        assert np.abs(a.landmarks - b.landmarks).max() <= px
        assert abs(a.score - b.score) < 0.01
    # the same crops into both recognizers: the recognizer, not the detector, is under test here
    crops = [f.aligned for f in ov_faces]
    cos = np.sum(pipeline.recognizer.embed(crops) * ort_pipeline.recognizer.embed(crops), axis=1)
    assert cos.min() >= 0.999, cos
    face = ov_faces[0]
    turned, up = upright(img, face)
    for m_ov, m_ort in zip(pipeline.liveness_models, ort_pipeline.liveness_models):
        assert abs(m_ov.score(turned, up.box) - m_ort.score(turned, up.box)) <= 0.01, m_ov.name
    # the same face into both attribute models
    a, b = (replace(face, attributes={}) for _ in range(2))
    pipeline.analyze(img, [a])
    ort_pipeline.analyze(img, [b])
    assert abs(a.attributes["age"].age - b.attributes["age"].age) < 0.5
    assert abs(a.attributes["gender"] - b.attributes["gender"]) < 0.01


def wait_for_graph(session, key: tuple) -> None:
    """Until the background compiler has built `session`'s graph for the input shape `key`."""
    deadline = time.monotonic() + 60
    while not session.specialised(key) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session.specialised(key), list(session._shaped)


def test_a_frame_shape_gets_its_own_graph_with_the_same_answers():
    """SCRFD runs on each frame's own shape, on a graph compiled in the background on the shape's
    first call; in f32 the dynamic graph answers meanwhile, with the same boxes. The number of shapes
    compiled is bounded, so no caller can make the server compile (and hold memory) without end."""
    det = model_loader(config.load([], environ={"FACESVC_PRECISION": "f32"})).build("scrfd_500m", "detector")
    session = det.session._session
    img = cv2.resize(read("dev/img1.jpg"), (640, 416))  # a shape no other test sends
    first = det.detect(img)
    key = ((det.input_name, (1, 416, 640, 3)),)  # the pixels it is fed (PixelInput)
    wait_for_graph(session, key)
    second = det.detect(img)
    assert len(first[0]) == len(second[0]) > 0
    assert np.abs(first[0] - second[0]).max() <= 1.0
    # the small-face pass's 1280 px copy of a large frame keeps to the dynamic graph (memory)
    det.detect(np.zeros((960, 1280, 3), np.uint8), input_size=1280)
    assert ((det.input_name, (1, 960, 1280, 3)),) not in session._shaped
    for side in range(320, 640 + 32 * session.MAX_SHAPES, 32):  # more shapes than the bound
        det.detect(np.zeros((side, 640, 3), np.uint8))
    assert len(session._shaped) == session.MAX_SHAPES


def write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_cpu_quota_is_read_from_either_cgroup_version_and_the_tightest_level_counts(tmp_path):
    from server.cpus import cpu_quota

    v2 = tmp_path / "v2"
    write(v2 / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")  # the pod: 1.5 cores
    write(v2 / "kubepods" / "cpu.max", "400000 100000\n")
    write(v2 / "cpu.max", "max 100000\n")
    assert cpu_quota(v2, "0::/kubepods/pod1\n") == 1.5
    write(v2 / "kubepods" / "cpu.max", "100000 100000\n")  # a parent's tighter limit binds the pod
    assert cpu_quota(v2, "0::/kubepods/pod1\n") == 1.0
    assert cpu_quota(v2, "0::/\n") is None  # unlimited
    # a cgroup namespace shows the container's group as the root, under whatever name /proc says
    ns = tmp_path / "ns"
    write(ns / "cpu.max", "50000 100000\n")
    assert cpu_quota(ns, "0::/docker/abc\n") == 0.5
    v1 = tmp_path / "v1"
    write(v1 / "cpu,cpuacct" / "cpu.cfs_quota_us", "200000\n")
    write(v1 / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(v1, "4:memory:/\n3:cpu,cpuacct:/\n") == 2.0
    write(v1 / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    assert cpu_quota(v1, "3:cpu,cpuacct:/\n") is None
    assert cpu_quota(tmp_path / "nothing", "0::/\n") is None


def test_under_a_cpu_quota_the_runtimes_start_a_thread_per_allowed_core(monkeypatch):
    """Neither runtime reads the quota: on a 64-core host with `--cpus=1` each would start 64 threads
    per run and be throttled. The quota's cores (rounded down) are what they get, and with one core
    OpenVINO compiles the lone-run graph only and onnxruntime one quiet session."""
    from server import cpus
    from server.vision.models.runtime import CpuSessionPair, OpenVinoSession, cpu_cores

    if cpu_cores() < 2:
        pytest.skip("needs two cores for a quota to bind")
    monkeypatch.setattr(cpus, "cpu_quota", lambda: 1.6)  # Kubernetes limits.cpu: 1600m
    assert cpus.cpu_cores() == 1 and cpus.quota_threads() == 1
    loader = model_loader(config.load([], environ={"FACESVC_PRECISION": "f32"}))
    ov = loader.build("w600k_mbf", "recognizer").session._session
    assert isinstance(ov, OpenVinoSession) and ov.modes == ("latency",)
    assert ov._dynamic.compiled["latency"].get_property("INFERENCE_NUM_THREADS") == 1
    ort = model_loader(config.load([], environ={"FACESVC_RUNTIME": "onnxruntime"})).build("w600k_mbf", "recognizer")
    session = ort.session._session
    assert not isinstance(session, CpuSessionPair)
    assert session.get_session_options().intra_op_num_threads == 1
    monkeypatch.setattr(cpus, "cpu_quota", lambda: 3.0)  # more than the cores it may run on: no say
    assert cpus.quota_threads() == 0 and cpus.cpu_cores() == cpus._affinity()


def test_in_bf16_a_shape_gets_the_same_answer_from_its_first_call_on():
    """bf16 kernels of the dynamic and the shaped graph round differently: the first call of a shape
    waits for its own graph, so a photo's boxes (and its embedding, its scores) never change once the
    shape's graph is ready."""
    if not native_bf16():
        pytest.skip("no native bf16 on this CPU")
    det = model_loader(config.load([], environ={"FACESVC_PRECISION": "bf16"})).build("scrfd_500m", "detector")
    img = cv2.resize(read("dev/img1.jpg"), (448, 640))
    first = det.detect(img)
    session, key = det.session._session, ((det.input_name, (1, 640, 448, 3)),)
    wait_for_graph(session, key)
    again = det.detect(img)
    assert len(first[0]) == len(again[0]) > 0
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])


def test_threads_each_get_their_own_answers(pipeline):
    """An OpenVINO infer request is not thread-safe: every thread has its own, so concurrent
    callers never see each other's outputs."""
    faces = pipeline.detect(read("dev/group_t1.jpg"), OPTS)
    crops = [f.aligned for f in faces]
    alone = pipeline.recognizer.embed(crops)
    out: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        for _ in range(5):
            out[i] = pipeline.recognizer.embed([crops[i % len(crops)]])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, e in out.items():
        assert float(e @ alone[i % len(crops)]) > 0.9999, i


def test_the_auto_hint_runs_a_lone_call_on_every_core_and_company_a_thread_each(pipeline):
    """FACESVC_OPENVINO_HINT=auto (the default): a model's latency graph at start-up; once a run has
    company, a graph of one thread per run while no more runs are in flight than there are cores,
    and the throughput graph (a stream per core) beyond; which one a run takes depends on what else
    runs, and all give the same embedding."""
    from server.vision.models.manifest import DEFAULT_MODEL_DIR, load_manifest
    from server.vision.models.runtime import COMPILER, OpenVinoSession, RunCounter, cpu_cores

    path = str(DEFAULT_MODEL_DIR / load_manifest()["w600k_mbf"].file)
    runs = RunCounter()
    session = OpenVinoSession(path, RuntimeOptions(runtime="openvino", hint="auto"), runs)
    if cpu_cores() == 1:
        assert session.modes == ("latency",)
        pytest.skip("one core: no second stream to run on")
    assert session.modes == ("latency", "single", "throughput")
    assert OpenVinoSession(path, RuntimeOptions(runtime="openvino", hint="latency"), runs).modes == ("latency",)
    crop = pipeline.detect(read("dev/img1.jpg"), OPTS)[0].aligned
    name = session.get_inputs()[0].name
    blob = np.ascontiguousarray(((crop[:, :, ::-1] - 127.5) / 127.5).transpose(2, 0, 1)[None], dtype=np.float32)

    def graphs_used() -> set[str]:
        requests = getattr(session._local, "requests", {})
        return {mode for mode, compiled in session._dynamic.compiled.items() if id(compiled) in requests}

    def run_with_company(others: int) -> np.ndarray:
        for _ in range(others):  # other models' runs in flight
            runs.enter()
        try:
            session.run(None, {name: blob})  # the graph is compiled on first need; another answers meanwhile
            assert COMPILER.wait_idle(60)
            return session.run(None, {name: blob})[0]
        finally:
            for _ in range(others):
                runs.leave()

    alone = session.run(None, {name: blob})[0]
    assert graphs_used() == {"latency"} and set(session._dynamic.compiled) == {"latency"}
    one_other = run_with_company(1)
    assert graphs_used() == {"latency", "single"} and set(session._dynamic.compiled) == {"latency", "single"}
    beyond_the_cores = run_with_company(cpu_cores())
    assert graphs_used() == {"latency", "single", "throughput"}
    graphs = session._dynamic.compiled
    # the one-thread graph has one stream: a run that finds it busy takes the throughput graph's
    # other stream rather than queue behind the run on it
    busy = session._busy(graphs["single"])
    with busy:
        runs.enter()
        try:
            taken = []
            real = session._request
            session._request = lambda compiled: taken.append(compiled) or real(compiled)
            session.run(None, {name: blob})
        finally:
            session._request = real
            runs.leave()
    assert taken == [graphs["throughput"]]
    assert not busy.locked()
    assert graphs["single"].get_property("INFERENCE_NUM_THREADS") == 1
    # the graphs' threads float across the cores, which the calls' own work shares with them
    assert graphs["single"].get_property("ENABLE_CPU_PINNING") is False
    assert graphs["throughput"].get_property("ENABLE_CPU_PINNING") is False
    for company in (one_other, beyond_the_cores):
        cos = float((alone @ company.T).item() / np.linalg.norm(alone) / np.linalg.norm(company))
        assert cos > 0.999, cos
    assert runs.active == 0


def test_boxes_from_both_runtimes_overlap_on_every_face_of_the_group(pipeline, ort_pipeline):
    img = read("dev/group_t1.jpg")
    a = np.stack([f.box for f in pipeline.detect(img, OPTS)])
    b = np.stack([f.box for f in ort_pipeline.detect(img, OPTS)])
    assert len(a) == len(b) == 6
    assert (iou(a, b).max(axis=1) > 0.98).all()


# -- int8 (models/quantize.py, `make int8`) -------------------------------------------------------------
@pytest.fixture(scope="module")
def int8_pipeline():
    from server.assembly import build_pipeline

    return build_pipeline(config.load([], environ={"FACESVC_PRECISION": "int8"}))


def test_int8_runs_the_quantized_detector_and_recognizer_and_the_rest_as_auto(pipeline, int8_pipeline):
    where = {r["model"]: r["precision"] for r in int8_pipeline.runtimes}
    assert where["scrfd_500m"] == where["w600k_mbf"] == "int8"
    auto = {r["model"]: r["precision"] for r in pipeline.runtimes}
    assert {m: p for m, p in where.items() if p != "int8"} == {m: p for m, p in auto.items() if where.get(m) != "int8"}


def test_auto_runs_bf16_only_on_the_models_checked_in_bf16(pipeline):
    """The liveness, age and gender scores the thresholds were calibrated on stay f32 everywhere."""
    where = {r["model"]: r["precision"] for r in pipeline.runtimes}
    reduced = resolve_precision("auto")
    assert where["scrfd_500m"] == where["w600k_mbf"] == reduced
    assert {p for m, p in where.items() if m not in ("scrfd_500m", "w600k_mbf")} == {"f32"}


@pytest.mark.parametrize("rel", PHOTOS)
def test_int8_finds_the_same_faces_with_embeddings_close_to_float(pipeline, int8_pipeline, rel):
    img = read(rel)
    f32, i8 = pipeline.detect(img, OPTS), int8_pipeline.detect(img, OPTS)
    assert len(i8) == len(f32) > 0
    assert (iou(np.stack([f.box for f in f32]), np.stack([f.box for f in i8])).max(axis=1) > 0.85).all()
    crops = [f.aligned for f in f32]  # the same crops into both recognizers
    cos = np.sum(pipeline.recognizer.embed(crops) * int8_pipeline.recognizer.embed(crops), axis=1)
    # quantization noise is spread over the whole network (no layer kept in float narrows it): about
    # 0.98 on average, a few faces lower; the decisions test below is the one that matters
    assert cos.min() >= 0.93, cos


def test_int8_decides_labelled_pairs_as_float_does(pipeline, int8_pipeline):
    """Quantization moves embeddings a little; what must not move is the decision at the stored threshold."""
    import csv

    rows = list(csv.DictReader(open(FACES / "lfw" / "pairs.csv")))[::12][:60]
    decisions = {}
    for name, pipe in (("f32", pipeline), ("int8", int8_pipeline)):
        got = []
        for r in rows:
            a, b = (pipe.detect(read(f"lfw/{r[k]}"), OPTS) for k in ("file_a", "file_b"))
            ea, eb = pipe.embed(a[:1]), pipe.embed(b[:1])
            got.append(float(ea[0] @ eb[0]) >= pipe.recognizer.match_threshold)
        decisions[name] = np.array(got)
    truth = np.array([r["same"] == "1" for r in rows])
    assert truth.any() and (~truth).any()
    assert (decisions["f32"] == decisions["int8"]).mean() >= 0.98
    assert (decisions["int8"] == truth).mean() >= (decisions["f32"] == truth).mean() - 0.02


def test_an_int8_file_that_is_not_the_one_quantize_wrote_is_refused(tmp_path):
    import json
    import shutil

    from server.vision.models.manifest import DEFAULT_MODEL_DIR, ModelFileError, int8_path, load_manifest

    spec = load_manifest()["scrfd_500m"]
    xml = DEFAULT_MODEL_DIR / spec.int8
    for p in (xml, xml.with_suffix(".bin"), xml.with_suffix(".json")):
        shutil.copy(p, tmp_path / p.name)
    assert int8_path(spec, tmp_path) == tmp_path / spec.int8
    weights = tmp_path / xml.with_suffix(".bin").name
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="make int8"):
        int8_path(spec, tmp_path)
    shutil.copy(xml.with_suffix(".bin"), weights)
    note = json.loads((tmp_path / xml.with_suffix(".json").name).read_text())
    (tmp_path / xml.with_suffix(".json").name).write_text(json.dumps({**note, "source_sha256": "0" * 64}))
    with pytest.raises(ModelFileError, match="another float file"):
        int8_path(spec, tmp_path)


def test_int8_needs_openvino():
    with pytest.raises(ValueError, match="int8 runs on OpenVINO"):
        model_loader(config.load([], environ={"FACESVC_PRECISION": "int8", "FACESVC_RUNTIME": "onnxruntime"})).build(
            "scrfd_500m", "detector"
        )


FIRST_CALLS = """
import os, sys, threading
import numpy as np
from server.vision.models.runtime import OpenVinoSession, RuntimeOptions
s = OpenVinoSession(sys.argv[1], RuntimeOptions(runtime="openvino"))
name = s.get_inputs()[0].name
threads = [threading.Thread(target=s.run, args=(None, {name: np.zeros((1, 3, 480, 640), np.float32)})) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("answered", flush=True)
os._exit(0)  # as the server leaves: a shape compiling in the background must not hold the exit
"""


def test_a_fresh_process_answers_its_first_concurrent_calls():
    """The first touch of a tensor's data builds statics in OpenVINO's Python binding; two threads
    doing it at once deadlocked a fresh server (CI saw one stop answering under its first
    concurrent calls). The session warms up on the loading thread, so 8 first calls all answer."""
    import subprocess
    import sys

    from server.vision.models.manifest import DEFAULT_MODEL_DIR, load_manifest
    from tests.conftest import ROOT

    path = str(DEFAULT_MODEL_DIR / load_manifest()["scrfd_500m"].file)
    for _ in range(4):
        out = subprocess.run([sys.executable, "-c", FIRST_CALLS, path], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "answered" in out.stdout, out.stderr[-2000:]


def test_the_compiler_says_when_its_queue_is_done():
    """Scripts wait for the background compilations before they exit (an exit mid-compilation aborts)."""
    from server.vision.models.runtime import _Compiler

    compiler, release, done = _Compiler(), threading.Event(), []
    compiler.submit(lambda: (release.wait(10), done.append(1)))
    compiler.submit(done.append, 2)
    assert not compiler.wait_idle(0.2)
    release.set()
    assert compiler.wait_idle(10) and done == [1, 2]


@pytest.fixture(scope="module")
def loader():
    """Builds models on onnxruntime, each new: the tests below change their sessions."""
    return model_loader(config.load([], environ={"FACESVC_RUNTIME": "onnxruntime"}))


class Recording:
    """A session that notes the input shape of every run and passes it on."""

    def __init__(self, session):
        self.session, self.shapes = session, set()

    def run(self, names, feed):
        self.shapes.add(next(iter(feed.values())).shape)
        return self.session.run(names, feed)

    def __getattr__(self, name):
        return getattr(self.session, name)


def test_fixed_shapes_keep_the_answers_with_few_shapes(loader):
    """Where each new input shape is costly (CUDA: TimedSession.fixed_shapes), the detector takes a
    square canvas per input side and the recognizer batches of a power of two rows. The same switch
    on onnxruntime's CPU: the same faces and embeddings as with shapes as they come, and only those
    shapes reach the runtime."""
    det, rec = loader.build("scrfd_500m", "detector"), loader.build("w600k_mbf", "recognizer")
    base = read("dev/img1.jpg")
    frames = [read(rel) for rel in PHOTOS] + [cv2.resize(base, size) for size in ((640, 360), (300, 500), (1280, 720))]
    crops = []
    det.session._session = Recording(det.session._session)
    for img in frames:
        det.session.fixed_shapes = False
        own = det.detect(img)
        det.session.fixed_shapes = True
        square = det.detect(img)
        assert len(own[0]) == len(square[0]) > 0
        px = max(1.0, max(img.shape[:2]) / det.input_size)  # a pixel of the detector's input
        assert np.abs(own[0] - square[0]).max() <= px and np.abs(own[1] - square[1]).max() <= px
        crops += [arcface_crop(img, lm) for lm in own[1]]
    # the detector is fed its pixels, N x H x W x 3 (PixelInput)
    assert len({s for s in det.session._session.shapes if s[1] != s[2]}) > 1  # as they come: many shapes
    det.session._session.shapes.clear()
    for img in frames:
        det.detect(img)
    assert {s[1:3] for s in det.session._session.shapes} == {(640, 640)}

    rec.session._session = Recording(rec.session._session)
    for n in (1, 3, 5, 9, len(crops)):
        rec.session.fixed_shapes = False
        own = rec.embed(crops[:n])
        rec.session.fixed_shapes = True
        padded = rec.embed(crops[:n])
        assert padded.shape == own.shape and np.sum(own * padded, axis=1).min() >= 0.9999
    assert {s[0] for s in rec.session._session.shapes} >= {3, 5, 9}  # as they came
    rec.session._session.shapes.clear()
    for n in range(1, len(crops) + 1):
        rec.embed(crops[:n])
    assert {s[0] for s in rec.session._session.shapes} <= {1, 2, 4, 8, 16, 32}

    # a pipeline on such a runtime runs every one of those shapes once before its first caller;
    # on shapes as they come, the finder's passes over a 640x480 frame (upright and turned) and one face
    pipeline = FacePipeline(det, rec, liveness=[], attribute_models=[])
    det.session._session.shapes.clear()
    rec.session._session.shapes.clear()
    det.session.fixed_shapes = rec.session.fixed_shapes = False
    pipeline.warm_up()
    assert {(480, 640), (640, 480)} <= {s[1:3] for s in det.session._session.shapes}
    assert {s[0] for s in rec.session._session.shapes} == {1}
    det.session._session.shapes.clear()
    rec.session._session.shapes.clear()
    det.session.fixed_shapes = rec.session.fixed_shapes = True
    pipeline.warm_up()
    assert {s[1:3] for s in det.session._session.shapes} == {(640, 640), (1280, 1280)}
    assert {s[0] for s in rec.session._session.shapes} == {1, 2, 4, 8, 16, 32}


def test_yunet_keeps_to_the_input_side_its_graph_takes(loader):
    """YuNet's graph is fixed at 640 px: no small-face pass at another side, in a warm-up or on a
    large empty frame, whatever the runtime or the downscale side."""
    yunet = loader.build("yunet", "detector")
    pipeline = FacePipeline(yunet, loader.build("w600k_mbf", "recognizer"), liveness=[], attribute_models=[], detect_max_side=300)
    yunet.session._session = Recording(yunet.session._session)
    pipeline.warm_up()
    assert pipeline.detect(np.zeros((1080, 1920, 3), np.uint8), OPTS) == []
    yunet.session.fixed_shapes = True
    pipeline.warm_up()
    assert {s[1:3] for s in yunet.session._session.shapes} == {(640, 640)}


def test_padded_rows_keep_the_answers_of_every_batch_model(loader):
    """Where the runtime keeps to few shapes, a batch pads to a power of two rows (at most the cap,
    which need not be one); the age and gender models answer each face as unpadded."""
    from server.vision.models.runtime import padded_rows, row_counts

    class Fixed:
        fixed_shapes = True

    rows = np.ones((5, 3))
    assert padded_rows(Fixed(), rows).shape == (8, 3) and padded_rows(Fixed(), rows, cap=6).shape == (6, 3)
    assert padded_rows(Fixed(), rows[:0]).shape == (0, 3) and padded_rows(object(), rows) is rows
    assert row_counts(Fixed(), 24) == [1, 2, 4, 8, 16, 24] and row_counts(object(), 24) == [1]

    img = read("dev/group_t1.jpg")
    faces = loader.build("scrfd_500m", "detector").detect(img)[1][:5]
    assert len(faces) == 5
    for name in ("age_dlib", "gender_dlib"):
        model = loader.build(name, ("age", "gender"))
        model.session._session = Recording(model.session._session)
        run = model.estimate if name == "age_dlib" else model.classify
        own = run(img, list(faces))
        model.session.fixed_shapes = True
        padded = run(img, list(faces))
        assert np.allclose(own, padded, atol=1e-4) and {s[0] for s in model.session._session.shapes} == {5, 8}
