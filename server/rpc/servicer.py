"""FaceService as grpc registers it: every RPC routed to the handler group that serves it.

The port opens before the models are loaded (so health probes answer at
once); until `attach()` hands over the handler groups, every FaceService call
is answered here, in one place, with UNAVAILABLE / MODELS_LOADING.
"""

from __future__ import annotations

import grpc

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from server import errors
from server.rpc.status import to_status

SERVICE = pb.DESCRIPTOR.services_by_name["FaceService"]


class FaceServicer(pb_grpc.FaceServiceServicer):
    def __init__(self):
        self._routes: dict[str, object] = {}
        for method in SERVICE.methods:
            setattr(self, method.name, self._route(method))

    def attach(self, *groups) -> None:
        """Serve every RPC with the group that lists it (each once, none missing)."""
        routes = {}
        for group in groups:
            for name in group.RPCS:
                if name in routes:
                    raise ValueError(f"{name} is served by two handler groups")
                routes[name] = getattr(group, name)
        missing = [m.name for m in SERVICE.methods if m.name not in routes]
        if missing:
            raise ValueError(f"no handler for {', '.join(missing)}")
        self._routes = routes

    def _handler(self, name: str, context):
        handler = self._routes.get(name)
        if handler is None:
            context.abort_with_status(
                to_status(
                    errors.FaceServiceError(
                        grpc.StatusCode.UNAVAILABLE, errors.MODELS_LOADING, "models are still loading; retry shortly"
                    )
                )
            )
        return handler

    def _route(self, method):
        name = method.name
        if method.server_streaming:

            def call(request, context):
                yield from self._handler(name, context)(request, context)
        else:

            def call(request, context):
                return self._handler(name, context)(request, context)

        call.__name__ = name
        return call
