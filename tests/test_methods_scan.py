"""SCAn ("scan"): a global identity/variation model fitted on a clean reference set, every class untangled in two
and flagged when its statistic J is a median/MAD outlier; one file plus one registry line."""

from dataclasses import fields

import numpy as np
import pytest

from backdoor_engine.detection import detection_metrics
from backdoor_engine.engine.feature_set import FeatureSet
from backdoor_engine.errors import InputError
from backdoor_engine.methods import ScanData, available_detectors, get_detector, make_detector
from backdoor_engine.methods.scan_untangling import (FIGURE_TITLE, Scan, anomaly_scores, candidate_subgroup,
                                                     global_model, reference_share_p)


def planted(seed=0, per_class=300, classes=10, dims=32, rate=0.1, shift=4.0, reference_per_class=40):
    """Gaussian classes around their own means; `rate` of class 0 carries a shifted block of 8 features (an
    all-to-one poison's trigger response), rows shuffled; plus a clean reference set drawn from the same class
    distributions without poison. Returns float32 features, labels, truth, reference features, reference labels."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (classes, dims))
    y = np.repeat(np.arange(classes), per_class)
    X = means[y] + rng.normal(0, 1, (len(y), dims))
    truth = np.zeros(len(y), bool)
    truth[rng.choice(per_class, int(rate * per_class), replace=False)] = True  # rows of class 0
    X[truth, :8] += shift
    order = rng.permutation(len(y))
    ry = np.repeat(np.arange(classes), reference_per_class)
    R = means[ry] + rng.normal(0, 1, (len(ry), dims))
    return X[order].astype(np.float32), y[order], truth[order], R.astype(np.float32), ry


def scan_data(X, y, R=None, ry=None):
    def part(features, labels):
        ids = np.arange(len(labels))
        return ScanData(ids=ids, y=labels, num_classes=int(labels.max()) + 1,
                        features=FeatureSet(ids=ids, y=labels, penultimate=features))

    data = part(X, y)
    if R is not None:
        data.reference = part(R, ry)
    return data


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scan_flags_the_poisoned_class_and_its_poison_on_planted_data(seed):
    X, y, truth, R, ry = planted(seed)
    detector = Scan()
    detection = detector.fit(X, y, R, ry)
    metrics = detection_metrics(detection.flags, truth)
    assert metrics["tpr"] >= 0.9 and metrics["fpr"] <= 0.05
    d = detection.diagnostics
    assert d["flagged_classes"] == [0] and d["threshold"] == pytest.approx(np.exp(2))
    assert d["classes"]["0"]["score"] > 3 * d["threshold"]  # the poisoned class stands far out
    assert all(d["classes"][str(k)]["score"] < d["threshold"] for k in range(1, 10))
    assert d["classes"]["0"]["n_flagged"] == detection.n_flagged
    # The flagged subgroup holds (almost) no reference sample: the clean reference samples sit with the clean rows.
    sizes = d["classes"]["0"]["subgroups"]
    assert sizes["candidate_reference"] <= 2 and sizes["other_reference"] >= 38
    assert d["classes"]["0"]["reference_p"] < 0.05 and not d["classes"]["0"]["cleared_by_reference"]
    # Scores: the class's score on its candidate subgroup, 0 elsewhere, so flags are exactly score > threshold.
    assert np.array_equal(detection.flags, detection.scores > d["threshold"])
    assert set(np.unique(detection.clusters[detection.flags])) == {1}  # 2 x class 0 + the candidate subgroup
    assert set(np.unique(detection.clusters[y == 3])) <= {6, 7}
    assert detection.params == {**detector.params.__dict__}
    assert d["global_model"]["converged"] and d["reference"]["n"] == 400 and "explanation" in d


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_clean_set_flags_no_class(seed):
    X, y, _, R, ry = planted(seed, rate=0.0)
    detection = Scan().fit(X, y, R, ry)
    d = detection.diagnostics
    assert d["flagged_classes"] == [] and detection.n_flagged == 0
    assert max(c["score"] for c in d["classes"].values()) < d["threshold"]
    assert "nothing was flagged" in d["explanation"]


def test_without_a_reference_set_scan_refuses_and_names_clean():
    X, y, *_ = planted(per_class=50)
    with pytest.raises(InputError, match="clean reference set.*--clean"):
        Scan().fit_scan(scan_data(X, y))
    with pytest.raises(InputError, match="--clean"):
        Scan().fit(X, y, None, None)
    assert get_detector("scan").needs_reference()


def test_fit_scan_reads_the_penultimate_capture_of_both_sets():
    X, y, _, R, ry = planted(per_class=100, reference_per_class=30)
    through_scan = Scan(seed=3).fit_scan(scan_data(X, y, R, ry))
    direct = Scan(seed=3).fit(X, y, R, ry)
    assert np.array_equal(through_scan.flags, direct.flags) and np.array_equal(through_scan.scores, direct.scores)
    with pytest.raises(InputError, match="'penultimate' capture"):
        Scan().fit_scan(ScanData(ids=np.arange(len(y)), y=y, num_classes=10, reference=scan_data(R, ry)))


def test_the_seed_repeats_a_run_and_is_the_scan_seed():
    X, y, _, R, ry = planted(per_class=120, rate=0.0)
    first, again = Scan(seed=5).fit(X, y, R, ry), Scan(seed=5).fit(X, y, R, ry)
    assert np.array_equal(first.clusters, again.clusters)
    assert [c["J"] for c in first.diagnostics["classes"].values()] == \
           [c["J"] for c in again.diagnostics["classes"].values()]
    other = Scan(seed=6).fit(X, y, R, ry)  # a clean class splits where its random start leads it
    assert not np.array_equal(first.clusters, other.clusters)
    assert get_detector("scan").seed_param == "seed"


def test_the_statistic_and_global_model_are_the_direct_formulas():
    """Our whitened, low-rank computation against the model's formulas written out with D x D pseudo-inverses, as
    the reference code does (one EM step at a time, then J of the split the detector found)."""
    X, y, _, R, ry = planted(seed=4, per_class=60, classes=4, dims=6, reference_per_class=15)
    R64 = R.astype(np.float64) - R.mean(axis=0)
    labels = np.unique(ry)
    counts = np.array([(ry == k).sum() for k in labels])
    means = np.array([R64[ry == k].mean(axis=0) for k in labels])
    u = means[np.searchsorted(labels, ry)]
    Su, Se = np.cov(u.T), np.cov((R64 - u).T)
    for _ in range(3):  # E-step: identity = Se (n Su + Se)^+ Su Se^+ sum(x); M-step: covariances (ddof 1)
        F = np.linalg.pinv(Se)
        ids = np.array([Se @ np.linalg.pinv(n * Su + Se) @ Su @ F @ R64[ry == k].sum(axis=0)
                        for k, n in zip(labels, counts)])
        u = ids[np.searchsorted(labels, ry)]
        Su, Se = np.cov(u.T), np.cov((R64 - u).T)
    model = global_model(R, ry, max_iter=3, tol=1e-15)
    assert model.iterations == 3 and model.basis is None
    assert np.allclose(model.Su, Su, rtol=1e-9, atol=1e-12) and np.allclose(model.Se, Se, rtol=1e-9, atol=1e-12)

    for identity in ("posterior", "official"):
        detector = Scan(null_identity=identity, tail="both", max_iter=3, tol=1e-15)
        detection = detector.fit(X, y, R, ry)
        centre = np.concatenate([X, R]).astype(np.float64).mean(axis=0)
        F = np.linalg.pinv(Se)
        J = []
        for k in range(4):
            C = np.concatenate([X[y == k], R[ry == k]]).astype(np.float64) - centre
            N = len(C)
            G = np.linalg.pinv(N * Su + Se)
            mu = (Su if identity == "posterior" else Se) @ G @ C.sum(axis=0)
            groups = detector.classes_[k].groups
            sub = np.where(groups[:, None], C[groups].mean(axis=0), C[~groups].mean(axis=0))
            one, two = C - mu, C - sub
            J.append((np.einsum("ij,jk,ik->i", one, F, one) - np.einsum("ij,jk,ik->i", two, F, two)).mean())
            assert detector.classes_[k].J == pytest.approx(J[-1], rel=1e-8)
        J = np.array(J)
        mad = np.median(np.abs(J - np.median(J)))
        expected = np.abs(J - np.median(J)) / (1.4826 * mad)  # calc_anomaly_index of J / max(J), scale-free
        assert [detector.classes_[k].score for k in range(4)] == pytest.approx(list(expected), rel=1e-6, abs=1e-9)
        assert detection.diagnostics["null_identity"] == identity


def test_the_anomaly_score_is_the_median_mad_outlier_index():
    J = np.array([1.0, 2.0, 3.0, 4.0, 100.0])  # median 3, MAD 1
    upper, median, mad = anomaly_scores(J, "upper")
    assert (median, mad) == (3.0, 1.0)
    assert upper == pytest.approx([0, 0, 0, 1 / 1.4826, 97 / 1.4826])
    both, _, _ = anomaly_scores(J, "both")
    assert both == pytest.approx([2 / 1.4826, 1 / 1.4826, 0, 1 / 1.4826, 97 / 1.4826])
    # Scale-free, as the reference's J / max(J): only the ranks of deviations matter.
    assert anomaly_scores(J * 1e6, "both")[0] == pytest.approx(both)
    assert anomaly_scores(J[:2], "upper")[0] is None  # fewer than 3 classes
    assert anomaly_scores(np.array([2.0, 2.0, 2.0, 5.0]), "upper")[0] is None  # MAD 0


def benign_split(seed, label=3, share=0.4, shift=6.0):
    """A clean planted set whose class `label` is two sub-populations (share of it shifted on features 8-15),
    in the suspect and the reference set alike: a split within clean data, as bags with and without handles."""
    X, y, _, R, ry = planted(seed, rate=0.0)
    rng = np.random.default_rng(seed + 100)
    for features, labels in ((X, y), (R, ry)):
        rows = np.flatnonzero(labels == label)
        features[rng.choice(rows, int(round(share * len(rows))), replace=False), 8:16] += shift
    return X, y, R, ry


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_benign_split_that_scores_above_the_threshold_is_cleared_by_its_share_of_the_reference(seed):
    X, y, R, ry = benign_split(seed)
    official = Scan(reference_alpha=None).fit(X, y, R, ry)
    assert official.diagnostics["flagged_classes"] == [3]  # the reference codes' rule flags the clean class
    assert official.n_flagged > 100
    detection = Scan().fit(X, y, R, ry)
    d = detection.diagnostics
    c = d["classes"]["3"]
    assert c["score"] > d["threshold"] and c["score"] == official.diagnostics["classes"]["3"]["score"]
    assert d["flagged_classes"] == [] and detection.n_flagged == 0
    assert c["cleared_by_reference"] and c["reference_p"] >= 0.05 and c["reference_floor"] < 1e-6
    assert c["subgroups"]["candidate_reference"] >= 8  # the shifted part holds its share of the 40 clean samples
    assert "Class 3 scored" in d["explanation"] and "not an injected subgroup" in d["explanation"]
    assert "nothing was flagged" in d["explanation"]


def test_the_reference_share_p_is_the_doubled_binomial_tail_of_the_candidate():
    sizes = {"candidate": 404, "other": 592, "candidate_reference": 16, "other_reference": 34}
    from scipy.stats import binom
    p, floor = reference_share_p(sizes)
    assert p == pytest.approx(2 * binom.cdf(16, 50, 404 / 996))
    assert floor == pytest.approx(2 * (1 - 404 / 996) ** 50)
    assert reference_share_p({**sizes, "candidate_reference": 40, "other_reference": 10})[0] == 1.0  # capped
    # no reference sample: nothing to tell, the floor says so
    assert reference_share_p({**sizes, "candidate_reference": 0, "other_reference": 0}) == (1.0, 1.0)
    # a poisoned candidate: half the class and none of 50 reference samples
    assert reference_share_p({"candidate": 1000, "other": 1000, "candidate_reference": 0,
                              "other_reference": 50})[0] == pytest.approx(2 * 0.5 ** 50)


def test_the_candidate_subgroup_is_the_one_with_fewer_reference_samples():
    # 6 suspect rows, then 4 reference rows; True = subgroup 1
    groups = np.array([1, 1, 1, 1, 0, 0] + [0, 0, 0, 1], bool)
    assert candidate_subgroup(groups, 6) == 1  # subgroup 1 holds 1 reference sample, subgroup 0 three
    assert candidate_subgroup(~groups, 6) == 0
    tie = np.array([1, 1, 1, 1, 0, 0] + [0, 0, 1, 1], bool)
    assert candidate_subgroup(tie, 6) == 0  # a tie: the smaller suspect subgroup
    assert candidate_subgroup(np.array([1, 1, 0, 0], bool), 4) == 1  # no reference, same sizes: subgroup 1
    assert candidate_subgroup(np.ones(5, bool), 3) is None  # no split


def test_a_class_missing_from_the_reference_is_scanned_and_its_smaller_subgroup_flagged(tmp_path):
    X, y, truth, R, ry = planted(seed=1)
    keep = ry != 0
    detector = Scan()
    detection = detector.fit(X, y, R[keep], ry[keep])
    assert detection.diagnostics["flagged_classes"] == [0]
    metrics = detection_metrics(detection.flags, truth)
    assert metrics["tpr"] >= 0.9 and metrics["fpr"] <= 0.05
    assert detection.diagnostics["reference"]["missing_classes"] == [0]
    # the reference-share check cannot tell without reference samples: flagged on its score, and it says so
    assert detection.diagnostics["classes"]["0"]["reference_floor"] == 1.0
    assert "too few reference samples for the reference-share check" in detection.diagnostics["explanation"]
    notes = detector.report(detection, None, tmp_path).notes
    assert any("no sample of class(es) 0" in note for note in notes)


def test_the_report_has_the_score_chart_and_says_how_big_the_reference_set_was(tmp_path):
    X, y, _, R, ry = planted(seed=2)
    detector = Scan()
    detection = detector.fit(X, y, R, ry)
    parts = detector.report(detection, None, tmp_path)
    assert [title for title, _ in parts.figures] == [FIGURE_TITLE]
    assert parts.figures[0][1].startswith(b"\x89PNG")
    assert parts.notes[0] == detection.diagnostics["explanation"]
    assert any("Clean reference set: 400 samples in 10 classes (40 to 40 per class)" in note for note in parts.notes)
    assert detector.report(detection, None, None).figures == []  # no files written: no figure


def test_fewer_than_three_classes_flag_nothing_and_say_why():
    X, y, _, R, ry = planted(classes=2)
    detection = Scan().fit(X, y, R, ry)
    d = detection.diagnostics
    assert detection.n_flagged == 0 and not d["normalised"] and "at least 3 classes" in d["explanation"]
    assert all(c["score"] is None and c["J"] is not None for c in d["classes"].values())


def test_a_reference_set_smaller_than_the_feature_dimension_works_in_its_subspace():
    X, y, truth, R, ry = planted(seed=0, dims=48, reference_per_class=4)  # 40 reference samples, 48 dims
    R[:, -3:] = 0  # and three dead features
    X[:, -3:] = 0
    detection = Scan().fit(X, y, R, ry)
    g = detection.diagnostics["global_model"]
    assert g["dims"] == 48 and g["subspace_dims"] == 30  # 40 samples - 10 class means
    assert "only 30 of the 48 feature directions" in detection.diagnostics["explanation"]
    assert detection.diagnostics["flagged_classes"] == [0]
    assert detection_metrics(detection.flags, truth)["tpr"] >= 0.9


def test_bad_input_is_refused_with_an_error_that_names_it():
    X, y, _, R, ry = planted(per_class=40, reference_per_class=10)
    with pytest.raises(InputError, match="at least two classes"):
        Scan().fit(X, y, R[ry == 1], ry[ry == 1])
    with pytest.raises(InputError, match="clean reference set: features have 31 columns"):
        Scan().fit(X, y, R[:, :31], ry)
    with pytest.raises(InputError, match="clean reference set: y: expected 100 labels"):
        Scan().fit(X, y, R, ry[:50])
    bad = R.copy()
    bad[5, 2] = np.nan
    with pytest.raises(InputError, match="clean reference set features: row 5 .*non-finite"):
        Scan().fit(X, y, bad, ry)
    bad = X.copy()
    bad[7, 3] = np.inf
    with pytest.raises(InputError, match="features: row 7 .*non-finite"):
        Scan().fit(bad, y, R, ry)
    with pytest.raises(InputError, match="integer class labels"):
        Scan().fit(X, y.astype(float), R, ry)
    same = np.repeat(R[::10], 10, axis=0)  # every reference class one repeated point
    with pytest.raises(InputError, match="no variation within its classes"):
        Scan().fit(X, y, same, ry)


def test_parameters_are_checked_by_name_and_value():
    with pytest.raises(InputError, match="unknown parameter.*thresh"):
        make_detector("scan", {"thresh": 3})
    with pytest.raises(InputError, match="tail must be one of"):
        make_detector("scan", {"tail": "lower"})
    with pytest.raises(InputError, match="null_identity must be one of"):
        make_detector("scan", {"null_identity": "mle"})
    with pytest.raises(InputError, match="threshold must be > 0"):
        make_detector("scan", {"threshold": 0})
    with pytest.raises(InputError, match="threshold must be a finite number"):
        make_detector("scan", {"threshold": float("nan")})
    with pytest.raises(InputError, match="max_iter must be >= 1"):
        make_detector("scan", {"max_iter": 0})
    with pytest.raises(InputError, match="tol must be in"):
        make_detector("scan", {"tol": 2.0})
    with pytest.raises(InputError, match="seed must be in"):
        make_detector("scan", {"seed": -1})
    for alpha in (0, 1, 1.5):
        with pytest.raises(InputError, match="reference_alpha must be in"):
            make_detector("scan", {"reference_alpha": alpha})
    assert make_detector("scan", {"reference_alpha": None}).params.reference_alpha is None
    assert make_detector("scan", {"tail": "BOTH", "threshold": np.e}).params.tail == "both"


def test_scan_is_registered_and_describes_every_parameter():
    assert "scan" in available_detectors()
    detector = get_detector("scan")
    assert detector is Scan and detector.needs == frozenset({"penultimate", "reference"})
    assert detector.captures() == ("penultimate",) and detector.needs_model()
    text = detector.describe()
    for f in fields(detector.params_class):
        assert f"{f.name}=" in text and f.metadata["provenance"] in text


def test_a_scan_through_the_api_with_a_clean_set_writes_the_report_with_the_score_chart(tmp_path):
    import json

    import torch

    from backdoor_engine import api
    from backdoor_engine.data.dataset import make_dataset
    from backdoor_engine.models.preprocess import Normalisation
    from backdoor_engine.models.registry import build_model

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (240, 28, 28, 1), dtype=np.uint8), np.repeat(np.arange(3), 80)
    clean_x, clean_y = rng.integers(0, 256, (60, 28, 28, 1), dtype=np.uint8), np.repeat(np.arange(3), 20)
    torch.manual_seed(0)
    model = build_model("small_resnet", num_classes=3, in_channels=1, input_size=28).eval()
    normalisation = Normalisation((0.5,), (0.25,))
    with pytest.raises(InputError, match="--clean"):
        api.scan(make_dataset(x, y), model, normalisation, method="scan", progress=False)
    out = tmp_path / "scan"
    result = api.scan(make_dataset(x, y), model, normalisation, method="scan", out_dir=out, progress=False,
                      clean=make_dataset(clean_x, clean_y))
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "scan" and report["n_samples"] == 240
    assert len(report["flagged"]) == result.detection.n_flagged
    assert report["diagnostics"]["reference"]["n"] == 60 and set(report["diagnostics"]["classes"]) == {"0", "1", "2"}
    page = (out / "report.html").read_text()
    assert FIGURE_TITLE in page and "Clean reference set: 60 samples in 3 classes" in page
