"""1:N identification: probe faces -> the collection's index -> the best subjects.

Plain Python like identity.py: pipeline, identity (for the liveness policy)
and the index registry in; per-face matches out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server import errors
from server.index import IndexRegistry
from server.index.base import Hit
from server.records import LIVENESS_REQUIRED
from server.vision.faces import Face, LivenessResult
from server.vision.pipeline import DetectOptions


@dataclass
class ProbeMatches:
    face: Face
    liveness: LivenessResult | None
    hits: list[Hit]


class SearchService:
    def __init__(self, identity, indexes: IndexRegistry, max_faces_per_subject: int):
        self.identity = identity
        self.pipeline = identity.pipeline
        self.store = identity.store
        self.indexes = indexes
        self.max_faces_per_subject = max_faces_per_subject

    def search(
        self,
        collection: str,
        img,
        opts: DetectOptions,
        top_k: int,
        min_similarity: float,
        *,
        all_faces: bool = False,
        skip_liveness: bool = False,
        liveness_threshold: float | None = None,
    ) -> list[ProbeMatches]:
        if skip_liveness:
            self.identity.allow_skip_liveness(collection)  # also COLLECTION_NOT_FOUND
        else:
            self.store.get_collection_policy(collection)
        index = self.indexes.get(collection)
        faces = self.pipeline.detect(img, opts)
        if not faces:
            raise errors.no_face()
        if not all_faces:
            faces = faces[:1]
        results = []
        for face in faces:
            live = None if skip_liveness else self.pipeline.check_liveness(img, face, liveness_threshold)
            if live is not None and not live.is_live and not all_faces:
                raise errors.spoof(live.score, live.threshold)
            results.append(ProbeMatches(face, live, []))
        searchable = [r for r in results if r.liveness is None or r.liveness.is_live]
        if searchable:
            for r, emb in zip(searchable, self.pipeline.embed([r.face for r in searchable])):
                r.hits = index.search(emb, top_k, min_similarity, self.max_faces_per_subject)
        return results

    def search_embedding(
        self, collection: str, embedding: np.ndarray, model: str, top_k: int, min_similarity: float, *, trusted: bool = True
    ) -> list[Hit]:
        """`trusted`: the caller may search without a photo (the admin key). An embedding carries no
        liveness evidence, so in a collection whose policy is REQUIRED an untrusted caller may not."""
        rec = self.pipeline.recognizer
        if model and model != rec.model_id:
            raise errors.validation(
                "model", f"embeddings of {errors.quote(model)} cannot be searched in an index of {rec.model_id!r}"
            )
        if embedding.shape != (rec.embedding_dim,):
            raise errors.validation("embedding", f"expected {rec.embedding_dim} values, got {embedding.size}")
        norm = float(np.linalg.norm(embedding))
        if not np.isfinite(norm) or norm < 1e-6:
            raise errors.validation("embedding", "must be finite and non-zero")
        policy = self.store.get_collection_policy(collection)  # COLLECTION_NOT_FOUND
        if policy == LIVENESS_REQUIRED and not trusted:
            raise errors.precondition(
                errors.LIVENESS_REQUIRED,
                f"collection {collection!r} requires liveness, and an embedding brings none: search with a photo (Search)",
                collection=collection,
            )
        return self.indexes.get(collection).search(embedding / norm, top_k, min_similarity, self.max_faces_per_subject)

    def stats(self, collection: str) -> dict:
        """The collection's index statistics (COLLECTION_NOT_FOUND first: nothing is loaded for a missing one)."""
        self.store.get_collection_policy(collection)
        return self.indexes.get(collection).stats()
