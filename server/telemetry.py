"""Telemetry: Prometheus metrics and structured logs.

Metrics (served on FACESVC_METRICS_PORT when set, beside prometheus_client's
process metrics: RSS, open fds, CPU):
  facesvc_rpc_total{method, code}                 finished RPCs by gRPC status
  facesvc_rpc_errors_total{method, reason}        failures (and failed batch items / frames) by ErrorInfo reason
  facesvc_rpc_duration_seconds{method}            latency histogram
  facesvc_model_inference_seconds{model}          one model inference
  facesvc_index_faces{collection}                 searchable faces per loaded index
  facesvc_streams_active                          open streams (StreamFrames and the streaming batches)
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import REGISTRY, GaugeMetricFamily

from server.context import request_id

RPCS = Counter("facesvc_rpc_total", "Finished FaceService RPCs by method and gRPC status code", ["method", "code"])
ERRORS = Counter(
    "facesvc_rpc_errors_total", "Failed RPCs, batch items and stream frames by method and ErrorInfo reason", ["method", "reason"]
)
LATENCY = Histogram(
    "facesvc_rpc_duration_seconds",
    "FaceService RPC latency (streams: the whole call)",
    ["method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INFERENCE = Histogram(
    "facesvc_model_inference_seconds",
    "One model run (OpenVINO or onnxruntime), by model name",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
)
MODEL_INFO = Gauge(
    "facesvc_model_info",
    "1 for each loaded model, labelled with what runs it",
    ["model", "kind", "runtime", "precision", "device"],
)


class ServiceCollector:
    """Index sizes and open streams, read at scrape time from the running server."""

    def __init__(self, index_sizes: Callable[[], dict[str, int]], open_streams: Callable[[], int]):
        self.index_sizes, self.open_streams = index_sizes, open_streams

    def collect(self):
        faces = GaugeMetricFamily("facesvc_index_faces", "Searchable faces per loaded collection index", labels=["collection"])
        for collection, size in sorted(self.index_sizes().items()):
            faces.add_metric([collection], size)
        yield faces
        yield GaugeMetricFamily(
            "facesvc_streams_active", "Open streams (StreamFrames, ProcessBatch, RegisterBatch)", value=self.open_streams()
        )


def serve_metrics(port: int, host: str, collector: ServiceCollector, token: str = "") -> None:
    """/metrics on its own thread. It names every loaded collection, so it binds to loopback by
    default (metrics_host) and, with a token set, answers only `Authorization: Bearer <token>`."""
    REGISTRY.register(collector)
    app = make_wsgi_app()
    if token:
        expected = f"Bearer {token}".encode()

        def guarded(environ, start_response):
            given = environ.get("HTTP_AUTHORIZATION", "").encode()
            if not hmac.compare_digest(given, expected):
                start_response("401 Unauthorized", [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")])
                return [b"metrics need Authorization: Bearer <metrics_token>\n"]
            return app(environ, start_response)

    _serve_wsgi(guarded if token else app, host, port)


def _serve_wsgi(app, host: str, port: int) -> None:
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):  # scrapes are not worth a log line each
            pass

    httpd = make_server(host, port, app, Server, handler_class=QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, request_id, msg (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
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
