"""1:N search RPCs over SearchService."""

from __future__ import annotations

import numpy as np

from facesvc.v1 import face_service_pb2 as pb
from server import errors
from server.domain.search import SearchService
from server.rpc import convert, validate
from server.rpc.auth import admin_or_open
from server.rpc.requests import RequestParser
from server.rpc.status import rpc

MAX_TOP_K, DEFAULT_TOP_K = 100, 5


def _top_k(value: int) -> int:
    if value > MAX_TOP_K:
        raise errors.validation("top_k", f"at most {MAX_TOP_K}, got {value}")
    return value or DEFAULT_TOP_K


def _matches(hits) -> list[pb.SearchMatch]:
    return [pb.SearchMatch(subject_id=h.subject_id, face_id=h.face_id, similarity=h.similarity) for h in hits]


class SearchHandlers:
    RPCS = ("Search", "SearchByEmbedding", "GetIndexStats")

    def __init__(self, searcher: SearchService, requests: RequestParser, runtimes: list[dict[str, str]] = ()):
        self.searcher, self.requests = searcher, requests
        self.models = [pb.ModelRuntime(**r) for r in runtimes]  # where each model runs, for GetIndexStats

    @rpc
    def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        r = self.requests
        coll = validate.collection_id(request.collection)
        top_k, min_sim = _top_k(request.top_k), r.min_similarity(request.min_similarity)
        opts = r.options(request.face_options, analyzed=request.all_faces)
        lthr = r.liveness_threshold(request.liveness_threshold)
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
        top_k, min_sim = _top_k(request.top_k), self.requests.min_similarity(request.min_similarity)
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
            engine_params={k: str(v) for k, v in st.params.items()},
            # the change-log position moves with every tenant's writes: the admin's to see
            change_seq=self.searcher.indexes.change_seq if admin_or_open() else 0,
            models=self.models,
        )
