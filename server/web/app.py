"""The HTTP port: FaceService as Connect (JSON and binary), gRPC-Web and plain JSON POST, plus the web console.

Why hypercorn, serving a WSGI app: every FaceService handler is synchronous and CPU-bound (onnxruntime
releases the GIL), exactly as grpcio runs them on its worker threads, so a WSGI app on a thread pool of
the same size (`workers`) serves them the same way, with no async bridge. Hypercorn runs in this process
(so the models, indexes, API-key cache and concurrency limits are the gRPC side's own), on one asyncio
thread, speaks HTTP/1.1 and HTTP/2 (h2 over TLS by ALPN, h2c in the clear) and serves TLS with the
server's certificate and client-CA settings. Uvicorn speaks HTTP/1.1 only and would need every handler
wrapped for asyncio; granian is a process manager (its workers would load the models again).

What the WSGI bridge cannot do: it reads a request body whole before the handler runs, so a Connect
bidirectional stream (StreamFrames, ProcessBatch, RegisterBatch) answers once its request stream has
ended (half-duplex), and a client that goes away is noticed at the call's deadline, not at once.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import mimetypes
import socket
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import unquote

import grpc
import hypercorn.asyncio.run as hypercorn_run
from connectrpc.code import Code
from google.protobuf import json_format
from google.rpc import error_details_pb2
from hypercorn.asyncio import serve
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.config import Config
from hypercorn.events import RawData

from server import errors
from server.rpc.auth import HEADER, SERVICE_PREFIX, AuthInterceptor
from server.rpc.servicer import SERVICE
from server.web.calls import (
    STATUS_BY_NUMBER,
    STATUS_DETAILS_KEY,
    connect_app,
    connect_code,
    grpc_code,
    library_refusal,
)
from server.web.gate import CONNECTION, ERROR_INFO, AnswerBytes, BodyBytes, HeaderGate, info_detail, web_status

log = logging.getLogger("facesvc.http")

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_DIR = ROOT / "web" / "dist"  # built by `make web` (npm ci + vite build)
# What a browser on another origin may send and read (Connect, gRPC-Web and ours).
CORS_REQUEST_HEADERS = (
    "content-type, connect-protocol-version, connect-timeout-ms, connect-content-encoding, connect-accept-encoding, "
    f"grpc-timeout, x-grpc-web, x-user-agent, {HEADER}, x-request-id"
)
CORS_EXPOSED_HEADERS = "grpc-status, grpc-message, grpc-status-details-bin, x-request-id"
# What an RPC path takes: Connect's unary and streaming encodings, and gRPC-Web for both. gRPC itself is
# the gRPC port's; anything else would reach the Connect library, which answers it with an empty 500.
UNARY_TYPES = ("application/json", "application/proto")
STREAM_TYPES = ("application/connect+json", "application/connect+proto")
WEB_TYPES = ("application/grpc-web", "application/grpc-web+proto", "application/grpc-web+json")
STREAMING_PATHS = frozenset(SERVICE_PREFIX + m.name for m in SERVICE.methods if m.client_streaming or m.server_streaming)
METHOD_PATHS = frozenset(SERVICE_PREFIX + m.name for m in SERVICE.methods)


def not_taken(method: str, content_type: str, path: str) -> tuple[str, list[tuple[str, str]], errors.FaceServiceError] | None:
    """(HTTP status, headers, error) for a request no RPC takes: a path that names no method (404, which
    gRPC-Web and Connect clients read as UNIMPLEMENTED), another method than POST, or a content type
    that is not the method's."""
    if path not in METHOD_PATHS:
        name = errors.quote(path.removeprefix(SERVICE_PREFIX))
        error = errors.FaceServiceError(
            grpc.StatusCode.UNIMPLEMENTED, errors.VALIDATION_FAILED, f"FaceService has no method {name}", field="method"
        )
        return "404 Not Found", [], error
    streaming = path in STREAMING_PATHS
    accepted = (STREAM_TYPES if streaming else UNARY_TYPES) + WEB_TYPES
    if method != "POST":
        return "405 Method Not Allowed", [("allow", "POST")], errors.validation("method", "FaceService calls are POSTs")
    kind = content_type.split(";")[0].strip().lower()
    if kind not in accepted:
        shown = kind[:64] or "none"
        message = f"content type {shown!r}: {'a streaming' if streaming else 'this'} method takes {', '.join(accepted)}"
        return "415 Unsupported Media Type", [("accept-post", ", ".join(accepted))], errors.validation("content-type", message)
    return None


def with_error_info(body: bytes) -> bytes:
    """A Connect error body with each ErrorInfo detail also spelled out as JSON (`debug`), so a curl
    user reads the reason without decoding the base64 `value` (Connect clients ignore `debug`). The
    Connect library's own refusals (a body that does not parse as the request, or inflates too far)
    get their ErrorInfo and a message cut short (calls.library_refusal)."""
    try:
        doc = json.loads(body)
        if not any(d.get("type") == ERROR_INFO for d in doc.get("details", ())):
            refusal = library_refusal(grpc_code(Code(doc.get("code"))), str(doc.get("message", "")))
            if refusal is not None:
                doc["code"], doc["message"] = connect_code(refusal.code).value, refusal.message
                doc.setdefault("details", []).append(info_detail(refusal.reason, refusal.metadata))
        for detail in doc.get("details", ()):
            if detail.get("type") == ERROR_INFO and "debug" not in detail:
                info = error_details_pb2.ErrorInfo.FromString(base64.b64decode(detail["value"] + "=="))
                detail["debug"] = json_format.MessageToDict(info)
    except (ValueError, KeyError, TypeError, AttributeError):
        return body
    return json.dumps(doc, ensure_ascii=False).encode()


def with_web_reason(chunk: bytes) -> bytes:
    """A gRPC-Web response chunk whose trailers carry a refusal of the Connect library's own, given
    the status details the gRPC port sends for the same bytes (calls.library_refusal). Data frames,
    and trailers that carry details already (the handlers' errors), pass as they are."""
    frames, at = [], 0
    while at + 5 <= len(chunk):
        size = int.from_bytes(chunk[at + 1 : at + 5], "big")
        frames.append((chunk[at], chunk[at + 5 : at + 5 + size]))
        at += 5 + size
    if at != len(chunk) or not frames or not frames[-1][0] & 0x80:
        return chunk
    trailers = dict(line.split(": ", 1) for line in frames[-1][1].decode("latin-1").split("\r\n") if ": " in line)
    fields = _web_refusal(trailers)
    if fields is None:
        return chunk
    text = "".join(f"{k}: {v}\r\n" for k, v in fields).encode("latin-1")
    return chunk[: at - 5 - len(frames[-1][1])] + b"\x80" + len(text).to_bytes(4, "big") + text


def _web_refusal(status: dict[str, str]) -> list[tuple[str, str]] | None:
    """gRPC-Web status fields (trailers, or the headers of a trailers-only answer) for a library
    refusal without details, or None to leave them as they are."""
    code = status.get("grpc-status", "0")
    if code == "0" or not code.isdigit() or STATUS_DETAILS_KEY in status:
        return None
    error = library_refusal(STATUS_BY_NUMBER.get(int(code), grpc.StatusCode.UNKNOWN), unquote(status.get("grpc-message", "")))
    return None if error is None else web_status(error)


def _web_body(body):
    """A gRPC-Web answer's chunks, its trailers given the refusal details; at least one chunk (an
    answer carried in headers alone has an empty body, and a server that sees no chunk never sends
    the headers either); and the library's iterable closed with it (PEP 3333)."""
    try:
        sent = False
        for chunk in body:
            sent = True
            yield with_web_reason(chunk)
        if not sent:
            yield b""
    finally:
        getattr(body, "close", lambda: None)()


class HttpApp:
    """One WSGI app: /facesvc.v1.FaceService/* to Connect, the console's files at /, CORS for browsers."""

    def __init__(self, connect, cors_origins: str, console_dir: Path | None = CONSOLE_DIR):
        self.connect = connect
        origins = {o.strip().rstrip("/") for o in cors_origins.split(",") if o.strip()}
        self.any_origin = "*" in origins
        self.origins = origins - {"*"}
        self.console_dir = console_dir.resolve() if console_dir is not None and console_dir.is_dir() else None
        self._files: dict[Path, tuple[tuple[int, int], bytes]] = {}

    def _cors(self, environ) -> list[tuple[str, str]]:
        origin = environ.get("HTTP_ORIGIN", "")
        if not origin or not (self.any_origin or origin in self.origins):
            return []
        return [
            ("access-control-allow-origin", origin),
            ("vary", "Origin"),
            ("access-control-expose-headers", CORS_EXPOSED_HEADERS),
        ]

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO") or "/"
        cors = self._cors(environ)
        method = environ["REQUEST_METHOD"]
        if path.startswith(SERVICE_PREFIX):
            if method == "OPTIONS":  # a browser's preflight
                if not cors:
                    start_response("403 Forbidden", [("content-type", "text/plain")])
                    return [b"this origin may not call the API: see FACESVC_HTTP_CORS_ORIGINS\n"]
                headers = cors + [
                    ("access-control-allow-methods", "POST, GET"),
                    ("access-control-allow-headers", CORS_REQUEST_HEADERS),
                    ("access-control-max-age", "7200"),
                ]
                start_response("204 No Content", headers)
                return [b""]
            return self._rpc(environ, start_response, cors)
        if method not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("allow", "GET, HEAD"), ("content-type", "text/plain")])
            return [b"POST FaceService calls to /facesvc.v1.FaceService/<Method>\n"]
        return self._static(path, environ, start_response)

    def _rpc(self, environ, start_response, cors):
        held = {}

        web = environ.get("CONTENT_TYPE", "").startswith("application/grpc-web")

        def hold(status, headers, exc_info=None):
            headers = list(headers) + cors
            if web:  # a refusal before any message is answered in the headers alone (trailers-only)
                fields = _web_refusal({k.lower(): v for k, v in headers})
                if fields is not None:
                    names = {k for k, _ in fields}
                    headers = [(k, v) for k, v in headers if k.lower() not in names] + fields
            if status.startswith("200") or not any(k.lower() == "content-type" and "json" in v for k, v in headers):
                return start_response(status, headers, exc_info)
            held["status"], held["headers"] = status, headers  # a Connect error: sent below, its body rewritten
            return lambda data: None

        body = self.connect(environ, hold)
        if not held:
            return _web_body(body) if web else body
        data = with_error_info(b"".join(body))
        headers = [(k, v) for k, v in held["headers"] if k.lower() != "content-length"]
        start_response(held["status"], headers + [("content-length", str(len(data)))])
        return [data]

    def _file(self, target: Path) -> bytes:
        """A console file's bytes, one copy for every request while it is unchanged: each request read
        its own, and answers waiting for their clients held a copy each beside the server's."""
        st = target.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self._files.get(target)
        if cached is None or cached[0] != stamp:
            cached = self._files[target] = (stamp, target.read_bytes())
        return cached[1]

    def _static(self, path: str, environ, start_response):
        if self.console_dir is None:
            start_response("404 Not Found", [("content-type", "text/plain")])
            return [b"the web console is not built here: run `make web`\n"]
        rel = "index.html" if path in ("", "/") else path.lstrip("/")
        try:
            target = (self.console_dir / rel).resolve()
            found = target.is_relative_to(self.console_dir) and target.is_file()
        except (ValueError, OSError):  # a NUL byte, a name too long: anyone may send those, and they name no file
            found = False
        if not found:
            start_response("404 Not Found", [("content-type", "text/plain")])
            return [b"not found\n"]
        data = self._file(target)
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        # vite names its bundles by content hash: they never change; index.html must be re-read
        cache = "public, max-age=31536000, immutable" if rel.startswith("assets/") else "no-cache"
        start_response(
            "200 OK",
            [
                ("content-type", kind),
                ("content-length", str(len(data))),
                ("cache-control", cache),
                ("x-content-type-options", "nosniff"),
                # the console loads only its own files, and talks only to this origin
                ("content-security-policy", "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:"),
            ],
        )
        return [b"" if environ["REQUEST_METHOD"] == "HEAD" else data]


def _connection_failed(loop, context: dict) -> None:
    """What escapes a client's connection task: hypercorn lets some of a client's protocol errors
    through (data on a stream it has answered, too many streams in its priority tree), which asyncio
    logged as a traceback of some 2 KB each, a log anyone without a key could fill: one line each.
    Anything else on the loop is asyncio's to report, as it would."""
    exc = context.get("exception")
    if exc is None or "client_connected_cb" not in context.get("message", ""):
        loop.default_exception_handler(context)
        return
    inner = getattr(exc, "exceptions", None) or [exc]  # an ExceptionGroup: its parts
    log.warning("HTTP connection failed: %s", "; ".join(f"{type(e).__name__}: {e}" for e in inner))
    log.debug("HTTP connection failed", exc_info=exc)


class _Connection(TCPServer):
    """hypercorn's connection, made in the task that serves it: it goes into CONNECTION there, so the
    request tasks it starts (which inherit the task's context) can see how much of their answers
    has left, and end the connection (gate._Answer)."""

    def __init__(self, app, loop, config, context, state, reader, writer):
        super().__init__(app, loop, config, context, state, reader, writer)
        self.waiting = 0  # its answers whose sends wait for the client now (gate._Answer)
        self.written = 0
        CONNECTION.set(self)

    async def protocol_send(self, event) -> None:
        if isinstance(event, RawData):
            self.written += len(event.data)
        await super().protocol_send(event)

    def buffered(self) -> int:
        """Bytes written to the connection and still in this process: over TLS, in the TLS layer and
        in the socket's transport beneath it, whose buffer the TLS transport does not count."""
        transport = self.writer.transport
        inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
        return transport.get_write_buffer_size() + (inner.get_write_buffer_size() if inner is not None else 0)

    def taken(self) -> int:
        """Bytes written to the connection that have left this process, all its answers together."""
        return self.written - self.buffered()

    @property
    def _speaking(self):
        """hypercorn's H11Protocol or H2Protocol for the connection (its ProtocolWrapper's), None before it has one."""
        return getattr(getattr(self, "protocol", None), "protocol", None)

    def shut(self, stream_id: int | None) -> bool:
        """Whether an HTTP/2 stream's own flow-control window is shut: the client holds this answer
        back itself, rather than the connection's window or the link holding every answer."""
        stream = getattr(getattr(self._speaking, "connection", None), "streams", {}).get(stream_id)
        return stream is not None and stream.outbound_flow_control_window <= 0

    def unsent(self, stream_id: int | None) -> int:
        """Bytes still in the server's buffers for the connection (HTTP/1.1: one answer at a time), or
        for one HTTP/2 stream, where hypercorn holds each stream's answer until its window opens."""
        buffers = getattr(self._speaking, "stream_buffers", None)
        if buffers is not None and stream_id is not None:
            buffer = buffers.get(stream_id)
            return 0 if buffer is None else len(buffer.buffer)
        return self.buffered()

    @property
    def ended(self) -> bool:
        return self.writer.transport.is_closing()

    def end(self, why: str) -> None:
        """Drops the connection (at once: what it still held to send goes too), once."""
        if not self.ended:
            log.info("HTTP connection ended: %s", why)
            self.writer.transport.abort()


class HttpServer:
    """Hypercorn on its own thread and event loop, beside the gRPC server, until stop()."""

    def __init__(self, settings, servicer, interceptors, console_dir: Path | None = CONSOLE_DIR):
        s = settings
        max_bytes = s.max_message_mb * 1024 * 1024
        self.app = HttpApp(connect_app(servicer, interceptors, max_bytes), s.http_cors_origins, console_dir)
        auth = next((i.auth for i in interceptors if isinstance(i, AuthInterceptor)), None)
        # request bodies held at once: a message's worth per worker in all, two per key (a key's two streams)
        held = BodyBytes(total=max(2, s.workers) * max_bytes, per_owner=2 * max_bytes)
        cors = lambda origin: self.app._cors({"HTTP_ORIGIN": origin})  # noqa: E731
        answers = AnswerBytes(max(2, s.workers) * max_bytes)  # answers not yet taken: a message per worker
        self.gate = HeaderGate(self.app, max_bytes, auth, held, not_taken, cors, s.stream_idle_seconds, answers)
        host = s.http_host or s.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock.bind((host, s.http_port))
        except OSError as exc:
            self.sock.close()
            raise RuntimeError(f"cannot bind HTTP {host}:{s.http_port}: {exc}") from None
        self.sock.listen(1024)
        self.host, self.port = host, self.sock.getsockname()[1]
        config = Config()
        config.bind = [f"fd://{self.sock.fileno()}"]
        config.wsgi_max_body_size = max_bytes
        config.graceful_timeout = s.grace_seconds
        config.accesslog = None
        config.errorlog = logging.getLogger("facesvc.http.server")
        if s.tls_cert:
            config.certfile, config.keyfile = s.tls_cert, s.tls_key
            if s.tls_client_ca:
                config.ca_certs, config.verify_mode = s.tls_client_ca, ssl.CERT_REQUIRED
        self.tls = bool(s.tls_cert)
        self.config = config
        self.workers = s.workers
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http", daemon=True)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        # hypercorn runs WSGI apps on the loop's default executor: as many threads as the gRPC side's
        loop.set_default_executor(ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="http"))
        loop.set_exception_handler(_connection_failed)
        self._stop = asyncio.Event()
        self._started.set()
        hypercorn_run.TCPServer = _Connection  # the name serve() makes each connection with
        try:
            loop.run_until_complete(serve(self.gate, self.config, shutdown_trigger=self._stop.wait, mode="asgi"))
        except Exception:  # noqa: BLE001 - logged: the gRPC side goes on serving
            log.exception("the HTTP server failed")
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    def stop(self, grace: float) -> None:
        """Stop accepting, let calls in flight finish within `grace` seconds."""
        if self._thread.is_alive() and self._stop is not None:
            self.config.graceful_timeout = grace
            try:
                self._loop.call_soon_threadsafe(self.gate.ending)
                # what still waits for its client as the grace ends goes too, rather than being
                # cancelled inside hypercorn
                self._loop.call_soon_threadsafe(self._loop.call_later, max(grace / 2, grace - 0.5), self.gate.ending, True)
                self._loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop closed meanwhile: the server has stopped by itself
                pass
            self._thread.join(grace + 5)
