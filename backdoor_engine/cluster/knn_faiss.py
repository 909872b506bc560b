"""kNN with faiss (faiss-cpu; a faiss GPU build is used only when CUDA is present): exact self-kNN
with a flat L2 index, and searches of queries against a reference set with a flat or IVF index."""

import numpy as np
import torch

from backdoor_engine.cluster.knn_finish import centred, finish_neighbours

# Queries searched per call, so memory for the results stays bounded on any number of queries.
QUERY_CHUNK = 65536


def knn_faiss(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every row of float32 X [N, D] among the rows of X (contract: knn_finish)."""
    import faiss

    data = np.ascontiguousarray(centred(X))
    index, _resources = _on_gpu(faiss, faiss.IndexFlatL2(data.shape[1]))  # resources held until the search is done
    index.add(data)
    squared_estimates, candidates = index.search(data, k)
    return finish_neighbours(X, data, candidates, squared_estimates)


class FaissReference:
    """A faiss index over float32 reference rows [M, D]: kind "flat" (exact) or "ivf" (nlist cells,
    nprobe of them visited per query, k-means seeded by `seed`)."""

    def __init__(self, data: np.ndarray, *, kind: str, nlist: int, nprobe: int, seed: int):
        import faiss

        dimension = data.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatL2(dimension)
        else:
            self._quantizer = faiss.IndexFlatL2(dimension)  # the IVF index refers to it; keep it alive
            index = faiss.IndexIVFFlat(self._quantizer, dimension, nlist)
            index.cp.seed = seed
            index.train(data)
            index.nprobe = nprobe
        self._index, self._resources = _on_gpu(faiss, index)
        self._index.add(data)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """int64 [n, k]: the k nearest reference rows of each float32 query, nearest first; -1 where
        an IVF search found fewer than k."""
        out = np.empty((len(queries), k), np.int64)
        for start in range(0, len(queries), QUERY_CHUNK):
            _, out[start:start + QUERY_CHUNK] = self._index.search(queries[start:start + QUERY_CHUNK], k)
        return out


def _on_gpu(faiss, index):
    """(index, resources): moved to GPU 0 when CUDA and a faiss GPU build are present; the resources
    (None on the CPU) must live as long as the index."""
    if torch.cuda.is_available() and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), resources
    return index, None
