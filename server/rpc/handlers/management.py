"""Collections, API keys and the audit log, over CollectionService: the admin key's, except GetCollection,
which a collection's own key may call too (the scopes are SCOPES in server/rpc/auth.py)."""

from __future__ import annotations

from facesvc.v1 import face_service_pb2 as pb
from server import errors
from server.domain.audit import AuditLog
from server.domain.collections import CollectionService
from server.rpc import convert, validate
from server.rpc.auth import hash_key, new_api_key
from server.rpc.status import rpc


class ManagementHandlers:
    RPCS = (
        "CreateCollection",
        "GetCollection",
        "ListCollections",
        "DeleteCollection",
        "CreateApiKey",
        "ListApiKeys",
        "DeleteApiKey",
        "UpdateCollection",
        "ListAuditEvents",
    )

    def __init__(self, collections: CollectionService, audit: AuditLog):
        self.collections = collections
        self.audit = audit

    @rpc
    def CreateCollection(self, request: pb.CreateCollectionRequest, context) -> pb.CreateCollectionResponse:
        c = self.collections.create(
            validate.collection_id(request.collection),
            validate.text(request.display_name, "display_name"),
            convert.liveness_policy(request.liveness_policy),
            convert.duplicate_policy(request.duplicate_policy),
            convert.thresholds(request.thresholds),
            _retention_days(request.retention_days),
        )
        return pb.CreateCollectionResponse(collection=convert.collection_to_proto(c))

    @rpc
    def UpdateCollection(self, request: pb.UpdateCollectionRequest, context) -> pb.UpdateCollectionResponse:
        coll = validate.collection_id(request.collection)
        paths = list(request.update_mask.paths)
        if not paths:
            raise errors.validation("update_mask", "name the fields to change (AIP-134), e.g. thresholds.search_threshold")
        limits = convert.thresholds(request.thresholds)
        fields = {
            "display_name": lambda: validate.text(request.display_name, "display_name"),
            "liveness_policy": lambda: convert.liveness_policy(request.liveness_policy),
            "duplicate_policy": lambda: convert.duplicate_policy(request.duplicate_policy),
            "thresholds.match_threshold": lambda: limits.match,
            "thresholds.search_threshold": lambda: limits.search,
            "thresholds.liveness_threshold": lambda: limits.liveness,
            "retention_days": lambda: _retention_days(request.retention_days),
        }
        changes = {}
        for path in paths:
            names = [f for f in fields if f.startswith("thresholds.")] if path == "thresholds" else [path]
            for name in names:
                if name not in fields:
                    raise errors.validation(
                        "update_mask", f"unknown path {errors.quote(path, 80)}; one of thresholds, {', '.join(fields)}"
                    )
                changes[name.removesuffix("_threshold")] = fields[name]()
        return pb.UpdateCollectionResponse(collection=convert.collection_to_proto(self.collections.update(coll, changes)))

    @rpc
    def GetCollection(self, request: pb.GetCollectionRequest, context) -> pb.GetCollectionResponse:
        c = self.collections.get(validate.collection_id(request.collection))
        return pb.GetCollectionResponse(collection=convert.collection_to_proto(c))

    @rpc
    def ListCollections(self, request: pb.ListCollectionsRequest, context) -> pb.ListCollectionsResponse:
        rows, token = validate.page(
            request.page_size, request.page_token, "collections", self.collections.list, lambda c: c.collection_id
        )
        return pb.ListCollectionsResponse(collections=[convert.collection_to_proto(c) for c in rows], next_page_token=token)

    @rpc
    def DeleteCollection(self, request: pb.DeleteCollectionRequest, context) -> pb.DeleteCollectionResponse:
        subjects, faces = self.collections.delete(validate.collection_id(request.collection))
        return pb.DeleteCollectionResponse(deleted_subjects=subjects, deleted_faces=faces)

    @rpc
    def CreateApiKey(self, request: pb.CreateApiKeyRequest, context) -> pb.CreateApiKeyResponse:
        coll = validate.collection_id(request.collection)
        key_id, secret = new_api_key()
        k = self.collections.create_key(key_id, coll, hash_key(secret), validate.text(request.description, "description"))
        return pb.CreateApiKeyResponse(key=convert.api_key_to_proto(k), secret=secret)

    @rpc
    def ListApiKeys(self, request: pb.ListApiKeysRequest, context) -> pb.ListApiKeysResponse:
        coll = validate.collection_id(request.collection)
        rows, token = validate.page(
            request.page_size,
            request.page_token,
            f"keys:{coll}",
            lambda after, limit: self.collections.list_keys(coll, after, limit),
            lambda k: k.key_id,
        )
        return pb.ListApiKeysResponse(keys=[convert.api_key_to_proto(k) for k in rows], next_page_token=token)

    @rpc
    def DeleteApiKey(self, request: pb.DeleteApiKeyRequest, context) -> pb.DeleteApiKeyResponse:
        self.collections.delete_key(validate.collection_id(request.collection), validate.key_id(request.key_id))
        return pb.DeleteApiKeyResponse()

    @rpc
    def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context) -> pb.ListAuditEventsResponse:
        coll = validate.collection_id(request.collection) if request.collection else ""
        subject = validate.subject_id(request.subject_id) if request.subject_id else ""
        if subject and not coll:
            raise errors.validation("collection", "required with subject_id")
        rows, token = validate.page(
            request.page_size,
            request.page_token,
            f"audit:{coll}:{subject}",
            lambda after, limit: self.audit.list(_audit_seq(after), limit, coll, subject),
            lambda e: str(e.seq),
        )
        return pb.ListAuditEventsResponse(events=[convert.audit_event_to_proto(e) for e in rows], next_page_token=token)


MAX_RETENTION_DAYS = 36_500


def _retention_days(value: int) -> int:
    if value > MAX_RETENTION_DAYS:
        raise errors.validation("retention_days", f"at most {MAX_RETENTION_DAYS}, got {value}")
    return value


def _audit_seq(after: str) -> int:
    """The audit listing's page token holds the last event's sequence number ("": the newest first).
    Only ASCII digits within the column's range: '²' is a digit to str.isdigit() and not to int(), and
    SQLite takes no integer of 2**63 or more (19 digits; any 18 fit)."""
    if not after:
        return 0
    if not (after.isascii() and after.isdigit()) or len(after) > 18:
        raise errors.validation("page_token", "not a page token from this listing")
    return int(after)
