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
all, and one that stays silent is cancelled like an idle FaceService stream.

A caller at a limit is refused at once with RESOURCE_EXHAUSTED (never
queued), so at least half the workers stay free for other keys, health
checks and reflection, whatever one key does.
"""

from __future__ import annotations

import threading
import time

import grpc

from server import errors
from server.rpc.auth import HEADER, SERVICE_PREFIX, current_principal, hash_key
from server.rpc.observability import around, rewrap
from server.rpc.status import to_status
from server.telemetry import ERRORS


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
                raise errors.exhausted(
                    self.reason, f"this key already holds {self.per_owner} open {self.what}", limit=self.per_owner
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


def call_owner(context) -> str:
    """Whom a call counts against: its API key (hashed), or its peer's address when it sends none."""
    secret = dict(context.invocation_metadata()).get(HEADER, "")
    if secret:
        return "key:" + hash_key(secret)
    peer = context.peer() or ""
    return "peer:" + peer.rsplit(":", 1)[0]


REFLECTION_PREFIX = "/grpc.reflection."
REFLECTION_PER_PEER, REFLECTION_TOTAL = 2, 2  # grpcurl opens one per command; 2 leaves room for the last one closing


class IdleWatchdog:
    """Cancels a call whose request stream stays silent: `first_s` for its first message, `idle_s` after.
    For handlers that read their stream themselves (reflection), where no timeout can be put inside."""

    def __init__(self, context, first_s: float, idle_s: float, clock=time.monotonic):
        self.context, self.first_s, self.idle_s, self._clock = context, first_s, idle_s, clock
        self._last, self._seen = clock(), False
        self._done = threading.Event()
        threading.Thread(target=self._watch, name="idle-watchdog", daemon=True).start()

    def wrap(self, iterator):
        for message in iterator:
            self._last, self._seen = self._clock(), True
            yield message

    def _watch(self) -> None:
        while not self._done.wait(0.5):
            limit = self.idle_s if self._seen else self.first_s
            if self._clock() - self._last > limit:
                self.context.cancel()
                return

    def stop(self) -> None:
        self._done.set()


class LimitInterceptor(grpc.ServerInterceptor):
    """Takes the stream and per-key call slots of a FaceService call before its handler runs, and
    bounds the reflection streams every caller may open."""

    def __init__(
        self, streams: ConcurrencyLimiter, calls: ConcurrencyLimiter | None, first_message_s: float = 5.0, idle_s: float = 30.0
    ):
        self.streams, self.calls = streams, calls
        self.reflection = ConcurrencyLimiter(
            REFLECTION_PER_PEER, REFLECTION_TOTAL, errors.STREAM_LIMIT_REACHED, "reflection streams"
        )
        self.first_message_s, self.idle_s = first_message_s, idle_s

    def _limiters(self, streaming_request: bool) -> list[ConcurrencyLimiter]:
        """Which limits a call counts against; the principal is known (the auth interceptor ran first)."""
        chosen = [self.streams] if streaming_request else []
        principal = current_principal.get()
        if self.calls is not None and principal is not None and not principal.admin:
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
            ERRORS.labels(rpc, exc.reason).inc()
            context.abort_with_status(to_status(exc))
        return taken

    def _reflection(self, handler, method: str):
        def make(inner, kind):
            if not kind.startswith("stream"):
                return inner

            def limited(request_iterator, context):
                owner = call_owner(context)
                self._enter(method, owner, [self.reflection], context)
                watchdog = IdleWatchdog(context, self.first_message_s, self.idle_s)
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
            owner = call_owner(context)
            return owner, self._enter(rpc, owner, self._limiters(kind.startswith("stream")), context)

        def leave(state):
            owner, taken = state
            for limiter in taken:
                limiter.release(owner)

        return around(handler, enter, leave)
