"""Micro-batching: concurrent requests' rows go through one model call.

Natural batching, with no timer: a caller that finds the model idle runs at once
with its own rows plus whatever is queued (up to `max_batch` rows). Callers that
arrive while a batch runs queue up; when the batch ends, the oldest of them is
woken to lead the next batch with everything queued by then. An idle server
therefore adds no latency, and a busy one makes fewer, larger model calls.

Each request's call liveness is checked before its rows join a batch (a dead call's
rows are dropped, its caller gets CALL_ENDED), and the batch itself runs outside
any one caller's call, so one caller's deadline never fails the others.
"""

from __future__ import annotations

import contextvars
import threading
from collections import deque
from typing import Callable

import numpy as np

from server.context import current_call, ensure_call_alive


class _Job:
    __slots__ = ("rows", "ctx", "done", "lead", "result", "error")

    def __init__(self, rows: np.ndarray, ctx):
        self.rows, self.ctx = rows, ctx
        self.done = threading.Event()
        self.lead = False
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None


class MicroBatcher:
    """Wraps `fn(rows) -> outputs` (first axis = rows) so that concurrent calls share one `fn` call."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch: int):
        self._fn = fn
        self._max = max(1, max_batch)
        self._lock = threading.Lock()
        self._queue: deque[_Job] = deque()
        self._busy = False
        self.calls = 0  # model calls made (for tests and the benchmark)
        self.rows = 0  # rows through them

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        if len(rows) >= self._max:  # already a full batch: nothing to gain from waiting for company
            return self._run(rows)
        job = _Job(rows, current_call.get())
        with self._lock:
            self._queue.append(job)
            lead = not self._busy
            self._busy = True
        if not lead:
            job.done.wait()
            if not job.lead:
                return self._answer(job)
        self._lead()
        return self._answer(job)

    @staticmethod
    def _answer(job: _Job) -> np.ndarray:
        if job.error is not None:
            raise job.error
        return job.result

    def _lead(self) -> None:
        """Run one batch from the queue's head, then hand the lead to the next waiter (or go idle)."""
        with self._lock:
            batch, n = [], 0
            while self._queue and (not batch or n + len(self._queue[0].rows) <= self._max):
                job = self._queue.popleft()
                batch.append(job)
                n += len(job.rows)
        live = []
        for job in batch:
            try:
                contextvars.Context().run(_check_alive, job.ctx)
                live.append(job)
            except BaseException as exc:  # noqa: BLE001 - handed to its caller
                job.error = exc
        if live:
            try:
                out = contextvars.Context().run(self._run, np.concatenate([j.rows for j in live]))
                at = 0
                for job in live:
                    job.result = out[at : at + len(job.rows)]
                    at += len(job.rows)
            except BaseException as exc:  # noqa: BLE001 - every member of the batch gets the error
                for job in live:
                    job.error = exc
        with self._lock:
            if self._queue:
                nxt = self._queue[0]
                nxt.lead = True
                nxt.done.set()
            else:
                self._busy = False
        for job in batch:
            job.done.set()

    def _run(self, rows: np.ndarray) -> np.ndarray:
        out = self._fn(rows)
        with self._lock:
            self.calls += 1
            self.rows += len(rows)
        return out


def _check_alive(ctx) -> None:
    current_call.set(ctx)
    ensure_call_alive()
