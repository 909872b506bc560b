"""FLARE's source-minority stage (flare_minority) on planted trees: the footprint's label as a minority inside one
source class's cluster is read where it outnumbers every other off-label, and a clean class's confusion is not."""

from types import SimpleNamespace

import numpy as np
import pytest

from backdoor_engine import cluster
from backdoor_engine.methods.flare import FlareParams
from backdoor_engine.methods.flare_minority import label_minorities, minority_members

PARAMS = FlareParams(min_cluster_size=40)


def planted(seed=0, confused=25):
    """Four far-apart 2-D blobs, each one cluster: label 1 (300) holding 60 relabelled poison (label 0) and 2 label-3
    samples; label 2 (300) holding `confused` clean label-0 samples and 30 of label 3 (a class's natural confusion);
    label 3 (300); label 0 (500, of which 250 found poison: the flags). Returns embedding, y, flags, poison."""
    rng = np.random.default_rng(seed)
    groups = [(np.array([0.0, 0.0]), [1] * 300 + [0] * 60 + [3] * 2),
              (np.array([20.0, 0.0]), [2] * 300 + [0] * confused + [3] * 30),
              (np.array([0.0, 20.0]), [3] * 300),
              (np.array([20.0, 20.0]), [0] * 500)]
    points = np.vstack([centre + rng.normal(0, 1.0, (len(labels), 2)) for centre, labels in groups])
    y = np.concatenate([labels for _, labels in groups])
    poison = np.zeros(len(y), bool)
    poison[300:360] = True
    flags = np.zeros(len(y), bool)
    start = len(y) - 500
    flags[start:start + 250] = True  # the found poison, with label 0 inflated (925 against a median of 332)
    poison[start:start + 250] = True
    return points.astype(np.float32), y, flags, poison


def tree_of(points):
    return cluster.hdbscan(points, min_cluster_size=40).condensed_tree


def test_the_label_inside_a_source_class_is_read_and_a_class_confusion_is_not():
    points, y, flags, poison = planted()
    found, nodes = label_minorities(tree_of(points), y, 0, purity=0.8, ratio=5.0, min_members=20)
    assert found[300:360].all()  # the 60 relabelled samples inside label 1's cluster, 30 times the next off-label
    assert found.sum() == 60 and not (found & ~poison).any()  # label 2's 25 label-0 trail its 30 of label 3
    assert {n["host"] for n in nodes} == {1} and all(n["next_off_label"] == 2 for n in nodes)
    fewer = label_minorities(tree_of(points), y, 0, purity=0.8, ratio=5.0, min_members=61)[0]
    assert not fewer.any()  # below min_members nothing is read


def test_the_stage_adds_what_most_runs_trees_put_in_a_minority_and_only_unflagged_members_of_the_label():
    points, y, flags, poison = planted()
    apart = points.copy()
    apart[300:360] += [40.0, 40.0]  # a run whose embedding carried the relabelled samples out of label 1's cluster
    inside, outside = (SimpleNamespace(condensed_tree=tree_of(p)) for p in (points, apart))
    add, summary = minority_members(flags, [inside, inside, outside], y, PARAMS)
    assert add.sum() == 60 and (add == (poison & ~flags)).all()
    assert summary["applied"] and summary["added"] == 60 and summary["runs"] == 3
    assert not minority_members(flags, [inside, outside, outside], y, PARAMS)[0].any()  # one run of three
    no_tree = SimpleNamespace(condensed_tree=None)  # runs without a tree do not vote
    assert minority_members(flags, [inside, no_tree, no_tree], y, PARAMS)[0].sum() == 60
    flags[300:330] = True  # already flagged members are not added again
    assert minority_members(flags, [inside], y, PARAMS)[0].sum() == 30


@pytest.mark.parametrize("case", ["not inflated", "nothing flagged"])
def test_flags_that_are_not_the_footprint_add_nothing(case):
    points, y, flags, _ = planted(confused=80)  # label 2's 80 label-0 now outnumber its label 3 only 2.7 times
    if case == "nothing flagged":
        flags[:] = False
    else:
        flags[:] = False
        flags[:300] = True  # label 1 flagged: not an inflated label
    add, summary = minority_members(flags, [SimpleNamespace(condensed_tree=tree_of(points))], y, PARAMS)
    assert not add.any()
    assert summary is None if case == "nothing flagged" else summary["reason"].startswith("the flags are not")


def test_a_scan_with_source_minority_flags_the_minority_and_marks_it_in_flagged_by(monkeypatch):
    from backdoor_engine.engine import FeatureLayout
    from backdoor_engine.methods import flare as flare_module

    points, y, flags, poison = planted()
    tree = tree_of(points)
    X = np.hstack([points, np.zeros((len(y), 2), np.float32)])

    def found_run(features, layout, y_, params, random_state, **_):  # the run that found the label's own cluster
        return flare_module.FlareRun(random_state, [], flags.copy(), np.zeros(len(y), int), points, tree, 0,
                                     {"steps": []})

    monkeypatch.setattr(flare_module, "fit_once", found_run)
    only = dict(n_seeds=1, min_cluster_size=40, recover_neighbors=None, complete_footprint=False,
                footprint_components=None, residual_probe=False, settle=False, footprint_exclusion=False)
    layout = FeatureLayout(("a", "b"), (2, 2))
    plain = flare_module.Flare(**only).fit(X, layout, y=y)
    added = flare_module.Flare(**only, source_minority=True).fit(X, layout, y=y)
    assert (plain.flags == flags).all() and "minority" not in plain.diagnostics
    assert (added.flags == (flags | poison)).all()
    by = added.columns["flagged_by"]
    assert (by == "minority").sum() == 60 == added.diagnostics["flagged_by"]["minority"]
    assert added.diagnostics["minority"]["added"] == 60


def test_the_report_says_what_the_minority_stage_added_and_nothing_when_it_added_nothing():
    from backdoor_engine.detection import Detection
    from backdoor_engine.methods.flare_sampled import SampledFlare

    sampled = SampledFlare(n_seeds=1)
    base = {"sampled": {"n_sample": 10, "n_rows": 10}}
    applied = {"label": 0, "applied": True, "added": 69, "runs": 5, "nodes": []}
    notes = sampled.report(Detection("flare", np.zeros(10, bool), diagnostics={**base, "minority": applied}),
                           None, None).notes
    assert any(note.startswith("69 more samples of label 0 were flagged") and "(source_minority)" in note
               for note in notes)
    none = {"label": 0, "applied": False, "added": 0, "runs": 5, "nodes": [],
            "reason": "no minority of the label in most runs' trees"}
    notes = sampled.report(Detection("flare", np.zeros(10, bool), diagnostics={**base, "minority": none}),
                           None, None).notes
    assert not any("source_minority" in note for note in notes)


@pytest.mark.parametrize("bad", [dict(minority_ratio=0.5), dict(minority_ratio=float("nan")), dict(minority_ratio=True),
                                 dict(minority_ratio=float("inf")),
                                 dict(minority_min_members=0), dict(minority_min_members=2.5)])
def test_bad_minority_parameters_are_refused_by_name(bad):
    from backdoor_engine.errors import InputError

    with pytest.raises(InputError, match=next(iter(bad))):
        FlareParams(**bad)
