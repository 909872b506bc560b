"""SPECTRE ("spectre"): robust-covariance whitening and QUantum Entropy scores per class, one file plus one registry
line. Planted Gaussian data as the baselines' tests; the formulas checked against direct computations."""

import html
import json
import math
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.linalg import expm, fractional_matrix_power

from backdoor_engine.detection import detection_metrics
from backdoor_engine.errors import InputError
from backdoor_engine.methods import ScanData, available_detectors, get_detector, make_detector
from backdoor_engine.methods.spectral import removal_count
from backdoor_engine.methods.spectre import (
    FIGURE_TITLE,
    FourthMoments,
    Spectre,
    dims_grid,
    principal_coordinates,
    quantum_filter,
    que_matrix,
    que_scores,
    robust_covariance_filter,
    selection_statistic,
)
from backdoor_engine.methods.spectre import _tail_threshold as tail_threshold

FAST = {"max_dims": 16}  # k = 1, 2, 3, 5, 7, 10, 13, 16: the same algorithm at a fraction of the default's cost


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


def test_spectre_finds_planted_poison_with_only_the_false_positives_its_budget_forces():
    X, y, truth = planted()
    detection = Spectre(expected_rate=0.1).fit(X, y)  # the reference's grid: PCA 64, k = 1, 4, ..., 64
    d = detection.diagnostics
    assert d["flagged_classes"] == [0] and not detection.flags[y != 0].any()
    assert detection_metrics(detection.flags, truth)["tpr"] >= 0.9
    in_class = y == 0
    metrics = detection_metrics(detection.flags[in_class], truth[in_class])
    # 1.5 x 10% of 400 = 60 removed for 40 poisoned: every poisoned sample and 20 clean ones (FPR 20/360).
    assert metrics["tp"] == 40 and metrics["fp"] == 20
    statistics = {label: c["statistic"] for label, c in d["classes"].items()}
    assert statistics["0"] > 2 * max(statistics["1"], statistics["2"])  # the target class stands out
    assert d["classes"]["0"]["chosen_k"] in dims_grid(64, 8) == [1, 4, 9, 16, 25, 36, 49, 64]
    assert set(d["classes"]["0"]["statistic_by_k"]) == {"1", "4", "9", "16", "25", "36", "49", "64"}
    # With a rate whose budget is the poison alone, the class's false positives go (nearly) to zero.
    tight = Spectre(expected_rate=0.1 / 1.5, **FAST).fit(X, y)
    metrics = detection_metrics(tight.flags[in_class], truth[in_class])
    assert metrics["tpr"] >= 0.9 and metrics["fpr"] <= 0.05


@pytest.mark.parametrize("sizes,rate", [((397, 250, 123), 0.07), ((400, 60, 31), 0.1), ((50, 9, 3), 0.05)])
def test_spectre_removes_exactly_round_1_5_x_rate_x_class_size(sizes, rate):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(sizes)), sizes)
    X = rng.normal(0, 1, (len(y), 16)).astype(np.float32)
    every = Spectre(expected_rate=rate, flag_classes="all", max_dims=8).fit(X, y)
    for label, size in enumerate(sizes):
        expected = int(np.floor(1.5 * rate * size + 0.5))
        assert every.flags[y == label].sum() == expected == removal_count(size, rate, 1.5)
        assert every.diagnostics["classes"][str(label)]["n_flagged"] == expected
        scores, flags = every.scores[y == label], every.flags[y == label]
        if expected:  # the flags are the class's highest QUE scores
            assert scores[~flags].max(initial=-np.inf) <= scores[flags].min()
    # The default rule flags the removal of the class with the highest statistic only.
    top = Spectre(expected_rate=rate, max_dims=8).fit(X, y)
    d = top.diagnostics
    [label] = d["flagged_classes"]
    assert str(label) == max(d["classes"], key=lambda c: d["classes"][c].get("statistic", -math.inf))
    assert top.n_flagged == removal_count(sizes[label], rate, 1.5) == top.flags[y == label].sum()


def test_on_clean_data_the_top_rule_still_flags_one_class_and_says_so():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 200)
    X = (rng.normal(0, 3, (3, 20))[y] + rng.normal(0, 1, (600, 20))).astype(np.float32)
    detection = Spectre(**FAST).fit(X, y)
    d = detection.diagnostics
    assert len(d["flagged_classes"]) == 1 and detection.n_flagged == removal_count(200, 0.1, 1.5)
    assert "also on clean data" in d["explanation"]


def test_the_que_score_is_the_matrix_exponential_of_the_papers_formula():
    rng = np.random.default_rng(1)
    A = rng.normal(0, 1, (5, 5))
    sigma = A @ A.T / 5 + np.eye(5)
    M = que_matrix(sigma, 4.0)
    direct = expm(4.0 * (sigma - np.eye(5)) / (np.linalg.norm(sigma, 2) - 1))
    assert np.allclose(M, direct / np.trace(direct), rtol=1e-10, atol=1e-12)
    W = rng.normal(0, 1, (7, 5))
    assert np.allclose(que_scores(W, M), [w @ M @ w for w in W], rtol=1e-12)
    # ||sigma|| <= 1 leaves the formula undefined: M = I / k, the mean squared whitened coordinate.
    assert np.allclose(que_matrix(0.5 * np.eye(3), 4.0), np.eye(3) / 3)


def test_one_k_of_the_quantum_filter_is_the_references_whitening_and_scores():
    X, _, _ = planted(per_class=300, classes=1, dims=24)
    coords, _ = principal_coordinates(X.astype(np.float64), 24)
    k, eps = 5, 0.1
    scores, removed, outcome = quantum_filter(coords[:, :k], eps, 45, 60, 4.0)
    # quantum_filters.jl: whiten every sample by the kept samples' covariance (corrected=false), then
    # S' = cov(whitened) (corrected), M = exp(4 (S' - I)/(opnorm(S') - 1)) / tr, tau = x' M x.
    C = coords[:, :k]
    sigma = np.cov(C[outcome.keep], rowvar=False, bias=True)
    W = C @ np.real(fractional_matrix_power(sigma, -0.5))
    S = np.cov(W, rowvar=False)
    M = expm(4.0 * (S - np.eye(k)) / (np.linalg.norm(S, 2) - 1))
    M /= np.trace(M)
    assert np.allclose(scores, np.einsum("ij,jk,ik->i", W, M, W), rtol=1e-8)
    assert removed.sum() == 45 and scores[removed].min() >= scores[~removed].max()
    assert outcome.n_filtered <= 60 and outcome.stop in ("converged", "no threshold", "limit reached")
    # k = 1: the squared principal coordinate, unwhitened (Spectral Signatures' score).
    first, _, unfiltered = quantum_filter(coords[:, :1], eps, 45, 60, 4.0)
    assert np.allclose(first, coords[:, 0] ** 2) and unfiltered.n_filtered == 0
    # The k-selection statistic: tr(S' M) in the full K-dim space, whitened by the kept rows (corrected cov).
    keep = ~removed
    whiten = np.real(fractional_matrix_power(np.cov(coords[keep], rowvar=False), -0.5))
    S = np.cov(coords @ whiten, rowvar=False)
    M = expm(4.0 * (S - np.eye(24)) / (np.linalg.norm(S, 2) - 1))
    assert math.isclose(selection_statistic(coords, keep, 4.0), np.trace(S @ M) / np.trace(M), rel_tol=1e-9)


def test_the_filters_cut_follows_dkk17_jl():
    eps = 0.1  # tail(T) = 1 up to T = 10 log(10) = 23.03: only the largest difference can set the cut there
    assert tail_threshold(np.array([0.5, 1.0, 2.9]), eps) is None  # nothing beyond the shift of 3
    assert tail_threshold(np.array([0.1, 4.0, 5.0, 7.0]), eps) == pytest.approx(4.0)  # max 7 - 3: removes 5, 7
    # Past 10 log(1/eps) the tail is tiny, so the first such difference sets the cut although larger ones follow.
    assert tail_threshold(np.array([0.1, 4.0, 30.0, 40.0]), eps) == pytest.approx(27.0)


def test_the_filter_drops_gross_outliers_and_never_more_than_its_limit():
    rng = np.random.default_rng(2)
    S = rng.normal(0, 1, (600, 4))
    S[:6] *= 40  # far outside 10 k log(n / 0.1) in squared whitened norm
    S -= S.mean(axis=0)
    outcome = robust_covariance_filter(S, 0.05, 60)
    assert not outcome.keep[:6].any() and outcome.keep[6:].mean() > 0.95
    limited = robust_covariance_filter(S, 0.05, 3)
    assert limited.n_filtered == 3 and limited.stop == "limit reached"
    assert robust_covariance_filter(S, 0.05, 0).stop == "no filter"
    clean = rng.normal(0, 1, (4000, 3))
    assert robust_covariance_filter(clean - clean.mean(axis=0), 0.1, 800).stop == "converged"


def test_the_fourth_moment_eigenpair_is_the_same_through_every_path():
    rng = np.random.default_rng(4)
    k = 20  # above the dense limit: Lanczos on the rows, or on the formed moment matrix F
    current = rng.standard_t(5, (300, k))
    whiten = np.real(fractional_matrix_power(current.T @ current / 300, -0.5))
    Y = current @ whiten
    Z = np.einsum("ni,nj->nij", Y, Y).reshape(300, k * k)
    e = np.eye(k).ravel()
    values, vectors = np.linalg.eigh(Z.T @ Z / 300 - np.outer(e, e))  # the reference's k^2 x k^2 operator
    reference = vectors[:, -1].reshape(k, k)
    rows = FourthMoments(k)
    formed = FourthMoments(k)
    formed.spent = math.inf  # form F at once
    for paths in (rows, formed):
        lam, V = paths.top(current, whiten, Y)
        assert lam == pytest.approx(values[-1], rel=1e-9)
        assert abs(np.sum(V * reference)) == pytest.approx(1.0, abs=1e-8)
    assert formed.moments is not None and rows.moments is None
    formed.remove(current[:10])  # downdating F equals forming it from the remaining rows
    assert np.allclose(formed.moments, formed.lift(current[10:]).T @ formed.lift(current[10:]))


def test_spectre_is_repeatable_and_skips_classes_it_cannot_scan_with_a_diagnostic():
    X, y, _ = planted(per_class=150, dims=16)
    X = np.vstack([X, np.ones((20, 16), np.float32), np.zeros((1, 16), np.float32),
                   np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)])
    y = np.r_[y, np.full(20, 3), [4], [5, 5]]
    first = Spectre(expected_rate=0.33, flag_classes="all", **FAST).fit(X, y)
    second = Spectre(expected_rate=0.33, flag_classes="all", **FAST).fit(X, y)
    assert np.array_equal(first.flags, second.flags) and np.array_equal(first.scores, second.scores)
    assert get_detector("spectre").seed_param is None
    d = first.diagnostics
    assert d["skipped_classes"] == [3, 4, 5]
    assert "no variance" in d["classes"]["3"]["skipped"] and "single sample" in d["classes"]["4"]["skipped"]
    assert "too few" in d["classes"]["5"]["skipped"]
    assert not first.flags[y >= 3].any() and (first.scores[y >= 3] == 0).all()
    assert "3 class(es) skipped" in d["explanation"]
    assert all(first.flags[y == label].sum() == removal_count(150, 0.33, 1.5) for label in range(3))


def test_spectre_without_a_rate_assumes_backdoorbenchs_and_says_so():
    X, y, _ = planted(per_class=200, dims=16)
    assumed = Spectre(**FAST)
    detection = assumed.fit(X, y)
    d = detection.diagnostics
    assert d["rate_assumed"] and d["expected_rate"] == 0.1 and "assumed" in d["explanation"]
    assert detection.n_flagged == removal_count(200, 0.1, 1.5)
    assert any("Assumed poison rate: 10%" in note for note in assumed.report(detection, None, None).notes)
    given = Spectre(expected_rate=0.05, **FAST)
    detection = given.fit(X, y)
    assert not detection.diagnostics["rate_assumed"] and detection.diagnostics["expected_rate"] == 0.05
    assert not any("Assumed" in note for note in given.report(detection, None, None).notes)


def test_the_report_draws_the_score_histograms(tmp_path):
    X, y, truth = planted(per_class=150, dims=16)
    detector = Spectre(expected_rate=0.1, **FAST)
    detection = detector.fit(X, y)
    parts = detector.report(detection, SimpleNamespace(poison=truth.astype(int)), tmp_path)
    [(title, png)] = parts.figures
    assert title == FIGURE_TITLE and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert detector.report(detection, SimpleNamespace(poison=None), tmp_path).figures[0][1][:4] == b"\x89PNG"


def test_bad_input_is_refused_with_an_error_that_names_it():
    detector = Spectre()
    X, y = np.zeros((40, 12), np.float32), np.zeros(40, int)
    with pytest.raises(InputError, match="N x D matrix"):
        detector.fit(np.zeros(40, np.float32), y)
    with pytest.raises(InputError, match="expected 40 labels"):
        detector.fit(X, y[:30])
    with pytest.raises(InputError, match="integer class labels"):
        detector.fit(X, y.astype(float))
    bad = X.copy()
    bad[7, 3] = np.inf
    with pytest.raises(InputError, match="row 7 .*non-finite"):
        detector.fit(bad, y)
    with pytest.raises(InputError, match="'penultimate' capture"):
        detector.fit_scan(ScanData(ids=np.arange(40), y=y, num_classes=1))


def test_unknown_parameters_and_values_out_of_range_are_refused_by_name():
    with pytest.raises(InputError, match="unknown parameter.*rate"):
        make_detector("spectre", {"rate": 0.1})
    with pytest.raises(InputError, match="flag_classes must be one of"):
        make_detector("spectre", {"flag_classes": "target"})
    with pytest.raises(InputError, match="expected_rate must be in"):
        make_detector("spectre", {"expected_rate": 0.4})
    with pytest.raises(InputError, match="expected_rate must be a number"):
        make_detector("spectre", {"expected_rate": "ten percent"})
    with pytest.raises(InputError, match="alpha must be > 0"):
        make_detector("spectre", {"alpha": 0})
    with pytest.raises(InputError, match="max_dims must be >= 1"):
        make_detector("spectre", {"max_dims": 0})
    with pytest.raises(InputError, match="dims_tried must be an integer"):
        make_detector("spectre", {"dims_tried": 2.5})
    with pytest.raises(InputError, match="removal_factor must be > 0"):
        make_detector("spectre", {"removal_factor": -1})
    with pytest.raises(InputError, match="filter_limit must be a finite number"):
        make_detector("spectre", {"filter_limit": float("nan")})
    assert make_detector("spectre", {"flag_classes": "ALL"}).params.flag_classes == "all"
    assert make_detector("spectre", {"expected_rate": None}).params.expected_rate is None


def test_spectre_is_registered_and_describes_every_parameter_with_its_provenance():
    assert "spectre" in available_detectors()
    detector = get_detector("spectre")
    assert detector is Spectre and detector.needs == frozenset({"penultimate"})
    text = detector.describe()
    assert text.startswith("spectre: SPECTRE")
    for f in fields(detector.params_class):
        assert f"{f.name}=" in text and f.metadata["provenance"] in text


def test_a_scan_through_the_api_writes_the_report_with_the_spectre_plot(tmp_path):
    import torch

    from backdoor_engine import api
    from backdoor_engine.data.dataset import make_dataset
    from backdoor_engine.models.preprocess import Normalisation
    from backdoor_engine.models.registry import build_model

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (300, 28, 28, 1), dtype=np.uint8)
    y = np.repeat(np.arange(3), 100)
    poison = np.zeros(300, np.int64)
    poison[:10] = 1
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=3, in_channels=1, input_size=28).eval()
    out = tmp_path / "spectre"
    result = api.scan(make_dataset(x, y, poison=poison), model, Normalisation((0.5,), (0.25,)), method="spectre",
                      out_dir=out, progress=False, max_dims=16)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "spectre" and report["n_samples"] == 300
    assert len(report["flagged"]) == result.detection.n_flagged == removal_count(100, 0.1, 1.5)
    assert report["params"]["max_dims"] == 16 and "classes" in report["diagnostics"]
    page = (out / "report.html").read_text()
    assert html.escape(FIGURE_TITLE) in page and "Assumed poison rate: 10%" in page
