"""FaceClient: the facesvc API as Python methods over the generated stubs.

- Deadlines: every unary call has one (`timeout`, 30 s by default, per call
  overridable); streams have none unless given.
- Retries: only on UNAVAILABLE (server restarting, models loading, database or
  cache briefly away), with exponential backoff and jitter, within the call's
  deadline, and only for calls that are safe to repeat. Register with an image
  and the batch/stream calls are not retried (a lost answer could mean it was
  done); Register with a staging token is (the server makes it idempotent).
- Errors: a typed FaceServiceError subclass with the server's ErrorInfo reason.
- Images: anything `images.to_image` takes (path, bytes, base64/data URL, numpy).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator

import grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from facesvc.v1 import face_service_pb2 as pb
from facesvc.v1 import face_service_pb2_grpc as pb_grpc
from facesvc_client.errors import from_rpc_error
from facesvc_client.images import to_image

API_KEY_HEADER = "x-api-key"


def _face_options(selection: str = "", min_face_size: int = 0, max_faces: int = 0) -> pb.FaceOptions:
    sel = getattr(pb, f"FACE_SELECTION_{selection.upper()}") if selection else pb.FACE_SELECTION_UNSPECIFIED
    return pb.FaceOptions(selection=sel, min_face_size=min_face_size, max_faces=max_faces)


class FaceClient:
    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.2,
        max_message_mb: int = 32,
        channel: grpc.Channel | None = None,
    ):
        options = [
            ("grpc.max_receive_message_length", max_message_mb << 20),
            ("grpc.max_send_message_length", max_message_mb << 20),
        ]
        if channel is None:
            if tls or root_certificates or client_certificate:
                creds = grpc.ssl_channel_credentials(root_certificates, client_key, client_certificate)
                channel = grpc.secure_channel(target, creds, options)
            else:
                channel = grpc.insecure_channel(target, options)
        self.channel = channel
        self.stub = pb_grpc.FaceServiceStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel)
        self.metadata = ((API_KEY_HEADER, api_key),) if api_key else ()
        self.timeout, self.retries, self.backoff = timeout, retries, backoff

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "FaceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------
    def _call(self, method, request, *, timeout: float | None = None, retry: bool = True):
        deadline = time.monotonic() + (timeout or self.timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=max(0.001, deadline - time.monotonic()), metadata=self.metadata)
            except grpc.RpcError as err:
                pause = self.backoff * (2**attempt) * random.uniform(0.5, 1.5)
                if (
                    not retry
                    or err.code() != grpc.StatusCode.UNAVAILABLE
                    or attempt >= self.retries
                    or time.monotonic() + pause >= deadline
                ):
                    raise from_rpc_error(err) from None
                attempt += 1
                time.sleep(pause)

    def _stream(self, method, requests: Iterator, timeout: float | None) -> Iterator:
        call = method(requests, timeout=timeout, metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()  # a stream left early (an error, a break) stops reading its requests

    def health(self, service: str = "") -> str:
        """SERVING, NOT_SERVING, ... of the standard grpc.health.v1 service."""
        resp = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    # -- stateless -------------------------------------------------------------------
    def detect(
        self, image, *, selection: str = "", min_face_size: int = 0, max_faces: int = 0, timeout: float | None = None
    ) -> pb.DetectResponse:
        return self._call(
            self.stub.Detect,
            pb.DetectRequest(image=to_image(image), face_options=_face_options(selection, min_face_size, max_faces)),
            timeout=timeout,
        )

    def check_liveness(self, image, *, threshold: float = 0.0, timeout: float | None = None) -> pb.CheckLivenessResponse:
        return self._call(
            self.stub.CheckLiveness, pb.CheckLivenessRequest(image=to_image(image), threshold=threshold), timeout=timeout
        )

    def compare(
        self, source, target, *, threshold: float = 0.0, require_liveness: bool = False, timeout: float | None = None
    ) -> pb.CompareResponse:
        return self._call(
            self.stub.Compare,
            pb.CompareRequest(
                source=to_image(source), target=to_image(target), threshold=threshold, require_liveness=require_liveness
            ),
            timeout=timeout,
        )

    def embed(self, image, *, timeout: float | None = None) -> pb.EmbedResponse:
        return self._call(self.stub.Embed, pb.EmbedRequest(image=to_image(image)), timeout=timeout)

    def analyze(self, image, *, timeout: float | None = None) -> pb.AnalyzeResponse:
        return self._call(self.stub.Analyze, pb.AnalyzeRequest(image=to_image(image)), timeout=timeout)

    # -- enrolment, 1:1 and 1:N ----------------------------------------------------------
    def process(
        self,
        collection: str,
        subject_id: str,
        image,
        *,
        add_face: bool = False,
        skip_liveness: bool = False,
        selection: str = "",
        timeout: float | None = None,
    ) -> pb.ProcessResponse:
        return self._call(
            self.stub.Process,
            pb.ProcessRequest(
                collection=collection,
                subject_id=subject_id,
                image=to_image(image),
                add_face=add_face,
                skip_liveness=skip_liveness,
                face_options=_face_options(selection),
            ),
            timeout=timeout,
        )

    def register(
        self,
        collection: str,
        subject_id: str,
        *,
        image=None,
        staging_token: str = "",
        add_face: bool = False,
        skip_liveness: bool = False,
        metadata: dict[str, str] | None = None,
        selection: str = "",
        timeout: float | None = None,
    ) -> pb.RegisterResponse:
        """Commit a staged face (staging_token from process()) or enrol a photo in one call (image)."""
        req = pb.RegisterRequest(
            collection=collection,
            subject_id=subject_id,
            add_face=add_face,
            skip_liveness=skip_liveness,
            metadata=metadata or {},
            face_options=_face_options(selection),
        )
        if staging_token:
            req.staging_token = staging_token
        elif image is not None:
            req.image.CopyFrom(to_image(image))
        return self._call(self.stub.Register, req, timeout=timeout, retry=bool(staging_token))

    def verify(
        self,
        collection: str,
        subject_id: str,
        image,
        *,
        threshold: float = 0.0,
        skip_liveness: bool = False,
        timeout: float | None = None,
    ) -> pb.VerifyResponse:
        return self._call(
            self.stub.Verify,
            pb.VerifyRequest(
                collection=collection,
                subject_id=subject_id,
                image=to_image(image),
                threshold=threshold,
                skip_liveness=skip_liveness,
            ),
            timeout=timeout,
        )

    def search(
        self,
        collection: str,
        image,
        *,
        top_k: int = 5,
        min_similarity: float = 0.0,
        all_faces: bool = False,
        skip_liveness: bool = False,
        timeout: float | None = None,
    ) -> pb.SearchResponse:
        return self._call(
            self.stub.Search,
            pb.SearchRequest(
                collection=collection,
                image=to_image(image),
                top_k=top_k,
                min_similarity=min_similarity,
                all_faces=all_faces,
                skip_liveness=skip_liveness,
            ),
            timeout=timeout,
        )

    def search_by_embedding(
        self,
        collection: str,
        embedding,
        *,
        model: str = "",
        top_k: int = 5,
        min_similarity: float = 0.0,
        timeout: float | None = None,
    ) -> pb.SearchByEmbeddingResponse:
        return self._call(
            self.stub.SearchByEmbedding,
            pb.SearchByEmbeddingRequest(
                collection=collection,
                embedding=list(map(float, embedding)),
                model=model,
                top_k=top_k,
                min_similarity=min_similarity,
            ),
            timeout=timeout,
        )

    def index_stats(self, collection: str) -> pb.GetIndexStatsResponse:
        return self._call(self.stub.GetIndexStats, pb.GetIndexStatsRequest(collection=collection))

    # -- subjects and collections -----------------------------------------------------------
    def get_subject(self, collection: str, subject_id: str) -> pb.Subject:
        return self._call(self.stub.GetSubject, pb.GetSubjectRequest(collection=collection, subject_id=subject_id)).subject

    def list_subjects(self, collection: str, *, page_size: int = 100) -> Iterator[pb.Subject]:
        """Every subject, fetching pages as the caller iterates."""
        token = ""
        while True:
            page = self._call(
                self.stub.ListSubjects, pb.ListSubjectsRequest(collection=collection, page_size=page_size, page_token=token)
            )
            yield from page.subjects
            token = page.next_page_token
            if not token:
                return

    def update_subject(
        self, collection: str, subject_id: str, metadata: dict[str, str], *, keys: Iterable[str] | None = None
    ) -> pb.Subject:
        """Replaces the subject's metadata; with `keys`, changes only those keys (set from `metadata`,
        removed when `metadata` lacks them)."""
        mask = field_mask_pb2.FieldMask(paths=[f"metadata.{k}" for k in keys]) if keys is not None else None
        return self._call(
            self.stub.UpdateSubject,
            pb.UpdateSubjectRequest(collection=collection, subject_id=subject_id, metadata=metadata, update_mask=mask),
        ).subject

    def delete_subject(self, collection: str, subject_id: str) -> int:
        """Returns how many faces were deleted with the subject."""
        return self._call(
            self.stub.DeleteSubject, pb.DeleteSubjectRequest(collection=collection, subject_id=subject_id)
        ).deleted_faces

    def delete_face(self, collection: str, face_id: str) -> None:
        self._call(self.stub.DeleteFace, pb.DeleteFaceRequest(collection=collection, face_id=face_id))

    def create_collection(self, collection: str, *, display_name: str = "", liveness_optional: bool = False) -> pb.Collection:
        policy = pb.LIVENESS_POLICY_OPTIONAL if liveness_optional else pb.LIVENESS_POLICY_REQUIRED
        return self._call(
            self.stub.CreateCollection,
            pb.CreateCollectionRequest(collection=collection, display_name=display_name, liveness_policy=policy),
            retry=False,
        ).collection

    def update_collection(
        self,
        collection: str,
        *,
        display_name: str | None = None,
        duplicate_policy: str | None = None,
        match_threshold: float | None = None,
        search_threshold: float | None = None,
        liveness_threshold: float | None = None,
    ) -> pb.Collection:
        """Change the settings given (not None); a threshold of 0 goes back to the server's default.
        duplicate_policy: "reject", "warn" or "off"."""
        req = pb.UpdateCollectionRequest(collection=collection)
        if display_name is not None:
            req.display_name = display_name
            req.update_mask.paths.append("display_name")
        if duplicate_policy is not None:
            req.duplicate_policy = pb.DuplicatePolicy.Value(f"DUPLICATE_POLICY_{duplicate_policy.upper()}")
            req.update_mask.paths.append("duplicate_policy")
        for name, value in (
            ("match_threshold", match_threshold),
            ("search_threshold", search_threshold),
            ("liveness_threshold", liveness_threshold),
        ):
            if value is not None:
                setattr(req.thresholds, name, value)
                req.update_mask.paths.append(f"thresholds.{name}")
        return self._call(self.stub.UpdateCollection, req).collection

    def calibrate_threshold(
        self, collection: str, pairs, target_far: float, *, timeout: float | None = None
    ) -> pb.CalibrateThresholdResponse:
        """pairs: (first, second, same_person), each side a photo (path, bytes, array) or an embedding
        (a sequence of floats)."""

        def member(x) -> pb.PairMember:
            if isinstance(x, (list, tuple)) or getattr(x, "ndim", 0) == 1:
                return pb.PairMember(embedding=list(map(float, x)))
            return pb.PairMember(image=to_image(x))

        req = pb.CalibrateThresholdRequest(
            collection=collection,
            target_far=target_far,
            pairs=[pb.LabelledPair(first=member(a), second=member(b), same_person=bool(same)) for a, b, same in pairs],
        )
        return self._call(self.stub.CalibrateThreshold, req, timeout=timeout)

    def find_similar(
        self, collection: str, face_id: str, *, top_k: int = 5, min_similarity: float = 0.0
    ) -> pb.FindSimilarResponse:
        return self._call(
            self.stub.FindSimilar,
            pb.FindSimilarRequest(collection=collection, face_id=face_id, top_k=top_k, min_similarity=min_similarity),
        )

    def group_faces(
        self, collection: str, images=None, *, face_ids=(), min_similarity: float = 0.0, timeout: float | None = None
    ) -> pb.GroupFacesResponse:
        """images: {item id: photo} to group, or none to group the collection's faces (face_ids, or all)."""
        req = pb.GroupFacesRequest(collection=collection, face_ids=list(face_ids), min_similarity=min_similarity)
        for item_id, img in (images or {}).items():
            req.images.add(item_id=item_id, image=to_image(img))
        return self._call(self.stub.GroupFaces, req, timeout=timeout)

    def get_collection(self, collection: str) -> pb.Collection:
        return self._call(self.stub.GetCollection, pb.GetCollectionRequest(collection=collection)).collection

    def list_collections(self, *, page_size: int = 100) -> Iterator[pb.Collection]:
        token = ""
        while True:
            page = self._call(self.stub.ListCollections, pb.ListCollectionsRequest(page_size=page_size, page_token=token))
            yield from page.collections
            token = page.next_page_token
            if not token:
                return

    def delete_collection(self, collection: str) -> pb.DeleteCollectionResponse:
        return self._call(self.stub.DeleteCollection, pb.DeleteCollectionRequest(collection=collection))

    def create_api_key(self, collection: str, description: str = "") -> pb.CreateApiKeyResponse:
        return self._call(
            self.stub.CreateApiKey, pb.CreateApiKeyRequest(collection=collection, description=description), retry=False
        )

    def list_api_keys(self, collection: str, *, page_size: int = 100) -> Iterator[pb.ApiKey]:
        token = ""
        while True:
            page = self._call(
                self.stub.ListApiKeys, pb.ListApiKeysRequest(collection=collection, page_size=page_size, page_token=token)
            )
            yield from page.keys
            token = page.next_page_token
            if not token:
                return

    def delete_api_key(self, collection: str, key_id: str) -> None:
        self._call(self.stub.DeleteApiKey, pb.DeleteApiKeyRequest(collection=collection, key_id=key_id))

    # -- batches and streams --------------------------------------------------------------
    def detect_batch(
        self, items: dict[str, object] | Iterable[tuple[str, object]], *, timeout: float | None = None
    ) -> pb.DetectBatchResponse:
        pairs = items.items() if isinstance(items, dict) else items
        return self._call(
            self.stub.DetectBatch,
            pb.DetectBatchRequest(items=[pb.BatchImage(item_id=k, image=to_image(v)) for k, v in pairs]),
            timeout=timeout,
        )

    def register_batch(
        self, items: Iterable[tuple[str, pb.RegisterRequest]], *, timeout: float | None = None
    ) -> Iterator[pb.RegisterBatchResponse]:
        """(item id, RegisterRequest) pairs in; one RegisterBatchResponse per item out, in order."""
        requests = (pb.RegisterBatchRequest(item_id=k, register=r) for k, r in items)
        return self._stream(self.stub.RegisterBatch, requests, timeout)

    def process_batch(
        self, items: Iterable[tuple[str, pb.ProcessRequest]], *, timeout: float | None = None
    ) -> Iterator[pb.ProcessBatchResponse]:
        requests = (pb.ProcessBatchRequest(item_id=k, process=r) for k, r in items)
        return self._stream(self.stub.ProcessBatch, requests, timeout)

    def stream_frames(
        self,
        frames: Iterable,
        *,
        collection: str = "",
        identify: bool = False,
        liveness: bool = False,
        max_fps: float = 0.0,
        min_similarity: float = 0.0,
        min_face_size: int = 0,
        timeout: float | None = None,
    ) -> Iterator[pb.StreamFramesResponse]:
        """Frames in (numpy arrays, images, or (frame_id, image) pairs); an answer per processed frame out.

        The server drops frames it cannot keep up with (see skipped_frame_ids), so a
        caller may send at the camera's rate without pacing."""
        config = pb.StreamConfig(
            collection=collection,
            identify=identify,
            liveness=liveness,
            max_fps=max_fps,
            min_similarity=min_similarity,
            face_options=_face_options(min_face_size=min_face_size),
        )

        def requests():
            yield pb.StreamFramesRequest(config=config)
            for n, f in enumerate(frames, 1):
                frame_id, img = f if isinstance(f, tuple) else (n, f)
                frame = pb.Frame(frame_id=frame_id, image=to_image(img))
                frame.capture_time.GetCurrentTime()
                yield pb.StreamFramesRequest(frame=frame)

        return self._stream(self.stub.StreamFrames, requests(), timeout)
