"""UMAP, HDBSCAN, t-SNE and DBSCAN on the GPU with cuML; loaded by the backend table only when CUDA is present.

Data in and out goes through `to_device` and `to_host`: a CUDA torch tensor reaches cuML through
DLPack without a copy, and whatever cuML returns comes back as a numpy array.
"""

import numpy as np
import torch

from backdoor_engine.cluster.hdbscan_result import HDBSCANResult, result_from_clusterer
from backdoor_engine.errors import InputError


def to_device(X):
    """X as a cupy array: a torch tensor (on the GPU) shared through DLPack, anything else copied."""
    import cupy

    return cupy.from_dlpack(X) if isinstance(X, torch.Tensor) else cupy.asarray(X)


def to_host(result, dtype) -> np.ndarray:
    """A cuML output (numpy or cupy) as a C-contiguous numpy array of `dtype`."""
    import cupy

    return np.ascontiguousarray(cupy.asnumpy(result), dtype=dtype)


def umap_cuml(
    X,
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
    return to_host(model.fit_transform(to_device(X)), np.float32)


def hdbscan_cuml(X, *, min_cluster_size: int, min_samples: int | None) -> HDBSCANResult:
    """cuML HDBSCAN; its condensed and single-linkage trees come in the `hdbscan` library's classes."""
    from cuml.cluster import HDBSCAN

    clusterer = HDBSCAN(min_cluster_size=min_cluster_size, min_samples=min_samples, output_type="numpy")
    clusterer.fit(to_device(X))
    return result_from_clusterer(clusterer, backend="cuml")


def tsne_cuml(X, *, n_components: int, perplexity: float, random_state: int | None,
              exaggeration_iter: int | None = None, n_iter: int | None = None) -> np.ndarray:
    """float32 [N, 2] embedding with cuML's TSNE, its defaults otherwise (FFT gradient, 250 exaggerated of
    1000 iterations); the schedule as cluster.tsne gives it (exaggerated, then the rest)."""
    if n_components != 2:
        raise InputError(f"cuml's TSNE embeds in 2 dimensions only, got n_components={n_components}: "
                         "use backend='opentsne'")
    from cuml.manifold import TSNE

    schedule = {}
    if exaggeration_iter is not None or n_iter is not None:
        exaggerated = 250 if exaggeration_iter is None else exaggeration_iter
        schedule = {"exaggeration_iter": exaggerated, "max_iter": exaggerated + (750 if n_iter is None else n_iter)}
    model = TSNE(n_components=n_components, perplexity=perplexity, random_state=random_state, output_type="numpy",
                 **schedule)
    return to_host(model.fit_transform(to_device(X)), np.float32)


def dbscan_cuml(X, *, eps: float, min_samples: int) -> np.ndarray:
    """int64 [N] labels, -1 for noise, with cuML's DBSCAN (euclidean, brute-force neighbours: library default)."""
    from cuml.cluster import DBSCAN

    model = DBSCAN(eps=eps, min_samples=min_samples, output_type="numpy")
    return to_host(model.fit_predict(to_device(X)), np.int64)
