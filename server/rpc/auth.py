"""API-key authentication and per-collection authorization, as a server interceptor.

- The admin key (server configuration) may call every RPC.
- A collection key (CreateApiKey) may call the stateless RPCs (Detect,
  Compare, ...) and every RPC whose request `collection` field names its own
  collection; anything else is PERMISSION_DENIED.
- A missing or unknown key is UNAUTHENTICATED.
Keys are stored as SHA-256 hashes (they are 256-bit random secrets, so a
slow hash adds nothing). Lookups are cached for `cache_s` seconds; a key
revoked on another replica stops working within that time (open streams
re-check their key with the database every second: `Recheck` in
server/domain/streaming.py).

A flood of made-up keys must not become a flood of database queries: a
string that is not shaped like a collection key is refused without a
lookup, an unknown key is remembered as unknown (a bounded LRU), and
lookups of keys never seen before are rate-limited (`auth_lookups_per_second`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import grpc

from server import errors
from server.rpc.messages import Malformed
from server.rpc.observability import around, rpc_name
from server.rpc.status import refuse

log = logging.getLogger("facesvc.auth")

HEADER = "x-api-key"
SERVICE_PREFIX = "/facesvc.v1.FaceService/"
# Who may call each RPC, declared once (tests/test_layers.py checks that every RPC of the service has an
# entry, and that every COLLECTION one names its collection in a `collection` field).
ADMIN, COLLECTION, ANY_KEY = "admin", "collection", "any key"
SCOPES = {
    **dict.fromkeys(("Detect", "CheckLiveness", "Compare", "Embed", "Analyze", "DetectBatch"), ANY_KEY),
    # StreamFrames is stateless unless its config asks to identify; the batches carry a collection per item:
    # their messages are authorized one by one (server/rpc/handlers/streams.py)
    **dict.fromkeys(("StreamFrames", "ProcessBatch", "RegisterBatch"), ANY_KEY),
    **dict.fromkeys(
        (
            "Process",
            "Register",
            "Verify",
            "GetSubject",
            "ListSubjects",
            "UpdateSubject",
            "DeleteSubject",
            "DeleteFace",
            "Search",
            "SearchByEmbedding",
            "GetIndexStats",
            "GetCollection",
            "FindSimilar",
            "GroupFaces",
            "CalibrateThreshold",
            "ExportSubject",
        ),
        COLLECTION,
    ),
    **dict.fromkeys(
        (
            "CreateCollection",
            "UpdateCollection",
            "ListCollections",
            "DeleteCollection",
            "CreateApiKey",
            "ListApiKeys",
            "DeleteApiKey",
            "ListAuditEvents",
        ),
        ADMIN,
    ),
}


KEY_SHAPE = re.compile(r"fsk_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")  # what new_api_key() makes
CACHE_ENTRIES = 10_000


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


# The principal of the FaceService call this thread serves (None: auth is off). Set by AuthInterceptor.
current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("current_principal", default=None)


def admin_or_open() -> bool:
    """The admin key's call (or, with auth off, anyone's): may see server-wide counters and search a
    liveness-REQUIRED collection without a photo."""
    principal = current_principal.get()
    return principal is None or principal.admin


def normalized(secret: str) -> str:
    """The key an `x-api-key` value names: spaces around a header's value are no part of it (RFC 9110).
    HTTP servers drop them before the gate sees the key and gRPC passes them on; a key must mean the
    same on both ports, and be one key wherever it is counted (limits.call_owner) or checked again."""
    return secret.strip(" \t")


def _invalid() -> errors.FaceServiceError:
    return errors.FaceServiceError(grpc.StatusCode.UNAUTHENTICATED, errors.API_KEY_INVALID, "unknown or revoked API key")


def _lru_put(entries: OrderedDict, key, value) -> None:
    """Put as the newest entry, dropping the oldest past CACHE_ENTRIES."""
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > CACHE_ENTRIES:
        entries.popitem(last=False)


class TokenBucket:
    """`rate` events a second on average, `burst` at once."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens, self._at = burst, clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1:
                return False
            self._tokens -= 1
            return True


class Authenticator:
    def __init__(self, store, admin_key: str, cache_s: float = 10.0, clock=time.monotonic, lookups_per_second: float = 200.0):
        self.store = store
        self._admin_hash = hash_key(admin_key)
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self._known: OrderedDict[str, None] = OrderedDict()  # digests once found valid: their re-checks are not rate-limited
        self._lock = threading.Lock()
        # bumped by forget(): a lookup that began before a revocation must not cache what it read
        self._generation = 0
        self.cache_s = cache_s
        self._clock = clock
        self._lookups = TokenBucket(lookups_per_second, max(1.0, lookups_per_second), clock)

    def forget(self) -> None:
        """Drop cached lookups (called when this replica revokes a key)."""
        with self._lock:
            self._cache.clear()
            self._generation += 1

    def _remember(self, digest: str, expires: float, p: Principal | None, generation: int) -> None:
        with self._lock:
            if generation != self._generation:  # a key was revoked meanwhile: what was read may be stale
                return
            _lru_put(self._cache, digest, (expires, p))
            if p is not None:
                _lru_put(self._known, digest, None)

    def principal(self, secret: str) -> Principal:
        secret = normalized(secret)
        if not secret:
            raise errors.FaceServiceError(
                grpc.StatusCode.UNAUTHENTICATED, errors.API_KEY_MISSING, f"send an API key in the `{HEADER}` metadata header"
            )
        digest = hash_key(secret)
        if hmac.compare_digest(digest, self._admin_hash):
            return Principal(admin=True)
        if not KEY_SHAPE.fullmatch(secret):
            raise _invalid()  # no collection key looks like this: no lookup
        now = self._clock()
        with self._lock:
            hit = self._cache.get(digest)
            known = digest in self._known
            generation = self._generation
        if hit is None or hit[0] <= now:
            if not known and not self._lookups.take():
                raise errors.exhausted(errors.RATE_LIMITED, "too many lookups of unknown API keys right now; retry shortly")
            rec = self.store.find_api_key(digest)
            p = None if rec is None else Principal(admin=False, collection=rec.collection_id, key_id=rec.key_id)
            self._remember(digest, now + self.cache_s, p, generation)
        else:
            p = hit[1]
        if p is None:
            raise _invalid()
        return p

    def still_valid(self, secret: str) -> None:
        """Asks the database (not the cache) whether a collection key still exists: open streams call this."""
        digest = hash_key(normalized(secret))
        if hmac.compare_digest(digest, self._admin_hash):
            return
        if self.store.find_api_key(digest) is None:
            with self._lock:
                self._cache.pop(digest, None)
            raise errors.FaceServiceError(
                grpc.StatusCode.UNAUTHENTICATED, errors.API_KEY_INVALID, "the API key was revoked; the stream is closed"
            )

    @staticmethod
    def authorize(p: Principal, rpc: str, request) -> None:
        """`rpc`'s scope (SCOPES) for this principal; COLLECTION scope compares the request's `collection`."""
        if p.admin:
            return
        scope = SCOPES[rpc]
        if scope == ADMIN:
            raise errors.FaceServiceError(
                grpc.StatusCode.PERMISSION_DENIED, errors.PERMISSION_DENIED, f"{rpc} needs the admin key", rpc=rpc
            )
        if scope == COLLECTION:
            Authenticator.authorize_collection(p, request.collection)

    @staticmethod
    def authorize_collection(p: Principal, collection: str) -> None:
        """A collection key acts on its own collection only."""
        if not p.admin and collection != p.collection:
            raise errors.FaceServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                errors.PERMISSION_DENIED,
                f"this key belongs to collection {p.collection!r}, not {errors.quote(collection)}",
                key_collection=p.collection,
            )


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every FaceService call; health and reflection stay open (orchestrators and grpcurl need them)."""

    def __init__(self, authenticator: Authenticator):
        self.auth = authenticator

    def _check(self, rpc: str, request, context) -> contextvars.Token:
        """Unary calls: the key and what it may do with this request. Streaming calls (request None):
        the key only; the servicer authorizes each message of the stream (StreamHandlers._authorize).
        Returns the token that resets current_principal when the call ends."""
        sent = [value for key, value in context.invocation_metadata() if key == HEADER]
        try:
            if len(sent) > 1:  # which one counts would be the proxies' choice; HTTP refuses them too
                raise errors.FaceServiceError(
                    grpc.StatusCode.UNAUTHENTICATED, errors.API_KEY_INVALID, f"send one `{HEADER}` header, not {len(sent)}"
                )
            principal = self.auth.principal(sent[0] if sent else "")
            # a message that does not parse cannot be authorized; the next interceptor refuses it
            if request is not None and not isinstance(request, Malformed):
                self.auth.authorize(principal, rpc, request)
        except errors.FaceServiceError as exc:
            log.info("rpc=%s denied: %s %s", rpc, exc.reason, exc.message)
            refuse(context, rpc, exc)
        return current_principal.set(principal)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        rpc = rpc_name(handler, handler_call_details.method, SERVICE_PREFIX)
        if rpc is None:
            return handler

        def enter(request, context, kind):
            return self._check(rpc, None if kind.startswith("stream") else request, context)

        def leave(token):
            with contextlib.suppress(ValueError):  # a stream's generator closed from another context
                current_principal.reset(token)

        return around(handler, enter, leave)
