"""The HTTP port's gate: what it decides from a request's headers before it reads the body, and how it reads it.

A WSGI app sees a request only once its whole body has been read into memory, and the key check,
the limits and the content-type check all ran after that. Anyone who could open connections could
make the server buffer a message's worth (32 MB) per connection without a key. This ASGI layer in
front of the WSGI app answers from the headers: a method or content type no RPC takes, a body
larger than a message or on a path that takes none, a missing or unknown key. It then reads the
body itself, counting the bytes as they arrive against bounds in all and per key (refusing at once,
never queueing, past either) and cutting off a body that stalls; what passes is run as hypercorn
runs a WSGI app. Refusals take the form the request's protocol reads errors in.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import threading
import time
from functools import partial
from urllib.parse import quote

import grpc
from google.rpc import error_details_pb2
from hypercorn.app_wrappers import WSGIWrapper, _build_environ

from server import errors
from server.context import current_call
from server.rpc.auth import HEADER, SERVICE_PREFIX
from server.rpc.status import to_status
from server.web.calls import ANSWERED, STATUS_DETAILS_KEY, connect_code

# Connect's HTTP statuses for the codes answered here (https://connectrpc.com/docs/protocol/#error-codes)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: "400 Bad Request",
    grpc.StatusCode.DEADLINE_EXCEEDED: "408 Request Timeout",
    grpc.StatusCode.UNAUTHENTICATED: "401 Unauthorized",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "429 Too Many Requests",
    grpc.StatusCode.UNAVAILABLE: "503 Service Unavailable",
    grpc.StatusCode.INTERNAL: "500 Internal Server Error",
}
ERROR_INFO = error_details_pb2.ErrorInfo.DESCRIPTOR.full_name

# The connection a request came on (app.py's _Connection: `unsent(stream)`, the bytes of an answer
# still in its buffers, and `end(why)`), set by the server for each connection; hypercorn's tasks for
# the connection inherit it. hypercorn has no send timeout, and the ASGI interface no way to drop a connection.
CONNECTION: contextvars.ContextVar = contextvars.ContextVar("facesvc_http_connection", default=None)
# A send that waits longer than idle_s must see at least this many bytes a second of its answer leave
# meanwhile, or the connection is ended: a slow but steady reader gets its answer however
# long it takes, one that takes nothing (or a trickle) does not hold a thread and the answer's
# memory for good.
MIN_SEND_RATE = 4096
CHECK_S = 1.0  # how often a send that waits looks at the connection's progress


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
    code = connect_code(exc.code).value
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
    RPC takes; `cors(origin)` the CORS headers of an answer; `authenticator` is None with auth off;
    `idle_s` is the longest wait for the next part of a body, and (with MIN_SEND_RATE) for a client to
    take its answer; `answer_bytes` bounds the bytes of answers handed to the connections and not yet
    taken by their clients."""

    def __init__(
        self,
        app,
        max_body: int,
        authenticator,
        body_bytes: BodyBytes,
        refuse,
        cors,
        idle_s: float = 30.0,
        answer_bytes: AnswerBytes | None = None,
    ):
        self._wsgi = WSGIWrapper(app, max_body)
        self.max_body, self.auth, self.bytes, self.idle_s = max_body, authenticator, body_bytes, idle_s
        self.answers = answer_bytes if answer_bytes is not None else AnswerBytes(8 * max_body)
        self._sending: set[_Answer] = set()  # answers waiting for their clients now (ending)
        self._refuse, self._cors = refuse, cors

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        gone, watcher = asyncio.Event(), []

        def watch() -> None:
            """From here on the request's events are the watcher's (its body is read, or will not be):
            it tells the sends when the client has gone."""
            if not watcher:
                watcher.append(asyncio.ensure_future(_until_gone(receive, gone)))

        answering = _Answer(send, gone, CONNECTION.get(), self.idle_s, self.answers, self._sending)
        try:
            await self._http(scope, receive, answering.send, watch)
        except _Gone:
            pass  # the client went away: nothing to answer, and nothing left waiting for it
        finally:
            answering.done()
            for task in watcher:
                task.cancel()

    def ending(self, every: bool = False) -> None:
        """On the loop, as the server stops: the connections of answers waiting for clients that have
        taken nothing of them since their last send began are ended (`every`: of all answers still
        waiting, as the grace ends). Waiting for them held the stop for its whole grace, whose end then
        cancelled them inside hypercorn (a traceback in the log)."""
        for answer in list(self._sending):
            if every or answer.stalled():
                answer.end("the server is stopping and its client had not taken its answer")

    async def _http(self, scope, receive, send, watch) -> None:
        loop = asyncio.get_running_loop()

        def call_soon(func, *args):  # from the WSGI thread: run on the loop, wait for it (as hypercorn does)
            return asyncio.run_coroutine_threadsafe(func(*args), loop).result()

        def spawn(fn, *args):  # a worker thread, in the request's context (ANSWERED)
            return loop.run_in_executor(None, contextvars.copy_context().run, fn, *args)

        headers: dict[str, str] = {}
        for k, v in scope["headers"]:  # a header sent twice counts as its values joined (RFC 9110 5.3): two keys are no key
            name = k.decode("latin-1").lower()
            headers[name] = f"{headers[name]}, {v.decode('latin-1')}" if name in headers else v.decode("latin-1")
        cors = self._cors(headers.get("origin", ""))
        if not scope["path"].startswith(SERVICE_PREFIX) or scope["method"] == "OPTIONS":
            if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
                refusal = errors.validation("body", "only FaceService calls take a body")
                watch()
                await _reply(send, "", "413 Content Too Large", cors, refusal)
                return
            end = loop.time() + self.idle_s
            try:  # the request's (empty) body, read here: over HTTP/2 a stream can leave it unended for good
                first = await asyncio.wait_for(receive(), self.idle_s)
                while first["type"] == "http.request" and not first.get("body") and first.get("more_body"):
                    first = await asyncio.wait_for(receive(), max(0.0, end - loop.time()))  # an empty DATA frame
            except TimeoutError:
                watch()
                await _reply(send, "", "408 Request Timeout", cors, _idle(self.idle_s, "the end of the request"))
                return
            if first["type"] == "http.disconnect":
                return
            if first.get("body"):  # over HTTP/2 a body needs no header to announce it
                if first.get("more_body") and await _drain(receive):  # read first: answered, its stream is gone
                    return
                watch()
                refusal = errors.validation("body", "only FaceService calls take a body")
                await _reply(send, "", "413 Content Too Large", cors, refusal)
                return
            watch()
            # on the loop, no worker thread: a file or a preflight is quick to make, and a client that
            # does not take it holds no thread while the send waits (a worker's send holds its thread)
            messages = []
            self._wsgi.run_app(_build_environ(scope, b""), messages.append)
            while messages:  # each given up once sent: hypercorn holds its own copy until it is taken
                await send(messages.pop(0))
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        owner, held, refusal = None, [0], None
        deadlines = _deadlines(headers)  # from the request's arrival: the key lookup and the body's upload count
        deadline = min(deadlines.values(), default=None)
        try:
            refused = self._refuse(scope["method"], kind, scope["path"])
            if refused is not None:  # not the method's content type: answered in plain HTTP
                watch()
                await _reply(send, "", refused[0], cors + refused[1], refused[2])
                return
            try:
                owner = await self._owner(headers, loop, deadline)
                parts = [await self._read(receive, owner, held)]
            except _Refusal as r:
                refusal = (kind, r.status, cors, r.error)
            except errors.FaceServiceError as exc:
                refusal = (kind, _HTTP.get(exc.code, "400 Bad Request"), cors, exc)
            except _Gone:
                return
            if refusal is None:
                # the body once, as read (handed over, not kept here); then the connection's own events
                watch()
                if deadlines:  # the handler's deadline is what is left of the request's
                    scope = {**scope, "headers": _time_left_headers(scope["headers"], deadlines)}
                answered = []
                ANSWERED.set(answered)
                try:
                    await self._wsgi(scope, partial(_replay, parts, receive), send, spawn, call_soon)
                finally:  # sent, all of it, or given up
                    for fn in answered:
                        fn()
        finally:
            self.bytes.give(owner, held[0])
        if refusal is not None:  # after the bytes are given back: the caller may retry at once
            if await _drain(receive):
                return
            watch()
            await _reply(send, *refusal)

    async def _owner(self, headers: dict, loop, deadline: float | None = None) -> str | None:
        """Whose bodies a request's counts against: its collection key (None: the admin key, or auth
        off, bounded in all only); UNAUTHENTICATED without a valid key. A lookup in the database
        waits no longer than the request's deadline, as the call's own statements do."""
        length = headers.get("content-length", "")
        if length.isascii() and length.isdigit() and int(length) > self.max_body:
            raise _Refusal(
                "413 Content Too Large", errors.validation("content-length", f"a body of {length} bytes: at most {self.max_body}")
            )
        if self.auth is None:
            return None
        # a cached lookup mostly; the database otherwise, off the loop
        principal = await loop.run_in_executor(None, partial(_until, deadline, self.auth.principal, headers.get(HEADER, "")))
        return None if principal.admin else principal.key_id

    async def _read(self, receive, owner: str | None, held: list[int]) -> bytearray:
        """The body, counted against the bounds as its bytes arrive (held[0]: what is counted), each
        part within `idle_s` of the last: a body only announced holds nothing, a stalled one is cut off."""
        body = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.idle_s)
            except TimeoutError:
                raise _Refusal("408 Request Timeout", _idle(self.idle_s, "part of the body")) from None
            if message["type"] == "http.disconnect":
                raise _Gone
            chunk = message.get("body", b"")
            if chunk:
                if len(body) + len(chunk) > self.max_body:
                    raise _Refusal("413 Content Too Large", errors.validation("body", f"more than {self.max_body} bytes"))
                self.bytes.take(owner, len(chunk))
                held[0] += len(chunk)
                body += chunk
            if not message.get("more_body"):
                return body


def _idle(idle_s: float, what: str) -> errors.FaceServiceError:
    return errors.FaceServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED, errors.STREAM_IDLE, f"no {what} for {idle_s:g} s", idle_seconds=f"{idle_s:g}"
    )


DRAIN_BYTES, DRAIN_S = 1 << 20, 2.0


async def _drain(receive) -> bool:
    """Reads and drops what a refused request still sends, up to DRAIN_BYTES within DRAIN_S, before
    the refusal goes out. A connection closed with a body still arriving is reset, and the reset can
    take the refusal with it: a client still sending a photo without a key saw "connection closed"
    instead of UNAUTHENTICATED. Nothing is held, and a body larger than the bound is cut off as
    before. Returns whether the client has gone (then there is no one to answer)."""
    loop, taken = asyncio.get_running_loop(), 0
    end = loop.time() + DRAIN_S
    while taken <= DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(0.0, end - loop.time()))
        except TimeoutError:
            return False
        if message["type"] == "http.disconnect":
            return True
        if not message.get("more_body"):
            return False
        taken += len(message.get("body", b""))
    return False


async def _until_gone(receive, gone: asyncio.Event) -> None:
    """Sets `gone` when the client goes: the request's events after its body are its disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass
    gone.set()


class AnswerBytes:
    """Bytes of answers handed to the connections and not yet taken by their clients, in all. Each
    answer is counted whole as it is handed over; past `total` the count is made again from what
    each answer still has in the server, and if that is past it too, the connection holding the most
    is ended and its answers go with it (the connection about to send is rarely the one that holds
    them, and a long stream read as it comes holds almost nothing)."""

    def __init__(self, total: int):
        self.total, self._sum, self._next_count = total, 0, 0
        self._held: dict[_Answer, int] = {}

    def take(self, answer: "_Answer", n: int) -> None:
        self._held[answer] = self._held.get(answer, 0) + n
        self._sum += n
        if self._sum <= max(self.total, self._next_count):
            return
        self._sum = 0
        for a in self._held:
            self._held[a] = a.unsent()
            self._sum += self._held[a]
        # not again until a sixteenth of the bound more has been handed over: a count per send, near
        # the bound, went over every answer in the server each time
        self._next_count = self._sum + self.total // 16
        if self._sum <= self.total:
            return
        by_connection: dict[object, int] = {}
        for a, held in self._held.items():
            if a.connection is not None and not a.connection.ended:  # one ended holds its answers until they unwind
                by_connection[a.connection] = by_connection.get(a.connection, 0) + held
        if by_connection:
            hog = max(by_connection, key=by_connection.__getitem__)
            hog.end(f"the server holds its most answers not yet taken, {by_connection[hog]} bytes of them for this connection")

    def give(self, answer: "_Answer") -> None:
        self._sum -= self._held.pop(answer, 0)


class _Answer:
    """A request's `send`, given up when the client has gone or takes too little of its answer.

    hypercorn waits for an HTTP/2 stream's flow-control room without end, also once its connection
    has closed, and for an HTTP/1.1 client to read without end: an answer a client gave no room stayed
    in the server, and a worker thread sending it waited with it, so that a few streams that never
    opened their window (no key needed: the console's files) held every HTTP worker and any amount of
    memory. A send that waits longer than idle_s, while less than MIN_SEND_RATE bytes a second left
    the server, ends the connection (`connection`, CONNECTION). What counts is what the connection
    takes, all its answers together (they share its link and its HTTP/2 window), unless the client
    holds this HTTP/2 stream back itself (its own window shut): then this answer's own bytes count,
    against its share of the rate, so that one stream read steadily does not keep the others. The
    answer's bytes count against `answers` until the request is over."""

    def __init__(self, send, gone: asyncio.Event, connection, idle_s: float, answers: AnswerBytes, waiting: set):
        self._send, self._gone, self._connection, self._idle_s, self._answers = send, gone, connection, idle_s, answers
        self._waiting = waiting  # the gate's set of answers waiting now
        self._began: tuple[float, int, int] | None = None
        self._stream = getattr(getattr(send, "__self__", None), "stream_id", None)  # hypercorn's HTTPStream.app_send
        self._bytes = self._unhanded = 0

    @property
    def connection(self):
        return self._connection

    def unsent(self) -> int:
        """Bytes of this answer still in the server: in its connection's buffers, or in a send that has
        not begun (whose first step puts them there)."""
        return self._bytes if self._connection is None else self._unhanded + self._connection.unsent(self._stream)

    def _taken(self) -> int:
        """Bytes of this answer that have left the server."""
        return self._bytes - self.unsent()

    async def _hand(self, message) -> None:
        self._unhanded = 0  # hypercorn's send puts them in its buffers before it first waits
        await self._send(message)

    async def send(self, message) -> None:
        if self._gone.is_set():
            raise _Gone
        body = message.get("body", b"") if message["type"] == "http.response.body" else b""
        if body:
            self._bytes += len(body)
            self._unhanded = len(body)
            self._answers.take(self, len(body))
            if self._connection is not None and self._connection.ended:  # this connection held the most
                self._gone.set()
                raise _Gone
        # when this send began, and how much of the answer had left then: the time a stream's handler
        # spends making its next answer is not the client's
        conn = self._connection
        began = self._began = None if conn is None else (time.monotonic(), self._taken(), conn.taken())
        sending = asyncio.ensure_future(self._hand(message))
        leaving = asyncio.ensure_future(self._gone.wait())
        try:
            while not sending.done() and not self._gone.is_set():
                await asyncio.wait((sending, leaving), timeout=CHECK_S, return_when=asyncio.FIRST_COMPLETED)
                if sending.done() or began is None:
                    continue
                if self not in self._waiting:
                    self._waiting.add(self)
                    self._connection.waiting += 1
                since = time.monotonic() - began[0]
                if since < self._idle_s:
                    continue
                if conn.shut(self._stream):  # the client holds this answer back: its own share counts
                    moved, need = self._taken() - began[1], MIN_SEND_RATE / conn.waiting * since
                else:  # the connection or the link holds it, and every answer on it: what it takes counts
                    moved, need = conn.taken() - began[2], MIN_SEND_RATE * since
                if moved < need:
                    self.end(f"a client took {moved} bytes of its answers in {since:.0f} s")
        finally:
            if self in self._waiting:
                self._waiting.discard(self)
                self._connection.waiting -= 1
            leaving.cancel()
            if not sending.done():  # given up (or this task cancelled): hypercorn's send must not wait on alone
                sending.cancel()
        if not sending.done():
            raise _Gone
        sending.result()

    def stalled(self) -> bool:
        return self._began is not None and self._taken() == self._began[1] and self._connection.taken() == self._began[2]

    def end(self, why: str) -> None:
        self._connection.end(why)
        self._gone.set()

    def done(self) -> None:
        """The request is over: its answer's bytes are no longer held."""
        self._answers.give(self)
        self._bytes = 0


async def _replay(parts: list, receive):
    if parts:
        return {"type": "http.request", "body": parts.pop(), "more_body": False}
    return await receive()


_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def _deadlines(headers: dict) -> dict[str, float]:
    """{timeout header: the monotonic time it ends at, counted from now, the request's arrival}, of
    connect-timeout-ms (Connect) and grpc-timeout (gRPC-Web); one that does not parse is left to the
    protocol layer to refuse."""
    out = {}
    now = time.monotonic()
    ms = headers.get("connect-timeout-ms", "")
    if ms.isascii() and ms.isdigit() and len(ms) <= 10:
        out["connect-timeout-ms"] = now + int(ms) / 1000
    grpc_timeout = headers.get("grpc-timeout", "")
    digits, unit = grpc_timeout[:-1], grpc_timeout[-1:]
    if digits.isascii() and digits.isdigit() and len(digits) <= 8 and unit in _GRPC_UNITS:
        out["grpc-timeout"] = now + int(digits) * _GRPC_UNITS[unit]
    return out


def _grpc_timeout(seconds: float) -> str:
    """A grpc-timeout value for `seconds` (at most 8 digits: the smallest unit they fit in)."""
    for unit in ("m", "S", "M", "H"):
        n = max(1, int(seconds / _GRPC_UNITS[unit]))
        if n < 10**8:
            return f"{n}{unit}"
    return "99999999H"


def _time_left_headers(raw: list, deadlines: dict[str, float]) -> list:
    """The request's headers with each timeout set to what is left of it now."""
    now, out = time.monotonic(), []
    for k, v in raw:
        name = k.decode("latin-1").lower()
        if name == "connect-timeout-ms" and name in deadlines:
            v = str(max(1, int((deadlines[name] - now) * 1000))).encode()
        elif name == "grpc-timeout" and name in deadlines:
            v = _grpc_timeout(max(0.001, deadlines[name] - now)).encode()
        out.append((k, v))
    return out


class _Until:
    """A call context as far as the store reads one (server.context.current_call): a deadline."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def time_remaining(self) -> float:
        return self.deadline - time.monotonic()

    def is_active(self) -> bool:
        return self.time_remaining() > 0


def _until(deadline: float | None, fn, *args):
    """fn(*args) on an executor thread, its database waits bounded by `deadline` (None: unbounded)."""
    if deadline is None:
        return fn(*args)
    token = current_call.set(_Until(deadline))
    try:
        return fn(*args)
    finally:
        current_call.reset(token)


class _Refusal(Exception):
    def __init__(self, status: str, error: errors.FaceServiceError):
        super().__init__(status)
        self.status, self.error = status, error


class _Gone(Exception):
    """The client went away (before its body was read, or while its answer waited to be sent)."""


_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def web_status(exc: errors.FaceServiceError) -> list[tuple[str, str]]:
    """`exc` as gRPC-Web's status headers (or trailers): code, message and the rich status the gRPC port sends."""
    rich = dict(to_status(exc).trailing_metadata)[STATUS_DETAILS_KEY]
    return [
        ("grpc-status", str(exc.code.value[0])),
        ("grpc-message", quote(exc.message, safe=_MESSAGE_SAFE)),
        (STATUS_DETAILS_KEY, base64.b64encode(rich).decode().rstrip("=")),
    ]


async def _reply(send, kind: str, status: str, headers: list[tuple[str, str]], exc: errors.FaceServiceError) -> None:
    """`exc` as the request's protocol carries an error: gRPC-Web in trailers-only headers and Connect
    streaming in an end-of-stream message, both on HTTP 200 (their clients read the code there, not
    in the HTTP status); Connect unary, and requests of no protocol (`kind` ""), as the HTTP status
    and a JSON body."""
    if kind.startswith("application/grpc-web"):
        headers = headers + [("content-type", kind)] + web_status(exc)
        status, body = "200 OK", b""
    elif kind.startswith("application/connect+"):
        end = json.dumps({"error": json.loads(error_body(exc))}).encode()
        headers = headers + [("content-type", kind)]
        status, body = "200 OK", bytes([2]) + len(end).to_bytes(4, "big") + end
    else:
        headers = headers + [("content-type", "application/json")]
        body = error_body(exc)
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    raw.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": int(status.split()[0]), "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})
