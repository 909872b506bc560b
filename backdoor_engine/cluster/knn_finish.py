"""Turns any backend's candidate neighbour lists into the one kNN contract of `cluster.knn`.

Contract (umap-learn's own, so a graph can be handed to it as `precomputed_knn`): row i lists k
neighbours of sample i, sample i itself first at distance 0, then the others by increasing
euclidean distance, ties by index (which of several samples tied at the k-th distance are found
is the backend's choice).

Backends rank by the float32 expansion |x|^2 - 2 x.y + |y|^2 on centred data. Its error is about
eps * (|x|^2 + |y|^2), so a squared distance far below the squared norms (tight clusters, near
duplicates) comes out as noise; those pairs are recomputed from the rows of X. Recomputing every
pair instead costs a gather of N * k * D floats: measured 12 s next to a 34 s search at N=10000,
D=4800.
"""

import numpy as np

# Estimates above this fraction of |x|^2 + |y|^2 are kept: their relative error is about
# 2^-24 * 2^6 = 3.8e-6 times the matmul's (small) error growth; the tests hold distances to 1e-5.
_RECOMPUTE_BELOW = 2.0**-6
# Pairs recomputed per block: [pairs, D] float64 differences stay near 128 MiB.
_BLOCK_FLOATS = 16 * 1024 * 1024


def centred(X: np.ndarray) -> np.ndarray:
    """X minus its column means: distances are unchanged, and the |x|^2 terms of the matmul ranking
    shrink from the data's offset to its spread (features like log-likelihoods sit far from 0)."""
    return X - X.mean(axis=0, dtype=np.float64).astype(np.float32)


def finish_neighbours(
    X: np.ndarray, searched: np.ndarray, candidates: np.ndarray, squared_estimates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64 [N, k], distances float32 [N, k]) in the contract order.

    X: the caller's float32 [N, D] data; searched: `centred(X)`, which the backend searched;
    candidates: its neighbour indices [N, k], nearest first; squared_estimates: its squared
    distances for them. Recomputed pairs use X: centring in float32 rounds the differences.
    """
    indices = np.asarray(candidates, dtype=np.int64)
    squared = np.maximum(np.asarray(squared_estimates, dtype=np.float64), 0.0)
    indices, squared = _with_self(indices, squared)
    norms = np.einsum("ij,ij->i", searched, searched, dtype=np.float64)
    unreliable = squared <= _RECOMPUTE_BELOW * (norms[:, None] + norms[indices])
    rows, columns = np.nonzero(unreliable)
    block = max(1, _BLOCK_FLOATS // X.shape[1])
    for start in range(0, rows.size, block):
        r, c = rows[start : start + block], columns[start : start + block]
        difference = X[r].astype(np.float64) - X[indices[r, c]]
        squared[r, c] = np.einsum("ij,ij->i", difference, difference)
    own = indices == np.arange(indices.shape[0])[:, None]
    # Sort keys, last one primary: distance, then self before an exact duplicate, then index.
    order = np.lexsort((indices, ~own, squared), axis=1)
    distances = np.sqrt(np.take_along_axis(squared, order, axis=1)).astype(np.float32)
    return np.take_along_axis(indices, order, axis=1), distances


def _with_self(indices: np.ndarray, squared: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row holds its own index: with more than k exact duplicates a search may miss it."""
    rows = np.arange(indices.shape[0])
    missing = ~(indices == rows[:, None]).any(axis=1)
    if missing.any():
        indices, squared = indices.copy(), squared.copy()
        indices[missing, -1] = rows[missing]
        squared[missing, -1] = 0.0
    return indices, squared
