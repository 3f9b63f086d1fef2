"""What a collection's vector index must do: the whole contract between the service and an engine.

Two parts. A `FaceIndex` holds one collection's faces (add, apply, search,
stats); an `IndexEngine` makes them and, if the engine keeps nothing itself,
saves and loads them. The registry (registry.py) imports nothing else: an
engine is one more module (hnsw.py is the in-process hnswlib engine, each
replica holding its own graphs; milvus.py keeps one index for every replica
in Milvus and says so with `shared = True`), and the registry, the change log
and the RPCs stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Hit:
    """One subject found by a search: its best face and that face's cosine similarity."""

    face_id: str
    subject_id: str
    similarity: float


@dataclass(frozen=True)
class IndexStats:
    engine: str  # e.g. "hnsw"
    size: int  # searchable faces
    deleted: int  # faces removed but still taking room (reclaimed by a rebuild)
    dimension: int
    model: str
    memory_bytes: int  # estimate of what the index holds in this process
    capacity: int  # faces it has room for before it grows
    built_at: float  # unix time it was built or loaded
    loaded_from: str  # "database" or "snapshot"
    snapshot_at: float  # unix time of its last snapshot; 0 when none
    params: dict = field(default_factory=dict)  # the engine's own parameters, by name


class IndexLoadError(Exception):
    """A saved index that cannot be used (missing piece, corrupt, made for something else): rebuild it."""


class FaceIndex(Protocol):
    model_id: str
    dim: int
    loaded_from: str
    snapshot_at: float

    def __len__(self) -> int:
        """Searchable faces."""

    def add(self, face_ids: list[str], subject_ids: list[str], vectors: np.ndarray) -> None:
        """Bulk load (a build from the database); faces already present are left alone."""

    def apply(self, present: dict[str, tuple[str, np.ndarray]], absent: list[str], replace: set[str]) -> None:
        """Make the index agree with the database about these faces (idempotent; see HnswIndex.apply)."""

    def search(self, vector: np.ndarray, top_k: int, min_similarity: float, max_faces_per_subject: int) -> list[Hit]:
        """The best `top_k` subjects, one hit each (their best face), cosine >= min_similarity, best first."""

    def stats(self) -> IndexStats:
        """What GetIndexStats reports."""


class IndexEngine(Protocol):
    name: str
    saves_indexes: bool  # the registry loads and saves this engine's indexes (False: it keeps them itself, or saving is off)
    # the engine holds the indexes outside this process, shared by the replicas (each writes every change,
    # idempotently): load() attaches to what it holds (checked like a snapshot), a build writes into it
    shared: bool

    def create(self, collection: str, dim: int, model_id: str, expected_faces: int) -> FaceIndex:
        """An empty index for the collection with room for `expected_faces` (a build from the database
        knows how many). A shared engine empties what it held for the collection."""

    def first_batch(self, batch: int) -> int:
        """How many faces a build should read first (an engine may need a larger sample to fit on)."""

    def load(self, collection: str, expect: dict) -> tuple[FaceIndex, dict] | None:
        """The saved index and its metadata, None when there is none; IndexLoadError when it is unusable.
        `expect` holds what it must have been made for (model, dimension, collection_created_ms, ...).
        The metadata's change_seq is where the change log is replayed from (None: its recent rows)."""

    def save(self, collection: str, index: FaceIndex, meta: dict) -> None:
        """Save the index with `meta` (collection_created_ms, change_seq); OSError when it cannot."""

    def forget(self, collection: str) -> None:
        """Remove what was saved for the collection (it was deleted)."""
