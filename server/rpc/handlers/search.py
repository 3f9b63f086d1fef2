"""1:N search RPCs over SearchService."""

from __future__ import annotations

import numpy as np

from facesvc.v1 import face_service_pb2 as pb
from server import errors
from server.domain.calibration import calibrate
from server.domain.grouping import group
from server.domain.search import SearchService, unit_embedding
from server.rpc import convert, validate
from server.rpc.auth import admin_or_open
from server.rpc.handlers.stateless import item_error
from server.rpc.requests import RequestParser
from server.rpc.status import rpc

MAX_TOP_K, DEFAULT_TOP_K = 100, 5


def _top_k(value: int) -> int:
    if value > MAX_TOP_K:
        raise errors.validation("top_k", f"at most {MAX_TOP_K}, got {value}")
    return value or DEFAULT_TOP_K


def _matches(hits) -> list[pb.SearchMatch]:
    return [pb.SearchMatch(subject_id=h.subject_id, face_id=h.face_id, similarity=h.similarity) for h in hits]


MAX_GROUP_IMAGES = 64  # as DetectBatch
MAX_CALIBRATION_PAIRS, MAX_CALIBRATION_IMAGE_PAIRS = 20_000, MAX_GROUP_IMAGES // 2  # photos: as DetectBatch


class SearchHandlers:
    RPCS = ("Search", "SearchByEmbedding", "GetIndexStats", "FindSimilar", "GroupFaces", "CalibrateThreshold")

    def __init__(
        self,
        searcher: SearchService,
        requests: RequestParser,
        max_group_faces: int = 5000,
        runtimes: list[dict[str, str]] = (),
    ):
        self.searcher, self.requests, self.max_group_faces = searcher, requests, max_group_faces
        self.models = [pb.ModelRuntime(**r) for r in runtimes]  # where each model runs, for GetIndexStats

    def _limits(self, coll: str):
        """The thresholds in force in the collection (COLLECTION_NOT_FOUND)."""
        return self.searcher.identity.settings(coll)[1]

    @rpc
    def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        r = self.requests
        coll = validate.collection_id(request.collection)
        limits = self._limits(coll)
        top_k, min_sim = _top_k(request.top_k), r.min_similarity(request.min_similarity, default=limits.search)
        opts = r.options(request.face_options, analyzed=request.all_faces)
        lthr = r.liveness_threshold(request.liveness_threshold, floor=limits.liveness)
        img = r.image(request.image, "image")
        results = self.searcher.search(
            coll,
            img,
            opts,
            top_k,
            min_sim,
            all_faces=request.all_faces,
            skip_liveness=request.skip_liveness,
            liveness_threshold=lthr,
        )
        return pb.SearchResponse(
            results=[
                pb.FaceSearchResult(
                    face=convert.face_to_proto(x.face),
                    matches=_matches(x.hits),
                    liveness=convert.liveness_to_proto(x.liveness) if x.liveness else None,
                )
                for x in results
            ],
            model=self.searcher.pipeline.recognizer.model_id,
            min_similarity=min_sim,
        )

    @rpc
    def SearchByEmbedding(self, request: pb.SearchByEmbeddingRequest, context) -> pb.SearchByEmbeddingResponse:
        coll = validate.collection_id(request.collection)
        top_k = _top_k(request.top_k)
        min_sim = self.requests.min_similarity(request.min_similarity, default=self._limits(coll).search)
        hits = self.searcher.search_embedding(
            coll, np.asarray(request.embedding, dtype=np.float32), request.model, top_k, min_sim, trusted=admin_or_open()
        )
        return pb.SearchByEmbeddingResponse(matches=_matches(hits), min_similarity=min_sim)

    @rpc
    def GetIndexStats(self, request: pb.GetIndexStatsRequest, context) -> pb.GetIndexStatsResponse:
        coll = validate.collection_id(request.collection)
        st = self.searcher.stats(coll)
        return pb.GetIndexStatsResponse(
            engine=st.engine,
            size=st.size,
            deleted=st.deleted,
            dimension=st.dimension,
            model=st.model,
            memory_bytes=st.memory_bytes,
            capacity=st.capacity,
            loaded_from=st.loaded_from,
            last_rebuild_time=convert.timestamp(int(st.built_at * 1000)),
            snapshot_time=convert.timestamp(int(st.snapshot_at * 1000)) if st.snapshot_at else None,
            # where the index lives (Milvus's address, a file's path) and the change-log position, which
            # moves with every tenant's writes, are the operator's to see
            engine_params={k: str(v) for k, v in st.params.items() if k != "uri" or admin_or_open()},
            change_seq=self.searcher.indexes.change_seq if admin_or_open() else 0,
            models=self.models,
        )

    @rpc
    def FindSimilar(self, request: pb.FindSimilarRequest, context) -> pb.FindSimilarResponse:
        coll = validate.collection_id(request.collection)
        face_id = validate.face_id(request.face_id)
        top_k = _top_k(request.top_k)
        min_sim = self.requests.min_similarity(request.min_similarity, default=self._limits(coll).search)
        subject, hits = self.searcher.find_similar(coll, face_id, top_k, min_sim)
        return pb.FindSimilarResponse(matches=_matches(hits), subject_id=subject, min_similarity=min_sim)

    @rpc
    def GroupFaces(self, request: pb.GroupFacesRequest, context) -> pb.GroupFacesResponse:
        coll = validate.collection_id(request.collection)
        min_sim = self.requests.min_similarity(request.min_similarity, default=self._limits(coll).search)
        failed: list[pb.FailedItem] = []
        if request.images:
            if request.face_ids:
                raise errors.validation("face_ids", "set images or face_ids, not both")
            if len(request.images) > MAX_GROUP_IMAGES:
                raise errors.validation("images", f"at most {MAX_GROUP_IMAGES} photos, got {len(request.images)}")
            members, embeddings = [], []
            for item, emb in self._embed_items(request.images, request.face_options, failed):
                members.append(pb.GroupMember(item_id=item.item_id))
                embeddings.append(emb)
        else:
            if len(request.face_ids) > self.max_group_faces:
                raise errors.validation("face_ids", f"at most {self.max_group_faces} faces (max_group_faces)")
            faces = self.searcher.stored_faces(
                coll, [validate.face_id(f, "face_ids") for f in dict.fromkeys(request.face_ids)], self.max_group_faces
            )
            members = [pb.GroupMember(face_id=f.face_id, subject_id=f.subject_id) for f in faces]
            embeddings = [f.embedding for f in faces]
        groups = group(np.stack(embeddings), min_sim) if embeddings else []
        return pb.GroupFacesResponse(
            groups=[pb.FaceGroup(members=[members[i] for i in g]) for g in groups if len(g) > 1],
            singletons=[members[g[0]] for g in groups if len(g) == 1],
            failed=failed,
            min_similarity=min_sim,
        )

    def _embed_items(self, items, face_options, failed: list):
        """(item, embedding) of each photo's selected face, embedded in one batch; a photo that cannot
        be used goes to `failed` with its error, as a batch item's would."""
        opts = self.requests.options(face_options)
        # one budget for the whole call, as DetectBatch has: many photos in one request must not buy
        # a request's worth of decoding and detector passes each
        budget = self.requests.limits.budget(sum(item.ByteSize() for item in items))
        found = []
        for item in items:
            try:
                validate.item_id(item.item_id)
                img = self.requests.image(item.image, "images.image", budget)
                found.append((item, self.searcher.pipeline.detect_one(img, opts)))
            except errors.FaceServiceError as exc:
                failed.append(pb.FailedItem(item_id=item.item_id, error=item_error(exc)))
        embeddings = self.searcher.pipeline.embed([f for _, f in found]) if found else []
        return [(item, emb) for (item, _), emb in zip(found, embeddings)]

    @rpc
    def CalibrateThreshold(self, request: pb.CalibrateThresholdRequest, context) -> pb.CalibrateThresholdResponse:
        coll = validate.collection_id(request.collection)
        self._limits(coll)  # COLLECTION_NOT_FOUND
        pairs = request.pairs
        if len(pairs) > MAX_CALIBRATION_PAIRS:
            raise errors.validation("pairs", f"at most {MAX_CALIBRATION_PAIRS} pairs, got {len(pairs)}")
        # A FAR below one in the most impostor pairs a request can hold (one pair must be genuine) is
        # never measurable: say so, and refuse a FAR outside [that, 1), before any photo is embedded.
        lowest = 1 / (MAX_CALIBRATION_PAIRS - 1)
        if not lowest <= request.target_far < 1:  # NaN too
            raise errors.validation(
                "target_far",
                f"must be in [{lowest:.4g}, 1), got {request.target_far:.4g}: "
                f"{MAX_CALIBRATION_PAIRS - 1} impostor pairs cannot measure a lower FAR",
            )
        rec = self.searcher.pipeline.recognizer
        photos: list = []  # (pair index, side) -> an image to embed, as batch items
        vectors: dict[tuple[int, int], np.ndarray] = {}
        for i, pair in enumerate(pairs):
            for side, member in enumerate((pair.first, pair.second)):
                field = f"pairs[{i}].{('first', 'second')[side]}"
                has_image = member.HasField("image")
                if has_image == bool(member.embedding):
                    raise errors.validation(field, "set exactly one of image and embedding")
                if has_image:
                    photos.append(pb.BatchImage(item_id=f"{i}:{side}", image=member.image))
                else:
                    vectors[(i, side)] = unit_embedding(
                        np.asarray(member.embedding, np.float32), rec.embedding_dim, f"{field}.embedding"
                    )
        if len(photos) > 2 * MAX_CALIBRATION_IMAGE_PAIRS:
            raise errors.validation("pairs", f"at most {2 * MAX_CALIBRATION_IMAGE_PAIRS} photos, got {len(photos)}")
        for item, emb in self._embed_items(photos, request.face_options, []):
            i, side = item.item_id.split(":")
            vectors[(int(i), int(side))] = emb
        genuine, impostor, skipped = [], [], 0
        for i, pair in enumerate(pairs):
            a, b = vectors.get((i, 0)), vectors.get((i, 1))
            if a is None or b is None:  # a photo without a usable face
                skipped += 1
                continue
            (genuine if pair.same_person else impostor).append(float(a @ b))
        c = calibrate(np.asarray(genuine), np.asarray(impostor), request.target_far)
        return pb.CalibrateThresholdResponse(
            threshold=c.threshold,
            tar=c.tar,
            far=c.far,
            genuine_pairs=c.genuine,
            impostor_pairs=c.impostor,
            skipped_pairs=skipped,
            auc=c.auc,
            below_floor=c.threshold < self.requests.defaults.match_floor,
            model=rec.model_id,
        )
