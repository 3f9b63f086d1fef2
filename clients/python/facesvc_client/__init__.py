"""Python client for facesvc: `FaceClient(target, api_key=..., tls=...)`, typed errors, and the `facesvc` CLI."""

from facesvc_client.client import FaceClient
from facesvc_client.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FaceServiceError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    from_item_error,
)
from facesvc_client.images import to_image

__all__ = [
    "FaceClient",
    "FaceServiceError",
    "InvalidArgument",
    "NotFound",
    "AlreadyExists",
    "FailedPrecondition",
    "Unauthenticated",
    "PermissionDenied",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "Internal",
    "Reason",
    "from_item_error",
    "to_image",
]
