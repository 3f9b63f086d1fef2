"""`python -m server.healthcheck`: exit 0 when the server on this machine reports SERVING.

The container image's HEALTHCHECK. It reads the same settings as the server (FACESVC_PORT,
FACESVC_HOST), so it follows a port changed at `docker run -e FACESVC_PORT=...` instead of a
number written into the image. Plaintext only: with FACESVC_TLS_CERT set, override the
HEALTHCHECK (e.g. grpc_health_probe with -tls flags).
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server import config


def main(argv: list[str] | None = None) -> int:
    settings = config.load(argv if argv is not None else sys.argv[1:])
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    target = f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError as exc:
            print(f"{target}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{target}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
