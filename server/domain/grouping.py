"""Clustering of unlabelled faces (Azure Face's Group): faces linked when their similarity reaches a
threshold, a group being a connected set of linked faces (single linkage).

At a 1:N threshold (a false match rate of about 1e-4 a pair) few impostor links exist to chain two
people together; scripts/eval_grouping.py measures purity and completeness on LFW (docs/search.md).
"""

from __future__ import annotations

import numpy as np

BLOCK = 1024  # rows of the similarity matrix computed at a time: memory stays O(BLOCK x faces)


def group(embeddings: np.ndarray, threshold: float) -> list[list[int]]:
    """Groups of row indices of `embeddings` (unit vectors), each in ascending order, largest group
    first (ties: by first member); a face linked to no other is a group of one."""
    n = len(embeddings)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    x = np.asarray(embeddings, dtype=np.float32)
    for start in range(0, n, BLOCK):
        sims = x[start : start + BLOCK] @ x.T
        rows, cols = np.nonzero(sims >= threshold)
        for i, j in zip((rows + start).tolist(), cols.tolist()):
            if j > i:
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))
