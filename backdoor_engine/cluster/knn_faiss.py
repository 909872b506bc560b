"""Exact kNN with a faiss flat L2 index (faiss-cpu; a faiss GPU build is used only when CUDA is present)."""

import numpy as np
import torch

from backdoor_engine.cluster.knn_finish import centred, finish_neighbours


def knn_faiss(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every row of float32 X [N, D] among the rows of X (contract: knn_finish)."""
    import faiss

    data = np.ascontiguousarray(centred(X))
    index = faiss.IndexFlatL2(data.shape[1])
    if torch.cuda.is_available() and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()  # held until the search is done
        index = faiss.index_cpu_to_gpu(resources, 0, index)
    index.add(data)
    squared_estimates, candidates = index.search(data, k)
    return finish_neighbours(X, data, candidates, squared_estimates)
