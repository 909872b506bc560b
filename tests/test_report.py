"""Scan reports: the report.json schema of DESIGN.md, one CSV row per sample, a self-contained HTML page."""

import csv
import json

import numpy as np
import pytest

from backdoor_engine.data import make_dataset
from backdoor_engine.errors import InputError
from backdoor_engine.detection import Detection, detection_metrics
from backdoor_engine.report import write_report


@pytest.fixture
def scanned():
    rng = np.random.default_rng(0)
    n = 200
    poison = np.zeros(n, np.uint8)
    poison[:20] = 1
    dataset = make_dataset(rng.integers(0, 256, (n, 12, 12, 1), dtype=np.uint8), rng.integers(0, 4, n),
                           ids=np.array([f"img-{i}" for i in range(n)]), poison=poison)
    flags = np.zeros(n, bool)
    flags[:15] = True  # 15 of 20 poisoned found
    flags[100:105] = True  # 5 clean flagged
    scores = rng.random(n)
    detection = Detection("flare", flags=flags, scores=scores, clusters=flags.astype(int),
                          embedding=rng.normal(size=(n, 2)), params={"xi": 0.02},
                          diagnostics={"subspace": np.int64(3), "gaps": np.array([0.1, 0.5])})
    return dataset, detection


def test_metrics_count_the_confusion_matrix():
    m = detection_metrics(np.array([1, 1, 0, 0, 1], bool), np.array([1, 0, 0, 1, 1]))
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 1, 1)
    assert m["tpr"] == pytest.approx(2 / 3) and m["fpr"] == pytest.approx(1 / 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)


def test_report_json_follows_the_contract(tmp_path, scanned):
    dataset, detection = scanned
    write_report(tmp_path, detection, dataset, timings_s={"extract": 1.0, "cluster": 2.5})
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("method", "params", "n_samples", "flagged", "diagnostics", "timings_s", "versions", "metrics"):
        assert key in report
    assert report["n_samples"] == 200
    assert report["flagged"] == [f"img-{i}" for i in list(range(15)) + list(range(100, 105))]
    assert report["metrics"]["tpr"] == pytest.approx(0.75)
    assert report["metrics"]["fpr"] == pytest.approx(5 / 180)
    assert report["diagnostics"] == {"subspace": 3, "gaps": [0.1, 0.5]}
    assert "scores" not in report


def test_samples_csv_has_one_row_per_sample_with_ground_truth(tmp_path, scanned):
    dataset, detection = scanned
    write_report(tmp_path, detection, dataset, timings_s={})
    rows = list(csv.DictReader((tmp_path / "samples.csv").open()))
    assert len(rows) == 200
    assert rows[0] == {"id": "img-0", "label": str(dataset.y[0]), "flagged": "1",
                       "score": f"{detection.scores[0]:.6g}", "cluster": "1", "poison": "1"}
    assert sum(r["flagged"] == "1" for r in rows) == 20


def test_text_columns_are_written_as_they_are_beside_numbers_and_empty_nan(tmp_path, scanned):
    dataset, detection = scanned
    stage = np.where(detection.flags, "vote", "").astype(object)
    stage[100] = "residual, probe"  # a comma: the CSV writer quotes it
    detection.columns = {"flagged_by": stage, "runs_voted": np.arange(200), "share": np.full(200, np.nan)}
    write_report(tmp_path, detection, dataset, timings_s={})
    rows = list(csv.DictReader((tmp_path / "samples.csv").open()))
    assert [rows[i]["flagged_by"] for i in (0, 20, 100)] == ["vote", "", "residual, probe"]
    assert rows[7]["runs_voted"] == "7" and rows[7]["share"] == ""


def test_html_is_self_contained_with_plots_and_metrics(tmp_path, scanned):
    dataset, detection = scanned
    write_report(tmp_path, detection, dataset, timings_s={"extract": 1.0}, figures=[("Condensed tree", b"\x89PNG")])
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # embedding, the extra figure, the montage
    assert "Condensed tree" in page and "Most suspicious samples" in page
    assert "75.00%" in page  # TPR
    assert "src=\"http" not in page


def test_detection_rejects_columns_of_the_wrong_length():
    with pytest.raises(InputError, match="scores"):
        Detection("flare", flags=np.zeros(5, bool), scores=np.zeros(4))


def test_condensed_tree_plot_renders_a_real_tree_with_marks():
    import hdbscan

    from backdoor_engine.cluster import CondensedTree
    from backdoor_engine.report.figures import condensed_tree_png

    rng = np.random.default_rng(0)
    points = np.vstack([rng.normal(0, 1, (300, 2)), rng.normal(8, 0.3, (60, 2)), np.zeros((5, 2))])  # with duplicates
    tree = CondensedTree.from_hdbscan(hdbscan.HDBSCAN(min_cluster_size=20).fit(points))
    child = tree.child[(tree.parent == tree.root) & (tree.child >= tree.root)][0]
    png = condensed_tree_png(tree, {int(child): ("#d64545", "flagged")})
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
