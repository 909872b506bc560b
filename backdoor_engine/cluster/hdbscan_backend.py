"""HDBSCAN on the CPU with the `hdbscan` library (the one the official FLARE code uses)."""

import numpy as np

from backdoor_engine.cluster.hdbscan_result import HDBSCANResult, result_from_clusterer


def hdbscan_library(X: np.ndarray, *, min_cluster_size: int, min_samples: int | None) -> HDBSCANResult:
    """Fit hdbscan.HDBSCAN with its defaults otherwise (euclidean, 'eom', as the official FLARE code)."""
    import hdbscan

    clusterer = hdbscan.HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples)
    clusterer.fit(X)
    return result_from_clusterer(clusterer, backend="hdbscan")
