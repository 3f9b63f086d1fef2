"""Vector indexes for 1:N search: one per collection, a cache of the database (the source of truth)."""
from server.index.base import FaceIndex
from server.index.hnsw import HnswIndex, HnswParams
from server.index.registry import IndexRegistry

__all__ = ["FaceIndex", "HnswIndex", "HnswParams", "IndexRegistry"]
