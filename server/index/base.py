"""What a collection's vector index must do: the whole contract between the service and an engine.

HnswIndex (in-process hnswlib) is the one implementation here. A distributed
engine (Milvus, Qdrant; see the README's "Past one machine") would be one more
class with these five methods; the registry, the change log and the RPCs stay
as they are.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from server.index.hnsw import Hit


class FaceIndex(Protocol):
    model_id: str
    dim: int

    def __len__(self) -> int:
        """Searchable faces."""

    def add(self, face_ids: list[str], subject_ids: list[str], vectors: np.ndarray) -> None:
        """Bulk load (a build from the database); faces already present are left alone."""

    def apply(self, present: dict[str, tuple[str, np.ndarray]], absent: list[str], replace: set[str]) -> None:
        """Make the index agree with the database about these faces (idempotent; see HnswIndex.apply)."""

    def search(self, vector: np.ndarray, top_k: int, min_similarity: float, max_faces_per_subject: int) -> list[Hit]:
        """The best `top_k` subjects, one hit each (their best face), cosine >= min_similarity, best first."""

    def stats(self) -> dict:
        """size, deleted, dimension, model, memory_bytes, built_at, loaded_from, snapshot_at (+ engine parameters)."""
