"""The call context: which gRPC call this thread works for, and whether it is still alive.

Set by the RPC layer (server/rpc/observability.py) around every FaceService call and read
by the layers below without importing gRPC glue: model runs and commits check
`ensure_call_alive()` so no work goes on for a call whose caller has gone.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading

import grpc

from server import errors

REQUEST_ID_HEADER = "x-request-id"
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
current_call: contextvars.ContextVar[object] = contextvars.ContextVar("current_call", default=None)
# The CPU budget of the call this thread works for (a vision.imaging.PixelBudget; None: unbounded),
# set by the handler that made it, so the passes the vision layer adds on its own are paid from it too.
work_budget: contextvars.ContextVar[object] = contextvars.ContextVar("work_budget", default=None)
# How the unary call this thread serves failed ("<status code> <reason>"), set where errors become
# statuses (server/rpc/status.py) for the audit log to read as the call ends; None: it succeeded.
call_outcome: contextvars.ContextVar[str | None] = contextvars.ContextVar("call_outcome", default=None)


def spend(passes: int, pixels: int = 0) -> bool:
    """Charge optional work (detector passes, pixels resized) to the call's budget; False when it
    cannot pay (then skip the work)."""
    budget = work_budget.get()
    return True if budget is None else budget.try_charge(pixels, passes)


def ensure_call_alive() -> None:
    """Raise CALL_ENDED if the gRPC call this thread works for has ended (deadline passed, client
    cancelled or gone): checked before every model inference and before a commit, so no work
    goes on for a dead call and nothing is written that its caller was told failed."""
    ctx = current_call.get()
    if ctx is None or ctx.is_active():
        return
    raise call_ended(ctx)


def call_ended(ctx) -> errors.FaceServiceError:
    """What an ended call (`ctx`, a servicer context no longer active) ends with: its deadline, or a cancel."""
    remaining = ctx.time_remaining()
    code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    return errors.FaceServiceError(code, errors.CALL_ENDED, "the call ended (deadline or cancel); its work was stopped")


class InFlight:
    """How many FaceService calls are being served right now (streams for their whole life)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


IN_FLIGHT = InFlight()


@contextlib.contextmanager
def serving():
    """Marks one request's work for code that runs the pipeline in process, without the gRPC
    server (whose interceptor counts its calls): model runs then know when they have the CPU alone."""
    IN_FLIGHT.add(1)
    try:
        yield
    finally:
        IN_FLIGHT.add(-1)
