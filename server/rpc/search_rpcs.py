"""FaceService RPCs of 1:N search (a FaceServicer mixin, like identity_rpcs.py)."""
from __future__ import annotations

import numpy as np

from facesvc.v1 import face_service_pb2 as pb
from server import errors
from server.rpc import convert
from server.rpc import validate
from server.rpc.auth import current_principal
from server.rpc.status import rpc
from server.domain.search import SearchService

MAX_TOP_K, DEFAULT_TOP_K = 100, 5


def _top_k(value: int) -> int:
    if value > MAX_TOP_K:
        raise errors.validation("top_k", f"at most {MAX_TOP_K}, got {value}")
    return value or DEFAULT_TOP_K


def _admin_or_open() -> bool:
    """The admin key's (or, with auth off, anyone's): server-wide counters (the change-log position moves
    with every tenant's writes), and searching a liveness-REQUIRED collection without a photo."""
    principal = current_principal.get()
    return principal is None or principal.admin


def _matches(hits) -> list[pb.SearchMatch]:
    return [pb.SearchMatch(subject_id=h.subject_id, face_id=h.face_id, similarity=h.similarity) for h in hits]


class SearchRpcs:
    searcher: SearchService | None

    def _searcher(self) -> SearchService:
        self._ready()  # app.py sets the pipeline last, so a ready server has its search service
        return self.searcher

    def _min_similarity(self, value: float, field: str = "min_similarity") -> float:
        t = self._floored(value, field)
        if t is not None:
            return t
        return self.settings.search_threshold or self._ready().recognizer.search_threshold

    @rpc
    def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        s = self._searcher()
        coll = validate.collection_id(request.collection)
        top_k, min_sim = _top_k(request.top_k), self._min_similarity(request.min_similarity)
        opts = self._options(request.face_options)
        lthr = self._liveness_threshold(request.liveness_threshold)
        img = self._image(request.image, "image")
        results = s.search(coll, img, opts, top_k, min_sim, all_faces=request.all_faces,
                           skip_liveness=request.skip_liveness, liveness_threshold=lthr)
        return pb.SearchResponse(
            results=[pb.FaceSearchResult(face=convert.face_to_proto(r.face), matches=_matches(r.hits),
                                         liveness=convert.liveness_to_proto(r.liveness) if r.liveness else None)
                     for r in results],
            model=s.pipeline.recognizer.model_id, min_similarity=min_sim,
        )

    @rpc
    def SearchByEmbedding(self, request: pb.SearchByEmbeddingRequest, context) -> pb.SearchByEmbeddingResponse:
        s = self._searcher()
        coll = validate.collection_id(request.collection)
        top_k, min_sim = _top_k(request.top_k), self._min_similarity(request.min_similarity)
        hits = s.search_embedding(coll, np.asarray(request.embedding, dtype=np.float32), request.model, top_k, min_sim,
                                  trusted=_admin_or_open())
        return pb.SearchByEmbeddingResponse(matches=_matches(hits), min_similarity=min_sim)

    @rpc
    def GetIndexStats(self, request: pb.GetIndexStatsRequest, context) -> pb.GetIndexStatsResponse:
        s = self._searcher()
        coll = validate.collection_id(request.collection)
        s.store.get_collection_policy(coll)  # COLLECTION_NOT_FOUND
        st = s.indexes.get(coll).stats()
        return pb.GetIndexStatsResponse(
            size=st["size"], deleted=st["deleted"], dimension=st["dimension"], model=st["model"],
            memory_bytes=st["memory_bytes"], last_rebuild_time=convert.timestamp(int(st["built_at"] * 1000)),
            m=st["m"], ef_construction=st["ef_construction"], ef_search=st["ef_search"], capacity=st["capacity"],
            segments=st["segments"], projected_segments=st["projected_segments"],
            projected_dimension=st["projected_dimension"],
            loaded_from=st["loaded_from"], change_seq=s.indexes.change_seq if _admin_or_open() else 0,
            snapshot_time=convert.timestamp(int(st["snapshot_at"] * 1000)) if st["snapshot_at"] else None,
        )
