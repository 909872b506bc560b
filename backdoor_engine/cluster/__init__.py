"""Clustering primitives, one dispatch point each (DESIGN.md section 5), and the condensed-tree logic.

    primitive                      backends, in the order backend="auto" tries them
    umap(X, ...)                   "cuml" (GPU) | "umap-learn"
    hdbscan(X, ...)                "cuml" (GPU) | "hdbscan" (the library the official FLARE code uses)
    tsne(X, ...)                   "cuml" (GPU) | "opentsne"
    dbscan(X, eps, ...)            "cuml" (GPU) | "sklearn" (scikit-learn)
    knn(X, k)                      "torch" (matmul + topk, on the GPU when present) | "faiss" (flat L2);
                                   on the CPU faiss first
    knn_search(ref, queries, k)    "faiss" (flat or IVF index, on the GPU with a faiss GPU build)

The table itself, with each backend's module and function, is `backends.TABLE`. "auto" takes the
first backend that can run here; naming one that cannot raises InputError saying why. Every
backend's library is imported on its first call, never before: cuML and cupy only when CUDA is
present, so the CPU path never loads a GPU library; umap-learn JIT-compiles for ~30 s on import.
The cuML backends take a CUDA torch tensor where it is (DLPack); all results come back as numpy.
"""

import numpy as np

from backdoor_engine.cluster.assign import ReferenceIndex
from backdoor_engine.cluster.backends import available_backends, choose
from backdoor_engine.cluster.condensed_tree import (
    CondensedTree,
    Split,
    all_members,
    birth_lambda,
    cluster_children,
    cluster_stabilities,
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
    "ReferenceIndex",
    "Split",
    "available_backends",
    "birth_lambda",
    "cluster_children",
    "cluster_stabilities",
    "cut_single_linkage",
    "dbscan",
    "hdbscan",
    "knn",
    "knn_search",
    "lambda_gaps",
    "lambda_range",
    "largest_first_level_cluster",
    "all_members",
    "members",
    "persistence",
    "tsne",
    "umap",
]


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
    runner = choose("umap", backend)
    data = runner.matrix(X)
    if data.shape[0] < 3:
        raise InputError(f"umap needs at least 3 samples, got {data.shape[0]}")
    n_neighbors = integer(n_neighbors, "n_neighbors", 2, data.shape[0] - 1)
    min_dist = real(min_dist, "min_dist", minimum=0.0)
    n_components = integer(n_components, "n_components", 1, data.shape[0] - 2)
    graph = None if knn is None else _checked_knn(knn, data.shape[0], n_neighbors)
    return runner(data, n_neighbors=n_neighbors, min_dist=min_dist, n_components=n_components,
                  random_state=_seed(random_state), knn=graph)


def hdbscan(X, *, min_cluster_size: int = 100, min_samples: int | None = None, backend: str = "auto") -> HDBSCANResult:
    """HDBSCAN of X [N, D] (euclidean, excess-of-mass; defaults: the official FLARE settings).

    min_samples None means min_cluster_size, as in both libraries. Labels, the condensed tree and
    the single-linkage tree come back as plain arrays (HDBSCANResult).
    """
    runner = choose("hdbscan", backend)
    data = runner.matrix(X)
    n = data.shape[0]
    if n < 2:
        raise InputError(f"hdbscan needs at least 2 samples, got {n}")
    min_cluster_size = integer(min_cluster_size, "min_cluster_size", 2)
    if min_cluster_size > n:
        raise InputError(f"min_cluster_size={min_cluster_size} exceeds the number of samples ({n})")
    if min_samples is not None:
        min_samples = integer(min_samples, "min_samples", 1, n)
    return runner(data, min_cluster_size=min_cluster_size, min_samples=min_samples)


def tsne(
    X, *, n_components: int = 2, perplexity: float = 30.0, random_state: int | None = None, backend: str = "auto",
    init: np.ndarray | None = None, exaggeration_iter: int | None = None, n_iter: int | None = None,
) -> np.ndarray:
    """float32 [N, n_components] t-SNE embedding of X [N, D] (euclidean; perplexity 30: both libraries' default).

    Each sample's neighbourhood holds 3 x perplexity others, so N must exceed that. n_components is
    1 or 2: openTSNE's FFT gradient (its choice from 10k samples on) takes no more, cuML only 2.
    random_state fixes the initialisation; the parallel optimisation of either library can still
    vary in the last digits between runs.

    The schedule, each None for the library's default: `exaggeration_iter` iterations with early
    exaggeration, then `n_iter` without (openTSNE 250 + 500, cuML 250 + 750). `init` [N, n_components]:
    start from this embedding (e.g. an earlier fit of nearly the same data, to continue from it with a
    short schedule and no exaggeration); openTSNE only, cuML starts from random or PCA positions.
    """
    runner = choose("tsne", backend)
    data = runner.matrix(X)
    n = data.shape[0]
    perplexity = real(perplexity, "perplexity")
    if not 0 < perplexity:
        raise InputError(f"perplexity must be > 0, got {perplexity}")
    if int(3 * perplexity) > n - 1:
        raise InputError(f"perplexity={perplexity} needs more than 3 x perplexity = {int(3 * perplexity)} samples, "
                         f"got {n}")
    n_components = integer(n_components, "n_components", 1, 2)
    schedule = {}
    if exaggeration_iter is not None:
        schedule["exaggeration_iter"] = integer(exaggeration_iter, "exaggeration_iter", 0)
    if n_iter is not None:
        schedule["n_iter"] = integer(n_iter, "n_iter", 1)
    if init is not None:
        init = np.ascontiguousarray(init, dtype=np.float32)
        if init.shape != (n, n_components) or not np.isfinite(init).all():
            raise InputError(f"init must be a finite [{n}, {n_components}] embedding, got shape {init.shape}")
        if runner.name == "cuml":
            raise InputError("cuml's TSNE starts from random or PCA positions only, not from a given embedding: "
                             "use backend='opentsne' to start from one")
        schedule["init"] = init
    return runner(data, n_components=n_components, perplexity=perplexity, random_state=_seed(random_state),
                  **schedule)


def dbscan(X, *, eps: float, min_samples: int = 5, backend: str = "auto") -> np.ndarray:
    """int64 [N] DBSCAN labels of X [N, D], -1 for noise (euclidean; min_samples 5: both libraries' default).

    A sample with at least min_samples samples (itself included) within eps is a core sample;
    clusters are the core samples linked within eps and the samples within eps of them. Clusters are
    numbered in the order of their first sample, whatever the backend; a border sample within eps of
    two clusters joins either (the backend's choice).
    """
    runner = choose("dbscan", backend)
    data = runner.matrix(X)
    eps = real(eps, "eps")
    if not 0 < eps < np.inf:
        raise InputError(f"eps must be a finite number > 0, got {eps}")
    min_samples = integer(min_samples, "min_samples", 1)
    return _numbered_by_first_sample(runner(data, eps=eps, min_samples=min_samples))


def knn(X, k: int, *, backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact euclidean k nearest neighbours of every row of X [N, D] among the rows of X.

    Returns (indices int64 [N, k], distances float32 [N, k]); row i starts with i itself at
    distance 0 (umap-learn's convention, so knn(X, n_neighbors) can feed `umap(..., knn=...)`),
    then the others by increasing distance, ties by index (among several samples tied at the k-th
    distance, which are found is up to the backend). "auto": torch on a GPU; on the CPU faiss,
    torch when faiss is absent. Measured on the 2-core test machine, k=40, faiss vs torch:
    N=20000 D=20 3.3 s vs 3.5 s, D=500 9.1 s vs 10.3 s; N=10000 D=4800 17.5 s vs 19.3 s.
    """
    runner = choose("knn", backend)
    data = feature_matrix(X)  # both backends rank on the host copy (knn_finish)
    return runner(data, integer(k, "k", 1, data.shape[0]))


def knn_search(reference, queries, k: int, *, index: str = "auto", nlist: int | None = None, nprobe: int = 16,
               random_state: int | None = 42, backend: str = "auto") -> np.ndarray:
    """int64 [n, k]: the k nearest rows of reference [M, D] to each row of queries [n, D], nearest first.

    index "flat" is exact; "ivf" visits nprobe of nlist cells (default about 4 sqrt(M)); "auto" takes
    IVF from `assign.IVF_MIN_REFERENCE` reference rows on. To search one reference many times, build
    `ReferenceIndex(reference, ...)` once and call its `search`.
    """
    return ReferenceIndex(reference, index=index, nlist=nlist, nprobe=nprobe, random_state=random_state,
                          backend=backend).search(queries, k)


def _seed(random_state: int | None) -> int | None:
    return None if random_state is None else integer(random_state, "random_state", 0, 2**32 - 1)


def _numbered_by_first_sample(labels: np.ndarray) -> np.ndarray:
    """Cluster labels renumbered 0, 1, ... in the order of each cluster's first sample; -1 stays."""
    clustered = labels >= 0
    found, first = np.unique(labels[clustered], return_index=True)
    renumber = np.empty(found.size, np.int64)
    renumber[np.argsort(first, kind="stable")] = np.arange(found.size)
    out = np.full(labels.shape, -1, np.int64)
    out[clustered] = renumber[np.searchsorted(found, labels[clustered])]
    return out


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
