"""FaceService over HTTP through the gRPC side's own servicer and interceptors.

A Connect (or gRPC-Web, or JSON) call is served by the same `FaceServicer`
methods, wrapped by the same interceptor instances (request ids, metrics and
logs; API keys; per-key and stream limits) as a gRPC call: `HttpCall` gives
them the part of `grpc.ServicerContext` they use (metadata, peer, deadline,
abort, callbacks), and an abort becomes a `ConnectError` carrying the same
`google.rpc.Status` details (the ErrorInfo reason) a gRPC client gets.
"""

from __future__ import annotations

import contextvars
import re
import threading
import time

import grpc
from connectrpc.code import Code
from connectrpc.compat import google_protobuf_binary_codec, google_protobuf_json_codec
from connectrpc.compression.gzip import GzipCompression
from connectrpc.errors import ConnectError, ErrorDetail
from google.rpc import status_pb2
from protobuf.wkt import Any

from facesvc.v1.face_service_connect import FaceServiceWSGIApplication
from server import errors
from server.context import call_ended
from server.rpc.auth import SERVICE_PREFIX
from server.rpc.servicer import SERVICE
from server.rpc.status import refuse, to_status

STATUS_DETAILS_KEY = "grpc-status-details-bin"


# What waits for the request's answer to be sent, all of it (the gate sets a list for each request
# and runs what is in it then; the worker thread sees it because the gate starts it in the request's
# context): HttpCall.when_answered.
ANSWERED: contextvars.ContextVar[list | None] = contextvars.ContextVar("facesvc_http_answered", default=None)


class HttpAbort(Exception):
    """Raised by HttpCall.abort_with_status, as grpc raises out of a handler that aborts."""

    def __init__(self, status: grpc.Status):
        super().__init__(status.details)
        self.status = status


def connect_code(code: grpc.StatusCode) -> Code:
    """The Connect code of a gRPC status code (the same names, but CANCELLED is spelled `canceled`)."""
    return Code.CANCELED if code is grpc.StatusCode.CANCELLED else Code(code.name.lower())


def connect_error(status: grpc.Status) -> ConnectError:
    """The ConnectError a gRPC status becomes: its code, message and every rich-status detail."""
    details = []
    for key, value in status.trailing_metadata or ():
        if key == STATUS_DETAILS_KEY:
            rich = status_pb2.Status.FromString(value)
            details = [ErrorDetail(Any(type_url=d.type_url, value=d.value)) for d in rich.details]
    return ConnectError(connect_code(status.code), status.details or "", details)


class HttpCall:
    """The `grpc.ServicerContext` of one HTTP call, as far as the servicer and interceptors use it.

    A deadline comes from `connect-timeout-ms` (or gRPC-Web's `grpc-timeout`); initial metadata becomes
    response headers. The HTTP server reads the whole request before the handler runs and gives no word
    of a client that leaves, so a call ends by its deadline, its answer or `cancel()`."""

    def __init__(self, ctx, peer: str):
        self._ctx = ctx
        self._metadata = tuple((k, v) for k, v in ctx.request_headers.allitems() if not k.endswith("-bin"))
        self._peer = peer
        remaining_ms = ctx.timeout_ms
        self._deadline = None if remaining_ms is None else time.monotonic() + remaining_ms / 1000
        self._lock = threading.Lock()
        self._callbacks: list | None = []
        self._code: grpc.StatusCode | None = None
        self.aborted: grpc.Status | None = None  # how the call was aborted, whichever thread aborted it

    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return self._callbacks is not None and (self._deadline is None or time.monotonic() < self._deadline)

    def send_initial_metadata(self, metadata) -> None:
        for key, value in metadata:
            self._ctx.response_headers[key] = value

    def add_callback(self, callback) -> bool:
        with self._lock:
            if self._callbacks is None:
                return False
            self._callbacks.append(callback)
            return True

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def when_answered(self, fn) -> None:
        """fn() once the call's answer has been sent, all of it: its handler has returned by then, but
        the worker thread may still be sending, and the answer is the server's to hold until the
        client takes it. The key's call slot is given back so (LimitInterceptor): else a client that
        took none of its answers held a worker and an answer per call, however many calls its key
        may make at once."""
        later = ANSWERED.get()
        if later is None:
            fn()
        else:
            later.append(fn)

    def abort_with_status(self, status: grpc.Status):
        self._code, self.aborted = status.code, status
        raise HttpAbort(status)

    def cancel(self) -> None:
        self._code = self._code or grpc.StatusCode.CANCELLED
        self.done()

    def done(self) -> None:
        """The call has ended: its callbacks run once (as grpc runs them when an RPC terminates)."""
        with self._lock:
            callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            callback()


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class _Details:
    """grpc.HandlerCallDetails for the interceptors."""

    def __init__(self, method: str, metadata):
        self.method, self.invocation_metadata = method, metadata


class FaceServiceOverHttp:
    """The FaceServiceSync the generated Connect app calls: every method runs the gRPC servicer's
    method through the gRPC interceptors (outermost first, as grpc.server applies them)."""

    def __init__(self, servicer, interceptors):
        self._interceptors = list(interceptors)
        self._base: dict[str, grpc.RpcMethodHandler] = {}
        for method in SERVICE.methods:
            streaming = method.client_streaming or method.server_streaming
            if streaming and not (method.client_streaming and method.server_streaming):
                raise ValueError(f"{method.name}: only unary and bidirectional RPCs are bridged")
            make = grpc.stream_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
            self._base[SERVICE_PREFIX + method.name] = make(getattr(servicer, method.name))
            setattr(self, _snake(method.name), self._bridge(SERVICE_PREFIX + method.name, streaming))

    def _handler(self, path: str, metadata) -> grpc.RpcMethodHandler:
        def chain(i, details):
            if i == len(self._interceptors):
                return base
            return self._interceptors[i].intercept_service(lambda d: chain(i + 1, d), details)

        base = self._base[path]
        return chain(0, _Details(path, metadata))

    def _bridge(self, path: str, streaming: bool):
        def begin(ctx):
            client = ctx.client_address or "unknown:0"
            call = HttpCall(ctx, ("ipv6:" if client.startswith("[") else "ipv4:") + client)
            return call, self._handler(path, call.invocation_metadata())

        if streaming:

            def stream(requests, ctx):
                call, handler = begin(ctx)
                try:
                    yield from handler.stream_stream(_parsed(requests, call, path), call)
                    if call.aborted is not None:  # by the thread that reads the requests (as on the gRPC port)
                        raise connect_error(call.aborted)
                    if not call.is_active():
                        # its deadline passed, or it was cancelled: the handler stopped where it was, and
                        # gRPC would end the call with that status; a clean end would tell the client its
                        # unanswered items were all there was
                        raise connect_error(to_status(call_ended(call)))
                except HttpAbort as exc:
                    raise connect_error(exc.status) from None
                finally:
                    call.done()

            return stream

        def unary(request, ctx):
            call, handler = begin(ctx)
            try:
                return handler.unary_unary(request, call)
            except HttpAbort as exc:
                raise connect_error(exc.status) from None
            finally:
                call.done()

        return unary


COMPRESSED = "protocol error: sent compressed message"  # the library's words for a flag it was not told of
NO_MESSAGE = "unary request has zero messages"  # theirs for a unary call's body without its message


def library_refusal(code: grpc.StatusCode, message: str) -> errors.FaceServiceError | None:
    """The error the Connect library's own refusal of a request (it reads the request before any
    handler: an envelope cut short, bytes that are not the message, a body over the size or
    inflation bound) is answered with, on every HTTP protocol alike: its code, with the
    VALIDATION_FAILED ErrorInfo the gRPC port gives the same bytes, and its message cut short (it
    quotes the caller's bad value whole). A compressed message nobody announced is UNIMPLEMENTED, as
    grpc answers an encoding it does not take. None for the library's other codes (UNKNOWN, INTERNAL:
    not the caller's to fix)."""
    message = errors.cut(message)
    if message.startswith(COMPRESSED):
        return errors.FaceServiceError(
            grpc.StatusCode.UNIMPLEMENTED, errors.VALIDATION_FAILED, "encoding: send messages uncompressed", field="encoding"
        )
    if message == NO_MESSAGE:  # the gRPC port's answer to the same call
        return errors.validation("request", "the stream ended without the call's request message")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED):
        return errors.FaceServiceError(code, errors.VALIDATION_FAILED, f"request: {message}", field="request")
    return None


STATUS_BY_NUMBER = {c.value[0]: c for c in grpc.StatusCode}  # a grpc-status header's number to its code


def grpc_code(code: Code) -> grpc.StatusCode:
    """The gRPC status code of a Connect code (connect_code's inverse)."""
    return grpc.StatusCode.CANCELLED if code == Code.CANCELED else grpc.StatusCode[code.name.upper()]


def _parsed(requests, call: HttpCall, path: str):
    """A stream's requests; one the Connect library cannot read aborts the call with the library's
    refusal (library_refusal), as the gRPC port ends a stream at a message that does not parse. Left
    to the library, the error read as the stream's end: a batch answered the items before it, left out
    the rest and ended with OK."""
    try:
        yield from requests
    except ConnectError as exc:
        error = library_refusal(grpc_code(exc.code), exc.message) or errors.FaceServiceError(
            grpc.StatusCode.INTERNAL, errors.INTERNAL, "the request stream could not be read"
        )
        refuse(call, path.removeprefix(SERVICE_PREFIX), error)


def connect_app(servicer, interceptors, read_max_bytes: int) -> FaceServiceWSGIApplication:
    """The generated Connect WSGI app (Connect JSON and binary, gRPC-Web) over the gRPC servicer. Bodies
    may come gzipped (Connect clients send them so by default), inflating at most MAX_INFLATION times."""
    app = FaceServiceOverHttp(servicer, interceptors)
    # JSON that names a field or an enum value the request does not have is refused (VALIDATION_FAILED),
    # as the proto3 JSON spec has parsers do by default: the library's default skips both, so a
    # mistyped `"selection": "FACE_SELECTION_REQUIRE_SINGL"` quietly ran without the single-face check.
    # Binary clients' unknown fields are skipped, as everywhere in protobuf.
    codecs = [google_protobuf_binary_codec(), google_protobuf_json_codec(ignore_unknown_fields=False)]
    return FaceServiceWSGIApplication(app, read_max_bytes=read_max_bytes, compressions=[BoundedGzip()], codecs=codecs)


class BoundedGzip(GzipCompression):
    """gzip whose output is bounded by its input, not only by the message limit. A request's work
    budget grows with the bytes it sends (docs/security.md), and the handler sees the message after
    decompression: unbounded, a 30 KB body of zero pixels inflates to 32 MB and buys that budget.
    JSON and photos inflate a few times at most, raw camera frames rarely beyond four. (The gRPC port
    takes no compressed messages at all: grpc decompresses before any code of ours sees the call.)"""

    MAX_INFLATION = 8

    def decompress(self, data, read_max_bytes: int | None = None) -> bytes:
        bound = self.MAX_INFLATION * len(data) + 65536
        if read_max_bytes is not None and read_max_bytes <= bound:
            return super().decompress(data, read_max_bytes)
        try:
            return super().decompress(data, bound)
        except ConnectError as exc:
            if exc.code != Code.RESOURCE_EXHAUSTED:
                raise
            raise ConnectError(
                Code.RESOURCE_EXHAUSTED,
                f"a gzip body may inflate at most {self.MAX_INFLATION} times ({len(data)} bytes sent): send it uncompressed",
            ) from None
