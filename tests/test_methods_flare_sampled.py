"""FLARE at scale: stratified sample, projection, FAISS assignment, and agreement with FLARE on every row."""

import numpy as np
import pytest

from backdoor_engine.cluster.assign import ReferenceIndex, vote
from backdoor_engine.cluster.projection import fit_projection, project_rows
from backdoor_engine.engine import FeatureLayout
from backdoor_engine.errors import InputError
from backdoor_engine.methods.flare import FLAGGED_BY, Flare, subspace_matrix
from backdoor_engine.methods.flare_sampled import SampledFlare, stratified_sample, subspace_columns

LAYOUT = FeatureLayout(("bn1", "bn2", "bn3"), (4, 4, 4))


def planted(n_clean, n_poison, seed=0):
    """A clean blob labelled 0-3 and an all-to-one poison blob relabelled 0, rows shuffled."""
    rng = np.random.default_rng(seed)
    features = np.vstack([rng.normal(0, 1, (n_clean, 12)), rng.normal(0, 1, (n_poison, 12)) + 6.0])
    truth = np.r_[np.zeros(n_clean, bool), np.ones(n_poison, bool)]
    labels = np.r_[rng.integers(0, 4, n_clean), np.zeros(n_poison, int)]
    order = rng.permutation(len(truth))
    return features[order].astype(np.float32), truth[order], labels[order]


def test_a_stratified_sample_keeps_every_label_share_and_is_seeded():
    y = np.r_[np.zeros(700, int), np.ones(200, int), np.full(100, 2)]
    sample = stratified_sample(y, len(y), 100, 3)
    assert np.bincount(y[sample]).tolist() == [70, 20, 10]
    assert np.all(np.diff(sample) > 0)
    assert np.array_equal(sample, stratified_sample(y, len(y), 100, 3))
    assert not np.array_equal(sample, stratified_sample(y, len(y), 100, 4))
    # Rounding: the sizes still add up, the largest remainders get the extra rows.
    assert len(stratified_sample(y, len(y), 33, 0)) == 33
    assert np.array_equal(stratified_sample(y, len(y), 5000, 0), np.arange(1000))


@pytest.mark.parametrize("reduce", ["channel", "layer"])
def test_subspace_columns_of_a_chunk_equal_the_detectors_subspace_matrix(reduce):
    features = np.random.default_rng(0).normal(size=(30, 12)).astype(np.float32)
    for dropped in range(3):
        expected = subspace_matrix(features, LAYOUT, dropped, reduce)
        assert np.array_equal(subspace_columns(LAYOUT, dropped, reduce)(features), expected)


def test_projections_applied_in_chunks_equal_one_application_and_keep_distances():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 300)).astype(np.float32)
    for kind in ("pca", "random"):
        projection = fit_projection(X[:200], kind, 64, random_state=0)
        assert np.allclose(project_rows(X, projection, chunk_rows=77), projection.apply(X), atol=1e-5)
    # Johnson-Lindenstrauss at 256 dimensions: pairwise distances kept within about 20%.
    projected = fit_projection(X, "random", 256, random_state=0).apply(X)
    original = np.linalg.norm(X[:100, None] - X[None, 100:200], axis=2)
    kept = np.linalg.norm(projected[:100, None] - projected[None, 100:200], axis=2)
    assert np.abs(kept / original - 1).max() < 0.25
    assert fit_projection(X[:, :10], "pca", 64).kind == "identity"
    with pytest.raises(InputError, match="projection must be one of"):
        fit_projection(X, "umap", 8)


def test_the_reference_index_finds_the_exact_neighbours_flat_and_nearly_all_with_ivf():
    rng = np.random.default_rng(0)
    reference, queries = rng.normal(size=(3000, 16)).astype(np.float32), rng.normal(size=(400, 16)).astype(np.float32)
    exact = np.argsort(((queries[:, None] - reference[None]) ** 2).sum(2), axis=1)[:, :5]
    assert np.array_equal(ReferenceIndex(reference, index="flat").search(queries, 5)[:, 0], exact[:, 0])
    ivf = ReferenceIndex(reference, index="ivf", nlist=50, nprobe=10)
    found = ivf.search(queries, 5)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(found, exact)])
    assert ivf.kind == "ivf" and recall >= 0.85
    assert np.array_equal(ReferenceIndex(reference, index="ivf", nlist=50, nprobe=50).search(queries, 5), exact)
    assert vote(np.array([[True, False, True, True]])).tolist() == [0.75]


@pytest.fixture(scope="module")
def planted_exact_and_sampled(tmp_path_factory):
    features, truth, labels = planted(9000, 1000)
    # float16 and memory-mapped, as the feature store hands a large scan's features over.
    path = tmp_path_factory.mktemp("features") / "bn_minima.npy"
    np.save(path, features.astype(np.float16))
    stored = np.load(path, mmap_mode="r")
    # One run each: what is tested is the sample and the assignment (several seeds: the test below).
    exact = Flare(n_seeds=1).fit(stored.astype(np.float32), LAYOUT, y=labels)
    sampled = SampledFlare(sample_size=2500, exact_max_samples=0, n_seeds=1)
    return truth, exact, sampled, sampled.fit(stored, LAYOUT, y=labels, chunk_rows=999)


def test_flags_fit_on_a_sample_agree_with_flare_on_every_row(planted_exact_and_sampled):
    truth, exact, sampled, detection = planted_exact_and_sampled
    assert (detection.flags == exact.flags).mean() >= 0.99
    tpr = (detection.flags & truth).sum() / truth.sum()
    fpr = (detection.flags & ~truth).sum() / (~truth).sum()
    assert tpr >= 0.98 and fpr <= 0.01
    assert len(sampled.sample_) == 2500 and np.array_equal(detection.flags[sampled.sample_], sampled.flare_.flags_)
    info = detection.diagnostics["sampled"]
    assert info["n_rows"] == 10000 and info["index"] == "flat" and info["sample_disagreement"] <= 25
    assert detection.scores[truth].mean() > 0.9 and detection.scores[~truth].mean() < 0.05


def test_a_sample_with_nothing_flagged_flags_nothing_and_a_full_sample_is_plain_flare():
    features = np.random.default_rng(1).normal(size=(3000, 12)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, 4, 3000)
    detection = SampledFlare(sample_size=1000, exact_max_samples=2000, n_seeds=1).fit(features, LAYOUT, y=labels)
    assert not detection.flags.any() and not detection.scores.any()
    small, truth, small_labels = planted(900, 100)
    whole = SampledFlare(sample_size=100, exact_max_samples=1000, n_seeds=1).fit(small, LAYOUT, y=small_labels)
    assert np.array_equal(whole.flags, Flare(n_seeds=1).fit(small, LAYOUT, y=small_labels).flags)
    with pytest.raises(InputError, match="flare: unknown parameter"):
        SampledFlare(sample_sise=10)
    with pytest.raises(InputError, match="knn_index"):
        SampledFlare(knn_index="hnsw")


def test_several_seeds_on_a_sample_assign_the_rest_by_the_majoritys_flags_and_say_so():
    features, truth, labels = planted(5400, 600)
    sampled = SampledFlare(sample_size=1500, exact_max_samples=0, n_seeds=3)
    detection = sampled.fit(features, LAYOUT, y=labels)
    assert np.array_equal(detection.flags[sampled.sample_], sampled.flare_.flags_)
    assert len(sampled.flare_.runs_) == 3
    assert (detection.flags == truth).mean() >= 0.99
    notes = sampled.report(detection, None, None).notes
    assert any("FLARE ran under 3 UMAP seeds" in note and "a run that flags nothing abstains" in note
               for note in notes)
    recovered = detection.diagnostics.get("recovered_by_neighbours", 0)
    assert any(f"{recovered:,} more samples were flagged" in note for note in notes) == (recovered > 0)
    off_label = detection.diagnostics.get("off_label_unflagged", 0)
    assert any(f"its {off_label:,} members with another label" in note for note in notes) == (off_label > 0)
    # samples.csv's stage columns: the sample's rows keep the fit's, an assigned row says so and counts no runs.
    by, voted = detection.columns["flagged_by"], detection.columns["runs_voted"]
    fit = sampled.flare_
    rest = np.setdiff1d(np.arange(len(truth)), sampled.sample_)
    assert set(by[sampled.sample_][fit.flags_]) <= set(FLAGGED_BY) and set(by[sampled.sample_][~fit.flags_]) == {""}
    np.testing.assert_array_equal(voted[sampled.sample_], fit.votes_)
    assert set(by[rest][detection.flags[rest]]) == {"assigned"} and set(by[rest][~detection.flags[rest]]) == {""}
    assert np.isnan(voted[rest]).all() and np.isnan(detection.columns["runs_clustered"][rest]).all()
    stages = detection.diagnostics["flagged_by"]
    assert sum(stages.values()) == fit.flags_.sum()
    outside = int((fit.flags_ & (detection.columns["runs_clustered"][sampled.sample_] == 0)).sum())
    assert detection.diagnostics["flagged_outside_clusters"] == outside
    assert any(note.startswith(f"of the {fit.flags_.sum():,} flagged samples of the clustered sample, "
                               f"{stages['vote']:,} were flagged by the runs' vote")
               and f"; {outside:,} of them were in no run's clusters" in note for note in notes)


def test_the_report_says_which_of_the_labels_linked_components_were_flagged():
    from backdoor_engine.detection import Detection

    sampled = SampledFlare(n_seeds=1)
    flags = np.zeros(10, bool)
    base = {"sampled": {"n_sample": 10, "n_rows": 10}, "flagged_by": {"vote": 3, "components": 605},
            "flagged_outside_clusters": 600}
    params = {"min_cluster_size": 100}
    clean = {"size": 704, "flagged": 28, "other_label_neighbours": 1443, "top_share": 0.659, "above_excess": False,
             "taken": False}
    poison = {**clean, "size": 983, "flagged": 378, "top_share": 0.176, "taken": True}
    linked = {"label": 0, "k": 15, "unexplained": 576, "components": [clean, poison], "added": 605}
    notes = sampled.report(Detection("flare", flags, params=params, diagnostics={**base, "components": linked}),
                           None, None).notes
    assert any("linked label 0's members as mutual 15-nearest neighbours into 2 component(s) of at least 100 "
               "samples; 1 of them (983 samples)" in note and "605 members not yet flagged were flagged" in note
               for note in notes)
    assert any("605 were flagged as linked components" in note for note in notes)
    none = {**linked, "components": [clean], "added": 0}
    notes = sampled.report(Detection("flare", flags, params=params, diagnostics={**base, "components": none}),
                           None, None).notes
    assert any("into 1 component(s) of at least 100 samples; none was taken" in note for note in notes)


def test_the_report_says_which_runs_clusters_a_complete_footprint_dropped_or_why_none_was():
    from backdoor_engine.detection import Detection

    sampled = SampledFlare(n_seeds=1)
    base = {"sampled": {"n_sample": 10, "n_rows": 10}}
    applied = {"label": 0, "complete_clusters": 2, "complete_samples": 1042, "applied": True,
               "runs_dropped": [373, 0, 0, 0, 345], "runs_completed": [813, 0, 0, 0, 818]}
    notes = sampled.report(Detection("flare", np.zeros(10, bool), diagnostics={**base, "exclusion": applied}),
                           None, None).notes
    assert any(note.startswith("2 run cluster(s) held label 0's whole excess") and "dropped from 2 run(s) (718 "
               "samples), and 2 run(s) that found part of it were completed with it (1,631 samples)" in note
               for note in notes)
    unchanged = {**applied, "runs_dropped": [0] * 5, "runs_completed": [0] * 5}  # every run complete: no note
    notes = sampled.report(Detection("flare", np.zeros(10, bool), diagnostics={**base, "exclusion": unchanged}),
                           None, None).notes
    assert not any("footprint_exclusion" in note for note in notes)
    refused = {"label": 0, "complete_clusters": 2, "complete_samples": 800, "applied": False,
               "reason": "the complete clusters together hold more of the label than the excess allows"}
    notes = sampled.report(Detection("flare", np.zeros(10, bool), diagnostics={**base, "exclusion": refused}),
                           None, None).notes
    assert any("but the complete clusters together hold more of the label than the excess allows: no run's "
               "clusters were dropped" in note
               for note in notes)


def test_the_report_says_how_much_of_an_inflated_labels_excess_the_flags_left_unexplained_and_what_was_added():
    from backdoor_engine.detection import Detection

    sampled = SampledFlare(n_seeds=1)
    flags = np.zeros(10, bool)
    base = {"sampled": {"n_sample": 10, "n_rows": 10}}
    params = {"min_cluster_size": 100, "complete_footprint": True}
    footprint = {"label": 0, "label_excess": 1021, "inflated": True, "unexplained": 394, "incomplete": True,
                 "added": 293}
    notes = sampled.report(Detection("flare", flags, params=params, diagnostics={**base, "footprint": footprint}),
                           None, None).notes
    assert any("left 394 of that excess unexplained: 293 more samples of the label" in note for note in notes)
    mixture = {**footprint, "cut": "mixture", "separation": 2.03}
    notes = sampled.report(Detection("flare", flags, params=params, diagnostics={**base, "footprint": mixture}),
                           None, None).notes
    assert any("ones (the upper of the two populations of its scores, Ashman's D 2.0), were flagged" in note
               for note in notes)
    per_run = {**mixture, "per_run": True, "runs_added": [293, 0, 1200]}
    notes = sampled.report(Detection("flare", flags, params=params, diagnostics={**base, "footprint": per_run}),
                           None, None).notes
    assert any(note.startswith("each seed's run was completed before the vote (added 293, 0, 1,200); the "
                               "representative run's flags are one inflated label (0, 1,021") for note in notes)
    notes = sampled.report(Detection("flare", flags, params={**params, "complete_footprint": False},
                                     diagnostics={**base, "footprint": {**footprint, "added": 0}}), None, None).notes
    assert any("relabelled poison may remain unflagged (complete_footprint is off)" in note for note in notes)
    one_mode = {**footprint, "cut": "sign", "separation": 2.13, "modes": 1}
    notes = sampled.report(Detection("flare", flags, params=params, diagnostics={**base, "footprint": one_mode}),
                           None, None).notes
    assert any("(its scores were not two populations apart, D 2.1, one mode: those past its zero), were flagged"
               in note for note in notes)
    small = {**base, "footprint": {**footprint, "unexplained": 12, "incomplete": False, "added": 0}}
    notes = sampled.report(Detection("flare", flags, params=params, diagnostics=small), None, None).notes
    assert not any("unexplained" in note for note in notes)  # within min_cluster_size: the count's own noise


def test_the_report_says_which_runs_flagged_the_footprint_past_the_walks_depth():
    from backdoor_engine.detection import Detection

    sampled = SampledFlare(n_seeds=1)
    base = {"sampled": {"n_sample": 10, "n_rows": 10}}
    runs = [{"random_state": s, "n_flagged": 450, "footprint_walk": s != 1} for s in range(3)]
    detection = Detection("flare", np.zeros(10, bool), params={"depth": 3}, diagnostics={**base, "seed_runs": runs})
    notes = sampled.report(detection, None, None).notes
    assert any(note.startswith("2 of the 3 runs found no stable split to flag within depth 3") for note in notes)
    single = Detection("flare", np.zeros(10, bool), params={"depth": 3},
                       diagnostics={**base, "footprint_walk": True})
    assert any(note.startswith("the run found no stable split") for note in sampled.report(single, None, None).notes)
    plain = Detection("flare", np.zeros(10, bool), params={"depth": 3},
                      diagnostics={**base, "seed_runs": [{**r, "footprint_walk": False} for r in runs]})
    assert not any("footprint_levels" in note for note in sampled.report(plain, None, None).notes)


def test_the_report_says_how_many_of_the_labels_unflagged_samples_the_residual_probe_added():
    from backdoor_engine.detection import Detection

    sampled = SampledFlare(n_seeds=1)
    base = {"sampled": {"n_sample": 10, "n_rows": 10}}
    residual = {"label": 0, "inflated": True, "candidates": 921, "added": 15}
    notes = sampled.report(Detection("flare", np.zeros(10, bool), params={},
                                     diagnostics={**base, "residual": residual}), None, None).notes
    assert any(note.startswith("15 more samples of label 0 (of its 921 unflagged) were flagged") for note in notes)
    notes = sampled.report(Detection("flare", np.zeros(10, bool), params={},
                                     diagnostics={**base, "residual": {**residual, "added": 0}}), None, None).notes
    assert not any("residual_probe" in note for note in notes)


def test_the_report_says_what_settling_the_footprint_did_or_why_it_did_not():
    from backdoor_engine.detection import Detection

    sampled = SampledFlare(n_seeds=1)
    base = {"sampled": {"n_sample": 10, "n_rows": 10}}
    settle = {"label": 0, "inflated": True, "members": 1870, "rounds": 17, "converged": "fixed point",
              "settled": True, "added": 21, "removed": 2}
    notes = sampled.report(Detection("flare", np.zeros(10, bool), params={},
                                     diagnostics={**base, "settle": settle}), None, None).notes
    assert any(note.startswith("the flags of label 0 were settled") and "(17 rounds); 21 samples were flagged and 2 "
               "unflagged" in note for note in notes)
    path = {**settle, "strengths": [0.001, 0.01]}
    notes = sampled.report(Detection("flare", np.zeros(10, bool), params={},
                                     diagnostics={**base, "settle": path}), None, None).notes
    assert any("(17 rounds over the probe strengths C 0.001 then 0.01); 21 samples" in note for note in notes)
    drifting = {**settle, "converged": None, "settled": False, "rounds": 40,
                "reason": "the decisions still changed after 40 rounds"}
    notes = sampled.report(Detection("flare", np.zeros(10, bool), params={},
                                     diagnostics={**base, "settle": drifting}), None, None).notes
    assert any(note.startswith("the flags of label 0 were not settled (40 rounds): the decisions still changed "
                               "after 40 rounds") for note in notes)
