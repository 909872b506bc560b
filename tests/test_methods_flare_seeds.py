"""FLARE under several UMAP seeds: the runs' seeds, the per-sample majority, what the fit reports."""

import numpy as np
import pytest

from planted_footprint import relabelled_by_source, relabelled_half_flagged

from backdoor_engine.engine import FeatureLayout
from backdoor_engine.errors import InputError
from backdoor_engine.methods import flare as flare_module
from backdoor_engine.methods.flare import (FLAGGED_BY, Flare, FlareRun, ensemble_seeds, fit_once,
                                          recover_by_neighbours, seed_majority)

SLICES = FeatureLayout(("bn1", "bn2", "bn3"), (4, 4, 4))


def planted(n_clean=1200, n_poison=150, shift=6.0, seed=0):
    rng = np.random.default_rng(seed)
    features = np.vstack([rng.normal(0, 1, (n_clean, 12)), rng.normal(0, 1, (n_poison, 12)) + shift])
    truth = np.r_[np.zeros(n_clean, bool), np.ones(n_poison, bool)]
    labels = np.r_[rng.integers(0, 4, n_clean), np.zeros(n_poison, int)]
    return features.astype(np.float32), truth, labels


def run_of(flags, seed=0, embedding=True):
    flags = np.asarray(flags, bool)
    n = len(flags)
    return FlareRun(seed, [], flags, np.where(flags, 1, 0), np.zeros((n, 2)) if embedding else None, None,
                    0 if embedding else None, {"stable_subspace_found": embedding})


def test_the_first_run_is_the_base_seed_and_two_bases_share_no_other_run():
    assert ensemble_seeds(42, 1) == [42]
    a, b = ensemble_seeds(42, 5), ensemble_seeds(0, 5)
    assert a[0] == 42 and b[0] == 0 and len(set(a)) == 5
    assert not set(a) & set(b)
    assert ensemble_seeds(42, 5) == a  # reproducible
    assert ensemble_seeds(None, 3) == [None, None, None]


def test_a_sample_is_flagged_when_most_runs_flag_it():
    runs = [run_of([1, 1, 0, 0]), run_of([1, 0, 1, 0]), run_of([1, 1, 0, 1])]
    flags, votes, chosen = seed_majority(runs)
    assert flags.tolist() == [True, True, False, False]
    assert votes.tolist() == [3, 2, 1, 1]
    assert chosen == 0  # differs on nothing; the third run differs on one sample
    even = [run_of([1, 1]), run_of([1, 0])]
    assert seed_majority(even)[0].tolist() == [True, False]  # a tie is not a majority


def test_runs_that_flag_nothing_abstain_and_two_flagging_runs_must_agree():
    found, nothing = run_of([1, 1, 1, 0, 0]), run_of([0, 0, 0, 0, 0])
    # Two of five runs find the same cluster, three find no stable split: the two decide.
    flags, votes, chosen = seed_majority([found, nothing, nothing, found, nothing])
    assert flags.tolist() == [True, True, True, False, False] and chosen == 0
    # Every run voting (the earlier rule), the three that found nothing outvote them.
    assert not seed_majority([found, nothing, nothing, found, nothing], abstain=False)[0].any()
    # One flagging run is not enough, nor two that disagree.
    assert not seed_majority([found, nothing, nothing])[0].any()
    assert not seed_majority([found, run_of([0, 0, 0, 1, 1]), nothing])[0].any()
    # A single run is its own majority.
    assert seed_majority([found])[0].tolist() == [True, True, True, False, False]


def test_the_reported_run_is_one_that_found_the_flagged_samples():
    # The run that flagged nothing is as close to the majority as the third run (one sample each); the
    # reported subspace and embedding must be where the flagged samples were found.
    runs = [run_of([0, 0, 0, 0, 0], embedding=False), run_of([1, 1, 1, 1, 0]), run_of([1, 0, 0, 0, 1])]
    flags, _, chosen = seed_majority(runs)
    assert flags.tolist() == [True, False, False, False, False] and chosen == 2
    runs = [run_of([0, 0, 0]), run_of([1, 0, 0]), run_of([0, 0, 0])]
    assert seed_majority(runs)[2] == 0  # nothing flagged: the base run


@pytest.fixture(scope="module")
def three_seeds():
    features, truth, labels = planted()
    flare = Flare(n_seeds=3, recover_neighbors=None)  # the majority alone (recovery: its own tests)
    return flare, flare.fit(features, SLICES, y=labels), features, truth, labels


def test_three_seeds_find_the_planted_cluster_by_the_majority_of_their_runs(three_seeds):
    flare, detection, features, truth, labels = three_seeds
    assert (detection.flags == truth).mean() >= 0.99
    seeds = ensemble_seeds(42, 3)
    runs = [fit_once(features, SLICES, labels, flare.params, seed) for seed in seeds]
    assert [r.random_state for r in flare.runs_] == seeds
    votes = np.sum([r.flags for r in runs], axis=0)
    np.testing.assert_array_equal(detection.flags, 2 * votes > 3)
    np.testing.assert_array_equal(flare.votes_, votes)
    d = detection.diagnostics
    assert [r["random_state"] for r in d["seed_runs"]] == seeds
    assert sum(d["votes_histogram"]) == len(truth)
    assert detection.scores[detection.flags].min() > detection.scores[~detection.flags].max()  # votes rank first
    assert detection.scores[truth].mean() > detection.scores[~truth].mean()
    flagged_clusters = [c for c in d["clusters"] if c["flagged"]]
    assert sum(c["size"] for c in flagged_clusters) >= detection.n_flagged


def test_the_base_seeds_run_is_the_plain_fit(three_seeds):
    flare, _, features, _, labels = three_seeds
    plain = Flare(n_seeds=1, recover_neighbors=None).fit(features, SLICES, y=labels)
    np.testing.assert_array_equal(flare.runs_[0].flags, plain.flags)
    assert "seed_runs" not in plain.diagnostics


def test_a_minority_of_runs_flagging_is_reported_and_flags_nothing(monkeypatch):
    features, _, labels = planted(n_clean=300, n_poison=0)
    outcomes = iter([[0] * 300, [1] * 150 + [0] * 150, [0] * 300])
    monkeypatch.setattr(flare_module, "fit_once", lambda *a, **k: run_of(next(outcomes), embedding=True))
    detection = Flare(n_seeds=3).fit(features, SLICES, y=labels)
    assert detection.n_flagged == 0
    assert ("1 of 3 UMAP seeds flagged samples, none of them in a majority of the runs that flagged (at least two "
            "must agree)") in detection.diagnostics["explanation"]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_n_seeds_must_be_a_positive_integer(bad):
    with pytest.raises(InputError, match="n_seeds"):
        Flare(n_seeds=bad)


def test_samples_among_the_flagged_in_the_all_layers_embeddings_are_recovered():
    rng = np.random.default_rng(0)
    clean, poison = rng.normal(0, 1, (400, 2)), rng.normal(8, 0.5, (60, 2))
    embedding = np.vstack([clean, poison])
    flags = np.r_[np.zeros(400, bool), np.ones(60, bool)]
    flags[[400, 401, 402]] = False  # three poisoned samples the chosen subspace left with the clean ones
    recovered = recover_by_neighbours(flags, [embedding, embedding + 0.01], k=15, share=0.5)
    assert np.flatnonzero(recovered).tolist() == [400, 401, 402]
    # Averaged over the embeddings: where one of two has them among the clean samples, a 0.75 bar keeps them out.
    elsewhere = embedding.copy()
    elsewhere[[400, 401, 402]] = 0.0
    assert not recover_by_neighbours(flags, [embedding, elsewhere], k=15, share=0.75).any()
    assert recover_by_neighbours(flags, [embedding, elsewhere], k=15, share=0.5)[[400, 401, 402]].all()
    assert not recover_by_neighbours(np.zeros(460, bool), [embedding], k=15, share=0.5).any()  # nothing to grow from
    assert not recover_by_neighbours(flags, [None], k=15, share=0.5).any()  # no embedding (no subspace found)


def test_recovered_samples_are_flagged_counted_and_ranked_with_the_flagged(monkeypatch):
    features, _, labels = planted(n_clean=300, n_poison=0)
    rng = np.random.default_rng(1)
    embedding = np.vstack([rng.normal(0, 1, (240, 2)), rng.normal(9, 1, (60, 2))])
    flags = np.r_[np.zeros(240, bool), np.ones(60, bool)]
    flags[250] = False  # one that every run leaves unflagged, among the flagged in the all-layers embedding
    run = run_of(flags, embedding=True)
    run.embedding, run.full_embedding = embedding, embedding
    monkeypatch.setattr(flare_module, "fit_once", lambda *a, **k: run)
    detection = Flare(n_seeds=3).fit(features, SLICES, y=labels)
    assert detection.flags[250] and detection.n_flagged == 60
    assert detection.diagnostics["recovered_by_neighbours"] == 1
    assert detection.scores[detection.flags].min() > detection.scores[~detection.flags].max()
    off = Flare(n_seeds=3, recover_neighbors=None).fit(features, SLICES, y=labels)
    assert not off.flags[250] and "recovered_by_neighbours" not in off.diagnostics


@pytest.mark.parametrize("params", [{"recover_neighbors": 0}, {"recover_neighbors": 2.5}, {"recover_share": 0.0},
                                    {"recover_share": 1.5}])
def test_recovery_parameters_are_checked(params):
    with pytest.raises(InputError, match=next(iter(params))):
        Flare(**params)


def test_runs_that_found_different_halves_of_the_poison_agree_once_each_is_completed(monkeypatch):
    features, y, truth, first_half = relabelled_half_flagged()
    halves = [first_half, truth & ~first_half]

    def fit(n_seeds=2, **params):
        outcomes = iter(halves)
        monkeypatch.setattr(flare_module, "fit_once", lambda *a, **k: run_of(next(outcomes)))
        return Flare(n_seeds=n_seeds, **params).fit(features, SLICES, y=y)

    voted_first = fit(footprint_per_run=False)  # no sample in both halves: the vote flags nothing to complete
    assert voted_first.n_flagged == 0
    detection = fit()
    assert (detection.flags & truth).sum() >= 380 and (detection.flags & ~truth).sum() <= 10
    footprint = detection.diagnostics["footprint"]
    assert footprint["per_run"] and len(footprint["runs_added"]) == 2 and min(footprint["runs_added"]) >= 180
    assert [r["n_flagged"] for r in detection.diagnostics["seed_runs"]] == [200, 200]  # the runs' own clusters
    assert all(r["n_voted"] >= 380 for r in detection.diagnostics["seed_runs"])


def test_each_flag_names_its_stage_and_the_runs_that_clustered_and_voted_for_it(monkeypatch):
    features, y, truth, first_half = relabelled_half_flagged()
    halves = iter([first_half, truth & ~first_half])
    monkeypatch.setattr(flare_module, "fit_once", lambda *a, **k: run_of(next(halves)))
    flare = Flare(n_seeds=2)
    detection = flare.fit(features, SLICES, y=y)
    by, clustered, voted = (detection.columns[c] for c in ("flagged_by", "runs_clustered", "runs_voted"))
    assert set(by[detection.flags]) <= set(FLAGGED_BY) and set(by[~detection.flags]) == {""}
    assert sum(detection.diagnostics["flagged_by"].values()) == detection.n_flagged
    # Each poison sample was in one run's cluster; the other run's completion brought it into the vote.
    np.testing.assert_array_equal(clustered, truth.astype(int))
    np.testing.assert_array_equal(voted, flare.votes_)
    np.testing.assert_array_equal(by == "vote", 2 * voted > 2)
    assert (by == "vote").sum() >= 380
    # The residual probe's additions (if any) are samples no run's vote carried.
    assert (voted[by == "residual"] < 2).all()


def test_a_sample_recovered_by_its_neighbours_says_so_in_its_row(monkeypatch):
    features, _, labels = planted(n_clean=300, n_poison=0)
    rng = np.random.default_rng(1)
    embedding = np.vstack([rng.normal(0, 1, (240, 2)), rng.normal(9, 1, (60, 2))])
    flags = np.r_[np.zeros(240, bool), np.ones(60, bool)]
    flags[250] = False
    run = run_of(flags, embedding=True)
    run.embedding, run.full_embedding = embedding, embedding
    monkeypatch.setattr(flare_module, "fit_once", lambda *a, **k: run)
    detection = Flare(n_seeds=3).fit(features, SLICES, y=labels)
    assert detection.columns["flagged_by"][250] == "neighbours"
    assert detection.columns["runs_clustered"][250] == 0 and detection.columns["runs_voted"][250] == 0
    assert detection.diagnostics["flagged_by"] == {"vote": 59, "neighbours": 1, "completion": 0, "zoom": 0,
                                                   "minority": 0, "components": 0, "residual": 0, "settle": 0}


def test_a_scan_settles_its_footprint_by_default_unflags_and_flags_samples_and_says_so(monkeypatch):
    features, y, truth, _ = relabelled_half_flagged()
    flags = truth & (np.arange(len(y)) < 2385)
    flags[[3, 17, 40]] = True  # three clean zeros in the run's cluster
    monkeypatch.setattr(flare_module, "fit_once", lambda *a, **k: run_of(flags))
    plain = dict(n_seeds=1, complete_footprint=False, recover_neighbors=None, residual_probe=False)
    detection = Flare(**plain).fit(features, SLICES, y=y)
    settle, by = detection.diagnostics["settle"], detection.columns["flagged_by"]
    assert settle["settled"] and settle["converged"] and settle["removed"] >= 2
    assert (detection.flags & truth).sum() >= 396 and (detection.flags & ~truth).sum() <= 1
    assert set(by[detection.flags & ~flags]) == {"settle"} and set(by[~detection.flags]) == {""}
    assert detection.diagnostics["flagged_by"]["settle"] == settle["added"] == (detection.flags & ~flags).sum()
    assert settle["strengths"] == [0.01]
    path = Flare(settle=True, settle_strengths=[0.001, 0.01], **plain).fit(features, SLICES, y=y)
    assert path.diagnostics["settle"]["settled"] and path.diagnostics["settle"]["strengths"] == [0.001, 0.01]
    assert path.diagnostics["settle"]["rounds"] > settle["rounds"]
    assert Flare().params.settle_cut == "hysteresis"
    detection = Flare(settle=False, **plain).fit(features, SLICES, y=y)  # off: the flags as the run left them
    assert "settle" not in detection.diagnostics and np.array_equal(detection.flags, flags)


def test_a_scan_flags_the_label_s_linked_components_by_default_and_says_so(monkeypatch):
    features, y, truth, flags = relabelled_by_source()
    monkeypatch.setattr(flare_module, "fit_once", lambda *a, **k: run_of(flags))
    plain = dict(n_seeds=1, complete_footprint=False, recover_neighbors=None, residual_probe=False,
                 min_cluster_size=50, settle=False)  # the components alone: settling would decide the margins after
    layout = FeatureLayout(("bn1", "bn2"), (5, 5))
    detection = Flare(**plain).fit(features, layout, y=y)
    components, by = detection.diagnostics["components"], detection.columns["flagged_by"]
    assert components["k"] == 15 and components["added"] == (detection.flags & ~flags).sum() >= 280
    assert (detection.flags & ~truth).sum() == 0
    assert set(by[detection.flags & ~flags]) == {"components"}
    assert detection.diagnostics["flagged_by"]["components"] == components["added"]
    detection = Flare(footprint_components=None, **plain).fit(features, layout, y=y)  # off: as the run left them
    assert "components" not in detection.diagnostics and np.array_equal(detection.flags, flags)


def test_a_complete_footprint_found_by_one_run_drops_the_island_the_other_runs_voted_for(monkeypatch):
    features, y, truth, _ = relabelled_half_flagged()
    island = np.zeros(len(y), bool)
    island[:150] = True  # 150 clean zeros some runs split off
    both = run_of((truth & (np.arange(len(y)) < 2200)) | island)
    both.footprints = [np.arange(2000, 2200), np.arange(150)]
    outcomes = [run_of(island), run_of(island), run_of(truth), both]
    plain = dict(n_seeds=4, recover_neighbors=None, residual_probe=False, complete_footprint=False)

    def fit(**params):
        runs = iter(outcomes)
        monkeypatch.setattr(flare_module, "fit_once", lambda *a, **k: next(runs))
        return Flare(**plain, **params).fit(features, SLICES, y=y)

    voted = fit(footprint_exclusion=False)  # three of the four runs flag the island
    assert voted.flags[island].all() and "exclusion" not in voted.diagnostics
    detection = fit()
    np.testing.assert_array_equal(detection.flags, truth)
    exclusion = detection.diagnostics["exclusion"]
    assert exclusion["runs_dropped"] == [150, 150, 0, 150] and exclusion["runs_completed"] == [0, 0, 0, 200]


@pytest.mark.parametrize("bad", [dict(footprint_components=0), dict(footprint_components=2.5),
                                 dict(component_spread=0.0), dict(component_spread=1.5)])
def test_linked_components_need_a_neighbour_count_and_a_share(bad):
    with pytest.raises(InputError, match=next(iter(bad))):
        Flare(**bad)

