"""Assigning the rows a clustering did not see: k nearest fitted rows through the kNN dispatch, then a vote.

The index holds the fitted sample (reference); the queries are every other row, searched in
chunks so memory stays bounded. "flat" is exact; "ivf" (inverted lists, `nlist` cells of which
`nprobe` are visited) trades a little recall for speed when the reference is large. The search
runs on the "knn_search" backend of `cluster.backends` (faiss, on the GPU when CUDA is present).
"""

from __future__ import annotations

import numpy as np

from backdoor_engine.cluster import backends
from backdoor_engine.cluster.validation import feature_matrix, integer
from backdoor_engine.errors import InputError

INDEXES = ("auto", "flat", "ivf")
# "auto" builds an IVF index from this many reference rows on. Measured (benchmarks/RESULTS.md, issue 5): with
# 20k and 50k sample rows IVF gave the flat index's flags exactly, the 1.28M-row assignment in 13 s instead of 124 s.
IVF_MIN_REFERENCE = 20_000


class ReferenceIndex:
    """An index over the reference rows [M, D]; `search(queries, k)` gives their indices."""

    def __init__(self, reference, *, index: str = "auto", nlist: int | None = None, nprobe: int = 16,
                 random_state: int | None = 42, backend: str = "auto"):
        if index not in INDEXES:
            raise InputError(f"index must be one of {INDEXES}, got {index!r}")
        runner = backends.choose("knn_search", backend)
        data = feature_matrix(reference)
        m = data.shape[0]
        self.kind = ("ivf" if m >= IVF_MIN_REFERENCE else "flat") if index == "auto" else index
        self.size = m
        self.backend = runner.name
        if self.kind == "ivf":
            # FAISS wants about 39 training points per cell; 4 sqrt(M) cells is its usual starting point.
            nlist = integer(nlist if nlist is not None else max(1, min(int(4 * np.sqrt(m)), m // 39)), "nlist", 1, m)
            nprobe = integer(nprobe, "nprobe", 1, nlist)
        seed = 1234 if random_state is None else int(random_state)
        self._index = runner(data, kind=self.kind, nlist=nlist, nprobe=nprobe, seed=seed)

    def search(self, queries, k: int) -> np.ndarray:
        """int64 [n, k]: the k nearest reference rows of each query, nearest first."""
        data = feature_matrix(queries)
        k = integer(k, "k", 1, self.size)
        out = self._index.search(data, k)
        if (out < 0).any():
            # IVF visiting too few cells can come back short; those slots repeat the nearest found.
            missing = out < 0
            out[missing] = np.broadcast_to(out[:, :1], out.shape)[missing]
            if (out < 0).any():
                raise InputError("the IVF search found no neighbour for some queries: raise nprobe")
        return out


def vote(neighbour_flags: np.ndarray) -> np.ndarray:
    """Share of flagged neighbours per row of a bool [n, k] matrix (float32)."""
    return np.asarray(neighbour_flags, dtype=np.float32).mean(axis=1)


def majority_label(neighbour_labels: np.ndarray) -> np.ndarray:
    """The most frequent label per row of an int [n, k] matrix of labels >= -1 (DBSCAN's noise, -1, is a label
    too); ties go to the lower label."""
    votes = np.asarray(neighbour_labels, dtype=np.int64) + 1
    counts = np.zeros((votes.shape[0], int(votes.max(initial=0)) + 1), np.int64)
    np.add.at(counts, (np.repeat(np.arange(votes.shape[0]), votes.shape[1]), votes.ravel()), 1)
    return counts.argmax(1) - 1
