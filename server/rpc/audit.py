"""Recording audited calls in the audit log (server/domain/audit.py), as the innermost interceptor.

A unary call of an AUDITED RPC that reached its handler is recorded as it ends: the key (a
collection key's id, "admin", or "" with auth off), the RPC, the collection, subject and face its
request named, and its outcome. The items of RegisterBatch and ProcessBatch are recorded one by one
by the batch handler (`record_item`), as Register and Process. An identifying StreamFrames is
recorded by its handler (`record_identified`): as it opens, and each time one of its tracks is
identified as a subject (a track's first identity, or a different one).
"""

from __future__ import annotations

import contextlib

import grpc

from server.context import call_outcome
from server.rpc.auth import SERVICE_PREFIX, current_principal
from server.rpc.observability import around, rpc_name

# Enrolment, identification, reads of personal data, deletions, key and collection changes.
AUDITED = frozenset(
    {
        "Process",
        "Register",
        "Verify",
        "Search",
        "SearchByEmbedding",
        "FindSimilar",
        "GroupFaces",
        "GetSubject",
        "ListSubjects",
        "CalibrateThreshold",
        "ExportSubject",
        "UpdateSubject",
        "DeleteSubject",
        "DeleteFace",
        "CreateCollection",
        "UpdateCollection",
        "DeleteCollection",
        "CreateApiKey",
        "DeleteApiKey",
    }
)


def key_of_caller() -> str:
    p = current_principal.get()
    if p is None:
        return ""  # auth is off
    return "admin" if p.admin else p.key_id


class AuditRecorder:
    def __init__(self, log):
        self.log = log  # server.domain.audit.AuditLog

    def record_item(self, action: str, request, outcome: str) -> None:
        """One call or batch item: what its request named, and how it ended ("OK" or "<code> <reason>")."""
        self.log.record(
            key_of_caller(),
            action,
            getattr(request, "collection", ""),
            getattr(request, "subject_id", ""),
            getattr(request, "face_id", ""),
            outcome,
        )

    def record_identified(self, action: str, collection: str, subject_id: str = "", face_id: str = "") -> None:
        """A stream's identification in `collection` (subject_id: whom; empty: the stream opened)."""
        self.log.record(key_of_caller(), action, collection, subject_id, face_id, "OK")


class AuditInterceptor(grpc.ServerInterceptor):
    def __init__(self, recorder: AuditRecorder):
        self.recorder = recorder

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        rpc = rpc_name(handler, handler_call_details.method, SERVICE_PREFIX)
        if rpc not in AUDITED or handler.request_streaming or handler.response_streaming:
            return handler

        def enter(request, context, kind):
            return request, call_outcome.set(None)

        def leave(state):
            request, token = state
            self.recorder.record_item(rpc, request, call_outcome.get() or "OK")
            with contextlib.suppress(ValueError):
                call_outcome.reset(token)

        return around(handler, enter, leave)
