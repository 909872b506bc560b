"""UMAP on the CPU with umap-learn (imported on first use: importing it JIT-compiles with numba)."""

import warnings

import numpy as np


def umap_learn(
    X: np.ndarray,
    *,
    n_neighbors: int,
    min_dist: float,
    n_components: int,
    random_state: int | None,
    knn: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """float32 [N, n_components] embedding of float32 X [N, D]; knn: checked (indices, distances) [N, n_neighbors]."""
    import umap

    precomputed = (None, None, None) if knn is None else knn
    model = umap.UMAP(
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        n_components=n_components,
        random_state=random_state,
        precomputed_knn=precomputed,
    )
    with warnings.catch_warnings():
        # A seed forces one thread (the price of a repeatable run), and without a search index
        # umap-learn cannot transform new points: both expected here, neither worth a warning.
        warnings.filterwarnings("ignore", message="n_jobs value .* overridden to 1", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
        embedding = model.fit_transform(X)
    return np.ascontiguousarray(embedding, dtype=np.float32)
