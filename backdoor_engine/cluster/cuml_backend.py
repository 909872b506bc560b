"""UMAP and HDBSCAN on the GPU with cuML; imported by the registry only when CUDA is present."""

import numpy as np

from backdoor_engine.cluster.hdbscan_result import HDBSCANResult, result_from_clusterer


def umap_cuml(
    X: np.ndarray,
    *,
    n_neighbors: int,
    min_dist: float,
    n_components: int,
    random_state: int | None,
    knn: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """float32 [N, n_components] embedding; knn: checked (indices, distances) [N, n_neighbors], self first."""
    from cuml.manifold import UMAP

    model = UMAP(
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        n_components=n_components,
        random_state=random_state,
        precomputed_knn=knn,
        output_type="numpy",
    )
    return np.ascontiguousarray(model.fit_transform(X), dtype=np.float32)


def hdbscan_cuml(X: np.ndarray, *, min_cluster_size: int, min_samples: int | None) -> HDBSCANResult:
    """cuML HDBSCAN; its condensed and single-linkage trees come in the `hdbscan` library's classes."""
    from cuml.cluster import HDBSCAN

    clusterer = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, output_type="numpy")
    clusterer.fit(X)
    return result_from_clusterer(clusterer, backend="cuml")
