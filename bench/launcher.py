"""A real server process for benchmarks and tests: `python -m server` on a free loopback port,
started the way a user starts it, with channels that send an API key on every call."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facesvc.v1 import face_service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

ADMIN_KEY = "bench-admin-key-" + os.urandom(8).hex()


class _ApiKey(
    grpc.UnaryUnaryClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
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


def free_port() -> int:
    """A loopback port free right now (another process may take it before it is used: see with_metrics)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, sig: int, timeout: float, log) -> int:
    """Sends `sig`, waits up to `timeout` s (then kills), closes its log; its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.close()
    return proc.returncode


class ServerProcess:
    """`python -m server` on a free port, started the way a user starts it.

    Auth is on with ADMIN_KEY unless the args say otherwise; `channel` sends
    `api_key` (the admin key by default). The embedded database goes to a
    data dir next to the log unless the args name another store.
    """

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        log_path: Path,
        api_key: str | None = ADMIN_KEY,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.log_path = log_path
        self.log = open(log_path, "w+")
        LIVE.add(self)
        env = {"FACESVC_ADMIN_API_KEY": ADMIN_KEY, "FACESVC_DATA_DIR": str(log_path.parent / "data"), **(env or {})}
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "server", "--host", "127.0.0.1", "--port", "0", *args],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        self.port = self._wait_for_port()
        self.target = f"127.0.0.1:{self.port}"
        self.credentials = credentials
        self.channel = keyed_channel(self.target, api_key, credentials)
        self.wait_serving()

    @classmethod
    def with_metrics(cls, *args: str, tries: int = 5, **kw) -> "ServerProcess":
        """A server with a metrics port (`.metrics_port`). A port found free can be taken by another
        socket before the server binds it (an outgoing connection's ephemeral port): then another."""
        for attempt in range(tries):
            port = free_port()
            try:
                server = cls(*args, "--metrics-port", str(port), **kw)
            except RuntimeError as exc:
                if "Address already in use" not in str(exc) or attempt == tries - 1:
                    raise
                continue
            server.metrics_port = port
            return server
        raise AssertionError("unreachable")

    @property
    def http_url(self) -> str:
        """The base URL of the HTTP port (a server started with --http-port)."""
        m = re.search(r"HTTP on (https?://\S+?):? ", self.output())
        if not m:
            raise RuntimeError(f"the server has no HTTP port:\n{self.output()}")
        return m.group(1)

    def rss_mb(self) -> float:
        """The server process's resident memory, MB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

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

    def dump_stacks(self, wait_s: float = 1.0) -> str:
        """Every server thread's stack (SIGUSR1, see server/__main__.py), from its log; "" once it has exited."""
        if self.proc.poll() is not None:
            return ""
        before = len(self.output())
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(wait_s)
        return self.output()[before:]

    def stop(self, timeout: float = 30) -> int:
        self.channel.close()
        for ch in getattr(self, "_extra_channels", []):
            ch.close()
        LIVE.discard(self)
        return stop_process(self.proc, signal.SIGTERM, timeout, self.log)


LIVE: set[ServerProcess] = set()  # started and not stopped: a failed test reports their state (tests/conftest.py)


class MilvusLiteServer:
    """`milvus-lite server` on a free loopback port: one Milvus that several server processes share
    (a Milvus Lite file is locked by the one process that opens it). `uri` is what they are given."""

    def __init__(self, data_dir: Path, log_path: Path, timeout: float = 60):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w+")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "milvus_lite", "server", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milvus-lite server exited with {self.proc.returncode}:\n{Path(log_path).read_text()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"milvus-lite server not listening after {timeout}s") from None
                time.sleep(0.1)

    def stop(self, timeout: float = 15) -> int:
        # SIGINT: its clean shutdown (KeyboardInterrupt) closes the data directory
        return stop_process(self.proc, signal.SIGINT, timeout, self.log)
