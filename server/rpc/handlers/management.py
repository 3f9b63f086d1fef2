"""Collections and API keys (admin key only: enforced by server/rpc/auth.py), over CollectionService."""

from __future__ import annotations

from facesvc.v1 import face_service_pb2 as pb
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
    )

    def __init__(self, collections: CollectionService):
        self.collections = collections

    @rpc
    def CreateCollection(self, request: pb.CreateCollectionRequest, context) -> pb.CreateCollectionResponse:
        c = self.collections.create(
            validate.collection_id(request.collection),
            validate.text(request.display_name, "display_name"),
            convert.liveness_policy(request.liveness_policy),
        )
        return pb.CreateCollectionResponse(collection=convert.collection_to_proto(c))

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
