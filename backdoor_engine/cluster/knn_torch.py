"""Exact kNN by blocked matmul + topk in torch (CPU, or the GPU when CUDA is present)."""

import numpy as np
import torch

from backdoor_engine.cluster.knn_finish import centred, finish_neighbours

# Query rows per block are chosen so that one [rows, N] block of squared distances stays near 256 MiB.
_BLOCK_FLOATS = 64 * 1024 * 1024


def knn_torch(X: np.ndarray, k: int, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest neighbours of every row of float32 X [N, D] among the rows of X (contract: knn_finish);
    device None: the GPU when CUDA is present, else the CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = centred(X)
    points = torch.from_numpy(data).to(device)
    squared_norms = (points * points).sum(dim=1)
    n = points.shape[0]
    candidates = np.empty((n, k), dtype=np.int64)
    estimates = np.empty((n, k), dtype=np.float32)
    rows = max(1, _BLOCK_FLOATS // n)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        # |y|^2 - 2 x.y ranks like |x - y|^2; |x|^2 is added back to the k survivors only.
        partial = torch.addmm(squared_norms[None, :], points[start:stop], points.T, beta=1.0, alpha=-2.0)
        nearest = torch.topk(partial, k, dim=1, largest=False)
        candidates[start:stop] = nearest.indices.cpu().numpy()
        estimates[start:stop] = (nearest.values + squared_norms[start:stop, None]).cpu().numpy()
    return finish_neighbours(X, data, candidates, estimates)
