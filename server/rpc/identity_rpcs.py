"""FaceService RPCs of the identity lifecycle and of subject, collection and key management.

A mixin of FaceServicer: requests are validated and turned into calls on
IdentityService / the store; results are turned into responses. No SQL and
no model code here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from facesvc.v1 import face_service_pb2 as pb
from server import errors
from server.rpc import convert
from server.rpc import validate
from server.rpc.auth import hash_key, new_api_key
from server.domain.identity import IdentityService
from server.rpc.status import rpc


@dataclass
class Pending:
    """A request checked up to its embedding: `face` to embed (None when it needs none), then `finish`."""
    face: object
    finish: Callable


class IdentityRpcs:
    identity: IdentityService | None
    on_keys_revoked = staticmethod(lambda: None)  # the auth cache hook (app.py)

    def _identity(self) -> IdentityService:
        self._ready()  # app.py sets the pipeline last, so a ready server has its identity service
        return self.identity

    def _ids(self, request) -> tuple[IdentityService, str, str]:
        return self._identity(), validate.collection_id(request.collection), validate.subject_id(request.subject_id)


    # -- enrolment and verification ------------------------------------------
    def _finish(self, pending: "Pending"):
        """Embed the pending face (if any) and complete the request: the one-item case of a batch."""
        embeddings = self._ready().embed([pending.face]) if pending.face is not None else [None]
        return pending.finish(embeddings[0])

    @rpc
    def Process(self, request: pb.ProcessRequest, context) -> pb.ProcessResponse:
        return self._finish(self._process_pending(request))

    def _process_pending(self, request: pb.ProcessRequest, budget=None) -> "Pending":
        ident, coll, subject = self._ids(request)
        opts = self._options(request.face_options)
        lthr = self._liveness_threshold(request.liveness_threshold)
        img = self._image(request.image, "image", budget)
        screened = ident.screen(coll, subject, img, opts, add_face=request.add_face, skip_liveness=request.skip_liveness,
                                liveness_threshold=lthr)

        def finish(embedding) -> pb.ProcessResponse:
            r = ident.process_screened(screened, embedding)
            return pb.ProcessResponse(
                staging_token=r.token, expire_time=convert.timestamp(r.staged.expires_ms), face=convert.face_to_proto(r.face),
                liveness=convert.liveness_to_proto(r.liveness) if r.liveness else None, faces_detected=r.faces_detected,
                model=r.staged.model_id,
            )
        return Pending(screened.face, finish)

    @rpc
    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        return self._finish(self._register_pending(request))

    def _register_pending(self, request: pb.RegisterRequest, budget=None) -> "Pending":
        ident, coll, subject = self._ids(request)
        metadata = validate.metadata(request.metadata)
        which = request.WhichOneof("source")
        if which is None:
            raise errors.validation("source", "set staging_token (from Process) or image")
        if which == "staging_token":
            if not request.staging_token:
                raise errors.validation("staging_token", "required")
            return Pending(None, lambda _: self._register_response(
                ident.register_staged(coll, subject, request.staging_token, metadata)))
        opts = self._options(request.face_options)
        lthr = self._liveness_threshold(request.liveness_threshold)
        img = self._image(request.image, "image", budget)
        screened = ident.screen(coll, subject, img, opts, add_face=request.add_face, skip_liveness=request.skip_liveness,
                                liveness_threshold=lthr)
        return Pending(screened.face, lambda embedding: self._register_response(
            ident.register_screened(screened, embedding, metadata)))

    @staticmethod
    def _register_response(r) -> pb.RegisterResponse:
        resp = pb.RegisterResponse(subject=convert.subject_to_proto(r.subject), face=convert.stored_face_to_proto(r.face),
                                   subject_created=r.created)
        if r.processed is not None:
            resp.detected_face.CopyFrom(convert.face_to_proto(r.processed.face))
            if r.processed.liveness:
                resp.liveness.CopyFrom(convert.liveness_to_proto(r.processed.liveness))
        return resp

    @rpc
    def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyResponse:
        ident, coll, subject = self._ids(request)
        opts = self._options(request.face_options)
        threshold = self._match_threshold(request.threshold)
        lthr = self._liveness_threshold(request.liveness_threshold)
        img = self._image(request.image, "image")
        v = ident.verify(coll, subject, img, opts, threshold, skip_liveness=request.skip_liveness, liveness_threshold=lthr)
        return pb.VerifyResponse(
            match=v.match, similarity=v.similarity, matched_face_id=v.matched_face_id, threshold=v.threshold,
            liveness=convert.liveness_to_proto(v.liveness) if v.liveness else None, face=convert.face_to_proto(v.face),
            model=ident.pipeline.recognizer.model_id,
            face_similarities=[pb.FaceSimilarity(face_id=f, similarity=s) for f, s in v.similarities],
        )

    # -- subjects ----------------------------------------------------------------
    @rpc
    def GetSubject(self, request: pb.GetSubjectRequest, context) -> pb.GetSubjectResponse:
        ident, coll, subject = self._ids(request)
        return pb.GetSubjectResponse(subject=convert.subject_to_proto(ident.store.get_subject(coll, subject)))

    @rpc
    def ListSubjects(self, request: pb.ListSubjectsRequest, context) -> pb.ListSubjectsResponse:
        ident = self._identity()
        coll = validate.collection_id(request.collection)
        rows, token = validate.page(request.page_size, request.page_token, f"subjects:{coll}",
                                    lambda after, limit: ident.store.list_subjects(coll, after, limit), lambda s: s.subject_id)
        return pb.ListSubjectsResponse(subjects=[convert.subject_to_proto(s) for s in rows], next_page_token=token)

    @rpc
    def UpdateSubject(self, request: pb.UpdateSubjectRequest, context) -> pb.UpdateSubjectResponse:
        ident, coll, subject = self._ids(request)
        metadata = validate.metadata(request.metadata)
        return pb.UpdateSubjectResponse(subject=convert.subject_to_proto(ident.store.update_subject_metadata(coll, subject, metadata)))

    @rpc
    def DeleteSubject(self, request: pb.DeleteSubjectRequest, context) -> pb.DeleteSubjectResponse:
        ident, coll, subject = self._ids(request)
        return pb.DeleteSubjectResponse(deleted_faces=ident.delete_subject(coll, subject))

    @rpc
    def DeleteFace(self, request: pb.DeleteFaceRequest, context) -> pb.DeleteFaceResponse:
        ident = self._identity()
        coll = validate.collection_id(request.collection)
        face = ident.delete_face(coll, validate.face_id(request.face_id))
        return pb.DeleteFaceResponse(face=convert.stored_face_to_proto(face))

    # -- collections and keys (admin key; enforced by server/auth.py) ---------------
    @rpc
    def CreateCollection(self, request: pb.CreateCollectionRequest, context) -> pb.CreateCollectionResponse:
        ident = self._identity()
        c = ident.store.create_collection(
            validate.collection_id(request.collection_id, "collection_id"), validate.text(request.display_name, "display_name"),
            convert.liveness_policy(request.liveness_policy))
        return pb.CreateCollectionResponse(collection=convert.collection_to_proto(c))

    @rpc
    def GetCollection(self, request: pb.GetCollectionRequest, context) -> pb.GetCollectionResponse:
        ident = self._identity()
        c = ident.store.get_collection(validate.collection_id(request.collection))
        return pb.GetCollectionResponse(collection=convert.collection_to_proto(c))

    @rpc
    def ListCollections(self, request: pb.ListCollectionsRequest, context) -> pb.ListCollectionsResponse:
        ident = self._identity()
        rows, token = validate.page(request.page_size, request.page_token, "collections",
                                    ident.store.list_collections, lambda c: c.collection_id)
        return pb.ListCollectionsResponse(collections=[convert.collection_to_proto(c) for c in rows], next_page_token=token)

    @rpc
    def DeleteCollection(self, request: pb.DeleteCollectionRequest, context) -> pb.DeleteCollectionResponse:
        ident = self._identity()
        subjects, faces = ident.delete_collection(validate.collection_id(request.collection))
        self.on_keys_revoked()
        return pb.DeleteCollectionResponse(deleted_subjects=subjects, deleted_faces=faces)

    @rpc
    def CreateApiKey(self, request: pb.CreateApiKeyRequest, context) -> pb.CreateApiKeyResponse:
        ident = self._identity()
        coll = validate.collection_id(request.collection)
        key_id, secret = new_api_key()
        k = ident.store.create_api_key(key_id, coll, hash_key(secret), validate.text(request.description, "description"))
        return pb.CreateApiKeyResponse(key=convert.api_key_to_proto(k), secret=secret)

    @rpc
    def ListApiKeys(self, request: pb.ListApiKeysRequest, context) -> pb.ListApiKeysResponse:
        ident = self._identity()
        keys = ident.store.list_api_keys(validate.collection_id(request.collection))
        return pb.ListApiKeysResponse(keys=[convert.api_key_to_proto(k) for k in keys])

    @rpc
    def DeleteApiKey(self, request: pb.DeleteApiKeyRequest, context) -> pb.DeleteApiKeyResponse:
        ident = self._identity()
        ident.store.delete_api_key(validate.collection_id(request.collection), validate.key_id(request.key_id))
        self.on_keys_revoked()
        return pb.DeleteApiKeyResponse()
