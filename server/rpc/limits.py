"""Per-caller concurrency limits, taken when a call opens (before its first message is read).

Every FaceService call runs on one of the server's `workers` threads for its
whole life: a stream that never sends a message holds its thread as surely
as one that streams frames. So the limits are counted in calls, not in work:

- streams (StreamFrames, ProcessBatch, RegisterBatch): at most
  `max_streams_per_key` for one API key (or, with auth off, one peer address)
  and `max_streams` in all (default half the workers);
- calls of one collection key (unary and streaming together): at most
  `max_calls_per_key` (default half the workers). The admin key is the
  operator's and is not limited; with auth off there is one tenant and no
  per-key bound.

Server reflection (open to every caller, like health) is a bidirectional
stream too: at most `REFLECTION_PER_PEER` per caller and `REFLECTION_TOTAL` in
all; one that stays silent is cancelled like an idle FaceService stream, and any
is cancelled once open for the stream idle time.

A caller at a limit is refused at once with RESOURCE_EXHAUSTED (never
queued), so at least half the workers stay free for other keys, health
checks and reflection, whatever one key does.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from concurrent import futures

import grpc

from server import errors
from server.rpc.auth import HEADER, SERVICE_PREFIX, current_principal, hash_key, normalized
from server.rpc.observability import around, rewrap
from server.rpc.status import refuse

log = logging.getLogger(__name__)


class ConcurrencyLimiter:
    """At most `per_owner` open calls for one owner and `total` in all (0: no bound)."""

    def __init__(self, per_owner: int, total: int, reason: str, what: str):
        self.per_owner, self.total, self.reason, self.what = per_owner, total, reason, what
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._count = 0

    def active(self) -> int:
        with self._lock:
            return self._count

    def acquire(self, owner: str) -> None:
        with self._lock:
            if self.per_owner and self._open.get(owner, 0) >= self.per_owner:
                who = "caller" if owner.startswith("peer:") else "key"
                raise errors.exhausted(
                    self.reason, f"this {who} already holds {self.per_owner} open {self.what}", limit=self.per_owner
                )
            if self.total and self._count >= self.total:
                raise errors.exhausted(self.reason, f"the server already holds {self.total} open {self.what}", limit=self.total)
            self._open[owner] = self._open.get(owner, 0) + 1
            self._count += 1

    def release(self, owner: str) -> None:
        with self._lock:
            self._count -= 1
            self._open[owner] -= 1
            if not self._open[owner]:
                del self._open[owner]


def call_owner(context, by_key: bool = True) -> str:
    """Whom a call counts against: its API key (hashed, as the key check reads it), or its peer's
    address when it sends none. Where no one checks the key (`by_key` False: health checks,
    reflection, every call with auth off), the peer's address whatever it sends: else a made-up key
    per call would be a caller per call."""
    secret = normalized(dict(context.invocation_metadata()).get(HEADER, "")) if by_key else ""
    if secret:
        return "key:" + hash_key(secret)
    peer = context.peer() or ""
    return "peer:" + peer.rsplit(":", 1)[0]


REFLECTION_PREFIX = "/grpc.reflection."
REFLECTION_PER_PEER, REFLECTION_TOTAL = 2, 2  # grpcurl opens one per command; 2 leaves room for the last one closing


class IdleWatchdog:
    """Cancels a call whose request stream stays silent: `first_s` for its first message, `idle_s` after;
    and, given `life_s`, one open longer than that however chatty. For handlers that read their stream
    themselves (reflection), where no timeout can be put inside."""

    def __init__(self, context, first_s: float, idle_s: float, clock=time.monotonic, life_s: float | None = None):
        self.context, self.first_s, self.idle_s, self._clock = context, first_s, idle_s, clock
        self._last, self._seen = clock(), False
        self._end = None if life_s is None else self._last + life_s
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="idle-watchdog", daemon=True).start()

    def wrap(self, iterator):
        for message in iterator:
            self._last, self._seen = self._clock(), True
            yield message

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            limit = self.idle_s if self._seen else self.first_s
            now = self._clock()
            if now - self._last > limit or (self._end is not None and now > self._end):
                self.context.cancel()
                return

    def stop(self) -> None:
        self._done.set()


class LimitInterceptor(grpc.ServerInterceptor):
    """Takes the stream and per-key call slots of a FaceService call before its handler runs, and
    bounds the reflection streams every caller may open."""

    def __init__(
        self,
        streams: ConcurrencyLimiter,
        calls: ConcurrencyLimiter | None,
        first_message_s: float = 5.0,
        idle_s: float = 30.0,
        by_key: bool = True,
    ):
        """`by_key`: whether keys are checked (auth on), so that calls count by key (call_owner)."""
        self.streams, self.calls, self.by_key = streams, calls, by_key
        self.reflection = ConcurrencyLimiter(
            REFLECTION_PER_PEER, REFLECTION_TOTAL, errors.STREAM_LIMIT_REACHED, "reflection streams"
        )
        self.first_message_s, self.idle_s = first_message_s, idle_s

    def _limiters(self, streaming_request: bool) -> list[ConcurrencyLimiter]:
        """Which limits a call counts against; the principal is known (the auth interceptor ran first)."""
        chosen = [self.streams] if streaming_request else []
        principal = current_principal.get()
        if self.calls is not None and principal is not None and not principal.admin and not call_slot_held.get():
            chosen.append(self.calls)
        return chosen

    def _enter(self, rpc: str, owner: str, limiters: list[ConcurrencyLimiter], context) -> list[ConcurrencyLimiter]:
        taken = []
        try:
            for limiter in limiters:
                limiter.acquire(owner)
                taken.append(limiter)
        except errors.FaceServiceError as exc:
            for limiter in taken:
                limiter.release(owner)
            refuse(context, rpc, exc)
        return taken

    def _reflection(self, handler, method: str):
        def make(inner, kind):
            if not kind.startswith("stream"):
                return inner

            def limited(request_iterator, context):
                owner = call_owner(context, by_key=False)
                self._enter(method, owner, [self.reflection], context)
                # a caller that asks something now and then would keep the slots for good: a stream
                # lives at most the idle time (grpcurl opens one per command, done in a moment)
                watchdog = IdleWatchdog(context, self.first_message_s, self.idle_s, life_s=self.idle_s)
                try:
                    yield from inner(watchdog.wrap(request_iterator), context)
                finally:
                    watchdog.stop()
                    self.reflection.release(owner)

            return limited

        return rewrap(handler, make)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is not None and method.startswith(REFLECTION_PREFIX):
            return self._reflection(handler, method)
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        rpc = method[len(SERVICE_PREFIX) :]

        def enter(request, context, kind):
            owner = call_owner(context, self.by_key)
            return owner, self._enter(rpc, owner, self._limiters(kind.startswith("stream")), context), context

        def leave(state):
            owner, taken, context = state

            def release():
                for limiter in taken:
                    limiter.release(owner)

            # over HTTP a worker thread sends the answer after the handler: the slots count it too
            getattr(context, "when_answered", lambda fn: fn())(release)

        limited = around(handler, enter, leave)
        return self._sends_watched(limited) if handler.response_streaming else limited

    def _sends_watched(self, handler):
        """A streaming answer waits in gRPC's send until the client has room for it (HTTP/2 flow
        control), without end: a client that sends and never reads stops its handler there, once
        about 64 KB of answers are on their way, where neither the idle limit nor the key's re-check
        runs, and holds its stream slots for as long as its connection stays open. An answer not
        taken within the stream idle time cancels the call (the slots go as its handler ends). The HTTP
        port runs these interceptors too: there the wait is the bridge's, for room in the HTTP server."""

        def make(inner, kind):
            def watched(request, context):
                answers = inner(request, context)
                try:
                    for answer in answers:
                        key = DEADLINES.add(context, self.idle_s)
                        try:
                            yield answer  # gRPC asks for the next one once this one is sent
                        finally:
                            DEADLINES.remove(key)
                finally:
                    answers.close()

            return watched

        return rewrap(handler, make)


# Set while a unary call holds its key's call slot from before its message arrived (ReceiveInterceptor),
# so LimitInterceptor does not take a second one for it.
call_slot_held: contextvars.ContextVar[bool] = contextvars.ContextVar("call_slot_held", default=False)


class ReceiveInterceptor(grpc.ServerInterceptor):
    """Bounds the wait for a unary call's request message.

    grpc reads a unary call's message on a worker thread before any handler or check of ours runs,
    and waits for it without end: eight streams that announce a 32 MB message and send 1 KB of it
    held every worker, without a key, and the server answered no one. Here every unary-request
    method is served as a client stream of one message, so the worker runs our code at once:
      - a FaceService call without a valid key is refused before any of its message is read;
      - a collection key's call takes its call slot (`calls`, max_calls_per_key) before its message
        arrives and holds it to the end, so one key's uploads and calls together keep to its share;
      - health checks, open to all, run on a few threads of their own (a caller who stalls them
        cannot take a worker from the service, nor the service's load delay the orchestrator's
        probe), with `KEYLESS_PER_PEER` messages arriving at once per caller, within `first_s`;
        other messages within `wait_s` (the stream idle time);
      - a message that has not arrived in time cancels its call.
    Handlers that are not grpc's own (the HTTP port's bridge) pass through; the HTTP gate bounds those.
    """

    KEYLESS_PER_PEER, HEALTH_THREADS = 4, 8

    def __init__(self, authenticator, calls: ConcurrencyLimiter | None, wait_s: float, first_s: float):
        self.auth, self.calls, self.wait_s, self.first_s = authenticator, calls, wait_s, first_s
        self.keyless = ConcurrencyLimiter(self.KEYLESS_PER_PEER, 0, errors.RATE_LIMITED, "health-check messages arriving")
        self.health_threads = futures.ThreadPoolExecutor(self.HEALTH_THREADS, thread_name_prefix="health")

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        ours = method.startswith(SERVICE_PREFIX)
        unary = handler.unary_unary or handler.unary_stream
        factory = grpc.stream_unary_rpc_method_handler if handler.unary_unary else grpc.stream_stream_rpc_method_handler
        non_blocking = getattr(unary, "experimental_non_blocking", False)  # grpc's health Watch

        def behaviour(requests, context, *callback):  # grpc passes a non-blocking handler its send callback
            owner, slot = call_owner(context, by_key=ours and self.auth is not None), None
            try:
                if not ours:
                    slot = self.keyless
                elif self.auth is not None:
                    principal = self.auth.principal(dict(context.invocation_metadata()).get(HEADER, ""))
                    slot = None if principal.admin else self.calls
                if slot is not None:
                    slot.acquire(owner)
            except errors.FaceServiceError as exc:
                refuse(context, method.rsplit("/", 1)[-1], exc)
            held = None
            try:
                request = _one_message(requests, context, self.wait_s if ours else self.first_s, method)
                if slot is self.keyless:  # a health check holds its slot while its message arrives only
                    self.keyless.release(owner)
                    slot = None
                held = call_slot_held.set(slot is not None)
                return unary(request, context, *callback)
            finally:
                if held is not None:
                    call_slot_held.reset(held)
                if slot is not None:
                    slot.release(owner)

        if non_blocking:  # answers through a callback and frees its thread: keep it so
            behaviour.experimental_non_blocking = True
        pool = getattr(unary, "experimental_thread_pool", None) or (None if ours else self.health_threads)
        if pool is not None:
            behaviour.experimental_thread_pool = pool
        return factory(
            behaviour, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


class _Deadlines:
    """Cancels the calls that wait too long, one thread for all of them (a thread per call would cost
    every unary call a thread start): a unary call whose request message has not arrived by its
    deadline (_one_message), and a streaming call whose answer has not been sent by its own
    (LimitInterceptor._sends_watched). Entries are keyed by the call's context: a call waits for one
    of the two at a time, never both."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[float, object]] = {}
        self._thread: threading.Thread | None = None

    def add(self, context, seconds: float) -> int:
        key = id(context)
        with self._lock:
            self._waiting[key] = (time.monotonic() + seconds, context)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="call-deadlines", daemon=True)
                self._thread.start()
        return key

    def remove(self, key: int) -> None:
        with self._lock:
            self._waiting.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            # under the lock: a call whose message came (remove() returned) is never cancelled
            with self._lock:
                for key, (deadline, context) in list(self._waiting.items()):
                    if deadline <= now:
                        del self._waiting[key]
                        try:
                            context.cancel()
                        except Exception:  # noqa: BLE001 - the thread must outlive any one call
                            log.exception("cancelling a call past its deadline")


DEADLINES = _Deadlines()


def _one_message(requests, context, wait_s: float, method: str):
    """A unary call's message, within `wait_s`. A call whose client half-closes without one is refused
    as invalid (as the HTTP port refuses it); one whose message does not arrive in time is cancelled
    (the client gets CANCELLED: a cancelled call carries no details)."""
    key = DEADLINES.add(context, wait_s)
    try:
        for message in requests:
            return message
    except Exception:  # noqa: BLE001 - the call was cancelled (at its deadline, or by the client)
        context.abort(grpc.StatusCode.CANCELLED, "the request message did not arrive")
    finally:
        DEADLINES.remove(key)
    refuse(
        context, method.rsplit("/", 1)[-1], errors.validation("request", "the stream ended without the call's request message")
    )
