"""`python -m server` / `facesvc-server`: start the gRPC server until SIGTERM or SIGINT."""
from __future__ import annotations

import logging
import signal
import sys
import threading

from server import config, errors
from server.app import FaceServer

log = logging.getLogger("facesvc")


def main(argv: list[str] | None = None) -> int:
    settings = config.load(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.info("facesvc starting with settings:\n%s", config.describe(settings))
    try:
        server = FaceServer(settings)
    except (RuntimeError, ValueError, errors.FaceServiceError) as exc:  # bad config, database/Redis unreachable
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
