"""One domain exception for the whole service, mapped to a gRPC status in one place.

The core raises `FaceServiceError(code, reason, message, **metadata)`; the
servicer's `rpc_errors` wrapper turns it into a status with a
`google.rpc.ErrorInfo` detail (AIP-193) so clients can branch on `reason`.
"""

from __future__ import annotations

import grpc

from facesvc.v1 import error_reason_pb2

DOMAIN = "facesvc"

# The ErrorInfo reasons are the names of the contract's ErrorReason enum
# (protos/facesvc/v1/error_reason.proto): a reason that is not declared there fails at import.
REASONS = frozenset(error_reason_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}


def _reason(name: str) -> str:
    if name not in REASONS:
        raise ImportError(f"reason {name} is not in the contract's ErrorReason enum")
    return name


VALIDATION_FAILED = _reason("VALIDATION_FAILED")
INVALID_IMAGE = _reason("INVALID_IMAGE")
IMAGE_TOO_LARGE = _reason("IMAGE_TOO_LARGE")
NO_FACE_DETECTED = _reason("NO_FACE_DETECTED")
MULTIPLE_FACES = _reason("MULTIPLE_FACES")
SPOOF_DETECTED = _reason("SPOOF_DETECTED")
MODELS_LOADING = _reason("MODELS_LOADING")
INTERNAL = _reason("INTERNAL")


class FaceServiceError(Exception):
    """A failure the caller should see, with its gRPC code and stable reason."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, *, detail: str = "", **metadata: object):
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.detail = detail  # for the server log only (driver text, hosts): never sent to the caller
        self.metadata = {k: str(v) for k, v in metadata.items()}

    def __str__(self) -> str:
        return f"{self.message} ({self.detail})" if self.detail else self.message

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"FaceServiceError({self.code.name}, {self.reason}, {self.message!r}, {self.metadata})"


def validation(field: str, message: str, **metadata: object) -> FaceServiceError:
    return FaceServiceError(grpc.StatusCode.INVALID_ARGUMENT, VALIDATION_FAILED, f"{field}: {message}", field=field, **metadata)


def invalid_image(message: str, **metadata: object) -> FaceServiceError:
    return FaceServiceError(grpc.StatusCode.INVALID_ARGUMENT, INVALID_IMAGE, message, **metadata)


def image_too_large(message: str, **metadata: object) -> FaceServiceError:
    return FaceServiceError(grpc.StatusCode.INVALID_ARGUMENT, IMAGE_TOO_LARGE, message, **metadata)


def no_face(message: str = "no face detected in the image", **metadata: object) -> FaceServiceError:
    return FaceServiceError(grpc.StatusCode.INVALID_ARGUMENT, NO_FACE_DETECTED, message, **metadata)


def multiple_faces(count: int, **metadata: object) -> FaceServiceError:
    return FaceServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        MULTIPLE_FACES,
        f"exactly one face required, found {count}",
        face_count=count,
        **metadata,
    )


def spoof(score: float, threshold: float, **metadata: object) -> FaceServiceError:
    return FaceServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        SPOOF_DETECTED,
        f"liveness check failed (score {score:.3f} < threshold {threshold:.3f})",
        liveness_score=f"{score:.4f}",
        threshold=f"{threshold:.4f}",
        **metadata,
    )


# Identity lifecycle (Process / Register / Verify and management).
COLLECTION_NOT_FOUND = _reason("COLLECTION_NOT_FOUND")
COLLECTION_EXISTS = _reason("COLLECTION_EXISTS")
SUBJECT_NOT_FOUND = _reason("SUBJECT_NOT_FOUND")
FACE_NOT_FOUND = _reason("FACE_NOT_FOUND")
ALREADY_REGISTERED = _reason("ALREADY_REGISTERED")
FACE_LIMIT_REACHED = _reason("FACE_LIMIT_REACHED")
LOW_QUALITY_FACE = _reason("LOW_QUALITY_FACE")
STAGING_EXPIRED = _reason("STAGING_EXPIRED")
STAGING_MISMATCH = _reason("STAGING_MISMATCH")
LIVENESS_REQUIRED = _reason("LIVENESS_REQUIRED")
NO_COMPARABLE_FACES = _reason("NO_COMPARABLE_FACES")
DUPLICATE_FACE = _reason("DUPLICATE_FACE")
API_KEY_NOT_FOUND = _reason("API_KEY_NOT_FOUND")
STORE_UNAVAILABLE = _reason("STORE_UNAVAILABLE")
CACHE_UNAVAILABLE = _reason("CACHE_UNAVAILABLE")
# Auth (raised by the interceptor).
API_KEY_MISSING = _reason("API_KEY_MISSING")
API_KEY_INVALID = _reason("API_KEY_INVALID")
PERMISSION_DENIED = _reason("PERMISSION_DENIED")
STREAM_LIMIT_REACHED = _reason("STREAM_LIMIT_REACHED")
STREAM_PROTOCOL = _reason("STREAM_PROTOCOL")
CALL_ENDED = _reason("CALL_ENDED")
# Limits (hardening): a caller at one of its limits is refused, never queued behind others.
CALL_LIMIT_REACHED = _reason("CALL_LIMIT_REACHED")
STREAM_IDLE = _reason("STREAM_IDLE")
STAGING_LIMIT_REACHED = _reason("STAGING_LIMIT_REACHED")
RATE_LIMITED = _reason("RATE_LIMITED")
# Liveness that cannot judge (vision/pipeline.py): the photo, not the face, is the problem.
FACE_TOO_CLOSE = _reason("FACE_TOO_CLOSE")
FACE_TOO_SMALL = _reason("FACE_TOO_SMALL")

QUOTE_LIMIT = 128  # characters of caller input quoted back in a message or a log line


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """Caller input for a message or a log line: repr()'d and cut to `limit` characters, so a
    5 000-character id neither comes back whole nor grows the log by its length."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


def cut(message: str, limit: int = 2 * QUOTE_LIMIT) -> str:
    """A message written by a library that quotes caller input whole (a JSON parser's "failed to parse
    field: <the value>"), cut to `limit` characters."""
    return message if len(message) <= limit else message[:limit] + f"... ({len(message)} characters)"


def exhausted(reason: str, message: str, **metadata: object) -> FaceServiceError:
    return FaceServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, reason, message, **metadata)


def not_found(reason: str, message: str, **metadata: object) -> FaceServiceError:
    return FaceServiceError(grpc.StatusCode.NOT_FOUND, reason, message, **metadata)


def already_exists(reason: str, message: str, **metadata: object) -> FaceServiceError:
    return FaceServiceError(grpc.StatusCode.ALREADY_EXISTS, reason, message, **metadata)


def precondition(reason: str, message: str, **metadata: object) -> FaceServiceError:
    return FaceServiceError(grpc.StatusCode.FAILED_PRECONDITION, reason, message, **metadata)


def unavailable(reason: str, message: str, *, detail: str = "", **metadata: object) -> FaceServiceError:
    return FaceServiceError(grpc.StatusCode.UNAVAILABLE, reason, message, detail=detail, **metadata)


def low_quality(message: str, **metadata: object) -> FaceServiceError:
    return FaceServiceError(grpc.StatusCode.INVALID_ARGUMENT, LOW_QUALITY_FACE, message, **metadata)
