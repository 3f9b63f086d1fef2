"""What the HTTP port decides from a request's headers, before it holds a byte of the body.

A WSGI app sees a request only once its whole body has been read into memory, and the key check,
the limits and the content-type check all ran after that. Anyone who could open connections could
make the server buffer a message's worth (32 MB) per connection without a key. This ASGI layer in
front of the WSGI app answers from the headers: a method or content type no RPC takes, a body
larger than a message, a missing or unknown key; and it bounds the bodies being read, in all and
per key, refusing at once (never queueing) past either bound. What passes is run as hypercorn runs
a WSGI app.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from functools import partial

import grpc
from google.rpc import error_details_pb2
from hypercorn.app_wrappers import WSGIWrapper

from server import errors
from server.rpc.auth import HEADER, SERVICE_PREFIX

# Connect's HTTP statuses for the codes answered here (https://connectrpc.com/docs/protocol/#error-codes)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: "400 Bad Request",
    grpc.StatusCode.UNAUTHENTICATED: "401 Unauthorized",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "429 Too Many Requests",
    grpc.StatusCode.UNAVAILABLE: "503 Service Unavailable",
    grpc.StatusCode.INTERNAL: "500 Internal Server Error",
}
ERROR_INFO = error_details_pb2.ErrorInfo.DESCRIPTOR.full_name


def info_detail(reason: str, metadata: dict[str, str]) -> dict:
    """A Connect error detail carrying an ErrorInfo, also spelled out as JSON (`debug`) for people."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=errors.DOMAIN, metadata=metadata)
    return {
        "type": ERROR_INFO,
        "value": base64.b64encode(info.SerializeToString()).decode().rstrip("="),
        "debug": {"reason": reason, "domain": errors.DOMAIN, "metadata": dict(metadata)},
    }


def error_body(exc: errors.FaceServiceError) -> bytes:
    """A Connect error body for `exc`: code, message and its ErrorInfo."""
    code = "canceled" if exc.code is grpc.StatusCode.CANCELLED else exc.code.name.lower()
    return json.dumps({"code": code, "message": exc.message, "details": [info_detail(exc.reason, exc.metadata)]}).encode()


class BodyBytes:
    """Bytes of request bodies being read or served: at most `total` in all and `per_owner` per key;
    one body is let in whatever its size."""

    def __init__(self, total: int, per_owner: int):
        self.total, self.per_owner = total, per_owner
        self._held: dict[str, int] = {}
        self._sum = 0
        self._lock = threading.Lock()

    def take(self, owner: str | None, n: int) -> None:
        """Holds n bytes for `owner` (None: counted in all only); RESOURCE_EXHAUSTED past a bound."""
        with self._lock:
            mine = self._held.get(owner, 0) if owner is not None else 0
            if mine and mine + n > self.per_owner:
                raise errors.exhausted(
                    errors.CALL_LIMIT_REACHED, f"this key already sends {mine} bytes of requests; retry when one finishes"
                )
            if self._sum and self._sum + n > self.total:
                raise errors.exhausted(errors.RATE_LIMITED, "the server is reading its most request bodies; retry shortly")
            if owner is not None:
                self._held[owner] = mine + n
            self._sum += n

    def give(self, owner: str | None, n: int) -> None:
        with self._lock:
            if owner is not None:
                left = self._held.get(owner, 0) - n
                if left > 0:
                    self._held[owner] = left
                else:
                    self._held.pop(owner, None)
            self._sum -= n


class HeaderGate:
    """The HTTP port's ASGI app: the checks of the module doc, then `app` (WSGI) as hypercorn runs it.
    `refuse(method, content_type, path)` gives (HTTP status, headers, FaceServiceError) for a request no
    RPC takes; `cors(origin)` the CORS headers of an answer; `authenticator` is None with auth off."""

    def __init__(self, app, max_body: int, authenticator, body_bytes: BodyBytes, refuse, cors):
        self._wsgi = WSGIWrapper(app, max_body)
        self.max_body, self.auth, self.bytes = max_body, authenticator, body_bytes
        self._refuse, self._cors = refuse, cors

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        loop = asyncio.get_running_loop()

        def call_soon(func, *args):  # from the WSGI thread: run on the loop, wait for it (as hypercorn does)
            return asyncio.run_coroutine_threadsafe(func(*args), loop).result()

        spawn = partial(loop.run_in_executor, None)
        if not scope["path"].startswith(SERVICE_PREFIX) or scope["method"] == "OPTIONS":
            await self._wsgi(scope, receive, send, spawn, call_soon)  # the console's files, preflights: no body
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        cors = self._cors(headers.get("origin", ""))
        try:
            owner, size = await self._admit(scope, headers, loop)
        except _Refusal as r:
            await _answer(send, r.status, cors + r.headers, error_body(r.error))
            return
        except errors.FaceServiceError as exc:
            await _answer(send, _HTTP.get(exc.code, "400 Bad Request"), cors, error_body(exc))
            return
        try:
            await self._wsgi(scope, receive, send, spawn, call_soon)
        finally:
            self.bytes.give(owner, size)

    async def _admit(self, scope, headers: dict, loop) -> tuple[str | None, int]:
        """(owner, bytes held) for a request that may send its body; raises what answers it otherwise."""
        refused = self._refuse(scope["method"], headers.get("content-type", ""), scope["path"])
        if refused is not None:
            raise _Refusal(*refused)
        length = headers.get("content-length", "")
        size = int(length) if length.isdigit() else self.max_body  # chunked: as much as it may send
        if size > self.max_body:
            exc = errors.validation("content-length", f"a body of {size} bytes: at most {self.max_body}")
            raise _Refusal("413 Content Too Large", [], exc)
        owner = None  # auth off, or the admin key: bounded in all only
        if self.auth is not None:  # a cached lookup mostly; the database otherwise, off the loop
            principal = await loop.run_in_executor(None, self.auth.principal, headers.get(HEADER, ""))
            owner = None if principal.admin else principal.key_id
        self.bytes.take(owner, size)
        return owner, size


class _Refusal(Exception):
    def __init__(self, status: str, headers: list, error: errors.FaceServiceError):
        super().__init__(status)
        self.status, self.headers, self.error = status, headers, error


async def _answer(send, status: str, headers: list[tuple[str, str]], body: bytes) -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    raw += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": int(status.split()[0]), "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
