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


def unit_embedding(embedding: np.ndarray, dim: int, field: str = "embedding") -> np.ndarray:
    """A caller's embedding, checked (dimension, finite, non-zero) and scaled to length 1."""
    if embedding.shape != (dim,):
        raise errors.validation(field, f"expected {dim} values, got {embedding.size}")
    norm = float(np.linalg.norm(embedding))
    if not np.isfinite(norm) or norm < 1e-6:
        raise errors.validation(field, "must be finite and non-zero")
    return embedding / norm


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
        c = self.store.get_collection_settings(collection)  # COLLECTION_NOT_FOUND
        if skip_liveness:
            self.identity.allow_skip_liveness(collection, c.liveness_policy)
        index = self.indexes.get(collection, c.created_ms)  # not an earlier collection's of this id
        faces = self.pipeline.detect(img, opts)
        if not faces:
            raise errors.no_face()
        if not all_faces:
            faces = faces[:1]
        results = []
        for face in faces:
            if skip_liveness:
                live = None
            elif all_faces:  # each face's verdict, or why it cannot be judged, comes back with it
                live = self.pipeline.check_liveness(img, face, liveness_threshold)
            else:  # one face: refused as Verify refuses it (a spoof, or a photo liveness cannot judge)
                live = self.pipeline.require_live(img, face, liveness_threshold)
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
        probe = unit_embedding(embedding, rec.embedding_dim)
        c = self.store.get_collection_settings(collection)  # COLLECTION_NOT_FOUND
        if c.liveness_policy == LIVENESS_REQUIRED and not trusted:
            raise errors.precondition(
                errors.LIVENESS_REQUIRED,
                f"collection {collection!r} requires liveness, and an embedding brings none: search with a photo (Search)",
                collection=collection,
            )
        return self.indexes.get(collection, c.created_ms).search(probe, top_k, min_similarity, self.max_faces_per_subject)

    def find_similar(self, collection: str, face_id: str, top_k: int, min_similarity: float) -> tuple[str, list[Hit]]:
        """(the face's subject, the other subjects most like the stored face): a search with the face as
        the probe, its own subject left out (it would be the first hit, at similarity 1)."""
        face = self.store.get_face(collection, face_id)  # FACE_NOT_FOUND
        model = self.pipeline.recognizer.model_id
        if face.model_id != model:
            raise errors.precondition(
                errors.NO_COMPARABLE_FACES,
                f"face {face_id!r} was embedded by {face.model_id}, the index holds {model}; re-embed it (facesvc-reembed)",
                model=model,
            )
        index = self.indexes.get(collection, self.store.collection_created_ms(collection))  # not an earlier collection's
        hits = index.search(face.embedding, top_k + 1, min_similarity, self.max_faces_per_subject)
        return face.subject_id, [h for h in hits if h.subject_id != face.subject_id][:top_k]

    def stored_faces(self, collection: str, face_ids: list[str], limit: int) -> list:
        """Stored faces of the current recognizer, with embeddings, to group: the listed ones (each must
        exist: FACE_NOT_FOUND), or all of them when there are at most `limit` (VALIDATION_FAILED beyond)."""
        model = self.pipeline.recognizer.model_id
        faces = self.store.face_embeddings(collection, face_ids, model, len(face_ids) if face_ids else limit + 1)
        if face_ids:
            missing = set(face_ids) - {f.face_id for f in faces}
            if missing:
                first = sorted(missing)[0]
                raise errors.not_found(
                    errors.FACE_NOT_FOUND,
                    f"face {first!r} does not exist in {collection!r} (or was embedded by another recognizer than {model})",
                    face_id=first,
                )
        elif len(faces) > limit:
            raise errors.validation(
                "face_ids",
                f"the collection holds more than {limit} faces (max_group_faces): list the faces to group",
                limit=limit,
            )
        return faces

    def stats(self, collection: str) -> dict:
        """The collection's index statistics (COLLECTION_NOT_FOUND first: nothing is loaded for a missing one)."""
        created = self.store.get_collection_settings(collection).created_ms  # COLLECTION_NOT_FOUND
        # never an earlier collection's index of this id (created anew on another replica)
        return self.indexes.get(collection, created).stats()
