"""cluster.tsne and cluster.dbscan: CPU backends against references, the cuML twins' data handling
and wiring (with numpy standing in for cupy and small fakes for cuML), and the backend table."""

import importlib.machinery
import sys
import types

import numpy as np
import pytest
import torch
from sklearn.cluster import DBSCAN
from sklearn.metrics import adjusted_rand_score

from backdoor_engine import cluster
from backdoor_engine.cluster import cuml_backend
from backdoor_engine.errors import InputError


def planted_blobs(seed=0, per_blob=150, dims=10, blobs=4, spread=1.0):
    """`blobs` Gaussian blobs of `spread` in `dims` dimensions, centres 10 / sqrt(2) * 2 = 10 apart."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(blobs), per_blob)
    centres = 10.0 / np.sqrt(2.0) * np.eye(blobs, dims)
    return (centres[truth] + spread * rng.normal(size=(truth.size, dims))).astype(np.float32), truth


def knn_label_agreement(embedding, truth, k=10):
    """Mean share of each sample's k nearest embedded neighbours that carry its planted label."""
    distances = ((embedding[:, None] - embedding[None]) ** 2).sum(axis=2)
    np.fill_diagonal(distances, np.inf)
    neighbours = np.argsort(distances, axis=1)[:, :k]
    return float((truth[neighbours] == truth[:, None]).mean())


def test_tsne_keeps_planted_blobs_apart():
    X, truth = planted_blobs(per_blob=75)
    embedding = cluster.tsne(X, random_state=0)
    assert embedding.shape == (300, 2) and embedding.dtype == np.float32 and embedding.flags.c_contiguous
    assert knn_label_agreement(embedding, truth) >= 0.95


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"perplexity": 10.0}, r"perplexity=10.0 needs more than 3 x perplexity = 30 samples, got 30"),
        ({"perplexity": 0.0}, "perplexity must be > 0"),
        ({"perplexity": float("nan")}, "perplexity must be a real number"),
        ({"n_components": 3}, r"n_components must be in \[1, 2\]"),
        ({"random_state": -1}, "random_state must be in"),
        ({"backend": "sklearn"}, "tsne backend must be 'auto' or one of"),
    ],
)
def test_tsne_bad_arguments_are_named_before_fitting(kwargs, message):
    with pytest.raises(InputError, match=message):
        cluster.tsne(np.zeros((30, 3)), **{"perplexity": 5.0, **kwargs})


def assert_numbered_by_first_sample(labels):
    clusters = labels[labels >= 0]
    _, first = np.unique(clusters, return_index=True)
    assert np.array_equal(np.unique(clusters), np.arange(first.size)) and (np.diff(first) > 0).all()


def test_dbscan_gives_sklearns_partition_on_blobs_numbered_by_first_sample():
    X, truth = planted_blobs(seed=2, dims=2, blobs=3, spread=0.7)
    labels = cluster.dbscan(X, eps=0.5, min_samples=5)
    reference = DBSCAN(eps=0.5, min_samples=5).fit_predict(X)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels == -1, reference == -1)
    assert adjusted_rand_score(reference, labels) == 1.0
    assert_numbered_by_first_sample(labels)
    assert adjusted_rand_score(truth[labels >= 0], labels[labels >= 0]) > 0.98


def test_dbscan_hand_case_with_borders_and_noise():
    # eps 1.5, min_samples 3. A: cores 1, 2, 3 (each with 2 others within 1.5), borders 0 and 4.2;
    # B: core 11, borders 10 and 12; 7 and 20 are noise. A's border 4.2 comes first, so A is cluster 0
    # (sklearn numbers by first core sample and calls it 1).
    X = np.array([4.2, 10, 11, 12, 0, 1, 2, 3, 7, 20], dtype=np.float32)[:, None]
    expected = [0, 1, 1, 1, 0, 0, 0, 0, -1, -1]
    np.testing.assert_array_equal(cluster.dbscan(X, eps=1.5, min_samples=3), expected)
    assert DBSCAN(eps=1.5, min_samples=3).fit_predict(X).tolist() == [1, 0, 0, 0, 1, 1, 1, 1, -1, -1]
    # min_samples 1: every sample is a core sample; eps below every gap: each its own cluster.
    np.testing.assert_array_equal(cluster.dbscan(X, eps=0.1, min_samples=1), np.arange(10))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": 0.0}, "eps must be a finite number > 0"),
        ({"eps": float("inf")}, "eps must be a finite number > 0"),
        ({"eps": "1"}, "eps must be a real number"),
        ({"eps": 1.0, "min_samples": 0}, "min_samples must be >= 1"),
        ({"eps": 1.0, "backend": "hdbscan"}, "dbscan backend must be 'auto' or one of"),
    ],
)
def test_dbscan_bad_arguments_are_named(kwargs, message):
    with pytest.raises(InputError, match=message):
        cluster.dbscan(np.zeros((10, 2)), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("call", [lambda X: cluster.tsne(X, perplexity=2.0, backend="cuml"),
                                  lambda X: cluster.dbscan(X, eps=1.0, backend="cuml")])
def test_naming_cuml_without_cuda_says_why(call):
    with pytest.raises(InputError, match="backend 'cuml' is unavailable: cuml needs CUDA"):
        call(np.zeros((10, 2)))


def test_the_table_lists_tsne_and_dbscan_with_the_gpu_first():
    names = {primitive: [entry.name for entry in entries] for primitive, entries in cluster.backends.TABLE.items()}
    assert names["tsne"] == ["cuml", "opentsne"] and names["dbscan"] == ["cuml", "sklearn"]
    available = cluster.available_backends()
    assert "opentsne" in available["tsne"] and "sklearn" in available["dbscan"]


# ---- the cuML twins without a GPU: numpy stands in for cupy, small fakes for cuML's classes ----


@pytest.fixture
def numpy_as_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        from_dlpack=np.from_dlpack, asarray=np.asarray, asnumpy=np.asarray))


def test_cuml_inputs_share_a_tensors_memory_and_outputs_come_back_as_numpy(numpy_as_cupy):
    tensor = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    shared = cuml_backend.to_device(tensor)
    assert np.shares_memory(shared, tensor.numpy())  # DLPack: no copy
    np.testing.assert_array_equal(cuml_backend.to_device(tensor.numpy()), tensor.numpy())
    out = cuml_backend.to_host(np.asfortranarray(np.ones((3, 2), np.float64)), np.float32)
    assert out.dtype == np.float32 and out.flags.c_contiguous


class FakeTSNE:
    """cuml.manifold.TSNE's documented keywords; embeds by the first two columns."""

    def __init__(self, *, n_components=2, perplexity=30.0, early_exaggeration=12.0, late_exaggeration=1.0,
                 learning_rate=200.0, max_iter=1000, n_iter_without_progress=300, min_grad_norm=1e-07,
                 metric="euclidean", metric_params=None, init="random", random_state=None, method="fft",
                 angle=0.5, n_neighbors=90, perplexity_max_iter=100, exaggeration_iter=250, pre_momentum=0.5,
                 post_momentum=0.8, learning_rate_method="adaptive", square_distances=True,
                 precomputed_knn=None, verbose=False, output_type=None):
        self.params = {"n_components": n_components, "perplexity": perplexity, "random_state": random_state,
                       "exaggeration_iter": exaggeration_iter, "max_iter": max_iter}
        FakeTSNE.last = self.params

    def fit_transform(self, X):
        return np.asarray(X, dtype=np.float64)[:, :2]


class FakeDBSCAN:
    """cuml.cluster.DBSCAN's documented keywords; labels from scikit-learn, as int32 like cuML's."""

    def __init__(self, *, eps=0.5, min_samples=5, metric="euclidean", algorithm="brute", verbose=False,
                 max_mbytes_per_batch=None, output_type=None, calc_core_sample_indices=True):
        self.eps, self.min_samples = eps, min_samples

    def fit_predict(self, X):
        return DBSCAN(eps=self.eps, min_samples=self.min_samples).fit_predict(X).astype(np.int32)


def test_tsne_continues_from_a_given_embedding_with_a_short_schedule():
    X, truth = planted_blobs(per_blob=75)
    first = cluster.tsne(X, random_state=0)
    moved = X + np.random.default_rng(1).normal(0, 0.05, X.shape).astype(np.float32)
    warm = cluster.tsne(moved, random_state=0, init=first, exaggeration_iter=0, n_iter=100)
    assert knn_label_agreement(warm, truth) >= 0.95
    # it continued from `first` (same layout, same scale) rather than starting afresh
    assert np.corrcoef(first[:, 0], warm[:, 0])[0, 1] > 0.9 and np.corrcoef(first[:, 1], warm[:, 1])[0, 1] > 0.9
    with pytest.raises(InputError, match=r"init must be a finite \[300, 2\] embedding"):
        cluster.tsne(X, init=first[:10])
    with pytest.raises(InputError, match="n_iter must be"):
        cluster.tsne(X, n_iter=0)


@pytest.fixture
def fake_cuml(monkeypatch, numpy_as_cupy):
    root = types.ModuleType("cuml")
    root.__spec__ = importlib.machinery.ModuleSpec("cuml", None)
    monkeypatch.setitem(sys.modules, "cuml", root)
    monkeypatch.setitem(sys.modules, "cuml.manifold", types.SimpleNamespace(TSNE=FakeTSNE))
    monkeypatch.setitem(sys.modules, "cuml.cluster", types.SimpleNamespace(DBSCAN=FakeDBSCAN))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_cuml_twins_run_through_the_dispatch_with_cumls_keywords(fake_cuml):
    assert cluster.available_backends()["dbscan"][0] == "cuml"
    X = np.array([4.2, 10, 11, 12, 0, 1, 2, 3, 7, 20], dtype=np.float32)[:, None]
    labels = cluster.dbscan(X, eps=1.5, min_samples=3)  # "auto": cuML first where CUDA is
    np.testing.assert_array_equal(labels, [0, 1, 1, 1, 0, 0, 0, 0, -1, -1])
    assert labels.dtype == np.int64
    blobs, _ = planted_blobs(per_blob=10)
    embedding = cluster.tsne(blobs, perplexity=5.0, random_state=3, backend="cuml")
    assert embedding.dtype == np.float32 and embedding.shape == (40, 2)
    with pytest.raises(InputError, match="cuml's TSNE embeds in 2 dimensions only"):
        cluster.tsne(blobs, n_components=1, perplexity=5.0, backend="cuml")
    with pytest.raises(InputError, match="cuml's TSNE starts from random or PCA positions only"):
        cluster.tsne(blobs, perplexity=5.0, backend="cuml", init=embedding)
    cluster.tsne(blobs, perplexity=5.0, backend="cuml", exaggeration_iter=0, n_iter=100)
    assert FakeTSNE.last == {"n_components": 2, "perplexity": 5.0, "random_state": None, "exaggeration_iter": 0,
                             "max_iter": 100}
