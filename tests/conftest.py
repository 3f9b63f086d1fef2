"""Shared fixtures: the real photos, an in-process pipeline, and a real server subprocess."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
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


ADMIN_KEY = "test-admin-key-" + os.urandom(8).hex()


class _ApiKey(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor,
              grpc.UnaryStreamClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `x-api-key` to every call, as a real client would."""

    def __init__(self, key: str):
        self.key = key

    def _add(self, details):
        return details._replace(metadata=list(details.metadata or []) + [("x-api-key", self.key)])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._add(details), request)

    intercept_unary_stream = intercept_unary_unary

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._add(details), request_iterator)

    intercept_stream_stream = intercept_stream_unary


def keyed_channel(target: str, key: str | None, credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    ch = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    return grpc.intercept_channel(ch, _ApiKey(key)) if key else ch


class ServerProcess:
    """`python -m server` on a free port, started the way a user starts it.

    Auth is on with ADMIN_KEY unless the args say otherwise; `channel` sends
    `api_key` (the admin key by default). The embedded database goes to a
    data dir next to the log unless the args name another store.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None, log_path: Path,
                 api_key: str | None = ADMIN_KEY, credentials: grpc.ChannelCredentials | None = None):
        self.log_path = log_path
        self.log = open(log_path, "w+")
        env = {"FACESVC_ADMIN_API_KEY": ADMIN_KEY, "FACESVC_DATA_DIR": str(log_path.parent / "data"), **(env or {})}
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "server", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **env},
        )
        self.port = self._wait_for_port()
        self.target = f"127.0.0.1:{self.port}"
        self.credentials = credentials
        self.channel = keyed_channel(self.target, api_key, credentials)
        self.wait_serving()

    def output(self) -> str:
        return self.log_path.read_text()

    def _wait_for_port(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"listening on [\d.]+:(\d+)", self.output())
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise RuntimeError(f"server did not open a port in {timeout}s:\n{self.output()}")

    def stub(self, api_key: str | None = None) -> pb_grpc.FaceServiceStub:
        """A stub on a new channel that sends `api_key` (None: no key at all)."""
        ch = keyed_channel(self.target, api_key, self.credentials)
        self._extra_channels = getattr(self, "_extra_channels", []) + [ch]
        return pb_grpc.FaceServiceStub(ch)

    def health(self, service: str = "") -> int:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def wait_serving(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not SERVING after {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 30) -> int:
        self.channel.close()
        for ch in getattr(self, "_extra_channels", []):
            ch.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


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
    from server.app import build_pipeline

    return build_pipeline(config.load([], environ={}))


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
    import pymysql
    from urllib.parse import urlsplit

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
