"""`python -m server` / `facesvc-server`: start the gRPC server until SIGTERM or SIGINT."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time

from server import config, hugepages

log = logging.getLogger("facesvc")
SHUTDOWN_ALLOWANCE_S = 15.0  # after the grace period: the index threads, the last snapshots, closing the store


def main(argv: list[str] | None = None) -> int:
    settings = config.load(argv)
    if argv is None:  # a program of its own (not main() called with arguments from Python)
        hugepages.ensure(settings.huge_pages)  # before anything large is allocated; returns where it changes nothing
    # the heavy imports (onnxruntime, grpc, OpenCV) after the re-exec: they are paid once
    from server import errors
    from server.app import FaceServer
    from server.telemetry import configure_logging

    configure_logging(settings.log_level, settings.log_format, sys.stderr)
    log.info("facesvc starting with settings:\n%s", config.describe(settings))
    log.info("huge pages: %s", hugepages.status())
    try:
        server = FaceServer(settings)
    except (RuntimeError, ValueError, OSError, errors.FaceServiceError) as exc:  # bad config, database/Redis unreachable
        log.error("cannot start: %s", exc)
        return 2
    received: list[int] = []

    def on_signal(signum, _frame):
        # Only a list append here: a signal handler runs between two bytecodes of the main thread,
        # which may hold a lock (a logging handler's, an Event's) that taking again would deadlock.
        if received:
            os._exit(1)  # a second signal: the operator wants out now
        received.append(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # `kill -USR1 <pid>`: every thread's stack to the log, the process goes on. faulthandler writes
    # from the signal handler in C, so this answers even when no Python thread can run.
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    server.start()
    try:
        server.load_models()
    except Exception:
        log.exception("failed to load models")
        server.stop(0)
        return 1
    while not received:
        time.sleep(0.2)
    log.info("received %s", signal.Signals(received[0]).name)
    # The shutdown is bounded: in-flight calls get the grace period, the rest a fixed allowance. Past
    # that, every thread's stack goes to the log and the process leaves, rather than being killed
    # by the orchestrator with nothing said.
    watchdog = threading.Timer(settings.grace_seconds + SHUTDOWN_ALLOWANCE_S, _stuck_shutdown)
    watchdog.daemon = True
    watchdog.start()
    try:
        server.stop()
    except Exception:  # noqa: BLE001 - whatever failed, the process must still leave
        log.exception("error during shutdown")
    logging.shutdown()
    # Every call has finished and the store, cache and snapshots are closed and synced. Leave
    # now: a native thread (gRPC core, onnxruntime) slow to wind down at interpreter exit must
    # not hold the process past the orchestrator's kill timeout.
    os._exit(0)


def _stuck_shutdown() -> None:
    log.error("shutdown did not finish in time; the threads were:")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
