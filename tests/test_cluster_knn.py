"""cluster.knn: faiss and torch backends against a float64 brute-force reference, and the contract."""

import numpy as np
import pytest
import torch

from backdoor_engine import cluster
from backdoor_engine.errors import InputError

BACKENDS = ["faiss", "torch"]


def brute_force(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 pairwise distances; self first, then by distance, ties by index."""
    data = X.astype(np.float64)
    distances = np.sqrt(((data[:, None, :] - data[None, :, :]) ** 2).sum(axis=2))
    n = len(data)
    own = np.eye(n, dtype=bool)
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), ~own, distances), axis=1)[:, :k]
    return order, np.take_along_axis(distances, order, axis=1)


def clustered(n: int, d: int, seed: int, offset: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(4, d))
    points = centres[rng.integers(0, 4, n)] + rng.normal(size=(n, d))
    return (offset + scale * points).astype(np.float32)


def assert_matches_reference(X, k, indices, distances, distance_tolerance):
    ref_indices, ref_distances = brute_force(X, k)
    assert indices.dtype == np.int64 and distances.dtype == np.float32
    assert indices.shape == distances.shape == (len(X), k)
    np.testing.assert_array_equal(indices[:, 0], np.arange(len(X)))
    np.testing.assert_array_equal(distances[:, 0], 0.0)
    np.testing.assert_allclose(distances, ref_distances, rtol=distance_tolerance, atol=0)
    # Neighbour sets may differ only where the reference itself has a near tie at the k-th place.
    for row in np.flatnonzero((np.sort(indices, axis=1) != np.sort(ref_indices, axis=1)).any(axis=1)):
        kth = ref_distances[row, -1]
        differing = np.setxor1d(indices[row], ref_indices[row])
        true_distances = np.sqrt(((X[differing].astype(np.float64) - X[row]) ** 2).sum(axis=1))
        np.testing.assert_allclose(true_distances, kth, rtol=distance_tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, d, k", [(200, 1, 7), (300, 3, 40), (257, 50, 16), (150, 700, 40), (40, 5, 40)])
def test_matches_brute_force(backend, n, d, k):
    X = clustered(n, d, seed=d)
    indices, distances = cluster.knn(X, k, backend=backend)
    # float32 dot products accumulate an error that grows like sqrt(d), and its size depends on the CPU's SIMD
    # summation order (d = 700 reached 1.3e-5 on an AVX-512 Xeon): the tolerance follows d.
    assert_matches_reference(X, k, indices, distances, distance_tolerance=1e-5 * max(1.0, np.sqrt(d / 50)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_far_offset_and_tight_clusters_keep_small_distances_exact(backend):
    # Log-likelihood features sit far from 0; the matmul expansion alone would turn their small
    # distances into rounding noise of order sqrt(eps) * |x|.
    X = clustered(300, 8, seed=3, offset=-5e4, scale=1e-3)
    indices, distances = cluster.knn(X, 10, backend=backend)
    # X itself is float32 rounded at 5e4 (spacing ~0.004): the reference uses the same rounded values.
    assert_matches_reference(X, 10, indices, distances, distance_tolerance=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_first_among_many_exact_duplicates(backend):
    X = np.zeros((30, 4), dtype=np.float32)
    X[20:] = 1.0
    indices, distances = cluster.knn(X, 5, backend=backend)
    np.testing.assert_array_equal(indices[:, 0], np.arange(30))
    np.testing.assert_array_equal(distances, 0.0)
    # Which duplicates a search finds is the backend's choice; the found ones come in index order.
    group = np.where(np.arange(30) < 20, 0, 1)
    assert (group[indices] == group[:, None]).all()
    assert (np.diff(indices[:, 1:], axis=1) > 0).all()


def test_backends_agree_and_auto_matches_one_of_them():
    X = clustered(400, 12, seed=7)
    results = {backend: cluster.knn(X, 15, backend=backend) for backend in BACKENDS + ["auto"]}
    np.testing.assert_array_equal(results["faiss"][0], results["torch"][0])
    np.testing.assert_allclose(results["faiss"][1], results["torch"][1], rtol=1e-5)
    expected = "torch" if torch.cuda.is_available() else "faiss"
    np.testing.assert_array_equal(results["auto"][0], results[expected][0])


def test_k_equal_to_n_lists_every_sample():
    X = clustered(25, 3, seed=1)
    indices, _ = cluster.knn(X, 25)
    np.testing.assert_array_equal(np.sort(indices, axis=1), np.broadcast_to(np.arange(25), (25, 25)))


@pytest.mark.parametrize(
    "X, k, message",
    [
        (np.zeros((5, 2)), 0, "k must be in"),
        (np.zeros((5, 2)), 6, "k must be in"),
        (np.zeros(5), 1, r"shape \[N, D\]"),
        (np.zeros((0, 3)), 1, r"shape \[N, D\]"),
        (np.array([[0.0, np.nan], [1.0, 2.0]]), 1, "finite"),
        (np.array([["a", "b"]]), 1, "real numbers"),
        (np.zeros((5, 2)), 2.5, "integer"),
    ],
)
def test_bad_input_is_named(X, k, message):
    with pytest.raises(InputError, match=message):
        cluster.knn(X, k)


def test_unknown_and_unavailable_backends_are_named():
    X = np.zeros((5, 2), dtype=np.float32)
    with pytest.raises(InputError, match="knn backend must be 'auto' or one of"):
        cluster.knn(X, 2, backend="cuml")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="'cuml' is unavailable: cuml needs CUDA"):
            cluster.hdbscan(np.zeros((10, 2)), min_cluster_size=5, backend="cuml")


def test_available_backends_lists_the_cpu_libraries_in_auto_order():
    available = cluster.available_backends()
    assert set(available) == {"umap", "hdbscan", "tsne", "dbscan", "knn", "knn_search"}
    assert "umap-learn" in available["umap"] and "hdbscan" in available["hdbscan"]
    assert available["knn"][0] == ("torch" if torch.cuda.is_available() else "faiss")
    if not torch.cuda.is_available():
        assert "cuml" not in available["umap"] + available["hdbscan"]


def test_knn_search_finds_the_exact_neighbours_of_queries_in_a_reference():
    reference, queries = clustered(500, 6, seed=4), clustered(80, 6, seed=5)
    distances = ((queries[:, None].astype(np.float64) - reference[None]) ** 2).sum(axis=2)
    found = cluster.knn_search(reference, queries, 4, index="flat")
    assert found.dtype == np.int64 and found.shape == (80, 4)
    np.testing.assert_allclose(np.take_along_axis(distances, found, axis=1), np.sort(distances, axis=1)[:, :4],
                               rtol=1e-4)
    # Every cell visited: IVF is exact too.
    np.testing.assert_array_equal(cluster.knn_search(reference, queries, 4, index="ivf", nlist=8, nprobe=8), found)


def test_reference_index_takes_ivf_from_the_measured_size_on():
    assert cluster.ReferenceIndex(clustered(100, 3, seed=0)).kind == "flat"
    assert cluster.ReferenceIndex(clustered(cluster.assign.IVF_MIN_REFERENCE, 3, seed=0)).kind == "ivf"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"index": "hnsw"}, "index must be one of"),
        ({"backend": "torch"}, "knn_search backend must be 'auto' or one of"),
        ({"index": "ivf", "nlist": 8, "nprobe": 9}, r"nprobe must be in \[1, 8\]"),
        ({"k": 101}, r"k must be in \[1, 100\]"),
    ],
)
def test_knn_search_bad_arguments_are_named(kwargs, message):
    reference = clustered(100, 3, seed=0)
    with pytest.raises(InputError, match=message):
        cluster.knn_search(reference, reference[:5], **{"k": 3, **kwargs})
