"""DBSCAN on the CPU with scikit-learn."""

import numpy as np


def dbscan_sklearn(X: np.ndarray, *, eps: float, min_samples: int) -> np.ndarray:
    """int64 [N] labels, -1 for noise (euclidean; neighbour search by tree or brute force: library default)."""
    from sklearn.cluster import DBSCAN

    return np.asarray(DBSCAN(eps=eps, min_samples=min_samples).fit_predict(X), dtype=np.int64)
