"""`python -m server` / `facesvc-server`: start the gRPC server until SIGTERM or SIGINT."""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from server import config, hugepages

log = logging.getLogger("facesvc")


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
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    try:
        server.load_models()
    except Exception:
        log.exception("failed to load models")
        server.stop(0)
        return 1
    stop.wait()
    server.stop()
    logging.shutdown()
    # Every call has finished and the store, cache and snapshots are closed and synced. Leave
    # now: a native thread (gRPC core, onnxruntime) slow to wind down at interpreter exit must
    # not hold the process past the orchestrator's kill timeout (seen once under heavy load:
    # "stopped" logged, exit still pending 30 s later).
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
