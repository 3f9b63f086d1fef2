"""Typed errors: every failed call raises a FaceServiceError subclass carrying the server's ErrorInfo."""

from __future__ import annotations

import types

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from facesvc.v1.error_reason_pb2 import ErrorReason

# Every reason the server can send, from the contract's ErrorReason enum: `e.reason == Reason.SPOOF_DETECTED`.
Reason = types.SimpleNamespace(**{name: name for name in ErrorReason.keys() if name != "ERROR_REASON_UNSPECIFIED"})


class FaceServiceError(Exception):
    """A call failed. `code` is the gRPC status, `reason` the machine-readable ErrorInfo reason
    (e.g. NO_FACE_DETECTED, SPOOF_DETECTED; empty when the server sent none, e.g. a connection error)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str] | None = None):
        super().__init__(f"{code.name} {reason}: {message}" if reason else f"{code.name}: {message}")
        self.code, self.reason, self.message, self.metadata = code, reason, message, dict(metadata or {})


class InvalidArgument(FaceServiceError):
    """Bad input: VALIDATION_FAILED, INVALID_IMAGE, IMAGE_TOO_LARGE, NO_FACE_DETECTED, MULTIPLE_FACES, LOW_QUALITY_FACE."""


class NotFound(FaceServiceError):
    """COLLECTION_NOT_FOUND, SUBJECT_NOT_FOUND, FACE_NOT_FOUND, STAGING_EXPIRED, API_KEY_NOT_FOUND."""


class AlreadyExists(FaceServiceError):
    """ALREADY_REGISTERED, COLLECTION_EXISTS."""


class FailedPrecondition(FaceServiceError):
    """SPOOF_DETECTED, FACE_LIMIT_REACHED, LIVENESS_REQUIRED, STAGING_MISMATCH, NO_COMPARABLE_FACES."""


class Unauthenticated(FaceServiceError):
    """API_KEY_MISSING, API_KEY_INVALID."""


class PermissionDenied(FaceServiceError):
    """The key may not touch this collection, or the RPC needs the admin key."""


class ResourceExhausted(FaceServiceError):
    """STREAM_LIMIT_REACHED, CALL_LIMIT_REACHED, STAGING_LIMIT_REACHED, RATE_LIMITED, or a message over the size limit."""


class Unavailable(FaceServiceError):
    """The server (or its database / cache) cannot be reached, or is still loading; retried by the client."""


class DeadlineExceeded(FaceServiceError):
    """The call's deadline passed, or the server closed an idle stream (STREAM_IDLE)."""


class Internal(FaceServiceError):
    """A server bug; the message carries a request id for its log."""


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
}


def error_class(code: grpc.StatusCode) -> type[FaceServiceError]:
    return _BY_CODE.get(code, FaceServiceError)


def from_rpc_error(err: grpc.RpcError) -> FaceServiceError:
    """The typed error for a failed call, with the ErrorInfo the server attached (if any)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    reason, metadata, message = "", {}, err.details() if hasattr(err, "details") else str(err)
    try:
        status = rpc_status.from_call(err)
    except (ValueError, AttributeError):
        status = None
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
    e = error_class(code)(code, reason, message or "", metadata)
    e.__cause__ = err
    return e


def from_item_error(item_error) -> FaceServiceError:
    """The typed error of one failed batch item (its ItemError)."""
    code = next((c for c in grpc.StatusCode if c.value[0] == item_error.code), grpc.StatusCode.UNKNOWN)
    return error_class(code)(code, item_error.reason, item_error.message, dict(item_error.metadata))
