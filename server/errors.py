"""One domain exception for the whole service, mapped to a gRPC status in one place.

The core raises `FaceServiceError(code, reason, message, **metadata)`; the
servicer's `rpc_errors` wrapper turns it into a status with a
`google.rpc.ErrorInfo` detail (AIP-193) so clients can branch on `reason`.
"""
from __future__ import annotations

import grpc

DOMAIN = "facesvc"

# Stable machine-readable reasons (documented in the .proto header).
VALIDATION_FAILED = "VALIDATION_FAILED"
INVALID_IMAGE = "INVALID_IMAGE"
IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
NO_FACE_DETECTED = "NO_FACE_DETECTED"
MULTIPLE_FACES = "MULTIPLE_FACES"
SPOOF_DETECTED = "SPOOF_DETECTED"
MODELS_LOADING = "MODELS_LOADING"
INTERNAL = "INTERNAL"


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
        grpc.StatusCode.INVALID_ARGUMENT, MULTIPLE_FACES, f"exactly one face required, found {count}", face_count=count, **metadata
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
COLLECTION_NOT_FOUND = "COLLECTION_NOT_FOUND"
COLLECTION_EXISTS = "COLLECTION_EXISTS"
SUBJECT_NOT_FOUND = "SUBJECT_NOT_FOUND"
FACE_NOT_FOUND = "FACE_NOT_FOUND"
ALREADY_REGISTERED = "ALREADY_REGISTERED"
FACE_LIMIT_REACHED = "FACE_LIMIT_REACHED"
LOW_QUALITY_FACE = "LOW_QUALITY_FACE"
STAGING_EXPIRED = "STAGING_EXPIRED"
STAGING_MISMATCH = "STAGING_MISMATCH"
LIVENESS_REQUIRED = "LIVENESS_REQUIRED"
NO_COMPARABLE_FACES = "NO_COMPARABLE_FACES"
API_KEY_NOT_FOUND = "API_KEY_NOT_FOUND"
STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
CACHE_UNAVAILABLE = "CACHE_UNAVAILABLE"
# Auth (raised by the interceptor).
API_KEY_MISSING = "API_KEY_MISSING"
API_KEY_INVALID = "API_KEY_INVALID"
PERMISSION_DENIED = "PERMISSION_DENIED"
STREAM_LIMIT_REACHED = "STREAM_LIMIT_REACHED"
STREAM_PROTOCOL = "STREAM_PROTOCOL"
CALL_ENDED = "CALL_ENDED"
# Limits (hardening): a caller at one of its limits is refused, never queued behind others.
CALL_LIMIT_REACHED = "CALL_LIMIT_REACHED"
STREAM_IDLE = "STREAM_IDLE"
STAGING_LIMIT_REACHED = "STAGING_LIMIT_REACHED"
RATE_LIMITED = "RATE_LIMITED"

QUOTE_LIMIT = 128  # characters of caller input quoted back in a message or a log line


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """Caller input for a message or a log line: repr()'d and cut to `limit` characters, so a
    5 000-character id neither comes back whole nor grows the log by its length."""
    text = str(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + f"... ({len(text)} characters)"


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
