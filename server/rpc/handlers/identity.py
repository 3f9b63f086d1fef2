"""The identity lifecycle (Process -> Register -> Verify) and the subject RPCs, over IdentityService."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from facesvc.v1 import face_service_pb2 as pb
from server import errors
from server.domain.identity import IdentityService
from server.rpc import convert, validate
from server.rpc.requests import RequestParser
from server.rpc.status import rpc


@dataclass
class Pending:
    """A request checked up to its embedding: `face` to embed (None when it needs none), then `finish`."""

    face: object
    finish: Callable


class IdentityHandlers:
    RPCS = (
        "Process",
        "Register",
        "Verify",
        "GetSubject",
        "ListSubjects",
        "UpdateSubject",
        "DeleteSubject",
        "DeleteFace",
        "ExportSubject",
    )

    def __init__(self, identity: IdentityService, requests: RequestParser):
        self.identity, self.requests = identity, requests

    @staticmethod
    def _ids(request) -> tuple[str, str]:
        return validate.collection_id(request.collection), validate.subject_id(request.subject_id)

    def finish(self, pending: Pending):
        """Embed the pending face (if any) and complete the request: the one-item case of a batch."""
        embeddings = self.identity.pipeline.embed([pending.face]) if pending.face is not None else [None]
        return pending.finish(embeddings[0])

    def _screen(self, request, coll: str, subject: str, budget):
        r = self.requests
        opts = r.options(request.face_options)
        lthr = r.liveness_threshold(request.liveness_threshold, floor=self.identity.settings(coll)[1].liveness)
        img = r.image(request.image, "image", budget)
        return self.identity.screen(
            coll, subject, img, opts, add_face=request.add_face, skip_liveness=request.skip_liveness, liveness_threshold=lthr
        )

    # -- enrolment and verification --------------------------------------------
    def prepare_process(self, request: pb.ProcessRequest, budget=None) -> Pending:
        coll, subject = self._ids(request)
        screened = self._screen(request, coll, subject, budget)

        def finish(embedding) -> pb.ProcessResponse:
            r = self.identity.process_screened(screened, embedding)
            return pb.ProcessResponse(
                staging_token=r.token,
                expire_time=convert.timestamp(r.staged.expires_ms),
                face=convert.face_to_proto(r.face),
                liveness=convert.liveness_to_proto(r.liveness) if r.liveness else None,
                faces_detected=r.faces_detected,
                model=r.staged.model_id,
                duplicate=convert.duplicate_to_proto(r.duplicate),
            )

        return Pending(screened.face, finish)

    def prepare_register(self, request: pb.RegisterRequest, budget=None) -> Pending:
        coll, subject = self._ids(request)
        metadata = validate.metadata(request.metadata)
        which = request.WhichOneof("source")
        if which is None:
            raise errors.validation("source", "set staging_token (from Process) or image")
        if which == "staging_token":
            if not request.staging_token:
                raise errors.validation("staging_token", "required")
            return Pending(
                None,
                lambda _: self._register_response(self.identity.register_staged(coll, subject, request.staging_token, metadata)),
            )
        screened = self._screen(request, coll, subject, budget)
        return Pending(
            screened.face,
            lambda embedding: self._register_response(self.identity.register_screened(screened, embedding, metadata)),
        )

    @rpc
    def Process(self, request: pb.ProcessRequest, context) -> pb.ProcessResponse:
        return self.finish(self.prepare_process(request))

    @rpc
    def Register(self, request: pb.RegisterRequest, context) -> pb.RegisterResponse:
        return self.finish(self.prepare_register(request))

    @staticmethod
    def _register_response(r) -> pb.RegisterResponse:
        resp = pb.RegisterResponse(
            subject=convert.subject_to_proto(r.subject),
            face=convert.stored_face_to_proto(r.face),
            subject_created=r.created,
            duplicate=convert.duplicate_to_proto(r.duplicate),
        )
        if r.processed is not None:
            resp.detected_face.CopyFrom(convert.face_to_proto(r.processed.face))
            if r.processed.liveness:
                resp.liveness.CopyFrom(convert.liveness_to_proto(r.processed.liveness))
        return resp

    @rpc
    def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyResponse:
        r = self.requests
        coll, subject = self._ids(request)
        opts = r.options(request.face_options)
        limits = self.identity.settings(coll)[1]
        threshold = r.match_threshold(request.threshold, default=limits.match)
        lthr = r.liveness_threshold(request.liveness_threshold, floor=limits.liveness)
        img = r.image(request.image, "image")
        v = self.identity.verify(
            coll, subject, img, opts, threshold, skip_liveness=request.skip_liveness, liveness_threshold=lthr
        )
        return pb.VerifyResponse(
            match=v.match,
            similarity=v.similarity,
            matched_face_id=v.matched_face_id,
            threshold=v.threshold,
            liveness=convert.liveness_to_proto(v.liveness) if v.liveness else None,
            face=convert.face_to_proto(v.face),
            model=self.identity.pipeline.recognizer.model_id,
            face_similarities=[pb.FaceSimilarity(face_id=f, similarity=s) for f, s in v.similarities],
        )

    # -- subjects ----------------------------------------------------------------
    @rpc
    def GetSubject(self, request: pb.GetSubjectRequest, context) -> pb.GetSubjectResponse:
        coll, subject = self._ids(request)
        return pb.GetSubjectResponse(subject=convert.subject_to_proto(self.identity.get_subject(coll, subject)))

    @rpc
    def ListSubjects(self, request: pb.ListSubjectsRequest, context) -> pb.ListSubjectsResponse:
        coll = validate.collection_id(request.collection)
        rows, token = validate.page(
            request.page_size,
            request.page_token,
            f"subjects:{coll}",
            lambda after, limit: self.identity.list_subjects(coll, after, limit),
            lambda s: s.subject_id,
        )
        return pb.ListSubjectsResponse(subjects=[convert.subject_to_proto(s) for s in rows], next_page_token=token)

    @rpc
    def UpdateSubject(self, request: pb.UpdateSubjectRequest, context) -> pb.UpdateSubjectResponse:
        coll, subject = self._ids(request)
        metadata = validate.metadata(request.metadata)
        keys = validate.metadata_mask(request.update_mask.paths, metadata)
        return pb.UpdateSubjectResponse(
            subject=convert.subject_to_proto(self.identity.update_subject(coll, subject, metadata, keys))
        )

    @rpc
    def DeleteSubject(self, request: pb.DeleteSubjectRequest, context) -> pb.DeleteSubjectResponse:
        coll, subject = self._ids(request)
        return pb.DeleteSubjectResponse(deleted_faces=self.identity.delete_subject(coll, subject))

    @rpc
    def DeleteFace(self, request: pb.DeleteFaceRequest, context) -> pb.DeleteFaceResponse:
        coll = validate.collection_id(request.collection)
        face = self.identity.delete_face(coll, validate.face_id(request.face_id))
        return pb.DeleteFaceResponse(face=convert.stored_face_to_proto(face))

    @rpc
    def ExportSubject(self, request: pb.ExportSubjectRequest, context) -> pb.ExportSubjectResponse:
        coll, subject = self._ids(request)
        s, crops, unreadable = self.identity.export_subject(coll, subject)
        return pb.ExportSubjectResponse(
            subject=convert.subject_to_proto(s),
            crops=[pb.FaceCrop(face_id=f, png=png) for f, png in crops],
            collection=coll,
            export_time=convert.timestamp(int(time.time() * 1000)),
            unreadable_crops=unreadable,
        )
