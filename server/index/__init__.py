"""Vector indexes for 1:N search: one per collection, rebuilt from the database (the source of truth)."""
from server.index.hnsw import HnswIndex, HnswParams
from server.index.registry import IndexRegistry

__all__ = ["HnswIndex", "HnswParams", "IndexRegistry"]
