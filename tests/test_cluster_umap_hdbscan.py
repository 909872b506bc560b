"""cluster.umap and cluster.hdbscan on the CPU backends: quality thresholds on planted blobs.

umap-learn compiles with numba on first use in a process (~20-50 s), so one module fixture fits
every embedding the tests look at.
"""

import numpy as np
import pytest
from sklearn.manifold import trustworthiness
from sklearn.metrics import adjusted_rand_score

from backdoor_engine import cluster
from backdoor_engine.errors import InputError


def planted_blobs(seed=0, per_blob=200, dims=20):
    """Three unit-variance Gaussian blobs in `dims` dimensions, every pair of centres 8 apart."""
    rng = np.random.default_rng(seed)
    centres = 8.0 / np.sqrt(2.0) * np.eye(3, dims)
    truth = np.repeat(np.arange(3), per_blob)
    return (centres[truth] + rng.normal(size=(truth.size, dims))).astype(np.float32), truth


@pytest.fixture(scope="module")
def fitted():
    X, truth = planted_blobs()
    graph = cluster.knn(X, 40)
    return {
        "X": X,
        "truth": truth,
        "own_knn": cluster.umap(X),
        "precomputed_knn": cluster.umap(X, knn=graph),
        "repeat": cluster.umap(X),
    }


@pytest.mark.parametrize("kind", ["own_knn", "precomputed_knn"])
def test_umap_embedding_keeps_neighbourhoods_and_blobs(fitted, kind):
    embedding = fitted[kind]
    assert embedding.shape == (600, 2) and embedding.dtype == np.float32
    assert trustworthiness(fitted["X"], embedding, n_neighbors=10) > 0.85
    found = cluster.hdbscan(embedding, min_cluster_size=100).labels
    assert adjusted_rand_score(fitted["truth"], found) > 0.98


def test_precomputed_knn_gives_the_same_quality(fitted):
    scores = [trustworthiness(fitted["X"], fitted[kind], n_neighbors=10) for kind in ("own_knn", "precomputed_knn")]
    assert abs(scores[0] - scores[1]) < 0.03


def test_umap_seed_repeats_on_one_backend(fitted):
    np.testing.assert_array_equal(fitted["own_knn"], fitted["repeat"])


def test_hdbscan_finds_planted_blobs_and_returns_plain_trees():
    X, truth = planted_blobs(seed=1, per_blob=150, dims=5)
    result = cluster.hdbscan(X, min_cluster_size=50)
    assert result.backend == "hdbscan"
    assigned = result.labels != -1
    # Blob tails are HDBSCAN noise; every assigned sample sits with its own blob.
    assert assigned.mean() > 0.8
    assert adjusted_rand_score(truth[assigned], result.labels[assigned]) > 0.98
    assert result.labels.dtype == np.int64 and result.probabilities.shape == (450,)
    assert result.single_linkage.shape == (449, 4)
    tree = result.condensed_tree
    assert tree.root == 450
    # Three selected clusters, each at least min_cluster_size, all in the condensed tree.
    assert len(set(result.labels.tolist()) - {-1}) == 3
    assert (tree.child_size[tree.child >= tree.root] >= 50).all()
    # The flat cut at infinity keeps everyone together; far below the smallest merge, all are noise.
    assert (cluster.cut_single_linkage(result.single_linkage, np.inf, 50) == 0).all()
    assert (cluster.cut_single_linkage(result.single_linkage, 0.0, 50) == -1).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"min_cluster_size": 31}, r"min_cluster_size=31 exceeds the number of samples \(30\)"),
        ({"min_cluster_size": 1}, "min_cluster_size must be"),
        ({"min_cluster_size": 5, "min_samples": 0}, "min_samples must be"),
        ({"min_cluster_size": 5, "backend": "sklearn"}, "hdbscan backend must be 'auto' or one of"),
    ],
)
def test_hdbscan_bad_arguments_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        cluster.hdbscan(np.zeros((30, 2)), **kwargs)


def test_hdbscan_rejects_nan():
    X = np.zeros((30, 2))
    X[4, 1] = np.nan
    with pytest.raises(InputError, match="finite, got nan at row 4, column 1"):
        cluster.hdbscan(X, min_cluster_size=5)


def knn_graph(n=50, k=10):
    X, _ = planted_blobs(per_blob=n // 2, dims=3)
    return X[: 2 * (n // 2)], cluster.knn(X[: 2 * (n // 2)], k)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda g: (g[0][:, :5], g[1][:, :5]), "fewer than n_neighbors=8"),
        (lambda g: (g[0][1:], g[1][1:]), r"shape \[50, k\]"),
        (lambda g: (g[0][:, 1:], g[1][:, 1:]), "start with the sample itself"),
        (lambda g: (g[0], -g[1]), "finite and >= 0"),
        (lambda g: (g[0] + 50, g[1]), r"integers in \[0, 50\)"),
        (lambda g: g[0], "pair"),
    ],
)
def test_umap_rejects_a_malformed_knn_graph_before_fitting(spoil, message):
    X, graph = knn_graph()
    with pytest.raises(InputError, match=message):
        cluster.umap(X, n_neighbors=8, knn=spoil(graph))


def test_umap_bad_arguments_are_named():
    X = np.zeros((20, 3), dtype=np.float32)
    with pytest.raises(InputError, match="n_neighbors must be in"):
        cluster.umap(X, n_neighbors=20)
    with pytest.raises(InputError, match="min_dist must be >= 0"):
        cluster.umap(X, n_neighbors=5, min_dist=-0.1)
    with pytest.raises(InputError, match="at least 3 samples"):
        cluster.umap(X[:2])
