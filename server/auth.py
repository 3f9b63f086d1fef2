"""API-key authentication and per-collection authorization, as a server interceptor.

- The admin key (server configuration) may call every RPC.
- A collection key (CreateApiKey) may call the stateless RPCs (Detect,
  Compare, ...) and every RPC whose request `collection` field names its own
  collection; anything else is PERMISSION_DENIED.
- A missing or unknown key is UNAUTHENTICATED.
Keys are stored as SHA-256 hashes (they are 256-bit random secrets, so a
slow hash adds nothing). Lookups are cached for `cache_s` seconds; a key
revoked on another replica stops working within that time.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass

import grpc

from server import errors
from server.observability import ERRORS, rewrap
from server.rpc_errors import to_status

log = logging.getLogger("facesvc.auth")

HEADER = "x-api-key"
SERVICE_PREFIX = "/facesvc.v1.FaceService/"
ADMIN_ONLY = frozenset({"CreateCollection", "ListCollections", "DeleteCollection", "CreateApiKey", "ListApiKeys",
                        "DeleteApiKey"})


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_api_key() -> tuple[str, str]:
    """(key_id, secret). The secret names its key id so operators can tell keys apart in logs."""
    key_id = secrets.token_hex(8)
    return key_id, f"fsk_{key_id}_{secrets.token_urlsafe(32)}"


@dataclass(frozen=True)
class Principal:
    admin: bool
    collection: str = ""
    key_id: str = ""


class Authenticator:
    def __init__(self, store, admin_key: str, cache_s: float = 10.0, clock=time.monotonic):
        self.store = store
        self._admin_hash = hash_key(admin_key)
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._lock = threading.Lock()
        self.cache_s = cache_s
        self._clock = clock

    def forget(self) -> None:
        """Drop cached lookups (called when this replica revokes a key)."""
        with self._lock:
            self._cache.clear()

    def principal(self, secret: str) -> Principal:
        if not secret:
            raise errors.FaceServiceError(grpc.StatusCode.UNAUTHENTICATED, errors.API_KEY_MISSING,
                                          f"send an API key in the `{HEADER}` metadata header")
        digest = hash_key(secret)
        if hmac.compare_digest(digest, self._admin_hash):
            return Principal(admin=True)
        now = self._clock()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is None or hit[0] <= now:
            rec = self.store.find_api_key(digest)
            p = None if rec is None else Principal(admin=False, collection=rec.collection_id, key_id=rec.key_id)
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (now + self.cache_s, p)
        else:
            p = hit[1]
        if p is None:
            raise errors.FaceServiceError(grpc.StatusCode.UNAUTHENTICATED, errors.API_KEY_INVALID, "unknown or revoked API key")
        return p

    @staticmethod
    def authorize(p: Principal, rpc: str, request) -> None:
        if p.admin:
            return
        if rpc in ADMIN_ONLY:
            raise errors.FaceServiceError(grpc.StatusCode.PERMISSION_DENIED, errors.PERMISSION_DENIED,
                                          f"{rpc} needs the admin key", rpc=rpc)
        if "collection" in type(request).DESCRIPTOR.fields_by_name and request.collection != p.collection:
            raise errors.FaceServiceError(
                grpc.StatusCode.PERMISSION_DENIED, errors.PERMISSION_DENIED,
                f"this key belongs to collection {p.collection!r}, not {request.collection!r}", key_collection=p.collection)


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every FaceService call; health and reflection stay open (orchestrators and grpcurl need them)."""

    def __init__(self, authenticator: Authenticator):
        self.auth = authenticator

    def _check(self, rpc: str, request, context) -> None:
        """Unary calls: the key and what it may do with this request. Streaming calls (request None):
        the key only; the servicer authorizes each message of the stream (StreamRpcs._authorize)."""
        secret = dict(context.invocation_metadata()).get(HEADER, "")
        try:
            principal = self.auth.principal(secret)
            if request is not None:
                self.auth.authorize(principal, rpc, request)
        except errors.FaceServiceError as exc:
            log.info("rpc=%s denied: %s %s", rpc, exc.reason, exc.message)
            ERRORS.labels(rpc, exc.reason).inc()
            context.abort_with_status(to_status(exc))

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        rpc = method[len(SERVICE_PREFIX):]

        def make(inner, kind):
            streaming_request = kind.startswith("stream")

            def checked(request, context):
                self._check(rpc, None if streaming_request else request, context)
                return inner(request, context)
            return checked

        return rewrap(handler, make)
