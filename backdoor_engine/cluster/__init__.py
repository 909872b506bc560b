"""Clustering primitives, one dispatch point each (DESIGN.md section 5), and the condensed-tree logic.

    umap(X, ...)     backends "cuml" (GPU) | "umap-learn"
    hdbscan(X, ...)  backends "cuml" (GPU) | "hdbscan" (the library the official FLARE code uses)
    knn(X, k, ...)   backends "torch" (matmul + topk; on the GPU when CUDA is present) | "faiss" (flat L2)

backend="auto" takes the first available in that order; naming an unavailable backend raises
InputError saying why. cuML is imported only when CUDA is present, so the CPU path never loads a
GPU library; umap-learn and faiss are imported on first use (umap-learn JIT-compiles for ~30 s).
"""

import importlib.util

import numpy as np
import torch

from backdoor_engine.cluster.condensed_tree import (
    CondensedTree,
    Split,
    birth_lambda,
    cluster_children,
    cluster_stabilities,
    first_large_drop,
    lambda_gaps,
    lambda_range,
    largest_first_level_cluster,
    members,
    persistence,
)
from backdoor_engine.cluster.flat_cut import cut_single_linkage
from backdoor_engine.cluster.hdbscan_result import HDBSCANResult
from backdoor_engine.cluster.validation import feature_matrix, integer, real
from backdoor_engine.errors import InputError

__all__ = [
    "CondensedTree",
    "HDBSCANResult",
    "Split",
    "available_backends",
    "birth_lambda",
    "cluster_children",
    "cluster_stabilities",
    "cut_single_linkage",
    "first_large_drop",
    "hdbscan",
    "knn",
    "lambda_gaps",
    "lambda_range",
    "largest_first_level_cluster",
    "members",
    "persistence",
    "umap",
]

_BACKENDS = {
    "umap": ("cuml", "umap-learn"),
    "hdbscan": ("cuml", "hdbscan"),
    "knn": ("torch", "faiss"),
}


def available_backends() -> dict[str, list[str]]:
    """For each primitive, the backends this machine can run, in the order "auto" tries them."""
    return {primitive: [b for b in _preference(primitive) if _unavailable_reason(b) is None] for primitive in _BACKENDS}


def umap(
    X,
    *,
    n_neighbors: int = 40,
    min_dist: float = 0.0,
    n_components: int = 2,
    random_state: int | None = 42,
    backend: str = "auto",
    knn: tuple | None = None,
) -> np.ndarray:
    """float32 [N, n_components] UMAP embedding of X [N, D] (defaults: the official FLARE settings).

    knn: optional (indices, distances) [N, k >= n_neighbors] as `cluster.knn` returns them (self
    first); the first n_neighbors columns replace UMAP's own neighbour search. random_state makes a
    run repeatable on one backend (umap-learn then runs single-threaded); None lets it run parallel.
    """
    data = feature_matrix(X)
    if data.shape[0] < 3:
        raise InputError(f"umap needs at least 3 samples, got {data.shape[0]}")
    n_neighbors = integer(n_neighbors, "n_neighbors", 2, data.shape[0] - 1)
    min_dist = real(min_dist, "min_dist", minimum=0.0)
    n_components = integer(n_components, "n_components", 1, data.shape[0] - 2)
    if random_state is not None:
        random_state = integer(random_state, "random_state", 0, 2**32 - 1)
    graph = None if knn is None else _checked_knn(knn, data.shape[0], n_neighbors)
    chosen = _choose("umap", backend)
    if chosen == "cuml":
        from backdoor_engine.cluster.cuml_backend import umap_cuml as fit
    else:
        from backdoor_engine.cluster.umap_learn_backend import umap_learn as fit
    return fit(
        data,
        n_neighbors=n_neighbors,
        min_dist=min_dist,
        n_components=n_components,
        random_state=random_state,
        knn=graph,
    )


def hdbscan(X, *, min_cluster_size: int = 100, min_samples: int | None = None, backend: str = "auto") -> HDBSCANResult:
    """HDBSCAN of X [N, D] (euclidean, excess-of-mass; defaults: the official FLARE settings).

    min_samples None means min_cluster_size, as in both libraries. Labels, the condensed tree and
    the single-linkage tree come back as plain arrays (HDBSCANResult).
    """
    data = feature_matrix(X)
    n = data.shape[0]
    if n < 2:
        raise InputError(f"hdbscan needs at least 2 samples, got {n}")
    min_cluster_size = integer(min_cluster_size, "min_cluster_size", 2)
    if min_cluster_size > n:
        raise InputError(f"min_cluster_size={min_cluster_size} exceeds the number of samples ({n})")
    if min_samples is not None:
        min_samples = integer(min_samples, "min_samples", 1, n)
    chosen = _choose("hdbscan", backend)
    if chosen == "cuml":
        from backdoor_engine.cluster.cuml_backend import hdbscan_cuml

        return hdbscan_cuml(data, min_cluster_size=min_cluster_size, min_samples=min_samples)
    from backdoor_engine.cluster.hdbscan_backend import hdbscan_library

    return hdbscan_library(data, min_cluster_size=min_cluster_size, min_samples=min_samples)


def knn(X, k: int, *, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact euclidean k nearest neighbours of every row of X [N, D] among the rows of X.

    Returns (indices int64 [N, k], distances float32 [N, k]); row i starts with i itself at
    distance 0 (umap-learn's convention, so knn(X, n_neighbors) can feed `umap(..., knn=...)`),
    then the others by increasing distance, ties by index (among several samples tied at the k-th
    distance, which are found is up to the backend). "auto": torch on a GPU; on the CPU faiss,
    torch when faiss is absent. Measured on the 2-core test machine, k=40, faiss vs torch:
    N=20000 D=20 3.3 s vs 3.5 s, D=500 9.1 s vs 10.3 s; N=10000 D=4800 17.5 s vs 19.3 s.
    """
    data = feature_matrix(X)
    k = integer(k, "k", 1, data.shape[0])
    if _choose("knn", backend) == "torch":
        from backdoor_engine.cluster.knn_torch import knn_torch

        return knn_torch(data, k, device="cuda" if torch.cuda.is_available() else "cpu")
    from backdoor_engine.cluster.knn_faiss import knn_faiss

    return knn_faiss(data, k)


def _choose(primitive: str, backend: str) -> str:
    names = _BACKENDS[primitive]
    if backend == "auto":
        for name in _preference(primitive):
            if _unavailable_reason(name) is None:
                return name
        raise InputError(f"no {primitive} backend is available: " + "; ".join(_unavailable_reason(n) for n in names))
    if backend not in names:
        raise InputError(f"{primitive} backend must be 'auto' or one of {names}, got {backend!r}")
    reason = _unavailable_reason(backend)
    if reason is not None:
        raise InputError(f"{primitive} backend {backend!r} is unavailable: {reason}")
    return backend


def _preference(primitive: str) -> tuple[str, ...]:
    """The order backend="auto" tries: GPU first; knn on the CPU faiss first (measured, see knn)."""
    if primitive == "knn" and not torch.cuda.is_available():
        return ("faiss", "torch")
    return _BACKENDS[primitive]


def _unavailable_reason(backend: str) -> str | None:
    """Why backend cannot run here, or None. Looks modules up without importing them."""
    module = {"cuml": "cuml", "umap-learn": "umap", "hdbscan": "hdbscan", "faiss": "faiss", "torch": "torch"}[backend]
    if backend == "cuml" and not torch.cuda.is_available():
        return "cuml needs CUDA, which is not available on this machine"
    if importlib.util.find_spec(module) is None:
        return f"{backend} needs the Python module {module!r}, which is not installed"
    return None


def _checked_knn(knn, n: int, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices int64, distances float32), both [n, n_neighbors], from a caller's kNN graph."""
    if not isinstance(knn, (tuple, list)) or len(knn) != 2:
        raise InputError("knn must be a pair (indices, distances) as cluster.knn returns it")
    indices, distances = np.asarray(knn[0]), np.asarray(knn[1])
    if indices.shape != distances.shape or indices.ndim != 2 or indices.shape[0] != n:
        raise InputError(
            f"knn indices and distances must both have shape [{n}, k], got {indices.shape} and {distances.shape}"
        )
    if indices.shape[1] < n_neighbors:
        raise InputError(f"knn has {indices.shape[1]} neighbours per sample, fewer than n_neighbors={n_neighbors}")
    if not np.issubdtype(indices.dtype, np.integer) or indices.min() < 0 or indices.max() >= n:
        raise InputError(f"knn indices must be integers in [0, {n}), got dtype {indices.dtype}")
    if not np.isfinite(distances).all() or (distances < 0).any():
        raise InputError("knn distances must be finite and >= 0")
    if not (indices[:, 0] == np.arange(n)).all():
        raise InputError("knn rows must start with the sample itself, as cluster.knn returns them")
    return (
        np.ascontiguousarray(indices[:, :n_neighbors], dtype=np.int64),
        np.ascontiguousarray(distances[:, :n_neighbors], dtype=np.float32),
    )
