"""Clustering of unlabelled faces (Azure Face's Group): faces linked when their similarity reaches a
threshold, a group being a connected set of linked faces (single linkage).

At a 1:N threshold (a false match rate of about 1e-4 a pair) few impostor links exist to chain two
people together; scripts/eval_grouping.py measures purity and completeness on LFW (docs/search.md).
"""

from __future__ import annotations

import numpy as np

# Rows of the similarity matrix computed at a time: memory stays O(BLOCK x faces), and so do the
# index arrays of a block's links, which for faces that all resemble each other hold every pair.
BLOCK = 512


def group(embeddings: np.ndarray, threshold: float) -> list[list[int]]:
    """Groups of row indices of `embeddings` (unit vectors), each in ascending order, largest group
    first (ties: by first member); a face linked to no other is a group of one.

    The links are joined in numpy, not one by one: faces that all resemble each other (one person's
    many photos) link every pair, n^2 / 2 links, and a Python loop over them cost many times the
    similarities themselves, for a request of a few bytes. Each round hooks the root of every link
    whose ends are still apart onto the smallest root it links to (a pointer always goes to a smaller
    index, so no cycles form), then points every face at its root; taking the smallest, not any,
    merges a whole star of links in one round."""
    n = len(embeddings)
    x = np.asarray(embeddings, dtype=np.float32)
    parent = np.arange(n)
    for start in range(0, n, BLOCK):
        sims = x[start : start + BLOCK] @ x[start:].T  # each pair once: the block's rows against the columns from them on
        rows, cols = np.nonzero(sims >= threshold)
        later = cols > rows
        a, b = rows[later] + start, cols[later] + start
        while a.size:
            parent = _roots(parent)
            ra, rb = parent[a], parent[b]
            apart = ra != rb
            a, b, ra, rb = a[apart], b[apart], ra[apart], rb[apart]
            np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(_roots(parent).tolist()):
        groups.setdefault(r, []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def _roots(parent: np.ndarray) -> np.ndarray:
    """Every face pointed straight at its root (pointer jumping: the path halves each step)."""
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return parent
        parent = up
