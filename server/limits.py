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

A caller at a limit is refused at once with RESOURCE_EXHAUSTED (never
queued), so at least half the workers stay free for other keys, health
checks and reflection, whatever one key does.
"""
from __future__ import annotations

import threading

import grpc

from server import errors
from server.auth import HEADER, SERVICE_PREFIX, current_principal, hash_key
from server.observability import ERRORS, rewrap
from server.rpc_errors import to_status


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
                raise errors.exhausted(self.reason, f"this key already holds {self.per_owner} open {self.what}",
                                       limit=self.per_owner)
            if self.total and self._count >= self.total:
                raise errors.exhausted(self.reason, f"the server already holds {self.total} open {self.what}",
                                       limit=self.total)
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


class LimitInterceptor(grpc.ServerInterceptor):
    """Takes the stream and per-key call slots of a FaceService call before its handler runs."""

    def __init__(self, streams: ConcurrencyLimiter, calls: ConcurrencyLimiter | None):
        self.streams, self.calls = streams, calls

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

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        rpc = method[len(SERVICE_PREFIX):]

        def make(inner, kind):
            streaming_request = kind.startswith("stream")

            if kind.endswith("unary"):
                def limited(request, context):
                    owner = call_owner(context)
                    taken = self._enter(rpc, owner, self._limiters(streaming_request), context)
                    try:
                        return inner(request, context)
                    finally:
                        for limiter in taken:
                            limiter.release(owner)
            else:
                def limited(request, context):
                    owner = call_owner(context)
                    taken = self._enter(rpc, owner, self._limiters(streaming_request), context)
                    try:
                        yield from inner(request, context)
                    finally:
                        for limiter in taken:
                            limiter.release(owner)
            return limited

        return rewrap(handler, make)
