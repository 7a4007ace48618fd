"""Clusters of near-duplicates: exact Jaccard of candidate pairs, connected components, keep rule.

The second half of MinHash dedup (``corpus/minhash.py`` makes the candidate pairs). All of it is
vectorised NumPy over arrays of row numbers, and every result depends only on the pairs and the
row numbers -- never on the order the pairs arrive in -- so a build gives the same clusters
whatever its batching or number of workers.
"""

from __future__ import annotations

import numpy as np


def _gather(offsets: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions of the items of sets ``which``, back to concatenated, which entry each came from, sizes)."""
    sizes = offsets[which + 1] - offsets[which]
    entry = np.repeat(np.arange(len(which)), sizes)
    before = np.zeros(len(which), np.int64)
    np.cumsum(sizes[:-1], out=before[1:])
    positions = np.repeat(offsets[which] - before, sizes) + np.arange(int(sizes.sum()))
    return positions, entry, sizes


def pair_jaccard(values: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity of sets ``a[i]`` and ``b[i]``, for fewer than 2**16 pairs.

    ``values[offsets[k]:offsets[k+1]]`` are set ``k``'s distinct items, each below 2**48. Every
    item of both sides of pair ``i`` becomes ``i << 48 | item``; after one sort, an item present
    in both sets of a pair shows up twice in a row, so intersections are counts of equal
    neighbours -- one sort for all pairs at once.
    """
    if len(a) == 0:
        return np.zeros(0)
    if len(a) > 1 << 16:
        raise ValueError(f"pair_jaccard takes at most {1 << 16} pairs at a time, got {len(a)}")
    pos_a, pair_a, size_a = _gather(offsets, a)
    pos_b, pair_b, size_b = _gather(offsets, b)
    pair = np.concatenate([pair_a, pair_b]).astype(np.uint64)
    keys = np.sort((pair << np.uint64(48)) | np.concatenate([values[pos_a], values[pos_b]]))
    both = keys[1:][keys[1:] == keys[:-1]]
    inter = np.bincount((both >> np.uint64(48)).astype(np.int64), minlength=len(a))
    union = size_a + size_b - inter
    return np.divide(inter, union, out=np.zeros(len(a)), where=union > 0)


def connected_components(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(every row in some pair, ascending; the lowest row of its component).

    A union-find run in lock-step over all pairs: each round hooks the larger of two differing
    roots under the smaller one, then compresses paths by pointer jumping. Roots only ever move
    to smaller rows, so the root of a component is its lowest row whatever the pair order.
    """
    if len(u) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes = np.unique(np.concatenate([u, v]))
    iu, iv = np.searchsorted(nodes, u), np.searchsorted(nodes, v)
    label = np.arange(len(nodes))
    while True:
        lu, lv = label[iu], label[iv]
        differ = lu != lv
        if not differ.any():
            break
        np.minimum.at(label, np.maximum(lu, lv)[differ], np.minimum(lu, lv)[differ])
        while True:
            jumped = label[label]
            if np.array_equal(jumped, label):
                break
            label = jumped
    return nodes, nodes[label]


def keep_one_per_cluster(
    members: np.ndarray, root: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(removed rows ascending, the kept row of each one's cluster).

    Without ``weights`` (one per member) the lowest row (first seen) stays; with them, the row
    with the largest weight (the longest document, the best score), ties going to the lowest row.
    """
    if weights is None:
        kept_of = root
    else:
        weight = np.asarray(weights, dtype=np.float64)
        order = np.lexsort((members, -weight, root))
        sorted_root = root[order]
        first = np.r_[True, sorted_root[1:] != sorted_root[:-1]]
        # Groups come out in ascending root order, the order np.unique numbers them in.
        _, inverse = np.unique(root, return_inverse=True)
        kept_of = members[order][first][inverse]
    removed = members != kept_of
    return members[removed], kept_of[removed]
