"""Server lifecycle, configuration and the model fetch step."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from server import config, hugepages
from server.app import FaceServer
from server.vision.models.runtime import choose_providers
from tests.conftest import PYTHON, ROOT, ServerProcess, expect_error, image

WEIGHTS = ROOT / "models" / "weights"


def open_env(tmp_path) -> dict[str, str]:
    """A server with auth off and its database in tmp_path."""
    return {"FACESVC_AUTH": "false", "FACESVC_DATA_DIR": str(tmp_path / "data")}


def test_health_is_not_serving_until_models_load(tmp_path):
    settings = replace(config.load([], environ={}), host="127.0.0.1", port=0, auth=False, data_dir=str(tmp_path))
    srv = FaceServer(settings)
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "facesvc.v1.FaceService"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            stub = pb_grpc.FaceServiceStub(ch)
            expect_error(
                stub.Detect, pb.DetectRequest(image=image("dev/img5.jpg")), grpc.StatusCode.UNAVAILABLE, "MODELS_LOADING"
            )
            srv.load_models()
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            assert len(stub.Detect(pb.DetectRequest(image=image("dev/img5.jpg")), timeout=30).faces) == 1
    finally:
        srv.stop(0)


def test_sigterm_finishes_in_flight_calls(tmp_path):
    srv = ServerProcess("--workers", "4", log_path=tmp_path / "server.log")
    try:
        stub = pb_grpc.FaceServiceStub(srv.channel)
        big = pb.CompareRequest(source=image("dev/img4.jpg"), target=image("dev/img1.jpg"))
        with futures.ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(stub.Compare, big, timeout=60) for _ in range(8)]
            time.sleep(0.3)  # the first calls are running, the rest are queued
            srv.proc.terminate()
            results = [c.result() for c in calls]
        assert all(r.match for r in results), "every accepted call finished with a real answer"
        assert srv.proc.wait(30) == 0
        log = srv.output()
        assert "received SIGTERM" in log and "stopped" in log
    finally:
        srv.stop()


def test_tampered_weights_are_refused(tmp_path):
    models = tmp_path / "weights"
    models.mkdir()
    for f in WEIGHTS.glob("*.onnx"):
        os.symlink(f, models / f.name)
    (models / "det_500m.onnx").unlink()
    data = bytearray((WEIGHTS / "det_500m.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (models / "det_500m.onnx").write_bytes(data)
    proc = subprocess.run(
        [PYTHON, "-m", "server", "--port", "0", "--host", "127.0.0.1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **open_env(tmp_path), "FACESVC_MODEL_DIR": str(models)},
    )
    assert proc.returncode == 1
    assert "does not match the manifest" in proc.stderr


def test_unknown_model_name_is_a_clear_startup_error(tmp_path):
    proc = subprocess.run(
        [PYTHON, "-m", "server", "--port", "0", "--detector", "w600k_mbf"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **open_env(tmp_path)},
    )
    assert proc.returncode == 1 and "is a recognizer, not a detector" in proc.stderr


def test_config_precedence_env_then_flags():
    env = {"FACESVC_PORT": "6000", "FACESVC_DETECTOR": "yunet", "FACESVC_RECOGNIZER_FLIP": "true"}
    s = config.load(["--port", "7000"], environ=env)
    assert (s.port, s.detector, s.recognizer_flip) == (7000, "yunet", True)
    assert config.load([], environ={}).port == 50051
    with pytest.raises(SystemExit):
        config.load([], environ={"FACESVC_PORT": "not-a-number"})
    assert "0.0.0.0" in config.describe(s)


def test_secret_settings_come_from_files(tmp_path):
    """Every secret setting (and each URL that may carry a password) has a FACESVC_<NAME>_FILE twin."""
    from dataclasses import fields

    file_settings = {f.name for f in fields(config.Settings) if f.metadata["from_file"]}
    secrets = {f.name for f in fields(config.Settings) if f.metadata["secret"]}
    assert secrets <= file_settings and {"admin_api_key", "db_url", "redis_url"} <= file_settings
    env = {}
    for i, name in enumerate(sorted(file_settings)):
        path = tmp_path / name
        path.write_text(f"value-{i}-from-a-file-0123456789\n")  # `echo value > file` adds the newline
        env[config.env_name(name) + "_FILE"] = str(path)
    s = config.load([], environ=env)
    for i, name in enumerate(sorted(file_settings)):
        assert getattr(s, name) == f"value-{i}-from-a-file-0123456789"
    assert config.load(["--admin-api-key", "from-the-flag-0123456789"], environ=env).admin_api_key == "from-the-flag-0123456789"
    for environ, words in (
        ({"FACESVC_ADMIN_API_KEY": "x" * 16, "FACESVC_ADMIN_API_KEY_FILE": env["FACESVC_ADMIN_API_KEY_FILE"]}, "use one"),
        ({"FACESVC_ADMIN_API_KEY_FILE": str(tmp_path / "missing")}, "cannot read"),
    ):
        with pytest.raises(SystemExit) as e:
            config.load([], environ=environ)
        assert "FACESVC_ADMIN_API_KEY" in str(e.value) and words in str(e.value)
    # a setting that is not secret has no file twin: the variable is ignored, not read
    assert config.load([], environ={"FACESVC_PORT_FILE": str(tmp_path / "missing")}).port == 50051


def test_server_takes_the_admin_key_from_a_file(tmp_path):
    """The key never enters the server's environment (what `docker inspect` shows)."""
    from tests.conftest import ADMIN_KEY

    key_file = tmp_path / "admin_key"
    key_file.write_text(ADMIN_KEY + "\n")
    env = {"FACESVC_ADMIN_API_KEY": "", "FACESVC_ADMIN_API_KEY_FILE": str(key_file)}
    server = ServerProcess(env=env, log_path=tmp_path / "server.log")
    try:
        assert ADMIN_KEY.encode() not in Path(f"/proc/{server.proc.pid}/environ").read_bytes()
        stub = pb_grpc.FaceServiceStub(server.channel)
        stub.CreateCollection(pb.CreateCollectionRequest(collection="keyfile"), timeout=10)  # an admin-only call
    finally:
        assert server.stop() == 0, server.output()[-3000:]


def test_every_setting_is_documented_and_the_table_is_current():
    """docs/configuration.md holds exactly the table server/config.py generates."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    table = doc.split("<!-- settings:begin -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert table.strip() == config.markdown().strip(), "regenerate: python -m server.config --markdown"
    readme = (ROOT / "README.md").read_text()
    assert "docs/configuration.md" in readme


def test_settings_are_validated_with_one_line():
    for argv, env, words in (
        (["--workers", "-3"], {}, "FACESVC_WORKERS / --workers must be at least 2"),
        (["--port", "99999"], {}, "at most 65535"),
        (["--liveness-threshold", "7"], {}, "FACESVC_LIVENESS_THRESHOLD"),
        ([], {"FACESVC_LOG_FORMAT": "xml"}, "must be one of text, json"),
        (["--match-threshold", "0.1", "--match-threshold-floor", "0.2"], {}, "below"),
    ):
        with pytest.raises(SystemExit) as e:
            config.load(argv, environ=env)
        assert words in str(e.value) and "\n" not in str(e.value), e.value
    assert config.load(["--log-level", "debug"], environ={}).log_level == "debug"


def huge_pages_expected() -> bool:
    """Whether this machine is one where the server re-executes itself for huge pages."""
    return hugepages.thp_mode() == "madvise" and (hugepages.glibc_version() or (0, 0)) >= (2, 35)


def test_server_runs_on_huge_pages(server):
    """The session's server (started as a user starts it) re-executed itself with the glibc tunable:
    same pid, the tunable in its environment, memory on 2 MB pages, and the log says so."""
    if not huge_pages_expected():
        assert "huge pages: on" not in server.output()
        pytest.skip(f"THP mode {hugepages.thp_mode()}, glibc {hugepages.glibc_version()}: no re-exec here")
    environ = Path(f"/proc/{server.proc.pid}/environ").read_bytes().split(b"\0")
    assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in environ
    assert "huge pages: on (THP madvise, GLIBC_TUNABLES glibc.malloc.hugetlb=1)" in server.output()
    assert hugepages.anon_huge_kb(server.proc.pid) > 0
    assert server.output().count("facesvc starting") == 1  # the re-exec came before anything was logged


@pytest.mark.parametrize(
    "env, expect",
    [
        ({"FACESVC_HUGE_PAGES": "false"}, "huge pages: off"),
        ({"FACESVC_HUGE_PAGES": "false", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "huge pages: off"),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "huge pages: off (GLIBC_TUNABLES glibc.malloc.hugetlb=0)"),
        ({"GLIBC_TUNABLES": "glibc.malloc.check=0"}, "huge pages: on (THP madvise, GLIBC_TUNABLES glibc.malloc.hugetlb=1)"),
    ],
)
def test_huge_pages_can_be_turned_off(tmp_path, env, expect):
    """FACESVC_HUGE_PAGES=false keeps 4 KB pages (restarting without the tunable if an image set it),
    and so does the tunable set to 0 by the operator; other tunables the operator set survive the re-exec. The unknown detector name stops the
    server right after the line this test reads."""
    if not huge_pages_expected():
        pytest.skip(f"THP mode {hugepages.thp_mode()}, glibc {hugepages.glibc_version()}: no re-exec here")
    proc = subprocess.run(
        [PYTHON, "-m", "server", "--port", "0", "--detector", "w600k_mbf"],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **open_env(tmp_path), **env},
    )
    assert proc.returncode == 1 and expect in proc.stderr, proc.stderr


def test_huge_pages_tunable_editing():
    assert hugepages.tunable({}) is None
    assert hugepages.tunable({"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.hugetlb=0"}) == "0"
    env = hugepages.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.hugetlb=0", "A": "b"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.hugetlb=1", "A": "b"}
    assert hugepages.without_tunable(env) == {"GLIBC_TUNABLES": "glibc.malloc.check=0", "A": "b"}
    assert hugepages.without_tunable({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == {}


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this machine has CUDA")
def test_cuda_requested_without_gpu_build_fails_clearly():
    assert choose_providers("auto") == ["CPUExecutionProvider"]
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        choose_providers("cuda")


# -- models/fetch.py -------------------------------------------------------
def _fetch(tmp_path: Path, mirror: Path, *names: str, manifest: Path | None = None):
    args = [PYTHON, str(ROOT / "models" / "fetch.py"), "--target", str(tmp_path / "out"), "--mirror", str(mirror), *names]
    if manifest:
        args += ["--manifest", str(manifest)]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_fetch_copies_and_verifies(tmp_path):
    r = _fetch(tmp_path, WEIGHTS, "yunet")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out" / "face_detection_yunet_2023mar.onnx"
    spec = json.loads((ROOT / "models" / "manifest.json").read_text())["models"]["yunet"]
    assert hashlib.sha256(out.read_bytes()).hexdigest() == spec["sha256"]
    assert "present" in _fetch(tmp_path, WEIGHTS, "yunet").stdout


def test_fetch_refuses_sha_mismatch_and_leaves_nothing(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    data = bytearray((WEIGHTS / "face_detection_yunet_2023mar.onnx").read_bytes())
    data[100] ^= 1
    (mirror / "face_detection_yunet_2023mar.onnx").write_bytes(data)
    r = _fetch(tmp_path, mirror, "yunet")
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr
    assert list((tmp_path / "out").iterdir()) == []


MODELS = json.loads((ROOT / "models" / "manifest.json").read_text())["models"]
SHARED_MODELS = Path(os.environ.get("FACESVC_MODEL_MIRROR", ROOT.parent / "shared" / "models"))


def test_fetch_empty_mirror_offline_names_every_origin(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _fetch(tmp_path, empty, "--offline")
    assert r.returncode == 1
    for name, spec in MODELS.items():
        assert f"{name:<18} FAILED" in r.stderr
        assert spec["origin"] in r.stderr, f"{name}'s origin is not named"
        if spec.get("url"):
            assert spec["url"] in r.stderr
    assert r.stderr.count("FACESVC_MODEL_MIRROR") == len(MODELS)
    assert list((tmp_path / "out").iterdir()) == []


def test_fetch_derives_the_recognizer_from_upstream_artifacts_and_serves(tmp_path):
    """A mirror with only what upstream publishes: the default float recognizer is derived
    from the int8 file (same bytes as the mirror's copy, sha256-checked) and the server
    answers a Verify with the result."""
    derived = {spec["file"] for spec in MODELS.values() if spec.get("derive")}
    assert derived == {"w600k_mbf_deq.onnx"}
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for spec in MODELS.values():
        if spec["file"] not in derived:
            (mirror / spec["file"]).symlink_to(SHARED_MODELS / spec["file"])
    r = _fetch(tmp_path, mirror, "--offline")
    assert r.returncode == 0, r.stderr
    assert "derived (dequantize) from w600k_mbf_int8.onnx" in r.stdout
    out = tmp_path / "out"
    assert hashlib.sha256((out / "w600k_mbf_deq.onnx").read_bytes()).hexdigest() == MODELS["w600k_mbf"]["sha256"]

    server = ServerProcess(env={"FACESVC_MODEL_DIR": str(out)}, log_path=tmp_path / "server.log")
    try:
        stub = pb_grpc.FaceServiceStub(server.channel)
        stub.CreateCollection(
            pb.CreateCollectionRequest(collection="derived", liveness_policy=pb.LIVENESS_POLICY_OPTIONAL), timeout=10
        )
        stub.Register(pb.RegisterRequest(collection="derived", subject_id="alice", image=image("dev/img1.jpg")), timeout=30)
        assert stub.Verify(
            pb.VerifyRequest(collection="derived", subject_id="alice", image=image("dev/img2.jpg")), timeout=30
        ).match
        assert not stub.Verify(
            pb.VerifyRequest(collection="derived", subject_id="alice", image=image("dev/img13.jpg")), timeout=30
        ).match
    finally:
        assert server.stop() == 0, server.output()[-3000:]


def test_fetch_derivation_names_a_missing_source(tmp_path):
    manifest = {"models": {"w600k_mbf": MODELS["w600k_mbf"]}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _fetch(tmp_path, empty, "--offline", manifest=path)
    assert r.returncode == 1 and "which the manifest does not list" in r.stderr and "FACESVC_MODEL_MIRROR" in r.stderr


def test_weights_are_not_tracked_by_git():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert not [t for t in tracked if t.endswith((".onnx", ".jpg", ".jpeg", ".png"))]


def test_healthcheck_follows_the_configured_port(server):
    """The image's HEALTHCHECK (`python -m server.healthcheck`) reads FACESVC_PORT, not a fixed number."""
    from bench.launcher import free_port

    def check(port: int) -> subprocess.CompletedProcess:
        env = {**os.environ, "FACESVC_PORT": str(port), "FACESVC_HOST": "0.0.0.0"}
        return subprocess.run([PYTHON, "-m", "server.healthcheck"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)

    r = check(server.port)
    assert r.returncode == 0 and "SERVING" in r.stdout, r.stderr
    r = check(free_port())
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr
