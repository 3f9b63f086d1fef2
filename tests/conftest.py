"""Shared fixtures: the real photos, an in-process pipeline, and a real server subprocess."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
FACES = Path(os.environ.get("FACESVC_FACES_DIR", ROOT.parent / "shared" / "faces"))
PYTHON = sys.executable


def face_path(rel: str) -> Path:
    p = FACES / rel
    if not p.is_file():
        pytest.fail(f"test photo {p} is missing: the suite needs ../shared/faces (or FACESVC_FACES_DIR)")
    return p


def image(rel: str) -> pb.Image:
    return pb.Image(encoded=face_path(rel).read_bytes())


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a failed call (fails the test if there is none)."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError(f"no ErrorInfo in {status}")


def expect_error(call, request, code: grpc.StatusCode, reason: str, **kw) -> error_details_pb2.ErrorInfo:
    with pytest.raises(grpc.RpcError) as exc:
        call(request, timeout=60, **kw)
    assert exc.value.code() == code, f"{exc.value.code()} {exc.value.details()}"
    info = error_info(exc.value)
    assert info.reason == reason, f"reason {info.reason}, expected {reason}: {exc.value.details()}"
    assert info.domain == "facesvc"
    return info


from bench.launcher import ADMIN_KEY, ServerProcess, keyed_channel  # noqa: E402,F401  (the tests' launcher)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    srv = ServerProcess(log_path=tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    rc = srv.stop()
    assert rc == 0, f"server exited with {rc} on SIGTERM:\n{srv.output()[-3000:]}"


@pytest.fixture(scope="session")
def stub(server) -> pb_grpc.FaceServiceStub:
    return pb_grpc.FaceServiceStub(server.channel)


@pytest.fixture(scope="session")
def pipeline():
    from server import config
    from server.assembly import build_pipeline

    return build_pipeline(config.load([], environ={}))


@pytest.fixture(scope="session")
def ort_pipeline():
    """The same models on onnxruntime, the fallback runtime (the default is OpenVINO on CPU)."""
    from server import config
    from server.assembly import build_pipeline

    return build_pipeline(config.load([], environ={"FACESVC_RUNTIME": "onnxruntime"}))


# -- real backends: MariaDB/MySQL and Redis -----------------------------------
# Started on every machine and in CI (127.0.0.1:3306 root/no password, 127.0.0.1:6379).
# Each run gets its own database and key prefix and removes them afterwards.
MYSQL_SERVER = os.environ.get("FACESVC_TEST_MYSQL", "mysql://root@127.0.0.1:3306")
REDIS_URL = os.environ.get("FACESVC_TEST_REDIS", "redis://127.0.0.1:6379/0")
RUN_ID = f"{os.getpid()}_{os.urandom(3).hex()}"


def backend_unreachable(what: str, exc: Exception):
    """Under CI a backend that cannot be reached fails the run; on a laptop it skips."""
    msg = f"{what} unreachable: {exc}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(msg + " (CI=true: backend tests must not skip)")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def mysql_url():
    """A private database on the shared MariaDB, dropped at the end of the session."""
    from urllib.parse import urlsplit

    import pymysql

    u = urlsplit(MYSQL_SERVER)
    params = dict(host=u.hostname, port=u.port or 3306, user=u.username or "root", password=u.password or "")
    try:
        conn = pymysql.connect(**params, autocommit=True, connect_timeout=5)
    except pymysql.err.MySQLError as exc:
        backend_unreachable(f"MySQL at {u.hostname}:{u.port}", exc)
    name = f"facesvc_test_{RUN_ID}"
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    yield f"{MYSQL_SERVER.rstrip('/')}/{name}"
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


@pytest.fixture(scope="session")
def redis_prefix():
    """A key prefix of this run's own on the shared Redis; its keys are deleted at the end."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        backend_unreachable(f"Redis at {REDIS_URL}", exc)
    prefix = f"facesvc-test-{RUN_ID}:"
    yield prefix
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["sqlite", "mysql"])
def db_url(request, tmp_path):
    """A database URL for each backend: a fresh SQLite file, or this run's MySQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/facesvc.db"
    return request.getfixturevalue("mysql_url")


def race(calls) -> list[BaseException | None]:
    """Start every call at the same moment on its own thread; each one's exception, or None."""
    import threading

    results: list[BaseException | None] = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i):
        barrier.wait()
        try:
            calls[i]()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


_DUMPED: set[int] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that failed on a deadline: what every live server was doing then. The first such
    failure per server gets its threads' stacks (SIGUSR1) and the tail of its log in the report, as CI
    keeps nothing but the output."""
    outcome = yield
    report = outcome.get_result()
    if (
        not report.failed
        or call.when != "call"
        or not any(word in str(report.longrepr) for word in ("DEADLINE_EXCEEDED", "timed out", "Timeout"))
    ):
        return
    from bench.launcher import LIVE

    for srv in list(LIVE):
        if srv.proc.pid in _DUMPED:
            continue
        _DUMPED.add(srv.proc.pid)
        stacks = srv.dump_stacks()
        report.sections.append((f"server {srv.proc.pid} threads", stacks[-20000:] or "(exited)"))
        report.sections.append((f"server {srv.proc.pid} log tail", srv.output()[-4000:]))
