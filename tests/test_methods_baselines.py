"""The field's baselines on the detector interface: Activation Clustering ("ac") and Spectral Signatures
("spectral"), each one file plus one registry line."""

import html
import json

import numpy as np
import pytest

from backdoor_engine.detection import detection_metrics
from backdoor_engine.errors import InputError
from backdoor_engine.methods import ScanData, available_detectors, get_detector, make_detector
from backdoor_engine.methods.activation_clustering import FIGURE_TITLE as AC_TITLE
from backdoor_engine.methods.activation_clustering import ActivationClustering, analyse_sizes
from backdoor_engine.methods.spectral import FIGURE_TITLE as SPECTRAL_TITLE
from backdoor_engine.methods.spectral import SpectralSignatures, removal_count


def planted(seed=0, per_class=400, classes=3, dims=64, rate=0.1, shift=4.0):
    """Gaussian classes around their own means; `rate` of class 0 carries a shifted block of 8 features
    (an all-to-one poison's trigger response), rows shuffled. Returns float32 features, labels, truth."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (classes, dims))
    y = np.repeat(np.arange(classes), per_class)
    X = means[y] + rng.normal(0, 1, (len(y), dims))
    truth = np.zeros(len(y), bool)
    truth[rng.choice(per_class, int(rate * per_class), replace=False)] = True  # rows of class 0
    X[truth, :8] += shift
    order = rng.permutation(len(y))
    return X[order].astype(np.float32), y[order], truth[order]


@pytest.mark.parametrize("reduce", ["fastica", "pca"])
def test_activation_clustering_finds_a_planted_poison_cluster(reduce):
    X, y, truth = planted()
    detector = ActivationClustering(reduce=reduce)
    detection = detector.fit(X, y)
    metrics = detection_metrics(detection.flags, truth)
    assert metrics["tpr"] >= 0.9 and metrics["fpr"] <= 0.05
    d = detection.diagnostics
    assert d["flagged_classes"] == [0] and d["classes"]["0"]["n_flagged"] == detection.n_flagged
    assert d["classes"]["0"]["reduction"] == reduce
    # Cluster ids: label x 2 + cluster (0 = the class's largest); the flagged one is class 0's small cluster.
    assert set(np.unique(detection.clusters[y == 1])) <= {2, 3}
    assert set(np.unique(detection.clusters[detection.flags])) == {1}
    # Score: 1 - the share of the sample's cluster, so a flagged sample scores above 1 - 0.35.
    assert detection.scores[detection.flags].min() > 0.65 >= detection.scores[~detection.flags].max()
    assert detection.params == {**detector.params.__dict__}


def test_activation_clustering_splits_a_clean_unimodal_class_about_in_half_and_flags_nothing():
    rng = np.random.default_rng(1)
    X, y = rng.normal(0, 1, (1200, 32)).astype(np.float32), np.repeat(np.arange(3), 400)
    detection = ActivationClustering().fit(X, y)
    shares = [c["cluster_shares"] for c in detection.diagnostics["classes"].values()]
    # 2-means always splits; on one blob neither half is under 35%, so nothing is flagged.
    assert all(min(s) >= 0.35 for s in shares) and detection.n_flagged == 0
    assert detection.diagnostics["flagged_classes"] == []
    # ART's and BackdoorBench's default analysis, 'smaller', takes the smaller half of every class regardless.
    smaller = ActivationClustering(cluster_analysis="smaller").fit(X, y)
    assert smaller.diagnostics["flagged_classes"] == [0, 1, 2]
    assert 0.3 * len(y) <= smaller.n_flagged < 0.5 * len(y)


def test_the_size_rule_flags_only_clusters_under_the_threshold():
    assert analyse_sizes(np.array([66, 34]), "relative-size", 0.35) == [1]
    assert analyse_sizes(np.array([65, 35]), "relative-size", 0.35) == []
    assert analyse_sizes(np.array([65, 35]), "smaller", 0.35) == [1]
    assert analyse_sizes(np.array([100, 0]), "smaller", 0.35) == []  # one non-empty cluster: nothing to flag


def test_activation_clustering_repeats_with_its_seed_and_skips_small_classes_with_a_diagnostic():
    X, y, _ = planted(per_class=200)
    y = y.copy()
    small = np.flatnonzero(y == 2)[:15]
    keep = np.r_[np.flatnonzero(y != 2), small]
    X, y = X[keep], y[keep]  # class 2 keeps 15 samples: fewer than 2 x nb_dims = 20
    first, second = ActivationClustering(random_state=3).fit(X, y), ActivationClustering(random_state=3).fit(X, y)
    assert np.array_equal(first.flags, second.flags) and np.array_equal(first.clusters, second.clusters)
    assert get_detector("ac").seed_param == "random_state"
    d = first.diagnostics
    assert d["skipped_classes"] == [2] and "fewer than 20" in d["classes"]["2"]["skipped"]
    assert not first.flags[y == 2].any() and (first.clusters[y == 2] == -1).all()
    assert "1 class(es) skipped" in d["explanation"]


@pytest.mark.parametrize("sizes,rate", [((397, 250, 123), 0.07), ((400, 60, 31), 0.1), ((50, 9, 3), 0.05)])
def test_spectral_flags_exactly_round_1_5_x_rate_x_class_size_in_every_class(sizes, rate):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(sizes)), sizes)
    X = rng.normal(0, 1, (len(y), 16)).astype(np.float32)
    detection = SpectralSignatures(expected_rate=rate).fit(X, y)
    for label, size in enumerate(sizes):
        expected = int(np.floor(1.5 * rate * size + 0.5))
        assert detection.flags[y == label].sum() == expected == removal_count(size, rate, 1.5)
        assert detection.diagnostics["classes"][str(label)]["n_flagged"] == expected
        # The flags are the class's highest scores: nothing unflagged scores above the threshold.
        scores, flags = detection.scores[y == label], detection.flags[y == label]
        if expected:
            assert scores[~flags].max(initial=-np.inf) <= scores[flags].min()


def test_spectral_finds_planted_poison_with_only_the_false_positives_its_rule_forces():
    X, y, truth = planted()
    detection = SpectralSignatures(expected_rate=0.1).fit(X, y)
    assert detection_metrics(detection.flags, truth)["tpr"] >= 0.9
    in_class = y == 0
    metrics = detection_metrics(detection.flags[in_class], truth[in_class])
    # 1.5 x 10% of 400 = 60 removed for 40 poisoned: every poisoned sample and 20 clean ones (FPR 20/360).
    assert metrics["tp"] == 40 and metrics["fp"] == 20
    # With a rate that removes just the poison, the class's false positives go to zero.
    tight = SpectralSignatures(expected_rate=0.1 / 1.5).fit(X, y)
    metrics = detection_metrics(tight.flags[in_class], truth[in_class])
    assert metrics["tpr"] >= 0.9 and metrics["fpr"] <= 0.05


def test_spectral_scores_are_the_papers_and_the_official_codes_projections():
    X, y, _ = planted(per_class=150, classes=2, dims=20)
    rows = y == 1
    C = X[rows].astype(np.float64)
    _, _, vt = np.linalg.svd(C - C.mean(axis=0), full_matrices=False)
    centred = SpectralSignatures(expected_rate=0.05).fit(X, y).scores[rows]
    assert np.allclose(centred, ((C - C.mean(axis=0)) @ vt[0]) ** 2, rtol=1e-6, atol=1e-9)
    # compute_corr.py / BackdoorBench: np.linalg.norm(v[0:1] @ full_cov.T, axis=0), uncentred features.
    official = SpectralSignatures(expected_rate=0.05, score="uncentred").fit(X, y).scores[rows]
    assert np.allclose(official, np.linalg.norm(vt[0:1] @ C.T, axis=0), rtol=1e-6)


def test_spectral_without_a_rate_assumes_backdoorbenchs_and_says_so():
    X, y, _ = planted(per_class=200)
    assumed = SpectralSignatures()
    detection = assumed.fit(X, y)
    d = detection.diagnostics
    assert d["rate_assumed"] and d["expected_rate"] == 0.1 and "assumed" in d["explanation"]
    assert detection.n_flagged == 3 * removal_count(200, 0.1, 1.5)
    notes = assumed.report(detection, None, None).notes
    assert any("Assumed poison rate: 10%" in note for note in notes)
    given = SpectralSignatures(expected_rate=0.05)
    detection = given.fit(X, y)
    assert not detection.diagnostics["rate_assumed"] and detection.diagnostics["expected_rate"] == 0.05
    assert not any("Assumed" in note for note in given.report(detection, None, None).notes)


def test_spectral_skips_a_class_without_variance_or_with_one_sample():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(100, 8)), np.ones((30, 8)), rng.normal(size=(1, 8))]).astype(np.float32)
    y = np.r_[np.zeros(100, int), np.ones(30, int), [2]]
    detection = SpectralSignatures(expected_rate=0.1).fit(X, y)
    assert detection.diagnostics["skipped_classes"] == [1, 2]
    assert "no variance" in detection.diagnostics["classes"]["1"]["skipped"]
    assert not detection.flags[y > 0].any() and detection.flags[y == 0].sum() == 15


@pytest.mark.parametrize("method", ["ac", "spectral"])
def test_bad_input_is_refused_with_an_error_that_names_it(method):
    detector = get_detector(method)()
    X, y = np.zeros((40, 12), np.float32), np.zeros(40, int)
    with pytest.raises(InputError, match="N x D matrix"):
        detector.fit(np.zeros(40, np.float32), y)
    with pytest.raises(InputError, match="expected 40 labels"):
        detector.fit(X, y[:30])
    with pytest.raises(InputError, match="integer class labels"):
        detector.fit(X, y.astype(float))
    bad = X.copy()
    bad[7, 3] = np.nan
    with pytest.raises(InputError, match="row 7 .*non-finite"):
        detector.fit(bad, y)
    with pytest.raises(InputError, match="'penultimate' capture"):
        detector.fit_scan(ScanData(ids=np.arange(40), y=y, num_classes=1))


def test_unknown_parameters_and_values_outside_the_choices_are_refused():
    with pytest.raises(InputError, match="unknown parameter.*nb_dim"):
        make_detector("ac", {"nb_dim": 5})
    with pytest.raises(InputError, match="reduce must be one of"):
        make_detector("ac", {"reduce": "tsne"})
    with pytest.raises(InputError, match="cluster_analysis must be one of"):
        make_detector("ac", {"cluster_analysis": "distance"})
    with pytest.raises(InputError, match="size_threshold"):
        make_detector("ac", {"size_threshold": 1.5})
    with pytest.raises(InputError, match="unknown parameter.*rate"):
        make_detector("spectral", {"rate": 0.1})
    with pytest.raises(InputError, match="score must be one of"):
        make_detector("spectral", {"score": "cosine"})
    with pytest.raises(InputError, match="expected_rate must be in"):
        make_detector("spectral", {"expected_rate": 1.2})
    with pytest.raises(InputError, match="expected_rate must be a number"):
        make_detector("spectral", {"expected_rate": "ten percent"})
    assert make_detector("ac", {"reduce": "PCA"}).params.reduce == "pca"  # choices match case-insensitively
    assert make_detector("spectral", {"expected_rate": None}).params.expected_rate is None


@pytest.mark.parametrize("method", ["ac", "spectral"])
def test_both_are_registered_and_describe_every_parameter(method):
    from dataclasses import fields

    assert method in available_detectors()
    detector = get_detector(method)
    assert detector.needs == frozenset({"penultimate"})
    text = detector().describe()
    for f in fields(detector.params_class):
        assert f"{f.name}=" in text and f.metadata["provenance"] in text


@pytest.mark.parametrize("method,title", [("ac", AC_TITLE), ("spectral", SPECTRAL_TITLE)])
def test_a_scan_through_the_api_writes_the_report_with_the_methods_plot(tmp_path, untrained_scan_inputs,
                                                                        method, title):
    from backdoor_engine import api

    dataset, model, normalisation = untrained_scan_inputs
    out = tmp_path / method
    result = api.scan(dataset, model, normalisation, method=method, out_dir=out, progress=False)
    assert {p.name for p in out.iterdir()} >= {"report.json", "samples.csv", "report.html"}
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["n_samples"] == 300
    assert len(report["flagged"]) == result.detection.n_flagged
    assert set(report["params"]) == {f for f in get_detector(method)().params.__dict__}
    assert "metrics" in report and "classes" in report["diagnostics"]
    page = (out / "report.html").read_text()
    assert html.escape(title) in page
    assert len((out / "samples.csv").read_text().splitlines()) == 301
    if method == "spectral":
        assert "Assumed poison rate: 10%" in page
        assert result.detection.n_flagged == 3 * removal_count(100, 0.1, 1.5)
