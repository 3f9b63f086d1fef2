"""Request ids, latency and status counts for every FaceService call (the outermost interceptor).

Every FaceService call gets a request id: the caller's `x-request-id` metadata
(if it is a sane token) or a new one. It is sent back in the initial
metadata, put on every log line written while the call runs, and used as the
id in INTERNAL error messages.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import grpc

from server.context import _SANE_ID, IN_FLIGHT, REQUEST_ID_HEADER, current_call, request_id, work_budget
from server.telemetry import LATENCY, RPCS

_HANDLER_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def rewrap(handler: grpc.RpcMethodHandler, make, request_deserializer=None):
    """The same handler with its behaviour replaced by make(behaviour, kind), where kind is
    "unary_unary", "unary_stream", "stream_unary" or "stream_stream" (what the server interceptors
    share); and its request deserializer, when one is given."""
    kind = next(k for k in _HANDLER_FACTORIES if getattr(handler, k) is not None)
    return _HANDLER_FACTORIES[kind](
        make(getattr(handler, kind), kind),
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def rpc_name(handler, method: str, prefix: str) -> str | None:
    """The RPC's name when `method` is one of the service's (`prefix`) and has a handler; else None."""
    if handler is None or not method.startswith(prefix):
        return None
    return method[len(prefix) :]


def around(handler: grpc.RpcMethodHandler, enter, leave):
    """The same handler with `state = enter(request, context, kind)` before it and `leave(state)` after
    it, whether it answers once or streams (then the call lasts as long as the iteration)."""

    def make(inner, kind):
        if kind.endswith("unary"):

            def wrapped(request, context):
                state = enter(request, context, kind)
                try:
                    return inner(request, context)
                finally:
                    leave(state)
        else:

            def wrapped(request, context):
                state = enter(request, context, kind)
                try:
                    yield from inner(request, context)
                finally:
                    leave(state)

        return wrapped

    return rewrap(handler, make)


class ObservabilityInterceptor(grpc.ServerInterceptor):
    """Request id, latency, status counts for every FaceService call (the outermost interceptor)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefix):
            return handler
        method = handler_call_details.method[len(self.prefix) :]
        incoming = dict(handler_call_details.invocation_metadata or ()).get(REQUEST_ID_HEADER, "")

        def start(context):
            rid = incoming if _SANE_ID.fullmatch(incoming or "") else uuid.uuid4().hex[:16]
            context.send_initial_metadata(((REQUEST_ID_HEADER, rid),))
            IN_FLIGHT.add(1)
            return (request_id.set(rid), current_call.set(context), work_budget.set(None)), time.perf_counter()

        def finish(context, token, t0, exc: BaseException | None) -> None:
            IN_FLIGHT.add(-1)
            with contextlib.suppress(ValueError):  # a stream's generator closed from another context
                request_id.reset(token[0])
                current_call.reset(token[1])
                work_budget.reset(token[2])
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
