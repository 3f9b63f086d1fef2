"""A daemon thread that runs a step every so often until stopped, surviving whatever the step raises
(the audit log's writer and the retention job)."""

from __future__ import annotations

import logging
import threading


class Periodic:
    def __init__(self, name: str, interval_s: float, step, log: logging.Logger):
        self.name, self.interval_s, self.step, self.log = name, interval_s, step, log
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self.step()
            except Exception:  # noqa: BLE001 - the thread must survive anything, and say so
                self.log.exception("%s step failed; retrying", self.name)
