"""Assigning the rows a clustering did not see: k nearest fitted rows through FAISS, then a vote.

The index holds the fitted sample (reference); the queries are every other row, searched in
chunks so memory stays bounded. "flat" is exact; "ivf" (inverted lists, `nlist` cells of which
`nprobe` are visited) trades a little recall for speed when the reference is large. FAISS runs on
the GPU only when CUDA is present.
"""

from __future__ import annotations

import numpy as np
import torch

from backdoor_engine.cluster.validation import feature_matrix, integer
from backdoor_engine.errors import InputError

INDEXES = ("auto", "flat", "ivf")
# "auto" builds an IVF index from this many reference rows on. Measured (benchmarks/RESULTS.md, issue 5): with
# 20k and 50k sample rows IVF gave the flat index's flags exactly, the 1.28M-row assignment in 13 s instead of 124 s.
IVF_MIN_REFERENCE = 20_000
QUERY_CHUNK = 65536


class ReferenceIndex:
    """A FAISS index over the reference rows [M, D]; `search(queries, k)` gives their indices."""

    def __init__(self, reference, *, index: str = "auto", nlist: int | None = None, nprobe: int = 16,
                 random_state: int | None = 42):
        import faiss

        data = np.ascontiguousarray(feature_matrix(reference))
        if index not in INDEXES:
            raise InputError(f"index must be one of {INDEXES}, got {index!r}")
        m, dimension = data.shape
        self.kind = ("ivf" if m >= IVF_MIN_REFERENCE else "flat") if index == "auto" else index
        self.size = m
        if self.kind == "flat":
            self._index = faiss.IndexFlatL2(dimension)
        else:
            # FAISS wants about 39 training points per cell; 4 sqrt(M) cells is its usual starting point.
            nlist = integer(nlist if nlist is not None else max(1, min(int(4 * np.sqrt(m)), m // 39)), "nlist", 1, m)
            quantizer = faiss.IndexFlatL2(dimension)
            self._index = faiss.IndexIVFFlat(quantizer, dimension, nlist)
            self._index.cp.seed = 1234 if random_state is None else int(random_state)
            self._index.train(data)
            self._index.nprobe = integer(nprobe, "nprobe", 1, nlist)
            self._quantizer = quantizer  # the IVF index refers to it; keep it alive
        if torch.cuda.is_available() and faiss.get_num_gpus() > 0:
            self._resources = faiss.StandardGpuResources()
            self._index = faiss.index_cpu_to_gpu(self._resources, 0, self._index)
        self._index.add(data)

    def search(self, queries, k: int) -> np.ndarray:
        """int64 [n, k]: the k nearest reference rows of each query, nearest first."""
        data = np.ascontiguousarray(feature_matrix(queries))
        k = integer(k, "k", 1, self.size)
        out = np.empty((len(data), k), np.int64)
        for start in range(0, len(data), QUERY_CHUNK):
            _, found = self._index.search(data[start:start + QUERY_CHUNK], k)
            out[start:start + QUERY_CHUNK] = found
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
