"""Request messages that do not parse get VALIDATION_FAILED, not grpc's INTERNAL.

grpc's server parses each request message before any interceptor or handler sees it. When the bytes
are not the RPC's message (truncated, a field of the wrong wire type, a string that is not UTF-8),
it answers INTERNAL "Exception deserializing request!" without an ErrorInfo, and logs a traceback
for every such message: anyone who can reach the port, with or without a key, could fill the log.
Here the parser returns a Malformed marker instead, and the interceptor (after the key check, so a
caller without a key is told that first) refuses the call with VALIDATION_FAILED; a stream ends
with that status at its first such message.
"""

from __future__ import annotations

import grpc

from server import errors
from server.rpc.observability import rewrap, rpc_name
from server.rpc.status import refuse


class Malformed:
    """What a request message that does not parse becomes (a handler never sees one)."""

    __slots__ = ("error",)

    def __init__(self, error: str):
        self.error = error


def _parser(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bytes
            return Malformed((str(exc).splitlines() or [type(exc).__name__])[0][:200])

    return parse


def _refuse(rpc: str, bad: Malformed, context) -> None:
    refuse(context, rpc, errors.validation("request", f"the message does not parse as a {rpc} request: {bad.error}"))


class MessageInterceptor(grpc.ServerInterceptor):
    """Parses the requests of the service at `prefix` without letting a parse failure reach grpc (see
    the module doc)."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        rpc = rpc_name(handler, handler_call_details.method, self.prefix)
        if rpc is None or handler.request_deserializer is None:
            return handler

        def make(inner, kind):
            if kind.startswith("unary"):

                def checked(request, context):
                    if isinstance(request, Malformed):
                        _refuse(rpc, request, context)
                    return inner(request, context)

            else:

                def checked(requests, context):
                    def parsed():
                        for request in requests:
                            if isinstance(request, Malformed):
                                # whichever thread reads the stream: the call ends with this status
                                _refuse(rpc, request, context)
                            yield request

                    return inner(parsed(), context)

            return checked

        return rewrap(handler, make, _parser(handler.request_deserializer))
