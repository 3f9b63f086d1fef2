"""Map FaceServiceError (and anything unexpected) to a gRPC status with ErrorInfo, in one place."""

from __future__ import annotations

import functools
import logging
import uuid

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from server import errors
from server.context import call_outcome, request_id
from server.telemetry import ERRORS

log = logging.getLogger("facesvc.rpc")


def to_status(exc: errors.FaceServiceError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=errors.DOMAIN, metadata=exc.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=exc.code.value[0], message=exc.message, details=[detail]))


def refuse(context, rpc: str, exc: errors.FaceServiceError) -> None:
    """Ends a call that an interceptor refuses before its handler runs: counted by reason, then aborted."""
    ERRORS.labels(rpc, exc.reason).inc()
    context.abort_with_status(to_status(exc))


def failure(name: str, exc: BaseException, item: bool = False) -> errors.FaceServiceError:
    """The domain error to answer with: itself, or INTERNAL with a request id for a bug (logged).
    `item`: one item of a batch or one frame of a stream, logged at DEBUG (the call logs a summary),
    so a stream of failing items does not grow the log by a line each."""
    if isinstance(exc, errors.FaceServiceError):
        log.log(logging.DEBUG if item else logging.INFO, "rpc=%s code=%s reason=%s msg=%s", name, exc.code.name, exc.reason, exc)
        ERRORS.labels(name, exc.reason).inc()
        return exc
    rid = request_id.get()
    rid = uuid.uuid4().hex[:16] if rid == "-" else rid
    log.error("rpc=%s request_id=%s internal error", name, rid, exc_info=exc)
    ERRORS.labels(name, errors.INTERNAL).inc()
    return errors.FaceServiceError(
        grpc.StatusCode.INTERNAL, errors.INTERNAL, f"internal error (request id {rid})", request_id=rid
    )


def outcome(exc: errors.FaceServiceError) -> str:
    """How a call or an item ended, for the audit log: "<status code> <reason>"."""
    return f"{exc.code.name} {exc.reason}"


def rpc(method):
    """Decorate a unary servicer method: domain errors become statuses, bugs become INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - the boundary: never let a bug kill the call without a status
            err = failure(method.__name__, exc)
            call_outcome.set(outcome(err))
            context.abort_with_status(to_status(err))

    return wrapper


def stream_rpc(method):
    """The same for a servicer method that yields responses (server or bidirectional streaming)."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            if context.is_active():
                context.abort_with_status(to_status(failure(method.__name__, exc)))

    return wrapper
