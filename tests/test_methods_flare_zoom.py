"""FLARE's zoom stage (flare_zoom) on planted data: a run whose tree keeps the trigger's population inside one
cluster of benign classes, and features in which that population stands apart."""

from types import SimpleNamespace

import numpy as np
import pytest

from backdoor_engine import cluster
from backdoor_engine.engine import FeatureLayout
from backdoor_engine.methods.flare import FlareParams
from backdoor_engine.methods.flare_zoom import read_zoomed, zoom_footprint, zoom_region

PARAMS = FlareParams(min_cluster_size=40)


def planted(cover_labels="spread", seed=0):
    """10 labels. Inside the region: clean label 0 (300) and labels 1-3 (300 each), plus a population carrying the
    trigger: 250 samples relabelled 0 and 100 cover samples (10 of each label 0-9 with cover_labels="spread"; all
    label 1 with "one", the clean class's confused neighbour). Outside it: labels 4-9 (300 each) and 200 relabelled
    samples found already (the flags). Features (8 columns): the region's classes near each other, the trigger's
    population 6 apart along its own column, the other classes far. The run's 2-D embedding puts the whole region in
    one blob. Returns X, y, flags, poison, population, embedding."""
    rng = np.random.default_rng(seed)
    parts, labels, blobs = [], [], []
    centres = rng.normal(0, 0.6, (10, 8))
    centres[4:, 0] += 12 + 3 * np.arange(6)  # the classes outside the region, far
    for label in range(10):
        parts.append(centres[label] + rng.normal(0, 0.3, (300, 8)))
        labels += [label] * 300
        blobs.append(0 if label < 4 else label)
    sources = rng.integers(1, 4, 250)  # relabelled from the region's classes, and carrying the trigger
    trigger = np.zeros(8)
    trigger[7] = 6.0
    parts.append(centres[sources] + trigger + rng.normal(0, 0.3, (250, 8)))
    labels += [0] * 250
    blobs.append(0)
    cover_y = np.repeat(np.arange(10), 10) if cover_labels == "spread" else np.r_[[0] * 10, [1] * 90]
    parts.append(centres[np.minimum(cover_y, 3)] + trigger + rng.normal(0, 0.3, (100, 8)))
    labels += cover_y.tolist()
    blobs.append(0)
    found = centres[5] + np.r_[0, 0, 0, 0, 0, 0, 4.0, 0] + rng.normal(0, 0.3, (200, 8))  # found: its own cluster
    parts.append(found)
    labels += [0] * 200
    blobs.append(20)
    X, y = np.vstack(parts).astype(np.float32), np.array(labels)
    n = len(y)
    flags = np.zeros(n, bool)
    flags[-200:] = True
    poison = np.zeros(n, bool)
    poison[3000:3250] = True
    population = np.zeros(n, bool)
    population[3000:3350] = True
    # the run's embedding: one blob per group of rows as above, the region (blob 0) one round blob of all its rows
    sizes = [300] * 10 + [250, 100, 200]
    group = np.repeat(np.arange(len(sizes)), sizes)
    blob_of = np.array(blobs)[group]
    where = {b: rng.normal(0, 1, 2) * 0 + np.array([6.0 * (b % 7), 6.0 * (b // 7)]) for b in set(blobs)}
    embedding = np.vstack([where[b] for b in blob_of]) + rng.normal(0, 0.5, (n, 2))
    return X, y, flags, poison, population, embedding.astype(np.float32)


def run_of(embedding):
    fit = cluster.hdbscan(embedding, min_cluster_size=PARAMS.min_cluster_size, backend="hdbscan")
    return SimpleNamespace(condensed_tree=fit.condensed_tree, subspace=0)


LAYOUT = FeatureLayout(("a", "b"), (4, 4))


def test_the_zoom_steps_into_the_cluster_that_holds_the_labels_unflagged_samples():
    X, y, flags, poison, population, embedding = planted()
    run = run_of(embedding)
    node, path = zoom_region(run.condensed_tree, flags, y, 0)
    assert node is not None and path[0] == run.condensed_tree.root and path[-1] == node
    region = cluster.members(run.condensed_tree, node)
    inside = np.zeros(len(y), bool)
    inside[region] = True
    # the region is the clothing blob: all of the unflagged label 0, none of the classes outside it
    assert inside[~flags & (y == 0)].mean() >= 0.95 and inside[population].mean() >= 0.95
    assert inside[3000 - 6 * 300:3000].mean() <= 0.02 and not inside[flags].any()
    # no step goes below the unexplained excess: each node on the path holds all 560 unflagged label-0 samples, so
    # with 560 unexplained the path is the same, and with 561 no node below the root has room for the rest
    assert zoom_region(run.condensed_tree, flags, y, 0, unexplained=560) == (node, path)
    assert zoom_region(run.condensed_tree, flags, y, 0, unexplained=561) == (None, [run.condensed_tree.root])


def test_alone_the_region_divides_and_its_trigger_population_with_spread_covers_is_read_as_the_footprint():
    X, y, flags, poison, population, embedding = planted()
    add, summary = zoom_footprint(flags, X, LAYOUT, y, run_of(embedding), PARAMS)
    assert summary["applied"], summary
    assert add[poison].mean() >= 0.95  # the relabelled poison inside the region
    assert (add & ~population).sum() <= 5  # no clean label-0 samples beyond a few
    assert not (add & (y != 0)).any() and not (add & flags).any()  # covers of other labels stay unflagged
    read = [row for row in summary["clusters"] if row["reading"] == "footprint with covers"]
    assert read and read[0]["neighbour_share"] < PARAMS.class_neighbour_share


def test_a_population_whose_other_labels_are_one_neighbouring_class_is_not_read_as_the_footprint():
    # the same population, but its other members are all of one class: a clean class's sub-island keeps the
    # class it is confused with, and nothing is added
    X, y, flags, poison, population, embedding = planted(cover_labels="one")
    add, summary = zoom_footprint(flags, X, LAYOUT, y, run_of(embedding), PARAMS)
    assert not add.any() and not summary["applied"]
    assert summary["reason"] == "no cluster of the region reads as the rest of the footprint"
    assert any(row["top_label"] == 0 and row["neighbour_share"] >= PARAMS.class_neighbour_share
               for row in summary["clusters"])
    # the clean label-0 class splits off purely when zoomed; it is not read as the footprint either
    assert any(row["top_label"] == 0 and row["purity"] >= 0.99 and row["unflagged_of_label"] >= 250
               for row in summary["clusters"])


def test_flags_that_explain_the_labels_excess_are_not_zoomed():
    X, y, flags, poison, population, embedding = planted()
    complete = flags | poison
    add, summary = zoom_footprint(complete, X, LAYOUT, y, run_of(embedding), PARAMS)
    assert not add.any() and summary["unexplained"] < PARAMS.min_cluster_size
    assert summary["reason"] == "the flags are not an incomplete all-to-one footprint"
    assert zoom_footprint(np.zeros(len(y), bool), X, LAYOUT, y, run_of(embedding), PARAMS) == (
        pytest.approx(np.zeros(len(y), bool)), None)


def test_a_population_larger_than_the_unexplained_excess_allows_is_not_taken():
    X, y, flags, poison, population, embedding = planted()
    run = run_of(embedding)
    node, _ = zoom_region(run.condensed_tree, flags, y, 0)
    rows = cluster.members(run.condensed_tree, node)
    from backdoor_engine.methods.flare_zoom import embed_region

    tree = embed_region(X[rows], PARAMS).condensed_tree
    found, _ = read_zoomed(tree, rows, flags, y, 0, 250, PARAMS)
    assert found is not None and poison[found].sum() >= 240
    found, examined = read_zoomed(tree, rows, flags, y, 0, 150, PARAMS)  # at most 150 x 10 / 9 + 40 = 206 < 260
    assert found is None and any("outside" in str(row["reading"]) for row in examined)


def test_the_report_says_what_the_zoom_found_or_why_it_took_nothing():
    from backdoor_engine.detection import Detection
    from backdoor_engine.methods.flare_sampled import SampledFlare

    sampled = SampledFlare(n_seeds=1)
    base = {"sampled": {"n_sample": 10, "n_rows": 10}}
    applied = {"label": 0, "unexplained": 760, "applied": True, "region_node": 10012, "region_size": 6552,
               "added": 830, "clusters": []}
    notes = sampled.report(Detection("flare", np.zeros(10, bool), diagnostics={**base, "zoom": applied}),
                           None, None).notes
    assert any("cluster of 6,552 samples that held most of label 0's unflagged samples was embedded and clustered "
               "alone" in note and "its 830 unflagged members of the label were flagged (footprint_zoom)" in note
               for note in notes)
    refused = {"label": 0, "unexplained": 760, "applied": False, "region_size": 6552, "clusters": [],
               "reason": "no cluster of the region reads as the rest of the footprint"}
    notes = sampled.report(Detection("flare", np.zeros(10, bool), diagnostics={**base, "zoom": refused}),
                           None, None).notes
    assert any("alone: no cluster of the region reads as the rest of the footprint (footprint_zoom)" in note
               for note in notes)
    small = {"label": 0, "unexplained": 120, "applied": False, "region_size": 180,
             "reason": "the region is too small to divide"}  # not embedded: the note does not say it was
    notes = sampled.report(Detection("flare", np.zeros(10, bool), diagnostics={**base, "zoom": small}),
                           None, None).notes
    assert any("cluster of 180 samples that held most of label 0's unflagged samples was not zoomed: the region is "
               "too small to divide (footprint_zoom)" in note for note in notes)
    gate = {"label": 0, "unexplained": 3, "applied": False, "reason": "the flags are not an incomplete all-to-one "
            "footprint"}  # not zoomed: no note
    notes = sampled.report(Detection("flare", np.zeros(10, bool), diagnostics={**base, "zoom": gate}),
                           None, None).notes
    assert not any("footprint_zoom" in note for note in notes)


def test_a_scan_with_footprint_zoom_flags_what_the_zoom_reads_and_marks_it_in_flagged_by(monkeypatch):
    from backdoor_engine.methods import flare as flare_module

    X, y, flags, poison, population, embedding = planted()
    fit = cluster.hdbscan(embedding, min_cluster_size=PARAMS.min_cluster_size, backend="hdbscan")

    def found_run(features, layout, y_, params, random_state, **_):  # the run that found the far-source poison
        return flare_module.FlareRun(random_state, [], flags.copy(), np.zeros(len(y), int), embedding,
                                     fit.condensed_tree, 0, {"steps": []})

    monkeypatch.setattr(flare_module, "fit_once", found_run)
    only = dict(n_seeds=1, min_cluster_size=PARAMS.min_cluster_size, recover_neighbors=None,
                complete_footprint=False, footprint_components=None, residual_probe=False, settle=False)
    plain = flare_module.Flare(**only).fit(X, LAYOUT, y=y)
    zoomed = flare_module.Flare(**only, footprint_zoom=True).fit(X, LAYOUT, y=y)
    assert (plain.flags == flags).all() and "zoom" not in plain.diagnostics
    by = zoomed.columns["flagged_by"]
    assert zoomed.diagnostics["zoom"]["applied"] and (by == "zoom").sum() == zoomed.diagnostics["zoom"]["added"]
    assert zoomed.flags[poison].mean() >= 0.95 and (zoomed.flags & ~flags & ~population).sum() <= 5
    assert zoomed.diagnostics["flagged_by"]["zoom"] == (by == "zoom").sum()
