"""FLARE detector: each stage as a plain function, then the composed estimator on planted clusters."""

import numpy as np
import pytest

from backdoor_engine import cluster
from backdoor_engine.cluster import CondensedTree
from backdoor_engine.engine import FeatureLayout
from backdoor_engine.errors import InputError
from planted_footprint import relabelled_by_source, relabelled_half_flagged

from backdoor_engine.methods.flare import (
    ColumnScale,
    Flare,
    FlareParams,
    FlareRun,
    complete_runs,
    exclude_beside_complete,
    StableSplit,
    assign_noise_to_nearest,
    class_makeup,
    holds_footprint,
    flags_from_clusters,
    footprint_completion,
    footprint_components_of,
    score_mixture,
    off_label_members,
    other_footprints,
    label_excess,
    residual_members,
    settle_footprint,
    search_subspace,
    stability_split,
    subspace_matrix,
    walk_for_stable_split,
    whole_class_share,
)

SLICES = FeatureLayout(("bn1", "bn2", "bn3"), (4, 4, 4))


def planted(n_clean=1600, n_poison=200, shift=6.0, seed=0):
    """One clean blob with labels 0-3, and an all-to-one poison blob relabelled 0 (rows at the end)."""
    rng = np.random.default_rng(seed)
    clean = rng.normal(0, 1, (n_clean, 12))
    poison = rng.normal(0, 1, (n_poison, 12)) + shift
    truth = np.r_[np.zeros(n_clean, bool), np.ones(n_poison, bool)]
    labels = np.r_[rng.integers(0, 4, n_clean), np.zeros(n_poison, int)]
    return np.vstack([clean, poison]).astype(np.float32), truth, labels


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
    features, truth, labels = planted()
    flare = Flare(n_seeds=1)  # one run: these tests are of the stages; the seeds' majority has its own file
    return flare, flare.fit(features, SLICES, y=labels), truth


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
    detection = Flare(n_seeds=1).fit(features, SLICES)
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


def test_whole_class_share_tells_a_class_split_from_a_part_of_one_or_a_mix():
    y = np.repeat(np.arange(4), 100)
    assert whole_class_share(y, np.arange(100)) == pytest.approx(1.0)  # all of class 0
    assert whole_class_share(y, np.arange(200)) == pytest.approx(1.0)  # classes 0 and 1, whole
    assert whole_class_share(y, np.arange(50)) == pytest.approx(0.5)  # half of class 0
    assert whole_class_share(y, np.arange(0, 400, 10)) == pytest.approx(0.1)  # a tenth of each class
    # Counted within the divided cluster: the other half of class 0 was never in it.
    assert whole_class_share(y, np.arange(50), within=np.r_[0:50, 100:400]) == pytest.approx(1.0)


def two_level_tree():
    """Samples 0-9. Root 10 -> 11 (samples 0-3, leaf, lasts 1 -> 9) and 12 (1 -> 2); 12 -> 13 (samples
    4-6, leaf, lasts 2 -> 8) and 14 (samples 7-9, leaf, lasts 2 -> 3)."""
    rows = [(10, 11, 1.0, 4), (10, 12, 1.0, 6), (12, 13, 2.0, 3), (12, 14, 2.0, 3),
            (11, 0, 9.0, 1), (11, 1, 9.0, 1), (11, 2, 9.0, 1), (11, 3, 9.0, 1),
            (13, 4, 8.0, 1), (13, 5, 8.0, 1), (13, 6, 8.0, 1), (14, 7, 3.0, 1), (14, 8, 3.0, 1), (14, 9, 3.0, 1)]
    return CondensedTree(*map(np.array, zip(*rows)))


def test_stability_rule_flags_the_more_stable_root_child():
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])  # cluster 11 holds a quarter to a half of each label
    node, verdicts = stability_split(two_level_tree(), y, levels=3, class_coverage=0.5)
    assert node == 11 and verdicts[0]["decision"] == "flag 11"
    assert [c["persistence"] for c in verdicts[0]["children"]] == [1.0, 8.0]  # 12 first: larger


def test_a_whole_class_split_off_is_benign_and_the_walk_goes_one_level_down():
    y = np.array([0, 0, 0, 1, 1, 2, 3, 1, 2, 3])  # cluster 11 is all of class 0 (and one 1); 13, 14 parts of 1-3
    node, verdicts = stability_split(two_level_tree(), y, levels=3, class_coverage=0.5)
    assert node == 13 and len(verdicts) == 2  # 13 (lasts 6) is more stable than 14 (lasts 1)
    assert verdicts[0]["children"][1]["benign_class_split"] and verdicts[0]["children"][1]["purity"] == 0.75
    node, verdicts = stability_split(two_level_tree(), y, levels=1, class_coverage=0.5)
    assert node is None and "benign class split" in verdicts[0]["decision"]


def test_the_walk_looks_into_every_benign_branch_not_only_the_largest():
    # Root 10 -> 11 (samples 0-3) and 12 (4-9), then 11 -> 13 (0-1) and 14 (2-3). Labels make 11 and 12 whole
    # classes {0, 1} and {2, 3}; 11 divides across classes 0 and 1 (halves of each): the smaller branch holds it.
    rows = [(10, 11, 1.0, 4), (10, 12, 1.0, 6), (11, 13, 2.0, 2), (11, 14, 2.0, 2),
            (13, 0, 9.0, 1), (13, 1, 9.0, 1), (14, 2, 3.0, 1), (14, 3, 3.0, 1),
            (12, 4, 5.0, 1), (12, 5, 5.0, 1), (12, 6, 5.0, 1), (12, 7, 5.0, 1), (12, 8, 5.0, 1), (12, 9, 5.0, 1)]
    tree = CondensedTree(*map(np.array, zip(*rows)))
    y = np.array([0, 1, 0, 1, 2, 2, 2, 3, 3, 3])
    node, verdicts = stability_split(tree, y, levels=2, class_coverage=0.5)
    assert node == 13 and [v["node"] for v in verdicts] == [10, 12, 11]  # 12 does not divide


def test_splits_inside_one_benign_class_are_not_examined():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])  # 11 is all of class 0: its split would halve it
    rows = [(10, 11, 1.0, 4), (10, 12, 1.0, 6), (11, 13, 2.0, 2), (11, 14, 2.0, 2),
            (13, 0, 9.0, 1), (13, 1, 9.0, 1), (14, 2, 3.0, 1), (14, 3, 3.0, 1),
            (12, 4, 5.0, 1), (12, 5, 5.0, 1), (12, 6, 5.0, 1), (12, 7, 5.0, 1), (12, 8, 5.0, 1), (12, 9, 5.0, 1)]
    tree = CondensedTree(*map(np.array, zip(*rows)))
    node, verdicts = stability_split(tree, y, levels=3, class_coverage=0.5)
    assert node is None and [v["node"] for v in verdicts] == [10, 12]


def footprint_below_depth_tree():
    """Samples 0-19. Root 20 -> 21 (0-3) and 22; 22 -> 23 (4-7) and 24; 24 -> 25 (8-11) and 26 (12-19): the
    cluster 25 sits three levels down, inside 24, a branch of two labels."""
    rows = [(20, 21, 1.0, 4), (20, 22, 1.0, 16), (22, 23, 2.0, 4), (22, 24, 2.0, 12), (24, 25, 3.0, 4),
            (24, 26, 3.0, 8)]
    rows += [(21, i, 9.0, 1) for i in range(4)] + [(23, i, 9.0, 1) for i in range(4, 8)]
    rows += [(25, i, 9.0, 1) for i in range(8, 12)] + [(26, i, 5.0, 1) for i in range(12, 20)]
    return CondensedTree(*map(np.array, zip(*rows)))


def poison_inside_one_class_tree():
    """Samples 0-83: 0-39 labels 1 and 2, 40-59 label 0, 60-79 label 3, 80-83 relabelled 0 (label 0's excess over
    the median count: 4). Root 84 -> 85 (0-39, does not divide) and 86; 86 -> 87 (40-59) and 88 (60-83, 83% label
    3: a single benign class to the walk); 88 -> 89 (80-83, the poison) and 90 (60-79)."""
    rows = [(84, 85, 1.0, 40), (84, 86, 1.0, 44), (86, 87, 2.0, 20), (86, 88, 2.0, 24), (88, 89, 3.0, 4),
            (88, 90, 3.0, 20)]
    rows += [(85, i, 9.0, 1) for i in range(40)] + [(87, i, 9.0, 1) for i in range(40, 60)]
    rows += [(90, i, 9.0, 1) for i in range(60, 80)] + [(89, i, 9.0, 1) for i in range(80, 84)]
    return CondensedTree(*map(np.array, zip(*rows)))


def test_the_walk_follows_a_single_class_cluster_where_the_relabelled_poison_sits_inside_it():
    y = np.repeat([1, 2, 0, 3, 0], [20, 20, 20, 20, 4])
    tree = poison_inside_one_class_tree()
    node, verdicts = stability_split(tree, y, levels=2, class_coverage=0.5, footprint_levels=1, min_excess=4)
    assert node == 89 and [v["node"] for v in verdicts] == [84, 86, 85, 88]  # 85: labels 1 and 2, no children
    rows = {row["node"]: row for row in verdicts[1]["children"]}
    assert rows[88]["one_benign_class"] and rows[88]["top_label"] == 3 and rows[87]["one_benign_class"]
    members, excess = cluster.all_members(tree), label_excess(y)
    # 88 holds 4 of label 0, all its excess; 87, label 0's clean 20, does not (the excess covers a fifth)
    assert holds_footprint(y[members[88]], excess, 4) and not holds_footprint(y[members[87]], excess, 4)
    assert not holds_footprint(y[members[88]], excess, 4, top_only=True)
    assert not holds_footprint(y[members[88]], excess, 5)  # an excess below min_excess is no footprint
    # the session-29 rule never walks into a single class
    node, verdicts = stability_split(tree, y, levels=2, class_coverage=0.5, footprint_levels=1, min_excess=4,
                                     top_label_only=True)
    assert node is None and [v["node"] for v in verdicts] == [84, 86, 85]
    with pytest.raises(InputError, match="footprint_branches"):
        FlareParams(footprint_branches="any")


def test_past_depth_the_walk_follows_only_a_branch_that_can_hold_the_all_to_one_footprint():
    # 21, 23: all of labels 1 and 2; 24: all of label 0 (8, 4 beyond the median count) and label 3; 25 is the
    # relabelled part of label 0, one level past depth 2.
    y = np.repeat([1, 2, 0, 0, 3], 4)
    node, verdicts = stability_split(footprint_below_depth_tree(), y, levels=2, class_coverage=0.5,
                                     footprint_levels=1, min_excess=4)
    assert node == 25 and [v["node"] for v in verdicts] == [20, 22, 24]
    members, excess = cluster.all_members(footprint_below_depth_tree()), label_excess(y)
    assert holds_footprint(y[members[24]], excess, 4) and not holds_footprint(y[members[23]], excess, 4)
    assert stability_split(footprint_below_depth_tree(), y, levels=2, class_coverage=0.5)[0] is None  # depth only
    node, _ = stability_split(footprint_below_depth_tree(), y, levels=2, class_coverage=0.5, footprint_levels=1,
                              min_excess=5)  # an excess below min_excess is no footprint
    assert node is None
    # Past depth only the footprint itself is flagged: 25 half label 0, half label 3 is not.
    mixed = np.repeat([1, 2, 0, 0, 3], 4)
    mixed[[10, 11, 18, 19]] = [3, 3, 0, 0]
    node, verdicts = stability_split(footprint_below_depth_tree(), mixed, levels=2, class_coverage=0.5,
                                     footprint_levels=1, min_excess=4)
    rows = {row["node"]: row for row in verdicts[-1]["children"]}
    assert node is None and verdicts[-1]["node"] == 24 and not rows[25]["benign_class_split"]
    assert verdicts[-1]["decision"] == "no child is the footprint (past depth)"
    # The same tree without the inflated label: 24 holds three labels of four samples each, no footprint.
    balanced = np.repeat([1, 2, 4, 0, 3], 4)
    node, verdicts = stability_split(footprint_below_depth_tree(), balanced, levels=2, class_coverage=0.5,
                                     footprint_levels=3)
    assert node is None and [v["node"] for v in verdicts] == [20, 22]


def poison_by_source_tree():
    """Samples 0-61 under root 62: the upper-body branch 63 -> 65 (0-4, poison relabelled 0), 66 (5-24, labels 2
    and 4), 67 (25-36, the target's clean class) -> 68 (25-29) and 69 (30-36); the footwear branch 64 -> 70
    (37-41, poison relabelled 0) and 71 (42-61, labels 5 and 7)."""
    spans = {65: (0, 5), 66: (5, 25), 68: (25, 30), 69: (30, 37), 70: (37, 42), 71: (42, 62)}
    rows = [(62, 63, 1.0, 37), (62, 64, 1.0, 25), (63, 65, 2.0, 5), (63, 66, 2.0, 20), (63, 67, 2.0, 12),
            (67, 68, 3.0, 5), (67, 69, 3.0, 7), (64, 70, 2.0, 5), (64, 71, 2.0, 20)]
    rows += [(node, i, 9.0, 1) for node, (a, b) in spans.items() for i in range(a, b)]
    y = np.r_[np.zeros(5), np.repeat([2, 4], 10), np.zeros(10), [4, 4], np.zeros(5), np.repeat([5, 7], 10)]
    return CondensedTree(*map(np.array, zip(*rows))), y.astype(int)


def test_the_footprints_other_clusters_among_other_classes_are_found_and_the_target_class_islands_are_not():
    tree, y = poison_by_source_tree()
    params = FlareParams()
    found = other_footprints(tree, y, 0, 0.35, params, flagged=65)  # the walk flagged the upper-body poison
    assert [row["node"] for row in found] == [70] and found[0]["members"].tolist() == list(range(37, 42))
    assert found[0]["rest_share"] == 0.0  # its split's rest is footwear only
    # without a flagged node both poison clusters are found; 68 (five clean T-shirts, as pure and as inflated)
    # splits from the rest of its class (0.71 label 0), and 67, the class with two neighbours, is its clean class
    assert sorted(row["node"] for row in other_footprints(tree, y, 0, 0.35, params)) == [65, 70]
    # 65's rest is labels 2 and 4 beside the target's clean class (10 of 32 are label 0): a stricter share
    # leaves it
    assert [row["node"] for row in other_footprints(tree, y, 0, 0.3, params)] == [70]
    assert other_footprints(tree, y, 4, 0.35, params) == []  # label 4 is not inflated
    with pytest.raises(InputError, match="footprint_rest_share"):
        Flare(footprint_rest_share=1.0)


def test_a_pure_island_of_the_target_class_splits_from_the_rest_of_its_class_and_is_benign():
    tree, y = poison_by_source_tree()
    excess = label_excess(y)
    island, rest_of_class = np.arange(25, 30), np.arange(30, 37)  # 68: five T-shirts; 69: five more and two coats
    within = np.r_[island, rest_of_class]
    assert class_makeup(y, island, within, excess, 0.5, island_labels=3)["inflated"]  # as pure as the footprint
    makeup = class_makeup(y, island, within, excess, 0.5, island_labels=3, island_rest_share=0.5)
    assert makeup["rest_share"] == round(5 / 7, 4) and makeup["target_island"]
    assert makeup["benign_class_split"] and not makeup["inflated"]
    # the upper-body poison (65) leaves labels 2 and 4 and the target class together: 10 of 32 are label 0
    poison, upper = np.arange(0, 5), np.arange(0, 37)
    makeup = class_makeup(y, poison, upper, excess, 0.5, island_labels=3, island_rest_share=0.5)
    assert makeup["inflated"] and not makeup["target_island"] and makeup["rest_share"] == round(10 / 32, 4)
    node, _ = stability_split(tree, y, levels=3, class_coverage=0.5, island_labels=3, island_rest_share=0.5)
    assert node == 65
    with pytest.raises(InputError, match="island_rest_share"):
        Flare(island_rest_share=0.0)


def test_a_pure_cluster_that_the_excess_of_an_inflated_label_explains_is_not_benign():
    # Labels 1-3 have 2 samples each, label 0 has 4 = 2 beyond the median: cluster 11 (samples 0-3) is all
    # of label 0 but its excess covers half of it, the footprint of all-to-one relabelling.
    y = np.array([0, 0, 0, 0, 1, 2, 3, 1, 2, 3])
    excess = label_excess(y)
    assert excess.tolist() == [2, 0, 0, 0]
    makeup = class_makeup(y, np.arange(4), np.arange(10), excess, class_coverage=0.5)
    assert makeup["class_share"] == 1.0 and not makeup["benign_class_split"]
    balanced = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3])
    assert class_makeup(balanced, np.arange(3), np.arange(10), label_excess(balanced), 0.5)["benign_class_split"]


def test_clean_classes_as_separate_blobs_flag_nothing():
    rng = np.random.default_rng(2)
    centres = rng.normal(0, 8, (4, 12))
    y = np.repeat(np.arange(4), 400)
    features = (centres[y] + rng.normal(0, 1, (1600, 12))).astype(np.float32)
    detection = Flare(n_seeds=1).fit(features, SLICES, y=y)
    assert detection.n_flagged == 0
    assert "nothing flagged" in detection.diagnostics["explanation"]
    detection = Flare(labelling="official", n_seeds=1).fit(features, SLICES, y=y)
    assert detection.n_flagged > 0  # the official rule flags every class but the largest


def test_unknown_parameters_are_named():
    with pytest.raises(InputError, match=r"flare: unknown parameter\(s\) xii; known: "):
        Flare(xii=0.02)
    with pytest.raises(InputError, match="pca_components"):
        Flare(pca_components=1)


def test_pca_and_exact_knn_options_find_the_planted_cluster_too():
    features, truth, labels = planted()
    detection = Flare(pca_components=6, knn_backend="auto", max_dropped_layers=0, n_seeds=1).fit(features, SLICES,
                                                                                                   y=labels)
    assert (detection.flags == truth).mean() >= 0.99


def test_clean_samples_of_other_labels_inside_an_all_to_one_cluster_are_left_unflagged():
    features, truth, labels = planted()
    inside = np.flatnonzero(truth)[:12]  # twelve rows of the poison blob carry labels 1-3: clean look-alikes
    labels = labels.copy()
    labels[inside] = np.arange(12) % 3 + 1
    truth = truth.copy()
    truth[inside] = False
    detection = Flare(n_seeds=1, max_dropped_layers=0, recover_neighbors=None).fit(features, SLICES, y=labels)
    assert not detection.flags[inside].any() and detection.flags[truth].all()
    assert detection.diagnostics["off_label_unflagged"] == 12
    whole = Flare(n_seeds=1, max_dropped_layers=0, recover_neighbors=None, drop_off_label=False)
    assert whole.fit(features, SLICES, y=labels).flags[inside].all()


def test_a_one_label_part_of_a_class_is_benign_unless_its_label_is_inflated():
    y = np.repeat(np.arange(4), 100)  # balanced: no label inflated
    makeup = class_makeup(y, np.arange(30), np.arange(400), label_excess(y), class_coverage=0.5)
    assert makeup["class_share"] == pytest.approx(0.3) and makeup["benign_class_split"] and makeup["one_benign_class"]
    inflated = np.r_[y, np.zeros(60, int)]  # 60 relabelled into class 0
    makeup = class_makeup(inflated, np.arange(400, 460), np.arange(460), label_excess(inflated), class_coverage=0.5)
    assert not makeup["benign_class_split"] and not makeup["one_benign_class"]


def test_how_pure_a_benign_island_must_be_is_a_parameter():
    y = np.repeat(np.arange(4), 100)
    island = np.r_[np.arange(34), np.arange(100, 106)]  # 34 of label 0, 6 of label 1: 85% one label
    within = np.arange(400)
    strict = class_makeup(y, island, within, label_excess(y), class_coverage=0.5, island_purity=0.9)
    assert not strict["benign_class_split"]
    default = class_makeup(y, island, within, label_excess(y), class_coverage=0.5)  # island_purity 0.8
    assert default["benign_class_split"] and default["one_benign_class"]
    with pytest.raises(InputError, match="island_purity"):
        Flare(island_purity=0.4)


def test_a_few_label_island_is_benign_but_poison_spread_over_every_label_or_relabelled_into_one_is_not():
    y = np.repeat(np.arange(10), 100)  # ten balanced classes: no label inflated
    within, excess = np.arange(1000), label_excess(y)
    # half of classes 2 and 4 and a tenth of 6 (the pullover / coat / shirt island of LF's scan)
    island = np.r_[np.arange(200, 250), np.arange(400, 445), np.arange(600, 610)]
    makeup = class_makeup(y, island, within, excess, class_coverage=0.5, island_labels=3)
    assert makeup["class_share"] < 0.5 and makeup["few_label_share"] == 1.0
    assert makeup["benign_class_split"] and not makeup["one_benign_class"]
    assert not class_makeup(y, island, within, excess, class_coverage=0.5, island_labels=1)["benign_class_split"]
    spread = np.arange(0, 1000, 10)  # ten of every class: all-to-all poison's make-up
    assert not class_makeup(y, spread, within, excess, class_coverage=0.5, island_labels=3)["benign_class_split"]
    # 85 relabelled into class 0 alone, or beside 45 of class 1 (Adaptive-Blend's partial cluster): the
    # all-to-one footprint, flagged; beside 90 of class 1 (poison and most of a benign class in one cluster,
    # Trojan's root split) a class split at its level, which the walk divides next
    inflated = np.r_[y, np.zeros(85, int)]
    relabelled, within, excess = np.arange(1000, 1085), np.arange(1085), label_excess(inflated)
    for benign, flagged in (([], True), (np.arange(100, 145), True), (np.arange(100, 190), False)):
        cluster = np.r_[relabelled, benign].astype(int)
        makeup = class_makeup(inflated, cluster, within, excess, 0.5, island_labels=3)
        assert makeup["benign_class_split"] is not flagged
    # with only five classes a few labels are most of them: the rule falls back to one label
    y5 = np.repeat(np.arange(5), 100)
    two = np.r_[np.arange(0, 45), np.arange(100, 145)]
    assert not class_makeup(y5, two, np.arange(500), label_excess(y5), 0.5, island_labels=3)["benign_class_split"]
    with pytest.raises(InputError, match="island_labels"):
        Flare(island_labels=0)


def test_the_target_labels_clean_class_with_its_neighbours_is_benign_and_the_pure_footprint_of_its_size_is_not():
    # 10 classes of 100 and 100 relabelled into class 0 (10% of ten classes: the poison is the clean class's size)
    y = np.r_[np.repeat(np.arange(10), 100), np.zeros(100, int)]
    within, excess = np.arange(len(y)), label_excess(y)
    clean_class = np.r_[np.arange(0, 90), np.arange(600, 620)]  # 90 T-shirts and 20 shirts: share 0.82
    makeup = class_makeup(y, clean_class, within, excess, 0.5, island_labels=3, footprint_purity=0.9)
    assert makeup["target_class"] and makeup["benign_class_split"] and not makeup["inflated"]
    old = class_makeup(y, clean_class, within, excess, 0.5, island_labels=3)  # without the test: the footprint
    assert old["inflated"] and not old["benign_class_split"]
    footprint = np.r_[np.arange(1000, 1095), np.arange(600, 602)]  # 95 relabelled and 2 neighbours: share 0.98
    makeup = class_makeup(y, footprint, within, excess, 0.5, island_labels=3, footprint_purity=0.9)
    assert makeup["inflated"] and not makeup["target_class"] and not makeup["benign_class_split"]
    part = np.r_[np.arange(1000, 1045), np.arange(600, 610)]  # 45 relabelled: under half the clean class, not it
    makeup = class_makeup(y, part, within, excess, 0.5, island_labels=3, footprint_purity=0.9)
    assert makeup["inflated"] and not makeup["target_class"]
    with pytest.raises(InputError, match="footprint_purity"):
        Flare(footprint_purity=0.5)


def test_poison_beside_several_classes_is_not_read_as_the_target_labels_clean_class():
    y = np.r_[np.repeat(np.arange(10), 100), np.zeros(100, int)]
    within, excess = np.arange(len(y)), label_excess(y)
    # 95 relabelled beside 25 coats, 25 pullovers and 20 shirts: label 0 is 0.58 of the cluster (IAD, 92.4% ASR)
    beside = np.r_[np.arange(1000, 1095), np.arange(200, 225), np.arange(400, 425), np.arange(600, 620)]
    loose = class_makeup(y, beside, within, excess, 0.5, island_labels=3, footprint_purity=0.9)
    assert loose["target_class"] and loose["benign_class_split"]  # session 24's rule: the label a bare majority
    makeup = class_makeup(y, beside, within, excess, 0.5, island_labels=3, footprint_purity=0.9, class_purity=0.7)
    assert not makeup["target_class"] and not makeup["benign_class_split"]
    clean_class = np.r_[np.arange(0, 90), np.arange(600, 620)]  # the clean class with its neighbours (0.82) still is
    assert class_makeup(y, clean_class, within, excess, 0.5, island_labels=3, footprint_purity=0.9,
                        class_purity=0.7)["target_class"]
    assert Flare().params.class_purity == 0.7
    with pytest.raises(InputError, match="class_purity"):
        Flare(class_purity=0.9)  # not below footprint_purity: no cluster could be the clean class
    with pytest.raises(InputError, match="class_purity"):
        Flare(class_purity=0.4)


def test_poison_with_cover_samples_from_every_class_is_not_read_as_the_target_labels_clean_class():
    y = np.r_[np.repeat(np.arange(10), 100), np.zeros(100, int)]
    within, excess = np.arange(len(y)), label_excess(y)
    # 95 relabelled beside 2 cover samples of each other class (a trigger with the true label, IAD's
    # cross-trigger): label 0 is 0.84, the other labels spread over all nine classes
    covers = np.concatenate([np.arange(100 * c, 100 * c + 2) for c in range(1, 10)])
    poison = np.r_[np.arange(1000, 1095), covers]
    options = dict(island_labels=3, footprint_purity=0.9, class_purity=0.7)
    without = class_makeup(y, poison, within, excess, 0.5, **options)
    assert without["target_class"] and without["benign_class_split"]  # session 25's rule: read as the clean class
    makeup = class_makeup(y, poison, within, excess, 0.5, class_neighbour_share=0.8, **options)
    assert makeup["neighbour_share"] == round(6 / 18, 4)  # the top three other classes hold 6 of 18
    assert makeup["inflated"] and not makeup["target_class"] and not makeup["benign_class_split"]
    # the clean class keeps its neighbours from a few classes (20 shirts, 4 pullovers, 2 dresses, 1 coat: 26 of 27)
    clean_class = np.r_[np.arange(0, 90), np.arange(600, 620), np.arange(200, 204), np.arange(300, 302), [400]]
    makeup = class_makeup(y, clean_class, within, excess, 0.5, class_neighbour_share=0.8, **options)
    assert makeup["target_class"] and makeup["neighbour_share"] == round(26 / 27, 4)
    assert Flare().params.class_neighbour_share == 0.8
    with pytest.raises(InputError, match="class_neighbour_share"):
        Flare(class_neighbour_share=0.0)


def test_off_label_members_of_an_all_to_one_flagged_cluster_are_unflagged_and_nothing_else_is():
    y = np.r_[np.repeat(np.arange(10), 100), np.zeros(90, int)]  # 90 relabelled into class 0
    flags = np.zeros(len(y), bool)
    flags[1000:] = True
    flags[[200, 201, 805]] = True  # three clean samples of labels 2 and 8 beside the poison
    flags[[3, 4]] = True  # two clean class-0 samples: same label, indistinguishable here, kept
    off = off_label_members(flags, y)
    assert np.flatnonzero(off).tolist() == [200, 201, 805]
    spread = np.zeros(len(y), bool)
    spread[::10] = True  # every label: all-to-all make-up, nothing dropped
    assert not off_label_members(spread, y).any()
    island = np.zeros(len(y), bool)
    island[np.r_[300:390, 400:405]] = True  # one label that is not inflated: nothing dropped
    assert not off_label_members(island, y).any()
    assert not off_label_members(np.zeros(len(y), bool), y).any()


def test_the_footprint_beside_a_benign_class_loses_that_class_and_a_cluster_the_benign_class_dominates_keeps_it():
    y = np.r_[np.repeat(np.arange(10), 100), np.zeros(90, int)]  # 90 relabelled into class 0
    flags = np.zeros(len(y), bool)
    flags[1000:] = True
    flags[100:170] = True  # 70 clean of class 1 beside them (Adaptive-Blend's cluster of trousers)
    assert np.flatnonzero(off_label_members(flags, y)).tolist() == list(range(100, 170))
    assert not off_label_members(flags, y, purity=0.8).any()  # the session-13 rule: one label only
    flags[170:200] = True  # 100 of class 1 and 90 relabelled: class 1 is the largest label, nothing dropped
    assert not off_label_members(flags, y).any()
    with pytest.raises(InputError, match="off_label_purity"):
        Flare(off_label_purity=0.4)


FIVE = FeatureLayout(tuple(f"bn{i}" for i in range(5)), (2, 2, 2, 2, 2))


def searched(monkeypatch, flagged_at, *, class_split_layers=3, stable=(0, 1, 2, 3, 4), labelling=True,
             deeper_at=None, progress=None):
    """search_subspace over FIVE with the embedding stubbed: a stable split wherever `stable` says, and a
    labelling that flags a node only with the dropped layers in `flagged_at`."""
    from types import SimpleNamespace

    import backdoor_engine.methods.flare as flare_module

    def try_subspace(X, params, stage=None):
        dropped = 5 - X.shape[1] // 2
        split = StableSplit(7, 1.0, 0.5, 0) if dropped in stable else None
        return np.zeros((len(X), 2)), SimpleNamespace(dropped=dropped), [1.0], 0.1, split

    monkeypatch.setattr(flare_module, "_try_subspace", try_subspace)
    label = (lambda fit: (11 if fit.dropped in flagged_at else None, [])) if labelling else None
    deeper = None if deeper_at is None else (lambda fit: (12 if fit.dropped in deeper_at else None, ["deeper"]))
    features = np.zeros((10, 10), np.float32)
    return search_subspace(features, FIVE, FlareParams(class_split_layers=class_split_layers), label=label,
                           deeper=deeper, progress=progress)


def test_a_stable_split_excused_as_benign_classes_is_passed_over_and_the_loop_drops_more_layers(monkeypatch):
    steps, chosen, _ = searched(monkeypatch, flagged_at={2})
    assert [(s.dropped_layers, s.excused) for s in steps] == [(0, True), (1, True), (2, False)]
    step, _, fit, _, labelled = chosen
    assert step.dropped_layers == 2 and labelled[0] == 11


def test_subspaces_without_a_stable_split_are_skipped_on_the_way_and_do_not_count_as_excused(monkeypatch):
    steps, chosen, _ = searched(monkeypatch, flagged_at={3}, stable=(0, 3))
    assert [(s.dropped_layers, s.split is not None, s.excused) for s in steps] == [
        (0, True, True), (1, False, False), (2, False, False), (3, True, False)]
    assert chosen[0].dropped_layers == 3


def test_the_loop_goes_at_most_class_split_layers_past_the_first_stable_split_then_keeps_that_one(monkeypatch):
    steps, chosen, _ = searched(monkeypatch, flagged_at={4}, class_split_layers=2)
    assert [s.dropped_layers for s in steps] == [0, 1, 2]  # layer 4 is past the bound: never fitted
    assert chosen[0].dropped_layers == 0 and chosen[4][0] is None  # the first stable subspace, nothing flagged
    steps, chosen, _ = searched(monkeypatch, flagged_at={1}, class_split_layers=0)
    assert [s.dropped_layers for s in steps] == [0] and chosen[4][0] is None


def test_the_walk_past_depth_runs_only_where_every_stable_subspace_was_passed_over_and_in_the_loops_order(
        monkeypatch):
    # A subspace flagged at depth wins over an earlier one the deeper walk would flag in.
    steps, chosen, _ = searched(monkeypatch, flagged_at={2}, deeper_at={0, 1})
    assert chosen[0].dropped_layers == 2 and chosen[4][0] == 11 and not any(s.footprint_walk for s in steps)
    # Every stable subspace passed over: the first (in the loop's order) the deeper walk flags in is chosen.
    reported = []
    steps, chosen, _ = searched(monkeypatch, flagged_at=set(), deeper_at={1, 3},
                                progress=lambda step: reported.append((step.dropped_layers, step.footprint_walk)))
    assert [s.dropped_layers for s in steps] == [0, 1, 2, 3]
    assert reported[-1] == (1, True) and len(reported) == 5  # each step as tried, then the one chosen again
    assert chosen[0].dropped_layers == 1 and chosen[4] == (12, ["deeper"])
    assert [(s.excused, s.footprint_walk) for s in steps] == [(True, False), (False, True), (True, False),
                                                              (True, False)]
    steps, chosen, _ = searched(monkeypatch, flagged_at=set(), deeper_at=set())
    assert chosen[0].dropped_layers == 0 and chosen[4][0] is None  # nothing there either: the first, unflagged


def test_without_a_labelling_the_loop_stops_at_the_first_stable_split_as_the_official_code(monkeypatch):
    steps, chosen, _ = searched(monkeypatch, flagged_at=set(), stable=(1, 2), labelling=False)
    assert [s.dropped_layers for s in steps] == [0, 1] and not any(s.excused for s in steps)
    assert chosen[0].dropped_layers == 1 and chosen[4] is None


def test_class_split_layers_must_be_a_count():
    with pytest.raises(InputError, match="class_split_layers"):
        Flare(class_split_layers=-1)


def test_a_flagged_footprint_that_explains_half_the_excess_is_completed_from_the_label_by_a_linear_probe():
    X, y, truth, flags = relabelled_half_flagged()
    add, summary = footprint_completion(flags, X, y, min_unexplained=100)
    assert summary["inflated"] and summary["label"] == 0 and summary["unexplained"] == 200
    assert not (add & flags).any() and summary["added"] == add.sum() <= 200
    assert (add & truth).sum() >= 180 and (add & ~truth).sum() <= 5  # the rest of the poison, not the clean zeros


def test_the_footprint_is_left_as_it_is_when_it_explains_the_excess_or_is_not_one_inflated_label():
    X, y, truth, flags = relabelled_half_flagged()
    add, summary = footprint_completion(truth, X, y, min_unexplained=100)  # all of the poison flagged
    assert not add.any() and summary["unexplained"] <= 0
    mixed = np.zeros(len(y), bool)
    mixed[np.r_[0:100, 600:700, 1100:1200]] = True  # clean samples of three labels: not a footprint
    add, summary = footprint_completion(mixed, X, y, min_unexplained=100)
    assert not add.any() and not summary["inflated"]
    add, summary = footprint_completion(flags, X, y, min_unexplained=100, complete=False)
    assert not add.any() and summary["unexplained"] == 200 and summary["added"] == 0
    add, summary = footprint_completion(np.zeros(len(y), bool), X, y, min_unexplained=100)
    assert not add.any() and summary is None


def test_a_run_with_several_footprint_clusters_is_completed_by_one_probe_per_cluster():
    # 2,000 clean samples over 4 labels and 400 poison relabelled 0: half drawn from label 2, half from label 3,
    # each keeping its source's look beside the trigger; the run flagged 100 of each half as two clusters
    rng = np.random.default_rng(0)
    y = np.r_[np.repeat(np.arange(4), 500), np.zeros(400, int)]
    truth = np.r_[np.zeros(2000, bool), np.ones(400, bool)]
    look = np.r_[y[:2000], np.repeat([2, 3], 200)]
    X = rng.normal(0, 1, (2400, 12))
    X[:, 2:6] += np.eye(4)[look] * 3
    X[truth, :2] += 4.0
    X = X.astype(np.float32)
    flags = np.zeros(2400, bool)
    flags[2000:2100] = flags[2200:2300] = True
    run = FlareRun(0, [], flags, np.zeros(2400, int), None, None, 0, {},
                   footprints=[np.arange(2000, 2100), np.arange(2200, 2300)])
    (completed,), (summary,) = complete_runs([run], X, y, FlareParams())
    assert completed.flags[truth].mean() >= 0.95 and completed.flags[~truth].mean() <= 0.01
    assert summary["clusters"] == 2 and summary["added"] == int((completed.flags & ~flags).sum())
    assert summary["unexplained"] == summary["label_excess"] - 200


def footprint_runs(*clusters_of_runs):
    """Runs of 2,400 samples (relabelled_half_flagged's layout) flagging the given clusters, several as footprints."""
    runs = []
    for seed, clusters in enumerate(clusters_of_runs):
        flags = np.zeros(2400, bool)
        for members in clusters:
            flags[members] = True
        runs.append(FlareRun(seed, [], flags, np.zeros(2400, int), None, None, 0, {},
                             footprints=[np.asarray(m) for m in clusters] if len(clusters) > 1 else None))
    return runs


def test_a_run_s_cluster_that_holds_the_label_s_excess_drops_other_runs_islands_and_completes_their_poison():
    # label 0: 500 clean + 400 relabelled poison (2000-2399), excess 400; an island of 150 clean zeros (0-149)
    _, y, truth, _ = relabelled_half_flagged()
    poison, island, half = np.arange(2000, 2400), np.arange(150), np.arange(2000, 2200)
    runs = footprint_runs([poison], [island], [half, island], [])
    kept, summary = exclude_beside_complete(runs, y, 50)
    assert summary["applied"] and summary["complete_clusters"] == 1 and summary["complete_samples"] == 400
    assert kept[0] is runs[0] and kept[3] is runs[3]  # the complete run and the run that flagged nothing
    assert not kept[1].flags.any()  # the island alone: dropped, the run abstains
    np.testing.assert_array_equal(kept[2].flags, truth)  # the island dropped, its half of the poison completed
    assert kept[2].footprints is None
    assert summary["runs_dropped"] == [0, 150, 150, 0] and summary["runs_completed"] == [0, 0, 200, 0]


def test_a_complete_cluster_may_hold_the_label_s_own_triggered_samples_beyond_the_excess_but_not_more():
    # the poison's cluster also holds 120 zeros that carry the trigger and keep their label (poison drawn from the
    # target class, its covers): 520 of label 0 against an excess of 400, within 400 * 4 / 3 + 50 (K = 4 labels)
    _, y, _, _ = relabelled_half_flagged()
    with_own, island = np.r_[np.arange(120), np.arange(2000, 2400)], np.arange(300, 450)
    kept, summary = exclude_beside_complete(footprint_runs([with_own], [island]), y, 50)
    assert summary["applied"] and summary["complete_clusters"] == 1 and not kept[1].flags.any()
    # 200 of them (600 of label 0) is more than the relabelling can explain: not complete, nothing dropped
    runs = footprint_runs([np.r_[np.arange(200), np.arange(2000, 2400)]], [island])
    kept, summary = exclude_beside_complete(runs, y, 50)
    assert summary is None and all(a is b for a, b in zip(kept, runs))
    # short of the excess by more than min_size: part of the footprint, not all of it
    runs = footprint_runs([np.arange(2000, 2340)], [island])
    kept, summary = exclude_beside_complete(runs, y, 50)
    assert summary is None and all(a is b for a, b in zip(kept, runs))


def test_runs_are_left_as_they_are_without_a_complete_cluster_or_where_complete_clusters_disagree():
    _, y, _, _ = relabelled_half_flagged()
    island, half = np.arange(150), np.arange(2000, 2200)
    runs = footprint_runs([half], [island], [half, island])
    kept, summary = exclude_beside_complete(runs, y, 50)
    assert summary is None and all(a is b for a, b in zip(kept, runs))
    # 400 clean zeros read as a complete footprint beside the poison's: together twice the excess, so neither
    # can be told to be the one; nothing is dropped
    runs = footprint_runs([np.arange(2000, 2400)], [np.arange(400)], [island])
    kept, summary = exclude_beside_complete(runs, y, 50)
    assert not summary["applied"] and summary["complete_clusters"] == 2
    assert all(a is b for a, b in zip(kept, runs))


def test_the_label_s_linked_components_flag_the_poison_that_stayed_by_its_source_classes():
    # the flags hold the poison drawn from label 5; the rest (from 2-4) sits with it in the features, among 2-4
    X, y, truth, flags = relabelled_by_source(covers=40)
    add, summary = footprint_components_of(flags, X, y, k=15, min_size=50)
    assert summary["label"] == 0 and summary["unexplained"] == 300 and summary["added"] == add.sum()
    assert (add & truth).sum() >= 280 and not (add & ~truth).any() and not (add & flags).any()
    taken = [c for c in summary["components"] if c["taken"]]
    assert len(taken) == 1 and taken[0]["top_share"] < 0.5 and taken[0]["flagged"] >= 90
    # the label's clean class is a component too, beside the class it looks like (label 1): not taken
    clean = [c for c in summary["components"] if not c["taken"]]
    assert len(clean) == 1 and clean[0]["top_share"] > 0.8 and clean[0]["flagged"] == 0


def test_a_linked_component_larger_than_the_label_s_excess_or_with_one_neighbouring_class_is_not_taken():
    X, y, truth, flags = relabelled_by_source(trigger=3.0)  # a faint trigger: poison and clean zeros link up
    add, summary = footprint_components_of(flags, X, y, k=15, min_size=50)
    assert not add.any() and summary["components"][0]["above_excess"] and summary["components"][0]["size"] > 400
    X, y, truth, flags = relabelled_by_source()
    add, summary = footprint_components_of(flags, X, y, k=15, min_size=50, spread=0.25)  # the poison's is 0.32
    assert not add.any() and not any(c["taken"] for c in summary["components"])


def test_linked_components_are_not_read_where_the_flags_explain_the_excess_or_are_not_the_footprint():
    X, y, truth, flags = relabelled_by_source()
    add, summary = footprint_components_of(truth, X, y, k=15, min_size=50)  # all of the poison flagged
    assert not add.any() and summary["unexplained"] == 0 and summary["components"] == []
    mixed = np.isin(np.arange(len(y)), np.r_[400:500, 800:900, 1200:1300])  # clean samples of three labels
    add, summary = footprint_components_of(mixed, X, y, k=15, min_size=50)
    assert not add.any() and summary is None
    add, summary = footprint_components_of(np.zeros(len(y), bool), X, y, k=15, min_size=50)
    assert not add.any() and summary is None


def test_further_rounds_refit_the_probe_on_what_the_last_added_until_the_excess_is_explained():
    X, y, truth, flags = relabelled_half_flagged()
    few = flags & (np.arange(len(y)) < 2040)  # 40 of the 400 flagged: the rest is far from explained
    one, summary = footprint_completion(few, X, y, min_unexplained=50)
    assert summary["rounds"] == 1 and summary["unexplained"] == 360
    more, summary = footprint_completion(few, X, y, min_unexplained=50, rounds=5)
    assert summary["rounds"] >= 1 and (more & one).sum() == one.sum() and more.sum() >= one.sum()
    assert more.sum() <= 360


def test_the_mixture_cut_takes_the_faint_rest_of_the_poison_that_stops_short_of_the_probes_zero():
    X, y, truth, flags = relabelled_half_flagged()
    X[2200:2400, :2] -= 2.0  # the unflagged half shows the trigger at half the strength of the flagged half
    sign, summary = footprint_completion(flags, X, y, min_unexplained=100, cut="sign")
    assert summary["cut"] == "sign" and (sign & truth).sum() <= 130  # most of the rest scores below zero
    mixture, summary = footprint_completion(flags, X, y, min_unexplained=100, cut="mixture")
    assert summary["cut"] == "mixture" and summary["separation"] >= 2 and mixture.sum() <= 200
    assert (mixture & truth).sum() >= 165 and (mixture & ~truth).sum() <= 30  # of 200 poison, 500 clean zeros


def test_with_two_modes_a_one_mode_score_density_is_cut_at_the_probes_zero_and_two_modes_at_the_mixture():
    X, y, truth, flags = relabelled_half_flagged()
    X[2200:2400, :2] -= 4.0  # the unflagged half carries no trigger: to the probe it is the label's clean zeros
    add, summary = footprint_completion(flags, X, y, min_unexplained=100, cut="two-modes")
    assert summary["cut"] == "sign" and summary["modes"] == 1 and (add & ~truth).sum() <= 5
    X, y, truth, flags = relabelled_half_flagged()  # the rest shows the trigger: two modes, the poison taken
    add, summary = footprint_completion(flags, X, y, min_unexplained=100, cut="two-modes")
    assert summary["cut"] == "mixture" and summary["modes"] == 2 and (add & truth).sum() >= 180
    assert (add & ~truth).sum() <= 10


def test_the_score_mixture_takes_the_upper_population_only_when_the_two_are_apart():
    rng = np.random.default_rng(0)
    upper, separation, modes = score_mixture(np.r_[rng.normal(0, 1, 700), rng.normal(5, 1, 300)])
    assert separation > 4 and modes == 2 and upper.sum() == pytest.approx(300, abs=5) and upper[700:].mean() > 0.98
    wide = np.r_[rng.normal(0, 1, 900), rng.normal(6, 4, 300)]  # a wide upper component: its far-low tail is not taken
    upper, _, _ = score_mixture(wide)
    assert not upper[wide < 0].any()
    upper, separation, _ = score_mixture(rng.normal(0, 1, 1000))  # one population: no cut of its own
    assert upper is None and separation < 2
    assert score_mixture(np.ones(50)) == (None, 0.0, 1)


def test_a_one_mode_score_density_passes_the_separation_bound_but_not_the_two_modes():
    rng = np.random.default_rng(0)
    # A wide minority shoulder on one side (as IAD's probe scores, session 24): D above 2, one mode.
    skewed = np.r_[rng.normal(-4.6, 1.9, 1300), rng.normal(0.0, 2.4, 700)]
    upper, separation, modes = score_mixture(skewed)
    assert separation >= 2 and modes == 1 and upper is not None  # "mixture" would cut it
    upper, separation, modes = score_mixture(skewed, need_two_modes=True)
    assert upper is None and separation >= 2 and modes == 1
    upper, _, modes = score_mixture(np.r_[rng.normal(0, 1, 700), rng.normal(5, 1, 300)], need_two_modes=True)
    assert modes == 2 and upper.sum() == pytest.approx(300, abs=5)


def test_with_no_unflagged_sample_of_another_label_the_probe_is_not_fitted_and_nothing_is_added():
    X, y, truth, flags = relabelled_half_flagged()
    keep = y == 0  # the label-0 samples only (clean and poisoned)...
    X, y, truth, flags = X[keep], y[keep], truth[keep], flags[keep]
    y = np.where(np.arange(len(y)) < 10, 1, y)  # ...and ten relabelled 1, all of them flagged below
    flags[:10] = True
    add, summary = footprint_completion(flags, X, y, min_unexplained=1)
    assert summary["inflated"] and summary["unexplained"] > 0  # the probe would be due
    assert not add.any() and summary["added"] == 0


def test_the_last_of_the_footprint_is_found_by_a_probe_within_the_label_and_the_labels_clean_samples_are_not():
    X, y, truth, flags = relabelled_half_flagged()
    most = truth & (np.arange(len(y)) < 2380)  # 380 of the 400 flagged: the excess is explained, 20 are left
    add, summary = residual_members(most, X, y)
    assert summary["inflated"] and summary["label"] == 0 and summary["candidates"] == 520
    assert not (add & most).any() and summary["added"] == add.sum()
    assert (add & truth).sum() >= 18 and (add & ~truth).sum() <= 3  # of 20 poison among 500 clean zeros
    add, _ = residual_members(truth, X, y)  # all of the poison flagged: the label's rest is clean
    assert (add & ~truth).sum() <= 3


def test_the_residual_probe_leaves_flags_that_are_not_one_inflated_label_or_nothing_as_they_are():
    X, y, truth, flags = relabelled_half_flagged()
    mixed = np.zeros(len(y), bool)
    mixed[np.r_[0:100, 600:700, 1100:1200]] = True
    add, summary = residual_members(mixed, X, y)
    assert not add.any() and not summary["inflated"] and summary["added"] == 0
    add, summary = residual_members(np.zeros(len(y), bool), X, y)
    assert not add.any() and summary is None
    with pytest.raises(InputError, match="residual_folds"):
        Flare(residual_folds=1)


def test_flags_that_differ_at_the_margins_settle_to_one_fixed_point_that_holds_the_footprint():
    X, y, truth, _ = relabelled_half_flagged()
    index = np.arange(len(y))
    # Two seeds' flags: most of the poison each, a different part of it missing and different clean zeros taken,
    # and a sample of another label that the label's rounds must leave alone.
    one = truth & (index < 2385)
    one[[3, 17, 40, 1000]] = True
    other = truth & (index >= 2012)
    other[[5, 60, 1000]] = True
    first, summary = settle_footprint(one, X, y)
    second, _ = settle_footprint(other, X, y)
    assert summary["settled"] and summary["converged"] == "fixed point"
    assert summary["label"] == 0 and summary["members"] == 900
    assert summary["separation"] >= 2 and summary["modes"] == 2
    assert np.array_equal(first, second)  # one fixed point from either
    assert (first & truth).sum() >= 396 and (first & ~truth & (y == 0)).sum() <= 2
    assert first[1000]  # label 1: not the label's to decide
    assert summary["added"] == (first & ~one).sum() and summary["removed"] == (one & ~first).sum() > 0


def test_the_mixture_cut_keeps_more_of_the_poison_whose_trigger_shows_weakly_than_the_sign_and_no_more_clean():
    X, y, truth, _ = relabelled_half_flagged()
    weak = np.zeros(len(y), bool)
    weak[2000:2080] = True
    X[weak, :2] -= 2.5  # 80 poison whose trigger shows at 1.5 instead of 4: nearest the clean side
    flags = truth & ~weak
    by_sign, _ = settle_footprint(flags, X, y, cut="sign")
    by_mixture, summary = settle_footprint(flags, X, y, cut="mixture")
    assert summary["settled"] and summary["converged"] == "fixed point"
    assert (by_mixture & weak).sum() >= (by_sign & weak).sum() + 5
    assert (by_mixture & ~truth).sum() <= (by_sign & ~truth).sum() <= 2
    assert (by_mixture & truth & ~weak).sum() == (truth & ~weak).sum()


def test_settling_with_hysteresis_keeps_the_poison_the_mixture_keeps_and_adds_only_what_the_probe_claims():
    X, y, truth, _ = relabelled_half_flagged(seed=1)
    poison = np.flatnonzero(truth)
    X[poison, :2] += np.random.default_rng(11).uniform(-2.5, 3.0, (len(poison), 1))  # the trigger at 1.5 to 7
    lookalike = np.arange(40)
    X[lookalike, :2] += 1.5  # 40 clean zeros that look like a faint trigger
    by_sign, _ = settle_footprint(truth, X, y, cut="sign")
    by_mixture, _ = settle_footprint(truth, X, y, cut="mixture")
    by_hysteresis, summary = settle_footprint(truth, X, y, cut="hysteresis")
    assert summary["settled"] and summary["converged"] == "fixed point"
    # the wide upper component keeps the poison whose trigger shows faintly, as the mixture's cut does...
    assert (by_hysteresis & truth).sum() == (by_mixture & truth).sum() >= (by_sign & truth).sum() + 5
    # ...and the clean zeros it reaches below the probe's boundary are not added
    clean = ~truth & (y == 0)
    assert (by_hysteresis & clean).sum() <= (by_sign & clean).sum() <= 5
    assert (by_mixture & clean).sum() >= (by_hysteresis & clean).sum() + 8
    assert not (by_hysteresis & ~by_mixture).any()


def test_where_the_flagged_samples_are_not_apart_from_the_rest_of_their_label_settling_changes_nothing():
    X, y, truth, _ = relabelled_half_flagged()
    X[truth, :2] -= 4.0  # no trigger: the relabelled samples look like their label's clean ones
    flags = (y == 0) & (np.random.default_rng(1).random(len(y)) < 0.45)  # the label inflated, flagged at random
    settled, summary = settle_footprint(flags, X, y)
    assert settled is None and summary["inflated"] and not summary["settled"] and summary["reason"]
    assert summary["converged"] is None or summary["separation"] < 2 or summary["modes"] < 2
    mixed = np.zeros(len(y), bool)
    mixed[np.r_[0:100, 600:700, 1100:1200]] = True  # not one inflated label: not settled
    settled, summary = settle_footprint(mixed, X, y)
    assert settled is None and summary["reason"] == "the flags are not one inflated label"
    assert settle_footprint(np.zeros(len(y), bool), X, y) == (None, None)


def test_rounds_that_have_not_shown_a_fixed_point_settle_nothing_and_the_bound_and_rule_are_checked():
    X, y, truth, _ = relabelled_half_flagged()
    most = truth & (np.arange(len(y)) < 2380)
    settled, summary = settle_footprint(most, X, y, max_rounds=1)  # the first round changes flags: not a fixed point
    assert settled is None and summary["rounds"] == 1 and summary["converged"] is None
    assert summary["reason"] == "the decisions still changed after 1 rounds"
    for name, value in (("settle_rounds", 0), ("settle_overlap", 1.5), ("settle_cut", "median")):
        with pytest.raises(InputError, match=name):
            Flare(**{name: value})


def test_a_path_of_strengths_starts_each_stage_from_the_last_and_settles_margins_to_one_fixed_point():
    X, y, truth, _ = relabelled_half_flagged()
    index = np.arange(len(y))
    one, other = truth & (index < 2385), truth & (index >= 2012)
    one[[3, 17, 40]] = True
    other[[5, 60]] = True
    path = (0.001, 0.01)
    first, summary = settle_footprint(one, X, y, strengths=path)
    second, _ = settle_footprint(other, X, y, strengths=path)
    assert summary["settled"] and summary["converged"] == "fixed point" and np.array_equal(first, second)
    assert (first & truth).sum() >= 396 and (first & ~truth).sum() <= 2
    _, single = settle_footprint(one, X, y, strengths=(0.01,))
    assert summary["rounds"] >= single["rounds"] + 1  # the last stage takes at least the round that shows its point
    settled, summary = settle_footprint(one, X, y, max_rounds=1, strengths=path)  # settle_rounds bounds each stage
    assert settled is None and summary["reason"] == "the decisions still changed after 1 rounds at C 0.001"
    for value in ([], [0.01, 0], ["a"], 0.01):
        with pytest.raises(InputError, match="settle_strengths"):
            Flare(settle_strengths=value)


def test_rounds_that_drift_far_from_the_flags_they_started_from_settle_nothing():
    X, y, truth, _ = relabelled_half_flagged()
    few = truth & (np.arange(len(y)) < 2100)  # a quarter of the poison: the rounds take the other three quarters
    settled, summary = settle_footprint(few, X, y)
    assert settled is None and summary["converged"] and summary["overlap"] < 0.75
    assert summary["reason"].startswith("the settled flags share 0.")
    settled, summary = settle_footprint(few, X, y, min_overlap=0.0)
    assert summary["settled"] and (settled & truth).sum() >= 396


def test_the_probes_scale_only_the_rows_they_read_with_the_moments_of_every_sample_computed_once():
    X, y, truth, flags = relabelled_half_flagged()
    X = X.astype(np.float32)
    whole = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-6)
    scale = ColumnScale(X)
    rows = np.array([5, 0, 2379, 2380, len(X) - 1])
    assert np.array_equal(scale.rows(rows), whole[rows])  # the same numbers as scaling the whole matrix
    assert scale.moments is scale.moments  # one pass, reused by every probe of a scan
    most = truth & (np.arange(len(y)) < 2380)
    shared, _ = residual_members(most, X, y, scale=scale)
    alone, _ = residual_members(most, X, y)
    assert np.array_equal(shared, alone) and shared.any()
    shared, _ = footprint_completion(flags, X, y, min_unexplained=100, scale=scale)
    alone, _ = footprint_completion(flags, X, y, min_unexplained=100)
    assert np.array_equal(shared, alone) and shared.any()
