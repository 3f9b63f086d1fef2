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

log = logging.getLogger("facesvc.rpc")


def to_status(exc: errors.FaceServiceError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=exc.reason, domain=errors.DOMAIN, metadata=exc.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=exc.code.value[0], message=exc.message, details=[detail]))


def rpc(method):
    """Decorate a unary servicer method: domain errors become statuses, bugs become INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except errors.FaceServiceError as exc:
            log.info("rpc=%s code=%s reason=%s msg=%s", method.__name__, exc.code.name, exc.reason, exc.message)
            failure = exc
        except Exception:  # noqa: BLE001 - the boundary: never let a bug kill the call without a status
            request_id = uuid.uuid4().hex[:16]
            log.exception("rpc=%s request_id=%s internal error", method.__name__, request_id)
            failure = errors.FaceServiceError(
                grpc.StatusCode.INTERNAL, errors.INTERNAL, f"internal error (request id {request_id})", request_id=request_id
            )
        context.abort_with_status(to_status(failure))

    return wrapper

