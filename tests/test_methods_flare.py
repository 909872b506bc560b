"""FLARE detector: each stage as a plain function, then the composed estimator on planted clusters."""

import numpy as np
import pytest

from backdoor_engine.cluster import CondensedTree
from backdoor_engine.engine import FeatureLayout
from backdoor_engine.errors import InputError
from backdoor_engine.methods.flare import (
    Flare,
    assign_noise_to_nearest,
    flags_from_clusters,
    subspace_matrix,
    walk_for_stable_split,
)

SLICES = FeatureLayout(("bn1", "bn2", "bn3"), (4, 4, 4))


def planted(n_clean=1600, n_poison=200, shift=6.0, seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.normal(0, 1, (n_clean, 12))
    poison = rng.normal(0, 1, (n_poison, 12)) + shift
    truth = np.r_[np.zeros(n_clean, bool), np.ones(n_poison, bool)]
    return np.vstack([clean, poison]).astype(np.float32), truth


def test_subspace_matrix_drops_trailing_layers_by_slicing():
    features = np.arange(24, dtype=np.float32).reshape(2, 12)
    np.testing.assert_array_equal(subspace_matrix(features, SLICES, 0, "channel"), features)
    np.testing.assert_array_equal(subspace_matrix(features, SLICES, 2, "channel"), features[:, :4])
    np.testing.assert_array_equal(subspace_matrix(features, SLICES, 1, "layer"), features[:, [0, 4]])


def test_official_flag_rule_largest_group_clean_other_clusters_poisoned_noise_clean():
    labels = np.array([0, 0, 0, 1, 1, 2, -1])
    np.testing.assert_array_equal(flags_from_clusters(labels), [0, 0, 0, 1, 1, 1, 0])
    # The official code counts noise when picking the largest group: then every real cluster is flagged.
    labels = np.array([-1, -1, -1, -1, 0, 0, 1])
    np.testing.assert_array_equal(flags_from_clusters(labels), [0, 0, 0, 0, 1, 1, 1])


def test_noise_takes_the_label_of_its_nearest_clustered_neighbour():
    embedding = np.array([[0, 0], [0.1, 0], [5, 5], [5.1, 5], [0.2, 0], [4.9, 5]])
    labels = np.array([0, 0, 1, 1, -1, -1])
    np.testing.assert_array_equal(assign_noise_to_nearest(labels, embedding), [0, 0, 1, 1, 0, 1])


def leaf_tree():
    """Samples 0-5, root 6: cluster 7 (samples 0-3, a leaf) and cluster 8 (samples 4-5), born at lambda 1."""
    rows = [(6, 7, 1.0, 4), (6, 8, 1.0, 2), (7, 0, 5.0, 1), (7, 1, 5.0, 1), (7, 2, 6.0, 1), (7, 3, 9.0, 1),
            (8, 4, 2.0, 1), (8, 5, 2.0, 1)]
    return CondensedTree(*map(np.array, zip(*rows)))


def test_a_leaf_is_as_stable_as_its_persistence_not_its_first_exiting_point():
    gaps, split = walk_for_stable_split(leaf_tree(), 7, threshold=5.0, depth=3, leaf_rule="persistence")
    assert gaps == [8.0]  # last point leaves at 9, the leaf appeared at 1
    assert split.node == 7 and 1.0 < split.cut_lambda < 5.0  # cut where the leaf is still whole
    gaps, split = walk_for_stable_split(leaf_tree(), 7, threshold=5.0, depth=3, leaf_rule="official")
    assert gaps == [4.0] and split is None  # the official walk measures point 0's exit at lambda 5


@pytest.fixture(scope="module")
def planted_fit():
    features, truth = planted()
    flare = Flare()
    return flare, flare.fit(features, SLICES, y=truth.astype(int)), truth


def test_flare_finds_a_planted_poison_cluster(planted_fit):
    flare, detection, truth = planted_fit
    tpr = (detection.flags & truth).sum() / truth.sum()
    fpr = (detection.flags & ~truth).sum() / (~truth).sum()
    assert tpr >= 0.98 and fpr <= 0.01
    assert detection.diagnostics["stable_subspace_found"] and flare.subspace_ == 0
    assert detection.embedding.shape == (len(truth), 2)
    assert detection.scores[truth].mean() > detection.scores[~truth].mean()
    flagged_clusters = [c for c in detection.diagnostics["clusters"] if c["flagged"]]
    assert sum(c["size"] for c in flagged_clusters) == detection.n_flagged


def test_no_stable_subspace_flags_nothing_and_says_why():
    features = np.random.default_rng(1).normal(size=(1000, 12)).astype(np.float32)
    detection = Flare().fit(features, SLICES)
    assert detection.n_flagged == 0
    assert detection.diagnostics["stable_subspace_found"] is False
    assert len(detection.diagnostics["steps"]) == SLICES.num_layers  # every subspace was tried
    assert "nothing flagged" in detection.diagnostics["explanation"]


@pytest.mark.parametrize("bad,message", [
    (np.full((200, 12), np.nan, np.float32), "NaN"),
    (np.zeros((50, 12), np.float32), "min_cluster_size"),
    (np.zeros((200, 10), np.float32), "layout"),
])
def test_bad_features_are_named(bad, message):
    with pytest.raises(InputError, match=message):
        Flare().fit(bad, SLICES)


def test_unknown_options_are_rejected():
    with pytest.raises(InputError, match="noise_rule"):
        Flare(noise_rule="majority")
