"""FaceService: turns requests into pipeline calls and results into responses. No model code here."""
from __future__ import annotations

import grpc

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from server import errors
from server.rpc import convert
from server.config import Settings
from server.rpc.identity_rpcs import IdentityRpcs
from server.vision.imaging import ImageLimits
from server.rpc.search_rpcs import SearchRpcs
from server.rpc.stream_rpcs import StreamRpcs
from server.vision.pipeline import FacePipeline
from server.context import ensure_call_alive
from server.rpc.status import rpc


class FaceServicer(IdentityRpcs, SearchRpcs, StreamRpcs, pb_grpc.FaceServiceServicer):
    """The stateless RPCs live here; identity + management in identity_rpcs.py, search in search_rpcs.py,
    streams and batches in stream_rpcs.py."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.limits = ImageLimits(
            max_bytes=int(settings.max_image_mb * 1024 * 1024), max_pixels=settings.max_image_pixels,
            max_jpeg_scans=settings.max_jpeg_scans, max_request_pixels=settings.max_request_pixels,
        )
        self.pipeline: FacePipeline | None = None  # set once every model is loaded
        self.identity = None  # IdentityService, set with the pipeline
        self.searcher = None  # SearchService, likewise
        self.streams = None  # limits.ConcurrencyLimiter of open streams (app.py), for the metrics

    # -- helpers -----------------------------------------------------------
    def _ready(self) -> FacePipeline:
        if self.pipeline is None:
            raise errors.FaceServiceError(grpc.StatusCode.UNAVAILABLE, errors.MODELS_LOADING, "models are still loading; retry shortly")
        return self.pipeline

    def _image(self, msg: pb.Image, field: str, budget=None):
        ensure_call_alive()  # before each decode: a batch stops at its deadline, not after its last item
        return convert.image_from_proto(msg, field, self.limits, budget)

    def _options(self, msg: pb.FaceOptions):
        return convert.detect_options(msg, self.settings.min_face_size, self.settings.max_faces)

    def _detect_all(self, request):
        """Ready pipeline, decoded image and every face for RPCs that take `image` + `face_options`."""
        p = self._ready()
        opts = self._options(request.face_options)
        img = self._image(request.image, "image")
        return p, img, p.detect(img, opts)

    # A request may raise a threshold, never lower it below the server's: a collection key must not
    # be able to undo the policy its operator set (a spoof verifying at liveness_threshold=1e-4).
    def _liveness_threshold(self, requested: float, field: str = "liveness_threshold") -> float | None:
        t = convert.optional_threshold(requested, field, 0.0, 1.0)
        floor = self.settings.liveness_threshold
        if t is not None and t < floor:
            raise errors.validation(field, f"may raise the server's liveness threshold {floor}, not lower it; got {t}",
                                    floor=floor)
        return t

    def _floored(self, requested: float, field: str) -> float | None:
        """A requested match threshold (None: the default), refused below match_threshold_floor."""
        t = convert.optional_threshold(requested, field, -1.0, 1.0)
        floor = self.settings.match_threshold_floor
        if t is not None and t < floor:
            raise errors.validation(field, f"must be at least {floor} (the server's match_threshold_floor), got {t}",
                                    floor=floor)
        return t

    def _match_threshold(self, requested: float, field: str = "threshold") -> float:
        t = self._floored(requested, field)
        if t is not None:
            return t
        return self.settings.match_threshold or self._ready().recognizer.match_threshold

    # -- RPCs --------------------------------------------------------------
    @rpc
    def Detect(self, request: pb.DetectRequest, context) -> pb.DetectResponse:
        p, img, faces = self._detect_all(request)
        h, w = img.shape[:2]
        return pb.DetectResponse(
            faces=[convert.face_to_proto(f) for f in faces], image=pb.ImageInfo(width=w, height=h), detector=p.detector.name
        )

    @rpc
    def CheckLiveness(self, request: pb.CheckLivenessRequest, context) -> pb.CheckLivenessResponse:
        p = self._ready()
        opts = self._options(request.face_options)
        threshold = self._liveness_threshold(request.threshold, "threshold")
        img = self._image(request.image, "image")
        face = p.detect_one(img, opts)
        result = p.check_liveness(img, face, threshold)
        return pb.CheckLivenessResponse(face=convert.face_to_proto(face), liveness=convert.liveness_to_proto(result))

    @rpc
    def Compare(self, request: pb.CompareRequest, context) -> pb.CompareResponse:
        p = self._ready()
        opts = self._options(request.face_options)
        threshold = self._match_threshold(request.threshold)
        faces, live = [], []
        budget = self.limits.budget(request.ByteSize())
        for field in ("source", "target"):
            img = self._image(getattr(request, field), field, budget)
            face = p.detect_one(img, opts, image=field)
            if request.require_liveness:
                live.append(convert.liveness_to_proto(p.require_live(img, face, image=field)))
            faces.append(face)
        src_emb, tgt_emb = p.embed(faces)
        similarity = p.similarity(src_emb, tgt_emb)
        resp = pb.CompareResponse(
            similarity=similarity, match=similarity >= threshold, threshold=threshold,
            source_face=convert.face_to_proto(faces[0]), target_face=convert.face_to_proto(faces[1]),
            model=p.recognizer.model_id,
        )
        if live:
            resp.source_liveness.CopyFrom(live[0])
            resp.target_liveness.CopyFrom(live[1])
        return resp

    @rpc
    def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        p, _, faces = self._detect_all(request)
        embeddings = p.embed(faces)
        return pb.EmbedResponse(
            faces=[pb.FaceEmbedding(face=convert.face_to_proto(f), embedding=e.tolist()) for f, e in zip(faces, embeddings)],
            model=p.recognizer.model_id, dimension=p.recognizer.embedding_dim,
        )

    @rpc
    def Analyze(self, request: pb.AnalyzeRequest, context) -> pb.AnalyzeResponse:
        p, img, faces = self._detect_all(request)
        return pb.AnalyzeResponse(faces=[convert.analysis_to_proto(f, a) for f, a in zip(faces, p.analyze(img, faces))])
