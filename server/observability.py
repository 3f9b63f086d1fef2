"""Prometheus metrics, request ids and structured logs.

Metrics (served on FACESVC_METRICS_PORT when set, beside prometheus_client's
process metrics: RSS, open fds, CPU):
  facesvc_rpc_total{method, code}                 finished RPCs by gRPC status
  facesvc_rpc_errors_total{method, reason}        failures (and failed batch items / frames) by ErrorInfo reason
  facesvc_rpc_duration_seconds{method}            latency histogram
  facesvc_model_inference_seconds{model}          one ONNX Runtime session.run
  facesvc_index_faces{collection}                 searchable faces per loaded index
  facesvc_streams_active                          open streams (StreamFrames and the streaming batches)

Every FaceService call gets a request id: the caller's `x-request-id` metadata
(if it is a sane token) or a new one. It is sent back in the initial
metadata, put on every log line written while the call runs, and used as the
id in INTERNAL error messages.
"""
from __future__ import annotations

import contextlib
import contextvars
import hmac
import json
import logging
import re
import threading
import time
import uuid

import grpc
from prometheus_client import Counter, Histogram, make_wsgi_app

from server import errors
from prometheus_client.core import GaugeMetricFamily, REGISTRY

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
current_call: contextvars.ContextVar[object] = contextvars.ContextVar("current_call", default=None)


def ensure_call_alive() -> None:
    """Raise CALL_ENDED if the gRPC call this thread works for has ended (deadline passed, client
    cancelled or gone): checked before every model inference and before a commit, so no work
    goes on for a dead call and nothing is written that its caller was told failed."""
    ctx = current_call.get()
    if ctx is None or ctx.is_active():
        return
    remaining = ctx.time_remaining()
    code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    raise errors.FaceServiceError(code, errors.CALL_ENDED, "the call ended (deadline or cancel); its work was stopped")

RPCS = Counter("facesvc_rpc_total", "Finished FaceService RPCs by method and gRPC status code", ["method", "code"])
ERRORS = Counter("facesvc_rpc_errors_total", "Failed RPCs, batch items and stream frames by method and ErrorInfo reason",
                 ["method", "reason"])
LATENCY = Histogram("facesvc_rpc_duration_seconds", "FaceService RPC latency (streams: the whole call)", ["method"],
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
INFERENCE = Histogram("facesvc_model_inference_seconds", "One ONNX Runtime session.run, by model file", ["model"],
                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1))


class InFlight:
    """How many FaceService calls are being served right now (streams for their whole life)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


IN_FLIGHT = InFlight()


@contextlib.contextmanager
def serving():
    """Marks one request's work for code that runs the pipeline in process, without the gRPC
    server (whose interceptor counts its calls): model runs then know when they have the CPU alone."""
    IN_FLIGHT.add(1)
    try:
        yield
    finally:
        IN_FLIGHT.add(-1)


class TimedSession:
    """An onnxruntime InferenceSession whose run() is timed into INFERENCE; everything else passes through."""

    def __init__(self, session, model: str):
        self._session, self._observe = session, INFERENCE.labels(model).observe

    def run(self, *args, **kwargs):
        ensure_call_alive()
        t0 = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            self._observe(time.perf_counter() - t0)

    def __getattr__(self, name):
        return getattr(self._session, name)


class ServiceCollector:
    """Index sizes and open streams, read at scrape time from the running server."""

    def __init__(self, servicer):
        self.servicer = servicer

    def collect(self):
        faces = GaugeMetricFamily("facesvc_index_faces", "Searchable faces per loaded collection index", labels=["collection"])
        searcher = self.servicer.searcher
        if searcher is not None:
            for collection in searcher.indexes.loaded():
                idx = searcher.indexes._indexes.get(collection)
                if idx is not None:
                    faces.add_metric([collection], len(idx))
        yield faces
        yield GaugeMetricFamily("facesvc_streams_active", "Open streams (StreamFrames, ProcessBatch, RegisterBatch)", value=self.servicer.streams.active())


def serve_metrics(port: int, host: str, servicer, token: str = "") -> None:
    """/metrics on its own thread. It names every loaded collection, so it binds to loopback by
    default (metrics_host) and, with a token set, answers only `Authorization: Bearer <token>`."""
    REGISTRY.register(ServiceCollector(servicer))
    app = make_wsgi_app()
    if token:
        expected = f"Bearer {token}".encode()

        def guarded(environ, start_response):
            given = environ.get("HTTP_AUTHORIZATION", "").encode()
            if not hmac.compare_digest(given, expected):
                start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
                return [b"metrics need Authorization: Bearer <metrics_token>\n"]
            return app(environ, start_response)
        _serve_wsgi(guarded, host, port)
    else:
        _serve_wsgi(app, host, port)


def _serve_wsgi(app, host: str, port: int) -> None:
    from wsgiref.simple_server import WSGIRequestHandler, make_server
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIServer

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):  # scrapes are not worth a log line each
            pass

    httpd = make_server(host, port, app, Server, handler_class=QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()


_HANDLER_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler, "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler, "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def rewrap(handler: grpc.RpcMethodHandler, make):
    """The same handler with its behaviour replaced by make(behaviour, kind), where kind is
    "unary_unary", "unary_stream", "stream_unary" or "stream_stream" (what the server interceptors share)."""
    kind = next(k for k in _HANDLER_FACTORIES if getattr(handler, k) is not None)
    return _HANDLER_FACTORIES[kind](make(getattr(handler, kind), kind), request_deserializer=handler.request_deserializer,
                                    response_serializer=handler.response_serializer)


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Request id, latency, status counts for every FaceService call (the outermost interceptor)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefix):
            return handler
        method = handler_call_details.method[len(self.prefix):]
        incoming = dict(handler_call_details.invocation_metadata or ()).get(REQUEST_ID_HEADER, "")

        def start(context):
            rid = incoming if _SANE_ID.fullmatch(incoming or "") else uuid.uuid4().hex[:16]
            context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
            IN_FLIGHT.add(1)
            return (request_id.set(rid), current_call.set(context)), time.perf_counter()

        def finish(context, token, t0, exc: BaseException | None) -> None:
            IN_FLIGHT.add(-1)
            request_id.reset(token[0])
            current_call.reset(token[1])
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN
            RPCS.labels(method, code.name).inc()
            LATENCY.labels(method).observe(time.perf_counter() - t0)

        def make(inner, kind):
            if kind.endswith("unary"):  # one response
                def wrapped(request, context):
                    token, t0 = start(context)
                    exc = None
                    try:
                        return inner(request, context)
                    except BaseException as e:
                        exc = e
                        raise
                    finally:
                        finish(context, token, t0, exc)
            else:  # a response stream: the call lasts as long as the iteration
                def wrapped(request, context):
                    token, t0 = start(context)
                    exc = None
                    try:
                        yield from inner(request, context)
                    except BaseException as e:
                        exc = e
                        raise
                    finally:
                        finish(context, token, t0, exc)

            return wrapped

        return rewrap(handler, make)


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z", "level": record.levelname,
               "logger": record.name, "request_id": getattr(record, "request_id", "-"), "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(level: str, fmt: str, stream) -> None:
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
