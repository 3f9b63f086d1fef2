"""Vector indexes for 1:N search: one per collection, a cache of the database (the source of truth).

base.py is the contract (FaceIndex, IndexEngine, Hit, IndexStats); hnsw.py the in-process engine;
registry.py keeps one index per collection; sync.py follows the change log; snapshot.py saves hnsw graphs.
"""

from server.index.base import FaceIndex, Hit, IndexEngine, IndexStats
from server.index.hnsw import HnswEngine, HnswIndex, HnswParams
from server.index.registry import IndexRegistry

__all__ = ["FaceIndex", "Hit", "IndexEngine", "IndexStats", "HnswEngine", "HnswIndex", "HnswParams", "IndexRegistry"]
