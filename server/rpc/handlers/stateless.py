"""The stateless RPCs: a photo in, faces (and their liveness, embeddings, age/gender, similarity) out."""

from __future__ import annotations

from facesvc.v1 import face_service_pb2 as pb
from server import errors
from server.context import ensure_call_alive
from server.rpc import convert, validate
from server.rpc.requests import RequestParser
from server.rpc.status import failure, rpc
from server.vision.pipeline import FacePipeline

MAX_DETECT_BATCH = 64


def item_error(exc: errors.FaceServiceError) -> pb.ItemError:
    return pb.ItemError(code=exc.code.value[0], reason=exc.reason, message=exc.message, metadata=exc.metadata)


class StatelessHandlers:
    RPCS = ("Detect", "CheckLiveness", "Compare", "Embed", "Analyze", "DetectBatch")

    def __init__(self, pipeline: FacePipeline, requests: RequestParser):
        self.pipeline, self.requests = pipeline, requests

    def _detect_all(self, request, analyzed: bool = False):
        """The decoded image and every face, for RPCs that take `image` + `face_options`."""
        opts = self.requests.options(request.face_options, analyzed=analyzed)
        img = self.requests.image(request.image, "image")
        return img, self.pipeline.detect(img, opts)

    @rpc
    def Detect(self, request: pb.DetectRequest, context) -> pb.DetectResponse:
        img, faces = self._detect_all(request)
        return pb.DetectResponse(
            faces=[convert.face_to_proto(f) for f in faces],
            image=convert.image_info(img, faces),
            detector=self.pipeline.detector.name,
        )

    @rpc
    def CheckLiveness(self, request: pb.CheckLivenessRequest, context) -> pb.CheckLivenessResponse:
        p, r = self.pipeline, self.requests
        opts = r.options(request.face_options)
        threshold = r.liveness_threshold(request.threshold, "threshold")
        img = r.image(request.image, "image")
        face = p.detect_one(img, opts)
        return pb.CheckLivenessResponse(
            face=convert.face_to_proto(face), liveness=convert.liveness_to_proto(p.check_liveness(img, face, threshold))
        )

    @rpc
    def Compare(self, request: pb.CompareRequest, context) -> pb.CompareResponse:
        p, r = self.pipeline, self.requests
        opts = r.options(request.face_options)
        threshold = r.match_threshold(request.threshold)
        faces, live = [], []
        budget = r.limits.budget(request.ByteSize())
        for field in ("source", "target"):
            img = r.image(getattr(request, field), field, budget)
            face = p.detect_one(img, opts, image=field)
            if request.require_liveness:
                live.append(convert.liveness_to_proto(p.require_live(img, face, image=field)))
            faces.append(face)
        src_emb, tgt_emb = p.embed(faces)
        similarity = p.similarity(src_emb, tgt_emb)
        resp = pb.CompareResponse(
            similarity=similarity,
            match=similarity >= threshold,
            threshold=threshold,
            source_face=convert.face_to_proto(faces[0]),
            target_face=convert.face_to_proto(faces[1]),
            model=p.recognizer.model_id,
        )
        if live:
            resp.source_liveness.CopyFrom(live[0])
            resp.target_liveness.CopyFrom(live[1])
        return resp

    @rpc
    def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        p = self.pipeline
        _, faces = self._detect_all(request, analyzed=True)
        return pb.EmbedResponse(
            faces=[pb.FaceEmbedding(face=convert.face_to_proto(f), embedding=e.tolist()) for f, e in zip(faces, p.embed(faces))],
            model=p.recognizer.model_id,
            dimension=p.recognizer.embedding_dim,
        )

    @rpc
    def Analyze(self, request: pb.AnalyzeRequest, context) -> pb.AnalyzeResponse:
        img, faces = self._detect_all(request, analyzed=True)
        return pb.AnalyzeResponse(faces=[convert.analysis_to_proto(f) for f in self.pipeline.analyze(img, faces)])

    @rpc
    def DetectBatch(self, request: pb.DetectBatchRequest, context) -> pb.DetectBatchResponse:
        p, r = self.pipeline, self.requests
        if not 1 <= len(request.items) <= MAX_DETECT_BATCH:
            raise errors.validation("items", f"1 to {MAX_DETECT_BATCH} photos, got {len(request.items)}")
        for n, item in enumerate(request.items):
            validate.item_id(item.item_id, f"items[{n}].item_id")
        opts = r.options(request.face_options)
        budget = r.limits.budget(request.ByteSize())
        results = []
        for n, item in enumerate(request.items):
            ensure_call_alive()  # a dead call's remaining items are not decoded
            try:
                img = r.image(item.image, f"items[{n}].image", budget)
                faces = p.detect(img, opts)
                results.append(
                    pb.DetectBatchResult(
                        item_id=item.item_id,
                        faces=[convert.face_to_proto(f) for f in faces],
                        image=convert.image_info(img, faces),
                    )
                )
            except Exception as exc:  # noqa: BLE001 - one bad photo never fails the batch
                results.append(
                    pb.DetectBatchResult(item_id=item.item_id, error=item_error(failure("DetectBatch", exc, item=True)))
                )
        return pb.DetectBatchResponse(results=results, detector=p.detector.name)
